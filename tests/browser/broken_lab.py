# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 98. A deliberately broken lab
#
# Test fixture for tests/test_browser.py: cell 3 raises, so the browser check must fail and name that cell.
# It is not a lab (it lives outside labs/ and is never collected as one).

# %%
print("this cell runs")

# %% [markdown]
# The next cell raises, as a lab with a bug would.

# %%
def broken_step():
    raise RuntimeError("this lab is broken on purpose")


broken_step()

# %% [markdown]
# Nothing after the error runs.

# %%
print("never reached")
