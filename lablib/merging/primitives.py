"""Tensor-level building blocks of the task-vector merges, under PEFT's names.

* `prune(tensor, density=..., method="magnitude" | "random")`: TIES's *trim* and DARE's *drop*.
* `calculate_majority_sign_mask(stacked, method="total" | "frequency")`: TIES's *elect*.
* `disjoint_merge(stacked, mask)`: TIES's *disjoint mean*.

They follow `peft.utils.merge_utils` (same names, same arguments as keywords, same results on the same inputs and
RNG state) with three documented extensions: `prune` takes a `generator` (None draws from torch's global RNG, as
PEFT does), mergekit's `rescale_norm` ("l1" | "l2" | "linf": match that norm of the tensor before pruning instead of
dividing by `density`), and DAREx-q's `q` (divide the kept entries by `q` instead of `density`). Magnitude pruning keeps
exactly ⌊density·numel⌋ entries, breaking ties in magnitude by position (a stable sort), where PEFT's `topk`
breaks them arbitrarily.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

__all__ = [
    "RESCALE_NORMS",
    "magnitude_mask",
    "threshold_mask",
    "random_mask",
    "rescale_to_norm",
    "prune",
    "elect_sign",
    "calculate_majority_sign_mask",
    "disjoint_merge",
]

RESCALE_NORMS = ("l1", "l2", "linf")
# mergekit's tolerance below which a norm counts as zero and no rescaling happens
_NORM_EPS = 1e-7


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number in [0, 1], got {density!r}")
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1] (the kept fraction), got {density!r}")
    return float(density)


def magnitude_mask(tensor: torch.Tensor, *, density: float) -> torch.Tensor:
    """Boolean mask of the ⌊density·numel⌋ largest-magnitude entries (ties broken by position, earlier first)."""
    density = _check_density(density)
    k = int(density * tensor.numel())
    flat = tensor.detach().abs().reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=tensor.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(tensor.shape)


def threshold_mask(tensor: torch.Tensor, *, threshold: torch.Tensor | float) -> torch.Tensor:
    """Boolean mask of the entries with |x| ≥ threshold (the official TIES code's rule: ties at the threshold kept)."""
    return tensor.detach().abs() >= threshold


def random_mask(tensor: torch.Tensor, *, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Bernoulli(density) keep-mask shaped like `tensor`, as a float tensor of 0s and 1s (DARE's m).

    Drawn as `torch.bernoulli(full_like(tensor, density))` (PEFT's call, so the same global RNG state gives the same
    mask), in float32 when `tensor` is half precision (CPU Bernoulli has no float16 kernel).
    """
    density = _check_density(density)
    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    return torch.bernoulli(torch.full_like(work, fill_value=density), generator=generator)


def rescale_to_norm(original: torch.Tensor, masked: torch.Tensor, *, norm: str) -> torch.Tensor:
    """Scale `masked` so its `norm` ("l1" | "l2" | "linf") equals `original`'s (mergekit's `rescaled_masked_tensor`).

    Either norm below 1e-7 leaves `masked` as it is.
    """
    if norm == "l1":
        before, after = original.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = original.norm(), masked.norm()
    elif norm == "linf":
        before, after = original.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"rescale_norm must be one of {RESCALE_NORMS} or None, got {norm!r}")
    if original.numel() == 0 or before < _NORM_EPS or after < _NORM_EPS:
        return masked
    # x̃ ← x̃ · ‖x‖ / ‖x̃‖
    return masked * (before / after)


def prune(
    tensor: torch.Tensor,
    *,
    density: float,
    method: Literal["magnitude", "random"] = "magnitude",
    rescale: bool = False,
    rescale_norm: str | None = None,
    q: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep a `density` fraction of `tensor`'s entries and zero the rest (PEFT's `prune`, extended).

    * `method="magnitude"`: keep the ⌊density·numel⌋ largest |x| (TIES's trim).
    * `method="random"`: keep each entry with probability `density` (DARE's drop with p = 1 − density), drawing from
      `generator` (None: torch's global RNG, so `torch.manual_seed(s)` reproduces PEFT's mask exactly).
    * `rescale=True` (random only, as in PEFT): `rescale_norm=None` divides the kept entries by `density`, DARE's
      1/(1 − p), which keeps the expectation: E[m ⊙ x / (1 − p)] = x. With `q` it divides by `q` instead (DAREx-q).
      `rescale_norm="l1" | "l2" | "linf"` instead matches that norm of the unpruned tensor (mergekit's DARE).

    `density >= 1` returns `tensor` unchanged (no pruning, no rescale; PEFT warns, so does this) unless `q` is given,
    in which case the result is `tensor / q`. `density == 0` returns zeros (nothing to rescale). Never modifies its
    input; returns a new tensor except in the unchanged case.
    """
    density = _check_density(density)
    if method not in ("magnitude", "random"):
        raise ValueError(f"method must be 'magnitude' or 'random', got {method!r}")
    if rescale_norm is not None and rescale_norm not in RESCALE_NORMS:
        raise ValueError(f"rescale_norm must be one of {RESCALE_NORMS} or None, got {rescale_norm!r}")
    if q is not None:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(f"q (DAREx-q's rescale: kept entries are divided by q) must be in (0, 1], got {q!r}")
        if rescale_norm is not None:
            raise ValueError("q and rescale_norm are two different rescalings; give one of them")
    if density >= 1:
        if q is not None and rescale:
            # δ̃ = δ / q: DAREx-q with nothing dropped
            return tensor / q
        if q is None:
            warnings.warn(f"density {density} >= 1: no pruning is done", stacklevel=2)
        return tensor
    if method == "magnitude":
        mask = magnitude_mask(tensor, density=density)
        pruned = tensor * mask
        return rescale_to_norm(tensor, pruned, norm=rescale_norm) if (rescale and rescale_norm) else pruned
    mask = random_mask(tensor, density=density, generator=generator)
    work = tensor if tensor.dtype == mask.dtype else tensor.to(mask.dtype)
    # m ~ Bernoulli(1 − p) elementwise; δ̃ = m ⊙ δ
    pruned = work * mask
    if rescale and density > 0:
        if rescale_norm is not None:
            pruned = rescale_to_norm(work, pruned, norm=rescale_norm)
        else:
            # δ̃ = m ⊙ δ / (1 − p)   (DARE);   δ̃ = m ⊙ δ / q   (DAREx-q)
            pruned = pruned / (density if q is None else q)
    return pruned.to(tensor.dtype)


def elect_sign(
    stacked: torch.Tensor, *, method: Literal["total", "frequency"] = "total", zero_sign: str | float = "positive"
) -> torch.Tensor:
    """The elected sign γ (+1, −1, or 0) per entry of `stacked` (T, ...): TIES's "elect".

    * `method="total"`: γ = sgn(Σ_t x_t), the sign with more total mass (the paper's choice).
      `"frequency"`: γ = sgn(Σ_t sgn(x_t)), the sign more models agree on.
    * `zero_sign` says what a tie (Σ = 0) elects: `"positive"` +1 (PEFT and mergekit, `sum >= 0`), `"majority"` the
      sign of Σ of the elected signs over the whole tensor (the official TIES code's `resolve_zero_signs`), or a
      number (-1, 0, 1) given by the caller (used for a majority taken over several tensors).
    """
    if stacked.dim() < 1 or stacked.shape[0] < 1:
        raise ValueError(f"stacked must have the models on dim 0, got shape {tuple(stacked.shape)}")
    if method == "total":
        # γ_j = sgn(Σ_t x_tj)
        score = stacked.sum(dim=0)
    elif method == "frequency":
        # γ_j = sgn(Σ_t sgn(x_tj))
        score = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    sign = score.sign()
    if zero_sign == "positive":
        return torch.where(score >= 0, torch.ones_like(sign), -torch.ones_like(sign))
    if zero_sign == "majority":
        fill = sign.sum().sign()
    elif isinstance(zero_sign, (int, float)) and not isinstance(zero_sign, bool) and zero_sign in (-1, 0, 1):
        fill = torch.tensor(float(zero_sign), dtype=sign.dtype, device=sign.device)
    else:
        raise ValueError(f"zero_sign must be 'positive', 'majority' or one of -1, 0, 1, got {zero_sign!r}")
    return torch.where(sign == 0, fill.to(sign.dtype), sign)


def calculate_majority_sign_mask(
    stacked: torch.Tensor, *, method: Literal["total", "frequency"] = "total", zero_sign: str | float = "positive"
) -> torch.Tensor:
    """Boolean mask (T, ...) of the entries whose sign agrees with the elected sign (PEFT's name; TIES's "elect").

    Exact zeros (trimmed or dropped entries) are never in the mask. The defaults reproduce
    `peft.utils.merge_utils.calculate_majority_sign_mask`; see `elect_sign` for the options.
    """
    gamma = elect_sign(stacked, method=method, zero_sign=zero_sign)
    return (stacked.sign() == gamma) & (stacked != 0)


def disjoint_merge(
    stacked: torch.Tensor, mask: torch.Tensor, *, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """TIES's disjoint mean: Σ_{t∈A_j} x_tj / max(|A_j|, 1) with A_j the models in `mask` (PEFT's `disjoint_merge`).

    `divisor` (broadcastable to one entry per position) replaces |A_j|, e.g. the summed weights of the agreeing
    models (mergekit); entries where it is 0 divide by 1.
    """
    if mask.shape != stacked.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but stacked has {tuple(stacked.shape)}")
    # Σ_{t ∈ A_j} x_tj
    total = (stacked * mask).sum(dim=0)
    if divisor is None:
        # |A_j|, at least 1
        divisor = mask.sum(dim=0).to(total.dtype).clamp(min=1.0)
    else:
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor
