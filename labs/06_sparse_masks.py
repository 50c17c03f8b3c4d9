# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06. Sparse masks: pruning, N:M, learned masks, sparse fine-tuning and grafting
#
# **What you'll learn**
# * what a *mask* is (a boolean per weight: keep or prune), how `lablib.sparse` applies, attaches, removes, counts and
#   saves one, and how the ledger counts a pruned model;
# * three ways to choose what to prune in a trained model: weight **magnitude** (per layer or global), **Wanda**
#   (|W| times the norm of the input it multiplies) and **N:M** patterns (2 of every 4 inputs, the pattern GPUs
#   accelerate), including a **learned** N:M mask in the style of MaskLLM;
# * two ways to use a tiny set of weights for a new task: **FISH** fine-tunes only the 0.5 % of parameters with the
#   largest Fisher information, and **grafting** copies the few weights that moved most during a full fine-tune onto
#   the base model;
# * how to test each paper's claim on a tiny language model, with seeds, and say where the toy disagrees.
#
# **What you need**: lab 00 (data, TinyTransformer, trainer, ledger). Lab 09 reuses the pruning numbers of this lab's
# task; lab 02 (randomized parameter sharing) is the other way to store fewer numbers.
#
# **The papers**
# * Han et al., *Learning both Weights and Connections for Efficient Neural Networks* (2015): magnitude pruning.
# * Sun et al., *A Simple and Effective Pruning Approach for Large Language Models* (Wanda, 2023).
# * Mishra et al., *Accelerating Sparse Deep Neural Networks* (2021): 2:4 semi-structured sparsity.
# * Fang et al., *MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models* (2024): learned N:M masks
#   beat one-shot ones.
# * Sung, Nair & Raffel, *Training Neural Networks with Fixed Sparse Masks* (FISH, 2021).
# * Panigrahi et al., *Task-Specific Skill Localization in Fine-tuned Language Models* (2023): grafting ~0.01 % of
#   the parameters recovers most of the fine-tune.

# %%
# Setup: imports, seeds, lablib version, renderer. LABLIB_STATIC=1 draws static figures (nbval, nbconvert).
import json

import torch

import lablib
from lablib import sparse, train, viz
from lablib.experiments import frontier as fx
from lablib.experiments import sparse_masks as sx
from lablib.viz import frontier as vf
from lablib.viz import sparse as vs

assert lablib.__version__ == "0.1.0", f"this lab was written for lablib 0.1.0, found {lablib.__version__}"
torch.manual_seed(0)
RENDERER = viz.set_plotly_renderer()
print(f"lablib {lablib.__version__}, torch {torch.__version__}, static figures: {viz.static_mode()}")

# %% [markdown]
# ## 1. Build it
#
# ### 1.1 A mask is a boolean per weight
#
# `sparse.Mask` maps parameter names to boolean tensors (True = keep). **Density** is the kept fraction (sparsity =
# 1 − density). Magnitude pruning keeps the largest |w|: per tensor (`scope="layer"`, every layer keeps the same
# share) or over all tensors together (`scope="global"`, a layer of small weights can lose more). Every builder
# returns the mask, its statistics and a ledger row; nothing modifies the model you pass unless the name ends in `_`.

# %%
torch.manual_seed(0)
toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
result = sparse.magnitude_mask(toy, density=0.5, scope="layer")
print({n: round(d, 3) for n, d in result.stats.density.items()}, "overall", result.stats.overall_density)
print("stored numbers: dense", sparse.masked_ledger(toy, sparse.Mask.from_nonzero(toy)).stored,
      "-> pruned", result.ledger.stored)
print(result.mask["2.weight"].int())

# %% [markdown]
# Two ways to use a mask: `mask.apply(model)` returns a pruned copy; `mask.attach_(model)` registers a
# parametrization, so the layer computes with `W ⊙ mask` (and training cannot revive a pruned weight) until
# `mask.remove_(model)` gives the original weights back.

