"""MoS (Mixture of Shards): LoRA factors concatenated from shards picked out of global pools.

Wang, Chen, Chen, Dong, Xue, Jiang, Kong, Wu, *MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
Mixture of Shards*, ICLR 2025 ([arXiv:2410.00938](https://arxiv.org/abs/2410.00938)). The paper's finding: *pure*
sharing (every layer uses the same LoRA pair) hurts, and cheap *differentiation* between layers undoes it. Our reading
follows the authors' released layer (Forence1999/MoS `modules/Tied_LoRA.py`, read, not copied) as summarised in the
project's spec.

**Pools.** The L adapted layers of one *module type* (same dotted name once numeric indices are replaced by `*`, e.g.
`blocks.*.attn.qkv`, and the same shape) share two pools of shards, with l shards per rank vector:

    P_A ∈ R^{R × in/l},  P_B ∈ R^{R × out/l},   R = r_e · L · l
    rows [0, S) are shared by all L layers, S = (r_e − r_p) · L · l;  layer j owns rows [S + j·r_p·l, S + (j+1)·r_p·l)

so the trainable budget equals one rank-r_e LoRA per layer, r_e · L · (in + out), while every layer uses an
*active* rank r > r_e. **Routing** ("MoE-like"): each layer has index vectors I_A^j, I_B^j of length r·l, fixed at
attach time from a seed (as in the authors' code: the router is a fixed random index matrix, not input-dependent):
(r − r_p)·l shared rows sampled without replacement, then the layer's r_p·l private rows. Then

    A_j[ρ, c·in/l:(c+1)·in/l] = P_A[I_A^j[ρ·l + c]]          (rank vector ρ = concat of l shards)
    B_j[c·out/l:(c+1)·out/l, ρ] = P_B[I_B^j[ρ·l + c]]
    Δ_j(x) = (α / r) · dropout(x) A_jᵀ B_jᵀ

**The four differentiation strategies, each a config flag** (our reading; confidence from what we could check):

| flag | on | off | confidence |
|---|---|---|---|
| `subset_selection` | every layer samples its own subset of shared rows | one sample, the same for every layer of the group | high (code: a per-layer `randperm`) |
| `pair_dissociation` | I_A and I_B drawn independently | I_B = I_A: the shards of A and B stay paired | high (code: separate masks for A and B) |
| `vector_sharding` | l = `shards_per_vector` shards per rank vector, each picked independently | l = 1: whole vectors | high (code: `num_chunk_per_vec`) |
| `shard_privatization` | r_p = `private_r` rank vectors per layer come from rows only that layer uses | r_p = 0: everything shared | high (code: `valid_param_private_r`) |

With all four off, every layer of a group uses the same r rows of the pools in the same pairing: pure sharing,
identical A and B across layers (at a matched budget, set r = r_e · L so every pool row is used). Each flag on its
own turns on exactly one kind of difference (pinned in `tests/test_adapters_kinds.py`). What we did not verify: how
the paper's ablation configures "without" a strategy (we take the "off" column above); the "MoE-like router" naming
is from the paper's figure, the fixed random index from the code (confidence medium-high overall, as in the spec).

* Init (code's): P_A Kaiming-uniform with the fan of the full input width (U(−1/√in, 1/√in)), P_B = 0, so ΔW = 0.
* The pools (`MosPool`) live in `adapted.adapter_banks["mos_<i>"]`, one per group; a shared shard's gradient is
  the sum of its uses across layers.
* Ledger: trainable = stored = Σ_groups r_e · L · (in + out); the routing tables are regenerated from the pool's
  seed (stored 0); the wrappers own no parameters.
* `bank_usage` gives each layer's picks per pool and the row where private rows start.
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
    BankUsage,
    check_bool,
    check_divisible,
    check_float,
    check_int,
    check_rank_fits,
    check_seed,
    derive_seed,
)
from lablib.ledger import LedgerCounts

__all__ = ["MosConfig", "MosLinear", "MosPool", "MosRouting", "module_type", "mos_routing"]


def module_type(name: str) -> str:
    """A layer's module type: its dotted name with every all-digit part replaced by `*` (`blocks.*.attn.qkv`)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


@dataclass(frozen=True)
class MosRouting:
    """The fixed routing of one MoS group.

    * `index_a`, `index_b`: (L, r·l) int64 pool rows per layer; rank vector ρ of layer j is rows [ρ·l, (ρ+1)·l).
    * `shared_rows`: S, rows [0, S) are shared; `pool_rows`: R, rows [S, R) are private (r_p·l per layer, in order).
    """

    index_a: torch.Tensor
    index_b: torch.Tensor
    shared_rows: int
    pool_rows: int


