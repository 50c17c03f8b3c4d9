# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03. Adapter banks: LoRA, NOLA, VB-LoRA, MoS and Compacter at matched budgets
#
# **What you'll learn**
# * how `lablib.adapters` attaches an adapter to the Linear layers of any model by name pattern (PEFT's rules),
#   trains only the adapter, merges it into the base weight and back;
# * five ways to build the update ΔW of a layer, from a private low-rank pair (LoRA) to pieces drawn from banks
#   shared by every layer (VB-LoRA's vector bank, MoS's shard pools, Compacter's slow factors) or regenerated from a
#   seed (NOLA), and how `lablib.ledger` counts what each one must *store*;
# * how to compare them honestly: the same stored-parameter budget, the same base model and data, several seeds.
#
# **The papers**
# * Hu et al., *LoRA* (2022): ΔW = (α/r) B A with rank r.
# * Koohpayegani et al., *NOLA* (ICLR 2024): A and B are linear combinations of frozen random bases from a seed.
# * Li et al., *VB-LoRA* (NeurIPS 2024): every length-b sub-vector of A and B is a top-k mix of one global vector bank.
# * Wang et al., *MoS: Mixture of Shards* (ICLR 2025): rank vectors concatenated from shards routed out of global
#   pools; claims large parameter savings over LoRA, and that "differentiation" between layers is indispensable.
# * Karimi Mahabadi et al., *Compacter* (2021): ΔW as sums of Kronecker products with shared slow factors.

# %%
# Setup: imports, seeds, lablib version, renderer. LABLIB_STATIC=1 draws static figures (nbval, nbconvert).
import torch

import lablib
from lablib import adapters, ledger, models, viz
from lablib.experiments import adapter_banks as ab
from lablib.viz import adapters as vad

assert lablib.__version__ == "0.1.0", f"this lab was written for lablib 0.1.0, found {lablib.__version__}"
torch.manual_seed(0)
RENDERER = viz.set_plotly_renderer()
print(f"lablib {lablib.__version__}, torch {torch.__version__}, static figures: {viz.static_mode()}")

# %% [markdown]
# ## 1. Build it
#
# ### 1.1 Attach a LoRA by name pattern
#
# `target_modules` as a list matches a module whose dotted name equals an entry or ends in `"." + entry`, as in PEFT.
# Each matched `nn.Linear` is wrapped (its original object kept as `.base_layer`), every base parameter is frozen,
# and `attach_adapters` works on a copy, so the model you pass is untouched.

# %%
config = models.TransformerConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, seq_len=64)
model = models.TinyTransformer(config)
lora = adapters.attach_adapters(model, adapters.LoraConfig(r=2, alpha=4, target_modules=list(ab.TARGETS)))
print(lora.base_model.blocks[0].attn.qkv)
print(ledger.format_ledger([adapters.adapter_ledger(lora)]))
print(f"whole adapted model: {ledger.ledger(lora).total:,} parameters, of which trainable "
      f"{ledger.ledger(lora).trainable:,}")

# %% [markdown]
# ### 1.2 Five ways to build ΔW, at one budget
#
# `ab.kind_config(kind, level)` gives each kind the configuration whose *stored* count equals a LoRA of rank 1, 2 or
# 4 on the same 16 layers (4 096, 8 192, 16 384 numbers). Stored is what you must save given the base model: NOLA's
# bases and MoS's routing are regenerated from a seed (stored 0); VB-LoRA stores its bank plus top-k indices and
# weights; shared banks count once. `mos_pure` is MoS with every differentiation flag off: all layers of a type use
# the same A and B (the paper's "pure sharing"). Note VB-LoRA: it *trains* a logit per bank vector for every
# sub-vector (far more than it stores), then keeps only the top-k indices and weights.

# %%
for kind in ab.KINDS:
    adapted = adapters.attach_adapters(model, ab.kind_config(kind, 1))
    counts = adapters.adapter_ledger(adapted)
    print(f"{kind:<9} stored {counts.stored:>6,}  trainable {counts.trainable:>6,}  "
          f"banks {sorted(adapted.adapter_banks) or '-'}")

# %% [markdown]
# ## 2. Check it
#
# The wrapper contract, on the real model: an untrained LoRA changes nothing (B = 0), its update equals (α/r) B A by
# hand, merge-then-unmerge restores the base weight, the base never gets a gradient, and a NOLA adapter reloaded from
# its state (seed + coefficients only) regenerates the same bases. (`tests/test_adapters_peft.py` also checks LoRA
# against `peft` itself when it is installed.)

