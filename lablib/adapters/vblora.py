"""VB-LoRA: every sub-vector of every adapter factor is a top-k mix of vectors from one global bank.

Li, Han, Ji, *VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks*, NeurIPS 2024
([arXiv:2405.15179](https://arxiv.org/abs/2405.15179)); semantics of PEFT's `vblora` tuner (reimplemented):

    bank V ∈ R^{h×b}  (h = num_vectors, b = vector_length), one for all adapted layers
    sub-vector from logits ℓ ∈ R^h:   (v, idx) = topk(ℓ, k),  w = softmax(v),  u(ℓ) = Σ_{i<k} w_i V[idx_i] ∈ R^b
    A ∈ R^{r×in}:   A[ρ, j·b:(j+1)·b] = u(L_A[ρ, j])          L_A ∈ R^{r × in/b × h}
    B ∈ R^{out×r}:  B[o·b:(o+1)·b, ρ] = u(L_B[o, ρ])          L_B ∈ R^{out/b × r × h}
    Δ(x) = dropout(x) Aᵀ Bᵀ          (no α scaling, as in PEFT)

The top-k is differentiable in the bank and in the k selected logits (softmax); logits outside the top-k get zero
gradient. Each sub-vector lies in the convex hull of at most k bank vectors.

* Init (PEFT's): bank U(−0.02, 0.02), logits N(0, 0.1²). ΔW ≠ 0 at the start (A and B share the bank, so one of
  them cannot simply start at zero as in LoRA).
* `in` and `out` must be multiples of b. PEFT's defaults (h = b = 256) suit 4096-wide LLMs; ours are h = 256,
  b = 16 for toy widths.
* The bank is a `VectorBank` registered once in `adapted.adapter_banks["vector_bank"]`; every layer holds a reference.
* Ledger: trainable = h·b (once) + Σ_layers h · r · (in + out) / b. Stored: the same by default; with
  `save_only_topk_weights=True` (PEFT's option) a layer stores only its top-k indices and weights, 2k numbers per
  sub-vector, r · (in + out) / b sub-vectors: the inference-only form behind the paper's tiny adapter files. Loading
  such a state sets the unselected logits to −inf, which reproduces the adapter (to float rounding) but freezes which
  vectors are picked (PEFT refuses to resume training from it).
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
    BankUsage,
    check_bool,
    check_divisible,
    check_float,
    check_int,
    check_rank_fits,
)
from lablib.ledger import LedgerCounts

__all__ = ["BANK_KEY", "VBLoraConfig", "VBLoraLinear", "VectorBank", "topk_compose"]

BANK_KEY = "vector_bank"


def topk_compose(logits: torch.Tensor, vectors: torch.Tensor, topk: int) -> torch.Tensor:
    """Sub-vectors u(ℓ) = Σ_{i<k} softmax(topk values)_i · V[topk index_i] for logits (..., h) and a bank V (h, b);
    returns (..., b)."""
    # (v, idx) = topk(ℓ, k) : (..., k)
    values, index = logits.topk(topk, dim=-1)
    # w = softmax(v) : (..., k)
    weights = torch.softmax(values, dim=-1)
    # u = Σ_i w_i V[idx_i] : (..., k, b) -> (..., b)
    return (weights.unsqueeze(-1) * vectors[index]).sum(dim=-2)


@dataclass(frozen=True, kw_only=True)
class VBLoraConfig(AdapterConfig):
    """VB-LoRA: `r`=4, `num_vectors` h=256, `vector_length` b=16, `topk` k=2, `save_only_topk_weights`=False,
    `init_vector_bank_bound`=0.02, `init_logits_std`=0.1."""

    kind: ClassVar[str] = "vblora"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 16
    topk: int = 2
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.num_vectors, name="num_vectors")
        check_int(self.vector_length, name="vector_length")
        check_int(self.topk, name="topk")
        if self.topk > self.num_vectors:
            raise ValueError(f"topk={self.topk} must be in [1, num_vectors={self.num_vectors}]")
        check_bool(self.save_only_topk_weights, name="save_only_topk_weights")
        check_float(self.init_vector_bank_bound, name="init_vector_bank_bound", low=0.0, low_open=True)
        check_float(self.init_logits_std, name="init_logits_std", low=0.0, low_open=True)

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        for name, layer in layers.items():
            check_rank_fits(name, layer, self.r)
            check_divisible(name, layer, self.vector_length, what="vector_length")
        first = next(iter(layers.values())).weight
        bank = VectorBank(num_vectors=self.num_vectors, vector_length=self.vector_length,
                          init_bound=self.init_vector_bank_bound, device=first.device, dtype=first.dtype)
        wrappers = {
            name: VBLoraLinear(base_layer=layer, layer_name=name, r=self.r, dropout=self.dropout, bank=bank,
                               topk=self.topk, init_logits_std=self.init_logits_std,
                               save_only_topk_weights=self.save_only_topk_weights)
            for name, layer in layers.items()
        }
        return AdapterBuild(layers=wrappers, banks={BANK_KEY: bank})


class VectorBank(nn.Module):
    """The global vector bank V (num_vectors × vector_length), shared by every VB-LoRA layer; counts itself once."""

    def __init__(self, *, num_vectors: int, vector_length: int, init_bound: float = 0.02,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_vectors, self.vector_length = num_vectors, vector_length
        self.vectors = nn.Parameter(torch.empty(num_vectors, vector_length, device=device, dtype=dtype))
        self.init_bound = init_bound
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """V ~ U(−bound, bound) from torch's global RNG."""
        nn.init.uniform_(self.vectors, -self.init_bound, self.init_bound)

    def ledger_counts(self) -> LedgerCounts:
        """All h·b numbers are parameters, trained and stored; a token passing every layer may read all of them."""
        n = self.vectors.numel()
        return LedgerCounts(total=n, active_per_token=n, stored=n, flops_per_token=0,
                            trainable=n if self.vectors.requires_grad else 0)

    def usage(self, key: str, layers: Mapping[str, VBLoraLinear]) -> list[BankUsage]:
        """Per factor, how often and how strongly each layer picks each bank vector (see `BankUsage`)."""
        out = []
        for factor in ("A", "B"):
            counts, weights, indices = [], [], {}
            for name, layer in layers.items():
                logits = (layer.logits_A if factor == "A" else layer.logits_B).detach()
                values, index = logits.topk(layer.topk, dim=-1)
                w = torch.softmax(values, dim=-1)
                indices[name] = index.cpu()
                counts.append(torch.bincount(index.reshape(-1).cpu(), minlength=self.num_vectors))
                weights.append(torch.zeros(self.num_vectors).index_add_(0, index.reshape(-1).cpu(),
                                                                         w.reshape(-1).float().cpu()))
            out.append(BankUsage(bank=key, factor=factor, layers=list(layers), counts=torch.stack(counts),
                                 weights=torch.stack(weights), indices=indices))
        return out

    def extra_repr(self) -> str:
        return f"num_vectors={self.num_vectors}, vector_length={self.vector_length}"


