"""FISH: a fixed sparse mask chosen by Fisher information, then fine-tuning only the entries it keeps.

[Sung, Nair & Raffel 2021, *Training Neural Networks with Fixed Sparse Masks*](https://arxiv.org/abs/2111.09839).

The importance of parameter j is its diagonal empirical Fisher information, the squared gradient of the loss
averaged over N batches:

    F̂_j = (1/N) Σ_{b=1..N} (∂ℓ(batch_b) / ∂θ_j)²

With batches of one example (and the loss on the true label) this is the paper's per-example estimate; bigger
batches give the cheaper, coarser minibatch estimate (the average of squared *mean* gradients). The mask keeps the
global top-k entries; `always_train` names tensors (a classifier head) kept whole and charged to the same budget, as
the reference code does.

`sparse_finetune` trains only the kept entries with the reparametrisation `θ = θ0 + m ⊙ δ` (δ trainable, starting
at 0; computed as `where(m, θ0 + δ, θ0)`), so entries outside the mask stay bit-identical even under AdamW's
decoupled weight decay, which would otherwise move frozen-by-zero-gradient entries. (Weight decay, if asked for,
decays δ, i.e. pulls the kept entries back towards θ0 rather than towards 0.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
from torch import nn

from lablib import ledger as ledger_module
from lablib.sparse.masks import (
    Mask,
    MaskResult,
    SparseTrainResult,
    _fresh,
    _register,
    _resolve_names,
    _slots,
    _storage,
    _unregister,
    _value,
    check_density,
    check_int,
    global_top_k,
    kept_count,
)

__all__ = ["DeltaParametrization", "fish_mask", "fisher_diagonal", "sparse_finetune"]


def _trainable_names(model: nn.Module) -> list[str]:
    slots = _slots(model)
    return [n for n in slots if _storage(model, n, slots).is_floating_point()]


def fisher_diagonal(model: nn.Module, *, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    num_batches: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """F̂_j = mean over `num_batches` batches of (∂ loss_fn(model, batch) / ∂θ_j)², for the tensors `names` (default:
    every floating-point parameter). Computed on a copy in eval mode (no dropout); `model` and its `.grad` are not
    touched."""
    num_batches = check_int(num_batches, name="num_batches")
    chosen = _resolve_names(model, names, default=_trainable_names)
    work = copy.deepcopy(model)
    work.eval()
    slots = _slots(work)
    params = [_storage(work, n, slots) for n in chosen]
    for param in work.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    iterator = iter(batches)
    for index in range(num_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {index} batches; num_batches={num_batches}") from None
        loss = loss_fn(work, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for total, grad in zip(sums, grads):
            if grad is not None:
                # Σ_b (∂ℓ_b/∂θ)²
                total.add_(grad.detach().to(torch.float64).pow(2))
    # F̂ = (1/N) Σ_b (∂ℓ_b/∂θ)²
    return {n: (s / num_batches).to(p.dtype) for n, s, p in zip(chosen, sums, params)}


def fish_mask(model: nn.Module, *, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
              num_batches: int, k: int | None = None, density: float | None = None,
              names: Iterable[str] | None = None, always_train: Sequence[str] = ()) -> MaskResult:
    """The FISH mask: the k entries with the largest diagonal Fisher information (`fisher_diagonal`), over all of
    `names` (default: every floating-point parameter) together.

    The budget is `k` entries, or `density` of the entries of `names` plus `always_train`; tensors in
    `always_train` (e.g. a classifier head) are kept whole and count against it. The mask has exactly `k` `True`
    entries. Ties go to the tensor / entry that comes first. `model` is not modified.
    """
    if (k is None) == (density is None):
        raise ValueError("fish_mask needs exactly one of k= (entries to keep) or density= (fraction to keep)")
    if isinstance(always_train, str):
        raise TypeError(f"always_train must be a list of parameter names, got the string {always_train!r}")
    slots = _slots(model)
    head = list(dict.fromkeys(always_train))
    unknown = [n for n in head if n not in slots]
    if unknown:
        raise KeyError(f"always_train names unknown parameters {unknown}")
    chosen = [n for n in _resolve_names(model, names, default=_trainable_names) if n not in head]
    if not chosen:
        raise ValueError("no tensors left to choose from once always_train is taken out")
    head_numel = sum(_value(model, n, slots).numel() for n in head)
    pool = sum(_value(model, n, slots).numel() for n in chosen)
    if k is not None:
        k = check_int(k, name="k", low=0)
    else:
        k = kept_count(density=check_density(density), numel=pool + head_numel)
    if k > pool + head_numel:
        raise ValueError(f"k={k} exceeds the {pool + head_numel} entries of names + always_train")
    keep_free = k - head_numel
    if keep_free < 0:
        raise ValueError(f"the budget k={k} is smaller than the always_train tensors ({head_numel} entries)")
    scores = fisher_diagonal(model, batches=batches, loss_fn=loss_fn, num_batches=num_batches, names=chosen)
    # one global ranking over all chosen tensors (in their order), ties to the earlier entry
    tensors = dict(global_top_k(scores, k=keep_free))
    for name in head:
        tensors[name] = torch.ones_like(_value(model, name, slots), dtype=torch.bool)
    mask = Mask(tensors)
    row = dataclasses.replace(ledger_module.ledger(model), trainable=mask.total_kept(),
                              notes=f"FISH: {mask.total_kept():,} trainable entries (density {mask.density:.4%})")
    return MaskResult(mask=mask, stats=mask.stats(), method="fish", scores=scores, ledger=row)


class DeltaParametrization(nn.Module):
    """`θ0 -> where(m, θ0 + δ, θ0)`: only the masked entries can move; `delta` (δ, zeros at start) is trainable."""

    def __init__(self, mask: torch.Tensor, *, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(device=like.device, dtype=torch.bool), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        # θ = θ0 + m ⊙ δ, written with where so unmasked entries are θ0 bit for bit
        return torch.where(self.mask, theta0.detach() + self.delta, theta0.detach())


def sparse_finetune(model: nn.Module, *, mask: Mask, batches: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    steps: int, **train_kwargs: Any) -> SparseTrainResult:
    """Fine-tune a copy of `model`, changing only the entries `mask` keeps (`θ = θ0 + m ⊙ δ`, see the module doc).

    Every tensor not in the mask, and every unmasked entry of the others, is bit-identical afterwards. `batches` is
    an iterable or a zero-argument factory; `train_kwargs` go to `lablib.train.train` (`lr`, `seed`, `eval_fn`,
    `weight_decay`, `progress`...). `model` is not modified.
    """
    from lablib.train import train

    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    mask.check(model)
    active = [n for n, t in mask.items() if bool(t.any())]
    if not active:
        raise ValueError("the mask keeps no entry; nothing to fine-tune")
    work = copy.deepcopy(model)
    slots = _slots(work)
    flags = {id(p): p.requires_grad for p in work.parameters()}
    for param in work.parameters():
        param.requires_grad_(False)
    parts = {}
    for name in active:
        part = DeltaParametrization(mask[name], like=_storage(work, name, slots))
        _register(work, name, part, slots)
        parts[name] = part
    try:
        history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=steps,
                        params=[part.delta for part in parts.values()], **train_kwargs)
    finally:
        for name in active:
            _unregister(work, name, slots, bake=True)
        for param in work.parameters():
            param.requires_grad_(flags.get(id(param), True))
    trained = mask.total_kept()
    row = dataclasses.replace(ledger_module.ledger(work), trainable=trained,
                              notes=f"sparse fine-tune: {trained:,} trainable entries (density {mask.density:.4%})")
    return SparseTrainResult(model=work, history=history, mask=mask, stats=mask.stats(), trainable=trained,
                             ledger=row)
