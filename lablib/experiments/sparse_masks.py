"""Lab 06's experiments: sparse masks on the tiny byte-level LM, each one a seeded, cached run of `lablib.sparse`.

**Task.** The same task and dense model as lab 09 (`frontier.TASK`: byte-level Shakespeare + Python, d_model 64,
4 layers), so the pruning numbers here sit on lab 09's parameter-accuracy chart:

* *one-shot pruning* of the trained dense model at a range of densities, no retraining: magnitude (per tensor and
  global), Wanda (|W| times the input norm, per output row) and a random mask as the floor;
* *N:M (2:4)*: magnitude, Wanda and a MaskLLM-style learned mask (weights frozen, only the pattern logits train);
* *fine-tuning* a model trained on Shakespeare only to Python: every parameter vs FISH's 0.5 % (top Fisher
  information) vs a random 0.5 % mask (the control FISH must beat);
* *grafting*: the entries of the full fine-tune that moved most, copied onto the base, at fractions from 0.05 % up.

Every result is cached by its configuration (`lablib.cache`); `record_sparse_masks` runs three seeds into
`results/sparse_masks.json` (`python -m lablib sweep sparse-masks`) and the lab re-runs seed 0 against it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lablib import cache as cache_mod
from lablib import data, sparse, train
from lablib.experiments import frontier
from lablib.experiments.foundations import Verdict
from lablib.experiments.seeded import one_thread

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_FILE = "sparse_masks.json"

TASK: dict[str, Any] = dict(frontier.TASK)
DENSITIES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
ONE_SHOT_METHODS = ("magnitude/layer", "magnitude/global", "wanda", "random")
NM_METHODS = ("magnitude 2:4", "wanda 2:4", "learned 2:4")
# the sparse-vs-full fine-tuning setup: Shakespeare base -> Python, the same number of steps for every method
FINETUNE = dict(source="shakespeare", target="python", steps=100, lr=2e-3, fish_density=0.005, fisher_batches=8)
LEARNED_NM = dict(steps=100, lr=5e-3)  # lablib.sparse.learned_nm_mask's default step size
CALIBRATION_BATCHES = 8
GRAFT_FRACTIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RECORDED_SEEDS = (0, 1, 2)
THREADS = 1  # every run uses one torch thread (`one_thread`): a run then repeats bit for bit on one machine, whatever its load
LIVE_PARTS = ("one_shot", "nm")  # what the lab re-runs (seed 0): one base model, no fine-tuning
LIVE_TOLERANCE = 0.02  # nats; covers another CPU's last bits (same machine, same threads: identical)
MOST = 0.5  # "recovers most of the fine-tune": at least half of the loss improvement
TINY = 0.01  # "a tiny fraction of the weights": at most 1 %
MATCH = 0.05  # nats: "matches" = within about the seed-to-seed spread of these models (lab 08, lab 09)


# ----------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------


def _task(seed: int) -> dict[str, Any]:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return {**TASK, "seed": seed}


def base_model(*, seed: int = 0, corpora: Sequence[str] | None = None,
               checkpoint_cache: cache_mod.CheckpointCache | None = None):
    """The trained dense LM every experiment starts from: lab 09's dense base (`frontier.dense_base`, cached)."""
    return frontier.dense_base(_task(seed), corpora=corpora, checkpoint_cache=checkpoint_cache)


def splits(corpora: Sequence[str] | None = None) -> data.TextSplits:
    return data.text_corpus(list(corpora or TASK["corpora"]), max_chars=TASK["max_chars"])


def val_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Validation loss on lab 09's fixed windows (`eval_batches` batches, seed 0)."""
    return train.evaluate_lm(model, tokens, batch_size=32, seq_len=TASK["seq_len"], max_batches=TASK["eval_batches"],
                             seed=0)


def batches(tokens: torch.Tensor, *, seed: int):
    """A zero-argument factory of the endless seeded batch stream (each training phase draws a fresh stream)."""
    return lambda: data.lm_batches(tokens, batch_size=TASK["batch_size"], seq_len=TASK["seq_len"], seed=seed)


