"""The specification of the MoE expert computation, in plain torch: every kernel in `lablib.kernels` is checked
against `moe_experts_reference`.

Given routed assignments (the router is upstream: `indices` (N, k) expert ids, `weights` (N, k) combine weights,
optional `mask` (N, k) of kept slots), the experts compute

    y_t = Σ_{s : mask[t, s]} w_{t,s} · F_{e_{t,s}}(x_t)
    F_e(x) = act(x W_in[e]) W_out[e]                         (GELU / ReLU / SiLU experts)
    F_e(x) = (silu(x W_gate[e]) ⊙ x W_in[e]) W_out[e]        (SwiGLU experts)

with the weights stacked as in `lablib.moe.Experts`: W_in, W_gate (E, d_model, d_hidden), W_out (E, d_hidden, d_model).

The reference is written the slow, obvious way: group the tokens of each expert with a boolean mask (route -> group),
one pair of matmuls per expert, then a weighted `index_add_` back to the tokens (scatter). It shares no code with
`lablib.moe`'s sorted dispatch or with the Triton path, which is what makes it a useful oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "expert_ffn", "moe_experts_reference"]

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def expert_ffn(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, *, w_gate: torch.Tensor | None = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """One expert F(x) on rows x (n, d_model) with its own matrices w_in (d_model, d_hidden), w_out (d_hidden, d_model)."""
    # u = x W_in : (n, d_hidden)
    u = x @ w_in
    if activation == "swiglu":
        # h = silu(x W_gate) ⊙ u
        h = F.silu(x @ w_gate) * u
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](u)
    # F(x) = h W_out : (n, d_model)
    return h @ w_out


def moe_experts_reference(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "gelu",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y (N, d_model) = Σ_s w_{t,s} F_{e_{t,s}}(x_t) over kept slots; differentiable in x, weights and the matrices."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")
    if (activation == "swiglu") != (w_gate is not None):
        raise ValueError("w_gate is needed for activation='swiglu' and only for it")
    if x.dim() != 2:
        raise ValueError(f"x must be (num_tokens, d_model), got shape {tuple(x.shape)}")
    num_experts, d_model, d_hidden = w_in.shape
    if x.shape[1] != d_model or w_out.shape != (num_experts, d_hidden, d_model):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices and weights must both be ({x.shape[0]}, k), got {tuple(indices.shape)} and "
                         f"{tuple(weights.shape)}")
    keep = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
    y = torch.zeros_like(x)
    for e in range(num_experts):
        # route -> group: the (token, slot) pairs that chose expert e
        tokens, slots = torch.nonzero((indices == e) & keep, as_tuple=True)
        if tokens.numel() == 0:
            continue
        out = expert_ffn(x[tokens], w_in[e], w_out[e], w_gate=None if w_gate is None else w_gate[e],
                         activation=activation)
        # weighted scatter back: y_t += w_{t,s} F_e(x_t)
        y = y.index_add(0, tokens, weights[tokens, slots].unsqueeze(1).to(out.dtype) * out)
    return y
