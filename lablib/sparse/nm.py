"""N:M semi-structured sparsity: masks, checks, and torch's 2:4 sparse kernels where the device has them.

An **N:M** mask keeps exactly n entries in every group of m *consecutive entries along the last dimension* of a
tensor. For an `nn.Linear` weight `W ∈ R^{out×in}` that is the **input (reduction) dimension**: each output row is cut
into `in / m` groups of m inputs, so `W.reshape(-1, m)` has exactly n `True`s per row. 2:4 (density 1/2) is the
pattern NVIDIA's Ampere-and-newer sparse tensor cores run
([Mishra et al. 2021, *Accelerating Sparse Deep Neural Networks*](https://arxiv.org/abs/2104.08378)); Wanda and
MaskLLM group the same way.

`to_semi_structured` hands a 2:4-masked weight to `torch.sparse.to_sparse_semi_structured` (CUTLASS / cuSPARSELt,
CUDA only, fp16/bf16/int8, shapes multiple of the backend's tile). Everywhere else, including every CPU, it returns the
**masked dense weight, which is the reference**: `F.linear(x, W ⊙ m)` computes exactly what the sparse kernel
approximates, and the result says why no conversion happened.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lablib.sparse.masks import (
    Mask,
    MaskResult,
    _resolve_names,
    _slots,
    _storage,
    _value,
    check_int,
    masked_ledger,
    prunable_names,
)

__all__ = [
    "SemiStructuredResult",
    "check_nm",
    "is_nm_mask",
    "nm_mask",
    "nm_mask_from_scores",
    "nm_patterns",
    "semi_structured_support",
    "to_semi_structured",
    "to_semi_structured_",
]


def check_nm(n: object, m: object) -> tuple[int, int]:
    """(n, m) as ints with 1 <= n <= m, or a ValueError naming them."""
    n = check_int(n, name="n")
    m = check_int(m, name="m")
    if n > m:
        raise ValueError(f"an N:M pattern keeps n of every m entries, so n <= m; got n={n} > m={m}")
    return n, m


def _check_divisible(shape: tuple[int, ...], m: int, *, name: str | None) -> None:
    where = f"{name} with shape {shape}" if name else f"shape {shape}"
    if len(shape) == 0:
        raise ValueError(f"N:M groups run along the last dimension; a 0-d tensor ({where}) has none")
    if shape[-1] % m:
        raise ValueError(f"N:M groups of m={m} run along the last (input) dimension, but {where} has "
                         f"{shape[-1]} entries there, not divisible by {m}")


def nm_patterns(*, n: int, m: int) -> torch.Tensor:
    """All C(m, n) ways to keep n of m entries, as a bool (C(m, n), m) tensor in lexicographic order of the kept
    positions (2:4: 1100, 1010, 1001, 0110, 0101, 0011)."""
    n, m = check_nm(n, m)
    combos = list(itertools.combinations(range(m), n))
    patterns = torch.zeros(len(combos), m, dtype=torch.bool)
    for row, kept in enumerate(combos):
        patterns[row, list(kept)] = True
    assert patterns.shape[0] == math.comb(m, n)
    return patterns


def nm_mask_from_scores(scores: torch.Tensor, *, n: int, m: int, name: str | None = None) -> torch.Tensor:
    """Bool mask keeping the n highest scores of every group of m consecutive entries along the last dimension
    (ties go to the earlier entry). Raises ValueError when the last dimension is not divisible by m."""
    n, m = check_nm(n, m)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    _check_divisible(tuple(scores.shape), m, name=name)
    if scores.is_complex() or bool(torch.isnan(scores).any()):
        raise ValueError(f"scores{f' of {name}' if name else ''} must be real and free of NaN")
    # (..., in) -> (groups, m): each row is one group of m consecutive inputs
    groups = scores.detach().reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(scores.shape)


def is_nm_mask(mask: torch.Tensor, *, n: int, m: int) -> bool:
    """True when every group of m consecutive entries along the last dimension keeps exactly n."""
    n, m = check_nm(n, m)
    if mask.dim() == 0 or mask.shape[-1] % m:
        return False
    return bool((mask.reshape(-1, m).sum(dim=-1) == n).all())


def nm_mask(model: nn.Module, *, n: int = 2, m: int = 4, names: Iterable[str] | None = None) -> MaskResult:
    """Magnitude N:M: keep the n largest |W| in every group of m consecutive inputs of every tensor in `names`
    (default `prunable_names(model)`). The model is not modified."""
    n, m = check_nm(n, m)
    slots = _slots(model)
    chosen = _resolve_names(model, names, default=prunable_names)
    # S_ij = |W_ij|, compared within groups of m along the input dimension
    scores = {name: _value(model, name, slots).detach().abs().clone() for name in chosen}
    mask = Mask({name: nm_mask_from_scores(s, n=n, m=m, name=name) for name, s in scores.items()})
    return MaskResult(mask=mask, stats=mask.stats(), method=f"magnitude/{n}:{m}", scores=scores,
                      ledger=masked_ledger(model, mask))


# ----------------------------------------------------------------------------------------------------------------
# torch's semi-structured (2:4) sparse tensors
# ----------------------------------------------------------------------------------------------------------------

_CPU_REFERENCE = ("the masked dense weight returned here is the reference: F.linear(x, weight) computes what the "
                  "2:4 kernel would")


@dataclass
class SemiStructuredResult:
    """`weight`: a `SparseSemiStructuredTensor` when `converted`, else the masked dense weight (the reference);
    `reason`: why no conversion happened ("" when it did)."""

    weight: torch.Tensor
    converted: bool
    reason: str


def semi_structured_support(device: torch.device | str | None = None) -> str | None:
    """None when `torch.sparse.to_sparse_semi_structured` can run on `device` (default: cuda if available), else a
    sentence saying why not."""
    to_sparse = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if to_sparse is None:
        return f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return f"semi-structured sparse kernels are CUDA-only and the tensor is on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this torch build / machine"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability >= 8.0 (Ampere); this GPU has {major}.{minor}"
    return None


def to_semi_structured(weight: torch.Tensor, *, mask: torch.Tensor | None = None) -> SemiStructuredResult:
    """Convert a 2-D weight, masked by `mask` if given, to torch's 2:4 semi-structured sparse format.

    The masked weight must have at most 2 nonzeros in every group of 4 along the last dimension (ValueError
    otherwise). When the device, dtype or shape does not allow the conversion (any CPU tensor, fp32 on some
    backends...), the result holds the masked dense weight with `converted=False` and the reason: on CPU the mask
    path is the reference. `weight` is not modified.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"semi-structured sparsity needs a 2-D weight (out, in), got {got}")
    dense = weight.detach()
    if mask is not None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        dense = dense.masked_fill(~mask.to(device=dense.device, dtype=torch.bool), 0)
    else:
        dense = dense.clone()
    _check_divisible(tuple(dense.shape), 4, name="weight")
    nonzeros = (dense.reshape(-1, 4) != 0).sum(dim=-1)
    if bool((nonzeros > 2).any()):
        bad = int((nonzeros > 2).sum())
        raise ValueError(f"{bad} groups of 4 along the input dimension hold more than 2 nonzeros; prune to 2:4 "
                         "first (nm_mask(model, n=2, m=4))")
    reason = semi_structured_support(dense.device)
    if reason is not None:
        return SemiStructuredResult(weight=dense, converted=False, reason=f"{reason}; {_CPU_REFERENCE}")
    try:
        sparse = torch.sparse.to_sparse_semi_structured(dense.contiguous())
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return SemiStructuredResult(weight=dense, converted=False,
                                    reason=f"torch refused the conversion ({error}); {_CPU_REFERENCE}")
    return SemiStructuredResult(weight=sparse, converted=True, reason="")


def to_semi_structured_(model: nn.Module, *, mask: Mask) -> dict[str, SemiStructuredResult]:
    """**In place**: for every `nn.Linear` weight in `mask` (a 2:4 mask), store the masked weight as a semi-structured
    sparse parameter where torch can (frozen: `requires_grad=False`), else as the masked dense parameter. Returns the
    per-tensor results (`converted`, `reason`)."""
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    mask.check(model)
    slots = _slots(model)
    results = {}
    for name, tensor in mask.items():
        holders = slots[name]
        if len(holders) != 1 or not isinstance(holders[0][0], nn.Linear) or holders[0][1] != "weight":
            raise ValueError(f"{name} is not the weight of exactly one nn.Linear; only those can be converted")
        if parametrize.is_parametrized(holders[0][0], "weight"):
            raise ValueError(f"{name} has a parametrization attached; bake it first (Mask.remove_(model, bake=True))")
        stored = _storage(model, name, slots)
        result = to_semi_structured(_value(model, name, slots), mask=tensor)
        results[name] = result
        module = holders[0][0]
        if result.converted:
            module.weight = nn.Parameter(result.weight, requires_grad=False)
        else:
            with torch.no_grad():
                stored.copy_(result.weight)
    return results
