"""Weight averaging and the task-vector merges: task arithmetic, TIES, DARE, DAREx-q, PCB.

All but `linear` work on task vectors τ_t = θ_t − θ_0 and return θ_0 + λ·(a combination of the τ_t). TIES, DARE and
their relatives are one pipeline (mergekit's "generalized task arithmetic"), run per key:

    sparsify each τ_t (trim by magnitude | drop at random | none)
      -> weight them (w_t τ̃_t) -> elect a sign per entry (or not) -> sum the agreeing entries
      -> normalize (÷ count or ÷ Σ agreeing weights, or not) -> × λ -> add to θ_0

**Where the libraries disagree** (see `CONVENTIONS`, and each method's docstring). PEFT, mergekit and the papers'
official code run this pipeline with different details. Every detail is an option; `convention=` picks a consistent
set, and any single option can still be overridden:

* `"peft"` (the default): `peft.utils.merge_utils`. The magnitude trim is per tensor and keeps exactly
  ⌊density·n⌋ entries (`scope="per_tensor"`); signs are elected on the unweighted trimmed τ̃_t
  (`elect_on="unweighted"`); the disjoint mean divides by the count of agreeing models (`normalize_by="count"`); an
  exact tie (Σ = 0) elects + (`zero_sign="positive"`); DARE divides the kept entries by 1 − p
  (`rescale_norm="density"`); `dare_ties` normalizes.
* `"mergekit"`: mergekit's `GeneralizedTaskArithmeticMerge`. Per-tensor trim as PEFT; signs elected on the weighted
  w_t τ̃_t (`elect_on="weighted"`); `normalize` divides by the summed weights of the agreeing models
  (`normalize_by="weight"`); ties elect +; DARE rescales each pruned task vector back to its L1 norm
  (`rescale_norm="l1"`); `dare_ties` does not normalize (the agreeing weighted deltas are summed).
* `"official"`: the papers' code. TIES trims all keys flattened together (`scope="global"`) and keeps |x| ≥ the
  (n − ⌊density·n⌋)-th smallest magnitude, one entry more than ⌊density·n⌋ and ties kept; elects on unweighted
  deltas; divides by the count; fills exact ties with the majority of all elected signs (`zero_sign="majority"`).
  DARE divides by 1 − p, as PEFT.

λ is a scalar, so multiplying before or after the disjoint mean gives the same result (it cannot change which models
agree with the elected sign); all three apply it last, and so does lablib. The per-model `weight` is where they
differ: PEFT multiplies after the election (a weight is a per-task scaling coefficient), mergekit before the election
and again in the divisor (a weight is a relative importance, and the result is a weighted mean). So folding λ into
the weights works under PEFT's convention but cancels under mergekit's `normalize` (λw / Σλw = w / Σw): there, scale
with `lambda_`.

Papers:
* task arithmetic: Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023
  ([arXiv:2212.04089](https://arxiv.org/abs/2212.04089));
* TIES: Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, NeurIPS 2023
  ([arXiv:2306.01708](https://arxiv.org/abs/2306.01708));
* DARE: Yu et al., *Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch*,
  ICML 2024 ([arXiv:2311.03099](https://arxiv.org/abs/2311.03099));
* DAREx-q: Deng et al., *DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models*, ICLR 2025
  ([arXiv:2410.09344](https://arxiv.org/abs/2410.09344));
* PCB: Du et al., *Parameter Competition Balancing for Model Merging*, NeurIPS 2024
  ([arXiv:2410.02396](https://arxiv.org/abs/2410.02396)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lablib.merging.core import (
    StateDict,
    check_choice,
    check_fraction,
    check_number,
    compute_dtype,
    merge_method,
    per_model,
    plan_merge,
)
from lablib.merging.primitives import (
    RESCALE_NORMS,
    calculate_majority_sign_mask,
    disjoint_merge,
    elect_sign,
    magnitude_mask,
    prune,
    threshold_mask,
)

__all__ = [
    "CONVENTIONS",
    "TaskArithmeticOptions",
    "resolve_options",
    "linear",
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
    "darex_q",
    "DARExQSearch",
    "darex_q_search",
    "pcb",
    "pcb_scores",
    "PCBScores",
    "key_generator",
]

CONVENTIONS = ("peft", "mergekit", "official")
_CONVENTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "peft": {
        "scope": "per_tensor", "elect_on": "unweighted", "normalize_by": "count", "zero_sign": "positive",
        "rescale_norm": "density",
    },
    "mergekit": {
        "scope": "per_tensor", "elect_on": "weighted", "normalize_by": "weight", "zero_sign": "positive",
        "rescale_norm": "l1",
    },
    "official": {
        "scope": "global", "elect_on": "unweighted", "normalize_by": "count", "zero_sign": "majority",
        "rescale_norm": "density",
    },
}
_SPARSIFICATION = {
    "task_arithmetic": None, "magnitude_prune": "magnitude", "ties": "magnitude",
    "dare_linear": "random", "dare_ties": "random", "darex_q": "random",
}
_CONSENSUS = {"ties", "dare_ties"}


@dataclass(frozen=True)
class TaskArithmeticOptions:
    """The resolved options of one generalized task-arithmetic merge (what `resolve_options` returns).

    * `sparsification`: None, "magnitude" (TIES trim) or "random" (DARE drop).
    * `consensus`: None (no sign election) or the `majority_sign_method`, "total" | "frequency".
    * `scope`, `elect_on`, `normalize`, `normalize_by`, `zero_sign`, `rescale`, `rescale_norm`: see the module table.
    """

    method: str
    convention: str
    sparsification: str | None
    consensus: str | None
    scope: str
    elect_on: str
    normalize: bool
    normalize_by: str
    zero_sign: str
    rescale: bool
    rescale_norm: str


def resolve_options(
    method: str,
    *,
    convention: str = "peft",
    majority_sign_method: str = "total",
    normalize: bool | None = None,
    normalize_by: str | None = None,
    elect_on: str | None = None,
    zero_sign: str | None = None,
    scope: str | None = None,
    rescale: bool = True,
    rescale_norm: str | None = None,
) -> TaskArithmeticOptions:
    """Fill the options left at None from `convention` (see the module table) and check them all."""
    check_choice("method", method, list(_SPARSIFICATION))
    check_choice("convention", convention, CONVENTIONS)
    defaults = _CONVENTION_DEFAULTS[convention]
    consensus = majority_sign_method if method in _CONSENSUS else None
    if consensus is not None:
        check_choice("majority_sign_method", consensus, ("total", "frequency"))
    if normalize is None:
        normalize = method in _CONSENSUS and not (method == "dare_ties" and convention == "mergekit")
    options = TaskArithmeticOptions(
        method=method,
        convention=convention,
        sparsification=_SPARSIFICATION[method],
        consensus=consensus,
        scope=defaults["scope"] if scope is None else scope,
        elect_on=defaults["elect_on"] if elect_on is None else elect_on,
        normalize=normalize,
        normalize_by=defaults["normalize_by"] if normalize_by is None else normalize_by,
        zero_sign=defaults["zero_sign"] if zero_sign is None else zero_sign,
        rescale=rescale,
        rescale_norm=defaults["rescale_norm"] if rescale_norm is None else rescale_norm,
    )
    check_choice("scope", options.scope, ("per_tensor", "global"))
    check_choice("elect_on", options.elect_on, ("weighted", "unweighted"))
    check_choice("normalize_by", options.normalize_by, ("count", "weight"))
    check_choice("zero_sign", options.zero_sign, ("positive", "majority"))
    check_choice("rescale_norm", options.rescale_norm, ("density", *RESCALE_NORMS))
    if not isinstance(options.normalize, bool):
        raise TypeError(f"normalize must be a bool, got {options.normalize!r}")
    if not isinstance(options.rescale, bool):
        raise TypeError(f"rescale must be a bool, got {options.rescale!r}")
    return options


def key_generator(seed: int | None, model_index: int, key: str, *, device: torch.device) -> torch.Generator | None:
    """The generator DARE draws model `model_index`'s mask for `key` from: one per (seed, model, key), so a mask does
    not depend on which other keys are merged or in what order. `seed=None` returns None: torch's global RNG, drawn
    key by key and, within a key, model by model (PEFT's order for one tensor)."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}|{model_index}|{key}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise TypeError(f"seed must be a non-negative int or None (torch's global RNG), got {seed!r}")