def calibration(tokens: torch.Tensor, *, seed: int) -> list:
    """`CALIBRATION_BATCHES` input batches for Wanda (inputs only: Wanda needs activations, not labels)."""
    stream = data.lm_batches(tokens, batch_size=TASK["batch_size"], seq_len=TASK["seq_len"], seed=seed + 1000)
    return [next(stream)[0] for _ in range(CALIBRATION_BATCHES)]


def random_mask(model: torch.nn.Module, *, density: float, seed: int) -> sparse.Mask:
    """The floor every pruning criterion must beat: a uniformly random `density` of each prunable tensor."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    scores = {name: torch.rand(params[name].shape, generator=generator) for name in sparse.prunable_names(model)}
    return sparse.mask_from_scores(scores, density=density, scope="layer")


def one_shot_mask(model: torch.nn.Module, method: str, *, density: float, calib: list, seed: int) -> sparse.Mask:
    """The mask of one one-shot `method` (see `ONE_SHOT_METHODS`) at `density`, from the trained `model`."""
    if method == "magnitude/layer":
        return sparse.magnitude_mask(model, density=density, scope="layer").mask
    if method == "magnitude/global":
        return sparse.magnitude_mask(model, density=density, scope="global").mask
    if method == "wanda":
        return sparse.wanda_mask(model, batches=calib, num_batches=len(calib), density=density).mask
    if method == "random":
        return random_mask(model, density=density, seed=seed)
    raise ValueError(f"unknown one-shot method {method!r}; known: {', '.join(ONE_SHOT_METHODS)}")


# ----------------------------------------------------------------------------------------------------------------
# The three experiments of one seed
# ----------------------------------------------------------------------------------------------------------------


def one_shot_curves(model: torch.nn.Module, *, val: torch.Tensor, calib: list, seed: int,
                    densities: Sequence[float] = DENSITIES) -> dict[str, list[float]]:
    """Validation loss of the pruned model (no retraining) per method and density: {method: [loss per density]}."""
    curves: dict[str, list[float]] = {}
    for method in ONE_SHOT_METHODS:
        curves[method] = [val_loss(one_shot_mask(model, method, density=d, calib=calib, seed=seed).apply(model), val)
                          if d < 1.0 else val_loss(model, val) for d in densities]
    return curves


def nm_losses(model: torch.nn.Module, *, tokens: torch.Tensor, val: torch.Tensor, calib: list,
              seed: int) -> dict[str, Any]:
    """2:4 masks three ways, all one-shot on frozen weights: magnitude, Wanda, learned (MaskLLM-style)."""
    magnitude = sparse.nm_mask(model, n=2, m=4).mask
    wanda = sparse.wanda_mask(model, batches=calib, num_batches=len(calib), n=2, m=4).mask
    learned = sparse.learned_nm_mask(model, batches=batches(tokens, seed=seed), loss_fn=train.lm_loss,
                                     steps=LEARNED_NM["steps"], lr=LEARNED_NM["lr"], n=2, m=4, seed=seed,
                                     progress=False)
    masks = {"magnitude 2:4": magnitude, "wanda 2:4": wanda, "learned 2:4": learned.mask}
    for label, mask in masks.items():  # every mask compared here is a valid 2:4 mask of every prunable weight
        bad = [name for name in sparse.prunable_names(model) if not sparse.is_nm_mask(mask[name], n=2, m=4)]
        if bad:
            raise RuntimeError(f"the {label} mask is not 2:4 on {bad}")
    # how far the learned pattern moved from its magnitude prior: the share of groups of 4 whose pattern changed
    changed = sum(int((learned.mask[n] != magnitude[n]).reshape(-1, 4).any(dim=-1).sum()) for n in magnitude)
    groups = sum(magnitude[n].numel() // 4 for n in magnitude)
    return dict(losses={k: val_loss(mask.apply(model), val) for k, mask in masks.items()},
                changed_groups=changed / groups)


def finetune_runs(*, seed: int, checkpoint_cache: cache_mod.CheckpointCache | None = None,
                  graft_fractions: Sequence[float] = GRAFT_FRACTIONS) -> dict[str, Any]:
    """Shakespeare base -> Python: full fine-tune vs FISH (top 0.5 % by Fisher) vs a random 0.5 % mask, and grafting
    the full fine-tune onto the base at `graft_fractions`. Losses on Python validation text."""
    base = base_model(seed=seed, corpora=[FINETUNE["source"]], checkpoint_cache=checkpoint_cache)
    target = splits([FINETUNE["target"]])
    stream = batches(target.train, seed=seed)
    steps, lr = FINETUNE["steps"], FINETUNE["lr"]
    full_model = _copy(base)  # train_lm trains in place
    train.train_lm(full_model, target, steps=steps, batch_size=TASK["batch_size"], seq_len=TASK["seq_len"], lr=lr,
                   seed=seed, progress=False)
    fish = sparse.fish_mask(base, batches=stream(), loss_fn=train.lm_loss, num_batches=FINETUNE["fisher_batches"],
                            density=FINETUNE["fish_density"])
    fish_run = sparse.sparse_finetune(base, mask=fish.mask, batches=stream, loss_fn=train.lm_loss, steps=steps,
                                      lr=lr, seed=seed, progress=False)
    control = sparse.global_top_k({n: torch.rand(t.shape, generator=torch.Generator().manual_seed(seed))
                                   for n, t in fish.mask.items()}, k=fish.stats.total_kept)
    control_run = sparse.sparse_finetune(base, mask=control, batches=stream, loss_fn=train.lm_loss, steps=steps,
                                         lr=lr, seed=seed, progress=False)
    base_loss, full_loss = val_loss(base, target.val), val_loss(full_model, target.val)
    graft_losses = []
    for fraction in graft_fractions:
        grafted = _copy(base)
        grafted.load_state_dict(sparse.graft(base, full_model, density=fraction).state_dict)
        graft_losses.append(val_loss(grafted, target.val))
    return dict(
        base=base_loss, full=full_loss, fish=val_loss(fish_run.model, target.val),
        random_mask=val_loss(control_run.model, target.val), fish_trainable=fish_run.trainable,
        full_trainable=sum(p.numel() for p in base.parameters()),
        graft_fractions=list(graft_fractions), graft=graft_losses,
    )


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def run_seed(seed: int, *, checkpoint_cache: cache_mod.CheckpointCache | None = None,
             include: Sequence[str] = ("one_shot", "nm", "finetune")) -> dict[str, Any]:
    """All numbers of one seed (cached as JSON by configuration; the trained bases are cached as checkpoints)."""
    unknown = sorted(set(include) - {"one_shot", "nm", "finetune"})
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: one_shot, nm, finetune")
    out: dict[str, Any] = {}
    mix = splits()
    for part in include:
        config = dict(experiment="sparse_masks", part=part, seed=seed, task=TASK, threads=THREADS,
                      densities=list(DENSITIES),
                      finetune=FINETUNE, learned=LEARNED_NM, calibration=CALIBRATION_BATCHES,
                      graft_fractions=list(GRAFT_FRACTIONS))

        def compute(part=part) -> dict[str, Any]:
            if part == "finetune":
                return finetune_runs(seed=seed, checkpoint_cache=checkpoint_cache)
            model = base_model(seed=seed, checkpoint_cache=checkpoint_cache)
            calib = calibration(mix.train, seed=seed)
            if part == "one_shot":
                return dict(dense=val_loss(model, mix.val),
                            curves=one_shot_curves(model, val=mix.val, calib=calib, seed=seed))
            return nm_losses(model, tokens=mix.train, val=mix.val, calib=calib, seed=seed)

        with one_thread():
            out[part] = cache_mod.cached_json(config, compute, cache=checkpoint_cache)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Several seeds, verdicts, recording
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SparseResult:
    """Per-seed results of `run_seed`, keyed by the seed as a string (JSON keys)."""

    seeds: list[int]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(seeds=list(self.seeds), runs=self.runs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparseResult:
        return cls(seeds=[int(s) for s in d["seeds"]], runs={str(k): dict(v) for k, v in d["runs"].items()})

    def values(self, part: str, key: str) -> list[float]:
        """`runs[seed][part]["losses" or top level][key]` for every seed."""
        out = []
        for s in self.seeds:
            block = self.runs[str(s)][part]
            out.append(float(block["losses"][key] if "losses" in block else block[key]))
        return out


def sparse_sweep(seeds: Sequence[int] = (0,), *, checkpoint_cache: cache_mod.CheckpointCache | None = None,
                 progress: bool = False) -> SparseResult:
    result = SparseResult(seeds=list(seeds))
    for seed in seeds:
        start = time.perf_counter()
        result.runs[str(seed)] = run_seed(seed, checkpoint_cache=checkpoint_cache)
        if progress:
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return result


def recovery(base: float, finetuned: float, loss: float) -> float:
    """How much of the fine-tune's loss improvement a model keeps: (base - loss) / (base - finetuned)."""
    if not base > finetuned:
        raise ValueError(f"the fine-tune must improve on the base (base {base:.4f}, fine-tuned {finetuned:.4f})")
    return (base - loss) / (base - finetuned)