# %%
x = torch.randn(5, 8)
dense_out = toy(x)
result.mask.attach_(toy)
attached_out = toy(x)
# y = x (W ⊙ M)ᵀ + b: the attached layer against the dense layer with masked weights, by hand
by_hand = torch.relu(x @ (toy[0].weight * result.mask["0.weight"]).T + toy[0].bias)
by_hand = torch.nn.functional.linear(by_hand, toy[2].weight * result.mask["2.weight"], toy[2].bias)
result.mask.remove_(toy)
print("attached == masked by hand:", torch.allclose(attached_out, by_hand),
      "| removed == dense again:", torch.equal(toy(x), dense_out))

# %% [markdown]
# ### 1.2 Wanda: weights times the activations they meet
#
# A small weight that multiplies a large input matters more than its magnitude says. Wanda scores
# `S_ij = |W_ij| · ‖X_j‖₂` (the input feature's norm over calibration tokens) and prunes per output row. Scaling
# input feature j up by c and its weights down by c leaves the layer's function unchanged: Wanda's mask does not
# move, magnitude's does.

# %%
calib = [torch.randn(32, 8) for _ in range(4)]
scaled = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
scaled.load_state_dict(toy.state_dict())
with torch.no_grad():
    scaled[0].weight[:, 0] /= 10.0  # the same function when input 0 is 10x larger
calib_scaled = [torch.cat([b[:, :1] * 10.0, b[:, 1:]], dim=1) for b in calib]
wanda = sparse.wanda_mask(toy, batches=calib, num_batches=4, density=0.5).mask
wanda_scaled = sparse.wanda_mask(scaled, batches=calib_scaled, num_batches=4, density=0.5).mask
magnitude_scaled = sparse.magnitude_mask(scaled, density=0.5, scope="layer").mask
print("Wanda mask unchanged:", torch.equal(wanda["0.weight"], wanda_scaled["0.weight"]),
      "| magnitude mask unchanged:", torch.equal(result.mask["0.weight"], magnitude_scaled["0.weight"]))

# %% [markdown]
# ### 1.3 N:M: exactly N of every M inputs
#
# Unstructured masks save storage but not time on most hardware. A **2:4** mask keeps exactly 2 weights in every
# group of 4 consecutive inputs of each output row; NVIDIA's sparse tensor cores run such a matrix at about twice the
# speed. `sparse.nm_mask` keeps the 2 largest of each group; `sparse.to_semi_structured` uses torch's 2:4 kernels
# where the device has them (on this CPU the masked dense layer is the reference path).

# %%
torch.manual_seed(0)
block = torch.randn(6, 16)
two_four = sparse.nm_mask_from_scores(block.abs(), n=2, m=4)
print("kept per group of 4:", two_four.reshape(6, 4, 4).sum(-1).unique().tolist())
print(sparse.semi_structured_support(torch.device("cpu")))
vs.nm_zoom_figure(block, two_four, m=4, title="2:4 up close: 2 kept weights in every group of 4 inputs")

# %% [markdown]
# ### 1.4 Learned N:M masks (MaskLLM)
#
# For 2:4 there are C(4, 2) = 6 candidate patterns per group. MaskLLM gives each group a categorical distribution
# over them (logits, initialised from the magnitude pattern), samples a soft pattern with **Gumbel-softmax**, and
# trains only the logits on the language-model loss with the weights **frozen**; the temperature anneals so the
# soft mask hardens. The final mask is each group's most likely pattern.

# %%
patterns = sparse.nm_patterns(n=2, m=4)
print(patterns.int())
logits = sparse.prior_logits(two_four[:1, :4], n=2, m=4, strength=3.0,
                             generator=torch.Generator().manual_seed(0))
# the prior favours the magnitude pattern: its logit is the largest, so training starts from the one-shot mask
print("first group's weights:", [round(v, 2) for v in block[0, :4].tolist()],
      "| most likely pattern at the start:", patterns[int(logits[0].argmax())].int().tolist())

# %% [markdown]
# ### 1.5 FISH and grafting
#
# **FISH** ranks every parameter by its diagonal Fisher information, `F_i = mean over batches of (∂L/∂θ_i)²`,
# keeps the top k and fine-tunes only those (`θ = θ₀ + m ⊙ δ`). **Grafting** starts from a full fine-tune and copies
# onto the base only the fraction of entries that moved most, `|θ_ft − θ_base|`.