def mos_routing(*, num_layers: int, r: int, equivalent_r: int, shards_per_vector: int, private_r: int,
                subset_selection: bool, pair_dissociation: bool, seed: int) -> MosRouting:
    """Draw the index vectors of one group from `seed` (a CPU generator; the same on every machine).

    `shards_per_vector` and `private_r` are the *effective* l and r_p (1 and 0 when vector sharding / shard
    privatization are off). Raises ValueError when the shared pool is too small for (r − r_p)·l distinct picks.
    """
    L, l, p = num_layers, shards_per_vector, private_r
    shared = (equivalent_r - p) * L * l
    total = equivalent_r * L * l
    picks = (r - p) * l
    if picks > shared:
        raise ValueError(
            f"MoS needs (r - private_r) * shards_per_vector = {picks} distinct shared shards per layer, but the "
            f"shared pool of a {L}-layer group holds (equivalent_r - private_r) * L * shards_per_vector = {shared}; "
            f"lower r (active rank {r}) or raise equivalent_r ({equivalent_r})"
        )
    generator = torch.Generator().manual_seed(int(seed))

    def draw() -> torch.Tensor:
        # a subset of the shared rows, without replacement, in random order
        return torch.randperm(shared, generator=generator)[:picks]

    common_a = draw() if not subset_selection else None
    common_b = draw() if not subset_selection and pair_dissociation else None
    rows_a, rows_b = [], []
    for j in range(L):
        shared_a = draw() if subset_selection else common_a
        if pair_dissociation:
            shared_b = draw() if subset_selection else common_b
        else:
            shared_b = shared_a
        # layer j's private rows: S + j·r_p·l ... S + (j+1)·r_p·l − 1
        private = shared + j * p * l + torch.arange(p * l)
        rows_a.append(torch.cat([shared_a, private]))
        rows_b.append(torch.cat([shared_b, private]))
    return MosRouting(index_a=torch.stack(rows_a).long(), index_b=torch.stack(rows_b).long(),
                      shared_rows=shared, pool_rows=total)


