"""The mixture-of-experts FFN: a router, a bank of experts with stacked weights, and a grouped dispatch.

    y_t = Σ_{i ≤ K_s} S_i(x_t)  +  Σ_{s: slot kept} w_{t,s} · F_{e_{t,s}}(x_t)
          shared experts            routed experts chosen by the router (`lablib.moe.routers`)

Each routed expert F_e is an FFN, GELU (`W_out act(x W_in + b_in) + b_out`) or SwiGLU
(`W_out (silu(x W_gate) ⊙ x W_in)`), and the E experts' weights are stacked into 3-D tensors `w_in`
(E, d_model, d_hidden) and `w_out` (E, d_hidden, d_model), in→out order, like ScatterMoE's `ParallelExperts` and Hugging
Face's v5 experts. Papers: Shazeer et al. 2017 ([arXiv:1701.06538](https://arxiv.org/abs/1701.06538)), GShard
([arXiv:2006.16668](https://arxiv.org/abs/2006.16668)), Switch Transformers
([arXiv:2101.03961](https://arxiv.org/abs/2101.03961)), DeepSeekMoE
([arXiv:2401.06066](https://arxiv.org/abs/2401.06066)).

**Dispatch** (`backend="torch"`, `grouped_torch_experts`): flatten the (token, slot) assignments that are kept,
stable-sort them by expert, count them per expert (`bincount`), gather the token rows in that order, run each expert
once on its contiguous group (two matmuls), scale by the combine weights, and scatter-add back to the tokens
(`index_add`). Work is proportional to the k·N assignments, never E·N: no expert sees a token it was not routed.
`Experts(x, indices, weights, mask)` is the HF/ScatterMoE call `experts(x, topk_idx, topk_weights)`; the `backend`
string picks the implementation from `EXPERT_BACKENDS`: `"torch"` (this dispatch), `"triton"` (lab 07's grouped-GEMM
kernels in `lablib.kernels.triton_moe`, imported on first use; on a machine without CUDA they run in Triton's CPU
interpreter, slowly) or `"auto"` (`"triton"` for CUDA tensors, `"torch"` elsewhere).

**Capacity and dropping.** `capacity_factor=None` is dropless. Otherwise each expert takes at most
C = ceil(capacity_factor · k · N / E) assignments per call (Megatron-LM's `get_capacity`; Switch's ⌊cf·N/E⌋ for k = 1
differs by at most one), where N = B·T is the whole batch (one group). **Drop policy:** assignments queue per expert in
priority order, all first choices before any second choice (GShard / flaxformer), and inside one choice rank by the
token's position in the flattened batch (b·T + t); an assignment past the capacity is dropped and contributes 0, so a
fully dropped token leaves the block unchanged through the residual (flaxformer; Hugging Face's Switch and labml add
p·x instead). The kept weights are not renormalised. The load-balancing loss uses the choices before the drop.
Expert-choice routers fix their own capacity (every expert takes exactly C tokens; `capacity_factor=None` means 1.0).

**Shared and fine-grained experts** (DeepSeekMoE). `expert_granularity=m` splits each of the `num_experts` experts
of width `d_hidden` into m experts of width `d_hidden / m` and routes to `top_k · m` of the `num_experts · m`: the
total and the active expert parameters stay the same while the number of expert combinations grows.
`n_shared_experts=K_s` adds K_s always-on experts of the segment width `d_hidden / m`, run on every token as one
FFN of width K_s · d_hidden / m. `num_experts` and `top_k` count routed experts only (the DeepSeek-V3 config
convention); DeepSeekMoE's paper instead carves the shared experts out of a fixed budget.

**Losses and diagnostics** come back in `MoEOutput`, never in global state: `aux_loss` =
`router_aux_loss_coef · load_balance_loss + z_loss_coef · z_loss` (each term only when its coefficient is > 0 and
the router uses it: hash and random-fixed routers have nothing to train, expert choice is balanced by construction)
plus any router-specific terms. `TinyTransformer` sums the layers' `aux_loss` and keeps each `MoEOutput` in
`LMOutput.layer_outputs`. With `bias_update_rate` set, the layer also owns an auxiliary-loss-free `ExpertBias`; the
training loop calls `update_bias` (or `update_expert_biases(model, output)`) after each step.

**Context beyond x.** `forward(x, *, token_ids=None, router_state=None)`: hash routing on token ids needs the ids,
and RMoE's recurrent router needs the previous layer's router state. `MoETransformer`, a two-method subclass of
`TinyTransformer`, passes both to every MoE layer (`Block.forward(x, **ffn_kwargs)` and `_block_context` are the
hooks in `lablib.models`). A plain `TinyTransformer` gives neither: hash-on-ids raises, the recurrent router starts
every layer from a zero state.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lablib.ledger import LedgerCounts
from lablib.models import INIT_STD, MLP, BlocksOutput, ModuleFactory, TinyTransformer, TransformerConfig
from lablib.moe.balance import ExpertBias, load_balancing_loss, router_entropy, router_z_loss
from lablib.moe.routers import (
    EXPERT_CHOICE,
    ROUTERS,
    Router,
    _check_positive_int,
    _is_int,
    build_router,
    router_options,
)

__all__ = [
    "EXPERT_ACTIVATIONS",
    "EXPERT_BACKENDS",
    "ExpertBackend",
    "register_expert_backend",
    "grouped_torch_experts",
    "capacity_mask",
    "token_choice_capacity",
    "Experts",
    "MoEOutput",
    "MoELayer",
    "moe_ffn_factory",
    "MoETransformer",
    "update_expert_biases",
    "lm_loss_with_bias_update",
]

EXPERT_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")

_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Experts and their backends
# ----------------------------------------------------------------------------------------------------------------

ExpertBackend = Callable[
    ["Experts", torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor
]
"""`fn(experts, x (N, d_model), indices (N, k), weights (N, k), mask (N, k) bool or None) -> y (N, d_model)` with
y_t = Σ_{s: mask[t, s]} weights[t, s] · F_{indices[t, s]}(x_t), differentiable in x, weights and the expert weights."""

EXPERT_BACKENDS: dict[str, ExpertBackend] = {}

# backends that live in another module, imported (and so registered) the first time they are asked for; the
# import is deferred because it imports Triton and, without CUDA, switches it to its interpreter
_LAZY_BACKENDS = {"triton": "lablib.kernels.triton_moe"}


def register_expert_backend(name: str, fn: ExpertBackend) -> None:
    """Make `fn` (see `ExpertBackend`) selectable as `Experts(..., backend=name)` / `MoELayer(..., backend=name)`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable, got {type(fn).__name__}")
    EXPERT_BACKENDS[name] = fn