# %%
x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
layer = lora.base_model.blocks[0].attn.qkv
with torch.no_grad():
    layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
# ΔW = (α / r) B A : (out, in)
delta = (4 / 2) * layer.lora_B @ layer.lora_A
h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
assert torch.allclose(layer(h), h @ (layer.base_layer.weight + delta).T + layer.base_layer.bias, atol=1e-5)
before = layer.base_layer.weight.detach().clone()
adapters.merge_adapters_(lora)
assert torch.allclose(layer.base_layer.weight, before + delta, atol=1e-6)
adapters.unmerge_adapters_(lora)
assert torch.allclose(layer.base_layer.weight, before, atol=1e-6)
lora(x, targets=x).loss.backward()
assert all(p.grad is None for p in lora.base_model.parameters() if not p.requires_grad)
nola = adapters.attach_adapters(model, ab.kind_config("nola", 0))
state = adapters.adapter_state_dict(nola)
fresh = adapters.attach_adapters(model, ab.kind_config("nola", 0))
adapters.load_adapter_state_dict_(fresh, state)
assert torch.equal(fresh(x).logits, nola(x).logits)
print(f"checks passed; NOLA state holds {sorted({k.rsplit('.', 1)[-1] for k in state})}")

# %% [markdown]
# ## 3. Run the experiment
#
# ### 3.1 The base LM and the adaptation task
#
# The base is the lab-00 tiny transformer trained 300 steps on Shakespeare only (cached by its configuration). Each
# adapter then trains 100 steps on Python source (lr 1e-2, batch 32, one torch thread), and we read its validation loss
# on held-out Python. The live run covers LoRA, VB-LoRA, MoS and pure-sharing MoS at the middle budget with seed 0;
# the recorded sweep (`python -m lablib sweep adapter-banks`: 6 kinds x 3 budgets x 2 seeds) must agree with it.

# %%
base, base_history, base_cached = ab.pretrain_base(progress=False)
live = ab.adapter_bank_sweep(kinds=("lora", "vblora", "mos", "mos_pure"), levels=(1,), seeds=(0,), progress=False)
recorded = ab.recorded_adapter_banks()

# %%
# NBVAL_CHECK_OUTPUT
print(f"base LM on Python before adapting: {live.base_val_loss:.2f} nats/byte")
for kind in live.kinds:
    print(f"{kind:<9} stored {live.stored[kind]['1']:>6,}  adapted val loss {live.val_loss[kind]['1']['0']:.3f}")
problems = ab.compare_with_recorded(live, recorded, tol=0.02)
assert not problems, problems
print("live run agrees with the recorded sweep (same stored counts, losses within 0.02 nats)")

# %% [markdown]
# ## 4. Play with it
#
# **Budget slider.** Pick a stored-parameter budget (as log₂: 12, 13, 14 are 4k, 8k, 16k numbers): the curves are every kind's adapted loss (mean over the recorded
# seeds, bars = seed range), and each kind's point at that budget is enlarged. Precomputed, so it answers at once.

# %%
def budget_panel(log2_budget=13):
    budget = 2 ** log2_budget  # 4,096 / 8,192 / 16,384 stored numbers: LoRA at r = 1, 2, 4
    curves = {}
    for kind in recorded.kinds:
        losses = [list(recorded.val_loss[kind][str(lv)].values()) for lv in recorded.levels]
        curves[kind] = dict(stored=[recorded.stored[kind][str(lv)] for lv in recorded.levels],
                            loss=[sum(v) / len(v) for v in losses], low=[min(v) for v in losses],
                            high=[max(v) for v in losses])
    return vad.budget_figure(curves, selected=budget, base_loss=recorded.base_val_loss)


viz.interact_figure(budget_panel, log2_budget=(12, 14))

# %% [markdown]
# **Bank usage.** Which bank entries each layer picks after training (seed 0): VB-LoRA's 16-number vectors (A factor
# sub-vectors' top-k picks) and MoS's pool rows for the `qkv` group (right of the red line: rows private to one
# layer). Pure sharing: every layer the same rows.

