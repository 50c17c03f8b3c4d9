"""Load balancing for mixture-of-experts routers: two auxiliary losses and one loss-free bias.

A router left alone tends to collapse onto a few experts (they train faster, so they win more tokens). Three fixes:

**Load-balancing loss** (Switch Transformers, Fedus et al. [arXiv:2101.03961](https://arxiv.org/abs/2101.03961),
eq. 4; GShard, Lepikhin et al. [arXiv:2006.16668](https://arxiv.org/abs/2006.16668)):

    L_balance = E · Σ_e f_e · P_e
    f_e = (assignments to expert e) / (all assignments)      the fraction of the k·N choices; no gradient
    P_e = (1/N) Σ_t p_{t,e}                                  mean router probability; carries the gradient

f is taken from the router's choices *before* any capacity drop. We divide by k (as Megatron-LM and DeepSeek do),
so L_balance = 1 for a perfectly balanced router whatever k is; flaxformer / Hugging Face sum the top-k one-hots
instead and score k. Each layer computes its own loss; the model sums the layers' weighted losses (Switch).

**Router z-loss** (ST-MoE, Zoph et al. [arXiv:2202.08906](https://arxiv.org/abs/2202.08906), eq. 5):

    L_z = (1/N) Σ_t (logsumexp_e z_{t,e})²

on the raw logits; it keeps them small, which keeps the softmax numerically tame. With z = 0 it equals (log E)².

**Auxiliary-loss-free balancing** (Wang et al., *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*
[arXiv:2408.15664](https://arxiv.org/abs/2408.15664); DeepSeek-V3 [arXiv:2412.19437](https://arxiv.org/abs/2412.19437)):
a per-expert bias b is added to the routing scores *for top-k selection only* (the combine weights keep the unbiased
scores) and, after each training step, nudged against the observed load:

    b_e ← b_e + u · sign(c̄ − c_e)       c_e = tokens routed to e in the step, c̄ = mean_e c_e, u = bias_update_rate

An overloaded expert's bias drops, so it wins fewer tokens next step. The bias is a buffer, outside autograd and the
optimizer; `ExpertBias.update` is an explicit call the training loop makes (see `lablib.moe.update_expert_biases`
and `lablib.moe.lm_loss_with_bias_update`). Nothing is kept in global state: the losses and the per-expert counts
are returned by the layer, and the update takes the counts as an argument. u = 1e-3 is Megatron-LM's default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
    "load_imbalance",
    "ExpertBias",
]


def _check_probs(probs: torch.Tensor, what: str = "probs") -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"{what} must have shape (num_tokens, num_experts), got {got}")


def load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss E · Σ_e f_e · P_e (1 at perfect balance; see the module docstring).

    * `probs`: (N, E) router probabilities (the gradient flows through them).
    * `indices`: (N, k) chosen experts, before any capacity drop.
    * `mask`: optional (N, k) bool, which slots count as assignments (expert choice); None means all.
    """
    _check_probs(probs)
    num_tokens, num_experts = probs.shape
    if indices.dim() != 2 or indices.shape[0] != num_tokens:
        raise ValueError(f"indices must have shape ({num_tokens}, k), got {tuple(indices.shape)}")
    chosen = indices if mask is None else indices[mask]
    if num_tokens == 0 or chosen.numel() == 0:
        return probs.sum() * 0.0
    with torch.no_grad():
        # f_e = assignments to e / all assignments : (E,)
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype)
        fraction = counts / counts.sum()
    # P_e = mean_t p_{t,e} : (E,)
    mean_prob = probs.mean(dim=0)
    # L = E · Σ_e f_e P_e
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)² (logits (N, E), raw, at least float32)."""
    _check_probs(logits, "logits")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # L_z = (1/N) Σ_t (log Σ_e exp z_{t,e})²
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the routing distribution's entropy, -Σ_e p log p, in nats (log E = undecided router)."""
    _check_probs(probs)
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    # H_t = -Σ_e p_{t,e} log p_{t,e}, with 0 log 0 = 0
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    return -plogp.sum(dim=-1).mean()


def load_imbalance(tokens_per_expert: torch.Tensor) -> float:
    """max_e c_e / mean_e c_e: 1.0 for a perfectly even load, E when one expert takes everything."""
    counts = torch.as_tensor(tokens_per_expert).float()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"tokens_per_expert must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    mean = counts.mean()
    if mean <= 0:
        raise ValueError("tokens_per_expert sums to 0; no load to compare")
    return float(counts.max() / mean)


class ExpertBias(nn.Module):
    """The auxiliary-loss-free balancing bias: one float32 number per expert, used for selection only.

    * `bias`: (E,) persistent buffer, zeros at start; it never gets a gradient.
    * `update(tokens_per_expert)`: b_e ← b_e + rate · sign(mean_load − load_e), under `no_grad`; returns the step.

    The bias stays float32 even if the model is cast to bfloat16/float16, where a ±1e-3 step would be rounded away
    (vLLM PR #23640; Megatron-LM also keeps it in fp32). float64 is kept as is.
    """

    def __init__(self, *, num_experts: int, bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if (isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, (int, float))
                or not math.isfinite(bias_update_rate) or bias_update_rate < 0):
            raise ValueError(f"bias_update_rate must be a finite number >= 0, got {bias_update_rate!r}")
        self.num_experts = num_experts
        self.bias_update_rate = float(bias_update_rate)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn: Any, recurse: bool = True) -> ExpertBias:
        super()._apply(fn, recurse)
        if self.bias.dtype in (torch.float16, torch.bfloat16):
            # a low-precision bias would swallow the small update steps
            self.bias = self.bias.float()
        return self

    @torch.no_grad()
    def update(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """One balancing step from the load of one training step; returns the change applied to `bias`."""
        load = torch.as_tensor(tokens_per_expert, device=self.bias.device)
        if load.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert must have shape ({self.num_experts},), got {tuple(load.shape)}")
        load = load.to(self.bias.dtype)
        # Δb_e = u · sign(c̄ − c_e)
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.bias += step
        return step

    def reset(self) -> None:
        """Set the bias back to zero."""
        with torch.no_grad():
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bias_update_rate={self.bias_update_rate}"
