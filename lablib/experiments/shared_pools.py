"""Lab 02's seeded experiments: shared expert pools (UniPool, WideNet), randomized parameter sharing and unified
embeddings. Callable at tiny sizes (the tests do) and cached by configuration, so the lab reruns instantly.

* **UniPool vs a per-layer MoE** (`lm_sweep`, `unipool_verdict`). A 4-layer byte-level LM (d_model 32) on Shakespeare
  + Python. The per-layer MoE has 4 experts of width 64 in each layer (16 experts, top-2, Switch balance loss); the
  UniPool models have one pool of M experts of the same width for all 4 layers (NormRouter, top-2, pool-level
  balance loss), M = 2 ... 16. Both use 128 expert units per token per layer, so compute per token is the same; only
  the stored experts differ. Claim (UniPool): pools of 41.6-66.7 % of the per-layer budget match or beat it.
* **WideNet** (`widenet_verdict`): one attention + one MoE FFN (8 experts of width 64, top-2) reused at all 4 depths,
  with individual LayerNorms per depth or one shared pair. Claim: individual LayerNorms matter (they are what lets
  the shared router route differently per depth).
* **Randomized parameter sharing vs pruning vs a smaller model** (`compression_pareto`, `rps_verdict`): an MLP
  784-128-128-10 on the MNIST-5k sample at stored fractions 0.2 ... 0.005 of its weights, three ways at equal
  stored parameters (the ledger's `stored`): STABLE-RPS (`lablib.pools.RandomizedSharing`) trained from scratch;
  magnitude pruning of the trained dense model followed by masked fine-tuning (`lablib.sparse`); a dense MLP of two
  narrower hidden layers. Claim (RPS paper): RPS matches or beats pruning and smaller models across the range, most
  clearly at high compression. Lab 06 imports `compression_pareto` / `recorded_compression_pareto` /
  `pareto_points` to plot this curve next to its own pruning methods.
* **Unified embedding** (`embedding_sweep`): one multiplexed table against per-feature tables of the same total rows,
  on a synthetic click task with known cardinalities.

`record_shared_pools` (`python -m lablib sweep shared-pools`) runs the whole sweep with 3 seeds and writes
`results/shared_pools.json`; the lab re-runs a seed-0 subset and checks it against the recording.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from lablib import cache as cache_mod
from lablib import data, ledger, models, moe, pools, sparse, train
from lablib.experiments.foundations import Verdict
from lablib.experiments.seeded import SeededLosses

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_FILE = "shared_pools.json"
CORPORA = ("shakespeare", "python")

# ----------------------------------------------------------------------------------------------------------------
# Shared expert pools on a tiny LM
# ----------------------------------------------------------------------------------------------------------------

MODEL_DEFAULTS = dict(d_model=32, n_layers=4, n_heads=4, seq_len=32)
TRAIN_DEFAULTS = dict(steps=400, batch_size=32, lr=3e-3)
EXPERT_WIDTH = 64
TOP_K = 2
EXPERTS_PER_LAYER = 4
WIDENET_EXPERTS = 8
AUX_LOSS_COEF = 0.01
POOL_SIZES = (2, 4, 8, 10, 16)
# the paper's reduced pools: 41.6-66.7 % of the per-layer budget (here 16 experts); we test 40-70 %
REDUCED_RANGE = (0.4, 0.7)
WIDENET_VARIANTS = ("widenet_individual", "widenet_shared")
SANITY_PAIR = ("pool_2", "per_layer")  # (expected worse, expected better): 2 experts for 4 layers vs 16


def pool_variant(pool_size: int) -> str:
    return f"pool_{pool_size}"


def variant_label(variant: str) -> str:
    if variant == "per_layer":
        return f"per-layer MoE ({EXPERTS_PER_LAYER} x {MODEL_DEFAULTS['n_layers']} experts)"
    if variant.startswith("pool_"):
        return f"UniPool, pool of {variant[5:]}"
    if variant == "widenet_individual":
        return "WideNet, individual LayerNorms"
    if variant == "widenet_shared":
        return "WideNet, shared LayerNorms"
    raise ValueError(f"unknown variant {variant!r}")


def _check_variant(variant: str) -> None:
    if variant in ("per_layer", *WIDENET_VARIANTS):
        return
    if isinstance(variant, str) and variant.startswith("pool_") and variant[5:].isdigit() and int(variant[5:]) >= 1:
        return
    raise ValueError(f"unknown variant {variant!r}; use 'per_layer', 'pool_<M>', 'widenet_individual' or "
                     "'widenet_shared'")


def build_lm(variant: str, *, seed: int, d_model: int = MODEL_DEFAULTS["d_model"],
             n_layers: int = MODEL_DEFAULTS["n_layers"], n_heads: int = MODEL_DEFAULTS["n_heads"],
             seq_len: int = MODEL_DEFAULTS["seq_len"]) -> models.TinyTransformer:
    """An untrained LM for `variant` ("per_layer", "pool_<M>", "widenet_individual", "widenet_shared")."""
    _check_variant(variant)
    torch.manual_seed(seed)
    config = models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, d_model=d_model, n_layers=n_layers,
                                      n_heads=n_heads, seq_len=seq_len)
    if variant == "per_layer":
        factory = moe.moe_ffn_factory(num_experts=EXPERTS_PER_LAYER, top_k=TOP_K, d_hidden=EXPERT_WIDTH,
                                      router_aux_loss_coef=AUX_LOSS_COEF, seed=seed)
        return moe.MoETransformer(config, ffn_factory=factory)
    if variant.startswith("pool_"):
        return pools.UniPoolTransformer(config, pool_size=int(variant[5:]), top_k=TOP_K, d_hidden=EXPERT_WIDTH,
                                        router="norm", pool_aux_loss_coef=AUX_LOSS_COEF)
    return pools.WideNetTransformer(config, num_experts=WIDENET_EXPERTS, top_k=TOP_K, d_hidden=EXPERT_WIDTH,
                                    share_norms=variant == "widenet_shared", router_aux_loss_coef=AUX_LOSS_COEF)


@dataclass
class PoolLMResult:
    """A trained (or cached) LM: history, ledger row and final validation loss (nats per byte)."""

    variant: str
    model: models.TinyTransformer
    history: train.History
    param_ledger: ledger.ParamLedger
    val_loss: float
    from_cache: bool


def train_pool_lm(*, variant: str, seed: int = 0, steps: int = TRAIN_DEFAULTS["steps"],
                  batch_size: int = TRAIN_DEFAULTS["batch_size"], lr: float = TRAIN_DEFAULTS["lr"],
                  max_chars: int = 200_000, eval_batches: int = 16, progress: bool = True,
                  checkpoint_cache: cache_mod.CheckpointCache | None = None, **model_kwargs: Any) -> PoolLMResult:
    """Train (or load) one variant on Shakespeare + Python with loss = LM loss + aux loss (balance terms)."""
    _check_variant(variant)
    model_cfg = {**MODEL_DEFAULTS, **model_kwargs}
    run = dict(experiment="shared_pools_lm", variant=variant, seed=seed, model=model_cfg, corpora=list(CORPORA),
               max_chars=max_chars, steps=steps, batch_size=batch_size, lr=lr, eval_batches=eval_batches,
               expert_width=EXPERT_WIDTH, top_k=TOP_K, aux_loss_coef=AUX_LOSS_COEF)
    splits = data.text_corpus(list(CORPORA), max_chars=max_chars)

    def build():
        return build_lm(variant, seed=seed, **model_cfg)

    def fit(model) -> dict:
        def eval_fn(m):
            return {"val_loss": train.evaluate_lm(m, splits.val, batch_size=batch_size,
                                                  seq_len=model_cfg["seq_len"], max_batches=eval_batches, seed=0)}

        batches = data.lm_batches(splits.train, batch_size=batch_size, seq_len=model_cfg["seq_len"], seed=seed)
        history = train.train(model, batches=batches, loss_fn=train.lm_loss, steps=steps, lr=lr, eval_fn=eval_fn,
                              eval_every=max(steps // 2, 1), seed=seed, progress=progress)
        return dict(history=history.to_dict())

    model, meta, from_cache = cache_mod.cached_train(run, build=build, fit=fit, cache=checkpoint_cache)
    history = train.History.from_dict(meta["history"])
    return PoolLMResult(variant=variant, model=model, history=history,
                        param_ledger=ledger.ledger(model, name=variant_label(variant)),
                        val_loss=history.final("val_loss"), from_cache=from_cache)


@dataclass
class LMSweepResult(SeededLosses):
    """Validation loss per variant and seed (string keys, for JSON) and each variant's ledger
    (`{"total", "active_per_token", "stored", "flops_per_token", "experts"}`; experts = stored expert tensors)."""

    variants: list[str]
    seeds: list[int]
    val_loss: dict[str, dict[str, float]]
    ledger: dict[str, dict[str, int]]
    config: dict = field(default_factory=dict)

    def subset(self, *, variants: Sequence[str], seeds: Sequence[int]) -> "LMSweepResult":
        missing = [v for v in variants if v not in self.val_loss]
        missing += [f"{v} seed {s}" for v in variants if v in self.val_loss for s in seeds
                    if str(s) not in self.val_loss[v]]
        if missing:
            raise KeyError(f"result has no entries for {missing}")
        keep = [str(s) for s in seeds]
        return LMSweepResult(variants=list(variants), seeds=list(seeds),
                             val_loss={v: {s: self.val_loss[v][s] for s in keep} for v in variants},
                             ledger={v: self.ledger[v] for v in variants}, config=self.config)


def _expert_params(model: torch.nn.Module) -> int:
    """Stored expert parameters: the pool once for UniPool, every layer's bank for a per-layer MoE, the shared
    bank once for WideNet (tensors deduplicated by identity)."""
    seen = {}
    for module in model.modules():
        if isinstance(module, moe.Experts):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def lm_sweep(*, variants: Sequence[str], seeds: Sequence[int] = (0,), progress: bool = False,
             checkpoint_cache: cache_mod.CheckpointCache | None = None, **train_kwargs: Any) -> LMSweepResult:
    """Train every variant with every seed (cached); `train_kwargs` go to `train_pool_lm`."""
    if not variants or not seeds:
        raise ValueError("variants and seeds must each be non-empty")
    for v in variants:
        _check_variant(v)
    val_loss, ledgers = {}, {}
    for v in variants:
        val_loss[v] = {}
        for s in seeds:
            r = train_pool_lm(variant=v, seed=s, progress=False, checkpoint_cache=checkpoint_cache, **train_kwargs)
            val_loss[v][str(s)] = r.val_loss
            row = r.param_ledger
            ledgers[v] = dict(total=row.total, active_per_token=row.active_per_token, stored=row.stored,
                              flops_per_token=row.flops_per_token, experts=_expert_params(r.model))
            if progress:
                print(f"{v:>20} seed {s}: val loss {r.val_loss:.4f} "
                      f"({'cached' if r.from_cache else f'{r.history.seconds:.0f} s'})", flush=True)
    config = dict(variants=list(variants), seeds=list(seeds), **{**TRAIN_DEFAULTS, **MODEL_DEFAULTS, **train_kwargs},
                  expert_width=EXPERT_WIDTH, top_k=TOP_K, experts_per_layer=EXPERTS_PER_LAYER,
                  widenet_experts=WIDENET_EXPERTS)
    return LMSweepResult(variants=list(variants), seeds=list(seeds), val_loss=val_loss, ledger=ledgers, config=config)


def format_lm_table(result: LMSweepResult, *, digits: int = 3) -> str:
    """Variant, total / stored-expert parameters, loss per seed, mean and seed range."""
    seeds = " ".join(f"{'seed ' + str(s):>8}" for s in result.seeds)
    lines = [f"{'variant':<34} {'total':>8} {'experts':>8} {seeds} {'mean':>7} {'range':>6}"]
    for v in result.variants:
        led = result.ledger[v]
        losses = " ".join(f"{x:>8.{digits}f}" for x in result.values(v))
        lines.append(f"{variant_label(v):<34} {led['total']:>8,} {led['experts']:>8,} {losses} "
                     f"{result.mean(v):>7.{digits}f} {result.seed_range(v):>6.{digits}f}")
    return "\n".join(lines)


def _spread(result: LMSweepResult, variants: Sequence[str]) -> float:
    return statistics.fmean(result.seed_range(v) for v in variants)


def _sanity(result: LMSweepResult, spread: float) -> tuple[bool, float]:
    worse, better = SANITY_PAIR
    gap = result.mean(worse) - result.mean(better)
    return gap > spread and min(result.values(worse)) > max(result.values(better)), gap


def _separated(result: LMSweepResult, a: str, b: str, spread: float) -> bool:
    """a better than b: means differ by more than the spread and every seed of a is below every seed of b."""
    return result.mean(b) - result.mean(a) > spread and max(result.values(a)) < min(result.values(b))


UNIPOOL_CLAIM = ("a UniPool model whose pool holds 40-70 % of the per-layer MoE's experts matches or beats the "
                 "per-layer MoE")


def reduced_pools(result: LMSweepResult, *, budget: int | None = None,
                  fraction_range: tuple[float, float] = REDUCED_RANGE) -> list[str]:
    """The pool variants of `result` whose size is within `fraction_range` of the per-layer expert budget."""
    budget = budget or EXPERTS_PER_LAYER * int(result.config.get("n_layers", MODEL_DEFAULTS["n_layers"]))
    lo, hi = fraction_range
    return [v for v in result.variants if v.startswith("pool_") and lo <= int(v[5:]) / budget <= hi]


def unipool_verdict(result: LMSweepResult) -> Verdict:
    """Decide the UniPool claim from the numbers (validation loss, nats).

    Seed spread = the mean seed range of the compared variants. Sanity: a pool of 2 experts must be worse than the
    per-layer MoE by more than the spread on every seed, or the runs cannot separate anything (inconclusive).
    Then **holds** when some reduced pool's mean loss is at most the per-layer mean plus the spread (matches or
    beats); **does not hold at this scale** when every reduced pool is separated from (worse than) the per-layer
    model on every seed; **inconclusive** otherwise.
    """
    reduced = reduced_pools(result)
    needed = ["per_layer", *SANITY_PAIR]
    missing = [v for v in needed if v not in result.val_loss]
    if missing or not reduced:
        raise KeyError(f"the result lacks {missing or 'a reduced pool (40-70 % of the budget)'}")
    if len(result.seeds) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    spread = _spread(result, ["per_layer", *reduced])
    ok, gap = _sanity(result, spread)
    diffs = {v: result.mean(v) - result.mean("per_layer") for v in reduced}
    numbers = dict(mean={v: result.mean(v) for v in ["per_layer", *reduced]}, diff_vs_per_layer=diffs,
                   seed_spread=spread, sanity_gap=gap, sanity_ok=ok, reduced=reduced,
                   expert_fraction={v: int(v[5:]) / (EXPERTS_PER_LAYER * MODEL_DEFAULTS["n_layers"]) for v in reduced})
    if not ok:
        return Verdict(UNIPOOL_CLAIM, "inconclusive", f"the sanity check fails: a 2-expert pool is only {gap:.3f} "
                       f"nats worse than the per-layer MoE (seed spread {spread:.3f})", numbers)
    best = min(diffs, key=diffs.get)
    if diffs[best] <= spread:
        how = "beats" if diffs[best] < -spread else "matches (within the seed spread)"
        reason = (f"{variant_label(best)} ({numbers['expert_fraction'][best]:.0%} of the experts) {how} the per-layer "
                  f"MoE: {diffs[best]:+.3f} nats, seed spread {spread:.3f}")
        return Verdict(UNIPOOL_CLAIM, "holds", reason, numbers)
    if all(_separated(result, "per_layer", v, spread) for v in reduced):
        reason = (f"every reduced pool is worse than the per-layer MoE on every seed (best {best}: "
                  f"{diffs[best]:+.3f} nats, seed spread {spread:.3f})")
        return Verdict(UNIPOOL_CLAIM, "does not hold at this scale", reason, numbers)
    return Verdict(UNIPOOL_CLAIM, "inconclusive", f"the best reduced pool is {diffs[best]:+.3f} nats from the "
                   f"per-layer MoE, above the spread {spread:.3f}, but the seeds overlap", numbers)


WIDENET_CLAIM = "individual LayerNorms per depth beat one shared LayerNorm pair in WideNet"


def _paired(result: LMSweepResult, worse: str, better: str) -> tuple[list[float], float, float]:
    """Per-seed differences worse − better (same seed = same init stream and batch order), their mean and range."""
    d = [w - b for w, b in zip(result.values(worse), result.values(better))]
    return d, statistics.fmean(d), max(d) - min(d)


def widenet_verdict(result: LMSweepResult) -> Verdict:
    """A paired comparison: WideNet's seeds share their batch order and much of their initialisation stream, and
    seed-to-seed variation moves both variants together, so we compare per seed.

    d_s = loss(shared LayerNorms) − loss(individual), per seed. **holds** when every d_s > 0 and the mean of d
    exceeds the range of d; **does not hold at this scale** when every d_s < 0 and −mean(d) exceeds the range;
    **inconclusive (within seed spread)** otherwise. Sanity check, paired the same way: a 2-expert pool must be
    worse than the per-layer MoE on every seed by more than the range of those differences."""
    ind, shared = WIDENET_VARIANTS
    missing = [v for v in (ind, shared, *SANITY_PAIR) if v not in result.val_loss]
    if missing:
        raise KeyError(f"the result lacks {missing}")
    if len(result.seeds) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    d, mean_d, range_d = _paired(result, shared, ind)
    sd, sanity_mean, sanity_range = _paired(result, *SANITY_PAIR)
    ok = min(sd) > 0 and sanity_mean > sanity_range
    numbers = dict(mean={ind: result.mean(ind), shared: result.mean(shared)}, paired_differences=d,
                   mean_difference=mean_d, range_of_differences=range_d, unpaired_spread=_spread(result, [ind, shared]),
                   sanity_differences=sd, sanity_ok=ok)
    if not ok:
        return Verdict(WIDENET_CLAIM, "inconclusive", f"the sanity check fails: 2-expert pool minus per-layer MoE "
                       f"per seed = {[round(x, 3) for x in sd]}", numbers)
    per_seed = ", ".join(f"{x:+.3f}" for x in d)
    if min(d) > 0 and mean_d > range_d:
        return Verdict(WIDENET_CLAIM, "holds", f"individual LayerNorms are better on every seed (shared minus "
                       f"individual: {per_seed} nats; mean {mean_d:.3f} > range {range_d:.3f})", numbers)
    if max(d) < 0 and -mean_d > range_d:
        return Verdict(WIDENET_CLAIM, "does not hold at this scale", f"shared LayerNorms are better on every seed "
                       f"(shared minus individual: {per_seed} nats)", numbers)
    return Verdict(WIDENET_CLAIM, "inconclusive (within seed spread)", f"shared minus individual per seed: "
                   f"{per_seed} nats (mean {mean_d:+.3f}, range {range_d:.3f})", numbers)


@torch.no_grad()
def usage_matrix(model: torch.nn.Module, *, windows: int = 16, seed: int = 0, max_chars: int = 200_000) -> list[list[float]]:
    """(n_layers, experts) share of each layer's routed assignments per expert on `windows` validation windows."""
    splits = data.text_corpus(list(CORPORA), max_chars=max_chars)
    seq_len = model.config.seq_len
    x, _ = data.sample_lm_batch(splits.val, batch_size=windows, seq_len=seq_len,
                                generator=torch.Generator().manual_seed(seed))
    return [[round(float(v), 6) for v in row] for row in pools.pool_usage(model, x)]


