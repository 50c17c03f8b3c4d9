"""Compacter-style updates: sums of Kronecker products with shared slow factors and per-layer low-rank fast factors.

Karimi Mahabadi, Henderson, Ruder, *Compacter: Efficient Low-Rank Hypercomplex Adapter Layers*, NeurIPS 2021
([arXiv:2106.04647](https://arxiv.org/abs/2106.04647)), building on the PHM layer of Zhang et al., *Beyond
Fully-Connected Layers with Quaternions* (ICLR 2021, [arXiv:2102.08597](https://arxiv.org/abs/2102.08597)):

    ΔW = (alpha / r) · Σ_{i=1}^{n} S_i ⊗ (U_i V_iᵀ),     S_i ∈ R^{n×n},  U_i ∈ R^{(out/n)×r},  V_i ∈ R^{(in/n)×r}

The **slow** factors S_i ("rules", n³ numbers) are shared by every adapted layer (`shared_slow=True`, Compacter's
`shared_phm_rule`) and live once in `adapted.adapter_banks["phm_rule"]`; the **fast** factors U_i V_iᵀ are each
layer's own, rank r (r = 1 in the paper: "rank-one"). Parameters per layer r · (in + out), plus n³ in total.

**Deviation (documented):** Compacter proper inserts a bottleneck adapter `h + U(f(D(h)))` whose down and up maps are
PHM layers. Here the same Kronecker-sum parametrisation is the *update of an existing Linear*, in parallel like LoRA
(as PEFT's LoKr does with one Kronecker product), so it merges into the base weight and compares with the other
kinds at equal budgets. The forward never forms ΔW: with x split into n blocks x_b of length in/n,

    y_a = Σ_i Σ_b S_i[a, b] · U_i (V_iᵀ x_b)        (the a-th block of out/n outputs)

* Init (our choice; the code's `phm_init_range` / `phm_c_init` scales are not verified): S_i ~ N(0, 1/n),
  V_i ~ U(−1/√(in/n), 1/√(in/n)), U_i = 0, so ΔW = 0 at the start.
* `in` and `out` must be multiples of n (`phm_dim`, the code's `hypercomplex_division`, 8 there; 4 by default here for
  toy widths), and r <= min(in, out) / n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lablib.adapters.core import (
    AdapterBuild,
    AdapterConfig,
    AdapterLinear,
    check_bool,
    check_divisible,
    check_float,
    check_int,
)
from lablib.ledger import LedgerCounts

__all__ = ["RULE_KEY", "CompacterConfig", "CompacterLinear", "PHMRule", "kron_sum"]

RULE_KEY = "phm_rule"


def kron_sum(rule: torch.Tensor, fast_u: torch.Tensor, fast_v: torch.Tensor) -> torch.Tensor:
    """Σ_i S_i ⊗ (U_i V_iᵀ) for S (n, n, n), U (n, out/n, r), V (n, in/n, r); returns (out, in), unscaled."""
    n = rule.shape[0]
    # M_i = U_i V_iᵀ : (n, out/n, in/n)
    fast = torch.einsum("ipr,iqr->ipq", fast_u, fast_v)
    # (S_i ⊗ M_i)[a·(out/n) + p, b·(in/n) + q] = S_i[a, b] M_i[p, q], summed over i : (n, out/n, n, in/n)
    blocks = torch.einsum("iab,ipq->apbq", rule, fast)
    return blocks.reshape(n * fast.shape[1], n * fast.shape[2])


@dataclass(frozen=True, kw_only=True)
class CompacterConfig(AdapterConfig):
    """Compacter-style PHM update: fast-factor rank `r`=1, `alpha`=1 (scaling alpha/r), `phm_dim` n=4,
    `shared_slow`=True (one set of S_i for all layers; False gives each layer its own)."""

    kind: ClassVar[str] = "compacter"

    r: int = 1
    alpha: float = 1.0
    phm_dim: int = 4
    shared_slow: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", check_float(self.alpha, name="alpha", low=0.0, low_open=True))
        check_int(self.phm_dim, name="phm_dim")
        check_bool(self.shared_slow, name="shared_slow")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        n = self.phm_dim
        for name, layer in layers.items():
            check_divisible(name, layer, n, what="phm_dim")
            limit = min(layer.in_features, layer.out_features) // n
            if self.r > limit:
                raise ValueError(f"r={self.r} is larger than layer {name!r} allows: its fast factors are "
                                 f"{layer.out_features // n} x {layer.in_features // n} (weight "
                                 f"{layer.out_features} x {layer.in_features} over phm_dim={n}), so r <= {limit}")
        first = next(iter(layers.values())).weight
        shared = PHMRule(phm_dim=n, device=first.device, dtype=first.dtype) if self.shared_slow else None
        wrappers = {
            name: CompacterLinear(base_layer=layer, layer_name=name, r=self.r, scaling=self.scaling,
                                  dropout=self.dropout, phm_dim=n, rule=shared)
            for name, layer in layers.items()
        }
        return AdapterBuild(layers=wrappers, banks={RULE_KEY: shared} if shared is not None else {})


class PHMRule(nn.Module):
    """The slow factors S_1..S_n (n × n each) as one (n, n, n) parameter `rule`; counts itself once when shared."""

    def __init__(self, *, phm_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.phm_dim = phm_dim
        self.rule = nn.Parameter(torch.empty(phm_dim, phm_dim, phm_dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """S_i ~ N(0, 1/n) from torch's global RNG."""
        nn.init.normal_(self.rule, std=1.0 / math.sqrt(self.phm_dim))

    def ledger_counts(self) -> LedgerCounts:
        n = self.rule.numel()
        return LedgerCounts(total=n, active_per_token=n, stored=n, flops_per_token=0,
                            trainable=n if self.rule.requires_grad else 0)

    def extra_repr(self) -> str:
        return f"phm_dim={self.phm_dim}"


