"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., *No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces*, ICML 2025, [arXiv:2502.04959](https://arxiv.org/abs/2502.04959)).

Task arithmetic's sum Δ = Σ_t τ_t of a weight matrix has a skewed singular spectrum: a few directions, shared by
many tasks, dominate, and the directions only one task uses are drowned. Iso-C keeps Δ's singular *vectors* and
replaces its singular *values* by their mean, so every direction counts the same ("isotropic"). Iso-CTS first
reserves part of the rank for each task's own directions (orthogonal to the common subspace), then does the same.

Only 2-D weights are treated this way; every other tensor (biases, norms, convolution kernels) and every key matching
`exclude` (for instance large embedding tables, as the paper excludes) falls back to task arithmetic on the mean
task vector, θ_0 + λ·(1/T)Σ_t τ_t, as the official code and FusionBench do (`fallback="sum"`: θ_0 + λ Σ_t τ_t).
Excluded 2-D keys fall back the same way rather than being copied, unlike the other methods' `exclude`.
SVDs run in float64 on the tensor's device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from lablib.merging.core import StateDict, check_choice, check_number, compute_dtype, merge_method, plan_merge

__all__ = ["iso_c", "iso_cts", "iso_c_matrix", "iso_cts_matrix", "iso_cts_ranks", "polar_factor"]

