"""NOLA: LoRA factors as learned linear combinations of frozen random bases regenerated from a seed.

Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, *NOLA: Compressing LoRA using Linear Combination of
Random Basis*, ICLR 2024 ([arXiv:2310.02556](https://arxiv.org/abs/2310.02556)):

    A = Σ_{i=1}^{k} α_i A_i,    B = Σ_{j=1}^{l} β_j B_j,    ΔW = (alpha / r) · B A

with A_i ∈ R^{r×in}, B_j ∈ R^{out×r} drawn from a per-layer seed and never trained or saved: only the k + l
coefficients α, β are parameters. The bases are regenerated from the seed on any process with a CPU
`torch.Generator` (never the global RNG), then kept as non-persistent buffers (regenerating them every step, as the
paper's code does, trades memory for O(k · r · (in + out)) work per step).

Our choices (the paper and its GPT-2 code differ, see the spec):

* The paper's form, A and B *both* pure combinations of bases. The GPT-2 code adds a frozen LoRA-style A0 drawn from
  the global RNG (so it is not reproducible from the stored seed); we do without it: α starts random,
  α_i ~ N(0, 1/k), and β = 0, so ΔW = 0 at the start and B still gets a gradient (∂L/∂β_j = ⟨∂L/∂B, B_j⟩).
* Basis scales: A_i ~ U(−1/√in, 1/√in), so a mix with N(0, 1/k) coefficients has LoRA's Kaiming-uniform variance
  1/(3 in); B_j ~ U(−1, 1)/√l (the code's 1/√(number of bases) normalisation).
* Per-layer seeds: `derive_seed(config.seed, layer name)`, stored in the layer as a 0-d int64 buffer `seed`, so
  `adapter_state_dict` holds exactly the seeds and the coefficients, and loading it regenerates identical bases.

Ledger: trainable = stored = k + l per layer (the bases count 0; the seed is configuration, not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lablib.adapters.core import (
    AdapterBuild,
    AdapterConfig,
    AdapterLinear,
    check_float,
    check_int,
    check_rank_fits,
    check_seed,
    derive_seed,
)

__all__ = ["NolaConfig", "NolaLinear", "nola_bases"]


def nola_bases(
    *, seed: int, r: int, in_features: int, out_features: int, num_basis_a: int, num_basis_b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen bases of one NOLA layer, from `seed` alone (CPU float32, the same on every machine):
    (A_i stacked: (k, r, in), B_j stacked: (l, out, r))."""
    generator = torch.Generator().manual_seed(int(seed))
    # A_i ~ U(−1/√in, 1/√in)
    basis_a = (torch.rand(num_basis_a, r, in_features, generator=generator) * 2 - 1) / math.sqrt(in_features)
    # B_j ~ U(−1, 1) / √l
    basis_b = (torch.rand(num_basis_b, out_features, r, generator=generator) * 2 - 1) / math.sqrt(num_basis_b)
    return basis_a, basis_b


@dataclass(frozen=True, kw_only=True)
class NolaConfig(AdapterConfig):
    """NOLA: `r`=8, `alpha`=8 (scaling alpha/r), `num_basis`=64 bases for A, `num_basis_b` for B (None: the same),
    `seed`=0 (per-layer seeds are derived from it and the layer's name)."""

    kind: ClassVar[str] = "nola"

    alpha: float = 8.0
    num_basis: int = 64
    num_basis_b: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", check_float(self.alpha, name="alpha", low=0.0, low_open=True))
        check_int(self.num_basis, name="num_basis")
        if self.num_basis_b is not None:
            check_int(self.num_basis_b, name="num_basis_b")
        check_seed(self.seed)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def basis_counts(self) -> tuple[int, int]:
        """(k, l): bases for A and for B."""
        return self.num_basis, self.num_basis if self.num_basis_b is None else self.num_basis_b

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        for name, layer in layers.items():
            check_rank_fits(name, layer, self.r)
        k, l = self.basis_counts
        wrappers = {
            name: NolaLinear(base_layer=layer, layer_name=name, r=self.r, scaling=self.scaling, dropout=self.dropout,
                             num_basis_a=k, num_basis_b=l, seed=derive_seed(self.seed, name))
            for name, layer in layers.items()
        }
        return AdapterBuild(layers=wrappers)


class NolaLinear(AdapterLinear):
    """LoRA whose A and B are `coef_A · bases_A` and `coef_B · bases_B`; the bases are seeded buffers."""

    kind: ClassVar[str] = "nola"

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, scaling: float, dropout: float,
                 num_basis_a: int, num_basis_b: int, seed: int) -> None:
        super().__init__(base_layer=base_layer, layer_name=layer_name, r=r, scaling=scaling, dropout=dropout)
        self.num_basis_a, self.num_basis_b = num_basis_a, num_basis_b
        factory = self._factory()
        self.coef_A = nn.Parameter(torch.empty(num_basis_a, **factory))
        self.coef_B = nn.Parameter(torch.empty(num_basis_b, **factory))
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64, device=factory["device"]))
        self.register_buffer("basis_A", None, persistent=False)
        self.register_buffer("basis_B", None, persistent=False)
        self._regenerate_bases()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """α_i ~ N(0, 1/k) from torch's global RNG, β = 0 (so ΔW = 0)."""
        nn.init.normal_(self.coef_A, mean=0.0, std=1.0 / math.sqrt(self.num_basis_a))
        nn.init.zeros_(self.coef_B)

    def _regenerate_bases(self) -> None:
        basis_a, basis_b = nola_bases(seed=int(self.seed), r=self.r, in_features=self.in_features,
                                      out_features=self.out_features, num_basis_a=self.num_basis_a,
                                      num_basis_b=self.num_basis_b)
        self.basis_A = basis_a.to(device=self.coef_A.device, dtype=self.coef_A.dtype)
        self.basis_B = basis_b.to(device=self.coef_B.device, dtype=self.coef_B.dtype)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a loaded seed regenerates its bases
        self._regenerate_bases()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A = Σ_i α_i A_i : (k) · (k, r, in) -> (r, in)
        a = torch.einsum("k,kri->ri", self.coef_A, self.basis_A)
        # B = Σ_j β_j B_j : (l) · (l, out, r) -> (out, r)
        b = torch.einsum("l,lor->or", self.coef_B, self.basis_B)
        return a, b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_basis=({self.num_basis_a}, {self.num_basis_b}), seed={int(self.seed)}"