def graft_recovery(run: Mapping[str, Any]) -> list[float]:
    """Recovery of each graft fraction of one seed's fine-tune run."""
    return [recovery(run["base"], run["full"], loss) for loss in run["graft"]]


def smallest_fraction_recovering(run: Mapping[str, Any], share: float = MOST) -> float | None:
    """The smallest graft fraction whose recovery is at least `share`, or None."""
    for fraction, rec in zip(run["graft_fractions"], graft_recovery(run)):
        if rec >= share:
            return fraction
    return None


def _ordering_verdict(claim: str, better: list[float], worse: list[float], *, what: str,
                      min_gap: float = 0.005) -> Verdict:
    """'holds' when `better` < `worse` on every seed and the mean gap exceeds `min_gap` nats; 'does not hold at this
    scale' when the opposite holds on every seed; 'inconclusive (within seed spread)' otherwise."""
    gaps = [w - b for b, w in zip(better, worse)]
    mean = statistics.fmean(gaps)
    numbers = dict(gaps=gaps, mean_gap=mean)
    detail = f"{what}: " + ", ".join(f"{g:+.3f}" for g in gaps) + f" nats (mean {mean:+.3f})"
    if all(g > 0 for g in gaps) and mean > min_gap:
        return Verdict(claim, "holds", f"every seed agrees; {detail}", numbers)
    if all(g < 0 for g in gaps) and -mean > min_gap:
        return Verdict(claim, "does not hold at this scale", f"every seed disagrees; {detail}", numbers)
    return Verdict(claim, "inconclusive (within seed spread)", f"the seeds split or the gap is tiny; {detail}",
                   numbers)


