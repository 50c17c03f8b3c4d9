"""Lab 04's seeded experiments: recursive transformers, relaxed recursion, Mixture-of-Recursions, Mixture-of-Depths.

Everything is callable at tiny sizes (the tests do) and cached by its configuration, so the lab reruns instantly.

* `train_variant`: one of `VARIANTS` (all of effective depth 6 unless named otherwise) trained from scratch on
  Shakespeare + Python bytes for a **fixed training-FLOP budget**: the budget is what `vanilla_6` spends in
  `base_steps` steps, and every variant gets `round(base_steps · F_vanilla_6 / F_variant)` steps, with F the forward
  FLOPs per token of `lablib.recursive.recursion_ledger` (training ≈ 3 × forward). Cheaper models see more tokens,
  as in the MoR paper's isoFLOP comparisons.
* `isoflop_sweep` / `relaxed_verdict` / `mor_verdict`: validation loss per variant and seed; the two claims of the
  issue decided from the numbers.
* `relaxed_rank_curve`: a trained vanilla model turned into a recursive one (stepwise / average init) and relaxed at
  each LoRA rank, scored *without training* (the Relaxed Recursive Transformers initialisation story).
* `depth_text`: the recursion depth MoR gives each byte of a text.
* `kv_benchmark`: KV-cache size and tokens/s of cached generation under each KV strategy.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lablib import cache as cache_mod
from lablib import data, models, train
from lablib.experiments.foundations import Verdict
from lablib.experiments.seeded import SeededLosses, one_thread
from lablib.recursive import (
    MixtureOfDepthsTransformer,
    MixtureOfRecursionsTransformer,
    RecursiveTransformer,
    RelaxedRecursiveTransformer,
    default_capacities,
    generate_cached,
    recursion_ledger,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_FILE = "recursive.json"
CORPORA = ("shakespeare", "python")
MODEL_DEFAULTS = dict(d_model=48, n_heads=4, seq_len=48)
TRAIN_DEFAULTS = dict(base_steps=600, batch_size=16, lr=1e-3)
DEPTH = 6
RELAXED_RANK = 6  # 6 depths x rank 6 x 768 = 27,648 LoRA parameters, about one block (28,272)

# name -> (kind, keyword arguments); every model has effective depth 6 except vanilla_2
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vanilla_6": ("vanilla", dict(n_layers=6)),
    "vanilla_2": ("vanilla", dict(n_layers=2)),
    "recursive_2x3": ("recursive", dict(num_recursion=3)),
    "recursive_3x2": ("recursive", dict(num_recursion=2)),
    "relaxed_2x3": ("relaxed", dict(num_recursion=3, rank=RELAXED_RANK)),
    "mor_expert": ("mor", dict(num_recursion=3, routing="expert_choice")),
    "mor_token": ("mor", dict(num_recursion=3, routing="token_choice")),
    "mod_6": ("mod", dict(capacity=0.125)),
}
VARIANT_LABELS = {
    "vanilla_6": "vanilla, 6 layers",
    "vanilla_2": "vanilla, 2 layers",
    "recursive_2x3": "recursive, 2 blocks x 3",
    "recursive_3x2": "recursive, 3 blocks x 2",
    "relaxed_2x3": f"relaxed, 2 blocks x 3 + LoRA r{RELAXED_RANK}",
    "mor_expert": "MoR expert-choice, 2 blocks x <=3",
    "mor_token": "MoR token-choice, 2 blocks x <=3",
    "mod_6": "MoD, 6 layers, capacity 0.125",
}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")


def model_config(*, n_layers: int = DEPTH, **overrides: Any) -> models.TransformerConfig:
    return models.TransformerConfig(vocab_size=256, n_layers=n_layers, **{**MODEL_DEFAULTS, **overrides})


def build_model(variant: str, *, seed: int, **model_overrides: Any) -> models.TinyTransformer:
    """A freshly initialised model of `variant` (torch's global RNG seeded with `seed`)."""
    _check_variant(variant)
    kind, kwargs = VARIANTS[variant]
    kwargs = dict(kwargs)
    torch.manual_seed(seed)
    if kind == "vanilla":
        return models.TinyTransformer(model_config(n_layers=kwargs["n_layers"], **model_overrides))
    config = model_config(**model_overrides)
    if kind == "recursive":
        return RecursiveTransformer(config, **kwargs)
    if kind == "relaxed":
        return RelaxedRecursiveTransformer(config, **kwargs)
    if kind == "mor":
        return MixtureOfRecursionsTransformer(config, **kwargs)
    return MixtureOfDepthsTransformer(config, **kwargs)


def planned_ledger(model: models.TinyTransformer):
    """The ledger row the budget assumes: token-choice MoR with a balanced router (depths 1..N equally used, the
    fractions of expert choice's default capacities); every other model as `recursion_ledger` counts it."""
    if isinstance(model, MixtureOfRecursionsTransformer) and model.routing == "token_choice":
        return recursion_ledger(model, fractions=default_capacities(model.num_recursion))
    return recursion_ledger(model)


def planned_flops_per_token(variant: str, **model_overrides: Any) -> int:
    """Forward FLOPs per token the budget assumes (see `planned_ledger`)."""
    return planned_ledger(build_model(variant, seed=0, **model_overrides)).flops_per_token


def steps_for_budget(variant: str, *, base_steps: int, **model_overrides: Any) -> int:
    """round(base_steps · F_vanilla_6 / F_variant): the steps that spend vanilla_6's training FLOPs."""
    reference = planned_flops_per_token("vanilla_6", **model_overrides)
    return max(1, round(base_steps * reference / planned_flops_per_token(variant, **model_overrides)))




@dataclass
class VariantResult:
    """A trained (or cached) variant: the model, history, validation loss, ledger row and measured mean depth."""

    variant: str
    model: models.TinyTransformer
    history: train.History
    val_loss: float
    steps: int
    flops_per_token: int
    train_flops: float
    total_params: int
    kv_cache_entries: int
    mean_depth: float
    from_cache: bool


def _splits(max_chars: int) -> data.TextSplits:
    return data.text_corpus(list(CORPORA), max_chars=max_chars)


def train_variant(
    variant: str,
    *,
    seed: int = 0,
    base_steps: int = TRAIN_DEFAULTS["base_steps"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    max_chars: int = 200_000,
    eval_batches: int = 16,
    progress: bool = True,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
    **model_overrides: Any,
) -> VariantResult:
    """Train (or load) `variant` for the vanilla_6 training-FLOP budget of `base_steps` steps (module docstring)."""
    _check_variant(variant)
    seq_len = model_overrides.get("seq_len", MODEL_DEFAULTS["seq_len"])
    steps = steps_for_budget(variant, base_steps=base_steps, **model_overrides)
    run = dict(experiment="recursive_isoflop", variant=variant, spec=VARIANTS[variant], seed=seed,
               model={**MODEL_DEFAULTS, **model_overrides}, corpora=list(CORPORA), max_chars=max_chars,
               base_steps=base_steps, steps=steps, batch_size=batch_size, lr=lr, eval_batches=eval_batches,
               threads=1)
    splits = _splits(max_chars)

    def build():
        return build_model(variant, seed=seed, **model_overrides)

    def fit(model) -> dict:
        def loss_fn(m, batch):
            out = m(*batch)
            return out.loss + out.aux_loss

        def eval_fn(m) -> dict[str, float]:
            return {"val_loss": train.evaluate_lm(m, splits.val, batch_size=batch_size, seq_len=seq_len,
                                                  max_batches=eval_batches, seed=0)}

        batches = data.lm_batches(splits.train, batch_size=batch_size, seq_len=seq_len, seed=seed)
        history = train.train(model, batches=batches, loss_fn=loss_fn, steps=steps, lr=lr, eval_fn=eval_fn,
                              eval_every=max(steps // 3, 1), seed=seed, progress=progress)
        depth = _mean_depth(model, splits.val, batch_size=batch_size, seq_len=seq_len)
        return dict(history=history.to_dict(), mean_depth=depth)

    with one_thread():
        model, meta, from_cache = cache_mod.cached_train(run, build=build, fit=fit, cache=checkpoint_cache)
    history = train.History.from_dict(meta["history"])
    row = planned_ledger(model)
    flops = row.flops_per_token
    return VariantResult(variant=variant, model=model, history=history, val_loss=history.final("val_loss"),
                         steps=steps, flops_per_token=flops,
                         train_flops=3.0 * flops * steps * batch_size * seq_len,
                         total_params=row.total, kv_cache_entries=row.kv_cache_entries,
                         mean_depth=float(meta["mean_depth"]), from_cache=from_cache)


def _mean_depth(model: models.TinyTransformer, tokens: torch.Tensor, *, batch_size: int, seq_len: int) -> float:
    """Mean recursion steps per token on 4 validation batches (MoR), or the model's fixed depth in steps."""
    if not isinstance(model, RecursiveTransformer):
        return 1.0
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    depths = []
    with torch.no_grad():
        for _ in range(4):
            starts = torch.randint(0, tokens.numel() - seq_len, (batch_size, 1), generator=gen)
            out = model(tokens[starts + torch.arange(seq_len)])
            depths.append(out.recursion.mean_depth if out.recursion is not None else float(model.num_recursion))
    model.train(was)
    return statistics.fmean(depths)


# ----------------------------------------------------------------------------------------------------------------
# The isoFLOP sweep and its verdicts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult(SeededLosses):
    """Validation loss per variant and seed (string keys, for JSON) and each variant's budget row."""

    variants: list[str]
    seeds: list[int]
    val_loss: dict[str, dict[str, float]]
    budget: dict[str, dict[str, float]]
    mean_depth: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def subset(self, *, variants: Sequence[str], seeds: Sequence[int]) -> "SweepResult":
        missing = [f"{v} seed {s}" for v in variants for s in seeds
                   if v not in self.val_loss or str(s) not in self.val_loss[v]]
        if missing:
            raise KeyError(f"result has no entries for {missing}")
        keep = [str(s) for s in seeds]
        return SweepResult(variants=list(variants), seeds=list(seeds),
                           val_loss={v: {s: self.val_loss[v][s] for s in keep} for v in variants},
                           budget={v: self.budget[v] for v in variants},
                           mean_depth={v: {s: self.mean_depth[v][s] for s in keep} for v in variants
                                       if v in self.mean_depth},
                           config=self.config)


def isoflop_sweep(*, variants: Sequence[str] = tuple(VARIANTS), seeds: Sequence[int] = (0,), progress: bool = False,
                  checkpoint_cache: cache_mod.CheckpointCache | None = None, **train_kwargs: Any) -> SweepResult:
    """Train every variant at every seed on the same training-FLOP budget (cached)."""
    if not variants or not seeds:
        raise ValueError("variants and seeds must each be non-empty")
    for v in variants:
        _check_variant(v)
    val_loss: dict[str, dict[str, float]] = {}
    depth: dict[str, dict[str, float]] = {}
    budget: dict[str, dict[str, float]] = {}
    for v in variants:
        val_loss[v], depth[v] = {}, {}
        for s in seeds:
            r = train_variant(v, seed=s, progress=False, checkpoint_cache=checkpoint_cache, **train_kwargs)
            val_loss[v][str(s)] = r.val_loss
            depth[v][str(s)] = r.mean_depth
            budget[v] = dict(total_params=r.total_params, flops_per_token=r.flops_per_token, steps=r.steps,
                             train_flops=r.train_flops, kv_cache_entries=r.kv_cache_entries)
            if progress:
                print(f"{v:>14} seed {s}: {r.steps} steps, val loss {r.val_loss:.4f} "
                      f"({'cached' if r.from_cache else f'{r.history.seconds:.0f} s'})", flush=True)
    config = dict(variants=list(variants), seeds=list(seeds), **{**TRAIN_DEFAULTS, **MODEL_DEFAULTS, **train_kwargs})
    return SweepResult(variants=list(variants), seeds=list(seeds), val_loss=val_loss, budget=budget,
                       mean_depth=depth, config=config)


def _compare(result: SweepResult, better: str, worse: str) -> dict[str, Any]:
    """Mean gap (worse - better, > 0 favours `better`), seed spread (mean of the two seed ranges), and whether every
    seed orders them the same way with a gap beyond the spread."""
    gap = result.mean(worse) - result.mean(better)
    spread = (result.seed_range(better) + result.seed_range(worse)) / 2
    per_seed = [w - b for b, w in zip(result.values(better), result.values(worse))]
    same_sign = all(d > 0 for d in per_seed) or all(d < 0 for d in per_seed)
    return dict(gap=gap, spread=spread, per_seed=per_seed, separated=bool(same_sign and abs(gap) > spread))


def _decide(comparisons: Mapping[str, Mapping[str, Any]]) -> str:
    if all(c["separated"] and c["gap"] > 0 for c in comparisons.values()):
        return "holds"
    if any(c["separated"] and c["gap"] < 0 for c in comparisons.values()):
        return "does not hold at this scale"
    return "inconclusive (within seed spread)"


RELAXED_CLAIM = ("relaxed recursion (shared blocks + per-depth LoRA) beats pure recursion at equal parameters: "
                 "relaxed_2x3 vs recursive_3x2")
MOR_CLAIM = ("at equal training FLOPs, Mixture-of-Recursions reaches a lower validation loss than the vanilla and "
             "the recursive baselines: mor_expert vs vanilla_6 and recursive_2x3")


def relaxed_verdict(result: SweepResult) -> Verdict:
    """The relaxed-recursion claim; the parameter counts must be within 5 % for the comparison to be 'equal'."""
    a, b = result.budget["relaxed_2x3"]["total_params"], result.budget["recursive_3x2"]["total_params"]
    if abs(a - b) > 0.05 * b:
        raise ValueError(f"relaxed_2x3 ({a}) and recursive_3x2 ({b}) do not have equal parameters")
    comparisons = {"recursive_3x2": _compare(result, "relaxed_2x3", "recursive_3x2")}
    verdict = _decide(comparisons)
    c = comparisons["recursive_3x2"]
    reason = (f"relaxed_2x3 {result.mean('relaxed_2x3'):.3f} vs recursive_3x2 {result.mean('recursive_3x2'):.3f} "
              f"nats (gap {c['gap']:+.3f}, seed spread {c['spread']:.3f}); params {a:,} vs {b:,}")
    return Verdict(claim=RELAXED_CLAIM, verdict=verdict, reason=reason,
                   numbers=dict(comparisons=comparisons, params=dict(relaxed_2x3=a, recursive_3x2=b)))


def mor_verdict(result: SweepResult, *, mor: str = "mor_expert") -> Verdict:
    """The MoR claim against vanilla_6 and recursive_2x3 on the same training-FLOP budget."""
    comparisons = {base: _compare(result, mor, base) for base in ("vanilla_6", "recursive_2x3")}
    verdict = _decide(comparisons)
    reason = "; ".join(f"vs {base}: gap {c['gap']:+.3f} (seed spread {c['spread']:.3f}, "
                       f"{'separated' if c['separated'] else 'not separated'})" for base, c in comparisons.items())
    return Verdict(claim=MOR_CLAIM.replace("mor_expert", mor), verdict=verdict, reason=reason,
                   numbers=dict(comparisons=comparisons, mean={v: result.mean(v) for v in result.variants}))


def format_sweep_table(result: SweepResult, *, digits: int = 3) -> str:
    """One row per variant: parameters, forward FLOPs/token, steps, KV entries, loss per seed, mean."""
    head = (f"{'variant':<36}{'params':>9}{'FLOPs/tok':>11}{'steps':>7}{'KV/seq':>8}  "
            + "  ".join(f"seed {s}" for s in result.seeds) + "    mean")
    lines = [head, "-" * len(head)]
    for v in result.variants:
        b = result.budget[v]
        losses = "  ".join(f"{x:>6.{digits}f}" for x in result.values(v))
        lines.append(f"{VARIANT_LABELS.get(v, v):<36}{int(b['total_params']):>9,}{int(b['flops_per_token']):>11,}"
                     f"{int(b['steps']):>7}{int(b['kv_cache_entries']):>8}  {losses}  {result.mean(v):.{digits}f}")
    return "\n".join(lines)


def compare_with_recorded(live: SweepResult, recorded: SweepResult, *, tolerance: float = 0.02) -> list[str]:
    """Differences between a live run and the recording on the live variants and seeds ([] = agree)."""
    problems = []
    rec = recorded.subset(variants=live.variants, seeds=live.seeds)
    for v in live.variants:
        for key in ("total_params", "flops_per_token", "steps"):
            if live.budget[v][key] != rec.budget[v][key]:
                problems.append(f"{v}: {key} {live.budget[v][key]} vs recorded {rec.budget[v][key]}")
        for s in live.seeds:
            a, b = live.val_loss[v][str(s)], rec.val_loss[v][str(s)]
            if abs(a - b) > tolerance:
                problems.append(f"{v} seed {s}: validation loss {a:.4f} vs recorded {b:.4f}")
    return problems


def pareto_points(result: SweepResult) -> dict[str, dict[str, float]]:
    """Per variant: mean and seed range of the loss, training FLOPs and parameters (what the Pareto figure needs)."""
    return {VARIANT_LABELS.get(v, v): dict(loss=result.mean(v), loss_min=min(result.values(v)),
                                           loss_max=max(result.values(v)),
                                           train_flops=result.budget[v]["train_flops"],
                                           params=result.budget[v]["total_params"]) for v in result.variants}


# ----------------------------------------------------------------------------------------------------------------
# From a trained vanilla model: tying and relaxation without training
# ----------------------------------------------------------------------------------------------------------------


def evaluate(model: models.TinyTransformer, *, max_chars: int = 200_000, batches: int = 8,
             batch_size: int = TRAIN_DEFAULTS["batch_size"]) -> float:
    """Validation loss on the lab's fixed validation windows."""
    seq_len = model.config.seq_len
    with one_thread():
        return train.evaluate_lm(model, _splits(max_chars).val, batch_size=batch_size, seq_len=seq_len,
                                 max_batches=batches, seed=0)


@dataclass
class RankCurve:
    """Validation loss and parameters of the relaxed model at each rank (rank 0 = pure recursion), per init."""

    ranks: list[int]
    loss: dict[str, list[float]]
    params: list[int]
    vanilla_loss: float
    vanilla_params: int
    num_recursion: int


def relaxed_rank_curve(vanilla: models.TinyTransformer, *, num_recursion: int = 3,
                       ranks: Sequence[int] = (0, 1, 2, 4, 8, 16, 48),
                       initializations: Sequence[str] = ("stepwise", "average"), batches: int = 8) -> RankCurve:
    """Tie a trained vanilla model into `num_recursion` loops, relax it at each rank with the SVD init and score it
    without any training. LayerNorms stay per depth (`ln_share=False`); biases are tied, so full rank is close to,
    not equal to, the vanilla model."""
    loss: dict[str, list[float]] = {}
    params: list[int] = []
    for init in initializations:
        loss[init] = []
        for r in ranks:
            model = RelaxedRecursiveTransformer.from_vanilla(vanilla, num_recursion=num_recursion, rank=r,
                                                             initialization=init, ln_share=False)
            loss[init].append(evaluate(model, batches=batches))
            if init == initializations[0]:
                params.append(recursion_ledger(model).total)
    return RankCurve(ranks=list(ranks), loss=loss, params=params, vanilla_loss=evaluate(vanilla, batches=batches),
                     vanilla_params=recursion_ledger(vanilla).total, num_recursion=num_recursion)


# ----------------------------------------------------------------------------------------------------------------
# MoR depth per byte, and generation under each KV strategy
# ----------------------------------------------------------------------------------------------------------------


def printable(byte: int) -> str:
    """A byte as one visible character (newline ⏎, tab ⇥, other control or non-ASCII bytes ·)."""
    if byte == 10:
        return "⏎"
    if byte == 9:
        return "⇥"
    return chr(byte) if 32 <= byte < 127 else "·"


def depth_text(model: RecursiveTransformer, text: str) -> tuple[list[str], list[int]]:
    """(characters, recursion depth of each) for `text`, run in windows of the model's seq_len (as in training)."""
    ids = data.ByteTokenizer().encode(text)
    seq_len = model.config.seq_len
    depths: list[int] = []
    was = model.training
    model.eval()
    with torch.no_grad(), one_thread():
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len][None]
            out = model(window)
            depths.extend(out.recursion.depth[0].tolist())
    model.train(was)
    return [printable(int(b)) for b in ids], depths


def corpus_sample(name: str, *, chars: int, offset: int = 0, max_chars: int = 200_000) -> str:
    """`chars` characters of a corpus's validation split (ASCII bytes), from `offset`."""
    val = data.text_corpus(name, max_chars=max_chars).val
    return bytes(val[offset:offset + chars].tolist()).decode("utf-8", errors="replace")


@dataclass
class KVRow:
    """One model/strategy's generation: cache entries and bytes at the end, tokens per second, mean depth."""

    label: str
    kv_cache_entries: int
    kv_cache_bytes: int
    tokens_per_second: float
    mean_depth: float
    same_as_uncached: bool


def kv_benchmark(models_by_label: Mapping[str, RecursiveTransformer], prompt: torch.Tensor, *,
                 max_new_tokens: int, repeats: int = 3) -> list[KVRow]:
    """Greedy cached generation for each model: cache size, best-of-`repeats` tokens/s (noisy on a shared machine),
    and a check that the tokens equal cache-free `models.generate`."""
    rows = []
    with one_thread():
        for label, model in models_by_label.items():
            best = None
            for _ in range(repeats):
                result = generate_cached(model, prompt, max_new_tokens=max_new_tokens)
                if best is None or result.seconds < best.seconds:
                    best = result
            reference = models.generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0)
            rows.append(KVRow(label=label, kv_cache_entries=best.kv_cache_entries,
                              kv_cache_bytes=best.kv_cache_bytes, tokens_per_second=best.tokens_per_second,
                              mean_depth=float(best.depth.float().mean()),
                              same_as_uncached=bool(torch.equal(best.tokens, reference))))
    return rows


def kv_strategy_models(mor: MixtureOfRecursionsTransformer, *, vanilla: models.TinyTransformer | None = None,
                       recursive: RecursiveTransformer | None = None) -> dict[str, RecursiveTransformer]:
    """The models the KV panel compares: the trained MoR under both strategies (copies, causal routing), and the
    vanilla (as a 1-recursion model) and recursive baselines with their plain caches. The MoR was trained with
    recursion-wise attention; running its weights with KV sharing measures the cache, not a KV-sharing-trained
    model's quality."""
    out: dict[str, RecursiveTransformer] = {}
    if vanilla is not None:
        out["vanilla 6 layers"] = RecursiveTransformer.from_vanilla(vanilla, num_recursion=1).eval()
    if recursive is not None:
        out["recursive 2x3"] = recursive.eval()
    for strategy in ("recursion_wise", "kv_sharing"):
        m = copy.deepcopy(mor).eval()
        m.causal_routing = True
        m.kv_strategy = strategy
        out[f"MoR {strategy.replace('_', '-')}"] = m
    return out


# ----------------------------------------------------------------------------------------------------------------
# The recorded sweep
# ----------------------------------------------------------------------------------------------------------------

RECORDED_SEEDS = (0, 1, 2)


@dataclass
class RecordedSweep:
    sweep: SweepResult
    recorded: str
    machine: str
    seconds: float


def recorded_recursive(path: Path | None = None) -> RecordedSweep:
    """The recorded sweep (made by `python -m lablib sweep recursive`)."""
    path = path or RESULTS_DIR / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep recursive` to record it")
    raw = json.loads(path.read_text())
    return RecordedSweep(sweep=SweepResult.from_dict(raw["result"]), recorded=raw["recorded"],
                         machine=raw["machine"], seconds=raw["seconds"])


def record_recursive(path: Path | None = None, *, progress: bool = True) -> Path:
    """Run the isoFLOP sweep (8 variants x 3 seeds, about 10 minutes of CPU on one thread) from scratch (a
    temporary checkpoint cache) and write it with its machine and date."""
    import datetime as dt
    import platform
    import tempfile
    import time

    import lablib

    path = path or RESULTS_DIR / RECORD_FILE
    start = time.perf_counter()
    cpu = time.process_time()
    with tempfile.TemporaryDirectory(prefix="lablib-recursive-sweep-") as tmp:
        result = isoflop_sweep(seeds=RECORDED_SEEDS, progress=progress,
                               checkpoint_cache=cache_mod.CheckpointCache(tmp))
    seconds = time.perf_counter() - start
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, training on 1 torch thread, {platform.platform()}, "
                f"1-minute load average at the end {os.getloadavg()[0]:.2f}, "
                f"CPU time {time.process_time() - cpu:.0f} s",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep recursive",
        seconds=round(seconds, 1),
        result=result.to_dict(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_kv_entries(answer: int, *, seq_len: int, num_unique: int, capacities: Sequence[float],
                     kv_strategy: str) -> bool:
    """KV entries one sequence needs under MoR expert choice: Σ_r k_r · K (recursion-wise) or T · K (sharing)."""
    from lablib.recursive import tokens_at_step

    if kv_strategy == "kv_sharing":
        want = seq_len * num_unique
    else:
        want = sum(tokens_at_step(c, seq_len) for c in capacities) * num_unique
    ok = int(answer) == want
    print("correct" if ok else "not quite: count the tokens each step keeps, times the unique layers")
    return ok


def check_lora_params(answer: int, *, config: models.TransformerConfig, rank: int) -> bool:
    """LoRA parameters of relaxed recursion at `rank` (every Linear of every depth)."""
    from lablib.recursive import rank_parameters

    want = rank_parameters(config, rank=rank)
    ok = int(answer) == want
    print("correct" if ok else "not quite: r (in + out) per matrix, 4 matrices per depth, every depth")
    return ok
