"""Mixture-of-Recursions (Bae et al., 2025): a router gives each token its own number of recursion steps.

The shared stack F is the K unique blocks (cycle sharing); step r = 0..N-1 runs F on the tokens selected at r:

    h_t <- h_t + w_t (F(h)_t - h_t)   selected t,      h_t unchanged otherwise.

**Expert-choice routing** (`routing="expert_choice"`): one router per step, `r_t = w_rᵀ h_t` (Linear d -> 1, no bias,
N(0, 0.02)), gate `w_t = alpha · sigmoid(r_t)`. Step r keeps the top `k_r = max(1, ⌊capacities[r] · T⌋)` tokens of
each sequence among those selected at r-1 (hierarchical: selected_r ⊆ selected_{r-1}); default capacities
`(N - r) / N`. Attention at step r runs among the selected tokens in position order (the key mask), which is what
gathering the top-k and sorting them by position computes. An auxiliary BCE `router_aux_loss_coef · BCE(r_t, 1[t
selected])` over the candidates teaches `sigmoid(r_t) > 0.5` to predict the selection, so that with
`causal_routing=True` (needed to generate) a token continues iff `r_t > 0`: a decision from its own state alone.
Top-k over a sequence looks at future tokens and cannot generate token by token.

**Token-choice routing** (`routing="token_choice"`): one router on the stack's input h⁰, softmax over N depths, top-1
(`lablib.moe.TopKRouter` with `num_experts=N`, `top_k=1`: the same math as an MoE router over depths). A token with
choice j runs steps 0..j, and its final state is `h⁰ + w_t (h^(j+1) - h⁰)` with `w_t = alpha · p_{t,j}`. Balance:
`router_aux_loss_coef · lablib.moe.load_balancing_loss` (N Σ_i f_i P_i), default coefficient 0.1.

**Our choices, where the reference differs.** The reference adds `g · F(h)` to h with F including its residual
(so a selected token gets (1+g)h + gΔ) with alpha = 0.1; we apply the gate to the residual-free update, and default
alpha so that the gate is 1 at initialisation (alpha = 2 for the sigmoid, alpha = N for token choice's softmax). Then
`gate="none"` (w = 1) with every token at full depth *is* the recursive model (tested), and a fresh MoR starts as it.
The first step always takes every token (capacities[0] = 1), so that recursive KV sharing has step 0's keys and
values for all tokens.

**KV strategies** (`kv_strategy`):
* `"recursion_wise"`: step r attends only among its active tokens, and a KV cache stores, per step and layer, the
  keys/values of the tokens active there: Σ_r |active_r| · K entries per sequence.
* `"kv_sharing"` (recursive KV sharing): every step r >= 1 reuses step 0's keys/values (all tokens, the same unique
  layer); only active tokens issue queries. The cache holds step 0's T · K entries; later steps compute no K/V.
`lablib.recursive.generate_cached` decodes with these caches and gives the same tokens as `models.generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lablib.models import TransformerConfig
from lablib.moe.balance import load_balancing_loss
from lablib.moe.routers import TopKRouter
from lablib.recursive.core import RecursiveTransformer

ROUTINGS = ("expert_choice", "token_choice")
KV_STRATEGIES = ("recursion_wise", "kv_sharing")
GATES = ("sigmoid", "none")


def default_capacities(num_recursion: int) -> tuple[float, ...]:
    """(N - r) / N for r = 0..N-1: 1, (N-1)/N, ..., 1/N."""
    return tuple((num_recursion - r) / num_recursion for r in range(num_recursion))


def check_capacities(capacities: Sequence[float], *, num_recursion: int) -> tuple[float, ...]:
    caps = tuple(capacities)
    if len(caps) != num_recursion:
        raise ValueError(f"capacities needs one value per recursion step ({num_recursion}), got {len(caps)}")
    for r, c in enumerate(caps):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0:
            raise ValueError(f"capacity must be in (0, 1], got capacities[{r}]={c!r}")
    if caps[0] != 1.0:
        raise ValueError(f"capacities[0] must be 1.0 (every token takes the first recursion), got {caps[0]!r}")
    if any(b > a for a, b in zip(caps, caps[1:])):
        raise ValueError(f"capacities must be non-increasing (selected tokens are nested), got {caps}")
    return tuple(float(c) for c in caps)


def tokens_at_step(capacity: float, seq_len: int) -> int:
    """k_r = max(1, ⌊capacity · T⌋)."""
    return max(1, math.floor(capacity * seq_len + 1e-9))


@dataclass
class TokenChoiceState:
    """Token choice's routing, decided once from h⁰: last step index j (B, T) and gate weight w (B, T)."""

    last_step: torch.Tensor
    weight: torch.Tensor | None