# %%
torch.manual_seed(0)
xs, ys = torch.randn(64, 8), torch.randint(0, 4, (64,))
toy_batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]


def toy_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


fish = sparse.fish_mask(toy, batches=toy_batches, loss_fn=toy_loss, num_batches=4, density=0.1)
tuned = sparse.sparse_finetune(toy, mask=fish.mask, batches=lambda: iter(toy_batches * 10), loss_fn=toy_loss,
                               steps=20, lr=1e-2, progress=False)
moved = {n: (p != toy.get_parameter(n)) for n, p in tuned.model.named_parameters()}
print(f"FISH keeps {fish.stats.total_kept} of {sum(p.numel() for p in toy.parameters())} entries; "
      f"entries changed by fine-tuning: {sum(int(m.sum()) for m in moved.values())}")
grafted = sparse.graft(toy, tuned.model, density=0.05)
print(f"grafting 5 % of the entries: {grafted.kept} of {grafted.considered} copied from the fine-tune")

# %% [markdown]
# ## 2. Check it
#
# The invariants the whole lab relies on (`tests/test_sparse_*.py` checks them on many shapes; here once each):

# %%
# every group of 4 along the input dimension keeps exactly 2
assert sparse.is_nm_mask(two_four, n=2, m=4) and int(two_four.sum()) == block.numel() // 2
# a layer with a mask attached computes what the dense layer computes with masked weights
assert torch.allclose(attached_out, by_hand)
# removing a mask restores the original weights; applying one never touches the model passed in
assert torch.equal(toy(x), dense_out)
# FISH fine-tuning changes no parameter outside its mask
assert all(not (moved[n] & ~fish.mask[n]).any() for n in fish.mask)
# bad input gets a clear error
for bad in (lambda: sparse.magnitude_mask(toy, density=1.5),
            lambda: sparse.nm_mask_from_scores(torch.rand(4, 6), n=2, m=4)):
    try:
        bad()
        raise AssertionError("should have raised")
    except ValueError as error:
        print("ValueError:", str(error)[:110])
print("checks passed")

# %% [markdown]
# ## 3. Run the experiment
#
# **Task** (the same as lab 09, so the numbers sit on its chart): byte-level Shakespeare + Python, a 4-layer
# d_model-64 TinyTransformer trained 300 batches, validation loss on fixed windows. Every run uses one torch thread,
# so it repeats bit for bit.
#
# * **One-shot pruning** of the trained model at densities 1.0 … 0.1, no retraining: magnitude per layer and
#   global, Wanda, and a random mask (the floor every criterion must beat).
# * **2:4** three ways on frozen weights: magnitude, Wanda, learned (MaskLLM-style, 100 steps of logits).
# * **Sparse fine-tuning**: a model trained on Shakespeare only learns Python for 100 batches, with every parameter,
#   with FISH's 0.5 %, or with a random 0.5 % mask (the control FISH must beat).
# * **Grafting** the full fine-tune onto the base, from 0.05 % of the entries to all of them.
#
# Three seeds are recorded by `python -m lablib sweep sparse-masks`; here seed 0's pruning and 2:4 runs are re-run
# live and checked against the recording.

# %%
recorded = sx.recorded_sparse_masks()
live = sx.live_subset()
base = sx.base_model(seed=0)
print(f"recorded {recorded.recorded} on {recorded.machine} in {recorded.seconds:.0f} s")

# %%
# NBVAL_CHECK_OUTPUT
res = recorded.result
seeds = res.seeds
mean = lambda values: sum(values) / len(values)  # noqa: E731
curves = {m: [mean([res.runs[str(s)]["one_shot"]["curves"][m][i] for s in seeds]) for i in range(len(sx.DENSITIES))]
          for m in sx.ONE_SHOT_METHODS}
print(f"one-shot pruning, val loss (mean of seeds {seeds}):")
print(f"{'density':>8} " + " ".join(f"{m:>17}" for m in sx.ONE_SHOT_METHODS))
for i, d in enumerate(sx.DENSITIES):
    print(f"{d:>8.1f} " + " ".join(f"{curves[m][i]:>17.3f}" for m in sx.ONE_SHOT_METHODS))
