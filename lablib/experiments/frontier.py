"""Lab 09's sweep: every technique of the earlier labs on one task, counted by one ledger: the parameter-accuracy
frontier.

**Task.** Byte-level language modelling of Shakespeare + Python (lab 00's data), validation loss on fixed windows.
Every point sees the same number of training tokens, `TASK["steps"]` batches:

* *from scratch* (dense models, MoE, UniPool, randomized parameter sharing): `steps` updates;
* *compressed from the dense baseline* (magnitude pruning, N:M, recursive, relaxed recursive, Mixture-of-Recursions):
  the dense d_model-64 model is trained `base_steps` updates, compressed, then retrained `steps - base_steps`
  updates with the compression in place (masks held at 0, tied blocks, per-depth LoRA, routed depths);
* *adapters* (LoRA): the dense model is trained `base_steps` updates on Shakespeare only, frozen, and a LoRA is
  trained on the mix for `steps - base_steps` updates. The adapter is all that a new task adds to storage, but one
  model still stores its base: the point sits at base + adapter on the chart, and the table lists the adapter alone.

**Counting.** `lablib.ledger` for every point: `stored` (numbers to save: pruned entries are not stored, mask bits
are not counted; tied blocks count once) and `flops_per_token` (forward FLOPs per token: a recursive model pays for
every application of its blocks, an MoE only for its routed experts, pruned weights save their multiply-adds).

**Resumable.** Every point is cached as JSON by the hash of its configuration (`lablib.cache.cached_json`) and the
dense base models as safetensors (`cached_train`), so an interrupted sweep picks up where it stopped: finished points
are read back, never recomputed. `python -m lablib frontier` runs the sweep and writes
`lablib/experiments/results/frontier.json`; lab 09 re-runs a small live subset against it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lablib import adapters, data, ledger, models, moe, pools, recursive, sparse, train
from lablib import cache as cache_mod
from lablib.experiments.seeded import one_thread

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = "frontier.json"

TASK: dict[str, Any] = dict(
    corpora=["shakespeare", "python"], max_chars=200_000, d_model=64, n_layers=4, n_heads=4, seq_len=64,
    batch_size=32, lr=2e-3, steps=400, base_steps=300, eval_batches=8, seed=0,
)

# family -> how the point is made (see the module docstring)
FAMILIES = {
    "dense": "dense (from scratch)",
    "magnitude": "magnitude pruning, global (from dense)",
    "nm": "N:M semi-structured (from dense)",
    "recursive": "recursive, tied blocks (from dense)",
    "relaxed": "relaxed recursive, per-depth LoRA (from dense)",
    "mor": "Mixture-of-Recursions, expert choice (from dense)",
    "moe": "mixture of experts (from scratch)",
    "unipool": "UniPool, one expert pool for all layers (from scratch)",
    "rps": "randomized parameter sharing, STABLE-RPS (from scratch)",
    "lora": "LoRA adapter on a frozen base",
}

POINTS: list[dict[str, Any]] = [
    dict(name="dense d64", method="dense"),
    dict(name="dense d48", method="dense", d_model=48),
    dict(name="dense d32", method="dense", d_model=32),
    dict(name="dense d64, 2 layers", method="dense", n_layers=2),
    dict(name="magnitude 50%", method="magnitude", density=0.5),
    dict(name="magnitude 25%", method="magnitude", density=0.25),
    dict(name="N:M 2:4", method="nm", n=2, m=4),
    dict(name="recursive 2 blocks x2", method="recursive", num_recursion=2),
    dict(name="relaxed 2 blocks x2, r=8", method="relaxed", num_recursion=2, rank=8),
    dict(name="MoR 2 blocks x2, expert choice", method="mor", num_recursion=2),
    dict(name="MoE 4 experts, top-1", method="moe", num_experts=4, top_k=1),
    dict(name="MoE 8x64, top-2", method="moe", num_experts=8, top_k=2, d_hidden=64),
    dict(name="UniPool 8x64 pool, top-2", method="unipool", pool_size=8, top_k=2, d_hidden=64),
    dict(name="RPS 50%", method="rps", compression=0.5),
    dict(name="RPS 25%", method="rps", compression=0.25),
    dict(name="LoRA r=8 on a Shakespeare base", method="lora", r=8),
]

# techniques of earlier labs that are not on the frontier yet, and why (printed by lab 09)
NOT_YET: dict[str, str] = {}

LIVE_POINTS = ("dense d32", "magnitude 50%")
LIVE_TOLERANCE = 0.05




# ----------------------------------------------------------------------------------------------------------------
# Building and training one point
# ----------------------------------------------------------------------------------------------------------------


def _config(task: Mapping[str, Any], **overrides: Any) -> models.TransformerConfig:
    keys = ("d_model", "n_layers", "n_heads", "seq_len")
    options = {k: overrides.get(k, task[k]) for k in keys}
    return models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, **options)


def _splits(task: Mapping[str, Any], corpora: Sequence[str] | None = None) -> data.TextSplits:
    return data.text_corpus(list(corpora or task["corpora"]), max_chars=task["max_chars"])


def _fit(model, splits, task: Mapping[str, Any], *, steps: int, progress: bool) -> train.History:
    return train.train_lm(model, splits, steps=steps, batch_size=task["batch_size"], seq_len=task["seq_len"],
                          lr=task["lr"], seed=task["seed"], progress=progress)


def _val_loss(model, val: torch.Tensor, task: Mapping[str, Any]) -> float:
    return train.evaluate_lm(model, val, batch_size=32, seq_len=task["seq_len"], max_batches=task["eval_batches"],
                             seed=0)


def dense_base(task: Mapping[str, Any], *, corpora: Sequence[str] | None = None, progress: bool = False,
               checkpoint_cache: cache_mod.CheckpointCache | None = None) -> models.TinyTransformer:
    """The dense model the compressed points start from: `base_steps` updates (cached as safetensors)."""
    corpora = list(corpora or task["corpora"])
    config = _config(task)
    run = dict(experiment="frontier_base", task={k: v for k, v in task.items() if k != "steps"}, corpora=corpora)

    def build():
        torch.manual_seed(task["seed"])
        return models.TinyTransformer(config)

    model, _, _ = cache_mod.cached_train(
        run, build=build, fit=lambda m: _fit(m, _splits(task, corpora), task, steps=task["base_steps"],
                                             progress=progress).to_dict(),
        cache=checkpoint_cache)
    return model


def _row(point: Mapping[str, Any], row: ledger.ParamLedger, *, val_loss: float, seconds: float,
         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return dict(name=point["name"], method=point["method"], family=FAMILIES[point["method"]], val_loss=val_loss,
                total=row.total, active_per_token=row.active_per_token, stored=row.stored, trainable=row.trainable,
                flops_per_token=row.flops_per_token, notes=row.notes, seconds=seconds, **(extra or {}))


def compute_point(point: Mapping[str, Any], task: Mapping[str, Any], *, progress: bool = False,
                  checkpoint_cache: cache_mod.CheckpointCache | None = None) -> dict[str, Any]:
    """Train and measure one point of the frontier (uncached; `frontier_sweep` caches it)."""
    method = point["method"]
    if method not in FAMILIES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(FAMILIES)}")
    start = time.perf_counter()
    splits = _splits(task)
    retrain = task["steps"] - task["base_steps"]

    def lm_batches():
        return data.lm_batches(splits.train, batch_size=task["batch_size"], seq_len=task["seq_len"], seed=task["seed"])

    extra: dict[str, Any] = {}
    if method == "dense":
        config = _config(task, **{k: point[k] for k in ("d_model", "n_layers") if k in point})
        torch.manual_seed(task["seed"])
        model = models.TinyTransformer(config)
        _fit(model, splits, task, steps=task["steps"], progress=progress)
        row = ledger.ledger(model)
    elif method == "moe":
        config = _config(task)
        factory = moe.moe_ffn_factory(num_experts=point["num_experts"], top_k=point["top_k"],
                                      d_hidden=point.get("d_hidden"))
        torch.manual_seed(task["seed"])
        model = moe.MoETransformer(config, ffn_factory=factory)
        _fit(model, splits, task, steps=task["steps"], progress=progress)
        row = ledger.ledger(model)
    elif method == "unipool":
        torch.manual_seed(task["seed"])
        model = pools.UniPoolTransformer(_config(task), pool_size=point["pool_size"], top_k=point["top_k"],
                                         d_hidden=point.get("d_hidden"))
        _fit(model, splits, task, steps=task["steps"], progress=progress)
        row = ledger.ledger(model)
    elif method == "rps":
        torch.manual_seed(task["seed"])
        # every >= 2-D weight (embeddings included) read from one hashed array of compression x their count
        model = pools.RandomizedSharing(models.TinyTransformer(_config(task)), compression=point["compression"],
                                        seed=task["seed"])
        _fit(model, splits, task, steps=task["steps"], progress=progress)
        row = ledger.ledger(model)
    elif method in ("magnitude", "nm"):
        base = dense_base(task, progress=progress, checkpoint_cache=checkpoint_cache)
        if method == "magnitude":
            mask = sparse.magnitude_mask(base, density=point["density"], scope="global").mask
        else:
            mask = sparse.nm_mask(base, n=point["n"], m=point["m"]).mask
        result = sparse.masked_train(base, mask=mask, batches=lm_batches, loss_fn=train.lm_loss, steps=retrain,
                                     lr=task["lr"], seed=task["seed"], progress=progress)
        model, row = result.model, result.ledger
        extra["density"] = mask.density
    elif method in ("recursive", "relaxed", "mor"):
        base = dense_base(task, progress=progress, checkpoint_cache=checkpoint_cache)
        if method == "recursive":
            model = recursive.RecursiveTransformer.from_vanilla(base, num_recursion=point["num_recursion"])
        elif method == "relaxed":
            model = recursive.RelaxedRecursiveTransformer.from_vanilla(base, num_recursion=point["num_recursion"],
                                                                        rank=point["rank"])
        else:
            model = recursive.MixtureOfRecursionsTransformer.from_vanilla(
                base, num_recursion=point["num_recursion"], routing=point.get("routing", "expert_choice"))
        _fit(model, splits, task, steps=retrain, progress=progress)
        # parameters once (tied), FLOPs per token actually spent (every application; MoR: its capacities)
        row = recursive.recursion_ledger(model).params()
    else:  # lora
        base = dense_base(task, corpora=["shakespeare"], progress=progress, checkpoint_cache=checkpoint_cache)
        torch.manual_seed(task["seed"])
        config = adapters.LoraConfig(r=point["r"], alpha=2.0 * point["r"], target_modules=["qkv", "proj", "fc"])
        model = adapters.attach_adapters(base, config)
        _fit(model, splits, task, steps=retrain, progress=progress)
        row = ledger.ledger(model)
        adapter_row = adapters.adapter_ledger(model)
        extra["adapter_stored"] = adapter_row.stored
        extra["base_only_val_loss"] = _val_loss(base, splits.val, task)
    return _row(point, row, val_loss=_val_loss(model, splits.val, task), seconds=time.perf_counter() - start,
                extra=extra)


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FrontierResult:
    """The sweep's rows (one dict per point, in the order asked) and which of them this call computed."""

    rows: list[dict[str, Any]]
    task: dict[str, Any]
    computed: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no point named {name!r}; points: {[r['name'] for r in self.rows]}")


def point_config(point: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """What a point's cache key is the hash of: the point, the task and the schema of this sweep."""
    return dict(experiment="frontier_point", version=1, point=dict(point), task=dict(task))


def _check_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    points = [dict(p) for p in points]
    if not points:
        raise ValueError("the frontier needs at least one point")
    names = [p.get("name") for p in points]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"every point needs a unique non-empty name, got {names}")
    for p in points:
        if p.get("method") not in FAMILIES:
            raise ValueError(f"point {p['name']!r} has unknown method {p.get('method')!r}; choose one of "
                             f"{sorted(FAMILIES)}")
    return points


def frontier_sweep(
    points: Sequence[Mapping[str, Any]] | None = None,
    *,
    task: Mapping[str, Any] | None = None,
    progress: bool = False,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
    compute: Callable[..., dict[str, Any]] | None = None,
) -> FrontierResult:
    """Run (or read back from the cache) every point; interrupted sweeps resume at the first unfinished point.
    Each point is computed on one torch thread (`one_thread`), so live re-runs repeat the recording bit for bit.

    `compute(point, task, progress=..., checkpoint_cache=...)` defaults to `compute_point` (the tests swap it).
    """
    points = _check_points(POINTS if points is None else points)
    task = dict(TASK if task is None else task)
    compute = compute or compute_point
    rows, computed = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc="frontier points", leave=True)
    try:
        for point in points:
            def run(point=point) -> dict[str, Any]:
                computed.append(point["name"])
                with one_thread():
                    return compute(point, task, progress=progress, checkpoint_cache=checkpoint_cache)

            rows.append(cache_mod.cached_json(point_config(point, task), run, cache=checkpoint_cache))
            if bar is not None:
                bar.set_postfix_str(f"{point['name']}: {rows[-1]['val_loss']:.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return FrontierResult(rows=rows, task=task, computed=computed)


# ----------------------------------------------------------------------------------------------------------------
# Reading the frontier
# ----------------------------------------------------------------------------------------------------------------

AXES = {"stored": "stored parameters", "flops_per_token": "forward FLOPs per token"}


def _check_axis(x: str) -> str:
    if x not in AXES:
        raise ValueError(f"x must be one of {sorted(AXES)}, got {x!r}")
    return x


def pareto_front(rows: Sequence[Mapping[str, Any]], *, x: str = "stored") -> list[str]:
    """Names of the points no other point beats on both `x` (lower is better) and val_loss (lower is better),
    sorted by x. Ties on x keep the lower loss."""
    _check_axis(x)
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r[x], r["val_loss"])):
        if r["val_loss"] < best:
            front.append(r["name"])
            best = r["val_loss"]
    return front


