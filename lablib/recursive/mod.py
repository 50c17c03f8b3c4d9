"""Mixture-of-Depths (Raposo et al., 2024): a routed block processes only the top-C tokens of each sequence.

Per routed block l, a linear router gives a scalar `r_t = w_lᵀ x_t`; the `C = max(1, ⌊capacity · T⌋)` tokens with
the largest r_t (expert choice: exactly C per sequence) are gathered in position order, run through the block among
themselves (causal attention over the selected tokens only), and scattered back:

    x_t <- x_t + g(r_t) (f_l(X̃)_t - x_t)   for selected t,      x_t unchanged otherwise,

with g(r) = r for `gate="router"` (the paper's raw router output, which puts the router on the gradient path),
g = sigmoid(r) for `gate="sigmoid"` (many re-implementations), g = 1 for `gate="none"`. Every `route_every`-th block
is routed (default 2: blocks 1, 3, ... as the paper's interleaving), the others are full. Capacity 1.0 with
`gate="none"` is exactly the vanilla model (tested).

Causality caveat: top-C over a sequence looks at future tokens' router scores, so this training-time selection is
non-causal; the paper's autoregressive sampling needs an auxiliary predictor of the selection (not implemented).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lablib.models import BlocksOutput, TinyTransformer, TransformerConfig

MOD_GATES = ("router", "sigmoid", "none")


class MixtureOfDepthsTransformer(TinyTransformer):
    """TinyTransformer whose routed blocks each process `capacity` of the tokens (see the module docstring)."""

    def __init__(self, config: TransformerConfig, *, capacity: float = 0.125, gate: str = "router",
                 route_every: int = 2) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity must be in (0, 1], got {capacity!r}")
        if gate not in MOD_GATES:
            raise ValueError(f"gate must be one of {MOD_GATES}, got {gate!r}")
        if isinstance(route_every, bool) or not isinstance(route_every, int) or route_every < 1:
            raise ValueError(f"route_every must be an int >= 1, got {route_every!r}")
        super().__init__(config)
        self.capacity, self.gate, self.route_every = float(capacity), gate, route_every
        self.routed_layers = [i for i in range(config.n_layers) if i % route_every == route_every - 1]
        self.routers = nn.ModuleDict(
            {str(i): nn.Linear(config.d_model, 1, bias=False) for i in self.routed_layers})
        for router in self.routers.values():
            nn.init.normal_(router.weight, mean=0.0, std=0.02)

    def tokens_per_block(self, seq_len: int) -> int:
        """C = max(1, ⌊capacity · T⌋)."""
        return max(1, math.floor(self.capacity * seq_len + 1e-9))

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        aux_loss = x.new_zeros(())
        layer_outputs = []
        batch, time, dim = x.shape
        c = self.tokens_per_block(time)
        for i, block in enumerate(self.blocks):
            if i not in self.routed_layers:
                out = block(x)
                x, aux_loss = out.x, aux_loss + out.aux_loss
                layer_outputs.append(out.ffn_output)
                continue
            # r_t = w_lᵀ x_t : (B, T)
            scores = self.routers[str(i)](x).squeeze(-1)
            # top-C per sequence, kept in position order (causal attention among the selected)
            idx = scores.topk(c, dim=1).indices.sort(dim=1).values  # (B, C)
            gather = idx.unsqueeze(-1).expand(batch, c, dim)
            x_sel = x.gather(1, gather)  # (B, C, d)
            out = block(x_sel)
            delta = out.x - x_sel
            if self.gate != "none":
                g = scores.gather(1, idx)
                g = torch.sigmoid(g) if self.gate == "sigmoid" else g
                delta = delta * g.unsqueeze(-1)
            x = x.scatter(1, gather, x_sel + delta)
            aux_loss = aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)
