"""Learned N:M masks, MaskLLM-style.

[Fang et al. 2024, *MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models*](https://arxiv.org/abs/2409.17481),
Gumbel-softmax from [Jang et al. 2017](https://arxiv.org/abs/1611.01144) and
[Maddison et al. 2017](https://arxiv.org/abs/1611.00712).

Each group of m consecutive inputs of a weight row (G = numel / m groups per tensor) picks one of the C(m, n)
candidate patterns `S ∈ {0,1}^{C×m}` (`nm_patterns`). The choice is a categorical distribution with logits
`π ∈ R^{G×C}`, trained end to end while the weights stay frozen:

    p   = softmax((κ π + g) / τ),  g ~ Gumbel(0, 1) i.i.d.     (soft sample; no noise in eval mode)
    m_g = p S                                                  (a soft group mask in [0, 1]^m that sums to n)
    W_eff = W ⊙ m

with the temperature τ and the logit scale κ interpolated linearly from their start to their end values over the
run (`u = step / (steps - 1)`). The loss is the task loss minus `λ (1 - u) Σ ‖W ⊙ m‖²`, a small reward for keeping
large weights (`magnitude_reg` = λ). The read-out is the hard mask `m_g = S[argmax π_g]` (always a valid N:M mask).

**Initialisation (the magnitude prior).** `π ~ N(0, init_std²)`; with a prior mask M0 (by default the magnitude
N:M mask) each candidate's logit moves by `(o_k - n/2) · std(π) · prior_strength`, where `o_k = ⟨S_k, M0_g⟩` is how
many of the candidate's kept positions the prior also keeps (for 2:4: -1, 0 or +1 times std · strength, the paper's
`(o - 1)` rule). So at step 0 the argmax is, in almost every group, the magnitude pattern, and training moves a group
away from it only when the loss says so.

Defaults follow the public code where it fits a toy: τ 4 -> 0.05 and κ 100 -> 500 (the paper's LLaMA-2 script),
prior strength 3, init std 0.01, λ = 1e-5. The learning rate (5e-3, AdamW through `lablib.train.train`) is ours: the
paper trains 2 000 steps at 5e-5 with a 10x multiplier; a toy run of a few hundred steps needs a larger one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lablib.sparse.masks import (
    Mask,
    MaskResult,
    _fresh,
    _register,
    _resolve_names,
    _slots,
    _storage,
    _value,
    check_int,
    masked_ledger,
    prunable_names,
)
from lablib.sparse.nm import _check_divisible, check_nm, is_nm_mask, nm_mask, nm_patterns

__all__ = ["LearnedNMParametrization", "LearnedNMResult", "learned_nm_mask", "prior_logits"]


class LearnedNMParametrization(nn.Module):
    """`W -> W ⊙ m(π)` with a Gumbel-softmax N:M mask (see the module docstring). `logits` (G, C) is the only
    parameter; set `temperature` (τ) and `scale` (κ) before a forward. Noise is drawn only in training mode."""

    def __init__(self, *, logits: torch.Tensor, n: int, m: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        n, m = check_nm(n, m)
        groups = math.prod(shape) // m
        if tuple(logits.shape) != (groups, math.comb(m, n)):
            raise ValueError(f"logits must have shape ({groups}, {math.comb(m, n)}) for a {shape} weight and {n}:{m}, "
                             f"got {tuple(logits.shape)}")
        self.n, self.m, self.shape = n, m, tuple(shape)
        self.logits = nn.Parameter(logits.detach().clone())
        self.register_buffer("patterns", nm_patterns(n=n, m=m).to(device=logits.device, dtype=logits.dtype),
                             persistent=False)
        self.temperature = 1.0
        self.scale = 1.0
        self.last_mask: torch.Tensor | None = None

    def probabilities(self, *, noise: bool) -> torch.Tensor:
        """(G, C) candidate probabilities p = softmax((κ π + g) / τ), with Gumbel noise g only if `noise`."""
        z = self.scale * self.logits
        if noise:
            # g = -log(E), E ~ Exp(1), is Gumbel(0, 1); drawn from torch's global RNG (seeded by train)
            z = z - torch.empty_like(z).exponential_().clamp_min(1e-30).log()
        return F.softmax(z / self.temperature, dim=-1)

    def soft_mask(self, *, noise: bool = False) -> torch.Tensor:
        """The soft mask with the weight's shape: every group of m sums to n."""
        # m_g = p S : (G, C) @ (C, m) -> (G, m), then back to the weight's shape
        return (self.probabilities(noise=noise) @ self.patterns).reshape(self.shape)

    def hard_mask(self) -> torch.Tensor:
        """The read-out: `S[argmax π_g]` per group, a bool tensor with the weight's shape (a valid N:M mask)."""
        return self.patterns[self.logits.detach().argmax(dim=-1)].bool().reshape(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.soft_mask(noise=self.training)
        self.last_mask = mask
        # W_eff = W ⊙ m, the weight itself frozen (no gradient flows to it)
        return weight.detach() * mask


def prior_logits(prior: torch.Tensor, *, n: int, m: int, init_std: float = 0.01, strength: float = 3.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial logits (G, C) for one weight: N(0, init_std²) plus `(o_k - n/2) · std · strength`, where o_k is the
    overlap of candidate k with the prior mask's group (see the module docstring). `prior`: bool, weight-shaped."""
    n, m = check_nm(n, m)
    _check_divisible(tuple(prior.shape), m, name="prior")
    patterns = nm_patterns(n=n, m=m).to(torch.float32)
    logits = torch.randn(prior.numel() // m, patterns.shape[0], generator=generator) * init_std
    # o_gk = ⟨S_k, M0_g⟩ : (G, m) @ (m, C) -> (G, C), in {0, ..., n}
    overlap = prior.reshape(-1, m).to(torch.float32).cpu() @ patterns.T
    # π += (o - n/2) · std(π) · strength
    return logits + (overlap - n / 2) * logits.std() * strength


@dataclass
class LearnedNMResult(MaskResult):
    """`MaskResult` of `learned_nm_mask` (`scores`: the noise-free soft mask at the final τ and κ, weight-shaped),
    plus the training `history`, the learned `logits` (G, C) per tensor, the `prior` mask (or None) and
    `prior_agreement`: the fraction of groups whose learned pattern equals the prior's."""

    history: Any = None
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    prior: Mask | None = None
    prior_agreement: float | None = None


def _check_pair(value: Any, *, name: str) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a (start, end) pair of numbers > 0, got {value!r}")
    return float(value[0]), float(value[1])


def learned_nm_mask(model: nn.Module, *, batches: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor], steps: int,
                    n: int = 2, m: int = 4, names: Iterable[str] | None = None, lr: float = 5e-3,
                    temperature: tuple[float, float] = (4.0, 0.05), scale: tuple[float, float] = (100.0, 500.0),
                    prior: str | Mask | None = "magnitude", prior_strength: float = 3.0, init_std: float = 0.01,
                    magnitude_reg: float = 1e-5, seed: int = 0, progress: bool = True,
                    **train_kwargs: Any) -> LearnedNMResult:
    """Learn an N:M mask for the tensors `names` (default `prunable_names(model)`) with frozen weights.

    A copy of `model` gets a `LearnedNMParametrization` on every tensor and `lablib.train.train` optimises only the
    logits for `steps` steps on `batches` (an iterable, or a zero-argument factory) with `loss_fn(model, batch)`;
    `train_kwargs` go to `train` (`grad_clip`, `schedule`, `eval_fn`...). `temperature` and `scale` are (start,
    end) pairs; `prior` is `"magnitude"`, a `Mask` (a valid N:M mask over `names`) or None (see the module
    docstring). Returns the hard (argmax) mask; `model` is not modified.
    """
    from lablib.train import train

    n, m = check_nm(n, m)
    steps = check_int(steps, name="steps")
    tau0, tau1 = _check_pair(temperature, name="temperature")
    kappa0, kappa1 = _check_pair(scale, name="scale")
    if isinstance(magnitude_reg, bool) or not isinstance(magnitude_reg, (int, float)) or magnitude_reg < 0:
        raise ValueError(f"magnitude_reg must be a number >= 0, got {magnitude_reg!r}")
    chosen = _resolve_names(model, names, default=prunable_names)
    slots = _slots(model)
    for name in chosen:
        _check_divisible(tuple(_value(model, name, slots).shape), m, name=name)

    if isinstance(prior, str):
        if prior != "magnitude":
            raise ValueError(f"prior must be 'magnitude', a Mask or None, got {prior!r}")
        prior_mask: Mask | None = nm_mask(model, n=n, m=m, names=chosen).mask
    elif isinstance(prior, Mask):
        missing = [name for name in chosen if name not in prior]
        if missing:
            raise KeyError(f"the prior mask has no tensor for {missing}")
        for name in chosen:
            if not is_nm_mask(prior[name], n=n, m=m):
                raise ValueError(f"prior[{name!r}] is not a valid {n}:{m} mask along the last dimension")
        prior_mask = Mask({name: prior[name] for name in chosen})
    elif prior is None:
        prior_mask = None
    else:
        raise TypeError(f"prior must be 'magnitude', a Mask or None, got {type(prior).__name__}")

    work = copy.deepcopy(model)
    for param in work.parameters():
        param.requires_grad_(False)
    work_slots = _slots(work)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, LearnedNMParametrization] = {}
    for name in chosen:
        weight = _value(work, name, work_slots)
        if prior_mask is not None:
            logits = prior_logits(prior_mask[name], n=n, m=m, init_std=init_std, strength=prior_strength,
                                  generator=generator)
        else:
            logits = torch.randn(weight.numel() // m, math.comb(m, n), generator=generator) * init_std
        part = LearnedNMParametrization(logits=logits.to(device=weight.device, dtype=torch.float32), n=n, m=m,
                                        shape=tuple(weight.shape))
        _register(work, name, part, work_slots)
        parts[name] = part
    originals = {name: _storage(work, name, work_slots) for name in chosen}
    progress_state = {"step": 0}

    def schedule(u: float) -> None:
        for part in parts.values():
            # τ = τ0 + (τ1 - τ0) u,  κ = κ0 + (κ1 - κ0) u
            part.temperature = tau0 + (tau1 - tau0) * u
            part.scale = kappa0 + (kappa1 - kappa0) * u

    def masked_loss(net: nn.Module, batch: Any) -> torch.Tensor:
        u = min(1.0, progress_state["step"] / max(1, steps - 1))
        progress_state["step"] += 1
        schedule(u)
        loss = loss_fn(net, batch)
        if magnitude_reg:
            # L = L_task - λ (1 - u) Σ_layers ‖W ⊙ m‖²   (W detached: the reward reaches only the mask)
            kept = sum((originals[name].detach() * part.last_mask).pow(2).sum() for name, part in parts.items()
                       if part.last_mask is not None)
            loss = loss - magnitude_reg * (1.0 - u) * kept
        return loss

    history = train(work, batches=_fresh(batches), loss_fn=masked_loss, steps=steps, lr=lr, seed=seed,
                    progress=progress, params=[part.logits for part in parts.values()], **train_kwargs)
    schedule(1.0)
    mask = Mask({name: part.hard_mask() for name, part in parts.items()})
    with torch.no_grad():
        scores = {name: part.soft_mask(noise=False).detach().clone() for name, part in parts.items()}
    agreement = None
    if prior_mask is not None:
        same = sum(int((mask[name].reshape(-1, m) == prior_mask[name].to(mask[name].device).reshape(-1, m))
                       .all(dim=-1).sum()) for name in chosen)
        agreement = same / sum(mask[name].numel() // m for name in chosen)
    return LearnedNMResult(
        mask=mask, stats=mask.stats(), method=f"maskllm/{n}:{m}", scores=scores, ledger=masked_ledger(model, mask),
        history=history, logits={name: part.logits.detach().clone() for name, part in parts.items()},
        prior=prior_mask, prior_agreement=agreement,
    )
