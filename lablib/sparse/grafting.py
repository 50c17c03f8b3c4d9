"""Skill localization by grafting: how few fine-tuned weights carry the skill?

[Panigrahi, Saunshi, Zhao & Arora 2023, *Task-Specific Skill Localization in Fine-tuned Language Models*](https://arxiv.org/abs/2302.06600).

A **graft** copies a small set γ of fine-tuned weights onto the base (pre-trained) model:

    θ(γ) = θ_base + γ ⊙ (θ_ft - θ_base),   γ ∈ {0, 1} per entry

so γ ≡ 1 gives the fine-tuned model and γ ≡ 0 the base. Two ways to choose γ are implemented:

* `graft` (the simple baseline, the paper's starting patch γ0): the `density` fraction of entries with the largest
  movement |θ_ft - θ_base|, ranked over all the chosen tensors together. Works on state dicts; no data needed.
* `learned_graft` (the paper's optimisation, simplified): the sigmoid relaxation
  `γ(S) = γ0 + (1 - 2γ0) ⊙ σ(S - b)` with S ~ U[0, 1) and a large bias b (10), so γ(S) ≈ γ0 at the start; every
  epoch averages ∂L/∂S over a few batches, takes a plain gradient step `S <- S - lr ∇_S` (no optimizer; the paper's
  lr is 1e7 because σ'(S - b) ≈ 5e-5), rounds γ(S) to {0, 1} and keeps the best rounded graft by `score_fn`. The
  size of the graft can drift from γ0 as entries flip; the result reports the fraction kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lablib.sparse.masks import (
    Mask,
    MaskStats,
    _fresh,
    _register,
    _slots,
    _storage,
    _unregister,
    check_density,
    check_int,
    global_top_k,
    kept_count,
)

__all__ = ["GraftResult", "GraftParametrization", "graft", "learned_graft"]


@dataclass
class GraftResult:
    """A graft: `state_dict` (base everywhere except the grafted entries, which are fine-tuned), the `mask` γ over
    the tensors considered, `fraction` = kept / considered entries, `kept` and `considered` counts, `stats`
    (`mask.stats()`), and for `learned_graft` the per-epoch `history` (`epoch`, `fraction`, `score`)."""

    state_dict: dict[str, torch.Tensor]
    mask: Mask
    fraction: float
    kept: int
    considered: int
    stats: MaskStats
    history: list[dict[str, float]] = field(default_factory=list)


def _as_state(value: Any, *, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(value, nn.Module):
        return value.state_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a state dict (mapping name -> tensor) or an nn.Module, got "
                        f"{type(value).__name__}")
    return value


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with the same key view the same memory (`state_dict()` detaches each key separately, so tied
    parameters arrive as different tensor objects over one storage)."""
    return (str(tensor.device), tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _graft_names(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                 names: Iterable[str] | None) -> list[str]:
    only_base = sorted(set(base) - set(finetuned))
    only_ft = sorted(set(finetuned) - set(base))
    if only_base or only_ft:
        raise KeyError(f"base and finetuned state dicts differ in keys: only in base {only_base[:5]}, only in "
                       f"finetuned {only_ft[:5]}")
    if names is None:
        chosen = [n for n, t in base.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    else:
        if isinstance(names, str):
            raise TypeError(f"names must be a list of keys, got the string {names!r}")
        chosen = list(dict.fromkeys(names))
        unknown = [n for n in chosen if n not in base]
        if unknown:
            raise KeyError(f"unknown state-dict keys {unknown}; keys include {list(base)[:8]}")
    for name in chosen:
        if tuple(base[name].shape) != tuple(finetuned[name].shape):
            raise ValueError(f"{name}: base shape {tuple(base[name].shape)} != finetuned shape "
                             f"{tuple(finetuned[name].shape)}")
        if not base[name].is_floating_point():
            raise ValueError(f"{name} has dtype {base[name].dtype}; only floating-point tensors can be grafted")
    # a tensor stored under two keys (tied weights in one state_dict()) is ranked once, under its first key
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for name in chosen:
        if _alias_key(base[name]) not in seen:
            seen.add(_alias_key(base[name]))
            unique.append(name)
    if not unique:
        raise ValueError("no floating-point tensors to graft")
    return unique


def _grafted_state(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                   mask: Mask) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_alias: dict[tuple[Any, ...], torch.Tensor] = {}
    for name, tensor in base.items():
        if _alias_key(tensor) in by_alias:  # a tied alias gets the same grafted tensor
            out[name] = by_alias[_alias_key(tensor)]
            continue
        if name in mask:
            ft = finetuned[name].to(device=tensor.device, dtype=tensor.dtype)
            # θ(γ) = θ_base + γ ⊙ (θ_ft - θ_base), written as where(γ, θ_ft, θ_base) so γ ≡ 1 is θ_ft bit for bit
            value = torch.where(mask[name].to(tensor.device), ft, tensor)
        else:
            value = tensor.clone()
        by_alias[_alias_key(tensor)] = value
        out[name] = value
    return out


def _result(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], mask: Mask,
            history: list[dict[str, float]] | None = None) -> GraftResult:
    kept, considered = mask.total_kept(), mask.total_numel()
    return GraftResult(state_dict=_grafted_state(base, finetuned, mask), mask=mask,
                       fraction=kept / considered if considered else 0.0, kept=kept, considered=considered,
                       stats=mask.stats(), history=list(history or []))


def graft(base: Mapping[str, torch.Tensor] | nn.Module, finetuned: Mapping[str, torch.Tensor] | nn.Module, *,
          density: float, names: Iterable[str] | None = None) -> GraftResult:
    """Graft the `density` fraction (in [0, 1]; 0 = the base, 1 = the fine-tuned model) of entries that moved most,
    |θ_ft - θ_base|, ranked over the tensors `names` (default: every floating-point key) together.

    Both inputs may be state dicts or models (their `state_dict()`); neither is modified. Keys outside `names` are
    copied from the base. Ties go to the key / entry that comes first.
    """
    density = check_density(density, allow_zero=True)
    base_sd = _as_state(base, what="base")
    ft_sd = _as_state(finetuned, what="finetuned")
    chosen = _graft_names(base_sd, ft_sd, names)
    # movement |θ_ft - θ_base|, flattened in key order, one global ranking
    moves = [(ft_sd[n].detach().to(base_sd[n].device, torch.float64) - base_sd[n].detach().to(torch.float64)).abs()
             for n in chosen]
    total = sum(mv.numel() for mv in moves)
    mask = global_top_k(dict(zip(chosen, moves)), k=kept_count(density=density, numel=total))
    return _result(base_sd, ft_sd, mask)


class GraftParametrization(nn.Module):
    """`_ -> θ_base + γ(S) ⊙ (θ_ft - θ_base)` with `γ(S) = γ0 + (1 - 2γ0) ⊙ σ(S - b)`; `S` is the parameter."""

    def __init__(self, *, base: torch.Tensor, finetuned: torch.Tensor, gamma0: torch.Tensor, scores: torch.Tensor,
                 sigmoid_bias: float) -> None:
        super().__init__()
        self.register_buffer("base", base.detach().clone(), persistent=False)
        self.register_buffer("delta", (finetuned.detach() - base.detach()).to(base.dtype), persistent=False)
        self.register_buffer("gamma0", gamma0.to(device=base.device, dtype=base.dtype), persistent=False)
        self.scores = nn.Parameter(scores.to(device=base.device, dtype=base.dtype))
        self.sigmoid_bias = sigmoid_bias

    def gamma(self) -> torch.Tensor:
        # γ(S) = γ0 + (1 - 2 γ0) ⊙ σ(S - b)
        return self.gamma0 + (1 - 2 * self.gamma0) * torch.sigmoid(self.scores - self.sigmoid_bias)

    def forward(self, unused: torch.Tensor) -> torch.Tensor:
        # θ(γ) = θ_base + γ ⊙ (θ_ft - θ_base)
        return self.base + self.gamma() * self.delta


def learned_graft(model: nn.Module, *, base: Mapping[str, torch.Tensor] | nn.Module,
                  finetuned: Mapping[str, torch.Tensor] | nn.Module, batches: Any,
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor], density: float, epochs: int = 10,
                  batches_per_epoch: int = 1, lr: float = 1e7, sigmoid_bias: float = 10.0,
                  names: Iterable[str] | None = None, score_fn: Callable[[nn.Module], float] | None = None,
                  seed: int = 0) -> GraftResult:
    """Optimise a graft with the sigmoid relaxation (module docstring), starting from `graft(base, finetuned,
    density=density, names=names).mask`.

    `model` is the architecture (a copy is used; it is not modified) into which `base` / `finetuned` load;
    `names` must be parameters of it (default: every floating-point parameter). `loss_fn(model, batch)` on
    `batches_per_epoch` batches per epoch (from `batches`, an iterable or zero-argument factory) drives S;
    `score_fn(model) -> float` (higher is better, e.g. accuracy) picks the best rounded graft, default: minus the
    mean loss on the epoch's batches. Epoch 0 scores γ0 itself, so the result is never worse than the baseline by
    `score_fn`. With `lr=0` the result is the baseline graft.
    """
    epochs = check_int(epochs, name="epochs", low=0)
    batches_per_epoch = check_int(batches_per_epoch, name="batches_per_epoch")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    density = check_density(density, allow_zero=True)
    base_sd = _as_state(base, what="base")
    ft_sd = _as_state(finetuned, what="finetuned")
    work = copy.deepcopy(model)
    work.load_state_dict(base_sd)
    slots = _slots(work)
    if names is None:
        names = [n for n in slots if n in base_sd and _storage(work, n, slots).is_floating_point()]
    chosen = _graft_names(base_sd, ft_sd, names)
    unknown = [n for n in chosen if n not in slots]
    if unknown:
        raise KeyError(f"learned_graft grafts model parameters only; {unknown} are not parameters of the model")
    start = graft(base_sd, ft_sd, density=density, names=chosen)
    for param in work.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for name in chosen:
        stored = _storage(work, name, slots)
        part = GraftParametrization(base=base_sd[name].to(stored.device), finetuned=ft_sd[name].to(stored.device),
                                    gamma0=start.mask[name],
                                    scores=torch.rand(stored.shape, generator=generator), sigmoid_bias=sigmoid_bias)
        _register(work, name, part, slots)
        parts[name] = part
    stream = iter(_fresh(batches))
    flags = [(mod, mod.training) for mod in work.modules()]

    def rounded() -> Mask:
        return Mask({name: part.gamma().detach() > 0.5 for name, part in parts.items()})

    def evaluate(mask: Mask, epoch_batches: list[Any]) -> float:
        scratch = copy.deepcopy(model)
        scratch.load_state_dict(_grafted_state(base_sd, ft_sd, mask))
        scratch.eval()
        with torch.no_grad():
            if score_fn is not None:
                return float(score_fn(scratch))
            return -sum(float(loss_fn(scratch, b)) for b in epoch_batches) / len(epoch_batches)

    history: list[dict[str, float]] = []
    try:
        work.train()
        best_mask, best_score = start.mask, None
        for epoch in range(epochs + 1):
            epoch_batches = []
            for index in range(batches_per_epoch):
                try:
                    epoch_batches.append(next(stream))
                except StopIteration:
                    raise ValueError(f"batches ran out in epoch {epoch}; learned_graft needs "
                                     f"{(epochs + 1) * batches_per_epoch} batches") from None
            mask = start.mask if epoch == 0 else rounded()
            score = evaluate(mask, epoch_batches)
            history.append({"epoch": epoch, "fraction": mask.density, "score": score})
            if best_score is None or score > best_score:
                best_mask, best_score = mask, score
            if epoch == epochs:
                break
            # ∇_S L averaged over the epoch's batches, then a plain step S <- S - lr ∇_S
            scores = [part.scores for part in parts.values()]
            grads = [torch.zeros_like(s) for s in scores]
            for batch in epoch_batches:
                loss = loss_fn(work, batch)
                for total, grad in zip(grads, torch.autograd.grad(loss, scores, allow_unused=True)):
                    if grad is not None:
                        total.add_(grad / len(epoch_batches))
            with torch.no_grad():
                for s, grad in zip(scores, grads):
                    s.sub_(lr * grad)
    finally:
        for name in chosen:
            _unregister(work, name, slots, bake=False)
        for mod, training in flags:
            mod.training = training
    return _result(base_sd, ft_sd, best_mask, history)