def pool_size_points(result: LMSweepResult) -> dict[str, dict[str, list[float]]]:
    """Plot data for the pool-size panel: {"UniPool": {"params", "mean", "low", "high", "pool_size"},
    "per-layer MoE": {...}} with params = the ledger's total, losses over seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    sizes = sorted(int(v[5:]) for v in result.variants if v.startswith("pool_"))
    groups = {"UniPool (NormRouter, pool loss)": [pool_variant(m) for m in sizes]}
    if "per_layer" in result.variants:
        groups["per-layer MoE"] = ["per_layer"]
    for label, vs in groups.items():
        out[label] = dict(params=[result.ledger[v]["total"] for v in vs], mean=[result.mean(v) for v in vs],
                          low=[min(result.values(v)) for v in vs], high=[max(result.values(v)) for v in vs],
                          pool_size=[int(v[5:]) if v.startswith("pool_") else EXPERTS_PER_LAYER * MODEL_DEFAULTS[
                              "n_layers"] for v in vs])
    return out


def compare_lm_with_recorded(live: LMSweepResult, recorded: LMSweepResult, *, tolerance: float = 0.05) -> list[str]:
    """Differences between a live run and the recording ([] = agree): losses within `tolerance` nats (thread count
    and CPU change float summation order, which training amplifies a little), ledgers identical."""
    problems = []
    rec = recorded.subset(variants=live.variants, seeds=live.seeds)
    for v in live.variants:
        if live.ledger[v] != rec.ledger[v]:
            problems.append(f"{v}: ledger {live.ledger[v]} vs recorded {rec.ledger[v]}")
        for s in live.seeds:
            a, b = live.val_loss[v][str(s)], rec.val_loss[v][str(s)]
            if abs(a - b) > tolerance:
                problems.append(f"{v} seed {s}: validation loss {a:.4f} vs recorded {b:.4f}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Randomized parameter sharing vs pruning vs a smaller model
# ----------------------------------------------------------------------------------------------------------------

RPS_DATASET = "mnist5k"
RPS_HIDDEN = (128, 128)
RPS_TRAIN = dict(steps=600, batch_size=128, lr=2e-3, finetune_steps=300)
COMPRESSIONS = (0.2, 0.05, 0.02, 0.005)
METHODS = ("rps", "pruning", "smaller")
METHOD_LABELS = {"rps": "STABLE-RPS (hashed memory)", "pruning": "magnitude pruning + fine-tune",
                 "smaller": "smaller dense MLP", "dense": "dense MLP (uncompressed)"}


def _mlp(in_features: int, num_classes: int, hidden: Sequence[int], seed: int) -> models.MLPClassifier:
    torch.manual_seed(seed)
    return models.MLPClassifier(in_features=in_features, hidden_sizes=list(hidden), num_classes=num_classes)


def smaller_width_for(budget: int, *, in_features: int, num_classes: int, depth: int = 2) -> int:
    """The hidden width w (≥ 1) of an MLP with `depth` equal hidden layers whose parameter count is closest to
    `budget`: params(w) = (in + 1) w + (depth − 1)(w + 1) w + (w + 1) · classes."""
    def params(w: int) -> int:
        return (in_features + 1) * w + (depth - 1) * (w + 1) * w + (w + 1) * num_classes

    best = min(range(1, 4097), key=lambda w: abs(params(w) - budget))
    return best


def _dense_model(seed: int, steps: int, batch_size: int, lr: float, dataset: data.ClassificationData,
                 hidden: Sequence[int], cache: cache_mod.CheckpointCache | None) -> tuple[torch.nn.Module, float]:
    run = dict(experiment="shared_pools_dense_mlp", dataset=dataset.name, hidden=list(hidden), seed=seed, steps=steps,
               batch_size=batch_size, lr=lr)

    def build():
        return _mlp(dataset.in_features, dataset.num_classes, hidden, seed)

    def fit(model):
        return train.train_classifier(model, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                      progress=False).to_dict()

    model, meta, _ = cache_mod.cached_train(run, build=build, fit=fit, cache=cache)
    return model, train.History.from_dict(meta).final("val_accuracy")


def compression_run(*, method: str, compression: float, seed: int = 0, steps: int = RPS_TRAIN["steps"],
                    batch_size: int = RPS_TRAIN["batch_size"], lr: float = RPS_TRAIN["lr"],
                    finetune_steps: int = RPS_TRAIN["finetune_steps"], hidden: Sequence[int] = RPS_HIDDEN,
                    dataset: str = RPS_DATASET, checkpoint_cache: cache_mod.CheckpointCache | None = None) -> dict:
    """One point of the Pareto curve: {"accuracy", "stored", "total", "flops_per_token"} (cached as JSON).

    `compression` is the stored fraction of the dense MLP's weight matrices (biases are stored by every method).
    * "rps": `RandomizedSharing(dense_init, compression=c)` (RANDOMFOLD, gradient scaling), trained `steps` steps;
    * "pruning": the dense MLP trained `steps` steps, magnitude-pruned to density c per layer (weights only), then
      fine-tuned `finetune_steps` steps with the mask held (`lablib.sparse.masked_train`);
    * "smaller": an MLP with narrower hidden layers whose parameter count is closest to RPS's stored count.
    """
    if method not in (*METHODS, "dense"):
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS) + ['dense']}")
    pools.check_compression(compression)
    run = dict(experiment="shared_pools_compression", method=method, compression=compression, seed=seed, steps=steps,
               batch_size=batch_size, lr=lr, finetune_steps=finetune_steps if method == "pruning" else None,
               hidden=list(hidden), dataset=dataset)

    def compute() -> dict:
        ds = data.load_classification(dataset, seed=0)
        weights = [(ds.in_features if i == 0 else hidden[i - 1]) * h
                   for i, h in enumerate([*hidden, ds.num_classes])]
        biases = sum(hidden) + ds.num_classes
        if method == "dense":
            model, acc = _dense_model(seed, steps, batch_size, lr, ds, hidden, checkpoint_cache)
            row = ledger.ledger(model)
        elif method == "rps":
            model = pools.RandomizedSharing(_mlp(ds.in_features, ds.num_classes, hidden, seed),
                                            compression=compression, seed=seed)
            history = train.train_classifier(model, ds, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                             progress=False)
            acc, row = history.final("val_accuracy"), ledger.ledger(model)
        elif method == "smaller":
            budget = pools.memory_size_for(sum(weights), compression) + biases
            width = smaller_width_for(budget, in_features=ds.in_features, num_classes=ds.num_classes,
                                      depth=len(hidden))
            model = _mlp(ds.in_features, ds.num_classes, [width] * len(hidden), seed)
            history = train.train_classifier(model, ds, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                             progress=False)
            acc, row = history.final("val_accuracy"), ledger.ledger(model)
        else:
            dense, _ = _dense_model(seed, steps, batch_size, lr, ds, hidden, checkpoint_cache)
            names = [n for n, p in dense.named_parameters() if p.dim() >= 2]
            mask = sparse.magnitude_mask(dense, density=compression, scope="layer", names=names).mask

            def batches():
                return data.classification_batches(ds.x_train, ds.y_train, batch_size=batch_size, seed=seed + 1)

            result = sparse.masked_train(dense, mask=mask, batches=batches, loss_fn=train.classification_loss,
                                         steps=finetune_steps, lr=lr, seed=seed, progress=False)
            acc = train.evaluate_classifier(result.model, ds.x_val, ds.y_val)["accuracy"]
            row = result.ledger
        return dict(accuracy=float(acc), stored=int(row.stored), total=int(row.total),
                    flops_per_token=int(row.flops_per_token))

    return cache_mod.cached_json(run, compute, cache=checkpoint_cache)


@dataclass
class ParetoResult:
    """Accuracy and stored parameters of each method at each compression and seed (string keys, for JSON).

    `accuracy[method][str(c)][str(seed)]`, `stored[method][str(c)]` (the ledger's stored count: identical over
    seeds); `dense_accuracy[str(seed)]` and `dense_stored` for the uncompressed MLP.
    """

    methods: list[str]
    compressions: list[float]
    seeds: list[int]
    accuracy: dict[str, dict[str, dict[str, float]]]
    stored: dict[str, dict[str, int]]
    dense_accuracy: dict[str, float]
    dense_stored: int
    config: dict = field(default_factory=dict)

    def values(self, method: str, compression: float) -> list[float]:
        return [self.accuracy[method][str(compression)][str(s)] for s in self.seeds]

    def mean(self, method: str, compression: float) -> float:
        return statistics.fmean(self.values(method, compression))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ParetoResult":
        return cls(**raw)

    def subset(self, *, methods: Sequence[str], compressions: Sequence[float], seeds: Sequence[int]) -> "ParetoResult":
        try:
            acc = {m: {str(c): {str(s): self.accuracy[m][str(c)][str(s)] for s in seeds} for c in compressions}
                   for m in methods}
            stored = {m: {str(c): self.stored[m][str(c)] for c in compressions} for m in methods}
            dense = {str(s): self.dense_accuracy[str(s)] for s in seeds}
        except KeyError as err:
            raise KeyError(f"result has no entry for {err}") from None
        return ParetoResult(methods=list(methods), compressions=list(compressions), seeds=list(seeds), accuracy=acc,
                            stored=stored, dense_accuracy=dense, dense_stored=self.dense_stored, config=self.config)


def compression_pareto(*, compressions: Sequence[float] = COMPRESSIONS, seeds: Sequence[int] = (0,),
                       methods: Sequence[str] = METHODS, progress: bool = False,
                       checkpoint_cache: cache_mod.CheckpointCache | None = None, **run_kwargs: Any) -> ParetoResult:
    """RPS vs magnitude pruning vs a smaller model at equal stored parameters (see `compression_run`).

    For lab 06 and anyone plotting compression curves: `pareto_points(compression_pareto(...))` gives
    {method label: (stored parameters, mean accuracy)} ready for `lablib.viz.line_figure(..., log_x=True)`;
    `recorded_compression_pareto()` is the 3-seed recording (no training).
    """
    if not compressions or not seeds or not methods:
        raise ValueError("compressions, seeds and methods must each be non-empty")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    for c in compressions:
        pools.check_compression(c)
    accuracy: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    stored: dict[str, dict[str, int]] = {m: {} for m in methods}
    dense_acc, dense_stored = {}, 0
    for s in seeds:
        d = compression_run(method="dense", compression=1.0, seed=s, checkpoint_cache=checkpoint_cache, **run_kwargs)
        dense_acc[str(s)], dense_stored = d["accuracy"], d["stored"]
    for m in methods:
        for c in compressions:
            accuracy[m][str(c)] = {}
            for s in seeds:
                r = compression_run(method=m, compression=c, seed=s, checkpoint_cache=checkpoint_cache, **run_kwargs)
                accuracy[m][str(c)][str(s)] = r["accuracy"]
                stored[m][str(c)] = r["stored"]
                if progress:
                    print(f"{m:>8} c={c:<6} seed {s}: accuracy {r['accuracy']:.4f}, stored {r['stored']:,}", flush=True)
    config = dict(dataset=RPS_DATASET, hidden=list(RPS_HIDDEN), **{**RPS_TRAIN, **run_kwargs})
    return ParetoResult(methods=list(methods), compressions=[float(c) for c in compressions], seeds=list(seeds),
                        accuracy=accuracy, stored=stored, dense_accuracy=dense_acc, dense_stored=dense_stored,
                        config=config)


def pareto_points(result: ParetoResult) -> dict[str, tuple[list[int], list[float]]]:
    """{method label: (stored parameters, mean accuracy over seeds)}, one point per compression, plus the dense
    MLP as a single point; ready for `lablib.viz.line_figure(points, log_x=True)`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for m in result.methods:
        cs = sorted(result.compressions)
        out[METHOD_LABELS[m]] = ([result.stored[m][str(c)] for c in cs], [result.mean(m, c) for c in cs])
    out[METHOD_LABELS["dense"]] = ([result.dense_stored], [statistics.fmean(result.dense_accuracy.values())])
    return out


