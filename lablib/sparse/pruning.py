"""One-shot unstructured pruning: magnitude (layer-wise and global) and Wanda.

* **Magnitude** ([Han et al. 2015, *Learning both Weights and Connections*](https://arxiv.org/abs/1506.02626)):
  score `|W_ij|`; keep the top ⌈density · n⌉ per tensor (`scope="layer"`) or one ranking over all the tensors
  (`scope="global"`, as in open_lth's lottery-ticket code). Global pruning can empty a small layer entirely (layer
  collapse); the stats show it.
* **Wanda** ([Sun et al. 2023, *A Simple and Effective Pruning Approach for Large Language Models*](https://arxiv.org/abs/2306.11695)):
  score `S_ij = |W_ij| · ‖X_j‖₂`, where `X_j` is input feature j of the layer over all calibration tokens; compare
  within each **output row** (or within each group of m inputs for N:M). No weight update.

  Deviation from the paper's code, documented: the activations are collected in **one pass of the dense model**
  (forward hooks on every pruned `nn.Linear`), not block by block through the already-pruned earlier blocks. The
  norm is the root of the sum of squares over all tokens; the reference code keeps a running mean over samples,
  which differs by one positive constant per layer and so never changes a per-row or per-group ranking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lablib.sparse.masks import (
    Mask,
    MaskResult,
    _resolve_names,
    _slots,
    _value,
    check_density,
    check_int,
    mask_from_scores,
    masked_ledger,
    prunable_names,
)

__all__ = ["WandaResult", "collect_input_norms", "default_forward", "magnitude_mask", "wanda_mask"]


def magnitude_mask(model: nn.Module, *, density: float, scope: str = "layer",
                   names: Iterable[str] | None = None) -> MaskResult:
    """Keep the largest-|W| entries of the tensors `names` (default `prunable_names(model)`).

    `scope="layer"`: a `density` fraction of every tensor; `"global"`: of all of them together. The model is not
    modified; the scores are the current (masked, if a mask is attached) weights' magnitudes.
    """
    density = check_density(density)
    if scope not in ("layer", "global"):
        raise ValueError(f"magnitude pruning scope must be 'layer' or 'global', got {scope!r}")
    slots = _slots(model)
    chosen = _resolve_names(model, names, default=prunable_names)
    # S_ij = |W_ij|
    scores = {n: _value(model, n, slots).detach().abs().clone() for n in chosen}
    mask = mask_from_scores(scores, density=density, scope=scope)
    return MaskResult(mask=mask, stats=mask.stats(), method=f"magnitude/{scope}", scores=scores,
                      ledger=masked_ledger(model, mask))


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run `model` on a batch: `model(batch[0])` for an (inputs, targets) pair, else `model(batch)`."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(inputs.to(device))


def _linear_of(model: nn.Module, name: str, slots: dict) -> nn.Linear:
    for module, attr in slots[name]:
        if isinstance(module, nn.Linear) and attr == "weight":
            return module
    kinds = ", ".join(f"{type(m).__name__}.{a}" for m, a in slots[name])
    raise ValueError(f"{name} is not the weight of an nn.Linear ({kinds}); activation-aware scores need the "
                     "layer's inputs, which are only hooked on nn.Linear")


def collect_input_norms(model: nn.Module, *, batches: Iterable[Any], num_batches: int,
                        names: Iterable[str] | None = None,
                        forward_fn: Callable[[nn.Module, Any], Any] | None = None
                        ) -> tuple[dict[str, torch.Tensor], int]:
    """‖X_j‖₂ for every input feature j of every `nn.Linear` weight in `names`, over `num_batches` calibration
    batches; returns (norms by weight name, number of token rows the first layer saw). Forward hooks, eval mode,
    no_grad; the model's modes are restored and the hooks removed afterwards."""
    num_batches = check_int(num_batches, name="num_batches")
    forward_fn = forward_fn or default_forward
    slots = _slots(model)
    chosen = _resolve_names(model, names, default=prunable_names)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            # (..., in) -> (tokens, in); ‖X_j‖² accumulates Σ_tokens x_j²
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            squares = flat.pow(2).sum(dim=0)
            sums[name] = sums[name] + squares if name in sums else squares
            rows[name] = rows.get(name, 0) + flat.shape[0]
        return hook

    for name in chosen:
        handles.append(_linear_of(model, name, slots).register_forward_pre_hook(make_hook(name)))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        iterator = iter(batches)
        with torch.no_grad():
            for index in range(num_batches):
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise ValueError(f"batches ran out after {index} batches; num_batches={num_batches}") from None
                forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    missing = [n for n in chosen if n not in sums]
    if missing:
        raise ValueError(f"the calibration forward never reached {missing}; check forward_fn")
    # ‖X_j‖₂ = sqrt(Σ_tokens x_j²)
    norms = {n: sums[n].sqrt().to(_value(model, n, slots).dtype) for n in chosen}
    return norms, rows[chosen[0]]


@dataclass
class WandaResult(MaskResult):
    """`MaskResult` plus Wanda's activation statistics: `input_norms[name]` is ‖X_j‖₂ per input feature (in,),
    `num_tokens` the calibration token rows seen."""

    input_norms: dict[str, torch.Tensor] | None = None
    num_tokens: int = 0


def wanda_mask(model: nn.Module, *, batches: Iterable[Any], num_batches: int, density: float | None = None,
               n: int | None = None, m: int | None = None, names: Iterable[str] | None = None,
               forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> WandaResult:
    """Wanda: keep the entries with the largest `|W_ij| · ‖X_j‖₂` in each output row (`density`), or the top n in
    each group of m consecutive inputs of each row (`n`, `m`: semi-structured Wanda). Give `density` or `n` and `m`.

    `batches` are calibration batches (`num_batches` of them are used); `forward_fn(model, batch)` runs the model
    (default `default_forward`). The model is not modified.
    """
    from lablib.sparse.nm import nm_mask_from_scores

    if (density is None) == (n is None and m is None):
        raise ValueError("wanda_mask needs either density= (unstructured, per row) or n= and m= (N:M), not both")
    if density is None and (n is None or m is None):
        raise ValueError(f"wanda_mask N:M needs both n and m, got n={n!r}, m={m!r}")
    if density is not None:
        density = check_density(density)
    slots = _slots(model)
    chosen = _resolve_names(model, names, default=prunable_names)
    norms, num_tokens = collect_input_norms(model, batches=batches, num_batches=num_batches, names=chosen,
                                            forward_fn=forward_fn)
    # S_ij = |W_ij| · ‖X_j‖₂   (W: (out, in), the norm broadcast along the rows)
    scores = {name: _value(model, name, slots).detach().abs() * norms[name].unsqueeze(0) for name in chosen}
    if density is not None:
        mask = mask_from_scores(scores, density=density, scope="row")
        method = "wanda/row"
    else:
        mask = Mask({name: nm_mask_from_scores(s, n=n, m=m, name=name) for name, s in scores.items()})
        method = f"wanda/{n}:{m}"
    return WandaResult(mask=mask, stats=mask.stats(), method=method, scores=scores,
                       ledger=masked_ledger(model, mask), input_norms=norms, num_tokens=num_tokens)
