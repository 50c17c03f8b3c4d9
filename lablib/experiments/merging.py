"""Lab 05's experiments: a digits base model, task experts on digit subsets, every merge side by side, DARE drop
curves, and the interpolation barrier with and without permutation alignment.

The setting (all of it small enough for a 2-core laptop):

* data: sklearn's 8x8 digits (`lablib.data`, pixels scaled to [0, 1]); three tasks, the digit subsets `TASKS`;
* base: an `MLPClassifier` 64 -> 64 -> 10 pretrained briefly on *all* digits (the "mixed task");
* experts: the base fine-tuned on one subset each (same 10-way head), so each forgets the other digits;
* metric: per-task accuracy of the 10-way prediction on that task's validation digits, and their mean.

Every merge is a call into `lablib.merging`; the task vectors are computed once per seed and cached, so the lab's
sliders re-merge cached state dicts and never retrain.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lablib import data as data_module
from lablib import merging, models, train
from lablib.cache import cached_json, cached_train
from lablib.experiments.foundations import Verdict

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
HIDDEN = 64
BASE_STEPS = 200
EXPERT_STEPS = 60
LAMBDAS = (0.3, 0.6, 1.0)
SEEDS = (0, 1, 2)


def digits_data(seed: int = 0) -> data_module.ClassificationData:
    """Digits with pixels scaled from 0..16 to [0, 1]."""
    d = data_module.load_classification("digits", seed=seed)
    return data_module.ClassificationData(
        x_train=d.x_train / 16.0, y_train=d.y_train, x_val=d.x_val / 16.0, y_val=d.y_val, num_classes=10, name="digits"
    )


def task_subset(d: data_module.ClassificationData, digits: Sequence[int], *, split: str) -> tuple[torch.Tensor, ...]:
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_val, d.y_val)
    keep = torch.isin(y, torch.tensor(list(digits)))
    return x[keep], y[keep]


def _build(seed: int, hidden: Sequence[int] = (HIDDEN,)) -> Callable[[], models.MLPClassifier]:
    def build() -> models.MLPClassifier:
        torch.manual_seed(seed)
        return models.MLPClassifier(in_features=64, hidden_sizes=list(hidden), num_classes=10)

    return build


@dataclass
class TaskPool:
    """One seed's base model and experts, as state dicts (the merges' inputs), plus the data."""

    seed: int
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]
    data: data_module.ClassificationData

    def task_vectors(self) -> list[dict[str, torch.Tensor]]:
        return merging.task_vectors(self.base, self.experts)

    def model(self, state: Mapping[str, torch.Tensor]) -> models.MLPClassifier:
        m = _build(0)()
        m.load_state_dict(dict(state))
        return m.eval()

    def task_accuracies(self, state_or_model: Any) -> list[float]:
        """Accuracy of the 10-way prediction on each task's validation digits."""
        model = state_or_model if isinstance(state_or_model, torch.nn.Module) else self.model(state_or_model)
        out = []
        with torch.no_grad():
            for digits in TASKS:
                x, y = task_subset(self.data, digits, split="val")
                out.append(float((model(x).argmax(dim=-1) == y).float().mean()))
        return out


def task_pool(seed: int = 0, *, progress: bool = False) -> TaskPool:
    """Pretrain the base on all digits, fine-tune one expert per task (cached by configuration)."""
    d = digits_data(seed)
    base_config = dict(kind="merging-base", seed=seed, hidden=HIDDEN, steps=BASE_STEPS)
    base, _, _ = cached_train(
        base_config, build=_build(seed),
        fit=lambda m: train.train_classifier(m, d, steps=BASE_STEPS, lr=3e-3, seed=seed, progress=progress).to_dict(),
    )
    experts = []
    for t, digits in enumerate(TASKS):
        x, y = task_subset(d, digits, split="train")
        sub = data_module.ClassificationData(x_train=x, y_train=y, x_val=x[:1], y_val=y[:1], num_classes=10,
                                             name=f"digits{digits}")

        def build(base=base) -> models.MLPClassifier:
            return copy.deepcopy(base)

        def fit(m, sub=sub, t=t) -> dict:
            return train.train_classifier(m, sub, steps=EXPERT_STEPS, lr=1e-3, seed=100 * seed + t,
                                          progress=progress).to_dict()

        expert, _, _ = cached_train(dict(base_config, kind="merging-expert", task=list(digits),
                                         expert_steps=EXPERT_STEPS), build=build, fit=fit)
        experts.append({k: v.detach().clone() for k, v in expert.state_dict().items()})
    return TaskPool(seed=seed, base={k: v.detach().clone() for k, v in base.state_dict().items()}, experts=experts,
                    data=d)


# ----------------------------------------------------------------------------------------------------------------
# Every method on one pool
# ----------------------------------------------------------------------------------------------------------------


