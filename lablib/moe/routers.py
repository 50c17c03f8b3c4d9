"""Routers: which experts see which token, and with what weight.

Every router is a small `nn.Module` with one interface, so the MoE layer (`lablib.moe.layer`) can swap them freely:

    router(x_flat (N, d_model), *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput

`RouterOutput` holds the combine `weights` (N, k), the expert `indices` (N, k), the raw `logits` (N, E) and the
probabilities `probs` (N, E) the balance losses use, in the (weights, indices, logits) order of Hugging Face's and
ScatterMoE's MoE blocks. Router arithmetic runs in at least float32 ("selective precision": a bf16 router can pick
other experts than the fp32 one). Keywords a router does not use are ignored; one it needs and lacks raises.

* `"top_k"`, `TopKRouter`: softmax over experts, keep the k largest, optionally noisy. Shazeer et al. 2017,
  *Outrageously Large Neural Networks* ([arXiv:1701.06538](https://arxiv.org/abs/1701.06538)); Mixtral
  ([arXiv:2401.04088](https://arxiv.org/abs/2401.04088)). Weights renormalised over the k when k > 1.
* `"switch"`, `SwitchRouter`: top-1 with optional input jitter. Fedus et al., *Switch Transformers*
  ([arXiv:2101.03961](https://arxiv.org/abs/2101.03961)). Weight = the raw top probability.
* `"expert_choice"`, `ExpertChoiceRouter`: every expert takes its C highest-scoring tokens. Zhou et al.,
  *Mixture-of-Experts with Expert Choice Routing* ([arXiv:2202.09368](https://arxiv.org/abs/2202.09368)).
  Weight = the token's softmax probability for that expert.
* `"cosine"`, `CosineRouter`: cosine similarity to learned centroids in a small projected space, times a
  temperature. Ternovtsii & Bilak, *Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language
  Modeling Quality*; X-MoE, Chi et al. ([arXiv:2204.09179](https://arxiv.org/abs/2204.09179)). Weights as top_k.
* `"hash"`, `HashRouter`: a fixed random table from token id (or position) to one expert, weight 1. Roller et al.,
  *Hash Layers For Large Sparse Models* ([arXiv:2106.04426](https://arxiv.org/abs/2106.04426)).
* `"random_fixed"`, `RandomFixedRouter`: a frozen random linear router, the Equifinality paper's "random-fixed"
  baseline. Weights as top_k.
* `"recurrent"`, `RecurrentRouter`: a GRU state carried from each layer's router to the next. Qiu et al.,
  *Layerwise Recurrent Router for Mixture-of-Experts* (RMoE, [arXiv:2408.06793](https://arxiv.org/abs/2408.06793)).
  Weights as top_k.

**Top-k renormalisation differs between libraries**, so it is an explicit option, `normalize_top_k`:

* `None` (the default) means *renormalise when k > 1, not when k = 1*. For k > 1 this is Mixtral / Hugging Face
  `MixtralSparseMoeBlock` (softmax, top-k, divide by the kept sum, which equals a softmax over the k kept logits). For
  k = 1 it is Switch: renormalising a single weight gives w = 1 and the router would get no gradient from the task.
* `False` is DeepSeekMoE-16B / Qwen-MoE (`norm_topk_prob=False`): the weights are the raw probabilities.
* `True` always renormalises (with k = 1 the router then learns only from the auxiliary losses).

**Selection-only bias** (auxiliary-loss-free balancing, `lablib.moe.balance.ExpertBias`): token-choice routers take
`selection_bias` (E,), add it to the probabilities to *choose* the top-k, and read the combine weights from the
unbiased probabilities, as DeepSeek-V3's gate does. Mixing with the biased scores is a known bug (vLLM PR #12002).

Token-choice routers return k slots per token, all valid (`mask=None`). Expert choice cannot: a token may be picked by
0..E experts, so it returns one slot per expert (k = E, `indices[t, e] = e`) and a boolean `mask` (N, E) of the
slots that were picked, with weight 0 elsewhere; the layer dispatches only the masked slots.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TOKEN_CHOICE",
    "EXPERT_CHOICE",
    "RouterOutput",
    "Router",
    "TopKRouter",
    "SwitchRouter",
    "ExpertChoiceRouter",
    "CosineRouter",
    "HashRouter",
    "RandomFixedRouter",
    "RecurrentRouter",
    "ROUTERS",
    "build_router",
    "router_options",
    "top_k_gating",
    "expert_choice_capacity",
]

TOKEN_CHOICE = "token_choice"
EXPERT_CHOICE = "expert_choice"
INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------------------------
# Output and helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RouterOutput:
    """What a router returns for N flattened tokens and E experts.

    * `weights`: (N, k) combine weights, differentiable (gradients reach the router through them).
    * `indices`: (N, k) int64 expert ids; a token's k ids are distinct.
    * `logits`: (N, E) raw router scores (input to the z-loss), at least float32.
    * `probs`: (N, E) routing probabilities (input to the load-balancing loss and the entropy diagnostic).
    * `mask`: (N, k) bool, which slots carry an assignment; None means all of them (token choice).
    * `state`: (N, d_state) the recurrent router's new hidden state, else None.
    * `capacity`: tokens per expert when the router fixes it (expert choice), else None.
    * `extra_losses`: router-specific loss terms, already weighted; the layer adds them to its aux_loss.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor | None = None
    state: torch.Tensor | None = None
    capacity: int | None = None
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """k, the number of (token, expert) slots per token (E for expert choice)."""
        return self.indices.shape[1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _resolve_normalize(normalize_top_k: bool | None, top_k: int) -> bool:
    if normalize_top_k is None:
        # Mixtral renormalises its top-k; Switch (k = 1) keeps the raw probability so the router still learns
        return top_k > 1
    if not isinstance(normalize_top_k, bool):
        raise ValueError(f"normalize_top_k must be True, False or None (renormalise when top_k > 1), got "
                         f"{normalize_top_k!r}")
    return normalize_top_k


def top_k_gating(
    probs: torch.Tensor, top_k: int, *, normalize: bool, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice: (weights (N, k), indices (N, k)) from probabilities (N, E).

    The experts are the k largest of `probs + selection_bias` (the bias, if any, only *selects*); the weights are read
    from the unbiased `probs` and, when `normalize`, divided by their sum.
    """
    scores = probs if selection_bias is None else probs + selection_bias.to(probs.dtype)
    # S_t = top-k experts of (p_t + b) : (N, k)
    indices = scores.topk(top_k, dim=-1).indices
    # w_{t,s} = p_{t, S_t[s]}, never the biased score : (N, k)
    weights = probs.gather(-1, indices)
    if normalize:
        # w_{t,s} <- w_{t,s} / Σ_s' w_{t,s'}   (= softmax over the k kept logits)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def expert_choice_capacity(num_tokens: int, *, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: C = min(N, ceil(capacity_factor * top_k * N / E)).

    With capacity_factor 1 the experts make top_k * N assignments in all, the compute of token-choice top-k.
    """
    # C = ⌈cf · k · N / E⌉, at most N
    return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


# ----------------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Base class: stores `d_model`, `num_experts`, `top_k` and says how the layer should treat the router.

    Class attributes (override in a subclass):
    * `kind`: `TOKEN_CHOICE` (each token picks k experts) or `EXPERT_CHOICE` (each expert picks tokens).
    * `supports_selection_bias`: accepts a selection-only bias (auxiliary-loss-free balancing).
    * `uses_load_balance_loss`, `uses_z_loss`: whether the layer adds those terms to its aux_loss for this router
      (they are always reported as diagnostics). Off where there is nothing for them to train.
    * `needs_token_ids`: the router reads `token_ids` (hash routing on ids).
    * `recurrent`: the router reads `state` and returns a new one (RMoE); it then has a `d_state`.
    """

    kind: str = TOKEN_CHOICE
    supports_selection_bias: bool = True
    uses_load_balance_loss: bool = True
    uses_z_loss: bool = True
    needs_token_ids: bool = False
    recurrent: bool = False

    def __init__(self, *, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.top_k = _check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts}): a token cannot pick more "
                             "experts than exist")

    def forward(
        self,
        x: torch.Tensor,
        *,
        selection_bias: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> RouterOutput:
        raise NotImplementedError

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of the routing computation (2 per multiply-add, matmuls only)."""
        return 0

    # -- helpers for subclasses --

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check x is (N, d_model) and return it in the router's compute dtype (at least float32)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects x of shape (num_tokens, d_model={self.d_model}), got {got}"
            )
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def _check_bias(self, selection_bias: torch.Tensor | None) -> None:
        if selection_bias is None:
            return
        if not self.supports_selection_bias:
            raise ValueError(f"{type(self).__name__} does not support a selection bias (auxiliary-loss-free "
                             "balancing needs a token-choice router with scores)")
        if selection_bias.shape != (self.num_experts,):
            raise ValueError(f"selection_bias must have shape ({self.num_experts},), got {tuple(selection_bias.shape)}")

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


class _ScoredTokenChoice(Router):
    """Shared tail of the token-choice routers: logits -> softmax -> top-k with an optional selection bias."""

    def __init__(self, *, d_model: int, num_experts: int, top_k: int, normalize_top_k: bool | None) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.normalize_top_k = _resolve_normalize(normalize_top_k, top_k)

    def _route(
        self,
        logits: torch.Tensor,
        selection_bias: torch.Tensor | None,
        *,
        scores: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> RouterOutput:
        # P = softmax(scores) over the E experts : (N, E); scores are the logits unless noise was added
        probs = (logits if scores is None else scores).softmax(dim=-1)
        weights, indices = top_k_gating(probs, self.top_k, normalize=self.normalize_top_k,
                                        selection_bias=selection_bias)
        return RouterOutput(weights=weights, indices=indices, logits=logits, probs=probs, state=state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize_top_k={self.normalize_top_k}"


# ----------------------------------------------------------------------------------------------------------------
# Linear softmax routers
# ----------------------------------------------------------------------------------------------------------------


class TopKRouter(_ScoredTokenChoice):
    """Softmax top-k over a linear router `Z = X W_gᵀ` (W_g: (E, d_model), no bias).

    * `normalize_top_k`: see the module docstring (default: renormalise when top_k > 1, as Mixtral).
    * `noisy`: Shazeer et al.'s noisy top-k. In training the selection uses `H = Z + ξ ⊙ (softplus(X W_noiseᵀ) + ε)`,
      ξ ~ N(0, 1) from torch's global RNG, W_noise zero-initialised, ε = `noise_eps`; probs and weights come from
      softmax(H). In eval mode there is no noise. `logits` stay the clean Z (the z-loss's input).
    * `jitter_eps`: Switch's multiplicative jitter of the router's copy of x by U(1 - ε, 1 + ε) in training (the
      experts see the clean x; Hugging Face Mixtral jitters the shared input in place, which we do not copy).
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        normalize_top_k: bool | None = None,
        noisy: bool = False,
        noise_eps: float = 1e-2,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize_top_k)
        if not isinstance(noisy, bool):
            raise ValueError(f"noisy must be a bool, got {noisy!r}")
        if isinstance(noise_eps, bool) or not isinstance(noise_eps, (int, float)) or noise_eps < 0:
            raise ValueError(f"noise_eps must be a number >= 0, got {noise_eps!r}")
        if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, (int, float)) or not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be a number in [0, 1), got {jitter_eps!r}")
        self.noisy, self.noise_eps, self.jitter_eps = noisy, float(noise_eps), float(jitter_eps)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=INIT_STD)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        # (N, d_model), float32 or wider
        x = self._prepare(x)
        if self.training and self.jitter_eps > 0:
            # x_router = x ⊙ U(1 - ε, 1 + ε), the router's copy only
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        # Z = X W_gᵀ : (N, E)
        logits = F.linear(x, self.gate.weight.to(x.dtype))
        scores = None
        if self.noise is not None and self.training:
            # σ = softplus(X W_noiseᵀ) + ε : (N, E)
            sigma = F.softplus(F.linear(x, self.noise.weight.to(x.dtype))) + self.noise_eps
            # H = Z + ξ ⊙ σ,  ξ ~ N(0, 1)
            scores = logits + torch.randn_like(logits) * sigma
        return self._route(logits, selection_bias, scores=scores)

    def flops_per_token(self) -> int:
        return 2 * self.num_experts * self.d_model

    def extra_repr(self) -> str:
        extra = f", noisy=True, noise_eps={self.noise_eps}" if self.noisy else ""
        jitter = f", jitter_eps={self.jitter_eps}" if self.jitter_eps else ""
        return super().extra_repr() + extra + jitter


class SwitchRouter(TopKRouter):
    """Switch Transformer routing: top-1 of softmax(X W_gᵀ), combine weight = the raw probability p (never 1).

    `top_k` must be 1 (use `TopKRouter` for more); `jitter_eps` as in `TopKRouter` (the paper's ε = 0.01; default
    off). Capacity and token dropping live in the layer (`capacity_factor`).
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 1, jitter_eps: float = 0.0) -> None:
        if top_k != 1:
            raise ValueError(f"switch routing is top-1, got top_k={top_k!r} (use router='top_k' for top_k > 1)")
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=1, normalize_top_k=False,
                         jitter_eps=jitter_eps)


class RandomFixedRouter(_ScoredTokenChoice):
    """A frozen random linear router: `Z = X Rᵀ`, R ~ N(0, 1/d_model) drawn once from a generator seeded `seed`.

    R is a persistent buffer (checkpoints carry it; it gets no gradient and is never re-initialised), so routing
    depends on x but is never learned. The layer does not add the balance losses for it (nothing of the router to
    train). The Equifinality paper lists "random-fixed" routing without a definition; this is our reading.
    """

    uses_load_balance_loss = False
    uses_z_loss = False

    def __init__(
        self, *, d_model: int, num_experts: int, top_k: int = 2, seed: int = 0, normalize_top_k: bool | None = None
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize_top_k)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        # R ~ N(0, 1/d): (E, d_model)
        self.register_buffer("weight", torch.randn(num_experts, d_model, generator=generator) / math.sqrt(d_model))

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        # Z = X Rᵀ : (N, E)
        logits = F.linear(x, self.weight.to(x.dtype))
        return self._route(logits, selection_bias)

    def flops_per_token(self) -> int:
        return 2 * self.num_experts * self.d_model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


# ----------------------------------------------------------------------------------------------------------------
# Expert choice
# ----------------------------------------------------------------------------------------------------------------


class ExpertChoiceRouter(Router):
    """Expert choice: S = softmax(X W_gᵀ) over experts; every expert takes the C tokens with the highest S[:, e].

    C = `expert_choice_capacity(N, ...)` = min(N, ceil(capacity_factor * top_k * N / E)), over the N tokens of one
    call (the whole flattened batch is one group). Output: k = E slots per token, `indices[t, e] = e`, `mask[t, e]`
    true when expert e picked token t, `weights[t, e] = S[t, e]` there and 0 elsewhere. Every expert gets exactly C
    tokens; a token gets 0..E experts. No load-balancing loss (balanced by construction); the z-loss applies.

    Caveat for language models: a token's experts depend on the other tokens in the batch, later ones included, so
    this leaks information across positions (fine for the lab's comparisons, not for generation).
    """

    kind = EXPERT_CHOICE
    supports_selection_bias = False
    uses_load_balance_loss = False

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 1, capacity_factor: float = 1.0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.capacity_factor = _check_positive_float("capacity_factor", capacity_factor)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=INIT_STD)

    def capacity(self, num_tokens: int) -> int:
        return expert_choice_capacity(num_tokens, num_experts=self.num_experts, top_k=self.top_k,
                                      capacity_factor=self.capacity_factor)

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        num_tokens = x.shape[0]
        # Z = X W_gᵀ, S = softmax(Z) over experts : (N, E)
        logits = F.linear(x, self.gate.weight.to(x.dtype))
        probs = logits.softmax(dim=-1)
        capacity = self.capacity(num_tokens)
        # I_e = the C tokens with the largest S[:, e] : (E, C)
        chosen = probs.t().topk(capacity, dim=1).indices
        mask = torch.zeros_like(probs, dtype=torch.bool)
        # mask[t, e] = t ∈ I_e : (N, E)
        mask[chosen, torch.arange(self.num_experts, device=x.device).unsqueeze(1)] = True
        weights = probs * mask
        indices = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        return RouterOutput(weights=weights, indices=indices, logits=logits, probs=probs, mask=mask,
                            capacity=capacity)

    def flops_per_token(self) -> int:
        return 2 * self.num_experts * self.d_model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"