def _view_per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    # (T,) -> (T, 1, ..., 1) to broadcast against stacked (T, *shape)
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def _global_thresholds(deltas: dict[str, list[torch.Tensor]], densities: Sequence[float]) -> list[torch.Tensor | None]:
    """Per model, the official TIES trim threshold over all keys flattened: the (D − ⌊density·D⌋)-th smallest |x|."""
    thresholds: list[torch.Tensor | None] = []
    for t, density in enumerate(densities):
        if density >= 1:
            thresholds.append(None)
            continue
        flat = torch.cat([d[t].abs().reshape(-1) for d in deltas.values()])
        size = flat.numel()
        rank = size - int(density * size)
        # kthvalue is 1-based; rank 0 would mean "keep everything", handled by density >= 1 above
        thresholds.append(flat.kthvalue(max(rank, 1)).values if size else None)
    return thresholds


def _generalized_task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    options: TaskArithmeticOptions,
    weight: Any,
    density: Any,
    lambda_: Any,
    q: Any = None,
    seed: Any = 0,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    method = options.method
    plan = plan_merge(base, models, needs_base=True, exclude=exclude, method=method)
    n_models = len(models)
    weights = per_model("weight", weight, n_models, default=1.0)
    densities = per_model("density", density, n_models, default=1.0)
    check_fraction("density", densities)
    qs: list[float | None] = [None] * n_models
    if q is not None:
        qs = list(per_model("q", q, n_models))
        check_fraction("q", qs, low_open=True)
        if options.rescale_norm != "density":
            raise ValueError("q (DAREx-q) replaces the 1/density rescale; it cannot be combined with rescale_norm")
    lambda_ = check_number("lambda_", lambda_)
    _check_seed(seed)

    def deltas_of(key: str) -> list[torch.Tensor]:
        dtype = compute_dtype(plan.reference[key].dtype)
        base_value = base[key].to(dtype)
        # τ_t = θ_t − θ_0
        return [model[key].to(dtype) - base_value for model in models]

    def sparsify(key: str, t: int, delta: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        d = densities[t]
        if options.sparsification == "magnitude":
            if d >= 1:
                return delta
            mask = threshold_mask(delta, threshold=threshold) if options.scope == "global" else magnitude_mask(
                delta, density=d
            )
            # trim: keep the largest |τ| entries, zero the rest
            return delta * mask
        if options.sparsification == "random":
            if d >= 1 and (qs[t] is None or not options.rescale):
                return delta
            generator = key_generator(seed, t, key, device=delta.device)
            norm = None if options.rescale_norm == "density" else options.rescale_norm
            return prune(
                delta, density=d, method="random", rescale=options.rescale, rescale_norm=norm, q=qs[t],
                generator=generator,
            )
        return delta

    use_global = options.sparsification == "magnitude" and options.scope == "global"
    cache: dict[str, list[torch.Tensor]] = {}
    thresholds: list[torch.Tensor | None] = [None] * n_models
    if use_global:
        cache = {key: deltas_of(key) for key in plan.merge_keys}
        thresholds = _global_thresholds(cache, densities)
    zero_fill: str | float = options.zero_sign
    if options.consensus is not None and options.zero_sign == "majority" and use_global:
        # the official code fills ties with the majority of the elected signs over the whole flattened vector
        total = 0.0
        for key in plan.merge_keys:
            stacked = torch.stack([sparsify(key, t, d, thresholds[t]) for t, d in enumerate(cache[key])])
            vote = stacked * _view_per_model(weights, stacked) if options.elect_on == "weighted" else stacked
            total += float(elect_sign(vote, method=options.consensus, zero_sign=0).sum())
        zero_fill = float(math.copysign(1.0, total)) if total != 0 else 0.0

    merged: dict[str, torch.Tensor] = {}
    for key in plan.merge_keys:
        deltas = cache.pop(key) if use_global else deltas_of(key)
        stacked = torch.stack([sparsify(key, t, d, thresholds[t]) for t, d in enumerate(deltas)])
        w = _view_per_model(weights, stacked)
        # w_t τ̃_t
        weighted = stacked * w
        if options.consensus is not None:
            vote = weighted if options.elect_on == "weighted" else stacked
            # A_j = {t : sgn(τ̃_tj) = γ_j, τ̃_tj ≠ 0}
            mask = calculate_majority_sign_mask(vote, method=options.consensus, zero_sign=zero_fill)
            if options.normalize:
                # τ_m,j = Σ_{t∈A_j} w_t τ̃_tj / |A_j|   or   / Σ_{t∈A_j} w_t
                divisor = (w * mask).sum(dim=0) if options.normalize_by == "weight" else None
                mixed = disjoint_merge(weighted, mask, divisor=divisor)
            else:
                # τ_m,j = Σ_{t∈A_j} w_t τ̃_tj
                mixed = (weighted * mask).sum(dim=0)
        else:
            # τ_m = Σ_t w_t τ̃_t
            mixed = weighted.sum(dim=0)
            if options.normalize:
                total_weight = sum(weights) if options.normalize_by == "weight" else float(n_models)
                # ÷ Σ_t w_t (mergekit leaves a near-zero sum alone)
                mixed = mixed / (total_weight if abs(total_weight) >= 1e-8 else 1.0)
        if lambda_ != 1:
            mixed = mixed * lambda_
        # θ = θ_0 + λ τ_m
        merged[key] = base[key].to(mixed.dtype) + mixed
    return plan.finish(merged)


_TA_REF = "https://arxiv.org/abs/2212.04089"
_TIES_REF = "https://arxiv.org/abs/2306.01708"
_DARE_REF = "https://arxiv.org/abs/2311.03099"


# ----------------------------------------------------------------------------------------------------------------
# Averaging and task arithmetic
# ----------------------------------------------------------------------------------------------------------------


@merge_method(
    "linear", needs_base=False, in_mergekit=True, per_model=("weight",), reference="https://arxiv.org/abs/2203.05482"
)
def linear(
    base: StateDict | None,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    normalize: bool = True,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Weight averaging ("model soup"): θ = Σ_t w_t θ_t / Σ_t w_t (mergekit `linear`; Wortsman et al. 2022).

    `weight` defaults to 1 for every model (a uniform average); `normalize=False` returns Σ_t w_t θ_t. `base` is not
    used in the arithmetic (it may be None); when given it fixes the key order and supplies the non-floating tensors.
    A weight sum below 1e-8 is not divided by (mergekit's guard).
    """
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    plan = plan_merge(base, models, needs_base=False, exclude=exclude, method="linear")
    weights = per_model("weight", weight, len(models), default=1.0)
    total = sum(weights)
    merged = {}
    for key in plan.merge_keys:
        dtype = compute_dtype(plan.reference[key].dtype)
        stacked = torch.stack([model[key].to(dtype) for model in models])
        # Σ_t w_t θ_t
        mixed = (stacked * _view_per_model(weights, stacked)).sum(dim=0)
        # ÷ Σ_t w_t
        merged[key] = mixed / total if normalize and abs(total) >= 1e-8 else mixed
    return plan.finish(merged)


@merge_method("task_arithmetic", needs_base=True, in_mergekit=True, per_model=("weight",), reference=_TA_REF)
def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Task arithmetic: θ = θ_0 + λ Σ_t w_t τ_t with τ_t = θ_t − θ_0 (Ilharco et al. 2023).

    Defaults match mergekit `task_arithmetic` (weight 1, `lambda` 1, `normalize` off) and PEFT's `task_arithmetic`
    (weights only). `normalize=True` divides by Σ_t w_t, which with λ = 1 is weight averaging. The paper picks one λ
    on validation data (≈ 0.3–0.4 for 8 tasks; FusionBench's default is 0.3); λ = 1/T is plain averaging, λ = 0
    returns θ_0 exactly, a negative λ *removes* a task (negation).
    """
    options = resolve_options("task_arithmetic", normalize=normalize, normalize_by="weight")
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=None, lambda_=lambda_, exclude=exclude
    )


@merge_method("magnitude_prune", needs_base=True, per_model=("weight", "density"), reference=_TIES_REF)
def magnitude_prune(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 0.2,
    lambda_: float = 1.0,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Trim each task vector to its top-`density` magnitudes (per tensor), then task arithmetic (PEFT's
    `magnitude_prune`): θ = θ_0 + λ Σ_t w_t trim(τ_t). TIES without the sign election. Not a mergekit method."""
    options = resolve_options("magnitude_prune")
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=density, lambda_=lambda_, exclude=exclude
    )


# ----------------------------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------------------------


@merge_method("ties", needs_base=True, in_mergekit=True, per_model=("weight", "density"), reference=_TIES_REF)
def ties(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 0.2,
    lambda_: float = 1.0,
    majority_sign_method: str = "total",
    convention: str = "peft",
    normalize: bool | None = None,
    normalize_by: str | None = None,
    elect_on: str | None = None,
    zero_sign: str | None = None,
    scope: str | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

        τ̃_t = trim(τ_t, density)                       keep the top-density fraction of |τ_t|
        γ_j = sgn(Σ_t τ̃_tj)                             elect the sign with more total mass
        A_j = {t : sgn(τ̃_tj) = γ_j}                     the models that agree with it
        τ_m,j = Σ_{t∈A_j} w_t τ̃_tj / |A_j|              disjoint mean
        θ = θ_0 + λ τ_m

    Defaults: `density=0.2` (the paper's top 20 %; mergekit's default is 1.0, no trimming), λ = 1 (the paper's
    no-validation choice; it tunes λ in [0.8, 2.5]), `majority_sign_method="total"` (the paper; `"frequency"` counts
    signs instead). `convention="peft"` (the default) reproduces `peft.utils.merge_utils.ties` exactly (with `weight`
    as PEFT's `weights`); `"mergekit"` elects on weighted deltas and divides by the agreeing models' summed weights
    (mergekit `ties` with `normalize: true`); `"official"` trims over all keys at once and fills exact sign ties with
    the global majority (prateeky2806/ties-merging). With equal weights and no exact ties, the three differ only in the
    trim scope. Each of `normalize`, `normalize_by`, `elect_on`, `zero_sign`, `scope` overrides its convention.
    """
    options = resolve_options(
        "ties", convention=convention, majority_sign_method=majority_sign_method, normalize=normalize,
        normalize_by=normalize_by, elect_on=elect_on, zero_sign=zero_sign, scope=scope,
    )
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=density, lambda_=lambda_, exclude=exclude
    )


# ----------------------------------------------------------------------------------------------------------------
# DARE and DAREx-q
# ----------------------------------------------------------------------------------------------------------------


@merge_method("dare_linear", needs_base=True, in_mergekit=True, per_model=("weight", "density"), reference=_DARE_REF)
def dare_linear(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 0.1,
    lambda_: float = 1.0,
    rescale: bool = True,
    rescale_norm: str | None = None,
    q: float | Sequence[float] | None = None,
    convention: str = "peft",
    normalize: bool = False,
    seed: int | None = 0,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """DARE then task arithmetic (Yu et al. 2024): drop each delta entry with probability p = 1 − density, rescale.

        m_t ~ Bernoulli(1 − p) elementwise
        τ̃_t = m_t ⊙ τ_t / (1 − p)                       so E[τ̃_t] = τ_t
        θ = θ_0 + λ Σ_t w_t τ̃_t

    Defaults: `density=0.1` (p = 0.9, the paper's typical drop rate; it goes up to 0.99), λ = 1, and the rescale
    ÷ (1 − p) of the paper and PEFT (`convention="peft"`, `rescale_norm="density"`); PEFT's `dare_linear` gives the
    same tensors for the same RNG state (`seed=None` draws from torch's global RNG in PEFT's order). mergekit's
    `dare_linear` instead rescales each pruned task vector to its original L1 norm (`convention="mergekit"` or
    `rescale_norm="l1"`); the two agree only in expectation. `q` switches to DAREx-q's ÷ q (see `darex_q`).
    `seed` makes the masks reproducible: one generator per (seed, model, key), see `key_generator`. The drop and the
    rescale act on task vectors, never on the weights themselves; for LoRA adapters note that pruning the factors A
    and B separately (what PEFT's `add_weighted_adapter` does for its non-SVD combinations) is not pruning ΔW = BA.
    """
    options = resolve_options(
        "dare_linear", convention=convention, normalize=normalize, normalize_by="weight", rescale=rescale,
        rescale_norm=rescale_norm,
    )
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=density, lambda_=lambda_, q=q, seed=seed,
        exclude=exclude,
    )


@merge_method("dare_ties", needs_base=True, in_mergekit=True, per_model=("weight", "density"), reference=_DARE_REF)
def dare_ties(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 0.1,
    lambda_: float = 1.0,
    rescale: bool = True,
    rescale_norm: str | None = None,
    q: float | Sequence[float] | None = None,
    majority_sign_method: str = "total",
    convention: str = "peft",
    normalize: bool | None = None,
    normalize_by: str | None = None,
    elect_on: str | None = None,
    zero_sign: str | None = None,
    seed: int | None = 0,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """DARE's drop and rescale, then TIES's sign election and disjoint merge (Yu et al. 2024, §4).

    `convention="peft"` (default) is `peft.utils.merge_utils.dare_ties` (÷ (1 − p), elect on the unweighted dropped
    deltas, divide by the count of agreeing models) and the paper's "DARE + TIES". `"mergekit"` is mergekit's
    `dare_ties`: L1-norm rescale, election on weighted deltas, and *no* division (`normalize: false`, the agreeing
    weighted deltas are summed). See `dare_linear` for the drop and `ties` for the consensus options.
    """
    options = resolve_options(
        "dare_ties", convention=convention, majority_sign_method=majority_sign_method, normalize=normalize,
        normalize_by=normalize_by, elect_on=elect_on, zero_sign=zero_sign, rescale=rescale,
        rescale_norm=rescale_norm,
    )
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=density, lambda_=lambda_, q=q, seed=seed,
        exclude=exclude,
    )


@merge_method(
    "darex_q", needs_base=True, per_model=("weight", "density", "q"), reference="https://arxiv.org/abs/2410.09344"
)
def darex_q(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    q: float | Sequence[float],
    weight: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 0.1,
    lambda_: float = 1.0,
    seed: int | None = 0,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """DAREx-q (Deng et al. 2025): DARE with the rescale 1/(1 − p) replaced by 1/q.

        τ̃_t = m_t ⊙ τ_t / q_t,   m_t ~ Bernoulli(1 − p)
        θ = θ_0 + λ Σ_t w_t τ̃_t

    Our reading of the paper: at extreme drop rates (p ≥ 0.9) the 1/(1 − p) factor that keeps E[τ̃] = τ also blows up
    the *variance* of each layer's output change, so the pruned model drifts from the fine-tuned one; a q larger
    than 1 − p (a gentler amplification) trades a small bias for much less variance. The paper tunes q on labelled
    validation data, or without labels by making the pruned model's last-layer outputs close to the fine-tuned
    model's on a batch (`darex_q_search` does the latter over a grid). Confidence: medium on the idea and the 1/q
    form, low on the details of the q search (one global q per model here; the paper also discusses per-layer q).
    With q = 1 − p this is `dare_linear` bit for bit (same seed, same masks). Not a mergekit method.
    """
    options = resolve_options("darex_q", normalize=False, rescale=True, rescale_norm="density")
    return _generalized_task_arithmetic(
        base, models, options=options, weight=weight, density=density, lambda_=lambda_, q=q, seed=seed,
        exclude=exclude,
    )


@dataclass
class DARExQSearch:
    """What `darex_q_search` found: the best `q`, and the grid `qs` with each q's `objective` (lower is better)."""

    q: float
    qs: list[float]
    objective: list[float]


def darex_q_search(
    base: StateDict,
    model: StateDict,
    *,
    density: float,
    objective_fn: Callable[[dict[str, torch.Tensor]], float],
    qs: Sequence[float] | None = None,
    num: int = 20,
    seed: int | None = 0,
) -> DARExQSearch:
    """Pick DAREx-q's `q` for one fine-tuned `model`: the q on a grid minimising `objective_fn(pruned state dict)`.

    The label-free choice of the paper: `objective_fn` measures how far the pruned model's outputs are from the
    fine-tuned model's on a batch, e.g. `mean |f_ft(x) − f_q(x)|` on logits. The default grid is `num` log-spaced
    values from 1 − p (= `density`, plain DARE) to 1 (no rescale). Every q uses the same mask (same `seed`).
    """
    check_fraction("density", [check_number("density", density)], low_open=True)
    if not callable(objective_fn):
        raise TypeError(f"objective_fn must be callable(state_dict) -> float, got {type(objective_fn).__name__}")
    if qs is None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        low, high = math.log(density), 0.0
        # q_i = exp(log(1 − p) + i/(num − 1) · (0 − log(1 − p))), i = 0..num − 1
        qs = [math.exp(low + (high - low) * i / max(num - 1, 1)) for i in range(num)]
        qs[0], qs[-1] = float(density), 1.0
    qs = [float(v) for v in qs]
    check_fraction("qs", qs, low_open=True)
    values = []
    for value in qs:
        state = darex_q(base, [model], q=value, density=density, seed=seed)
        values.append(float(objective_fn(state)))
    best = min(range(len(qs)), key=lambda i: values[i])
    return DARExQSearch(q=qs[best], qs=qs, objective=values)


# ----------------------------------------------------------------------------------------------------------------
# PCB
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PCBScores:
    """PCB's intermediate quantities on flattened task vectors `V` (T, D), for plots and tests.

    * `clipped`: Ṽ, the task vectors with their magnitudes clipped to the [clip_ratio, 1 − clip_ratio] quantiles.
    * `intra`, `inter`: the intra- and inter-balancing scores; `balance` = their product β.
    * `scale`: the final per-entry weights in [0, 1] (0 for the dropped entries).
    * `merged`: Σ_t weight_t · scale_t ⊙ Ṽ_t / Σ_t scale_t (before λ).
    """

    clipped: torch.Tensor
    intra: torch.Tensor
    inter: torch.Tensor
    balance: torch.Tensor
    scale: torch.Tensor
    merged: torch.Tensor


def _minmax(x: torch.Tensor) -> torch.Tensor:
    # (x − min) / (max − min) along the last dim; a constant row maps to 0
    low = x.min(dim=-1, keepdim=True).values
    high = x.max(dim=-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def pcb_scores(
    flat: torch.Tensor,
    *,
    density: float = 0.1,
    weight: Sequence[float] | None = None,
    balance: str = "official",
    clip_ratio: float = 1e-4,
) -> PCBScores:
    """PCB on flattened task vectors `flat` (T, D); see `pcb` for the steps. Computes in at least float32."""
    if flat.dim() != 2 or flat.shape[0] < 1 or flat.shape[1] < 1:
        raise ValueError(f"flat must be a (models, entries) matrix, got shape {tuple(flat.shape)}")
    check_fraction("density", [check_number("density", density)])
    check_choice("balance", balance, ("official", "paper"))
    clip_ratio = check_number("clip_ratio", clip_ratio)
    if not 0 <= clip_ratio < 0.5:
        raise ValueError(f"clip_ratio must be in [0, 0.5), got {clip_ratio!r}")
    n_models, size = flat.shape
    weights = per_model("weight", weight, n_models, default=1.0)
    v = flat.to(compute_dtype(flat.dtype))
    magnitude = v.abs()
    ordered = magnitude.sort(dim=1).values
    low = ordered[:, int(size * clip_ratio)].unsqueeze(1)
    high = ordered[:, max(int(size * (1 - clip_ratio)) - 1, 0)].unsqueeze(1)
    # |Ṽ| = clamp(|V|, q_low, q_high) per task;  Ṽ = sgn(V) |Ṽ|
    clipped_magnitude = torch.minimum(torch.maximum(magnitude, low), high)
    clipped = v.sign() * clipped_magnitude
    if balance == "official":
        # intra_t = exp(T · minmax(|Ṽ_t|)²)
        intra = torch.exp(n_models * _minmax(clipped_magnitude) ** 2)
        # inter_t = tanh(V_t ⊙ Σ_t' V_t')
        inter = torch.tanh(v * v.sum(dim=0, keepdim=True))
    else:
        # intra_t = softmax_D(T · minmax(Ṽ_t ⊙ Ṽ_t))
        intra = torch.softmax(n_models * _minmax(clipped_magnitude**2), dim=1)
        # inter_t = Σ_t' softmax_D(minmax(V_t ⊙ V_t'))
        inter = torch.stack([torch.softmax(_minmax(v[t] * v), dim=1).sum(dim=0) for t in range(n_models)])
    # β_t = intra_t ⊙ inter_t
    beta = intra * inter
    ordered_beta = beta.sort(dim=1).values
    floor = ordered_beta[:, min(int(size * (1 - density)), size - 1)].unsqueeze(1)
    # keep the top `density` of β_t: raise everything below the rank-⌊D(1 − r)⌋ value to it, min-max to [0, 1]
    scale = _minmax(torch.maximum(beta, floor))
    w = torch.tensor(weights, dtype=v.dtype, device=v.device).unsqueeze(1)
    # τ_m = Σ_t w_t s_t ⊙ Ṽ_t / max(Σ_t s_t, 1e-12)
    merged = (w * scale * clipped).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
    return PCBScores(clipped=clipped, intra=intra, inter=inter, balance=beta, scale=scale, merged=merged)


@merge_method("pcb", needs_base=True, per_model=("weight",), reference="https://arxiv.org/abs/2410.02396")
def pcb(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    density: float = 0.1,
    lambda_: float = 1.0,
    weight: float | Sequence[float] | None = None,
    balance: str = "official",
    clip_ratio: float = 1e-4,
    scope: str = "global",
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """PCB-merging (Du et al. 2024): score every entry of every task vector for its importance within its task and
    its agreement across tasks, drop the low scores, and take the score-weighted mean.

        |Ṽ_t| = clip(|V_t|) to its [clip_ratio, 1 − clip_ratio] quantiles,  Ṽ_t = sgn(V_t)|Ṽ_t|
        intra_t = exp(T · minmax(|Ṽ_t|)²)                  importance within the task
        inter_t = tanh(V_t ⊙ Σ_t' V_t')                    agreement with the other tasks
        β_t = intra_t ⊙ inter_t;  s_t = minmax(max(β_t, β_t at rank ⌊D(1 − density)⌋))   s_t ∈ [0, 1]
        τ_m = Σ_t w_t s_t ⊙ Ṽ_t / Σ_t s_t;   θ = θ_0 + λ τ_m

    This is the official code (duguodong7/pcb-merging), `balance="official"`: V is flattened over all keys
    (`scope="global"`; `"per_tensor"` scores each tensor on its own). Its drop keeps D − ⌊D(1 − density)⌋ − 1
    entries per task (the threshold entry itself maps to 0). `balance="paper"` uses the paper's formulas instead,
    intra_t = softmax(T · minmax(τ_t ⊙ τ_t)) and inter_t = Σ_t' softmax(minmax(τ_t ⊙ τ_t')), which differ from the
    code. Defaults: `density=0.1` (the code's `pcb_ratio`), λ = 1 (the code uses 1.2, or searches per-task λ_t in
    [0.8, 1.3] with nevergrad); per-model `weight` plays those λ_t, entering the numerator only (our choice: the
    code does not show where λ_t enters). Not a mergekit method (mergekit has an open PR).
    """
    check_choice("scope", scope, ("global", "per_tensor"))
    plan = plan_merge(base, models, needs_base=True, exclude=exclude, method="pcb")
    lambda_ = check_number("lambda_", lambda_)
    weights = per_model("weight", weight, len(models), default=1.0)
    groups = [plan.merge_keys] if scope == "global" else [[key] for key in plan.merge_keys]
    merged: dict[str, torch.Tensor] = {}
    for group in groups:
        if not group:
            continue
        dtype = compute_dtype(max((plan.reference[k].dtype for k in group), key=lambda d: torch.finfo(d).bits))
        rows = []
        for model in models:
            # V_t = θ_t − θ_0, flattened over the group's keys
            rows.append(torch.cat([(model[k].to(dtype) - base[k].to(dtype)).reshape(-1) for k in group]))
        scores = pcb_scores(
            torch.stack(rows), density=density, weight=weights, balance=balance, clip_ratio=clip_ratio
        )
        offset = 0
        for key in group:
            ref = plan.reference[key]
            piece = scores.merged[offset : offset + ref.numel()].reshape(ref.shape)
            offset += ref.numel()
            # θ = θ_0 + λ τ_m
            merged[key] = base[key].to(dtype) + (piece * lambda_ if lambda_ != 1 else piece)
    return plan.finish(merged)