def fisher_weights(pool: TaskPool, *, examples: int = 200) -> list[dict[str, torch.Tensor]]:
    """Each expert's diagonal Fisher ("exact" labels) on its own task's training inputs."""
    out = []
    for t, digits in enumerate(TASKS):
        x, _ = task_subset(pool.data, digits, split="train")
        out.append(merging.diagonal_fisher(pool.model(pool.experts[t]), [x[:examples]], labels="exact"))
    return out


def merge_with(pool: TaskPool, method: str, *, fishers=None, **params: Any) -> dict[str, torch.Tensor]:
    """One merge of the pool's experts with registry method `method` (Fisher weights passed where needed)."""
    if method == "fisher":
        return merging.fisher(None, pool.experts, fishers=fishers, **params)
    return merging.merge(method, None if method == "linear" else pool.base, pool.experts, **params)


def _best_lambda(pool: TaskPool, method: str, **params: Any) -> tuple[float, list[float]]:
    """λ from `LAMBDAS` with the best mean task accuracy (tuned on the same split for every method)."""
    best = None
    for lam in LAMBDAS:
        acc = pool.task_accuracies(merge_with(pool, method, lambda_=lam, **params))
        if best is None or statistics.fmean(acc) > statistics.fmean(best[1]) + 1e-12:
            best = (lam, acc)
    return best


def method_table(pool: TaskPool, *, density: float = 0.2, drop_rate: float = 0.9, wemoe_steps: int = 20) -> dict:
    """Per-task accuracy of every method on `pool` (λ tuned from `LAMBDAS` where a method has one).

    Returns {method: {"acc": [per task], "mean": float, "params": {...}}}, plus the base and the experts.
    """
    rows: dict[str, dict] = {}

    def add(name: str, acc: list[float], **params: Any) -> None:
        rows[name] = dict(acc=[round(a, 4) for a in acc], mean=round(statistics.fmean(acc), 4), params=params)

    add("base", pool.task_accuracies(pool.base))
    add("experts (own task)", [pool.task_accuracies(e)[t] for t, e in enumerate(pool.experts)])
    add("linear", pool.task_accuracies(merge_with(pool, "linear")))
    fishers = fisher_weights(pool)
    add("fisher", pool.task_accuracies(merge_with(pool, "fisher", fishers=fishers)))
    lam, acc = _best_lambda(pool, "task_arithmetic")
    add("task_arithmetic", acc, lambda_=lam)
    lam, acc = _best_lambda(pool, "ties", density=density)
    add("ties", acc, lambda_=lam, density=density)
    lam, acc = _best_lambda(pool, "dare_linear", density=1 - drop_rate, seed=pool.seed)
    add("dare_linear", acc, lambda_=lam, density=round(1 - drop_rate, 4))
    lam, acc = _best_lambda(pool, "dare_ties", density=1 - drop_rate, seed=pool.seed)
    add("dare_ties", acc, lambda_=lam, density=round(1 - drop_rate, 4))
    lam, acc = _best_lambda(pool, "pcb", density=density)
    add("pcb", acc, lambda_=lam, density=density)
    lam, acc = _best_lambda(pool, "iso_c")
    add("iso_c", acc, lambda_=lam)
    lam, acc = _best_lambda(pool, "iso_cts")
    add("iso_cts", acc, lambda_=lam)
    ta_lambda = rows["task_arithmetic"]["params"]["lambda_"]
    add("wemoe", wemoe_accuracies(pool, lambda_=ta_lambda, steps=wemoe_steps), lambda_=ta_lambda, steps=wemoe_steps)
    return rows


def wemoe_accuracies(pool: TaskPool, *, lambda_: float, steps: int = 20) -> list[float]:
    """WEMoE on the hidden layer (the head is task-arithmetic merged); router trained on the *unlabeled* validation
    inputs by entropy minimisation (the paper's test-time adaptation)."""
    base = pool.model(pool.base)
    experts = [pool.model(e) for e in pool.experts]
    model = merging.wemoe(base, experts, lambda_=lambda_, moe_modules=["layers.0"])
    merging.train_wemoe_router(model, [pool.data.x_val], steps=steps, lr=0.005, seed=pool.seed)
    return pool.task_accuracies(model.eval())


# ----------------------------------------------------------------------------------------------------------------
# DARE / DAREx-q drop curves on one expert
# ----------------------------------------------------------------------------------------------------------------