# ----------------------------------------------------------------------------------------------------------------
# Cosine routing
# ----------------------------------------------------------------------------------------------------------------


class CosineRouter(_ScoredTokenChoice):
    """Cosine routing against learned centroids in a `d_space`-dimensional projection.

        u_t = W_p x_t                              (W_p: (d_space, d_model), no bias)
        z_{t,e} = τ · ⟨u_t / ‖u_t‖, c_e / ‖c_e‖⟩    (centroids C: (E, d_space), orthogonal init)

    then softmax over all E experts (before the top-k, so k = 1 still trains the router) and top-k as `TopKRouter`.
    τ = |θ| with θ a learnable scalar initialised to `temperature` (`learn_temperature=False` freezes it), so
    |z| ≤ τ and routing ignores the scale of x. The Equifinality paper gives d_space = 64 and no code; the
    temperature's initial value 10 follows the same authors' earlier router. X-MoE (Chi et al.) is the ancestor.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        d_space: int = 16,
        temperature: float = 10.0,
        learn_temperature: bool = True,
        normalize_top_k: bool | None = None,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize_top_k)
        self.d_space = _check_positive_int("d_space", d_space)
        self.initial_temperature = _check_positive_float("temperature", temperature)
        if not isinstance(learn_temperature, bool):
            raise ValueError(f"learn_temperature must be a bool, got {learn_temperature!r}")
        self.learn_temperature = learn_temperature
        self.proj_in = nn.Linear(d_model, d_space, bias=False)
        self.centroids = nn.Parameter(torch.empty(num_experts, d_space))
        theta = torch.tensor(self.initial_temperature)
        if learn_temperature:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.proj_in.weight, mean=0.0, std=INIT_STD)
        # pairwise orthogonal centroids when E <= d_space
        nn.init.orthogonal_(self.centroids)
        with torch.no_grad():
            self.theta.fill_(self.initial_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """τ = |θ|, the scale of the cosine logits."""
        return self.theta.abs()

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        # u = X W_pᵀ : (N, d_space)
        u = F.linear(x, self.proj_in.weight.to(x.dtype))
        # z = τ · (u / ‖u‖)(C / ‖C‖)ᵀ : (N, E)
        cosine = F.normalize(u, dim=-1, eps=1e-6) @ F.normalize(self.centroids.to(x.dtype), dim=-1).t()
        logits = self.temperature.to(x.dtype) * cosine
        return self._route(logits, selection_bias)

    def flops_per_token(self) -> int:
        return 2 * (self.d_space * self.d_model + self.num_experts * self.d_space)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_space={self.d_space}, temperature={self.initial_temperature}, "
                f"learn_temperature={self.learn_temperature}")


# ----------------------------------------------------------------------------------------------------------------
# Hash routing
# ----------------------------------------------------------------------------------------------------------------


class HashRouter(Router):
    """Hash routing: a fixed table maps each key (a token id, or a position) to one expert, combine weight 1.

    * `hash_on="token"` keys on the *input* token ids (the same ids at every layer). The layer receives them as
      `token_ids` (B, T): `lablib.moe.MoETransformer` passes its input ids to every MoE layer; a plain
      `TinyTransformer` cannot, and the layer raises a ValueError saying so. `num_keys` = vocab_size.
    * `hash_on="position"` keys on the position t in the sequence (`num_keys` = seq_len); it works anywhere.

    The table is `randperm(num_keys) mod E` from a generator seeded `seed`: every expert owns ⌊num_keys / E⌋ or
    ⌈num_keys / E⌉ keys. It is a persistent buffer, so checkpoints carry it. Equal shares of *ids* are not equal
    token loads: text is Zipfian, so some experts see far more tokens (Roller et al. also build frequency-balanced
    tables; ours is the plain random one). No router parameters, no balance losses.
    """

    supports_selection_bias = False
    uses_load_balance_loss = False
    uses_z_loss = False

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        num_keys: int | None = None,
        hash_on: str = "token",
        seed: int = 0,
    ) -> None:
        if top_k != 1:
            raise ValueError(f"hash routing sends each token to exactly one expert, got top_k={top_k!r}")
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=1)
        if hash_on not in ("token", "position"):
            raise ValueError(f"hash_on must be 'token' or 'position', got {hash_on!r}")
        if num_keys is None:
            raise ValueError("hash routing needs num_keys: vocab_size for hash_on='token', seq_len for "
                             "hash_on='position' (moe_ffn_factory fills it in from the model config)")
        self.num_keys = _check_positive_int("num_keys", num_keys)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.hash_on, self.seed = hash_on, seed
        self.needs_token_ids = hash_on == "token"
        generator = torch.Generator().manual_seed(seed)
        # table[key] = perm[key] mod E : (num_keys,)
        self.register_buffer("table", torch.randperm(num_keys, generator=generator) % num_experts)

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        num_tokens = x.shape[0]
        keys = token_ids if self.hash_on == "token" else positions
        if keys is None:
            what = "token_ids" if self.hash_on == "token" else "positions"
            hint = (" (build the model with lablib.moe.MoETransformer, which passes its input ids to every MoE "
                    "layer, or call the layer with token_ids=)") if self.hash_on == "token" else ""
            raise ValueError(f"hash routing on {self.hash_on}s needs {what}{hint}")
        if keys.shape != (num_tokens,) or keys.dtype != torch.long:
            raise ValueError(f"hash keys must be int64 of shape ({num_tokens},), got {keys.dtype} "
                             f"{tuple(keys.shape)}")
        if num_tokens and (int(keys.min()) < 0 or int(keys.max()) >= self.num_keys):
            raise ValueError(f"hash keys must lie in [0, num_keys={self.num_keys}), got min {int(keys.min())}, "
                             f"max {int(keys.max())}")
        # e_t = table[key_t] : (N, 1)
        indices = self.table[keys].unsqueeze(1)
        weights = torch.ones(num_tokens, 1, dtype=x.dtype, device=x.device)
        # no scores: zero logits, and probs = the one-hot choice (so the diagnostics still describe the routing)
        logits = x.new_zeros(num_tokens, self.num_experts)
        probs = F.one_hot(indices.squeeze(1), self.num_experts).to(x.dtype)
        return RouterOutput(weights=weights, indices=indices, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hash_on={self.hash_on!r}, num_keys={self.num_keys}, seed={self.seed}"


# ----------------------------------------------------------------------------------------------------------------
# Layerwise recurrent router (RMoE)
# ----------------------------------------------------------------------------------------------------------------


class RecurrentRouter(_ScoredTokenChoice):
    """RMoE's layerwise recurrent router: a GRU state that travels *up the layers* with each token.

    At MoE layer ℓ, for the FFN input u_t of token t (per token, no mixing across tokens or time):

        a_t     = W1_ℓ u_t                        (W1_ℓ: (d_state, d_model), this layer's `input_proj`)
        h_t^ℓ   = GRU(a_t, h_t^{ℓ-1})             (h^{before first layer} = 0; one GRU cell shared by all layers)
        z_t     = W2_ℓ h_t^ℓ                      (W2_ℓ: (E, d_state), this layer's `output_proj`)

    then softmax top-k as `TopKRouter`. The new state h^ℓ is returned in `RouterOutput.state`; the caller passes it
    to the next layer's router as `state` (`lablib.moe.MoETransformer` does this, gradients not detached). Without
    a state (a plain `TinyTransformer`, or the first layer) the GRU starts from zeros.

    **Sharing the GRU cell.** `cell=None` creates and registers a new `nn.GRUCell(d_state, d_state)` (this router
    *owns* it). Passing another router's cell makes this router *borrow* it: the cell is kept in a tuple so that
    `nn.Module` does not register it a second time, hence `parameters()`, `state_dict()`, the optimizer and the
    parameter ledger see it once, in its owner. `moe_ffn_factory(router="recurrent")` builds one owner per model
    and lets the other layers borrow. A borrowing router used without its owner's model leaves the cell untrained.
    RMoE's code uses d_state = 256; 32 suits the toy models.
    """

    recurrent = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        d_state: int = 32,
        cell: nn.GRUCell | None = None,
        normalize_top_k: bool | None = None,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, normalize_top_k=normalize_top_k)
        self.d_state = _check_positive_int("d_state", d_state)
        self.input_proj = nn.Linear(d_model, d_state, bias=False)
        self.output_proj = nn.Linear(d_state, num_experts, bias=False)
        if cell is None:
            self.cell = nn.GRUCell(d_state, d_state)
            self.owns_cell = True
        else:
            if not isinstance(cell, nn.GRUCell) or cell.input_size != d_state or cell.hidden_size != d_state:
                raise ValueError(f"cell must be an nn.GRUCell({d_state}, {d_state}) to share, got {cell!r}")
            # a tuple hides the module from nn.Module's registration: its owner registers (and counts) it
            self._borrowed_cell = (cell,)
            self.owns_cell = False
        self.init_weights()

    @property
    def gru(self) -> nn.GRUCell:
        """The GRU cell this router steps (its own, or the one it borrows)."""
        return self.cell if self.owns_cell else self._borrowed_cell[0]

    def init_weights(self) -> None:
        nn.init.normal_(self.input_proj.weight, mean=0.0, std=INIT_STD)
        nn.init.normal_(self.output_proj.weight, mean=0.0, std=INIT_STD)
        if self.owns_cell:
            self.cell.reset_parameters()

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        num_tokens = x.shape[0]
        gru = self.gru
        dtype = torch.promote_types(x.dtype, gru.weight_ih.dtype)
        # a = W1 u : (N, d_state)
        a = F.linear(x, self.input_proj.weight.to(dtype))
        if state is None:
            state = a.new_zeros(num_tokens, self.d_state)
        elif state.shape != (num_tokens, self.d_state):
            raise ValueError(f"recurrent router state must have shape ({num_tokens}, {self.d_state}), got "
                             f"{tuple(state.shape)}")
        # h = GRU(a, h_prev) : (N, d_state)
        b_ih = None if gru.bias_ih is None else gru.bias_ih.to(dtype)
        b_hh = None if gru.bias_hh is None else gru.bias_hh.to(dtype)
        h = torch.gru_cell(a, state.to(dtype), gru.weight_ih.to(dtype), gru.weight_hh.to(dtype), b_ih, b_hh)
        # z = W2 h : (N, E)
        logits = F.linear(h, self.output_proj.weight.to(dtype))
        return self._route(logits, selection_bias, state=h)

    def flops_per_token(self) -> int:
        # W1, the GRU's input and hidden matmuls (3 d_state rows each), W2
        return 2 * (self.d_state * self.d_model + 6 * self.d_state * self.d_state + self.num_experts * self.d_state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_state={self.d_state}, owns_cell={self.owns_cell}"


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

ROUTERS: dict[str, type[Router]] = {
    "top_k": TopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "cosine": CosineRouter,
    "hash": HashRouter,
    "random_fixed": RandomFixedRouter,
    "recurrent": RecurrentRouter,
}


def router_options(name: str) -> list[str]:
    """The keyword arguments router `name` accepts besides d_model, num_experts and top_k."""
    cls = _router_class(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "d_model", "num_experts", "top_k")]


def _router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name]


def build_router(name: str, *, d_model: int, num_experts: int, top_k: int, **options: Any) -> Router:
    """Build router `name` (a key of `ROUTERS`); `options` are that router's own keywords (see `router_options`)."""
    cls = _router_class(name)
    allowed = router_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"router {name!r} does not take {unknown}; it takes {allowed}")
    return cls(d_model=d_model, num_experts=num_experts, top_k=top_k, **options)