print("2:4 masks: " + ", ".join(f"{k} {mean(res.values('nm', k)):.3f}" for k in sx.NM_METHODS)
      + f" | dense {mean([res.runs[str(s)]['one_shot']['dense'] for s in seeds]):.3f}")
print("learned 2:4 changed the magnitude pattern of "
      + ", ".join(f"{res.runs[str(s)]['nm']['changed_groups']:.1%}" for s in seeds) + " of the groups")
ft = [res.runs[str(s)]["finetune"] for s in seeds]
print(f"fine-tuning Shakespeare -> Python: base {mean([r['base'] for r in ft]):.3f}, "
      f"full {mean([r['full'] for r in ft]):.3f} "
      f"({ft[0]['full_trainable']:,} trained), FISH {mean([r['fish'] for r in ft]):.3f} "
      f"({ft[0]['fish_trainable']:,} trained), random mask {mean([r['random_mask'] for r in ft]):.3f}")
problems = sx.compare_with_recorded(live, res)
assert not problems, problems
print(f"live seed 0 ({', '.join(sx.LIVE_PARTS)}) agrees with the recording within {sx.LIVE_TOLERANCE} nats")

# %% [markdown]
# **Loss vs density.** Move the slider: the legend gives each method's loss at that density (mean of the recorded
# seeds; the dotted line is the dense model).

# %%
dense_mean = mean([res.runs[str(s)]["one_shot"]["dense"] for s in seeds])


def density_panel(density=0.5):
    density = min(sx.DENSITIES, key=lambda d: abs(d - density))
    return vs.density_figure(sx.DENSITIES, curves, density=density, dense_loss=dense_mean)


viz.interact_figure(density_panel, density=(0.1, 1.0, 0.1))

# %% [markdown]
# **Mask images per layer** of the trained seed-0 model (top-left 64 x 64 corner of each weight, kept = dark). Global
# magnitude prunes some layers much harder than others; Wanda and the per-layer criteria keep every layer at the
# chosen density; 2:4 looks uniform from afar. The panel's title gives each method; `result.stats.density` gives the
# per-layer numbers (exercise 2).

# %%
calib_live = sx.calibration(sx.splits().train, seed=0)


def mask_panel(method="magnitude/global", density=0.3):
    density = round(density, 2)
    if method == "magnitude 2:4":
        mask = sparse.nm_mask(base, n=2, m=4).mask
    else:
        mask = sx.one_shot_mask(base, method, density=density, calib=calib_live, seed=0)
    return vs.mask_images_figure({n: mask[n] for n in sx.weight_names(base)}, columns=4,
                                 title=f"{method} masks" + ("" if "2:4" in method else f" at density {density}"))


viz.interact_figure(mask_panel, method=["magnitude/global", "magnitude/layer", "wanda", "random", "magnitude 2:4"],
                    density=(0.1, 0.9, 0.1))

# %%
first = sx.weight_names(base)[0]
vs.nm_zoom_figure(base.get_parameter(first)[:8, :16].detach(), sparse.nm_mask(base, n=2, m=4).mask[first][:8, :16],
                  title=f"2:4 up close: {first}, first 8 outputs x 16 inputs of the trained model")

# %% [markdown]
# **Learned vs magnitude 2:4**, and **FISH vs full fine-tuning**: bars are means over seeds, dots single seeds.

# %%
vs.seed_bars_figure({k: res.values("nm", k) for k in sx.NM_METHODS}, seeds=seeds, reference={"dense": dense_mean},
                    title="2:4 masks on the frozen trained model (lower is better)")

# %%
vs.seed_bars_figure({"full fine-tune": res.values("finetune", "full"), "FISH 0.5 %": res.values("finetune", "fish"),
                     "random 0.5 %": res.values("finetune", "random_mask")}, seeds=seeds,
                    reference={"base (Shakespeare only)": mean([r["base"] for r in ft])},
                    title="Python validation loss after 100 fine-tuning batches")

# %% [markdown]
# **Grafting.** Move the slider: how much of the fine-tune's loss improvement comes back when only that fraction of
# the entries (those that moved most) is copied onto the base.