RPS_CLAIM = ("randomized parameter sharing matches or beats magnitude pruning and smaller models at equal memory, "
             "most clearly at high compression")


def rps_verdict(result: ParetoResult) -> Verdict:
    """Decide the RPS claim (accuracy; higher is better).

    Seed spread = mean over (method, compression) of the seed range. Sanity: at the highest compression the
    smaller model must lose more than the spread against the dense MLP. **holds** when RPS is within the spread of
    (or above) the best baseline at every compression *and* above both baselines by more than the spread at the
    highest compression; **does not hold at this scale** when some baseline beats RPS by more than the spread with no
    overlap of seeds at some compression; **inconclusive** otherwise.
    """
    needed = [m for m in METHODS if m not in result.methods]
    if needed:
        raise KeyError(f"the result lacks methods {needed}")
    if len(result.seeds) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    cs = sorted(result.compressions)
    ranges = [max(result.values(m, c)) - min(result.values(m, c)) for m in METHODS for c in cs]
    spread = statistics.fmean(ranges)
    high = cs[0]
    dense_mean = statistics.fmean(result.dense_accuracy.values())
    sanity_gap = dense_mean - result.mean("smaller", high)
    sanity_ok = sanity_gap > spread
    gaps = {str(c): {b: result.mean("rps", c) - result.mean(b, c) for b in ("pruning", "smaller")} for c in cs}
    numbers = dict(seed_spread=spread, gaps=gaps, highest_compression=high, sanity_gap=sanity_gap,
                   sanity_ok=sanity_ok, mean={m: {str(c): result.mean(m, c) for c in cs} for m in METHODS})
    if not sanity_ok:
        return Verdict(RPS_CLAIM, "inconclusive", f"the sanity check fails: the smallest model is only "
                       f"{sanity_gap:.3f} below the dense MLP (spread {spread:.3f})", numbers)
    losses = [(c, b) for c in cs for b in ("pruning", "smaller")
              if -gaps[str(c)][b] > spread and max(result.values("rps", c)) < min(result.values(b, c))]
    if losses:
        where = ", ".join(f"{b} at {c:g} ({gaps[str(c)][b]:+.3f})" for c, b in losses)
        return Verdict(RPS_CLAIM, "does not hold at this scale", f"RPS loses beyond the seed spread ({spread:.3f}) "
                       f"to {where}", numbers)
    everywhere = all(g >= -spread for c in cs for g in gaps[str(c)].values())
    clear_at_high = all(g > spread for g in gaps[str(high)].values())
    if everywhere and clear_at_high:
        return Verdict(RPS_CLAIM, "holds", f"RPS is within the seed spread ({spread:.3f}) of the best baseline or "
                       f"above it at every compression, and ahead of pruning by {gaps[str(high)]['pruning']:+.3f} and "
                       f"the smaller model by {gaps[str(high)]['smaller']:+.3f} at {high:g}", numbers)
    return Verdict(RPS_CLAIM, "inconclusive", f"RPS never loses beyond the spread ({spread:.3f}) but is not clearly "
                   f"ahead at the highest compression {high:g}: {gaps[str(high)]}", numbers)


