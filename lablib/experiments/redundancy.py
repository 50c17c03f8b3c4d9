"""Lab 08's seeded experiments: how redundant are the layers, sublayers, routers and experts of a trained tiny LM?

One run (`redundancy_run(seed=...)`) trains two byte-level LMs on Shakespeare + Python with the lab's shared trainer,
both 6 layers deep: a dense `TinyTransformer` and an MoE one (8 experts of width 64, top-2, softmax router). Then,
with `lablib.redundancy`:

* the similarity of every attention and MLP sublayer (input vs output of the residual stream) and the CKA between
  the blocks' outputs, on fixed calibration windows of the validation text;
* the validation loss after dropping the k most similar attention sublayers, MLP sublayers or whole blocks
  (k = 0..n_layers), as in *What Matters in Transformers?*;
* UniPool's probe: the loss change when one MoE layer's learned router is replaced by uniform random routing;
* expert merging: every MoE layer's experts merged into G groups (average, Sub-MoE subspace, prune) and the loss.

Everything is JSON (cached by configuration with `lablib.cache`). `record_redundancy` runs three seeds for the verdicts;
the lab re-runs seed 0 live and compares it with the recording.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lablib import cache as cache_mod
from lablib import data, ledger, models, moe, redundancy, train
from lablib.experiments.seeded import one_thread

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = "redundancy.json"

MODEL_DEFAULTS = dict(d_model=64, n_layers=6, n_heads=4, seq_len=64)
MOE_DEFAULTS = dict(num_experts=8, top_k=2, d_hidden=64, router="top_k")
TRAIN_DEFAULTS = dict(steps=300, batch_size=32, lr=2e-3, max_chars=200_000)
CORPORA = ("shakespeare", "python")
# evaluation: the same validation windows for every variant of a model (seed 0 of evaluate_lm)
EVAL_BATCHES = 4
MERGE_EVAL_BATCHES = 4
CALIBRATION_WINDOWS = 16
MERGE_METHODS = ("average", "subspace", "prune")
MERGE_RANK = 16
RECORDED_SEEDS = (0, 1, 2)




# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def model_config(**overrides: Any) -> models.TransformerConfig:
    options = {**MODEL_DEFAULTS, **overrides}
    return models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, **options)


def build_model(kind: str, *, seed: int, model: dict | None = None, moe_options: dict | None = None):
    """The untrained dense (`kind="dense"`) or MoE (`"moe"`) model, seeded."""
    config = model_config(**(model or {}))
    torch.manual_seed(seed)
    if kind == "dense":
        return models.TinyTransformer(config)
    if kind == "moe":
        return moe.MoETransformer(config, ffn_factory=moe.moe_ffn_factory(**{**MOE_DEFAULTS, **(moe_options or {})}))
    raise ValueError(f"kind must be 'dense' or 'moe', got {kind!r}")


@dataclass
class TrainedLM:
    model: models.TinyTransformer
    history: train.History
    param_ledger: ledger.ParamLedger
    from_cache: bool


def train_model(
    kind: str,
    *,
    seed: int = 0,
    model: dict | None = None,
    moe_options: dict | None = None,
    steps: int = TRAIN_DEFAULTS["steps"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    max_chars: int = TRAIN_DEFAULTS["max_chars"],
    progress: bool = False,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
) -> TrainedLM:
    """Train (or load from the cache) one model of the lab on Shakespeare + Python."""
    splits = data.text_corpus(list(CORPORA), max_chars=max_chars)
    run = dict(experiment="redundancy_lm", threads=1, kind=kind, model={**MODEL_DEFAULTS, **(model or {})},
               moe=({**MOE_DEFAULTS, **(moe_options or {})} if kind == "moe" else None), corpora=list(CORPORA),
               max_chars=max_chars, steps=steps, batch_size=batch_size, lr=lr, seed=seed)

    def fit(m) -> dict:
        history = train.train_lm(m, splits, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 eval_every=max(steps // 3, 1), progress=progress)
        return history.to_dict()

    with one_thread():
        trained, meta, from_cache = cache_mod.cached_train(
            run, build=lambda: build_model(kind, seed=seed, model=model, moe_options=moe_options), fit=fit,
            cache=checkpoint_cache)
    trained.eval()
    return TrainedLM(model=trained, history=train.History.from_dict(meta),
                     param_ledger=ledger.ledger(trained, name=f"{kind} LM"), from_cache=from_cache)


def validation_tokens(max_chars: int = TRAIN_DEFAULTS["max_chars"]) -> torch.Tensor:
    return data.text_corpus(list(CORPORA), max_chars=max_chars).val


def val_loss(model: torch.nn.Module, val: torch.Tensor, *, max_batches: int = EVAL_BATCHES) -> float:
    """Validation loss on fixed windows (the same for every variant)."""
    return train.evaluate_lm(model, val, batch_size=32, seq_len=model.config.seq_len, max_batches=max_batches, seed=0)


def calibration_batch(val: torch.Tensor, *, seq_len: int, windows: int = CALIBRATION_WINDOWS) -> torch.Tensor:
    """Fixed calibration windows (B, T) from the validation text (seed 1234, so not the eval windows)."""
    x, _ = data.sample_lm_batch(val, batch_size=windows, seq_len=seq_len,
                                generator=torch.Generator().manual_seed(1234))
    return x


# ----------------------------------------------------------------------------------------------------------------
# The analyses
# ----------------------------------------------------------------------------------------------------------------


def drop_curves(model: models.TinyTransformer, sim: redundancy.LayerSimilarity, val: torch.Tensor) -> dict:
    """Validation loss after dropping the k most similar sublayers of each kind, k = 0..n_layers."""
    n = len(model.blocks)
    base = val_loss(model, val)
    curves = {}
    for kind in redundancy.SUBLAYERS:
        losses = [base]
        for k in range(1, n + 1):
            dropped = redundancy.drop_most_similar(model, sim, kind=kind, k=k)
            losses.append(val_loss(dropped.model, val))
        curves[kind] = dict(order=sim.ranking(kind), loss=losses)
    return curves


def router_probe(model: models.TinyTransformer, val: torch.Tensor, *, seed: int = 0) -> dict:
    """Loss with each MoE layer's router replaced by uniform random routing (one layer at a time)."""
    base = val_loss(model, val)
    layers = redundancy.moe_layer_indices(model)
    losses = [val_loss(redundancy.with_random_router(model, i, seed=seed), val) for i in layers]
    return dict(layers=layers, base=base, loss=losses, delta=[loss - base for loss in losses])