# %%
def usage_panel(kind="vblora", level=1, factor="A"):
    entries = [u for u in recorded.usage[kind][str(level)] if u["factor"] == factor]
    u = entries[0]
    return vad.bank_usage_figure(u["layers"], u["counts"], private_from=u["private_from"],
                                 title=f"{kind}, budget level {level}: bank {u['bank']}, factor {factor}")


viz.interact_figure(usage_panel, kind=["vblora", "mos", "mos_pure"], level=[0, 1, 2], factor=["A", "B"])

# %% [markdown]
# ## 5. What the papers claim, what we found
#
# *Claims*: MoS and VB-LoRA reach LoRA's quality with far fewer stored parameters (so at a matched budget they
# should reach a lower loss); and MoS's "differentiation is indispensable": pure sharing loses to MoS at the same
# budget. The verdicts are computed from the recorded sweep: per seed, the loss difference averaged over the three
# budgets; "holds" needs every seed to agree and a mean beyond 0.005 nats.

# %%
# NBVAL_CHECK_OUTPUT
found = ab.verdicts(recorded)
for name, v in found.items():
    print(f"{name}: {v.verdict}: {v.reason}")
for kind in ("mos", "vblora"):
    for level in recorded.levels:
        eq = ab.lora_equivalent_budget(recorded, kind=kind, level=level)
        stored = recorded.stored[kind][str(level)]
        saving = "outside LoRA's range" if eq is None else f"LoRA needs ~{eq:,.0f} ({eq / stored:.2f}x)"
        print(f"  {kind} at {stored:,} stored: {saving}")
# the orderings this lab found, asserted so a change in the code or the environment cannot slip by unnoticed
assert {name: v.verdict for name, v in found.items()} == {
    "mos_vs_lora": "holds", "vblora_vs_lora": "does not hold at this scale",
    "mos_ablation": "does not hold at this scale"}

# %% [markdown]
# **What we found.** MoS's saving over LoRA **holds** at toy scale, but it is modest: about 1.4-1.6x (LoRA needs
# ~6.6 k and ~11.5 k stored numbers to match MoS at 4 k and 8 k), far from the paper's ~8x. VB-LoRA's saving **does not
# hold at this scale**: it is the worst kind at every budget here (only at 16 k does it match a ~7 k LoRA). MoS's
# ablation **does not hold at this scale either**: pure sharing (every layer the same A and B) beats MoS at every
# budget and seed, by ~0.014 nats. The toy disagrees with both VB-LoRA and MoS's ablation, and we say so.
#
# Why the toy may disagree (what to keep in mind, not excuses):
# * Our pure-sharing baseline uses all pool rows, so its *active* rank is r_e·4 (4, 8, 16) against MoS's 2·r_e: at
#   matched storage it has the larger rank. The paper's ablation may hold active rank fixed (see `lablib.adapters.mos`).
# * 100 adapter steps at one learning rate for all kinds; VB-LoRA's paper tunes separate learning rates for the bank
#   and the logits, and trains far longer; its top-k over 128-768 vectors has few steps to settle.
# * 4 layers share each MoS pool (the paper's models have 24-80), so there is little to share, and 2 seeds only.

# %% [markdown]
# ## Summary
# * One wrapper contract covers five adapter kinds: wrap the matched Linears, freeze the base, keep shared banks once
#   on the adapted model, merge and unmerge exactly, save only what cannot be regenerated.
# * "Stored parameters" is the honest budget for banks and seeded bases: trainable and stored differ (NOLA), and
#   shared banks are counted once.
# * At toy scale the verdicts above are what our numbers say, not what the papers say; see the notes below.
#
# ## Exercises
# 1. Count by hand the stored parameters of `ab.kind_config("vblora", 1)` on this model, then check:
#    `ab.check_stored(your_answer, kind="vblora", level=1, model=model)`.
# 2. Turn on only one of MoS's four differentiation flags at a time (`adapters.MosConfig(...)`) and retrain with
#    `ab.adapt_run`: which flag recovers most of the gap to full MoS?
# 3. Train the adapters 4x longer (`adapt=dict(steps=400)`): does the ordering of the kinds change?
#
# ## Further reading
# * PEFT's LoRA, VB-LoRA and tuner docs (target-module rules, `merge_and_unload`).
# * Aghajanyan et al., *Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning* (2020).

# %%
assert not ab.check_stored(0, kind="vblora", level=1, model=model)  # a wrong answer gets a hint; try yours