def _check_backend(backend: Any) -> str:
    if backend in EXPERT_BACKENDS:
        return backend
    if backend in _LAZY_BACKENDS:
        try:
            importlib.import_module(_LAZY_BACKENDS[backend])  # registers the backend
        except ImportError as error:
            raise ValueError(f"backend {backend!r} needs {_LAZY_BACKENDS[backend]}, which failed to import "
                             f"({error}); install triton (and numpy for its CPU interpreter) or use "
                             "backend='torch'") from error
        if backend in EXPERT_BACKENDS:
            return backend
    raise ValueError(f"unknown backend {backend!r}; choose one of {sorted({*EXPERT_BACKENDS, *_LAZY_BACKENDS})}")


def grouped_torch_experts(
    experts: Experts,
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `"torch"` backend: sort the assignments by expert, run each expert once on its group, scatter back."""
    num_tokens, slots = indices.shape
    # assignment a = t·k + s belongs to token t = a // k : (N k,)
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(slots)
    expert = indices.reshape(-1)
    gate = weights.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1)
        token, expert, gate = token[keep], expert[keep], gate[keep]
    if expert.numel() == 0:
        return x.new_zeros(num_tokens, x.shape[1])
    # group the assignments by expert; a stable sort keeps token order inside each group : (M,)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()
    token, gate = token[order], gate[order]
    # gather the token rows in expert order : (M, d_model)
    rows = x.index_select(0, token)
    # one FFN call per non-empty expert group, on contiguous rows : (M, d_model)
    params = experts.per_expert_params()
    outputs = [experts.expert_forward(e, chunk, params=params) for e, chunk in enumerate(rows.split(counts))
               if counts[e]]
    out = torch.cat(outputs, dim=0)
    # y_t = Σ_{assignments a of t} w_a · F_{e_a}(x_t) : (N, d_model)
    return x.new_zeros(num_tokens, x.shape[1]).index_add(0, token, out * gate.unsqueeze(1).to(out.dtype))


register_expert_backend("torch", grouped_torch_experts)


def auto_experts(
    experts: Experts,
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `"auto"` backend: the Triton kernels for CUDA tensors, the `"torch"` dispatch elsewhere."""
    name = "triton" if x.is_cuda else "torch"
    return EXPERT_BACKENDS[_check_backend(name)](experts, x, indices, weights, mask)


register_expert_backend("auto", auto_experts)


class Experts(nn.Module):
    """E expert FFNs with stacked weights, called as `experts(x, indices, weights, mask=None)`.

    Parameters: `w_in` (E, d_model, d_hidden), `w_gate` (E, d_model, d_hidden) for SwiGLU only, `w_out`
    (E, d_hidden, d_model); with `bias=True` also `b_in`, `b_gate` (SwiGLU), `b_out`. Initialisation: weights
    ~ N(0, init_std²), `w_out` ~ N(0, out_init_std²) (default init_std; `moe_ffn_factory` passes nanoGPT's
    0.02 / sqrt(2 n_layers) for residual output projections), biases 0.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        backend: str = "torch",
        init_std: float = INIT_STD,
        out_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_hidden = _check_positive_int("d_hidden", d_hidden)
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {list(EXPERT_ACTIVATIONS)}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got {bias!r}")
        self.activation, self.bias = activation, bias
        self.backend = _check_backend(backend)
        self.init_std = _check_nonnegative("init_std", init_std)
        self.out_init_std = self.init_std if out_init_std is None else _check_nonnegative("out_init_std", out_init_std)
        swiglu = activation == "swiglu"
        E, d, h = num_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(E, d, h))
        self.w_gate = nn.Parameter(torch.empty(E, d, h)) if swiglu else None
        self.w_out = nn.Parameter(torch.empty(E, h, d))
        self.b_in = nn.Parameter(torch.zeros(E, h)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, h)) if bias and swiglu else None
        self.b_out = nn.Parameter(torch.zeros(E, d)) if bias else None
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.w_in, mean=0.0, std=self.init_std)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, mean=0.0, std=self.init_std)
        nn.init.normal_(self.w_out, mean=0.0, std=self.out_init_std)
        for b in (self.b_in, self.b_gate, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    @property
    def params_per_expert(self) -> int:
        """Parameters of one expert (weights and biases)."""
        return sum(p.numel() for p in self.parameters()) // self.num_experts

    @property
    def matmul_params_per_expert(self) -> int:
        """Weight-matrix entries of one expert: 2 d h (GELU/ReLU/SiLU) or 3 d h (SwiGLU); 2x this is its FLOPs/token."""
        return (3 if self.activation == "swiglu" else 2) * self.d_model * self.d_hidden

    def per_expert_params(self) -> dict[str, tuple[torch.Tensor, ...] | None]:
        """Per-expert views of the stacked parameters, one `unbind` per tensor.

        A backend that loops over experts should take its views from here: the backward of `unbind` stacks the
        experts' gradients once, whereas indexing `w_in[e]` for each expert makes autograd build a full
        (E, d_model, d_hidden) gradient per expert and add them up (E times the memory traffic).
        """
        names = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")
        return {name: None if getattr(self, name) is None else getattr(self, name).unbind(0) for name in names}

    def expert_forward(
        self, e: int, x: torch.Tensor, *, params: dict[str, tuple[torch.Tensor, ...] | None] | None = None
    ) -> torch.Tensor:
        """Expert e on rows x (n, d_model) -> (n, d_model); `params` from `per_expert_params()` (made if None)."""
        p = self.per_expert_params() if params is None else params
        # u = x W_in + b_in : (n, d_hidden)
        u = x @ p["w_in"][e].to(x.dtype)
        if p["b_in"] is not None:
            u = u + p["b_in"][e].to(x.dtype)
        if p["w_gate"] is not None:
            g = x @ p["w_gate"][e].to(x.dtype)
            if p["b_gate"] is not None:
                g = g + p["b_gate"][e].to(x.dtype)
            # SwiGLU: h = silu(x W_gate) ⊙ (x W_in)
            h = F.silu(g) * u
        else:
            # h = act(u)
            h = _ACTIVATION_FNS[self.activation](u)
        # F_e(x) = h W_out + b_out : (n, d_model)
        out = h @ p["w_out"][e].to(x.dtype)
        if p["b_out"] is not None:
            out = out + p["b_out"][e].to(x.dtype)
        return out

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"experts expect x of shape (num_tokens, d_model={self.d_model}), got {tuple(x.shape)}")
        if indices.dim() != 2 or indices.shape[0] != x.shape[0] or weights.shape != indices.shape:
            raise ValueError(f"indices and weights must both have shape ({x.shape[0]}, k), got "
                             f"{tuple(indices.shape)} and {tuple(weights.shape)}")
        if mask is not None and mask.shape != indices.shape:
            raise ValueError(f"mask must have the shape of indices {tuple(indices.shape)}, got {tuple(mask.shape)}")
        return EXPERT_BACKENDS[_check_backend(self.backend)](self, x, indices, weights, mask)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}, bias={self.bias}, backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------------------------------


def token_choice_capacity(num_tokens: int, *, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert may take: C = ceil(capacity_factor · top_k · N / E) (Megatron-LM's get_capacity)."""
    # C = ⌈cf · k · N / E⌉
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def capacity_mask(indices: torch.Tensor, *, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) bool: which token-choice assignments fit under `capacity` per expert (the layer's drop policy).

    Priority: every slot-0 (first-choice) assignment before any slot-1 one, and so on; within a slot, by token
    index. An assignment is kept iff fewer than `capacity` assignments to its expert come before it.
    """
    num_tokens, slots = indices.shape
    # slot-major order: position a = s·N + t : (k N,)
    queue = indices.t().reshape(-1)
    # stable sort by expert keeps the priority order inside each expert's queue
    order = torch.argsort(queue, stable=True)
    counts = torch.bincount(queue, minlength=num_experts)
    starts = torch.cumsum(counts, dim=0) - counts
    # rank of each assignment in its expert's queue: its place in sorted order minus the queue's start : (k N,)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(queue.numel(), device=indices.device) - starts[queue[order]]
    return (rank < capacity).view(slots, num_tokens).t()


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MoEOutput:
    """What `MoELayer.forward` returns (B, T = the input's batch and time, E = routed experts, k = slots per token).

    * `y`: (B, T, d_model) the layer's output (the residual add happens in the block).
    * `aux_loss`: 0-d, the weighted sum of the enabled balance terms plus router-specific terms (differentiable).
    * `load_balance_loss`, `z_loss`: 0-d, the unweighted terms (differentiable), reported even when not enabled.
    * `tokens_per_expert`: (E,) int64, assignments each expert processed (after capacity).
    * `routed_per_expert`: (E,) int64, assignments the router made (before capacity); feeds `update_bias`.
    * `dropped`: assignments dropped by capacity (an int; tokens when k = 1).
    * `capacity`: assignments per expert allowed in this call, or None (dropless).
    * `router_entropy`: 0-d, mean entropy of the routing distribution in nats (detached).
    * `weights`, `indices`: (B, T, k) combine weights and expert ids (detached, for plots).
    * `kept`: (B, T, k) bool, which slots were computed (router mask and capacity).
    * `probs`: (B, T, E) routing probabilities (detached).
    * `router_state`: (B, T, d_state) the recurrent router's new state (not detached), else None.
    * `router_losses`: router-specific weighted terms included in aux_loss.
    """

    y: torch.Tensor
    aux_loss: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    routed_per_expert: torch.Tensor
    dropped: int
    capacity: int | None
    router_entropy: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    router_state: torch.Tensor | None = None
    router_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MoELayer(nn.Module):
    """A mixture-of-experts FFN, a drop-in for `lablib.models.MLP` (see the module docstring for the maths).

    Keyword-only arguments:
    * `d_model`, `d_hidden`: model width and the width of one (unsegmented) expert.
    * `num_experts`, `top_k`: routed experts and how many each token uses (before `expert_granularity`).
    * `router`: a name in `lablib.moe.ROUTERS` (`"top_k"`, `"switch"`, `"expert_choice"`, `"cosine"`, `"hash"`,
      `"random_fixed"`, `"recurrent"`) or a `Router` instance (its sizes must match); `router_kwargs`: that
      router's own options (e.g. `{"normalize_top_k": False}`, `{"d_space": 16}`, `{"num_keys": 256}`).
    * `activation`: `"gelu"` (default, as `models.MLP`), `"relu"`, `"silu"` or `"swiglu"`; `bias`: expert biases.
    * `capacity_factor`: None (dropless) or > 0; see the drop policy in the module docstring.
    * `n_shared_experts`, `expert_granularity`: DeepSeekMoE's shared and fine-grained experts.
    * `router_aux_loss_coef` (default 0.01, Switch), `z_loss_coef` (default 0: off; ST-MoE uses 1e-3).
    * `bias_update_rate`: None, or the step u of auxiliary-loss-free balancing (DeepSeek-V3 / Megatron: 1e-3).
    * `backend`: `"torch"` (default), `"triton"` or `"auto"` (see the module docstring), or a registered name; `dropout` on the output; `init_std`, `out_init_std`.
    """

    # MoETransformer passes token_ids / router_state to modules that set this
    takes_routing_context = True

    def __init__(
        self,
        *,
        d_model: int,
        d_hidden: int,
        num_experts: int = 8,
        top_k: int = 2,
        router: str | Router = "top_k",
        router_kwargs: Mapping[str, Any] | None = None,
        activation: str = "gelu",
        bias: bool = False,
        capacity_factor: float | None = None,
        n_shared_experts: int = 0,
        expert_granularity: int = 1,
        router_aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        bias_update_rate: float | None = None,
        backend: str = "torch",
        dropout: float = 0.0,
        init_std: float = INIT_STD,
        out_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_hidden = _check_positive_int("d_hidden", d_hidden)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.top_k = _check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts}): a token cannot pick more "
                             "experts than exist")
        self.expert_granularity = _check_positive_int("expert_granularity", expert_granularity)
        if d_hidden % expert_granularity:
            raise ValueError(f"expert_granularity ({expert_granularity}) must divide d_hidden ({d_hidden}) to split "
                             "each expert into equal segments")
        if not _is_int(n_shared_experts) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an int >= 0, got {n_shared_experts!r}")
        if capacity_factor is not None and (
            isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
            or not math.isfinite(capacity_factor) or capacity_factor <= 0
        ):
            raise ValueError(f"capacity_factor must be None (dropless) or a finite number > 0, got {capacity_factor!r}")
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.router_aux_loss_coef = _check_nonnegative("router_aux_loss_coef", router_aux_loss_coef)
        self.z_loss_coef = _check_nonnegative("z_loss_coef", z_loss_coef)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.n_shared_experts = n_shared_experts
        # fine-grained segmentation: m times more experts, m times narrower, m times more of them per token
        self.num_routed_experts = num_experts * expert_granularity
        self.routed_top_k = top_k * expert_granularity
        self.expert_hidden = d_hidden // expert_granularity

        self.router = self._make_router(router, router_kwargs)
        self.experts = Experts(num_experts=self.num_routed_experts, d_model=d_model, d_hidden=self.expert_hidden,
                               activation=activation, bias=bias, backend=backend, init_std=init_std,
                               out_init_std=out_init_std)
        self.shared_experts = None
        if n_shared_experts:
            # K_s always-on experts of width d_hidden / m, computed as one FFN of width K_s · d_hidden / m
            self.shared_experts = Experts(num_experts=1, d_model=d_model,
                                          d_hidden=n_shared_experts * self.expert_hidden, activation=activation,
                                          bias=bias, backend=backend, init_std=init_std, out_init_std=out_init_std)
        self.expert_bias = None
        if bias_update_rate is not None:
            if not self.router.supports_selection_bias:
                raise ValueError(f"bias_update_rate needs a token-choice router with scores; router "
                                 f"{type(self.router).__name__} cannot use a selection bias")
            self.expert_bias = ExpertBias(num_experts=self.num_routed_experts, bias_update_rate=bias_update_rate)
        self.dropout = nn.Dropout(float(dropout))

    def _make_router(self, router: str | Router, router_kwargs: Mapping[str, Any] | None) -> Router:
        if isinstance(router, Router):
            if router_kwargs:
                raise ValueError("router_kwargs only apply when router is a name; configure the Router instance")
            expected = (self.d_model, self.num_routed_experts, self.routed_top_k)
            got = (router.d_model, router.num_experts, router.top_k)
            if got != expected:
                raise ValueError(f"router instance has (d_model, num_experts, top_k) = {got} but the layer needs "
                                 f"{expected} (num_experts and top_k after expert_granularity)")
            return router
        if not isinstance(router, str):
            raise ValueError(f"router must be a router name or a Router instance, got {type(router).__name__}")
        options = dict(router_kwargs or {})
        if "capacity_factor" in router_options(router):
            # expert choice takes its capacity from the layer's capacity_factor (None -> 1.0)
            options.setdefault("capacity_factor", 1.0 if self.capacity_factor is None else self.capacity_factor)
        return build_router(router, d_model=self.d_model, num_experts=self.num_routed_experts,
                            top_k=self.routed_top_k, **options)

    # -- accounting --

    @property
    def expert_choice(self) -> bool:
        return self.router.kind == EXPERT_CHOICE

    @property
    def active_experts_per_token(self) -> float:
        """Routed experts one token uses: top_k · m (token choice), or on average capacity_factor · top_k · m."""
        if self.expert_choice:
            return min(float(self.num_routed_experts), self.router.capacity_factor * self.routed_top_k)
        return float(self.routed_top_k)

    def ledger_counts(self) -> LedgerCounts:
        """`lablib.ledger` protocol: active = router + shared experts + the routed experts one token uses."""
        total = sum(p.numel() for p in self.parameters())
        router_params = sum(p.numel() for p in self.router.parameters())
        shared = self.shared_experts
        shared_params = sum(p.numel() for p in shared.parameters()) if shared is not None else 0
        k_active = self.active_experts_per_token
        active = router_params + shared_params + round(k_active * self.experts.params_per_expert)
        buffers = sum(
            buffer.numel()
            for module in self.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and name not in module._non_persistent_buffers_set
        )
        shared_matmul = shared.matmul_params_per_expert if shared is not None else 0
        # 2 FLOPs per multiply-add: router, shared experts, and the routed experts a token visits
        flops = self.router.flops_per_token() + round(
            2 * (shared_matmul + k_active * self.experts.matmul_params_per_expert)
        )
        return LedgerCounts(total=total, active_per_token=min(active, total), stored=total + buffers,
                            flops_per_token=flops)

    # -- balancing --

    def update_bias(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """One auxiliary-loss-free balancing step from a step's `MoEOutput.routed_per_expert`; returns the change."""
        if self.expert_bias is None:
            raise ValueError("this MoELayer has no selection bias; build it with bias_update_rate=... to use "
                             "auxiliary-loss-free balancing")
        return self.expert_bias.update(tokens_per_expert)

    # -- forward --

    def forward(
        self,
        x: torch.Tensor,
        *,
        token_ids: torch.Tensor | None = None,
        router_state: torch.Tensor | None = None,
    ) -> MoEOutput:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoELayer expects x of shape (batch, time, d_model={self.d_model}), got {got}")
        batch, time, d_model = x.shape
        num_tokens = batch * time
        # (B, T, d_model) -> (N, d_model)
        x_flat = x.reshape(num_tokens, d_model)
        ids = None
        if token_ids is not None:
            if not isinstance(token_ids, torch.Tensor) or token_ids.shape != (batch, time):
                got = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
                raise ValueError(f"token_ids must have shape (batch, time) = {(batch, time)}, got {got}")
            ids = token_ids.reshape(num_tokens)
        # position t of each flattened token : (N,)
        positions = torch.arange(time, device=x.device).repeat(batch)
        state = None
        if router_state is not None and self.router.recurrent:
            if router_state.dim() != 3 or router_state.shape[:2] != (batch, time):
                raise ValueError(f"router_state must have shape (batch, time, d_state) with batch, time = "
                                 f"{(batch, time)}, got {tuple(router_state.shape)}")
            state = router_state.reshape(num_tokens, router_state.shape[-1])
        bias = self.expert_bias.bias if self.expert_bias is not None else None

        route = self.router(x_flat, selection_bias=bias, token_ids=ids, positions=positions, state=state)
        num_experts = self.num_routed_experts
        # slots holding an assignment before capacity : (N, k) bool
        valid = route.mask if route.mask is not None else torch.ones_like(route.indices, dtype=torch.bool)
        with torch.no_grad():
            routed_per_expert = torch.bincount(route.indices[valid], minlength=num_experts)

        capacity = route.capacity
        kept = valid
        drops_tokens = not self.expert_choice and self.capacity_factor is not None
        if drops_tokens:
            capacity = token_choice_capacity(num_tokens, num_experts=num_experts, top_k=route.slots,
                                             capacity_factor=self.capacity_factor)
            kept = valid & capacity_mask(route.indices, num_experts=num_experts, capacity=capacity)
        with torch.no_grad():
            tokens_per_expert = torch.bincount(route.indices[kept], minlength=num_experts)
            dropped = int(valid.sum() - kept.sum())

        # y_t = Σ_{kept slots s} w_{t,s} F_{e_{t,s}}(x_t) : (N, d_model)
        use_mask = route.mask is not None or drops_tokens
        y = self.experts(x_flat, route.indices, route.weights, mask=kept if use_mask else None)
        if self.shared_experts is not None:
            # + Σ_i S_i(x_t), every token : (N, d_model)
            y = y + self.shared_experts.expert_forward(0, x_flat)
        y = self.dropout(y)

        balance = load_balancing_loss(route.probs, route.indices, mask=route.mask)
        z_loss = router_z_loss(route.logits)
        aux_loss = balance.new_zeros(())
        if self.router_aux_loss_coef > 0 and self.router.uses_load_balance_loss:
            aux_loss = aux_loss + self.router_aux_loss_coef * balance
        if self.z_loss_coef > 0 and self.router.uses_z_loss:
            aux_loss = aux_loss + self.z_loss_coef * z_loss
        for term in route.extra_losses.values():
            aux_loss = aux_loss + term
        aux_loss = aux_loss.to(x.dtype)

        return MoEOutput(
            y=y.reshape(batch, time, d_model),
            aux_loss=aux_loss,
            load_balance_loss=balance,
            z_loss=z_loss,
            tokens_per_expert=tokens_per_expert,
            routed_per_expert=routed_per_expert,
            dropped=dropped,
            capacity=capacity,
            router_entropy=router_entropy(route.probs.detach()),
            weights=route.weights.detach().reshape(batch, time, route.slots),
            indices=route.indices.detach().reshape(batch, time, route.slots),
            kept=kept.detach().reshape(batch, time, route.slots),
            probs=route.probs.detach().reshape(batch, time, num_experts),
            router_state=None if route.state is None else route.state.reshape(batch, time, route.state.shape[-1]),
            router_losses=dict(route.extra_losses),
        )

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}", f"d_hidden={self.d_hidden}", f"num_experts={self.num_experts}",
                 f"top_k={self.top_k}", f"capacity_factor={self.capacity_factor}"]
        if self.expert_granularity > 1:
            parts.append(f"expert_granularity={self.expert_granularity}")
        if self.n_shared_experts:
            parts.append(f"n_shared_experts={self.n_shared_experts}")
        parts += [f"router_aux_loss_coef={self.router_aux_loss_coef}", f"z_loss_coef={self.z_loss_coef}"]
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Plugging into TinyTransformer
# ----------------------------------------------------------------------------------------------------------------


def moe_ffn_factory(
    *,
    num_experts: int = 8,
    top_k: int = 2,
    router: str = "top_k",
    router_kwargs: Mapping[str, Any] | None = None,
    d_hidden: int | None = None,
    moe_layers: Sequence[int] | None = None,
    seed: int = 0,
    share_recurrent_cell: bool = True,
    **layer_kwargs: Any,
) -> ModuleFactory:
    """A `ffn_factory(layer_idx, config)` for `TinyTransformer` / `MoETransformer` building `MoELayer`s.

    * `d_hidden`: width of one expert (default `config.ffn_hidden`, so each expert is as wide as the dense FFN).
    * `moe_layers`: layer indices that get an MoE (default all); the others get the dense `models.MLP`.
    * `seed`: the random-fixed router's and the hash table's seed is `seed + layer_idx` (a different table per layer).
    * Hash routing: `num_keys` defaults to `config.vocab_size` (`hash_on="token"`) or `config.seq_len` (`"position"`).
    * Recurrent routing: with `share_recurrent_cell` (RMoE) the first MoE layer built owns a new GRU cell and the
      later layers of the same model borrow it (see `RecurrentRouter`).
    * `dropout` defaults to `config.dropout`, `out_init_std` to 0.02 / sqrt(2 n_layers) (nanoGPT's residual init).
    * Everything else (`capacity_factor`, `n_shared_experts`, `router_aux_loss_coef`, ...) goes to `MoELayer`.
    """
    if not isinstance(router, str):
        raise ValueError(f"moe_ffn_factory needs a router name (each layer builds its own router), got "
                         f"{type(router).__name__}; choose one of {sorted(ROUTERS)}")
    router_options(router)  # unknown names fail here, not when the model is built
    chosen = None if moe_layers is None else sorted(set(moe_layers))
    if chosen is not None and (not chosen or not all(_is_int(i) and i >= 0 for i in chosen)):
        raise ValueError(f"moe_layers must be a non-empty list of layer indices >= 0, got {moe_layers!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    shared: dict[str, nn.GRUCell] = {}

    def factory(layer_idx: int, config: TransformerConfig) -> nn.Module:
        if chosen is not None and max(chosen) >= config.n_layers:
            raise ValueError(f"moe_layers {chosen} has indices >= n_layers ({config.n_layers})")
        if chosen is not None and layer_idx not in chosen:
            return MLP(config)
        options = dict(router_kwargs or {})
        if "seed" in router_options(router):
            options.setdefault("seed", seed + layer_idx)
        if router == "hash":
            hash_on = options.get("hash_on", "token")
            options.setdefault("num_keys", config.vocab_size if hash_on == "token" else config.seq_len)
        first = chosen[0] if chosen is not None else 0
        if router == "recurrent" and share_recurrent_cell:
            if layer_idx == first:
                shared.pop("cell", None)  # a new model: a new owner
            if "cell" in shared:
                options.setdefault("cell", shared["cell"])
        kwargs = {"dropout": config.dropout, "out_init_std": INIT_STD / math.sqrt(2 * config.n_layers),
                  **layer_kwargs}
        layer = MoELayer(d_model=config.d_model, d_hidden=config.ffn_hidden if d_hidden is None else d_hidden,
                         num_experts=num_experts, top_k=top_k, router=router, router_kwargs=options, **kwargs)
        if router == "recurrent" and share_recurrent_cell and layer.router.owns_cell:
            shared["cell"] = layer.router.cell
        return layer

    return factory


class MoETransformer(TinyTransformer):
    """`TinyTransformer` that hands its MoE layers the routing context: the input token ids (hash routing) and the
    recurrent router state of the previous MoE layer (RMoE).

    The state travels with the blocks, like a second residual stream: `_run_blocks` starts with none, gives each
    MoE layer the latest state and keeps the state it returns (dense layers and non-recurrent routers leave it
    unchanged). Nothing is stored on the model between calls. Build it exactly like `TinyTransformer`:
    `MoETransformer(config, ffn_factory=moe_ffn_factory(router="recurrent"))`.
    """

    def _block_context(self, idx: torch.Tensor) -> dict[str, Any]:
        return {"token_ids": idx}

    def _run_blocks(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None) -> BlocksOutput:
        aux_loss = x.new_zeros(())
        layer_outputs: list[Any] = []
        state = None
        for block in self.blocks:
            if getattr(block.ffn, "takes_routing_context", False):
                out = block(x, token_ids=token_ids, router_state=state)
                new_state = getattr(out.ffn_output, "router_state", None)
                if new_state is not None:
                    state = new_state
            else:
                out = block(x)
            x, aux_loss = out.x, aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)


def update_expert_biases(model: nn.Module, output: Any) -> list[torch.Tensor]:
    """Auxiliary-loss-free balancing step for every MoE layer of `model` that has a selection bias.

    `output` is the model's `LMOutput` (or its `layer_outputs` list) from a training forward; block i's MoE layer is
    updated from `output.layer_outputs[i].routed_per_expert`. Returns the bias changes, one per updated layer.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"update_expert_biases needs a model with `.blocks` (a TinyTransformer), got "
                         f"{type(model).__name__}")
    layer_outputs = getattr(output, "layer_outputs", output)
    if not isinstance(layer_outputs, (list, tuple)) or len(layer_outputs) != len(blocks):
        raise ValueError(f"need one layer output per block ({len(blocks)}); pass the model's LMOutput")
    steps = []
    for i, (block, out) in enumerate(zip(blocks, layer_outputs)):
        ffn = getattr(block, "ffn", None)
        if isinstance(ffn, MoELayer) and ffn.expert_bias is not None:
            if not isinstance(out, MoEOutput):
                raise ValueError(f"block {i} has an MoE layer but its output is {type(out).__name__}, not MoEOutput")
            steps.append(ffn.update_bias(out.routed_per_expert))
    return steps


def lm_loss_with_bias_update(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`lablib.train.lm_loss` plus the auxiliary-loss-free bias update: a `loss_fn` for `lablib.train.train`.

    Returns `loss + aux_loss` of `model(x, y)`; in training mode with gradients on it first calls
    `update_expert_biases(model, output)`. Updating right after the forward is equivalent to updating after the
    optimizer step: the bias is not trained, and this step's routing has already been decided.
    """
    x, y = batch
    device = next(model.parameters()).device
    output = model(x.to(device), y.to(device))
    if output.loss is None:
        raise ValueError("lm_loss_with_bias_update needs model(x, targets) to return a loss")
    if model.training and torch.is_grad_enabled():
        update_expert_biases(model, output)
    return output.loss + output.aux_loss