class CompacterLinear(AdapterLinear):
    """`base_layer(x) + (α/r) Σ_i (S_i ⊗ U_i V_iᵀ) dropout(x)` with per-layer `fast_u`, `fast_v` and slow factors
    either shared (a reference to the model's `PHMRule`) or this layer's own (`own_rule`)."""

    kind: ClassVar[str] = "compacter"

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, scaling: float, dropout: float,
                 phm_dim: int, rule: PHMRule | None) -> None:
        super().__init__(base_layer=base_layer, layer_name=layer_name, r=r, scaling=scaling, dropout=dropout)
        n = self.phm_dim = phm_dim
        factory = self._factory()
        if rule is None:
            self.own_rule = PHMRule(phm_dim=n, **factory)
        else:
            self.own_rule = None
            self._set_shared(rule)
        self.fast_u = nn.Parameter(torch.empty(n, self.out_features // n, r, **factory))
        self.fast_v = nn.Parameter(torch.empty(n, self.in_features // n, r, **factory))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """V_i ~ U(−1/√(in/n), 1/√(in/n)) from torch's global RNG, U_i = 0 (so ΔW = 0)."""
        bound = 1.0 / math.sqrt(self.in_features // self.phm_dim)
        nn.init.uniform_(self.fast_v, -bound, bound)
        nn.init.zeros_(self.fast_u)

    @property
    def rule(self) -> torch.Tensor:
        """S (n, n, n): the shared slow factors, or this layer's own."""
        return (self.own_rule if self.own_rule is not None else self.shared).rule

    def delta_weight(self) -> torch.Tensor:
        # ΔW = s · Σ_i S_i ⊗ (U_i V_iᵀ) : (out, in)
        delta = self.scaling * kron_sum(self.rule.float(), self.fast_u.float(), self.fast_v.float())
        return delta.to(self.base_layer.weight.dtype)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.phm_dim
        h = self.dropout(x)
        # x split into n blocks x_b : (..., in) -> (..., n, in/n)
        blocks = h.reshape(*h.shape[:-1], n, self.in_features // n)
        # t_{i,b} = V_iᵀ x_b : (..., n_b, in/n) · (n_i, in/n, r) -> (..., n_i, n_b, r)
        t = torch.einsum("...bq,iqr->...ibr", blocks, self.fast_v)
        # z_{i,b} = U_i t_{i,b} : (..., n_i, n_b, r) · (n_i, out/n, r) -> (..., n_i, n_b, out/n)
        z = torch.einsum("...ibr,ipr->...ibp", t, self.fast_u)
        # y_a = Σ_i Σ_b S_i[a, b] z_{i,b} : (..., n_a, out/n) -> (..., out)
        y = torch.einsum("iab,...ibp->...ap", self.rule, z)
        return self.scaling * y.reshape(*h.shape[:-1], self.out_features)

    def adapter_flops_per_token(self) -> int:
        """Per term i: V_iᵀ x_b for all b (in·r), U_i t (r·out), S_i mixing (n·out) multiply-adds; n terms, 2 FLOPs
        each."""
        n, r = self.phm_dim, self.r
        return 2 * n * (r * self.in_features + r * self.out_features + n * self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, phm_dim={self.phm_dim}, shared_slow={self.own_rule is None}"
