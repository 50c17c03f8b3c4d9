"""`lablib.redundancy`: which parts of a trained transformer could go, measured on the model itself.

Four probes, each returning a diagnostics dataclass:

* **Layer similarity** (`hidden_states`, `io_cosine`, `linear_cka`, `layer_similarity`). A sublayer whose output
  residual stream points the same way as its input adds little. Following He et al., *What Matters in Transformers?
  Not All Attention is Needed* ([arXiv:2406.15786](https://arxiv.org/abs/2406.15786)), the score of a sublayer is the
  mean cosine similarity between its input X and its output Y = X + f(LN(X)) over calibration tokens:

      S = mean_t  <X_t, Y_t> / (‖X_t‖ ‖Y_t‖)          (1 = the sublayer changes nothing)

  Linear CKA (Kornblith et al., *Similarity of Neural Network Representations Revisited*,
  [arXiv:1905.00414](https://arxiv.org/abs/1905.00414)) compares whole representations across depth:

      CKA(X, Y) = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)      (Xᶜ, Yᶜ: columns centred over the n tokens)

  It is 1 for identical representations and invariant to rotations and isotropic scaling.
* **Layer dropping** (`drop_sublayers`, `drop_most_similar`). Dropping a sublayer replaces its branch by 0, so the
  residual passes X through unchanged; "What Matters" drops the sublayers with the highest S first.
* **Random-routing probe** (`UniformRandomRouter`, `with_random_router`). UniPool (Huang et al., *UniPool: A Globally
  Shared Expert Pool for Mixture-of-Experts*) motivates sharing experts across depth by replacing one layer's learned
  top-k router with uniform random routing and measuring the loss change. The random router sends each token to
  `top_k` distinct experts drawn uniformly, each with weight 1/top_k (our reading of "uniform random routing").
* **Expert similarity and merging** (`expert_outputs`, `expert_similarity`, `cluster_experts`, `merge_experts`).
  Sub-MoE (*Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging*) clusters experts by the
  cosine similarity of their outputs on calibration tokens and merges each cluster with a shared SVD basis:

      [W_1 | W_2 | … | W_g] = U Σ [V_1ᵀ | … | V_gᵀ]        (joint SVD of the group's weights, U shared)
      W_merged = U_r Σ_r (Σ_i f_i V_{i,r})ᵀ               (f_i: expert i's routing frequency in the group)

  We cluster agglomeratively (average linkage on the similarity matrix, deterministic) where the paper uses K-means.
  At full rank the subspace merge equals the frequency-weighted average Σ_i f_i W_i (the map V ↦ U Σ Vᵀ is linear),
  so it differs from plain averaging only when `rank` truncates the shared basis. Merged experts keep their router
  slots: every expert of a group points at the group's one merged FFN, so routing is untouched and the layer stores
  `num_groups` experts (`ExpertMergeResult.stored_expert_params`).

Nothing here modifies the model you pass: every function that changes a model works on a deep copy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lablib.models import TinyTransformer
from lablib.moe.layer import MoELayer
from lablib.moe.routers import Router, RouterOutput

__all__ = [
    "SUBLAYERS",
    "MERGE_METHODS",
    "HiddenStates",
    "LayerSimilarity",
    "DropResult",
    "ExpertMergeResult",
    "ZeroBranch",
    "UniformRandomRouter",
    "io_cosine",
    "linear_cka",
    "cka_matrix",
    "hidden_states",
    "layer_similarity",
    "drop_sublayers",
    "drop_most_similar",
    "moe_layer_indices",
    "with_random_router",
    "expert_outputs",
    "expert_similarity",
    "routing_frequency",
    "cluster_experts",
    "merge_experts",
    "replace_ffn",
]

SUBLAYERS = ("attention", "mlp", "block")
MERGE_METHODS = ("average", "subspace", "prune")


# ----------------------------------------------------------------------------------------------------------------
# Similarity measures
# ----------------------------------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor, *, what: str) -> torch.Tensor:
    """(..., d) -> (n, d) float64, checking it is a tensor with at least one row."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{what} must have shape (..., features) with at least 2 dims, got {tuple(x.shape)}")
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    if rows.shape[0] == 0:
        raise ValueError(f"{what} has no rows (shape {tuple(x.shape)})")
    return rows


