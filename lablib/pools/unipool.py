"""UniPool: one global pool of experts shared by every MoE layer, each layer with its own router.

    y_ℓ(x) = Σ_{e ∈ S_ℓ(x)} w_{ℓ,e}(x) · F_e(x),     F_1..F_M one pool for all L layers,  S_ℓ from router ℓ

Huang et al., *UniPool: A Globally Shared Expert Pool for Mixture-of-Experts*. The pool size M is a hyperparameter of
its own, independent of depth: a per-layer MoE with E experts in each of L layers holds L·E experts, a UniPool model
holds M (the paper reports pools of 41.6-66.7 % of the L·E budget matching the per-layer model).

Pieces, each reusing `lablib.moe` (routing, dispatch, capacity and diagnostics are `MoELayer`'s, not copied here):

* `ExpertPool`: the M experts (a `lablib.moe.Experts` bank) and the pool's `ledger_counts`: the experts are stored
  once, while a token may visit up to L·top_k of them (one top-k per layer).
* `PoolMoELayer`: an `MoELayer` whose experts are the pool's. It holds the pool as a plain reference (not a child
  module), so the pool's tensors are registered, saved and counted once, by the model that owns the pool; its own
  `ledger_counts` counts only its router. Its output, `PoolMoEOutput`, adds the differentiable mean routing score
  per expert that the pool loss needs.
* `NormRouter`: scale-stable routing into the pool (see its docstring for what we chose where the abstract is silent).
* `pool_balance_loss`: the pool-level auxiliary loss, counts and scores pooled over all layers, so one layer may
  specialise while the pool as a whole stays balanced (a per-layer loss would push every layer onto all M experts).
* `UniPoolTransformer`: a `lablib.moe.MoETransformer` whose FFNs are `PoolMoELayer`s over one pool; it adds
  `pool_aux_loss_coef · L_pool` to the model's `aux_loss`.

Design choices where the paper's abstract is silent (the formulas follow a public Megatron-LM fork that implements
both pieces, read via the project's research digest; not verified against the paper's text):
* NormRouter: `z = W_ℓ x`, `ẑ = z / (‖z‖₂ + ε)`, `s = σ_ℓ · s₀ · ReLU(ẑ)` with a learnable scalar σ_ℓ (init 1) and a
  fixed `score_scale` s₀ (default 1, the fork's "one" option; its Monte-Carlo s₀ is infinite for pools under ~32
  experts). Top-k on s; the combine weights are s on the chosen experts, **not renormalised**.
* Pool loss: computed exactly after the last layer from this step's counts (the fork uses the previous
  micro-batch's global counts to avoid a cross-layer dependency; with one process there is none to avoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lablib.ledger import LedgerCounts
from lablib.models import INIT_STD, BlocksOutput, TransformerConfig
from lablib.moe import Experts, MoELayer, MoEOutput, MoETransformer, Router, RouterOutput, build_router, top_k_gating
from lablib.moe.routers import ROUTERS, _check_positive_float, _check_positive_int

__all__ = [
    "NormRouter",
    "ExpertPool",
    "PoolMoEOutput",
    "PoolMoELayer",
    "pool_balance_loss",
    "UniPoolTransformer",
    "pool_usage",
]


class NormRouter(Router):
    """Scale-stable router for a shared pool: cosine-like scores that no input scale can blow up.

        z = W x              (E,)   W: (E, d_model), no bias
        ẑ = z / (‖z‖₂ + ε)          unit length: multiplying x by c > 0 leaves ẑ unchanged
        s = σ · s₀ · ReLU(ẑ)        σ learnable (init 1), s₀ = `score_scale`; s ≥ 0 and ‖s‖ ≤ σ s₀
        S = top_k(s),  w_e = s_e for e ∈ S (no renormalisation: a chosen expert may get weight 0)

    Why: every layer's residual stream has its own scale, and a softmax router on one shared pool would let the
    deepest (largest-norm) layers route far more sharply than the first ones. `probs` is s itself (the pool loss's
    P uses it), so `uses_z_loss` is False (z-loss on scale-free logits means nothing).
    """

    uses_z_loss = False

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 2, score_scale: float = 1.0,
                 eps: float = 1e-6) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.score_scale = _check_positive_float("score_scale", score_scale)
        self.eps = _check_positive_float("eps", eps)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.sigma = nn.Parameter(torch.ones(()))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        nn.init.ones_(self.sigma)

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        # (N, d_model), float32 or wider
        x = self._prepare(x)
        # z = W x : (N, E)
        logits = F.linear(x, self.weight.to(x.dtype))
        # ẑ = z / (‖z‖ + ε) : (N, E)
        unit = logits / (logits.norm(dim=-1, keepdim=True) + self.eps)
        # s = σ s₀ ReLU(ẑ) : (N, E)
        scores = self.sigma.to(x.dtype) * self.score_scale * F.relu(unit)
        weights, indices = top_k_gating(scores, self.top_k, normalize=False, selection_bias=selection_bias)
        return RouterOutput(weights=weights, indices=indices, logits=logits, probs=scores)

    def flops_per_token(self) -> int:
        return 2 * self.num_experts * self.d_model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, score_scale={self.score_scale}"


class ExpertPool(nn.Module):
    """M experts shared by `num_users` MoE layers (a `lablib.moe.Experts` bank in `.experts`).

    `ledger_counts`: total = stored = the M experts once; active per token = the distinct experts one token can
    visit, min(num_users · top_k, M) experts; FLOPs = num_users · top_k expert calls. The layers using the pool count
    only their routers. `num_users` and `top_k` are set by the model that builds the layers (`UniPoolTransformer`).
    """

    def __init__(self, *, num_experts: int, d_model: int, d_hidden: int, top_k: int, num_users: int = 1,
                 activation: str = "gelu", bias: bool = False, init_std: float = INIT_STD,
                 out_init_std: float | None = None) -> None:
        super().__init__()
        _check_positive_int("pool_size", num_experts)
        self.top_k = _check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"pool size ({num_experts}) must be >= top_k ({top_k}): a layer cannot pick more "
                             "experts than the pool holds")
        self.num_users = _check_positive_int("num_users", num_users)
        self.experts = Experts(num_experts=num_experts, d_model=d_model, d_hidden=d_hidden, activation=activation,
                               bias=bias, init_std=init_std, out_init_std=out_init_std)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def ledger_counts(self) -> LedgerCounts:
        total = sum(p.numel() for p in self.parameters())
        visited = min(self.num_users * self.top_k, self.num_experts)
        calls = self.num_users * self.top_k
        return LedgerCounts(total=total, active_per_token=visited * self.experts.params_per_expert, stored=total,
                            flops_per_token=2 * calls * self.experts.matmul_params_per_expert)

    def extra_repr(self) -> str:
        return f"pool_size={self.num_experts}, top_k={self.top_k}, num_users={self.num_users}"


@dataclass
class PoolMoEOutput(MoEOutput):
    """`MoEOutput` plus `mean_probs` (E,): the mean routing score per pool expert over this layer's tokens,
    differentiable (the pool loss's P term)."""

    mean_probs: torch.Tensor | None = None


class PoolMoELayer(MoELayer):
    """An `MoELayer` routed into a shared `ExpertPool` (keyword-only; see `MoELayer` for the other arguments).

    * `pool`: the shared experts; num_experts, d_model, d_hidden and activation come from it.
    * `router`: `"norm"` (`NormRouter`, the default), any name of `lablib.moe.ROUTERS`, or a `Router` instance.
    * `router_aux_loss_coef` defaults to 0: the model adds the pool-level loss instead.
    """

    def __init__(self, *, pool: ExpertPool, top_k: int = 2, router: str | Router = "norm",
                 router_kwargs: Mapping[str, Any] | None = None, router_aux_loss_coef: float = 0.0,
                 **layer_kwargs: Any) -> None:
        if not isinstance(pool, ExpertPool):
            raise TypeError(f"pool must be an ExpertPool, got {type(pool).__name__}")
        for key in ("num_experts", "d_model", "d_hidden", "activation", "bias", "expert_granularity"):
            if key in layer_kwargs:
                raise ValueError(f"{key} comes from the pool (or is not supported with a pool); do not pass it")
        bank = pool.experts
        if router == "norm":
            router = NormRouter(d_model=bank.d_model, num_experts=bank.num_experts, top_k=top_k,
                                **dict(router_kwargs or {}))
            router_kwargs = None
        super().__init__(d_model=bank.d_model, d_hidden=bank.d_hidden, num_experts=bank.num_experts, top_k=top_k,
                         router=router, router_kwargs=router_kwargs, activation=bank.activation, bias=bank.bias,
                         router_aux_loss_coef=router_aux_loss_coef, **layer_kwargs)
        # drop the per-layer bank MoELayer built and point at the pool's, as a plain attribute (not a child module):
        # the pool is registered, saved and counted once, by the model that owns it
        del self.experts
        object.__setattr__(self, "experts", bank)
        object.__setattr__(self, "pool", pool)

    def forward(self, x: torch.Tensor, **context: Any) -> PoolMoEOutput:
        captured: list[RouterOutput] = []
        handle = self.router.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            out = super().forward(x, **context)
        finally:
            handle.remove()
        # P_ℓ,e = mean_t p_{ℓ,t,e} : (E,), differentiable
        mean_probs = captured[-1].probs.mean(dim=0)
        return PoolMoEOutput(**{f.name: getattr(out, f.name) for f in fields(MoEOutput)}, mean_probs=mean_probs)

    def ledger_counts(self) -> LedgerCounts:
        """Only the router (and shared experts, if any): the pooled experts are the `ExpertPool`'s to count."""
        own = sum(p.numel() for p in self.parameters())
        shared = self.shared_experts
        shared_flops = 2 * shared.matmul_params_per_expert if shared is not None else 0
        return LedgerCounts(total=own, active_per_token=own, stored=own,
                            flops_per_token=self.router.flops_per_token() + shared_flops)


def pool_balance_loss(tokens_per_expert: Sequence[torch.Tensor], mean_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """UniPool's pool-level balance loss (unweighted): L_pool = M · Σ_i f_i · P_i.

    * `tokens_per_expert`: per layer ℓ, (M,) assignments router ℓ made to each pool expert (before capacity).
    * `mean_probs`: per layer ℓ, (M,) the mean routing score of each expert over that layer's tokens (differentiable).

    f_i = Σ_ℓ c_{ℓ,i} / Σ_ℓ Σ_j c_{ℓ,j}  (= counts / (k · L · N) for token choice),  P_i = (1/L) Σ_ℓ P_{ℓ,i}.
    With one layer it is the Switch/GShard loss `lablib.moe.load_balancing_loss`; with several, a layer may use few
    experts as long as the pool as a whole is used evenly (1 at perfect pool balance with uniform scores).
    """
    counts, probs = list(tokens_per_expert), list(mean_probs)
    if not counts or len(counts) != len(probs):
        raise ValueError(f"need one count vector and one mean-probability vector per layer, got {len(counts)} and "
                         f"{len(probs)}")
    num_experts = probs[0].shape[-1]
    for i, (c, p) in enumerate(zip(counts, probs)):
        if c.shape != (num_experts,) or p.shape != (num_experts,):
            raise ValueError(f"layer {i}: counts {tuple(c.shape)} and mean_probs {tuple(p.shape)} must both be "
                             f"({num_experts},)")
    with torch.no_grad():
        total = torch.stack([c.to(probs[0].dtype) for c in counts]).sum(dim=0)
        # f_i = pooled assignments to i / all assignments : (M,)
        fraction = total / total.sum().clamp_min(1.0)
    # P_i = mean over layers of the layer's mean score : (M,)
    mean_prob = torch.stack(probs).mean(dim=0)
    # L_pool = M Σ_i f_i P_i
    return num_experts * (fraction * mean_prob).sum()


class UniPoolTransformer(MoETransformer):
    """A tiny LM whose every FFN routes into one shared `ExpertPool` of `pool_size` experts (keyword-only).

    * `pool_size`: M, independent of depth; `top_k` experts per token per layer (pool_size >= top_k).
    * `d_hidden`: width of one expert (default `config.ffn_hidden`).
    * `router`: `"norm"` (default) or a name in `lablib.moe.ROUTERS`; `router_kwargs` its options.
    * `pool_aux_loss_coef`: α of the pool loss added to `aux_loss` (0.01 as Switch's α by default).
    * Everything else (`capacity_factor`, `z_loss_coef`, `router_aux_loss_coef` for an extra per-layer loss...)
      goes to every `PoolMoELayer`.
    """

    def __init__(self, config: TransformerConfig, *, pool_size: int, top_k: int = 2, d_hidden: int | None = None,
                 router: str = "norm", router_kwargs: Mapping[str, Any] | None = None,
                 pool_aux_loss_coef: float = 0.01, activation: str = "gelu", **layer_kwargs: Any) -> None:
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if router != "norm" and router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose 'norm' or one of {sorted(ROUTERS)}")
        if (isinstance(pool_aux_loss_coef, bool) or not isinstance(pool_aux_loss_coef, (int, float))
                or not math.isfinite(pool_aux_loss_coef) or pool_aux_loss_coef < 0):
            raise ValueError(f"pool_aux_loss_coef must be a finite number >= 0, got {pool_aux_loss_coef!r}")
        out_std = INIT_STD / math.sqrt(2 * config.n_layers)
        pool = ExpertPool(num_experts=pool_size, d_model=config.d_model,
                          d_hidden=config.ffn_hidden if d_hidden is None else d_hidden, top_k=top_k,
                          num_users=config.n_layers, activation=activation, out_init_std=out_std)

        def factory(layer_idx: int, cfg: TransformerConfig) -> nn.Module:
            kwargs = {"dropout": cfg.dropout, **layer_kwargs}
            return PoolMoELayer(pool=pool, top_k=top_k, router=router, router_kwargs=router_kwargs, **kwargs)

        super().__init__(config, ffn_factory=factory)
        # registered after TinyTransformer's init, so its generic init does not overwrite the pool's own
        self.expert_pool = pool
        self.pool_aux_loss_coef = float(pool_aux_loss_coef)

    def _run_blocks(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None) -> BlocksOutput:
        stack = super()._run_blocks(x, token_ids=token_ids)
        if self.pool_aux_loss_coef > 0:
            loss = pool_loss_of(stack.layer_outputs)
            stack.aux_loss = stack.aux_loss + self.pool_aux_loss_coef * loss.to(stack.aux_loss.dtype)
        return stack


def pool_loss_of(layer_outputs: Sequence[Any]) -> torch.Tensor:
    """`pool_balance_loss` over the `PoolMoEOutput`s of one forward (e.g. `LMOutput.layer_outputs`)."""
    outs = [o for o in layer_outputs if isinstance(o, PoolMoEOutput)]
    if not outs:
        raise ValueError("no PoolMoEOutput among the layer outputs; is this a UniPool model's forward?")
    return pool_balance_loss([o.routed_per_expert for o in outs], [o.mean_probs for o in outs])


@torch.no_grad()
def pool_usage(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(n_moe_layers, num_experts) share of each layer's routed assignments that went to each expert, on `idx`.

    Works for a UniPool model (columns = the same pool experts in every row) and for a per-layer MoE (columns = that
    layer's own experts). The model is run in eval mode and its mode restored.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(idx)
    finally:
        model.train(was_training)
    rows = [o.routed_per_expert.float() for o in out.layer_outputs if isinstance(o, MoEOutput)]
    if not rows:
        raise ValueError("the model has no MoE layers")
    usage = torch.stack(rows)
    return usage / usage.sum(dim=1, keepdim=True).clamp_min(1.0)