_REF = "https://arxiv.org/abs/2502.04959"


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of `matrix` = P S Qᵀ: the nearest matrix with orthonormal columns (or rows)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def iso_c_matrix(delta: torch.Tensor) -> torch.Tensor:
    """Iso-C for one summed task matrix Δ = U Σ Vᵀ: mean(diag Σ) · U Vᵀ (float64 in, float64 out)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # Δ_iso = σ̄ U Vᵀ with σ̄ = (1/r) Σ_i σ_i: every singular value replaced by their mean
    return s.mean() * (u @ vh)


def iso_cts_ranks(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's split of the rank r = min(m, n) into k common directions and s per task, with k + s·T = r.

    k = ⌊r·f⌋, s = round((r − k)/T), then k = r − s·T (the official code's rounding). We also cap s at ⌊r/T⌋, which
    the official code does not, so k never goes negative when T does not divide r.
    """
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / n_tasks)
    per_task = min(per_task, rank // n_tasks)
    return rank - per_task * n_tasks, per_task


def iso_cts_matrix(task_matrices: Sequence[torch.Tensor], *, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS for one weight: common subspace of Σ_t τ_t plus each task's own top directions, then isotropic.

        Δ = Σ_t τ_t = U Σ Vᵀ;  U_c, σ_c, V_c = its top-k triplets                 (common subspace)
        τ̄_t = τ_t − U_c U_cᵀ τ_t;  U_t, σ_t, V_t = top-s triplets of τ̄_t        (task-specific subspaces)
        U = polar([U_c, U_1, …, U_T]),  V = polar([V_c, V_1, …, V_T])            (orthonormalize)
        Δ_iso = mean([σ_c, σ_1, …, σ_T]) · U Vᵀ
    """
    stack = torch.stack(list(task_matrices))
    n_tasks, rows, cols = stack.shape
    common, per_task = iso_cts_ranks(min(rows, cols), n_tasks, common_space_fraction)
    u, s, vh = torch.linalg.svd(stack.sum(dim=0), full_matrices=False)
    u_parts, s_parts, vh_parts = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        u_common = u[:, :common]
        for task in stack:
            # τ̄_t = (I − U_c U_cᵀ) τ_t: the part of τ_t outside the common subspace
            residual = task - u_common @ (u_common.T @ task)
            ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
            u_parts.append(ut[:, :per_task])
            s_parts.append(st[:per_task])
            vh_parts.append(vht[:per_task])
    u_all = polar_factor(torch.cat(u_parts, dim=1))
    vh_all = polar_factor(torch.cat(vh_parts, dim=0))
    # Δ_iso = σ̄ U Vᵀ
    return torch.cat(s_parts).mean() * (u_all @ vh_all)


def _isotropic(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    method: str,
    lambda_: float,
    fallback: str,
    exclude: Sequence[str],
    common_space_fraction: float | None,
) -> dict[str, torch.Tensor]:
    check_choice("fallback", fallback, ("mean", "sum"))
    lambda_ = check_number("lambda_", lambda_)
    # excluded keys still fall back to task arithmetic, so the plan sees no exclusions
    plan = plan_merge(base, models, needs_base=True, method=method)
    patterns = []
    for pattern in (exclude,) if isinstance(exclude, str) else exclude:
        try:
            patterns.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(f"{method}: exclude pattern {pattern!r} is not a valid regex ({error})") from None
    n_tasks = len(models)
    merged = {}
    for key in plan.merge_keys:
        ref = plan.reference[key]
        dtype = compute_dtype(ref.dtype)
        base_value = base[key].to(dtype)
        if ref.dim() == 2 and min(ref.shape) > 0 and not any(p.search(key) for p in patterns):
            # τ_t = θ_t − θ_0 in float64 for the SVDs
            tasks = [model[key].to(torch.float64) - base[key].to(torch.float64) for model in models]
            if common_space_fraction is None:
                delta = iso_c_matrix(torch.stack(tasks).sum(dim=0))
            else:
                delta = iso_cts_matrix(tasks, common_space_fraction=common_space_fraction)
            delta = delta.to(dtype)
        else:
            # fallback: θ_0 + λ (1/T) Σ_t τ_t  (or λ Σ_t τ_t)
            delta = torch.stack([model[key].to(dtype) - base_value for model in models]).sum(dim=0)
            if fallback == "mean":
                delta = delta / n_tasks
        # θ = θ_0 + λ Δ
        merged[key] = base_value + (delta * lambda_ if lambda_ != 1 else delta)
    return plan.finish(merged)


@merge_method("iso_c", needs_base=True, reference=_REF)
def iso_c(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    lambda_: float = 1.0,
    fallback: str = "mean",
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Iso-C: for every 2-D weight, θ = θ_0 + λ · mean(σ(Δ)) U Vᵀ where Δ = Σ_t τ_t = U Σ Vᵀ.

    The merged update has a flat spectrum (all its singular values equal mean(σ(Δ))), the same singular subspaces
    as Δ, and Δ's nuclear norm. Other tensors and `exclude` keys: the fallback of the module docstring. λ (the paper's
    α) is tuned on validation data; 1.0 is FusionBench's default (the paper reports ≈ 1.3–1.5 for 8 ViT tasks).
    Caveat: when Δ is rank-deficient (LoRA deltas), U Vᵀ includes an arbitrary basis of its null directions, which
    depends on the SVD backend. Not a mergekit method.
    """
    return _isotropic(
        base, models, method="iso_c", lambda_=lambda_, fallback=fallback, exclude=exclude, common_space_fraction=None
    )


@merge_method("iso_cts", needs_base=True, reference=_REF)
def iso_cts(
    base: StateDict,
    models: Sequence[StateDict],
    /,
    *,
    lambda_: float = 1.0,
    common_space_fraction: float = 0.8,
    fallback: str = "mean",
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Iso-CTS: Iso-C over a subspace made of Δ's top ⌊r·f⌋ directions plus each task's own top directions.

    `common_space_fraction` f = 0.8 is the official default; f = 1 gives Iso-C. See `iso_cts_matrix` for the
    equations and `iso_cts_ranks` for how the rank is split. Other tensors: the module docstring's fallback.
    Not a mergekit method.
    """
    fraction = check_number("common_space_fraction", common_space_fraction)
    if not 0 <= fraction <= 1:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {common_space_fraction!r}")
    return _isotropic(
        base, models, method="iso_cts", lambda_=lambda_, fallback=fallback, exclude=exclude,
        common_space_fraction=fraction,
    )