def merge_curves(model: models.TinyTransformer, val: torch.Tensor, calib: torch.Tensor) -> dict:
    """Loss when every MoE layer's experts are merged into G groups, for each method and G = E..1."""
    states = redundancy.hidden_states(model, calib)
    layers = redundancy.moe_layer_indices(model)
    num_experts = model.blocks[layers[0]].ffn.num_routed_experts
    groups = list(range(num_experts, 0, -1))
    similarity = {str(i): redundancy.expert_similarity(model.blocks[i].ffn, states.mid[i]) for i in layers}
    out: dict[str, Any] = dict(groups=groups, layers=layers, similarity=similarity, loss={})
    # G = E leaves every expert alone: the unmerged model's loss
    base = val_loss(model, val, max_batches=MERGE_EVAL_BATCHES)
    for method in MERGE_METHODS:
        losses = [base]
        for g in groups[1:]:
            merged = copy.deepcopy(model)
            for i in layers:
                rank = MERGE_RANK if method == "subspace" else None
                result = redundancy.merge_experts(model.blocks[i].ffn, states.mid[i], num_groups=g, method=method,
                                                  rank=rank)
                merged.blocks[i].ffn = result.layer
            losses.append(val_loss(merged, val, max_batches=MERGE_EVAL_BATCHES))
        out["loss"][method] = losses
    return out


def _analyse(seed: int, *, steps: int, model: dict | None, moe_options: dict | None, progress: bool,
             checkpoint_cache) -> dict:
    val = validation_tokens()
    result: dict[str, Any] = dict(seed=seed)
    for kind in ("dense", "moe"):
        lm = train_model(kind, seed=seed, steps=steps, model=model, moe_options=moe_options, progress=progress,
                         checkpoint_cache=checkpoint_cache)
        calib = calibration_batch(val, seq_len=lm.model.config.seq_len)
        sim = redundancy.layer_similarity(lm.model, calib)
        entry: dict[str, Any] = dict(
            val_loss=val_loss(lm.model, val), train_seconds=lm.history.seconds,
            ledger=lm.param_ledger.as_row(),
            similarity=dict(attention=sim.attention, mlp=sim.mlp, block=sim.block, cka=sim.cka),
            drop=drop_curves(lm.model, sim, val),
        )
        if kind == "moe":
            entry["router_probe"] = router_probe(lm.model, val, seed=seed)
            entry["merge"] = merge_curves(lm.model, val, calib)
        result[kind] = entry
    return result


