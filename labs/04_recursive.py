# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04. Recursive transformers: tie the layers, relax them, and let each token choose its depth
#
# **What you'll learn**
# * how a *recursive* transformer reaches depth L with K = L / N unique blocks looped N times (CYCLE ABAB or
#   SEQUENCE AABB), by tying *parameters* rather than reusing modules, and how to initialise it from a deeper
#   pretrained model; what the ledger says it saves (parameters) and does not save (FLOPs, KV cache);
# * how *relaxed recursion* gives each depth a small LoRA started from the SVD of what tying threw away, with the rank
#   as a knob from full sharing to no sharing;
# * how *Mixture-of-Recursions* (MoR) lets a router give every token its own number of recursions (expert choice with
#   a capacity per step, or token choice), what that does to attention and to the KV cache (recursion-wise caching vs
#   recursive KV sharing), and how *Mixture-of-Depths* and *relative-norm halting* skip work in other ways; and
#   whether the papers' claims survive at toy scale, tested with seeds on a fixed training-FLOP budget.
#
# **What you need**: lab 00 (tiny transformer, ledger, trainer, cache); lab 03 for LoRA; lab 01 for routers.
#
# **The papers**
# * Bae et al., *Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA* (2024): tie layers
#   into loops, initialise from a pretrained model, relax with per-depth LoRA.
# * Bae et al., *Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level Computation*
#   (2025): routers over recursion depth, recursion-wise KV caching and recursive KV sharing.
# * Raposo et al., *Mixture-of-Depths: Dynamically allocating compute in transformer-based language models* (2024):
#   each block processes only its top-C tokens.
# * Ternovtsii & Bilak, *Equifinality in Mixture of Experts* (relative-norm halting of repeated hops).

# %%
# Setup: imports, seeds, lablib version, renderer. LABLIB_STATIC=1 draws static figures (nbval, nbconvert).
import torch

import lablib
from lablib import data, ledger, models, viz
from lablib import recursive as rec
from lablib.experiments import recursive as rx
from lablib.viz import recursive as rviz

assert lablib.__version__ == "0.1.0", f"this lab was written for lablib 0.1.0, found {lablib.__version__}"
torch.manual_seed(0)
RENDERER = viz.set_plotly_renderer()
print(f"lablib {lablib.__version__}, torch {torch.__version__}, static figures: {viz.static_mode()}")

# %% [markdown]
# ## 1. Build it
#
# ### 1.1 Tie parameters, not modules
#
# A vanilla model of depth L = 6 has six blocks. A recursive one keeps six block *modules* (so `blocks[d]` is still
# depth d), but assigns the same `nn.Parameter` objects to every depth that shares a unique block. With K = 2 unique
# blocks and N = 3 recursions, CYCLE sharing uses blocks A B A B A B (the whole stack looped), SEQUENCE uses
# A A A B B B (each block repeated in place); the `middle_*` variants keep the first and last layers unique and share
# the ones in between. Why not just call one module three times? Because a per-depth adapter (section 1.3) must be
# able to wrap `blocks[2].attn.qkv` without wrapping `blocks[0].attn.qkv` too.

# %%
config = rx.model_config()  # d_model 48, 4 heads, seq_len 48, bytes; n_layers = effective depth 6
for sharing in rec.SHARINGS:
    schedule = rec.block_schedule(num_unique=2, num_recursion=3, sharing=sharing)
    print(f"{sharing:>15}: depth -> unique block {schedule} (L = {len(schedule)})")
torch.manual_seed(0)
vanilla = models.TinyTransformer(config)
tied = rec.RecursiveTransformer.from_vanilla(vanilla, num_recursion=3, sharing="cycle", initialization="stepwise")
print("blocks[0] is blocks[2]:", tied.blocks[0] is tied.blocks[2],
      "| their qkv weight is one Parameter:", tied.blocks[0].attn.qkv.weight is tied.blocks[2].attn.qkv.weight)
print(ledger.format_ledger([rec.recursion_ledger(vanilla, name="vanilla, 6 layers").params(),
                            rec.recursion_ledger(tied, name="recursive, 2 blocks x 3").params()]))

