"""Lab 00's seeded experiments: a tiny LM with its parameter ledger, and the intrinsic-dimension sweep.

Both are callable at tiny sizes (the tests do) and cached by their configuration, so the lab reruns instantly.

Intrinsic dimension (Li et al., 2018): for an MLP of hidden width w on sklearn's digits, train the full network
(the baseline), then train only θ_d in θ = θ0 + P θ_d for each d on a grid, and record the first d whose validation
accuracy reaches 90 % of the baseline (`d_int90`). The paper claims d_int90 "varies little across a family of
models with vastly different sizes"; `intrinsic_dimension_verdict` checks that claim from the numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lablib import cache as cache_mod
from lablib import data, ledger, models, train
from lablib.intrinsic import SubspaceModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------------
# A tiny LM on Shakespeare + Python code
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TinyLMResult:
    """The trained model, its training history, its ledger and per-corpus validation losses."""

    model: models.TinyTransformer
    history: train.History
    param_ledger: ledger.ParamLedger
    val_loss_by_corpus: dict[str, float]
    from_cache: bool


def train_tiny_lm(
    *,
    corpora: Sequence[str] = ("shakespeare", "python"),
    max_chars: int = 200_000,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    seq_len: int = 64,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
) -> TinyLMResult:
    """Train (or load from the cache) the byte-level tiny LM on a mix of corpora; measure each corpus separately."""
    corpora = tuple(corpora)
    config = models.TransformerConfig(
        vocab_size=data.ByteTokenizer.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len
    )
    splits = data.text_corpus(list(corpora), max_chars=max_chars)
    run = dict(
        experiment="tiny_lm", model=config.to_dict(), corpora=list(corpora), max_chars=max_chars, steps=steps,
        batch_size=batch_size, lr=lr, seed=seed,
    )

    def build() -> models.TinyTransformer:
        torch.manual_seed(seed)
        return models.TinyTransformer(config)

    def fit(model) -> dict:
        history = train.train_lm(
            model, splits, steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=max(steps // 4, 1),
            progress=progress,
        )
        return history.to_dict()

    model, meta, from_cache = cache_mod.cached_train(run, build=build, fit=fit, cache=checkpoint_cache)
    history = train.History.from_dict(meta)
    val_loss = {}
    for name in corpora:
        own = data.text_corpus(name, max_chars=max_chars)
        val_loss[name] = train.evaluate_lm(model, own.val, batch_size=32, seq_len=seq_len, max_batches=8, seed=0)
    return TinyLMResult(
        model=model,
        history=history,
        param_ledger=ledger.ledger(model, name=f"tiny LM d_model={d_model}"),
        val_loss_by_corpus=val_loss,
        from_cache=from_cache,
    )


# ----------------------------------------------------------------------------------------------------------------
# Intrinsic dimension
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class IntrinsicDimResult:
    """Accuracies of full and subspace training, by width and seed.

    `subspace_acc[str(width)][str(seed)][str(d)]` is the validation accuracy at subspace dimension d (keys are strings
    so the result round-trips through JSON); d values larger than a model's parameter count are skipped.
    """

    dataset: str
    widths: list[int]
    dims: list[int]
    seeds: list[int]
    full_dim: dict[str, int]
    baseline_acc: dict[str, dict[str, float]]
    subspace_acc: dict[str, dict[str, dict[str, float]]]
    config: dict = field(default_factory=dict)

    def d_int90(self, width: int, seed: int, *, threshold: float = 0.9) -> int | None:
        """The first d on the grid reaching `threshold` x the full-training accuracy (None: never reached)."""
        accs = {int(d): a for d, a in self.subspace_acc[str(width)][str(seed)].items()}
        return first_dim_reaching(accs, target=threshold * self.baseline_acc[str(width)][str(seed)])

    def median_d_int90(self, width: int, *, threshold: float = 0.9) -> float | None:
        values = [self.d_int90(width, s, threshold=threshold) for s in self.seeds]
        if any(v is None for v in values):
            return None
        return float(statistics.median(values))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "IntrinsicDimResult":
        return cls(**raw)

    def subset(self, *, widths: Sequence[int], seeds: Sequence[int]) -> "IntrinsicDimResult":
        """The same result restricted to some widths and seeds (to compare a live run with a recorded one)."""
        w, s = [str(x) for x in widths], [str(x) for x in seeds]
        missing = [x for x in w if x not in self.subspace_acc] + [
            f"seed {x}" for x in s if any(x not in self.subspace_acc[k] for k in w if k in self.subspace_acc)
        ]
        if missing:
            raise KeyError(f"result has no entries for {missing}")
        return IntrinsicDimResult(
            dataset=self.dataset, widths=list(widths), dims=self.dims, seeds=list(seeds),
            full_dim={k: self.full_dim[k] for k in w},
            baseline_acc={k: {x: self.baseline_acc[k][x] for x in s} for k in w},
            subspace_acc={k: {x: self.subspace_acc[k][x] for x in s} for k in w},
            config=self.config,
        )


def first_dim_reaching(acc_by_dim: dict[int, float], *, target: float) -> int | None:
    """Smallest d (in increasing order) whose accuracy is at least `target`; None if none is."""
    for d in sorted(acc_by_dim):
        if acc_by_dim[d] >= target:
            return d
    return None


def mlp_for_width(width: int, *, in_features: int, num_classes: int, seed: int) -> models.MLPClassifier:
    """The model family of the sweep: two hidden layers of `width` units."""
    torch.manual_seed(seed)
    return models.MLPClassifier(in_features=in_features, hidden_sizes=[width, width], num_classes=num_classes)


def intrinsic_dimension_sweep(
    *,
    widths: Sequence[int] = (16, 128),
    dims: Sequence[int] = (10, 25, 50, 100, 150, 200, 250, 300, 400, 600),
    seeds: Sequence[int] = (0,),
    dataset: str = "digits",
    steps: int = 300,
    steps_full: int = 1000,
    batch_size: int = 128,
    lr_full: float = 1e-2,
    lr_subspace: float = 3e-2,
    projection: str = "fastfood",
    progress: bool = False,
    use_cache: bool = True,
) -> IntrinsicDimResult:
    """Full training vs subspace training at each d, for each width and seed. Cached as JSON by its configuration.

    The full-training baseline gets `steps_full` steps (it must be well trained, or d_int90 is measured against a
    weak target); every subspace run gets the same `steps`.
    """
    if not widths or not dims or not seeds:
        raise ValueError("widths, dims and seeds must each be non-empty")
    if any(d < 1 for d in dims) or any(w < 1 for w in widths):
        raise ValueError(f"widths and dims must be positive, got widths={list(widths)} dims={list(dims)}")
    config = dict(
        experiment="intrinsic_dimension", widths=list(widths), dims=sorted(dims), seeds=list(seeds), dataset=dataset,
        steps=steps, steps_full=steps_full, batch_size=batch_size, lr_full=lr_full, lr_subspace=lr_subspace,
        projection=projection,
    )
    if use_cache:
        return IntrinsicDimResult.from_dict(
            cache_mod.cached_json(config, lambda: _run_sweep(config, progress=progress).to_dict())
        )
    return _run_sweep(config, progress=progress)


def _run_sweep(config: dict, *, progress: bool) -> IntrinsicDimResult:
    ds = data.load_classification(config["dataset"], seed=0)
    in_features = ds.x_train.shape[1]
    full_dim, baseline, subspace = {}, {}, {}
    for width in config["widths"]:
        key = str(width)
        baseline[key], subspace[key] = {}, {}
        for seed in config["seeds"]:
            # one line per (width, seed) rather than a bar per run: a sweep trains dozens of small models
            fit = dict(batch_size=config["batch_size"], seed=seed, progress=False)
            model = mlp_for_width(width, in_features=in_features, num_classes=ds.num_classes, seed=seed)
            full_dim[key] = sum(p.numel() for p in model.parameters())
            train.train_classifier(model, ds, steps=config["steps_full"], lr=config["lr_full"], **fit)
            baseline[key][str(seed)] = train.evaluate_classifier(model, ds.x_val, ds.y_val)["accuracy"]
            subspace[key][str(seed)] = {}
            for d in config["dims"]:
                if d > full_dim[key]:
                    continue
                init = mlp_for_width(width, in_features=in_features, num_classes=ds.num_classes, seed=seed)
                # the projection's seed differs from the init's, so P and θ0 are independent draws
                sub = SubspaceModel(init, dim=d, projection=config["projection"], seed=10_000 + seed)
                train.train_classifier(sub, ds, steps=config["steps"], lr=config["lr_subspace"], **fit)
                subspace[key][str(seed)][str(d)] = train.evaluate_classifier(sub, ds.x_val, ds.y_val)["accuracy"]
            if progress:
                accs = " ".join(f"{a:.2f}" for a in subspace[key][str(seed)].values())
                print(f"width {width} seed {seed}: full {baseline[key][str(seed)]:.3f}, subspace {accs}", flush=True)
    return IntrinsicDimResult(
        dataset=config["dataset"], widths=list(config["widths"]), dims=list(config["dims"]),
        seeds=list(config["seeds"]), full_dim=full_dim, baseline_acc=baseline, subspace_acc=subspace, config=config,
    )


@dataclass
class Verdict:
    """A claim checked against numbers: `verdict` is 'holds', 'does not hold at this scale' or 'inconclusive'."""

    claim: str
    verdict: str
    reason: str
    numbers: dict


CLAIM = "the intrinsic dimension varies little across a family of models with vastly different sizes"


def intrinsic_dimension_verdict(
    result: IntrinsicDimResult,
    *,
    threshold: float = 0.9,
    max_ratio_holds: float = 2.0,
    min_size_ratio: float = 10.0,
    min_baseline: float = 0.8,
) -> Verdict:
    """Decide the claim from the sweep.

    The claim is about models "large enough to solve the problem", so widths whose full training stays below
    `min_baseline` accuracy (for some seed) are set aside and named in the reason. Then, over the remaining widths:

    * inconclusive: fewer than two widths remain, one never reaches `threshold` of its baseline on the grid, or the
      remaining widths span less than `min_size_ratio` in parameter count;
    * holds: the median d_int90 of every width is within a factor `max_ratio_holds` of every other;
    * does not hold at this scale: otherwise (d_int90 grows or shrinks with model size by more than that factor).
    """
    baselines = {w: min(result.baseline_acc[str(w)].values()) for w in result.widths}
    too_small = [w for w in result.widths if baselines[w] < min_baseline]
    widths = [w for w in result.widths if w not in too_small]
    sizes = {w: result.full_dim[str(w)] for w in widths}
    medians = {w: result.median_d_int90(w, threshold=threshold) for w in widths}
    numbers = dict(parameters=sizes, median_d_int90=medians, min_baseline_acc=baselines, set_aside=too_small)
    aside = f"; set aside widths {too_small} (full training below {min_baseline:.0%} accuracy)" if too_small else ""
    if len(widths) < 2:
        return Verdict(CLAIM, "inconclusive", f"fewer than two widths solve the task{aside}", numbers)
    if any(m is None for m in medians.values()):
        never = [w for w, m in medians.items() if m is None]
        reason = f"widths {never} never reach {threshold:.0%} of full accuracy on the grid{aside}"
        return Verdict(CLAIM, "inconclusive", reason, numbers)
    size_ratio = max(sizes.values()) / min(sizes.values())
    numbers["size_ratio"] = size_ratio
    if size_ratio < min_size_ratio:
        return Verdict(CLAIM, "inconclusive", f"model sizes span only {size_ratio:.1f}x{aside}", numbers)
    ratio = max(medians.values()) / min(medians.values())
    numbers["d_int90_ratio"] = ratio
    if ratio <= max_ratio_holds:
        reason = f"d_int90 varies {ratio:.1f}x while parameter counts vary {size_ratio:.0f}x{aside}"
        return Verdict(CLAIM, "holds", reason, numbers)
    reason = (
        f"d_int90 varies {ratio:.1f}x (> {max_ratio_holds:.0f}x) while parameter counts vary {size_ratio:.0f}x{aside}"
    )
    return Verdict(CLAIM, "does not hold at this scale", reason, numbers)


def fraction_of_baseline(result: IntrinsicDimResult) -> dict[str, dict[int, float]]:
    """Subspace accuracy / full-training accuracy, averaged over seeds: {"width w (D params)": {d: fraction}}."""
    out = {}
    for w in result.widths:
        per_seed = [
            {int(d): acc / result.baseline_acc[str(w)][str(s)] for d, acc in result.subspace_acc[str(w)][str(s)].items()}
            for s in result.seeds
        ]
        dims = sorted(set.intersection(*(set(p) for p in per_seed)))
        label = f"width {w} ({result.full_dim[str(w)]:,} params)"
        out[label] = {d: statistics.fmean(p[d] for p in per_seed) for d in dims}
    return out


def intrinsic_dimension_figure(result: IntrinsicDimResult, *, selected_d: int | None = None, threshold: float = 0.9):
    """The lab's panel: one curve per width of accuracy / full accuracy against d (see `viz.subspace_accuracy_figure`)."""
    from lablib import viz

    seeds = "seed" if len(result.seeds) == 1 else f"mean of {len(result.seeds)} seeds"
    return viz.subspace_accuracy_figure(
        fraction_of_baseline(result), selected_d=selected_d, threshold=threshold,
        title=f"Subspace training on {result.dataset} ({seeds})",
    )