DROP_RATES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def dare_curve(pool: TaskPool, *, task: int = 0, drop_rates: Sequence[float] = DROP_RATES) -> dict:
    """Own-task accuracy of expert `task` after DARE (rescale 1/(1-p)) and DAREx-q (q picked label-free by
    `darex_q_search`: the q whose pruned logits are closest to the expert's on unlabeled inputs), per drop rate."""
    x_val, _ = task_subset(pool.data, TASKS[task], split="val")
    expert = pool.experts[task]
    reference = pool.model(expert)(x_val).detach()
    dare, darex, qs = [], [], []
    for p in drop_rates:
        if p == 0:
            acc = pool.task_accuracies(expert)[task]
            dare.append(acc), darex.append(acc), qs.append(1.0)
            continue
        state = merging.dare_linear(pool.base, [expert], density=1 - p, seed=pool.seed)
        dare.append(pool.task_accuracies(state)[task])

        def objective(s, x=x_val):
            with torch.no_grad():
                return float((pool.model(s)(x) - reference).abs().mean())

        search = merging.darex_q_search(pool.base, expert, density=1 - p, objective_fn=objective, num=8,
                                         seed=pool.seed)
        qs.append(round(float(search.q), 4))
        darex.append(pool.task_accuracies(merging.darex_q(pool.base, [expert], density=1 - p, q=search.q,
                                                          seed=pool.seed))[task])
    return dict(drop_rates=list(drop_rates), dare=[round(a, 4) for a in dare], darex_q=[round(a, 4) for a in darex],
                q=qs)


# ----------------------------------------------------------------------------------------------------------------
# Interpolation barrier with and without alignment
# ----------------------------------------------------------------------------------------------------------------

ALIGN_HIDDEN = (64, 64)
ALIGN_STEPS = 300


def independent_pair(seed: int = 0, *, progress: bool = False) -> tuple[dict, dict, data_module.ClassificationData]:
    """Two MLPs 64 -> 64 -> 64 -> 10 trained on all digits from different random inits (seeds 2s+1, 2s+2)."""
    d = digits_data(seed)
    states = []
    for init in (2 * seed + 1, 2 * seed + 2):
        config = dict(kind="merging-align", init=init, hidden=list(ALIGN_HIDDEN), steps=ALIGN_STEPS, data_seed=seed)

        def fit(m, init=init) -> dict:
            return train.train_classifier(m, d, steps=ALIGN_STEPS, lr=3e-3, seed=init, progress=progress).to_dict()

        m, _, _ = cached_train(config, build=_build(init, ALIGN_HIDDEN), fit=fit)
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return states[0], states[1], d


def interpolation_barriers(seed: int = 0, *, num: int = 11) -> dict:
    """Validation loss along θ(α) = (1−α)θ_A + αθ_B, naive and after weight matching B onto A."""
    a, b, d = independent_pair(seed)
    model = _build(0, ALIGN_HIDDEN)().eval()

    def loss(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(d.x_val), d.y_val))

    alphas = [i / (num - 1) for i in range(num)]
    naive = merging.interpolation_curve(a, b, loss, alphas=alphas)
    matched = merging.weight_matching(a, b, seed=seed)
    aligned = merging.interpolation_curve(a, matched.state_dict, loss, alphas=alphas)
    return dict(alphas=[round(x, 4) for x in alphas], naive=[round(v, 4) for v in naive.values],
                aligned=[round(v, 4) for v in aligned.values], barrier_naive=round(naive.barrier, 4),
                barrier_aligned=round(aligned.barrier, 4))


# ----------------------------------------------------------------------------------------------------------------
# The full run, its record and the verdicts
# ----------------------------------------------------------------------------------------------------------------


def run_seed(seed: int, *, progress: bool = False) -> dict:
    pool = task_pool(seed, progress=progress)
    return dict(seed=seed, methods=method_table(pool), dare=dare_curve(pool), alignment=interpolation_barriers(seed))


def run_seeds(seeds: Sequence[int] = SEEDS, *, use_cache: bool = True, progress: bool = False) -> list[dict]:
    out = []
    for seed in seeds:
        config = dict(kind="merging-run", seed=seed, tasks=[list(t) for t in TASKS], base_steps=BASE_STEPS,
                      expert_steps=EXPERT_STEPS, lambdas=list(LAMBDAS), version=1)
        out.append(cached_json(config, lambda s=seed: run_seed(s, progress=progress)) if use_cache
                   else run_seed(seed, progress=progress))
    return out


def _ordering_verdict(claim: str, gaps: Sequence[float], *, what: str, min_gap: float = 0.005) -> Verdict:
    """holds if the gap is > min_gap in every seed, does not hold if < −min_gap in every seed, else inconclusive."""
    numbers = dict(gaps=[round(g, 4) for g in gaps])
    listed = ", ".join(f"{g:+.3f}" for g in gaps)
    if all(g > min_gap for g in gaps):
        return Verdict(claim, "holds", f"{what} in every seed ({listed})", numbers)
    if all(g < -min_gap for g in gaps):
        return Verdict(claim, "does not hold at this scale", f"the opposite in every seed ({listed})", numbers)
    return Verdict(claim, "inconclusive (within seed spread)", f"gaps {listed} change sign or are < {min_gap}",
                   numbers)