def redundancy_run(
    *,
    seed: int = 0,
    steps: int = TRAIN_DEFAULTS["steps"],
    model: dict | None = None,
    moe_options: dict | None = None,
    progress: bool = False,
    use_cache: bool = True,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
) -> dict:
    """All of lab 08's numbers for one seed (a JSON dict; see the module docstring). Cached by its configuration;
    computed on one torch thread (`one_thread`).

    `model` / `moe_options` override `MODEL_DEFAULTS` / `MOE_DEFAULTS` (the tests use tiny models)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    config = dict(experiment="redundancy", threads=1, seed=seed, steps=steps,
                  model={**MODEL_DEFAULTS, **(model or {})},
                  moe={**MOE_DEFAULTS, **(moe_options or {})},
                  train={**TRAIN_DEFAULTS, "steps": steps}, eval_batches=EVAL_BATCHES,
                  merge_eval_batches=MERGE_EVAL_BATCHES, calibration_windows=CALIBRATION_WINDOWS,
                  merge_methods=list(MERGE_METHODS), merge_rank=MERGE_RANK)

    def compute() -> dict:
        with one_thread():
            return dict(config=config, **_analyse(seed, steps=steps, model=model, moe_options=moe_options,
                                                  progress=progress, checkpoint_cache=checkpoint_cache))

    if use_cache:
        return cache_mod.cached_json(config, compute, cache=checkpoint_cache)
    return json.loads(json.dumps(compute()))


# ----------------------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """A claim checked against numbers: `verdict` is HOLDS, FAILS or INCONCLUSIVE (the strings below)."""

    claim: str
    verdict: str
    reason: str
    numbers: dict


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold at this scale", "inconclusive (within seed spread)"
DROP_CLAIM = "attention layers are more droppable than MLP layers (dropping the most similar costs less loss)"
ROUTER_CLAIM = "deeper layers' routers are more replaceable by uniform random routing than shallow layers' routers"


def _sign_verdict(claim: str, gaps: Sequence[float], *, what: str, min_gap: float) -> Verdict:
    """Per-seed gaps (> 0 means the claim's side wins): holds if every seed's gap > min_gap, fails if every seed's
    gap < -min_gap, else inconclusive."""
    gaps = list(gaps)
    mean = statistics.fmean(gaps)
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    numbers = dict(gaps=gaps, mean_gap=mean, sd_gap=spread, seeds=len(gaps))
    text = f"{what}: {', '.join(f'{g:+.3f}' for g in gaps)} nats (mean {mean:+.3f}, sd {spread:.3f})"
    if all(g > min_gap for g in gaps):
        return Verdict(claim, HOLDS, f"every seed agrees; {text}", numbers)
    if all(g < -min_gap for g in gaps):
        return Verdict(claim, FAILS, f"every seed disagrees; {text}", numbers)
    return Verdict(claim, INCONCLUSIVE, f"the seeds split or the gap is below {min_gap} nats; {text}", numbers)


def drop_gap(run: dict, *, model: str = "dense", max_k: int | None = None) -> float:
    """Mean over k = 1..max_k (default n_layers // 2) of [loss after dropping k MLPs - after dropping k attentions].

    Positive: attention is cheaper to drop than MLP (the claim's side).
    """
    drop = run[model]["drop"]
    n = len(drop["attention"]["loss"]) - 1
    max_k = n // 2 if max_k is None else max_k
    ks = range(1, max_k + 1)
    return statistics.fmean(drop["mlp"]["loss"][k] - drop["attention"]["loss"][k] for k in ks)


def router_gap(run: dict, *, skip: int = 0) -> float:
    """Mean probe loss increase of the shallow half of the MoE layers minus that of the deep half, leaving out the
    first `skip` layers (with an odd count the middle layer is left out too).

    Positive: deep routers are more replaceable (the claim's side).
    """
    delta = run["moe"]["router_probe"]["delta"][skip:]
    half = len(delta) // 2
    return statistics.fmean(delta[:half]) - statistics.fmean(delta[len(delta) - half:])


def drop_verdict(runs: Sequence[dict], *, model: str = "dense", min_gap: float = 0.01) -> Verdict:
    gaps = [drop_gap(r, model=model) for r in runs]
    return _sign_verdict(DROP_CLAIM, gaps, what=f"MLP-drop minus attention-drop loss ({model}, k=1..L/2)",
                         min_gap=min_gap)


def router_verdict(runs: Sequence[dict], *, min_gap: float = 0.01, skip: int = 0) -> Verdict:
    gaps = [router_gap(r, skip=skip) for r in runs]
    what = "shallow-half minus deep-half probe loss increase" + (f" (first {skip} layer(s) left out)" if skip else "")
    return _sign_verdict(ROUTER_CLAIM, gaps, what=what, min_gap=min_gap)


# ----------------------------------------------------------------------------------------------------------------
# Recording and comparing
# ----------------------------------------------------------------------------------------------------------------


def recorded_redundancy(path: Path | None = None) -> list[dict]:
    """The recorded runs, one per seed (made by `python -m lablib sweep redundancy`)."""
    path = path or RESULTS_DIR / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep redundancy` to record it")
    return json.loads(path.read_text())["result"]["runs"]


def compare_with_recorded(live: dict, recorded: Sequence[dict], *, tolerance: float = 0.05,
                          max_k: int = 2) -> list[str]:
    """Differences between a live run and the recorded run of the same seed ([] = agree).

    Checked within `tolerance` nats: both models' validation loss, the losses after dropping k = 1..`max_k`
    sublayers of each kind, and every router-probe loss. Deeper drops are not compared: a different number of
    threads (or another CPU) changes the trained weights in their last bits, and removing most of the network
    magnifies that into tenths of a nat (and can swap the similarity order of two near-equal layers).
    """
    match = [r for r in recorded if r["seed"] == live["seed"]]
    if not match:
        raise KeyError(f"no recorded run for seed {live['seed']}")
    rec = match[0]
    problems = []

    def close(label: str, a: float, b: float) -> None:
        if abs(a - b) > tolerance:
            problems.append(f"{label}: {a:.3f} vs recorded {b:.3f}")

    for kind in ("dense", "moe"):
        close(f"{kind} val loss", live[kind]["val_loss"], rec[kind]["val_loss"])
        for sub in redundancy.SUBLAYERS:
            pairs = zip(live[kind]["drop"][sub]["loss"], rec[kind]["drop"][sub]["loss"])
            for k, (a, b) in enumerate(pairs):
                if 1 <= k <= max_k:
                    close(f"{kind} drop {k} {sub}", a, b)
    for i, (a, b) in enumerate(zip(live["moe"]["router_probe"]["loss"], rec["moe"]["router_probe"]["loss"])):
        close(f"router probe layer {i}", a, b)
    return problems


def record_redundancy(path: Path | None = None, *, progress: bool = True) -> Path:
    """Run the three recorded seeds (a few minutes on 2 cores) and write them with the machine and date."""
    import datetime as dt
    import os
    import platform

    import lablib

    path = path or RESULTS_DIR / RESULTS_FILE
    runs = []
    for seed in RECORDED_SEEDS:
        runs.append(redundancy_run(seed=seed, progress=progress, use_cache=False))
        if progress:
            print(f"seed {seed}: dense {runs[-1]['dense']['val_loss']:.3f}, moe {runs[-1]['moe']['val_loss']:.3f}",
                  flush=True)
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, one torch thread, {platform.platform()}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep redundancy",
        result=dict(seeds=list(RECORDED_SEEDS), runs=runs),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_most_droppable(answer: int, run: dict, *, kind: str, model: str = "dense") -> bool:
    """Exercise: which layer's `kind` sublayer does the similarity rank as the most redundant?"""
    expected = run[model]["drop"][kind]["order"][0]
    ok = answer == expected
    print("correct" if ok else f"not quite: look for the highest {kind} similarity")
    return ok


def check_merge_budget(answer: int, run: dict, *, method: str, max_increase: float) -> bool:
    """Exercise: the fewest experts per layer whose merged loss stays within `max_increase` of the unmerged model."""
    merge = run["moe"]["merge"]
    base = merge["loss"][method][0]
    ok_groups = [g for g, loss in zip(merge["groups"], merge["loss"][method]) if loss - base <= max_increase]
    expected = min(ok_groups)
    ok = answer == expected
    print("correct" if ok else f"not quite: read the {method} curve against the unmerged loss {base:.3f}")
    return ok
