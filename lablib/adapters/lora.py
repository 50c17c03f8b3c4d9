"""LoRA: a trainable low-rank update next to a frozen weight.

Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022
([arXiv:2106.09685](https://arxiv.org/abs/2106.09685)); rsLoRA scaling from Kalajdzievski, *A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA* (2023, [arXiv:2312.03732](https://arxiv.org/abs/2312.03732)).
Semantics follow PEFT's `LoraLayer` (checked numerically in `tests/test_adapters_peft.py`):

    Δ(x) = s · dropout(x) Aᵀ Bᵀ,    A ∈ R^{r×in},  B ∈ R^{out×r},   s = α / r   (α / √r with `use_rslora`)
    ΔW   = s · B A

* Init: A ~ Kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0, so the adapted model starts equal to the base.
* Parameters per layer: r · (in + out), all trainable and stored.
* Pitfall: at fixed α, a larger r shrinks s, so changing r also changes the effective step size (rsLoRA's point).
* `r` larger than min(in, out) raises: it would add parameters but no rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lablib.adapters.core import AdapterBuild, AdapterConfig, AdapterLinear, check_bool, check_float, check_rank_fits

__all__ = ["LoraConfig", "LoraLinear"]


@dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA (PEFT's names and defaults): `r`=8, `alpha`=8, `dropout`=0, `use_rslora`=False."""

    kind: ClassVar[str] = "lora"

    alpha: float = 8.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", check_float(self.alpha, name="alpha", low=0.0, low_open=True))
        check_bool(self.use_rslora, name="use_rslora")

    @property
    def scaling(self) -> float:
        """s = α / r, or α / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        for name, layer in layers.items():
            check_rank_fits(name, layer, self.r)
        wrappers = {
            name: LoraLinear(base_layer=layer, layer_name=name, r=self.r, scaling=self.scaling, dropout=self.dropout)
            for name, layer in layers.items()
        }
        return AdapterBuild(layers=wrappers)


class LoraLinear(AdapterLinear):
    """`base_layer(x) + s · dropout(x) Aᵀ Bᵀ` with `lora_A` (r × in) and `lora_B` (out × r) parameters."""

    kind: ClassVar[str] = "lora"

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, scaling: float, dropout: float) -> None:
        super().__init__(base_layer=base_layer, layer_name=layer_name, r=r, scaling=scaling, dropout=dropout)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **self._factory()))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **self._factory()))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A ~ Kaiming-uniform(a=√5) = U(−1/√in, 1/√in) from torch's global RNG, B = 0 (so ΔW = 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B