def recorded_intrinsic_dimension(path: Path | None = None) -> IntrinsicDimResult:
    """The recorded multi-seed sweep (made by `python -m lablib sweep intrinsic-dimension`)."""
    path = path or RESULTS_DIR / "intrinsic_dimension.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep intrinsic-dimension` to record it")
    return IntrinsicDimResult.from_dict(json.loads(path.read_text())["result"])


def compare_with_recorded(
    live: IntrinsicDimResult, recorded: IntrinsicDimResult, *, acc_tolerance: float = 0.03
) -> list[str]:
    """Differences between a live run and the recorded sweep on the live run's widths and seeds ([] = agree).

    Accuracies must agree within `acc_tolerance`; d_int90 must be the same grid point or a neighbour.
    """
    problems = []
    rec = recorded.subset(widths=live.widths, seeds=live.seeds)
    grid = sorted(set(live.dims) | set(recorded.dims))
    for w in live.widths:
        for s in live.seeds:
            a, b = live.baseline_acc[str(w)][str(s)], rec.baseline_acc[str(w)][str(s)]
            if abs(a - b) > acc_tolerance:
                problems.append(f"width {w} seed {s}: baseline accuracy {a:.3f} vs recorded {b:.3f}")
            for d, acc in live.subspace_acc[str(w)][str(s)].items():
                ref = rec.subspace_acc[str(w)][str(s)].get(d)
                if ref is not None and abs(acc - ref) > acc_tolerance:
                    problems.append(f"width {w} seed {s} d={d}: accuracy {acc:.3f} vs recorded {ref:.3f}")
            dl, dr = live.d_int90(w, s), rec.d_int90(w, s)
            if (dl is None) != (dr is None) or (dl is not None and abs(grid.index(dl) - grid.index(dr)) > 1):
                problems.append(f"width {w} seed {s}: d_int90 {dl} vs recorded {dr}")
    return problems


