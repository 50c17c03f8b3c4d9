"""Relaxed recursion: a per-depth LoRA on every tied matrix (Bae et al., *Relaxed Recursive Transformers*, 2024).

Depth d uses its unique block's weight W_k plus its own low-rank update:

    y = x (W_k + s B_d A_d)ᵀ + b_k,   A_d ∈ R^{r×in}, B_d ∈ R^{out×r}, s = 1

The LoRA is `lablib.adapters.LoraLinear` (the same math as PEFT's), wrapped around each depth's `nn.Linear`; because
the recursive model ties *parameters* and keeps one module per depth, each depth gets its own adapter while the
wrapped base weight stays the one shared Parameter. Shared weights and LoRAs train together.

Initialisation from the pretrained vanilla model (`from_vanilla`): the residual R_d = W_orig_d − W_k has the
truncated SVD U_r Σ_r V_rᵀ and the LoRA starts at B_d = U_r Σ_r, A_d = V_rᵀ (the reference code's choice), with
scaling s = 1 so that the initial update *is* the best rank-r approximation of R_d (the reference's alpha = 2r would
double it; `specs-moe-recursion.md` §3.1). Hence:

* `rank=0` is the pure recursive model (no adapters at all);
* full rank (r >= min(out, in); larger requests are capped per matrix) reproduces the vanilla model exactly when the
  vector parameters the LoRA cannot touch agree: biases (0 at nanoGPT init) and LayerNorms (use `ln_share=False` to
  keep them per depth).

The rank is the knob between full sharing (0) and no sharing (full): `rank_parameters` counts what it costs.
`lablib.ledger.ledger` on this model warns and double-counts the shared base weights (each LoRA wrapper accounts for
its base layer); count it with `lablib.recursive.recursion_ledger`, which identifies tensors by identity. With the middle sharings the unshared first
and last layers get no LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lablib.adapters.lora import LoraLinear
from lablib.models import TinyTransformer, TransformerConfig
from lablib.recursive.core import RecursiveTransformer, _is_int


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


class RelaxedRecursiveTransformer(RecursiveTransformer):
    """`RecursiveTransformer` with a LoRA of rank `rank` on every `nn.Linear` of every depth (B = 0 at construction,
    so a fresh model equals the pure recursive one; `from_vanilla` starts the LoRAs from the SVD of the residuals)."""

    def __init__(self, config: TransformerConfig, *, num_recursion: int, sharing: str = "cycle",
                 ln_share: bool = True, rank: int = 0, **kwargs: Any) -> None:
        if not _is_int(rank) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        super().__init__(config, num_recursion=num_recursion, sharing=sharing, ln_share=ln_share, **kwargs)
        self.rank = 0
        if rank:
            self._add_lora(rank)

    def _add_lora(self, rank: int) -> None:
        for d, block in enumerate(self.blocks):
            if self.sharing.startswith("middle_") and d in (0, len(self.blocks) - 1):
                continue  # the unshared first and last layers need no relaxation
            linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            for name, linear in linears:
                r = min(rank, linear.in_features, linear.out_features)
                wrapper = LoraLinear(base_layer=linear, layer_name=f"blocks.{d}.{name}", r=r, scaling=1.0,
                                     dropout=0.0)
                _set_submodule(block, name, wrapper)
        self.rank = rank

    def lora_layers(self) -> dict[str, LoraLinear]:
        """The per-depth LoRA wrappers by name (e.g. "blocks.2.attn.qkv")."""
        return {n: m for n, m in self.named_modules() if isinstance(m, LoraLinear)}

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.lora_layers().values() for p in (layer.lora_A, layer.lora_B)]

    @classmethod
    def from_vanilla(cls, vanilla: TinyTransformer, *, num_recursion: int, sharing: str = "cycle",
                     initialization: str = "stepwise", ln_share: bool = True, rank: int = 0,
                     **kwargs: Any) -> "RelaxedRecursiveTransformer":
        model = super().from_vanilla(vanilla, num_recursion=num_recursion, sharing=sharing,
                                     initialization=initialization, ln_share=ln_share, rank=0, **kwargs)
        if not _is_int(rank) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        if rank:
            model._add_lora(rank)
            model._svd_init(vanilla)
        return model

    @torch.no_grad()
    def _svd_init(self, vanilla: TinyTransformer) -> None:
        original = dict(vanilla.named_modules())
        for name, layer in self.lora_layers().items():
            w_orig = original[name].weight.double()
            # R_d = W_orig_d - W_k
            residual = w_orig - layer.base_layer.weight.double()
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            r = layer.r
            # B = U_r Σ_r (out × r),  A = V_rᵀ (r × in):  B A = best rank-r approximation of R_d
            layer.lora_B.copy_((u[:, :r] * s[:r]).to(layer.lora_B.dtype))
            layer.lora_A.copy_(vh[:r].to(layer.lora_A.dtype))


def rank_parameters(config: TransformerConfig, *, rank: int, sharing: str = "cycle") -> int:
    """LoRA parameters the relaxation adds for `rank`: Σ over relaxed depths and matrices of r (in + out), r capped at
    min(in, out). Every depth is relaxed, except the unshared first and last layers of the middle variants."""
    d, h = config.d_model, config.ffn_hidden
    shapes = [(d, 3 * d), (d, d), (d, h), (h, d)]  # qkv, attn.proj, ffn.fc, ffn.proj as (in, out)
    depths = config.n_layers - 2 if sharing.startswith("middle_") else config.n_layers
    return depths * sum(min(rank, i, o) * (i + o) for i, o in shapes)