class MixtureOfRecursionsTransformer(RecursiveTransformer):
    """A cycle-shared recursive transformer whose tokens take 1..num_recursion steps (see the module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        num_recursion: int,
        routing: str = "expert_choice",
        capacities: Sequence[float] | None = None,
        kv_strategy: str = "recursion_wise",
        gate: str = "sigmoid",
        alpha: float | None = None,
        router_aux_loss_coef: float | None = None,
        causal_routing: bool = False,
        sharing: str = "cycle",
        ln_share: bool = True,
        halting_threshold: float | None = None,
    ) -> None:
        if sharing != "cycle":
            raise ValueError(f"Mixture-of-Recursions loops the whole stack: sharing must be 'cycle', got {sharing!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if kv_strategy not in KV_STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {KV_STRATEGIES}, got {kv_strategy!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if not isinstance(causal_routing, bool):
            raise TypeError(f"causal_routing must be a bool, got {causal_routing!r}")
        super().__init__(config, num_recursion=num_recursion, sharing=sharing, ln_share=ln_share,
                         halting_threshold=halting_threshold)
        self.routing, self.kv_strategy, self.gate = routing, kv_strategy, gate
        self.capacities = check_capacities(
            default_capacities(num_recursion) if capacities is None else capacities, num_recursion=num_recursion)
        default_alpha = 2.0 if routing == "expert_choice" else float(num_recursion)
        self.alpha = default_alpha if alpha is None else float(alpha)
        default_coef = 1e-3 if routing == "expert_choice" else 0.1
        self.router_aux_loss_coef = default_coef if router_aux_loss_coef is None else float(router_aux_loss_coef)
        self.causal_routing = causal_routing
        d = config.d_model
        if routing == "expert_choice":
            self.routers = nn.ModuleList(nn.Linear(d, 1, bias=False) for _ in range(num_recursion))
            for router in self.routers:
                nn.init.normal_(router.weight, mean=0.0, std=0.02)
        else:
            self.router = TopKRouter(d_model=d, num_experts=num_recursion, top_k=1)

    @property
    def kv_sharing(self) -> bool:  # type: ignore[override]
        return self.kv_strategy == "kv_sharing"

    @property
    def kv_strategy(self) -> str:
        return self._kv_strategy

    @kv_strategy.setter
    def kv_strategy(self, value: str) -> None:
        # settable after training: the same weights can be decoded with either cache
        if value not in KV_STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {KV_STRATEGIES}, got {value!r}")
        self._kv_strategy = value

    @property
    def causal_routing(self) -> bool:
        return self._causal_routing

    @causal_routing.setter
    def causal_routing(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"causal_routing must be a bool, got {value!r}")
        self._causal_routing = value

    def _adaptive(self) -> bool:
        return True

    # -- routing hooks --

    def _route_start(self, h0: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if self.routing != "token_choice":
            return None, h0.new_zeros(())
        batch, time, d = h0.shape
        out = self.router(h0.reshape(batch * time, d))
        # j_t = argmax_i p_{t,i}: the token runs steps 0..j_t
        last_step = out.indices[:, 0].view(batch, time)
        weight = None
        if self.gate == "sigmoid":
            # w_t = alpha · p_{t, j_t}
            weight = self.alpha * out.weights[:, 0].view(batch, time)
        aux = h0.new_zeros(())
        if self.training and self.router_aux_loss_coef:
            # N Σ_i f_i P_i over depths
            aux = self.router_aux_loss_coef * load_balancing_loss(out.probs, out.indices)
        return TokenChoiceState(last_step=last_step, weight=weight), aux

    def _select(self, r: int, h: torch.Tensor, active: torch.Tensor, state: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        zero = h.new_zeros(())
        if self.routing == "token_choice":
            return active & (state.last_step >= r), None, zero
        # r_t = w_rᵀ h_t : (B, T), in float32
        logits = F.linear(h.float(), self.routers[r].weight.float()).squeeze(-1)
        gate = self.alpha * torch.sigmoid(logits) if self.gate == "sigmoid" else None
        if r == 0:
            return active, gate, zero
        if self.causal_routing:
            # continue iff sigmoid(r_t) > 0.5, from the token's own state only
            selected = active & (logits > 0)
        else:
            k = tokens_at_step(self.capacities[r], h.shape[1])
            # top-k_r among the candidates (tokens selected at r-1) of each sequence
            scores = logits.masked_fill(~active, float("-inf"))
            idx = scores.topk(k, dim=1).indices
            selected = torch.zeros_like(active).scatter(1, idx, True) & active
        aux = zero
        if self.training and self.router_aux_loss_coef:
            # BCE(r_t, 1[t selected]) over the candidates, so that sigmoid(r) > 0.5 learns the selection
            aux = self.router_aux_loss_coef * F.binary_cross_entropy_with_logits(
                logits[active], selected[active].float())
        return selected, gate, aux

    def _route_finish(self, h0: torch.Tensor, h: torch.Tensor, state: Any) -> torch.Tensor:
        if self.routing == "token_choice" and state.weight is not None:
            # h_final = h⁰ + w (h^(j+1) - h⁰)
            return h0 + state.weight.unsqueeze(-1).to(h.dtype) * (h - h0)
        return h