def sparse_verdicts(result: SparseResult) -> dict[str, Verdict]:
    """The lab's claims, decided from the numbers (never typed in)."""
    if len(result.seeds) < 2:
        raise ValueError("a verdict needs at least two seeds")
    out = {
        "learned_nm": _ordering_verdict(
            "a learned 2:4 mask (MaskLLM) beats the magnitude 2:4 mask", result.values("nm", "learned 2:4"),
            result.values("nm", "magnitude 2:4"), what="magnitude minus learned 2:4 loss"),
        "fish": _ordering_verdict(
            "FISH's 0.5 % mask beats a random 0.5 % mask (Fisher information picks the right weights)",
            result.values("finetune", "fish"), result.values("finetune", "random_mask"),
            what="random-mask minus FISH loss"),
    }
    runs = [result.runs[str(s)]["finetune"] for s in result.seeds]
    # FISH's headline: its 0.5 % mask matches full fine-tuning. "Matches" = within MATCH nats of it on every seed
    gaps = [r["fish"] - r["full"] for r in runs]
    kept = [recovery(r["base"], r["full"], r["fish"]) for r in runs]
    claim = f"fine-tuning FISH's {FINETUNE['fish_density']:.1%} matches full fine-tuning (within {MATCH} nats)"
    detail = ("FISH minus full loss: " + ", ".join(f"{g:+.3f}" for g in gaps) + " nats; share of the full "
              "fine-tune's improvement: " + ", ".join(f"{k:.0%}" for k in kept))
    numbers = dict(gaps=gaps, recovery=kept)
    if all(g <= MATCH for g in gaps):
        out["fish_vs_full"] = Verdict(claim, "holds", f"every seed agrees; {detail}", numbers)
    elif all(g > MATCH for g in gaps):
        out["fish_vs_full"] = Verdict(claim, "does not hold at this scale", f"every seed disagrees; {detail}", numbers)
    else:
        out["fish_vs_full"] = Verdict(claim, "inconclusive (within seed spread)", f"the seeds split; {detail}",
                                      numbers)
    fractions = [smallest_fraction_recovering(run) for run in runs]
    at_tiny = [recovery(r["base"], r["full"], r["graft"][r["graft_fractions"].index(TINY)]) for r in runs]
    detail = (f"recovery with {TINY:.0%} of the weights grafted: " + ", ".join(f"{x:.0%}" for x in at_tiny)
              + "; smallest fraction recovering half: "
              + ", ".join("none" if f is None else f"{f:.2%}" for f in fractions))
    claim = f"grafting {TINY:.0%} of the weights recovers most (>= {MOST:.0%}) of the fine-tune"
    numbers = dict(recovery_at_tiny=at_tiny, smallest_fraction=fractions)
    if all(x >= MOST for x in at_tiny):
        out["grafting"] = Verdict(claim, "holds", f"every seed agrees; {detail}", numbers)
    elif all(x < MOST for x in at_tiny):
        out["grafting"] = Verdict(claim, "does not hold at this scale", f"every seed disagrees; {detail}", numbers)
    else:
        out["grafting"] = Verdict(claim, "inconclusive (within seed spread)", f"the seeds split; {detail}", numbers)
    return out