RECORDED_WIDTHS = (8, 16, 32, 64, 128, 256)
RECORDED_SEEDS = (0, 1, 2)


def record_intrinsic_dimension(path: Path | None = None, *, progress: bool = True) -> Path:
    """Run the heavy sweep (6 widths x 3 seeds, a few minutes on 2 cores) and write it with its machine and date."""
    import datetime as dt
    import os
    import platform

    import lablib

    path = path or RESULTS_DIR / "intrinsic_dimension.json"
    result = intrinsic_dimension_sweep(widths=RECORDED_WIDTHS, seeds=RECORDED_SEEDS, progress=progress, use_cache=False)
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep intrinsic-dimension",
        result=result.to_dict(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_param_count(answer: int, config: models.TransformerConfig) -> bool:
    """Exercise: count the tiny transformer's parameters by hand. Prints a hint when the answer is off."""
    expected = sum(p.numel() for p in models.TinyTransformer(config).parameters())
    if answer == expected:
        print(f"correct: {expected:,} parameters")
        return True
    embed = config.vocab_size * config.d_model + config.seq_len * config.d_model
    where = "the embeddings" if abs(answer - expected) >= embed // 2 else "the LayerNorms and the biases"
    print(f"not quite: {answer:,} is too {'low' if answer < expected else 'high'}; check {where}")
    return False


def check_d_int(answer: int | None, result: IntrinsicDimResult, *, width: int, seed: int, threshold: float) -> bool:
    """Exercise: read d_int at another threshold off the sweep."""
    expected = result.d_int90(width, seed, threshold=threshold)
    ok = answer == expected
    print("correct" if ok else f"not quite: look for the first d whose accuracy reaches {threshold:.0%} of the baseline")
    return ok