# %%
recoveries = {f"seed {s}": sx.graft_recovery(r) for s, r in zip(seeds, ft)}


def graft_panel(percent=1.0):
    fraction = min(sx.GRAFT_FRACTIONS, key=lambda f: abs(f - percent / 100))
    shares = ", ".join(f"{k} {v[sx.GRAFT_FRACTIONS.index(fraction)]:.0%}" for k, v in recoveries.items())
    return vs.graft_figure(sx.GRAFT_FRACTIONS, recoveries, most=sx.MOST, fraction=fraction,
                           title=f"{fraction:.2%} grafted recovers {shares}")


viz.interact_figure(graft_panel, percent=[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0])

# %% [markdown]
# **Pruning vs sharing on one ledger.** Lab 09 trained, on this same task, dense models of three widths,
# randomized parameter sharing (RPS, lab 02's technique) at 50 % and 25 % of the dense model's weights, and
# magnitude pruning *with retraining*. Here they meet this lab's one-shot pruning curve (seed 0, no retraining), every
# point counted by `lablib.ledger` (pruned entries are not stored).

# %%
one_shot_rows = sx.pruning_ledger_rows(base, sx.DENSITIES, live.runs["0"]["one_shot"]["curves"]["magnitude/global"])
lab09 = [r for r in fx.recorded_frontier().rows if r["method"] in ("dense", "rps", "magnitude")]
ledger_rows = [r for r in one_shot_rows if r["val_loss"] < 4.0] + lab09
vf.frontier_figure(ledger_rows, x="stored", title="Stored parameters vs loss: one-shot pruning, retrained pruning, "
                   "RPS, smaller dense models")

# %% [markdown]
# ## 4. Play with it
#
# The panels above take a slider each: the density (loss per method and the mask images) and the graft fraction.
# Try: at which density does one-shot global magnitude pruning fall off a cliff, and which layers does it empty
# first? Does Wanda's advantage over magnitude grow or shrink as the density drops?
#
# ## 5. What the papers claim, what we found
#
# Verdicts from the three recorded seeds: an ordering **holds** when every seed agrees and the mean gap exceeds
# 0.005 nats, **does not hold at this scale** when every seed disagrees, and is **inconclusive** otherwise.

# %%
# NBVAL_CHECK_OUTPUT
verdicts = sx.sparse_verdicts(res)
for key, v in verdicts.items():
    print(f"{v.claim}: {v.verdict}\n  {v.reason}")
gap = [w - m for w, m in zip(curves["wanda"], curves["magnitude/layer"])]
print("Wanda minus per-layer magnitude, by density: " + ", ".join(f"{d:.1f}: {g:+.3f}" for d, g in
                                                                   zip(sx.DENSITIES, gap)))
# the verdicts this lab found, asserted so a change in the code or the environment cannot slip by unnoticed
found = {k: v.verdict for k, v in verdicts.items()}
assert found == dict(learned_nm="holds", fish="holds", fish_vs_full="does not hold at this scale",
                     grafting="does not hold at this scale"), found