def compare_with_recorded(live: SparseResult, recorded: SparseResult, *,
                          tolerance: float = LIVE_TOLERANCE) -> list[str]:
    """Every live number (loss) that differs from the recording of the same seed by more than `tolerance`."""
    problems = []
    for seed in live.seeds:
        if str(seed) not in recorded.runs:
            problems.append(f"seed {seed} is not in the recording")
            continue
        for path, a, b in _paired_numbers(live.runs[str(seed)], recorded.runs[str(seed)]):
            if abs(a - b) > tolerance:
                problems.append(f"seed {seed} {path}: live {a:.4f} vs recorded {b:.4f}")
    return problems


def _paired_numbers(live: Any, rec: Any, path: str = "") -> list[tuple[str, float, float]]:
    if isinstance(live, Mapping):
        out = []
        for k, v in live.items():
            if k in ("fish_trainable", "full_trainable", "graft_fractions", "changed_groups"):
                continue
            if not isinstance(rec, Mapping) or k not in rec:
                return [(f"{path}/{k} (missing in the recording)", math.inf, 0.0)]
            out += _paired_numbers(v, rec[k], f"{path}/{k}")
        return out
    if isinstance(live, list):
        if not isinstance(rec, list) or len(rec) != len(live):
            return [(f"{path} (length differs)", math.inf, 0.0)]
        return [t for i, (a, b) in enumerate(zip(live, rec)) for t in _paired_numbers(a, b, f"{path}[{i}]")]
    return [(path, float(live), float(rec))]


@dataclass
class RecordedSparse:
    result: SparseResult
    recorded: str
    machine: str
    seconds: float


def recorded_sparse_masks(path: Path | None = None) -> RecordedSparse:
    path = path or RESULTS_DIR / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no recorded sweep at {path}; run `python -m lablib sweep sparse-masks`")
    record = json.loads(path.read_text())
    return RecordedSparse(SparseResult.from_dict(record["result"]), record["recorded"], record["machine"],
                          record["seconds"])


def _seed_in_fresh_cache(seed: int) -> dict[str, Any]:
    """One seed from scratch in a temporary cache (a worker of `record_sparse_masks`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lablib-sparse-sweep-") as tmp:
        return run_seed(seed, checkpoint_cache=cache_mod.CheckpointCache(tmp))


def record_sparse_masks(path: Path | None = None, *, progress: bool = True, seeds: Sequence[int] = RECORDED_SEEDS,
                        processes: int = 1) -> Path:
    """Run the sweep from scratch (temporary caches, `THREADS` thread per run) and write it with its machine and
    date. `processes` > 1 runs the seeds in parallel worker processes: the numbers are the same either way."""
    import datetime as dt
    import multiprocessing
    import os
    import platform
    from concurrent.futures import ProcessPoolExecutor

    import lablib

    path = path or RESULTS_DIR / RECORD_FILE
    start = time.perf_counter()
    result = SparseResult(seeds=list(seeds))
    if processes > 1:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            for seed, run in zip(seeds, pool.map(_seed_in_fresh_cache, seeds)):
                result.runs[str(seed)] = run
    else:
        for seed in seeds:
            result.runs[str(seed)] = _seed_in_fresh_cache(seed)
            if progress:
                print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {THREADS} per run, {processes} "
                f"process(es), {platform.platform()}, 1-minute load average at the end {os.getloadavg()[0]:.2f}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep sparse-masks",
        seconds=round(seconds, 1),
        result=result.to_dict(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def live_subset(*, seed: int = 0, parts: Sequence[str] = LIVE_PARTS,
                checkpoint_cache: cache_mod.CheckpointCache | None = None) -> SparseResult:
    """The lab's live re-run: `parts` of one seed (cached by configuration like every run)."""
    return SparseResult(seeds=[seed], runs={str(seed): run_seed(seed, include=parts,
                                                                 checkpoint_cache=checkpoint_cache)})


def pruning_ledger_rows(model: torch.nn.Module, densities: Sequence[float], losses: Sequence[float], *,
                        family: str = "magnitude pruning, global, one-shot (lab 06)") -> list[dict[str, Any]]:
    """Rows for `lablib.viz.frontier.frontier_figure`: the one-shot global-magnitude curve, each density counted by
    `lablib.ledger` through `sparse.masked_ledger` (pruned entries not stored)."""
    if len(densities) != len(losses):
        raise ValueError(f"{len(densities)} densities but {len(losses)} losses")
    rows = []
    for density, loss in zip(densities, losses):
        if density < 1.0:
            row = sparse.magnitude_mask(model, density=density, scope="global").ledger
        else:
            row = sparse.masked_ledger(model, sparse.Mask.from_nonzero(model))
        rows.append(dict(name=f"one-shot magnitude {density:.0%}", family=family, val_loss=float(loss),
                         stored=row.stored, flops_per_token=row.flops_per_token))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Helpers for the lab's panels and exercises
# ----------------------------------------------------------------------------------------------------------------


def weight_names(model: torch.nn.Module) -> list[str]:
    """The prunable 2-D weights, in model order (what the mask images show)."""
    return sparse.prunable_names(model)


def check_nm_kept(answer: int, *, rows: int, cols: int, n: int, m: int) -> bool:
    """Exercise: how many entries does an n:m mask keep in a (rows, cols) weight? (n of every m along the input)."""
    n, m = sparse.check_nm(n, m)
    if cols % m:
        raise ValueError(f"cols ({cols}) must be divisible by m ({m})")
    expected = rows * cols // m * n
    if answer == expected:
        print(f"correct: {rows} x {cols} / {m} groups x {n} kept = {expected}")
        return True
    print(f"not quite: {answer} is {'too low' if answer < expected else 'too high'}; count groups of {m} per row")
    return False
