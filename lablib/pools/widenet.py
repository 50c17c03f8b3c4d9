"""WideNet: one transformer block shared across depth, its FFN a mixture of experts, one LayerNorm pair per depth.

    x_{ℓ+½} = x_ℓ     + Attn(LN1_ℓ(x_ℓ))          Attn: the same module at every depth
    x_{ℓ+1} = x_{ℓ+½} + MoE(LN2_ℓ(x_{ℓ+½}))       MoE: the same router and experts at every depth

Xue et al., *Go Wider Instead of Deeper* (AAAI 2022): parameter sharing across depth (like ALBERT) frees parameters,
which go to width via an MoE FFN; the individual LayerNorms LN1_ℓ, LN2_ℓ are the only per-depth parameters, and
because LN2_ℓ differs, the one shared router sends the same token to different experts at different depths
(ColossalAI's `Widenet` hands one router to every block the same way). The paper reports +1.5 % over ViT at 0.72x the
trainable parameters.

`WideNetTransformer` builds this from `lablib.models.TinyTransformer` by handing every layer the *same* attention
and `lablib.moe.MoELayer` instances through the factories; `share_norms=True` ties the LayerNorms too (the ablation).
The ledger counts the shared block once (total, stored) but its compute once per depth (FLOPs), and the balance loss
is summed over every depth's call.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lablib.models import INIT_STD, CausalSelfAttention, TinyTransformer, TransformerConfig
from lablib.moe import MoELayer

__all__ = ["WideNetTransformer"]


class WideNetTransformer(TinyTransformer):
    """A tiny LM with one attention + one MoE FFN reused at all `n_layers` depths (keyword-only arguments).

    * `num_experts`, `top_k`, `d_hidden` (default `config.ffn_hidden`): the shared MoE FFN; other keywords
      (`router`, `capacity_factor`, `router_aux_loss_coef`, ...) go to `lablib.moe.MoELayer`.
    * `share_norms`: False (WideNet: individual LayerNorms per depth) or True (one LayerNorm pair for all depths).
    """

    def __init__(self, config: TransformerConfig, *, num_experts: int = 4, top_k: int = 2,
                 d_hidden: int | None = None, share_norms: bool = False, **moe_kwargs: Any) -> None:
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if not isinstance(share_norms, bool):
            raise ValueError(f"share_norms must be a bool, got {share_norms!r}")
        shared: dict[str, nn.Module] = {}

        def attn_factory(layer_idx: int, cfg: TransformerConfig) -> nn.Module:
            if "attn" not in shared:
                shared["attn"] = CausalSelfAttention(cfg)
            return shared["attn"]

        def ffn_factory(layer_idx: int, cfg: TransformerConfig) -> nn.Module:
            if "ffn" not in shared:
                kwargs = {"dropout": cfg.dropout, "out_init_std": INIT_STD / math.sqrt(2 * cfg.n_layers),
                          **moe_kwargs}
                shared["ffn"] = MoELayer(d_model=cfg.d_model, d_hidden=cfg.ffn_hidden if d_hidden is None else d_hidden,
                                         num_experts=num_experts, top_k=top_k, **kwargs)
            return shared["ffn"]

        super().__init__(config, attn_factory=attn_factory, ffn_factory=ffn_factory)
        self.share_norms = share_norms
        if share_norms:
            first = self.blocks[0]
            for block in self.blocks[1:]:
                block.attn_norm = first.attn_norm
                block.ffn_norm = first.ffn_norm

    @property
    def shared_attn(self) -> nn.Module:
        return self.blocks[0].attn

    @property
    def shared_ffn(self) -> MoELayer:
        return self.blocks[0].ffn

    def extra_repr(self) -> str:
        return f"share_norms={self.share_norms}"
