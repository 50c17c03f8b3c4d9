"""Randomized parameter sharing (RPS): every weight of a model read from one small shared array by a hash.

    w_i = r_{t(i)} · s_i · φ[h(i)]        φ ∈ R^M the only stored weights, M = compression · (virtual weights)

HashedNets (Chen et al. 2015) hash single weights, ROAST (Desai et al. 2022) hashes chunks of them into one global
memory; Desai & Shrivastava, *In defense of parameter sharing for model-compression* (ICLR 2024), compare RPS with
pruning and with smaller models at equal memory, and name two ROAST problems their STABLE-RPS fixes: *stability*
(sensitivity to the initialisation scale, often divergence) and *Pareto-continuity* (ROAST cannot recover the
uncompressed model at compression 1). `RandomizedSharing` wraps any `nn.Module` (a copy; yours is not modified):

* **Mapping.** `mapping="randomfold"` (STABLE-RPS, our reading of RANDOMFOLD): flatten all shared tensors into one
  virtual array of n entries, cut it into partitions of M, and send each partition to memory through its own random
  permutation: h(i) = π_{⌊i/M⌋}(i mod M). Every memory slot then holds ⌈n/M⌉ or ⌊n/M⌋ weights (the optimal load
  factor), and at compression 1 the mapping is a bijection: the model *is* a dense model, reparametrised.
  `mapping="roast"`: each chunk of `chunk_size` consecutive weights of a tensor starts at an independent uniform
  random slot, h(i) = (u_chunk + offset) mod M; loads are uneven and compression 1 still collides.
* **Signs** s_i = ±1 at random (a weight's collisions then do not bias it), both mappings.
* **Scales and the gradient fix.** r_t = λ_t / λ̄, where λ_t is tensor t's initial standard deviation and λ̄ their
  mean; φ ~ N(0, λ̄²), so every virtual weight starts at its own layer's scale (ROAST's per-module scale). With
  `gradient_scaling=True` (STABLE-RPS, our reading of its gradient scaling) the gradient that tensor t sends to φ is
  divided by r_t², so one SGD step changes each virtual weight by what a dense step would whatever the
  initialisation scale; the forward is unchanged. Implemented as `r·g.detach() + (g − g.detach())/r`.
* **Counting.** `ledger_counts`: stored = total = M + the parameters left unshared (by default biases and norms;
  only tensors with ≥ 2 dims are shared); the hash is regenerated from `seed`, so it is not stored. FLOPs are the
  dense model's: RPS saves memory, not compute.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.func import functional_call

from lablib.ledger import LedgerCounts, ledger

__all__ = ["MAPPINGS", "RandomizedSharing", "check_compression", "memory_size_for"]

MAPPINGS = ("randomfold", "roast")


def check_compression(compression: Any) -> float:
    """The stored fraction M / n must lie in (0, 1] (1 = no compression)."""
    if (isinstance(compression, bool) or not isinstance(compression, (int, float)) or not math.isfinite(compression)
            or not 0 < compression <= 1):
        raise ValueError(f"compression (stored / virtual weights) must be in (0, 1], got {compression!r}")
    return float(compression)


def memory_size_for(num_virtual: int, compression: float) -> int:
    """M = round(compression · n), at least 1."""
    return max(1, round(check_compression(compression) * num_virtual))


class RandomizedSharing(nn.Module):
    """`model` with its shared tensors read from one array `memory` (see the module docstring).

    Keyword-only: `compression` in (0, 1] or `memory_size` (exactly one); `names`: the parameters to share (default:
    every parameter with ≥ 2 dims); `mapping`: "randomfold" or "roast"; `chunk_size` (roast only);
    `gradient_scaling`; `seed` for the hash, the signs and φ's initialisation.
    """

    def __init__(self, model: nn.Module, *, compression: float | None = None, memory_size: int | None = None,
                 names: Iterable[str] | None = None, mapping: str = "randomfold", chunk_size: int = 1,
                 gradient_scaling: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"RandomizedSharing wraps an nn.Module, got {type(model).__name__}")
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {mapping!r}; choose one of {list(MAPPINGS)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if mapping == "randomfold" and chunk_size != 1:
            raise ValueError("chunk_size only applies to mapping='roast'")
        if not isinstance(gradient_scaling, bool):
            raise ValueError(f"gradient_scaling must be a bool, got {gradient_scaling!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        template = copy.deepcopy(model)
        params = dict(template.named_parameters())
        chosen = [n for n, p in params.items() if p.dim() >= 2] if names is None else list(names)
        unknown = [n for n in chosen if n not in params]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {sorted(params)}")
        if not chosen:
            raise ValueError("nothing to share: the model has no parameter with >= 2 dims (pass names=...)")
        self.shared_names = chosen
        self.shapes = {n: tuple(params[n].shape) for n in chosen}
        self.num_virtual = sum(params[n].numel() for n in chosen)
        if (compression is None) == (memory_size is None):
            raise ValueError("pass exactly one of compression= (in (0, 1]) and memory_size=")
        if memory_size is None:
            size = memory_size_for(self.num_virtual, compression)
        else:
            if isinstance(memory_size, bool) or not isinstance(memory_size, int) or not 1 <= memory_size <= self.num_virtual:
                raise ValueError(f"memory_size must be an int in [1, {self.num_virtual}] (the virtual weights), got "
                                 f"{memory_size!r}")
            size = memory_size
        self.compression = size / self.num_virtual
        self.mapping, self.chunk_size, self.gradient_scaling, self.seed = mapping, chunk_size, gradient_scaling, seed
        self._dense_flops = ledger(template).flops_per_token
        # per-tensor init std λ_t and relative scale r_t = λ_t / λ̄
        stds = [float(params[n].detach().float().std()) if params[n].numel() > 1 else 1.0 for n in chosen]
        stds = [s if s > 0 else 1.0 for s in stds]
        mean_std = sum(stds) / len(stds)
        self.scales = {n: s / mean_std for n, s in zip(chosen, stds)}
        # the shared tensors leave the template: empty non-persistent placeholders keep the attribute names
        for n in chosen:
            module_name, _, attr = n.rpartition(".")
            module = template.get_submodule(module_name)
            del module._parameters[attr]
            module.register_buffer(attr, torch.empty(0), persistent=False)
        self.model = template

        g = torch.Generator().manual_seed(seed)
        index = self._make_index(size, g)
        sign = torch.randint(0, 2, (self.num_virtual,), generator=g).mul_(2).sub_(1).to(torch.float32)
        # hash and signs are regenerated from the seed: non-persistent, not stored
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        # φ ~ N(0, λ̄²)
        self.memory = nn.Parameter(torch.randn(size, generator=g) * mean_std)

    def _make_index(self, size: int, g: torch.Generator) -> torch.Tensor:
        n = self.num_virtual
        if self.mapping == "randomfold":
            parts = []
            for start in range(0, n, size):
                length = min(size, n - start)
                # partition p goes to memory through its own random permutation π_p
                parts.append(torch.randperm(size, generator=g)[:length])
            return torch.cat(parts)
        # roast: every chunk of chunk_size weights of a tensor starts at a uniform random slot
        parts = []
        for name in self.shared_names:
            numel = math.prod(self.shapes[name])
            offsets = torch.arange(numel)
            chunk = offsets // self.chunk_size
            starts = torch.randint(0, size, (int(chunk.max()) + 1,), generator=g)
            parts.append((starts[chunk] + offsets % self.chunk_size) % size)
        return torch.cat(parts)

    @property
    def memory_size(self) -> int:
        return self.memory.numel()

    def virtual_weights(self) -> dict[str, torch.Tensor]:
        """The full weights the wrapped model computes with, by name (differentiable in `memory`)."""
        # g_i = s_i φ[h(i)] : (n,)
        gathered = self.memory[self.index] * self.sign.to(self.memory.dtype)
        out, start = {}, 0
        for name in self.shared_names:
            numel = math.prod(self.shapes[name])
            g, r = gathered[start:start + numel], self.scales[name]
            start += numel
            if self.gradient_scaling:
                # forward r·g, backward (1/r)·∂L/∂w: an SGD step moves w as a dense step would
                w = r * g.detach() + (g - g.detach()) / r
            else:
                # w_i = r_t s_i φ[h(i)]
                w = r * g
            out[name] = w.view(self.shapes[name])
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.virtual_weights(), args, kwargs)

    def load_per_slot(self) -> torch.Tensor:
        """(M,) how many virtual weights share each memory slot (collisions + 1)."""
        return torch.bincount(self.index, minlength=self.memory_size)

    def ledger_counts(self) -> LedgerCounts:
        own = {id(p): p for p in self.parameters()}.values()
        total = sum(p.numel() for p in own)
        buffers = sum(b.numel() for name, b in self.model.named_buffers()
                      if name.rpartition(".")[2] not in self.model.get_submodule(name.rpartition(".")[0])
                      ._non_persistent_buffers_set)
        return LedgerCounts(total=total, active_per_token=total, stored=total + buffers,
                            flops_per_token=self._dense_flops)

    def extra_repr(self) -> str:
        return (f"memory_size={self.memory_size}, virtual={self.num_virtual}, compression={self.compression:.4g}, "
                f"mapping={self.mapping!r}, gradient_scaling={self.gradient_scaling}")