def verdicts(runs: Sequence[dict], *, keep_tolerance: float = 0.02) -> list[Verdict]:
    """The issue's claims, decided from the numbers of `runs` (one per seed)."""
    def mean(run, method):
        return run["methods"][method]["mean"]

    out = []
    gaps = [mean(r, "ties") - mean(r, "task_arithmetic") for r in runs]
    out.append(_ordering_verdict("TIES beats task arithmetic", gaps, what="TIES's mean task accuracy is higher"))
    gaps = [mean(r, "ties") - mean(r, "linear") for r in runs]
    out.append(_ordering_verdict("TIES beats weight averaging", gaps, what="TIES's mean task accuracy is higher"))
    gaps = [mean(r, "fisher") - mean(r, "linear") for r in runs]
    out.append(_ordering_verdict("Fisher merging beats plain averaging", gaps, what="Fisher is higher"))
    # DARE keeps performance: accuracy at p = 0.9 within keep_tolerance of the expert's
    i90 = runs[0]["dare"]["drop_rates"].index(0.9)
    gaps = [keep_tolerance - (r["dare"]["dare"][0] - r["dare"]["dare"][i90]) for r in runs]
    out.append(_ordering_verdict(f"DARE keeps the expert's accuracy at drop rate 0.9 (within {keep_tolerance:.0%})",
                                 gaps, what="the drop costs less than the tolerance", min_gap=0.0))
    i99 = runs[0]["dare"]["drop_rates"].index(0.99)
    gaps = [r["dare"]["darex_q"][i99] - r["dare"]["dare"][i99] for r in runs]
    out.append(_ordering_verdict("DAREx-q beats DARE at drop rate 0.99", gaps, what="DAREx-q is more accurate"))
    gaps = [r["alignment"]["barrier_naive"] - r["alignment"]["barrier_aligned"] for r in runs]
    out.append(_ordering_verdict("weight matching lowers the interpolation loss barrier", gaps,
                                 what="the aligned barrier is lower", min_gap=0.01))
    return out


def recorded_runs(path: Path | None = None) -> list[dict]:
    path = path or RESULTS_DIR / "merging.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep merging` to record it")
    return json.loads(path.read_text())["runs"]


def compare_with_recorded(live: Sequence[dict], recorded: Sequence[dict], *, tolerance: float = 0.03) -> list[str]:
    """Differences between live runs and the recorded ones for the same seeds ([] = agree within `tolerance`)."""
    problems = []
    by_seed = {r["seed"]: r for r in recorded}
    for run in live:
        rec = by_seed.get(run["seed"])
        if rec is None:
            problems.append(f"seed {run['seed']} is not recorded")
            continue
        for method, row in run["methods"].items():
            ref = rec["methods"][method]["mean"]
            if abs(row["mean"] - ref) > tolerance:
                problems.append(f"seed {run['seed']} {method}: mean accuracy {row['mean']:.3f} vs recorded {ref:.3f}")
        for key in ("barrier_naive", "barrier_aligned"):
            a, b = run["alignment"][key], rec["alignment"][key]
            if abs(a - b) > max(tolerance, 0.1 * abs(b)):
                problems.append(f"seed {run['seed']} {key}: {a:.3f} vs recorded {b:.3f}")
    return problems


def record_merging(path: Path | None = None, *, progress: bool = True) -> Path:
    """Run every seed of `SEEDS` without the cache and write the runs with machine and date."""
    import datetime as dt
    import os
    import platform

    import lablib

    torch.set_num_threads(1)
    path = path or RESULTS_DIR / "merging.json"
    runs = run_seeds(SEEDS, use_cache=False, progress=progress)
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep merging",
        config=dict(tasks=[list(t) for t in TASKS], hidden=HIDDEN, base_steps=BASE_STEPS, expert_steps=EXPERT_STEPS,
                    lambdas=list(LAMBDAS), seeds=list(SEEDS), drop_rates=list(DROP_RATES),
                    align_hidden=list(ALIGN_HIDDEN), align_steps=ALIGN_STEPS),
        runs=runs,
        verdicts=[dict(claim=v.claim, verdict=v.verdict, reason=v.reason) for v in verdicts(runs)],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_sign_conflicts(answer: float, task_vectors: Sequence[Mapping[str, torch.Tensor]], *, key: str) -> bool:
    """Exercise: the fraction of entries of `key` where the task vectors do not all share one sign."""
    stacked = torch.stack([tv[key] for tv in task_vectors])
    signs = torch.sign(stacked)
    expected = float(((signs > 0).any(0) & (signs < 0).any(0)).float().mean())
    ok = abs(answer - expected) < 1e-6
    print("correct" if ok else "not quite: count entries where some task vector is > 0 and another < 0")
    return ok