def best_at_budget(rows: Sequence[Mapping[str, Any]], budget: float, *, x: str = "stored") -> dict[str, Any] | None:
    """The lowest-loss point with `x` <= budget (ties: the cheaper one), or None when nothing fits."""
    _check_axis(x)
    fitting = [r for r in rows if r[x] <= budget]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (r["val_loss"], r[x]))


def budget_table(rows: Sequence[Mapping[str, Any]], budget: float, *, x: str = "stored") -> str:
    """Text: the points within budget, best first, marking the winner."""
    _check_axis(x)
    fitting = sorted((r for r in rows if r[x] <= budget), key=lambda r: (r["val_loss"], r[x]))
    if not fitting:
        return f"nothing fits in {budget:,.0f} {AXES[x]}"
    lines = [f"within {budget:,.0f} {AXES[x]}: best is {fitting[0]['name']} (val loss {fitting[0]['val_loss']:.3f})"]
    lines += [f"  {r['val_loss']:.3f}  {r[x]:>11,}  {r['name']}" for r in fitting]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The papers' claims, read off the frontier
# ----------------------------------------------------------------------------------------------------------------

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold at this scale", "inconclusive (within seed spread)"
# one seed per point: a gap smaller than this is within the seed-to-seed spread of these models (lab 08 measured a
# standard deviation of about 0.04 nats for a 6-layer model across three seeds)
MARGIN = 0.05