# %% [markdown]
# The ledger identifies tensors by identity, so the tied model counts two blocks of parameters, but it still spends
# the FLOPs of six layers per token and (section 1.5) needs the KV cache of six layers. Sharing saves *memory for
# weights*, nothing else. `recursion_ledger` adds the KV cache: one (key, value) entry per token per layer.
#
# ### 1.2 Initialising the loop from a deeper model
#
# To turn a trained 6-layer model into a 2-block loop, each unique block must come from the original layers. The MoR
# code offers *stepwise* (layers evenly spaced over the depth, `round(linspace(0, L-1, K))`), *lower* and *upper*
# (the first or last K layers), and *average* (the mean of the layers tied to the block).

# %%
for init in rec.INITIALIZATIONS:
    print(f"{init:>8}:", rec.source_layers(n_layers=6, num_recursion=3, sharing="cycle", initialization=init))

# %% [markdown]
# ### 1.3 Relaxed recursion: a LoRA per depth, started from the SVD of the residual
#
# Tying replaces depth d's weight W_d by the shared W_k; the residual R_d = W_d − W_k is what is lost. Its truncated
# SVD U_r Σ_r V_rᵀ is the best rank-r approximation, so the relaxed model starts each depth's LoRA (from
# `lablib.adapters`) at B_d = U_r Σ_r, A_d = V_rᵀ with scaling 1, and computes y = x (W_k + B_d A_d)ᵀ + b_k.
# Rank 0 is the pure recursive model; full rank gives back the original weights. We check both statements by hand on
# one matrix of the model above (random weights, so the residual is large).