@dataclass(frozen=True, kw_only=True)
class MosConfig(AdapterConfig):
    """MoS: active rank `r`=4, `alpha`=4 (scaling alpha/r), `equivalent_r` r_e=2 (the budget: r_e·L·(in+out) per
    group), `shards_per_vector` l=2, `private_r` r_p=1, the four strategy flags (all on by default), `seed`=0."""

    kind: ClassVar[str] = "mos"

    r: int = 4
    alpha: float = 4.0
    equivalent_r: int = 2
    shards_per_vector: int = 2
    private_r: int = 1
    subset_selection: bool = True
    pair_dissociation: bool = True
    vector_sharding: bool = True
    shard_privatization: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", check_float(self.alpha, name="alpha", low=0.0, low_open=True))
        check_int(self.equivalent_r, name="equivalent_r")
        check_int(self.shards_per_vector, name="shards_per_vector")
        check_int(self.private_r, name="private_r", low=0)
        for flag in ("subset_selection", "pair_dissociation", "vector_sharding", "shard_privatization"):
            check_bool(getattr(self, flag), name=flag)
        check_seed(self.seed)
        if self.vector_sharding and self.shards_per_vector < 2:
            raise ValueError("vector_sharding=True needs shards_per_vector >= 2 (one shard per vector is no sharding)"
                             f", got {self.shards_per_vector}")
        if self.shard_privatization and not 1 <= self.private_r <= min(self.r, self.equivalent_r):
            raise ValueError(f"shard_privatization=True needs private_r in [1, min(r, equivalent_r)] = "
                             f"[1, {min(self.r, self.equivalent_r)}], got {self.private_r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def shards(self) -> int:
        """The effective l: `shards_per_vector` with vector sharding, else 1."""
        return self.shards_per_vector if self.vector_sharding else 1

    @property
    def private(self) -> int:
        """The effective r_p: `private_r` with shard privatization, else 0."""
        return self.private_r if self.shard_privatization else 0

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        groups: dict[tuple[str, int, int], list[str]] = {}
        for name, layer in layers.items():
            check_rank_fits(name, layer, self.r)
            check_divisible(name, layer, self.shards, what="shards_per_vector")
            groups.setdefault((module_type(name), layer.in_features, layer.out_features), []).append(name)
        banks: dict[str, nn.Module] = {}
        wrappers: dict[str, AdapterLinear] = {}
        for i, ((group, in_features, out_features), names) in enumerate(groups.items()):
            weight = layers[names[0]].weight
            pool = MosPool(group=group, layer_names=names, in_features=in_features, out_features=out_features,
                           r=self.r, equivalent_r=self.equivalent_r, shards_per_vector=self.shards,
                           private_r=self.private, subset_selection=self.subset_selection,
                           pair_dissociation=self.pair_dissociation, seed=derive_seed(self.seed, group),
                           device=weight.device, dtype=weight.dtype)
            banks[f"mos_{i}"] = pool
            for j, name in enumerate(names):
                wrappers[name] = MosLinear(base_layer=layers[name], layer_name=name, r=self.r, scaling=self.scaling,
                                           dropout=self.dropout, pool=pool, position=j)
        return AdapterBuild(layers={name: wrappers[name] for name in layers}, banks=banks)


class MosPool(nn.Module):
    """One group's shard pools `pool_A` (R × in/l), `pool_B` (R × out/l) and its fixed routing (see module doc)."""

    def __init__(self, *, group: str, layer_names: list[str], in_features: int, out_features: int, r: int,
                 equivalent_r: int, shards_per_vector: int, private_r: int, subset_selection: bool,
                 pair_dissociation: bool, seed: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.group, self.layer_names = group, list(layer_names)
        self.num_layers = len(self.layer_names)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.equivalent_r, self.shards_per_vector, self.private_r = equivalent_r, shards_per_vector, private_r
        self.subset_selection, self.pair_dissociation = subset_selection, pair_dissociation
        l = shards_per_vector
        rows = equivalent_r * self.num_layers * l
        self.pool_A = nn.Parameter(torch.empty(rows, in_features // l, device=device, dtype=dtype))
        self.pool_B = nn.Parameter(torch.empty(rows, out_features // l, device=device, dtype=dtype))
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.register_buffer("index_A", None, persistent=False)
        self.register_buffer("index_B", None, persistent=False)
        self.shared_rows = 0
        self._route()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """P_A ~ U(−1/√in, 1/√in) (Kaiming-uniform, a=√5, over the full input width), P_B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.pool_A, -bound, bound)
        nn.init.zeros_(self.pool_B)

    def _route(self) -> None:
        routing = mos_routing(num_layers=self.num_layers, r=self.r, equivalent_r=self.equivalent_r,
                              shards_per_vector=self.shards_per_vector, private_r=self.private_r,
                              subset_selection=self.subset_selection, pair_dissociation=self.pair_dissociation,
                              seed=int(self.seed))
        self.index_A = routing.index_a.to(self.pool_A.device)
        self.index_B = routing.index_b.to(self.pool_B.device)
        self.shared_rows = routing.shared_rows

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a loaded seed regenerates its routing
        self._route()

    def factor_a(self, position: int) -> torch.Tensor:
        """A of layer `position`: (r·l, in/l) picked rows -> (r, l, in/l) -> (r, in), shards side by side."""
        rows = self.pool_A[self.index_A[position]]
        return rows.reshape(self.r, self.in_features)

    def factor_b(self, position: int) -> torch.Tensor:
        """B of layer `position`: (r·l, out/l) picked rows -> (r, out) -> transposed (out, r)."""
        rows = self.pool_B[self.index_B[position]]
        return rows.reshape(self.r, self.out_features).t()

    def ledger_counts(self) -> LedgerCounts:
        """Both pools are parameters, trained and stored; the routing is regenerated from the seed (stored 0)."""
        params = [self.pool_A, self.pool_B]
        n = sum(p.numel() for p in params)
        return LedgerCounts(total=n, active_per_token=n, stored=n, flops_per_token=0,
                            trainable=sum(p.numel() for p in params if p.requires_grad))

    def usage(self, key: str, layers: Mapping[str, MosLinear]) -> list[BankUsage]:
        """Per pool (A, B): which rows each layer's rank vectors are made of (see `BankUsage`)."""
        rows = self.pool_A.shape[0]
        by_position = sorted(layers.items(), key=lambda item: item[1].position)
        out = []
        for factor, table in (("A", self.index_A), ("B", self.index_B)):
            picks = {name: table[layer.position].reshape(self.r, self.shards_per_vector).cpu()
                     for name, layer in by_position}
            counts = torch.stack([torch.bincount(p.reshape(-1), minlength=rows) for p in picks.values()])
            out.append(BankUsage(bank=key, factor=factor, layers=list(picks), counts=counts, weights=None,
                                 indices=picks, private_from=self.shared_rows if self.private_r else None))
        return out

    def extra_repr(self) -> str:
        return (f"group={self.group!r}, layers={self.num_layers}, r={self.r}, equivalent_r={self.equivalent_r}, "
                f"shards_per_vector={self.shards_per_vector}, private_r={self.private_r}, "
                f"subset_selection={self.subset_selection}, pair_dissociation={self.pair_dissociation}")


class MosLinear(AdapterLinear):
    """`base_layer(x) + (α/r) dropout(x) A_jᵀ B_jᵀ` with A_j, B_j gathered from the group's `MosPool`."""

    kind: ClassVar[str] = "mos"

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, scaling: float, dropout: float,
                 pool: MosPool, position: int) -> None:
        super().__init__(base_layer=base_layer, layer_name=layer_name, r=r, scaling=scaling, dropout=dropout)
        self._set_shared(pool)
        self.position = position

    @property
    def pool(self) -> MosPool:
        return self.shared

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.factor_a(self.position), self.pool.factor_b(self.position)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.pool.group!r}, position={self.position}"
