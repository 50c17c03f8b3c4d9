# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 97. A panel whose slider changes nothing
#
# Test fixture for tests/test_browser.py: every cell runs and the figure renders, but the figure ignores the
# slider, so the browser check must fail on "moving slider 'n' ... did not change its figure".

# %%
from lablib import viz

viz.set_plotly_renderer()


def same_figure_whatever_n(n=1):
    return viz.line_figure({"fixed": ([0, 1, 2], [0.0, 1.0, 4.0])}, title="ignores n")


viz.interact_figure(same_figure_whatever_n, n=(1, 10))