# %%
relaxed = rec.RelaxedRecursiveTransformer.from_vanilla(vanilla, num_recursion=3, rank=4)
layer = relaxed.lora_layers()["blocks.3.ffn.fc"]
residual = (vanilla.blocks[3].ffn.fc.weight - layer.base_layer.weight).detach()
u, s, vh = torch.linalg.svd(residual, full_matrices=False)
assert torch.allclose(layer.delta_weight(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
print(f"residual of blocks.3.ffn.fc: top singular values {[round(x, 3) for x in s[:6].tolist()]}; "
      f"rank-4 LoRA keeps {float((s[:4] ** 2).sum() / (s ** 2).sum()):.0%} of its energy")
print(f"LoRA parameters added at rank 4: {sum(p.numel() for p in relaxed.lora_parameters()):,} "
      f"(= rec.rank_parameters: {rec.rank_parameters(config, rank=4):,})")

# %% [markdown]
# ### 1.4 Mixture-of-Recursions: a router picks each token's depth
#
# MoR loops the K-block stack F up to N times, but not for every token. With *expert-choice* routing, step r has
# its own router r_t = w_rᵀ h_t, and keeps the top k_r = ⌊capacity_r · T⌋ tokens among those that ran step r−1
# (default capacities 1, 2/3, 1/3). The kept tokens, **in position order**, run F with attention only among
# themselves, and h_t ← h_t + w_t (F(h)_t − h_t) with gate w_t = α sigmoid(r_t); the others wait. Let us do one
# sequence by hand: gather, run the blocks, scatter, and compare with the library.

# %%
torch.manual_seed(1)
mor = rec.MixtureOfRecursionsTransformer(config, num_recursion=3).eval()
with torch.no_grad():
    for router in mor.routers:
        router.weight.normal_(0, 0.5)  # a decisive router for the demonstration
idx = torch.randint(0, 256, (1, 12))
h = mor.token_embedding(idx[0]) + mor.position_embedding(torch.arange(12))
candidates = torch.arange(12)
with torch.no_grad():
    for r in range(3):
        scores = h[candidates] @ mor.routers[r].weight[0]
        k = rec.tokens_at_step(mor.capacities[r], 12)
        chosen = candidates[scores.topk(k).indices].sort().values  # top-k, then back to position order
        y = h[chosen][None]
        for j in range(mor.num_unique):
            y = mor.blocks[r * mor.num_unique + j](y).x  # causal attention among the chosen tokens only
        gate = mor.alpha * torch.sigmoid(h[chosen] @ mor.routers[r].weight[0])
        h = h.clone()
        h[chosen] = h[chosen] + gate[:, None] * (y[0] - h[chosen])
        print(f"step {r}: k = {k:>2}, tokens {chosen.tolist()}")
        candidates = chosen
    by_hand = mor.lm_head(mor.final_norm(h))
    out = mor(idx)
assert torch.allclose(out.logits[0], by_hand, atol=1e-5)
print("depth per token:", out.recursion.depth[0].tolist(), "| tokens per step:", out.recursion.tokens_per_step)

# %% [markdown]
# *Token-choice* routing decides once: a softmax router over the N depths (`lablib.moe.TopKRouter` with
# `num_experts=N`, top-1: the same math as an MoE router, so the library reuses it) sends token t through steps
# 0..j_t, and a Switch-style balance loss keeps the depths evenly used. Top-k over a sequence looks at future
# tokens, so expert choice cannot generate token by token; MoR trains an auxiliary BCE so that
# sigmoid(r_t) > 0.5 predicts the selection, and at generation a token continues iff its router logit is positive
# (`causal_routing=True`).
#
# ### 1.5 The KV cache under adaptive depth
#
# A token that skipped step r has no keys/values there. *Recursion-wise caching* stores, per step and layer, only
# the active tokens' K/V, and step r attends only among them: Σ_r k_r · K entries per sequence. *Recursive KV
# sharing* computes K/V only at step 0 and lets every later step's queries read them: T · K entries, fewer, but later
# steps see representations from step 0. `rec.generate_cached` decodes with either cache and must produce exactly
# the tokens of the cache-free `models.generate`.

# %%
mor.causal_routing = True
prompt = torch.randint(0, 256, (2, 6))
for strategy in rec.KV_STRATEGIES:
    mor.kv_strategy = strategy
    cached = rec.generate_cached(mor, prompt, max_new_tokens=20)
    uncached = models.generate(mor, prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(cached.tokens, uncached)
    print(f"{strategy:>15}: same tokens as without a cache; {cached.kv_cache_entries} cache entries for 2 x 26 tokens"
          f" (depths {cached.depth[0].tolist()[:10]}...)")
mor.kv_strategy, mor.causal_routing = "recursion_wise", False

# %% [markdown]
# ### 1.6 Two other ways to skip work: Mixture-of-Depths and halting
#
# *Mixture-of-Depths* is not recursive: every other block of a normal stack keeps only its top C = ⌊0.125 T⌋ tokens
# (a router per block), the rest pass through on the residual. *Relative-norm halting* is a zero-training,
# inference-time rule for a recursive model: after each recursion a token whose update is small relative to its
# state, ‖Δ‖ / ‖h‖ < τ, stops.

# %%
mod = rec.MixtureOfDepthsTransformer(config, capacity=0.125)
print(f"MoD routes blocks {mod.routed_layers}, C = {mod.tokens_per_block(48)} of 48 tokens")
print(ledger.format_ledger([rec.recursion_ledger(m, name=n).params() for m, n in
                            ((vanilla, "vanilla 6"), (mod, "MoD 6, c = 0.125"), (mor, "MoR 2 x <=3"))]))
halting = rec.RecursiveTransformer.from_vanilla(vanilla, num_recursion=3)
for tau in (0.0, 0.3, float("inf")):
    halting.halting_threshold = tau
    print(f"halting tau = {tau}: mean depth {halting(idx).recursion.mean_depth:.2f} recursions")

# %% [markdown]
# ## 2. Check it
#
# The identities the rest of the lab relies on (all are also unit tests in `tests/test_recursive.py`).

# %%
v_small = models.TinyTransformer(rx.model_config(n_layers=4)).eval()
x, y_t = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
pure = rec.RecursiveTransformer.from_vanilla(v_small, num_recursion=2)
# tied layers: one parameter, gradients from both loops add up
pure(x, y_t).loss.backward()
untied = models.TinyTransformer(v_small.config)
untied.load_state_dict(pure.state_dict())
untied(x, y_t).loss.backward()
assert torch.allclose(pure.blocks[0].ffn.fc.weight.grad,
                      untied.blocks[0].ffn.fc.weight.grad + untied.blocks[2].ffn.fc.weight.grad, atol=1e-6)
# relaxed: rank 0 = pure recursion; full rank = the untied model (biases are 0 at init, LayerNorms kept per depth)
zero = rec.RelaxedRecursiveTransformer.from_vanilla(v_small, num_recursion=2, rank=0).eval()
full = rec.RelaxedRecursiveTransformer.from_vanilla(v_small, num_recursion=2, rank=48, ln_share=False).eval()
assert torch.allclose(zero(x).logits, pure.eval()(x).logits) and torch.allclose(full(x).logits, v_small(x).logits,
                                                                                 atol=1e-5)
# MoR with every token at full depth and no gate = the recursive model
all_deep = rec.MixtureOfRecursionsTransformer.from_vanilla(v_small, num_recursion=2, gate="none",
                                                          capacities=(1.0, 1.0)).eval()
assert torch.allclose(all_deep(x).logits, pure(x).logits, atol=1e-5)
# MoD with capacity 1 and no gate = the vanilla model
mod_full = rec.MixtureOfDepthsTransformer(v_small.config, capacity=1.0, gate="none").eval()
mod_full.load_state_dict(v_small.state_dict(), strict=False)
assert torch.allclose(mod_full(x).logits, v_small(x).logits, atol=1e-6)
# halting: tau = 0 is the plain model, tau = inf runs one recursion
pure.halting_threshold = 0.0
assert torch.allclose(pure(x).logits, zero(x).logits, atol=1e-6)
pure.halting_threshold = float("inf")
assert pure(x).recursion.depth.eq(1).all()
print("checks passed: tied gradients add, rank 0 = recursive, full rank = untied, MoR at full depth = recursive, "
      "MoD at capacity 1 = vanilla, halting at 0 / inf")

# %% [markdown]
# ## 3. Run the experiment
#
# ### 3.1 From a trained vanilla model to a loop, without training
#
# We train the 6-layer vanilla model (d_model 48, 600 steps of batch 16 on Shakespeare + Python bytes, one thread,
# about 20 s) and tie it into 2 blocks x 3 with each initialisation, then score every result on the same validation
# windows *without any training*. Then we relax the stepwise and average loops with LoRA of growing rank.

# %%
van = rx.train_variant("vanilla_6", seed=0)
print(f"vanilla_6: {'loaded from cache' if van.from_cache else 'trained'}; validation loss {van.val_loss:.3f}")
init_loss = {init: rx.evaluate(rec.RecursiveTransformer.from_vanilla(van.model, num_recursion=3, initialization=init))
             for init in rec.INITIALIZATIONS}
curve = rx.relaxed_rank_curve(van.model, num_recursion=3)

# %%
# NBVAL_CHECK_OUTPUT
print(f"vanilla_6 (trained, 6 unique layers): {curve.vanilla_loss:.3f} nats/byte")
for init, loss in init_loss.items():
    print(f"tied into 2 x 3, {init:>8} init, no training: {loss:.3f}")
for i, r in enumerate(curve.ranks):
    print(f"relaxed rank {r:>2}: {curve.params[i]:>7,} params   stepwise {curve.loss['stepwise'][i]:.3f}   "
          f"average {curve.loss['average'][i]:.3f}")

# %% [markdown]
# Tying a trained model into a loop, with no training, costs a lot: from 2.35 nats/byte to about 3.0 (average
# init) or 3.1 (stepwise), and about 3.5 with the lower or upper layers. Averaging the tied layers is the best
# starting point here; the Relaxed Recursive Transformers paper finds stepwise best *after uptraining*, which we do
# not do. The SVD-initialised LoRA recovers the loss quickly: rank 8 (+37k parameters, about 1.3 blocks) is within
# about 0.06-0.07 nats of the vanilla model and rank 16 within 0.02, still without training. Two details show up in the
# table: full rank (48) is close to, but not exactly, the vanilla model, because biases stay tied and trained biases
# differ between layers (LoRA only repairs matrices); and the rank-0 row differs slightly from the tied rows above
# because the rank curve keeps each depth's own LayerNorms (`ln_share=False`).
#
# ### 3.2 Mixture-of-Recursions: which bytes go deep?
#
# The MoR model with expert-choice routing (capacities 1, 2/3, 1/3) trained on the same budget as the vanilla model
# (section 3.3 explains the budget). We colour validation text by the depth the router gave each byte and compare the
# mean depth per corpus and per byte class.

# %%
mor_run = rx.train_variant("mor_expert", seed=0)
samples = {name: rx.corpus_sample(name, chars=480, offset=1000) for name in rx.CORPORA}
depth_by_corpus = {name: rx.depth_text(mor_run.model, text) for name, text in samples.items()}

# %%
# NBVAL_CHECK_OUTPUT
print(f"mor_expert: validation loss {mor_run.val_loss:.3f}, mean depth {mor_run.mean_depth:.2f} recursions")
for name, (chars, depths) in depth_by_corpus.items():
    groups = {"letters": str.isalpha, "spaces": lambda c: c == " ", "punctuation/other": lambda c: not c.isalnum()
              and c != " "}
    parts = []
    for label, test in groups.items():
        ds = [d for c, d in zip(chars, depths) if test(c)]
        parts.append(f"{label} {sum(ds) / len(ds):.2f}" if ds else f"{label} -")
    print(f"{name:>11}: mean depth {sum(depths) / len(depths):.2f} ({', '.join(parts)})")

# %%
chars, depths = depth_by_corpus["python"]
rviz.depth_text_figure(chars[:240], depths[:240], num_recursion=3, title="Python: recursion depth per byte")

# %% [markdown]
# The router learned something readable: in both corpora the **spaces** go deepest (in this Shakespeare sample
# every space gets all three recursions) and letters inside words the shallowest. A space is where a new word
# starts, the hardest next-byte prediction; the next letter inside a word is often easy. Python's punctuation also
# goes deeper than Shakespeare's. Keep in mind that training-time expert choice picks the top-k over the whole
# 48-byte window, so a byte's depth depends on its neighbours' scores too (not only on its own difficulty).
#
# ### 3.3 The recorded isoFLOP sweep: eight models, three seeds, one training-FLOP budget
#
# Every model below gets the training FLOPs the 6-layer vanilla model spends in 600 steps (forward FLOPs per token
# from `recursion_ledger`, times 3 for the backward pass): a model that is cheaper per token trains for more steps,
# as in the MoR paper's isoFLOP comparisons. Eight variants x three seeds do not fit the lab's time budget, so they
# were recorded with `python -m lablib sweep recursive`; the lab has just re-run two of them live (vanilla_6 and
# mor_expert, seed 0) and checks they agree with the recording within 0.02 nats (training runs on one thread, so a
# run repeats exactly on one machine).

# %%
recorded = rx.recorded_recursive()
live = rx.isoflop_sweep(variants=("vanilla_6", "mor_expert"), seeds=(0,))
print(f"recording: {recorded.recorded}, {recorded.seconds:.0f} s on {recorded.machine}")

# %%
# NBVAL_CHECK_OUTPUT
problems = rx.compare_with_recorded(live, recorded.sweep, tolerance=0.02)
assert not problems, problems
print("live vanilla_6 and mor_expert (seed 0) agree with the recorded sweep within 0.02 nats")
print(rx.format_sweep_table(recorded.sweep))

# %%
rviz.pareto_figure(rx.pareto_points(recorded.sweep))

# %% [markdown]
# ### 3.4 KV-cache size and speed of generation
#
# The trained MoR generates 40 bytes after an 8-byte prompt with each KV strategy (the same weights: it was trained
# with recursion-wise attention, so its KV-sharing text is worse; here we measure the cache and the speed), next to
# the vanilla model and a 2 x 3 recursive model with ordinary caches. Every row is checked token for token against
# generation without a cache. Speeds are best-of-3 on one thread of a shared machine, so only their order of
# magnitude is meaningful; the cache sizes are exact.

# %%
prompt = data.ByteTokenizer().encode(samples["shakespeare"][:8])[None]
kv_models = rx.kv_strategy_models(mor_run.model, vanilla=van.model,
                                  recursive=rx.build_model("recursive_2x3", seed=0))
kv_rows = rx.kv_benchmark(kv_models, prompt, max_new_tokens=40)

# %%
# NBVAL_CHECK_OUTPUT
for row in kv_rows:
    print(f"{row.label:>20}: {row.kv_cache_entries:>4} KV entries ({row.kv_cache_bytes / 1024:.1f} KiB), mean depth "
          f"{row.mean_depth:.2f}, same tokens as uncached: {row.same_as_uncached}")
assert all(row.same_as_uncached for row in kv_rows)

# %%
rviz.kv_strategy_figure([vars(row) for row in kv_rows])

# %% [markdown]
# The ordinary caches hold one entry per token per layer: 6 x 48 = 288 for the vanilla model *and* for the 2 x 3
# loop, which shares weights but not keys. MoR's recursion-wise cache only holds the tokens that ran each step, and
# KV sharing only step 0's 2 x 48 = 96. Note the mean depths: at generation the trained router decides causally
# (continue iff sigmoid(r) > 0.5, the auxiliary BCE's prediction of the training-time top-k) and sends tokens
# through fewer recursions than the 2.0 it used in training. That predictor is only approximately right, a pitfall
# the MoR code knows; and the two strategies route differently because later steps see different keys. Every row
# still produces exactly the tokens of cache-free generation.

# %% [markdown]
# ## 4. Play with it
#
# **Depth per byte.** Pick a corpus and a position in its validation text: which bytes does the router send through
# all three recursions?

# %%
def depth_panel(corpus="shakespeare", offset=0):
    text = rx.corpus_sample(corpus, chars=192, offset=offset)
    c, d = rx.depth_text(mor_run.model, text)
    return rviz.depth_text_figure(c, d, num_recursion=3, title=f"{corpus}: recursion depth per byte")


viz.interact_figure(depth_panel, corpus=list(rx.CORPORA), offset=(0, 9600, 192))

# %% [markdown]
# **The rank knob.** Slide the LoRA rank of relaxed recursion: parameters grow linearly, the loss of the untrained,
# SVD-initialised model falls towards the vanilla model's (the star).

# %%
viz.interact_figure(lambda rank=4: rviz.rank_curve_figure(
    curve.ranks, curve.params, curve.loss, selected_rank=rank, vanilla_loss=curve.vanilla_loss,
    vanilla_params=curve.vanilla_params), rank=curve.ranks)

# %% [markdown]
# ## 5. What the paper claims, what we found
#
# *Claims.* Relaxed Recursive Transformers: layer-wise LoRA recovers most of what tying loses, and relaxed recursive
# models beat models of similar size. Mixture-of-Recursions: "at equal training FLOPs and smaller model sizes", MoR
# reaches lower validation loss than vanilla and recursive baselines. The two verdicts below come from the recorded
# sweep by one rule (`rx._compare`): the gap between means must beat the mean of the two seed ranges and have the
# same sign on every seed; otherwise the verdict is inconclusive.

# %%
# NBVAL_CHECK_OUTPUT
sweep = recorded.sweep
relaxed_v, mor_v, mor_token_v = (rx.relaxed_verdict(sweep), rx.mor_verdict(sweep),
                                 rx.mor_verdict(sweep, mor="mor_token"))
for verdict in (relaxed_v, mor_v, mor_token_v):
    print(f"claim: {verdict.claim}\n  verdict: {verdict.verdict}: {verdict.reason}")
best = min(sweep.variants, key=sweep.mean)
spread = sum(sweep.seed_range(v) for v in sweep.variants) / len(sweep.variants)
means = [sweep.mean(v) for v in sweep.variants]
print(f"resolution: mean seed range {spread:.3f} nats vs {max(means) - min(means):.3f} between the best and worst "
      f"variant")
print(f"lowest loss on this budget: {rx.VARIANT_LABELS[best]} ({sweep.mean(best):.3f}, "
      f"{int(sweep.budget[best]['steps'])} steps)")
# the findings of this lab, asserted so a change in the code or the environment cannot slip by unnoticed
assert relaxed_v.verdict == "does not hold at this scale"
assert mor_v.verdict == "holds" and mor_token_v.verdict == "holds"
assert best == "vanilla_2"  # step-limited: the cheapest model per token trains longest and wins

# %% [markdown]
# **What we found.**
# * **Relaxed recursion does not hold at this scale**, in our protocol: trained from scratch on the same FLOP
#   budget, the 2 x 3 loop with rank-6 LoRA (98,880 parameters) ends *worse* than the 3 x 2 loop with the same
#   parameters (99,504), on every seed, and even worse than the 2 x 3 loop it extends. Two reasons, both about the
#   protocol rather than the method: the paper *uptrains* relaxed models from a pretrained model with SVD-initialised
#   LoRAs, which is where section 3.1 shows the LoRA earning its parameters (rank 8 recovers most of the tying loss
#   with no training), whereas from scratch a B = 0 LoRA adds little the shared weights cannot learn; and an unmerged
#   LoRA costs FLOPs (+13 % per token), so on a FLOP budget the relaxed model trains 529 steps instead of 600, in a
#   regime where steps matter most. Exercise 3 tries the uptraining protocol.
# * **MoR beats the vanilla and recursive baselines at equal training FLOPs: holds**, for both routers, separated on
#   every seed. But look at *why*. Our runs are step-limited: MoR spends about 2/3 of the recursive model's FLOPs
#   per token, so on the same budget it trains 899 steps instead of 600. The same arithmetic makes the plain 2-layer
#   model (1,608 steps) the best of all and Mixture-of-Depths (1,031 steps) second: at this scale, cheaper per token
#   wins, whatever the architecture. The paper compares models of 135M-1.7B parameters on billions of tokens, where
#   extra steps are no longer the bottleneck and a 2-layer model would lose badly. So the toy reproduces the ordering
#   the paper reports between MoR, vanilla and recursive models, not evidence that adaptive depth itself is what
#   helps; the Pareto chart (loss against parameters) shows the other side: MoR and the loops are the
#   smallest models.
# * **KV cache.** At training-time capacities (1, 2/3, 1/3) the ledger gives recursion-wise caching 2/3 of the
#   recursive model's entries (192 of 288 per sequence) and recursive KV sharing 1/3 (96); at generation the causal
#   router went shallower still (section 3.4). The measured speed differences are small and noisy here: our decoder
#   is a Python loop per token on a shared CPU, far from the batched GPU decoding in which the MoR paper reports up
#   to 2x throughput.
#
# ## Summary
# * A recursive transformer ties *parameters* across L distinct block modules: the ledger counts K blocks, but FLOPs
#   and the KV cache stay those of L layers. Initialising the loop from a trained deeper model loses much of what it
#   learned; stepwise and average initialisations differ.
# * Relaxed recursion starts a per-depth LoRA from the SVD of the tying residual: rank 0 is the loop, full rank the
#   original model, and the rank slider trades parameters for loss smoothly.
# * Mixture-of-Recursions routes tokens over depth (expert choice with nested top-k, or token choice); attention runs
#   among the tokens still active. Recursion-wise caching stores only active tokens' K/V, recursive KV sharing only
#   step 0's; cached generation reproduces uncached generation exactly once routing is causal.
# * Mixture-of-Depths skips blocks per token; relative-norm halting stops converged tokens at inference.
#
# ## Exercises
# 1. MoR with T = 48, K = 2 unique blocks and capacities (1, 2/3, 1/3): how many KV-cache entries does one sequence
#    need with recursion-wise caching? With KV sharing?
#    `rx.check_kv_entries(answer, seq_len=48, num_unique=2, capacities=(1, 2/3, 1/3), kv_strategy="recursion_wise")`.
# 2. How many parameters does relaxed recursion add at rank 6 for this lab's config?
#    `rx.check_lora_params(answer, config=config, rank=6)`.
# 3. Train `rx.train_variant("relaxed_2x3", seed=0)` and `rx.train_variant("recursive_3x2", seed=0)` (20 s each) and
#    compare with the recorded seeds. Then uptrain instead of training from scratch: start both from `van.model`
#    with `from_vanilla` and train 200 steps with `lablib.train.train_lm`. Does the ordering change?
#
# ## Further reading
# * Dehghani et al., *Universal Transformers* (2019): one block applied repeatedly, with adaptive computation time.
# * Csordás et al., *MoEUT: Mixture-of-Experts Universal Transformers* (2024): shared layers made wide with MoE.
# * Graves, *Adaptive Computation Time for Recurrent Neural Networks* (2016): the halting idea behind all of these.

# %%
assert not rx.check_kv_entries(0, seq_len=48, num_unique=2, capacities=(1, 2 / 3, 1 / 3),
                               kv_strategy="recursion_wise")  # try yours