@dataclass
class Verdict:
    claim: str
    verdict: str
    reason: str
    gap: float | None


def dense_loss_at(rows: Sequence[Mapping[str, Any]], value: float, *, x: str = "stored") -> float | None:
    """The from-scratch dense models' loss at `x` = value, interpolated linearly in log(x) between the two dense
    points around it; None outside their range (no extrapolation)."""
    _check_axis(x)
    # the width family: dense d32 / d48 / d64, all 4 layers deep
    dense = sorted((r[x], r["val_loss"]) for r in rows if r["method"] == "dense" and r["name"].startswith("dense d")
                   and "layers" not in r["name"])
    for (x0, y0), (x1, y1) in zip(dense, dense[1:]):
        if x0 <= value <= x1:
            t = 0.0 if x1 == x0 else (math.log(value) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def _decide(claim: str, gap: float | None, what: str, margin: float) -> Verdict:
    """gap > 0: the claim's side wins by that many nats."""
    if gap is None:
        return Verdict(claim, INCONCLUSIVE, f"{what}: outside the range the baseline covers", None)
    text = f"{what}: {gap:+.3f} nats (margin {margin})"
    if gap > margin:
        return Verdict(claim, HOLDS, text, gap)
    if gap < -margin:
        return Verdict(claim, FAILS, text, gap)
    return Verdict(claim, INCONCLUSIVE, text, gap)


def frontier_verdicts(rows: Sequence[Mapping[str, Any]], *, margin: float = MARGIN) -> list[Verdict]:
    """The papers' orderings checked on the recorded points (positive gap = the claimed winner has lower loss).

    Comparisons with "a smaller dense model at equal memory" interpolate the dense d32/d48/d64 curve at the method's
    stored count; the others compare two named points.
    """
    by = {r["name"]: r for r in rows}
    out = []

    def at_equal_stored(name: str, claim: str) -> None:
        if name in by:
            dense = dense_loss_at(rows, by[name]["stored"])
            gap = None if dense is None else dense - by[name]["val_loss"]
            out.append(_decide(claim, gap, f"dense at {by[name]['stored']:,} stored minus {name}", margin))

    at_equal_stored("RPS 50%", "RPS beats a smaller dense model at equal memory (In defense of parameter sharing)")
    at_equal_stored("RPS 25%", "RPS beats a smaller dense model at high compression (In defense of parameter sharing)")
    at_equal_stored("magnitude 50%", "pruning a trained model beats training a smaller one at equal stored parameters")
    pairs = [
        ("recursive 2 blocks x2", "dense d64, 2 layers",
         "looping 2 tied blocks twice beats the 2-layer dense model with the same stored parameters"),
        ("relaxed 2 blocks x2, r=8", "recursive 2 blocks x2",
         "relaxed recursion beats pure recursion (Relaxed Recursive Transformers)"),
        ("MoR 2 blocks x2, expert choice", "recursive 2 blocks x2",
         "Mixture-of-Recursions beats full recursion while spending fewer FLOPs (Mixture-of-Recursions)"),
        ("UniPool 8x64 pool, top-2", "MoE 8x64, top-2",
         "a shared pool with 4x fewer experts matches or beats per-layer MoE (UniPool)"),
        ("MoE 4 experts, top-1", "dense d64",
         "an MoE beats the dense model of the same FLOPs per token (Switch Transformers)"),
    ]
    for winner, loser, claim in pairs:
        if winner in by and loser in by:
            out.append(_decide(claim, by[loser]["val_loss"] - by[winner]["val_loss"], f"{loser} minus {winner}",
                               margin))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Recording and the live check
# ----------------------------------------------------------------------------------------------------------------


def recorded_frontier(path: Path | None = None) -> FrontierResult:
    """The recorded sweep (made by `python -m lablib frontier`)."""
    path = path or RESULTS_DIR / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib frontier` to record it")
    raw = json.loads(path.read_text())["result"]
    return FrontierResult(rows=raw["rows"], task=raw["task"])


def live_subset(names: Sequence[str] = LIVE_POINTS, *, progress: bool = False,
                checkpoint_cache: cache_mod.CheckpointCache | None = None) -> FrontierResult:
    """Re-run some of the recorded points with the recorded task (cached like the sweep)."""
    by_name = {p["name"]: p for p in POINTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown points {unknown}; points: {list(by_name)}")
    return frontier_sweep([by_name[n] for n in names], progress=progress, checkpoint_cache=checkpoint_cache)


def compare_with_recorded(live: FrontierResult, recorded: FrontierResult, *,
                          tolerance: float = LIVE_TOLERANCE) -> list[str]:
    """Differences between live points and the recorded ones ([] = same counts, losses within `tolerance`)."""
    problems = []
    if live.task != recorded.task:
        problems.append(f"the task differs from the recorded one: {live.task} vs {recorded.task}")
    for row in live.rows:
        rec = recorded.row(row["name"])
        for key in ("stored", "flops_per_token", "total"):
            if row[key] != rec[key]:
                problems.append(f"{row['name']}: {key} {row[key]:,} vs recorded {rec[key]:,}")
        if abs(row["val_loss"] - rec["val_loss"]) > tolerance:
            problems.append(f"{row['name']}: val loss {row['val_loss']:.3f} vs recorded {rec['val_loss']:.3f}")
    return problems


def record_frontier(path: Path | None = None, *, progress: bool = True,
                    points: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Run the whole sweep (resuming from the cache) and write it with the machine and date."""
    import datetime as dt
    import os
    import platform

    import lablib

    path = path or RESULTS_DIR / RESULTS_FILE
    result = frontier_sweep(points, progress=progress)
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, one torch thread, {platform.platform()}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib frontier",
        not_yet_on_the_frontier=NOT_YET,
        result=dict(task=result.task, rows=result.rows),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def check_best_at_budget(answer: str, rows: Sequence[Mapping[str, Any]], budget: float, *, x: str = "stored") -> bool:
    """Exercise: name the best point within a budget."""
    best = best_at_budget(rows, budget, x=x)
    expected = None if best is None else best["name"]
    ok = answer == expected
    print("correct" if ok else "not quite: filter the points within the budget, then take the lowest loss")
    return ok