# %% [markdown]
# **What we found** (three seeds; the numbers are in the cells above):
# * **Learned 2:4 beats magnitude 2:4: holds**, by a wide margin (about 0.12 nats), and the learned mask comes within
#   a few thousandths of a nat of the *dense* model, while magnitude and Wanda 2:4 lose 0.08 to 0.15 nats. 100 steps
#   of logits change the magnitude pattern in about 30 % of the groups. This is MaskLLM's ordering, and stronger than
#   the paper reports for large models: our model is small and undertrained, so many of its weights are
#   interchangeable and the loss, not the magnitude, knows which ones matter. Note the learned mask sees the training
#   text for 100 steps, the one-shot masks see 8 calibration batches (Wanda) or nothing (magnitude).
# * **Wanda does not beat magnitude here.** Wanda is slightly worse than per-layer magnitude from 60 % to 30 %
#   density and slightly better at 20 % and 10 %, and global magnitude is the best one-shot criterion at every
#   density on this model (the Wanda paper compares per-output pruning on large LLMs, whose outlier input features
#   a 4-layer d_model-64 model does not have). Every criterion beats the random mask by a wide margin.
# * **FISH's mask beats a random mask of the same size: holds** (about 1 nat on every seed): Fisher information picks
#   the right 0.5 %. **FISH matches full fine-tuning: does not hold at this scale.** Training 1,103 of 220,544
#   numbers recovers about two thirds (66-70 %) of the full fine-tune's improvement, but stays about 0.7 nats
#   behind it. The FISH
#   paper fine-tunes large pre-trained models on tasks close to their pre-training; here the shift (Shakespeare to
#   Python source) is large and the model has little to reuse, so the update needs more than 0.5 % of the weights.
# * **Grafting 1 % of the weights recovers most of the fine-tune: does not hold at this scale.** Copying the 1 % of
#   entries that moved most recovers 3-4 % of the improvement; half needs 10-25 % of the weights. Two differences
#   from the paper: it *optimises* the graft region (`sparse.learned_graft`; we rank by how far entries moved), and
#   its fine-tunes are short and specialise a pre-trained model, while ours re-learns a new language and spreads the
#   change over most weights.
# * **Pruning vs sharing on one ledger.** The one-shot curve sits above every lab 09 point: its base saw 300
#   batches, lab 09's points 400 (the pruned and RPS models spend the last 100 with the compression in place). Read
#   the chart as the cost of skipping retraining: one-shot 50 % global magnitude loses about 0.015 nats against its own
#   dense base, retrained 50 % magnitude pruning is within 0.03 nats of the 400-batch dense model, and RPS at 50 %
#   beats both (and the dense model) at the same stored count, as lab 09 found for one seed. Lab 02's own
#   RPS-vs-pruning-vs-smaller-model curve (an MLP on digits, a different task and metric,
#   `shared_pools.pareto_points`) is not overlaid here: its recorded sweep was not committed when this lab was
#   recorded.
#
# ## Summary
# * A mask is a boolean per weight; `lablib.sparse` applies it as a copy, attaches it as a parametrization (training
#   cannot revive a pruned weight; removing it restores the weights) and counts it in the ledger (pruned entries are
#   not stored, mask bits are not counted).
# * The criterion matters more as the density drops: random masks fall apart first, magnitude and Wanda later.
#   Ranking the whole model together (global magnitude) spreads the budget unevenly (at 30 % overall it keeps 8 % of
#   the last FFN output projections and about 45 % of the attention input projections) and is still the best
#   one-shot criterion on this model.
# * N:M masks trade some loss for a pattern hardware can run fast; a learned pattern (MaskLLM) can only help where
#   its few optimisation steps move the pattern away from the magnitude prior.
# * Task adaptation lives in few weights: FISH trains 0.5 % of them, grafting copies a small fraction of a fine-tune;
#   both are measured here against full fine-tuning and a random control, with seeds.
#
# ## Exercises
# 1. How many weights does a 2:4 mask keep in a 64 x 256 weight? `sx.check_nm_kept(your_answer, rows=64, cols=256,
#    n=2, m=4)`.
# 2. Prune the trained model with `sparse.magnitude_mask(base, density=0.3, scope="global")` and print
#    `result.stats.density`: which layers lose most? Compare with `scope="layer"`.
# 3. `sparse.perp_retrain` retrains only biases and norms after pruning (PERP) and `sparse.lottery_ticket` prunes
#    iteratively with rewinding: try PERP on the 30 % global-magnitude model for 50 steps. How much of the loss does
#    it win back?
# 4. Train a learned 2:4 mask for more steps (`sparse.learned_nm_mask(base, ..., steps=400)`): does it move further
#    from the magnitude pattern, and does the gap to magnitude 2:4 grow?
#
# ## Further reading
# * Hoefler et al., *Sparsity in Deep Learning* (2021): a survey of what to prune, when and how.
# * Frantar & Alistarh, *SparseGPT* (2023): one-shot pruning with second-order weight updates.
# * Frankle & Carbin, *The Lottery Ticket Hypothesis* (2019), and Zimmer et al., *PERP* (2023): retraining after
#   pruning, the strong baselines.

# %%
assert not sx.check_nm_kept(1, rows=64, cols=256, n=2, m=4)  # a wrong answer gets a hint; try yours