def compare_pareto_with_recorded(live: ParetoResult, recorded: ParetoResult, *, tolerance: float = 0.02) -> list[str]:
    """Live accuracies within `tolerance` of the recording, stored counts identical ([] = agree)."""
    rec = recorded.subset(methods=live.methods, compressions=live.compressions, seeds=live.seeds)
    problems = []
    for m in live.methods:
        for c in live.compressions:
            if live.stored[m][str(c)] != rec.stored[m][str(c)]:
                problems.append(f"{m} at {c}: stored {live.stored[m][str(c)]} vs recorded {rec.stored[m][str(c)]}")
            for s in live.seeds:
                a, b = live.accuracy[m][str(c)][str(s)], rec.accuracy[m][str(c)][str(s)]
                if abs(a - b) > tolerance:
                    problems.append(f"{m} at {c} seed {s}: accuracy {a:.4f} vs recorded {b:.4f}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Unified embedding on synthetic clicks
# ----------------------------------------------------------------------------------------------------------------

CLICK_CARDINALITIES = (1000, 500, 100, 20, 5)
EMBEDDING_ROWS = (32, 64, 128, 256, 512)
EMBEDDING_TRAIN = dict(steps=600, batch_size=256, lr=3e-3, d_embed=8, hidden=32)


def embedding_run(*, num_rows: int, multiplexed: bool, seed: int = 0, steps: int = EMBEDDING_TRAIN["steps"],
                  batch_size: int = EMBEDDING_TRAIN["batch_size"], lr: float = EMBEDDING_TRAIN["lr"],
                  d_embed: int = EMBEDDING_TRAIN["d_embed"], hidden: int = EMBEDDING_TRAIN["hidden"],
                  cardinalities: Sequence[int] = CLICK_CARDINALITIES,
                  checkpoint_cache: cache_mod.CheckpointCache | None = None) -> dict:
    """Train a `ClickModel` on the click data (seed 0 data, `seed` for the model and batches): {"val_loss" (log
    loss), "bayes_val_loss", "collision_rate", "stored"} (cached as JSON)."""
    run = dict(experiment="shared_pools_embedding", num_rows=num_rows, multiplexed=multiplexed, seed=seed, steps=steps,
               batch_size=batch_size, lr=lr, d_embed=d_embed, hidden=hidden, cardinalities=list(cardinalities))

    def compute() -> dict:
        clicks = pools.make_click_data(cardinalities=cardinalities, seed=0)
        torch.manual_seed(seed)
        emb = pools.UnifiedEmbedding(cardinalities=cardinalities, num_rows=num_rows, d_embed=d_embed,
                                     multiplexed=multiplexed, seed=seed)
        model = pools.ClickModel(embedding=emb, hidden=hidden)

        def loss_fn(m, batch):
            x, y = batch
            return F.binary_cross_entropy_with_logits(m(x), y)

        batches = data.classification_batches(clicks.x_train, clicks.y_train, batch_size=batch_size, seed=seed)
        train.train(model, batches=batches, loss_fn=loss_fn, steps=steps, lr=lr, seed=seed, progress=False)
        model.eval()
        with torch.no_grad():
            val = float(F.binary_cross_entropy_with_logits(model(clicks.x_val), clicks.y_val))
        return dict(val_loss=val, bayes_val_loss=clicks.bayes_val_loss, collision_rate=emb.collision_rate(),
                    stored=ledger.ledger(model).stored)

    return cache_mod.cached_json(run, compute, cache=checkpoint_cache)


def embedding_sweep(*, rows: Sequence[int] = EMBEDDING_ROWS, seeds: Sequence[int] = (0,),
                    checkpoint_cache: cache_mod.CheckpointCache | None = None, **run_kwargs: Any) -> dict:
    """{"rows", "seeds", "val_loss": {"unified"|"per_feature": {str(rows): {str(seed): loss}}}, "collision_rate":
    {...: {str(rows): rate}}, "bayes_val_loss"}."""
    out: dict[str, Any] = dict(rows=list(rows), seeds=list(seeds), val_loss={}, collision_rate={})
    for kind, multiplexed in (("unified", True), ("per_feature", False)):
        out["val_loss"][kind], out["collision_rate"][kind] = {}, {}
        for r in rows:
            out["val_loss"][kind][str(r)] = {}
            for s in seeds:
                res = embedding_run(num_rows=r, multiplexed=multiplexed, seed=s, checkpoint_cache=checkpoint_cache,
                                    **run_kwargs)
                out["val_loss"][kind][str(r)][str(s)] = res["val_loss"]
                out["collision_rate"][kind][str(r)] = res["collision_rate"]
                out["bayes_val_loss"] = res["bayes_val_loss"]
    return out


def format_embedding_table(sweep: Mapping[str, Any], *, digits: int = 3) -> str:
    lines = [f"{'rows':>5} {'unified loss':>12} {'per-feature loss':>16} {'unified coll.':>13} {'per-feat. coll.':>15}"]
    for r in sweep["rows"]:
        u = statistics.fmean(sweep["val_loss"]["unified"][str(r)].values())
        p = statistics.fmean(sweep["val_loss"]["per_feature"][str(r)].values())
        lines.append(f"{r:>5} {u:>12.{digits}f} {p:>16.{digits}f} {sweep['collision_rate']['unified'][str(r)]:>13.2f} "
                     f"{sweep['collision_rate']['per_feature'][str(r)]:>15.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The recorded sweep
# ----------------------------------------------------------------------------------------------------------------

RECORDED_SEEDS = (0, 1, 2)
RECORDED_LM_VARIANTS = ("per_layer", *(pool_variant(m) for m in POOL_SIZES), *WIDENET_VARIANTS)


@dataclass
class RecordedSweep:
    """What `python -m lablib sweep shared-pools` wrote."""

    lm: LMSweepResult
    pareto: ParetoResult
    embedding: dict
    recorded: str
    machine: str
    seconds: float


def recorded_shared_pools(path: Path | None = None) -> RecordedSweep:
    path = path or RESULTS_DIR / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep shared-pools` to record it")
    raw = json.loads(path.read_text())
    return RecordedSweep(lm=LMSweepResult.from_dict(raw["result"]["lm"]),
                         pareto=ParetoResult.from_dict(raw["result"]["pareto"]), embedding=raw["result"]["embedding"],
                         recorded=raw["recorded"], machine=raw["machine"], seconds=raw["seconds"])


def recorded_compression_pareto(path: Path | None = None) -> ParetoResult:
    """The recorded RPS / pruning / smaller-model Pareto sweep (3 seeds), for lab 02 and lab 06."""
    return recorded_shared_pools(path).pareto


def record_shared_pools(path: Path | None = None, *, progress: bool = True,
                        checkpoint_cache: cache_mod.CheckpointCache | None = None) -> Path:
    """Run the heavy sweep and write it with machine and date: 8 LM variants x 3 seeds, the Pareto sweep (5
    compressions x 3 methods x 3 seeds) and the embedding sweep (5 sizes x 2 kinds x 3 seeds).

    By default from scratch (a temporary cache, so nothing stale is reused). `checkpoint_cache` lets parts of the
    sweep run in parallel processes that fill one fresh cache first (`lm_sweep`, `compression_pareto`,
    `embedding_sweep` with the recorded arguments), then this call collects them."""
    import datetime as dt
    import os
    import platform
    import tempfile
    import time

    import lablib

    path = path or RESULTS_DIR / RECORD_FILE
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lablib-pools-sweep-") as tmp:
        fresh = checkpoint_cache or cache_mod.CheckpointCache(tmp)
        pareto = compression_pareto(seeds=RECORDED_SEEDS, progress=progress, checkpoint_cache=fresh)
        embedding = embedding_sweep(seeds=RECORDED_SEEDS, checkpoint_cache=fresh)
        lm = lm_sweep(variants=RECORDED_LM_VARIANTS, seeds=RECORDED_SEEDS, progress=progress, checkpoint_cache=fresh)
    seconds = time.perf_counter() - start
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                f"{platform.platform()}, 1-minute load average at the end {os.getloadavg()[0]:.2f}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep shared-pools",
        seconds=round(seconds, 1),
        result=dict(lm=lm.to_dict(), pareto=pareto.to_dict(), embedding=embedding),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if progress:
        print(f"sweep took {seconds:.0f} s, written to {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_pool_fraction(answer: float, *, pool_size: int, n_layers: int = MODEL_DEFAULTS["n_layers"],
                        experts_per_layer: int = EXPERTS_PER_LAYER) -> bool:
    """Exercise: the pool's share of the per-layer expert budget."""
    expected = pool_size / (n_layers * experts_per_layer)
    ok = abs(answer - expected) < 1e-3
    print(f"correct: {pool_size} / ({n_layers} x {experts_per_layer}) = {expected:.3f}" if ok else
          "not quite: the per-layer MoE stores n_layers x experts_per_layer experts; the pool stores pool_size")
    return ok


def check_rps_memory(answer: int, *, num_virtual: int, compression: float) -> bool:
    """Exercise: the RPS memory size M for a compression."""
    expected = pools.memory_size_for(num_virtual, compression)
    ok = answer == expected
    print(f"correct: M = round({compression:g} x {num_virtual:,}) = {expected:,}" if ok else
          "not quite: M = round(compression x virtual weights), at least 1; biases are not in the memory")
    return ok