class VBLoraLinear(AdapterLinear):
    """`base_layer(x) + dropout(x) Aᵀ Bᵀ` with A, B composed from the shared bank by `logits_A`, `logits_B`."""

    kind: ClassVar[str] = "vblora"

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, dropout: float, bank: VectorBank,
                 topk: int, init_logits_std: float = 0.1, save_only_topk_weights: bool = False) -> None:
        super().__init__(base_layer=base_layer, layer_name=layer_name, r=r, scaling=1.0, dropout=dropout)
        self._set_shared(bank)
        self.topk, self.init_logits_std = topk, init_logits_std
        self.save_only_topk_weights = save_only_topk_weights
        b, h = bank.vector_length, bank.num_vectors
        self.vector_length = b
        factory = self._factory()
        self.logits_A = nn.Parameter(torch.empty(r, self.in_features // b, h, **factory))
        self.logits_B = nn.Parameter(torch.empty(self.out_features // b, r, h, **factory))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Logits ~ N(0, std²) from torch's global RNG."""
        nn.init.normal_(self.logits_A, std=self.init_logits_std)
        nn.init.normal_(self.logits_B, std=self.init_logits_std)

    @property
    def bank(self) -> VectorBank:
        return self.shared

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.bank.vectors
        r, b = self.r, self.vector_length
        # A[ρ, j·b:(j+1)·b] = u(L_A[ρ, j]) : (r, in/b, b) -> (r, in)
        a = topk_compose(self.logits_A, vectors, self.topk).reshape(r, self.in_features)
        # B[o·b:(o+1)·b, ρ] = u(L_B[o, ρ]) : (out/b, r, b) -> (out/b, b, r) -> (out, r)
        b_sub = topk_compose(self.logits_B, vectors, self.topk)
        b_mat = b_sub.permute(0, 2, 1).reshape(self.out_features, r)
        return a, b_mat

    @property
    def num_subvectors(self) -> int:
        """Sub-vectors composed per forward: r · (in + out) / b."""
        return self.r * (self.in_features + self.out_features) // self.vector_length

    def stored_numbers(self) -> int:
        if self.save_only_topk_weights:
            # k indices + k weights per sub-vector
            return 2 * self.topk * self.num_subvectors
        return super().stored_numbers()

    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(prefix)
        if not self.save_only_topk_weights:
            return state
        for factor in ("A", "B"):
            logits = state.pop(f"{prefix}logits_{factor}")
            values, index = logits.topk(self.topk, dim=-1)
            state[f"{prefix}logits_{factor}.topk_indices"] = index
            state[f"{prefix}logits_{factor}.topk_weights"] = torch.softmax(values, dim=-1)
        return state

    def import_state(self, prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(super().import_state(prefix, state))
        if not self.save_only_topk_weights:
            return out
        for factor in ("A", "B"):
            index = out.pop(f"{prefix}logits_{factor}.topk_indices")
            weights = out.pop(f"{prefix}logits_{factor}.topk_weights")
            current = getattr(self, f"logits_{factor}")
            # ℓ = −inf except ℓ[idx_i] = log w_i: topk picks idx again and softmax(log w) = w (Σ w = 1)
            logits = torch.full(current.shape, -math.inf, dtype=current.dtype)
            logits.scatter_(-1, index.to(torch.int64).cpu(),
                            torch.log(weights.float().clamp_min(torch.finfo(torch.float32).tiny)).to(current.dtype).cpu())
            out[f"{prefix}logits_{factor}"] = logits
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vector_length={self.vector_length}, topk={self.topk}"