def io_cosine(x_in: torch.Tensor, x_out: torch.Tensor, *, eps: float = 1e-12) -> float:
    """Mean over tokens of cos(x_in_t, x_out_t): the "What Matters" similarity of a sublayer (1 = no change).

    `x_in`, `x_out`: (..., d) of the same shape (e.g. (B, T, d_model) residual streams before and after).
    """
    a, b = _as_rows(x_in, what="x_in"), _as_rows(x_out, what="x_out")
    if a.shape != b.shape:
        raise ValueError(f"x_in and x_out must have the same shape, got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
    # S = mean_t <a_t, b_t> / (‖a_t‖ ‖b_t‖)
    return float(F.cosine_similarity(a, b, dim=-1, eps=eps).mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n tokens: x (n, d1), y (n, d2) (or (..., d), flattened).

    Computed in float64 in the feature-space form (cost O(n d²), never an n x n Gram matrix). Returns 0 when either
    representation is constant (no variance to compare).
    """
    a, b = _as_rows(x, what="x"), _as_rows(y, what="y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must describe the same tokens, got {a.shape[0]} and {b.shape[0]} rows")
    # centre every feature over the n tokens
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    # CKA = ‖bᵀ a‖²_F / (‖aᵀ a‖_F ‖bᵀ b‖_F)
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    norm = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if float(norm) == 0.0:
        return 0.0
    return float(cross / norm)


def cka_matrix(states: Sequence[torch.Tensor]) -> list[list[float]]:
    """Pairwise linear CKA between representations (all of the same tokens): an (L, L) symmetric list of lists."""
    states = list(states)
    if not states:
        raise ValueError("cka_matrix needs at least one representation")
    n = len(states)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            value = linear_cka(states[i], states[j])
            out[i][j] = out[j][i] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Hidden states of a TinyTransformer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HiddenStates:
    """The residual stream around every sublayer, one entry per block application (in order).

    * `block_in[l]`: x_l entering block l, (B, T, d_model).
    * `mid[l]`: x_{l+½} = x_l + Attn(LN(x_l)), the attention sublayer's output and the MLP's input.
    * `block_out[l]`: x_{l+1} = x_{l+½} + FFN(LN(x_{l+½})).
    """

    block_in: list[torch.Tensor]
    mid: list[torch.Tensor]
    block_out: list[torch.Tensor]

    @property
    def n_layers(self) -> int:
        return len(self.block_in)


def _check_transformer(model: Any, *, what: str = "model") -> None:
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"{what} must be a lablib.models.TinyTransformer (or subclass), got {type(model).__name__}")


@torch.no_grad()
def hidden_states(model: TinyTransformer, idx: torch.Tensor) -> HiddenStates:
    """Run `model(idx)` in eval mode and record the residual stream around each block's two sublayers.

    Uses forward hooks on each `Block` (input, output) and a pre-hook on its `ffn_norm` (the stream after
    attention), so the model's own forward runs unchanged. The model's train/eval mode is restored.
    """
    _check_transformer(model)
    block_in: list[torch.Tensor] = []
    mid: list[torch.Tensor] = []
    block_out: list[torch.Tensor] = []
    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(lambda mod, args: block_in.append(args[0].detach().clone())))
        handles.append(block.ffn_norm.register_forward_pre_hook(lambda mod, args: mid.append(args[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda mod, args, out: block_out.append(out.x.detach().clone())))
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return HiddenStates(block_in=block_in, mid=mid, block_out=block_out)


@dataclass
class LayerSimilarity:
    """Per-layer similarity scores of a model on calibration tokens (see the module docstring).

    * `attention[l]`, `mlp[l]`, `block[l]`: io_cosine of layer l's attention sublayer, MLP sublayer, whole block.
    * `cka[i][j]`: linear CKA between the residual streams after blocks i and j (the embeddings are not included).
    """

    attention: list[float]
    mlp: list[float]
    block: list[float]
    cka: list[list[float]]

    def scores(self, kind: str) -> list[float]:
        """The per-layer scores of `kind` ("attention", "mlp" or "block")."""
        if kind not in SUBLAYERS:
            raise ValueError(f"kind must be one of {SUBLAYERS}, got {kind!r}")
        return list(getattr(self, kind))

    def ranking(self, kind: str) -> list[int]:
        """Layer indices from most to least redundant (highest similarity first; ties by lower index)."""
        scores = self.scores(kind)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def layer_similarity(model: TinyTransformer, idx: torch.Tensor) -> LayerSimilarity:
    """Similarity scores of every sublayer of `model` on the token batch `idx` (B, T) (see `LayerSimilarity`)."""
    states = hidden_states(model, idx)
    attention = [io_cosine(a, b) for a, b in zip(states.block_in, states.mid)]
    mlp = [io_cosine(a, b) for a, b in zip(states.mid, states.block_out)]
    block = [io_cosine(a, b) for a, b in zip(states.block_in, states.block_out)]
    return LayerSimilarity(attention=attention, mlp=mlp, block=block, cka=cka_matrix(states.block_out))


# ----------------------------------------------------------------------------------------------------------------
# Dropping sublayers
# ----------------------------------------------------------------------------------------------------------------


class ZeroBranch(nn.Module):
    """A dropped sublayer: returns zeros of its input's shape, so the block's residual add leaves x unchanged.

    Accepts and ignores the keyword context an MoE FFN receives (`token_ids`, `router_state`); it has no parameters,
    so the ledger counts a dropped sublayer as gone (no parameters, no FLOPs).
    """

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        return torch.zeros_like(x)


def _check_layers(layers: Sequence[int], n_layers: int, *, what: str) -> list[int]:
    chosen = list(layers)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"{what} must hold layer indices in [0, {n_layers}), got {i!r}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{what} lists a layer twice: {chosen}")
    return sorted(chosen)


def drop_sublayers(
    model: TinyTransformer, *, attention: Sequence[int] = (), mlp: Sequence[int] = ()
) -> TinyTransformer:
    """A deep copy of `model` with the listed layers' attention and/or MLP sublayers replaced by `ZeroBranch`.

    Dropping both sublayers of a layer drops the whole block. `model` is not modified.
    """
    _check_transformer(model)
    n = len(model.blocks)
    attention = _check_layers(attention, n, what="attention")
    mlp = _check_layers(mlp, n, what="mlp")
    dropped = copy.deepcopy(model)
    for i in attention:
        dropped.blocks[i].attn = ZeroBranch()
    for i in mlp:
        dropped.blocks[i].ffn = ZeroBranch()
    return dropped


@dataclass
class DropResult:
    """`drop_most_similar`'s result: the pruned copy and which layers it lost (most similar first)."""

    model: TinyTransformer
    kind: str
    dropped: list[int]
    scores: list[float]


def drop_most_similar(model: TinyTransformer, similarity: LayerSimilarity, *, kind: str, k: int) -> DropResult:
    """Drop the `k` sublayers of `kind` ("attention", "mlp" or "block") with the highest similarity.

    `similarity` is `layer_similarity(model, calibration_idx)`. Returns a copy (see `drop_sublayers`).
    """
    ranking = similarity.ranking(kind)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(ranking):
        raise ValueError(f"k must be an int in [0, {len(ranking)}], got {k!r}")
    chosen = ranking[:k]
    attention = chosen if kind in ("attention", "block") else []
    mlp = chosen if kind in ("mlp", "block") else []
    return DropResult(model=drop_sublayers(model, attention=attention, mlp=mlp), kind=kind, dropped=chosen,
                      scores=[similarity.scores(kind)[i] for i in chosen])


# ----------------------------------------------------------------------------------------------------------------
# Random-routing probe
# ----------------------------------------------------------------------------------------------------------------


class UniformRandomRouter(Router):
    """Each token picks `top_k` distinct experts uniformly at random, each with combine weight 1/top_k.

    Draws come from a private generator seeded `seed` (the global RNG is untouched); `reset()` restarts the stream,
    so two evaluations after `reset()` route identically. No parameters, no balance losses. `probs` reports the
    uniform distribution 1/E (what the router samples from) for the layer's diagnostics.
    """

    supports_selection_bias = False
    uses_load_balance_loss = False
    uses_z_loss = False

    def __init__(self, *, d_model: int, num_experts: int, top_k: int, seed: int = 0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Restart the random stream from `seed`."""
        self.generator.manual_seed(self.seed)

    def __deepcopy__(self, memo: dict) -> "UniformRandomRouter":
        # torch.Generator cannot be deep-copied; a copy gets its own generator in the same state
        clone = UniformRandomRouter(d_model=self.d_model, num_experts=self.num_experts, top_k=self.top_k,
                                    seed=self.seed)
        clone.generator.set_state(self.generator.get_state())
        clone.train(self.training)
        return clone

    def forward(self, x, *, selection_bias=None, token_ids=None, positions=None, state=None) -> RouterOutput:
        self._check_bias(selection_bias)
        x = self._prepare(x)
        num_tokens = x.shape[0]
        # k distinct experts per token: the k smallest of E uniform draws is a uniform k-subset : (N, k)
        draws = torch.rand(num_tokens, self.num_experts, generator=self.generator).to(x.device)
        indices = draws.topk(self.top_k, dim=-1, largest=False).indices
        # w_{t,s} = 1 / k
        weights = torch.full((num_tokens, self.top_k), 1.0 / self.top_k, dtype=x.dtype, device=x.device)
        logits = x.new_zeros(num_tokens, self.num_experts)
        probs = x.new_full((num_tokens, self.num_experts), 1.0 / self.num_experts)
        return RouterOutput(weights=weights, indices=indices, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


def moe_layer_indices(model: TinyTransformer) -> list[int]:
    """Indices of the blocks whose FFN is a `lablib.moe.MoELayer`."""
    _check_transformer(model)
    return [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoELayer)]


def with_random_router(model: TinyTransformer, layer: int, *, seed: int = 0) -> TinyTransformer:
    """A deep copy of `model` whose block `layer` routes uniformly at random (UniPool's probe); experts unchanged.

    The layer must be a token-choice `MoELayer`; the random router picks as many experts per token as the learned
    one (`routed_top_k`, after fine-grained segmentation).
    """
    moe_layers = moe_layer_indices(model)
    if layer not in moe_layers:
        raise ValueError(f"layer {layer!r} has no MoELayer FFN; MoE layers are {moe_layers}")
    ffn = model.blocks[layer].ffn
    if ffn.expert_choice:
        raise ValueError(f"layer {layer} uses expert-choice routing; the random-routing probe replaces token-choice "
                         "routers only")
    probed = copy.deepcopy(model)
    target = probed.blocks[layer].ffn
    target.router = UniformRandomRouter(d_model=target.d_model, num_experts=target.num_routed_experts,
                                        top_k=target.routed_top_k, seed=seed)
    # a selection bias belongs to the learned router; random routing ignores it
    target.expert_bias = None
    return probed


# ----------------------------------------------------------------------------------------------------------------
# Expert similarity and merging
# ----------------------------------------------------------------------------------------------------------------


def _check_moe_layer(layer: Any) -> MoELayer:
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a lablib.moe.MoELayer, got {type(layer).__name__}")
    return layer


def _check_tokens(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != layer.d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (..., d_model={layer.d_model}), got {got}")
    return x.detach().reshape(-1, layer.d_model)


@torch.no_grad()
def expert_outputs(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert applied to every calibration token: (E, N, d_model) for x of shape (..., d_model)."""
    layer = _check_moe_layer(layer)
    rows = _check_tokens(layer, x)
    params = layer.experts.per_expert_params()
    return torch.stack([layer.experts.expert_forward(e, rows, params=params) for e in range(layer.num_routed_experts)])


def expert_similarity(layer: MoELayer, x: torch.Tensor) -> list[list[float]]:
    """(E, E) cosine similarity between experts' outputs on the same tokens, each output flattened to one vector."""
    outputs = expert_outputs(layer, x).double()
    flat = outputs.reshape(outputs.shape[0], -1)
    # cos(F_i(X), F_j(X)) over all tokens and features
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).tolist()


@torch.no_grad()
def routing_frequency(layer: MoELayer, x: torch.Tensor) -> list[int]:
    """Assignments the layer's router makes to each expert on tokens x (..., d_model), before capacity."""
    layer = _check_moe_layer(layer)
    rows = _check_tokens(layer, x)
    was_training = layer.training
    layer.eval()
    try:
        out = layer(rows.unsqueeze(0))
    finally:
        layer.train(was_training)
    return [int(c) for c in out.routed_per_expert]


def cluster_experts(similarity: Sequence[Sequence[float]], *, num_groups: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage: merge the two most similar groups until `num_groups` remain.

    Deterministic (ties go to the lowest indices). Returns the groups sorted by their smallest member, each sorted.
    """
    sim = [list(map(float, row)) for row in similarity]
    n = len(sim)
    if n == 0 or any(len(row) != n for row in sim):
        raise ValueError(f"similarity must be a non-empty square matrix, got {n} rows of lengths "
                         f"{sorted({len(r) for r in sim})}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= n:
        raise ValueError(f"num_groups must be an int in [1, {n}], got {num_groups!r}")
    groups = [[i] for i in range(n)]
    while len(groups) > num_groups:
        best, pair = -math.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                # average linkage: mean similarity over all cross pairs
                link = sum(sim[i][j] for i in groups[a] for j in groups[b]) / (len(groups[a]) * len(groups[b]))
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: g[0])


def _subspace_merge(weights: list[torch.Tensor], freq: list[float], rank: int | None) -> torch.Tensor:
    """Sub-MoE merge of same-shaped (d, h) matrices: shared U from the SVD of [W_1 | … | W_g], frequency-merged V."""
    d, h = weights[0].shape
    stacked = torch.cat([w.double() for w in weights], dim=1)  # (d, g·h)
    # [W_1 | … | W_g] = U Σ [V_1ᵀ | … | V_gᵀ]
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    r = s.numel() if rank is None else min(rank, s.numel())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # V_iᵀ is the i-th (r, h) column block of Vᵀ; merge them by routing frequency
    v_merged = sum(f * vh[:, i * h : (i + 1) * h] for i, f in enumerate(freq))
    # W = U_r Σ_r V_mergedᵀ : (d, h)
    return (u * s) @ v_merged


@dataclass
class ExpertMergeResult:
    """What `merge_experts` returns.

    * `layer`: a copy of the MoE layer in which every expert of a group computes the group's merged FFN.
    * `groups`: the expert groups; `similarity`: the (E, E) output similarity they were clustered by.
    * `frequency`: assignments per expert on the calibration tokens (the merge weights within a group).
    * `stored_expert_params`: expert parameters the merged layer needs to store (one dense FFN per group);
      `original_expert_params`: the same for the unmerged layer.
    """

    layer: MoELayer
    method: str
    groups: list[list[int]]
    similarity: list[list[float]]
    frequency: list[int]
    stored_expert_params: int
    original_expert_params: int
    rank: int | None = None
    notes: list[str] = field(default_factory=list)


_EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")


def merge_experts(
    layer: MoELayer, x: torch.Tensor, *, num_groups: int, method: str = "subspace", rank: int | None = None
) -> ExpertMergeResult:
    """Cluster the routed experts of `layer` into `num_groups` groups by output similarity on tokens x and merge each.

    Methods, per group with routing frequencies f_i (normalised within the group; uniform if none was routed):
    * `"average"`: W = Σ_i f_i W_i for every expert tensor;
    * `"subspace"`: Sub-MoE's shared-basis merge (module docstring), truncated to `rank` (None: full rank, which
      equals `"average"`); biases are averaged;
    * `"prune"`: keep the most frequently routed expert of the group (ties: lowest index), drop the others.

    The router is kept, and every member slot of a group gets the merged weights, so `layer` and the result route
    identically. `layer` is not modified.
    """
    layer = _check_moe_layer(layer)
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None (full) or an int >= 1, got {rank!r}")
    if rank is not None and method != "subspace":
        raise ValueError(f"rank only applies to method='subspace', got method={method!r}")
    similarity = expert_similarity(layer, x)
    groups = cluster_experts(similarity, num_groups=num_groups)
    frequency = routing_frequency(layer, x)
    merged = copy.deepcopy(layer)
    experts = merged.experts
    with torch.no_grad():
        for group in groups:
            counts = [frequency[i] for i in group]
            total = sum(counts)
            freq = [c / total for c in counts] if total else [1.0 / len(group)] * len(group)
            for name in _EXPERT_TENSORS:
                tensor = getattr(experts, name)
                if tensor is None:
                    continue
                members = [tensor[i].detach().clone() for i in group]
                if method == "prune":
                    keep = max(range(len(group)), key=lambda k: (counts[k], -group[k]))
                    value = members[keep]
                elif method == "subspace" and tensor.dim() == 3:
                    # w_in/w_gate are (d_model, h): shared basis on the d_model side; w_out (h, d_model): transpose
                    if name == "w_out":
                        value = _subspace_merge([m.T for m in members], freq, rank).T
                    else:
                        value = _subspace_merge(members, freq, rank)
                else:
                    value = sum(f * m.double() for f, m in zip(freq, members))
                for i in group:
                    tensor[i].copy_(value.to(tensor.dtype))
    per_expert = layer.experts.params_per_expert
    notes = []
    if method == "subspace" and rank is not None:
        notes.append(f"shared basis truncated to rank {rank}; merged weights stored dense")
    return ExpertMergeResult(
        layer=merged, method=method, groups=groups, similarity=similarity, frequency=frequency,
        stored_expert_params=len(groups) * per_expert, original_expert_params=layer.num_routed_experts * per_expert,
        rank=rank, notes=notes,
    )


def replace_ffn(model: TinyTransformer, layer: int, ffn: nn.Module) -> TinyTransformer:
    """A deep copy of `model` whose block `layer` uses `ffn` (e.g. `merge_experts(...).layer`)."""
    _check_transformer(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer must be an index in [0, {len(model.blocks)}), got {layer!r}")
    if not isinstance(ffn, nn.Module):
        raise TypeError(f"ffn must be an nn.Module, got {type(ffn).__name__}")
    out = copy.deepcopy(model)
    out.blocks[layer].ffn = copy.deepcopy(ffn)
    return out

