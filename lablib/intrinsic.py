"""Training in a random subspace: the intrinsic dimension of an objective landscape.

Li, Farkhoor, Liu, Yosinski, *Measuring the Intrinsic Dimension of Objective Landscapes* (ICLR 2018).

Instead of training all `D` parameters of a network, freeze a random initialisation `θ0` and a random projection
`P` (D x d), and train only `θ_d` in R^d:

    θ = θ0 + P θ_d,        θ_d initialised to 0, so training starts exactly at θ0.

Sweeping `d` and noting where a solution first appears gives the *intrinsic dimension*; the paper operationalises
"a solution" as reaching 90 % of the accuracy of ordinary training (`d_int90`).

Two projections are offered:

* `"dense"`: N(0, 1) entries, each of the d basis vectors then scaled to unit L2 norm **over the whole model**
  (normalising per layer would change the geometry, a pitfall the reference code avoids).
* `"fastfood"`: the structured Fastfood transform `H G Π H B` (O(L log L) time, O(L) memory), used by the paper
  for large models; scaled so that its basis vectors have (close to) unit norm as well.

`SubspaceModel` wraps any `nn.Module` without touching it: the module is deep-copied, its parameters become frozen
buffers (`θ0`), and the forward pass calls the copy with `θ0 + P θ_d` through `torch.func.functional_call`.
"""

from __future__ import annotations

import copy
import math
import torch
from torch import nn
from torch.func import functional_call

from lablib.ledger import LedgerCounts

PROJECTIONS = ("dense", "fastfood")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dimension (length a power of two).

    Returns `x @ H` with `H` the Sylvester Hadamard matrix (entries ±1, `H Hᵀ = L I`); `x` is not modified.
    """
    length = x.shape[-1]
    if length == 0 or length & (length - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    y = x.clone()
    h = 1
    while h < length:
        # butterfly: (a, b) -> (a + b, a - b) on pairs h apart
        y = y.reshape(*x.shape[:-1], length // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*x.shape[:-1], length)
        h *= 2
    return y


class DenseProjection(nn.Module):
    """`P θ_d` with P a dense Gaussian D x d matrix whose columns have unit norm over the whole model."""

    def __init__(self, *, full_dim: int, dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(full_dim, dim, generator=gen)
        # each basis vector (column) scaled to unit L2 norm across all layers jointly
        matrix = matrix / matrix.norm(dim=0, keepdim=True)
        # regenerated from the seed, so not part of what a checkpoint must store
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        # (D, d) @ (d,) -> (D,)
        return self.matrix @ theta_d


class FastfoodProjection(nn.Module):
    """`P θ_d` with the Fastfood transform `P = c · [H G Π H B]_{:D}` (Le, Sarlós, Smola 2013).

    θ_d is zero-padded to L = 2^⌈log2 max(D, d)⌉; B ∈ {±1}^L, Π a random permutation, G ~ N(0, 1)^L, H the
    unnormalised Hadamard matrix. Every column of `H G Π H B` has norm √(L ΣG²); keeping the first D rows leaves
    about D/L of its squared norm, so `c = 1 / (√(L ΣG²) · √(D/L))` gives (close to) unit-norm basis vectors.
    """

    def __init__(self, *, full_dim: int, dim: int, seed: int) -> None:
        super().__init__()
        self.full_dim, self.dim = full_dim, dim
        self.length = 1 << max(0, math.ceil(math.log2(max(full_dim, dim))))
        gen = torch.Generator().manual_seed(seed)
        length = self.length
        signs = torch.randint(0, 2, (length,), generator=gen).float() * 2 - 1
        perm = torch.randperm(length, generator=gen)
        gauss = torch.randn(length, generator=gen)
        # c = 1 / (sqrt(L * sum G^2) * sqrt(D / L))
        scale = 1.0 / (math.sqrt(length * float(gauss.pow(2).sum())) * math.sqrt(full_dim / length))
        for name, value in (("signs", signs), ("perm", perm), ("gauss", gauss)):
            self.register_buffer(name, value, persistent=False)
        self.scale = scale

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        # (d,) -> (L,) zero-padded
        x = torch.nn.functional.pad(theta_d, (0, self.length - self.dim))
        # H G Π H B x, applied right to left; fwht computes x @ H = H x (H is symmetric)
        x = fwht(self.signs * x)
        x = self.gauss * x[self.perm]
        x = fwht(x)
        # keep the first D coordinates, scaled to unit-norm basis vectors
        return self.scale * x[: self.full_dim]


class SubspaceModel(nn.Module):
    """Train `module` only inside a random d-dimensional subspace around its initialisation: θ = θ0 + P θ_d.

    Arguments:
    * `module`: any torch module; it is deep-copied, never modified. Its current parameters become θ0.
    * `dim`: the subspace dimension d (1 <= d <= D, the module's parameter count).
    * `projection`: `"dense"` or `"fastfood"` (see the module docstring).
    * `seed`: seeds the projection, so P is regenerated, not stored.

    The only trainable tensor is `theta_d` (d,), initialised to zero.
    """

    def __init__(self, module: nn.Module, *, dim: int, projection: str = "dense", seed: int = 0) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; choose one of {PROJECTIONS}")
        base = copy.deepcopy(module)
        named = [(name, p) for name, p in base.named_parameters()]
        if not named:
            raise ValueError("module has no parameters to project into a subspace")
        full_dim = sum(p.numel() for _, p in named)
        if not isinstance(dim, int) or not 1 <= dim <= full_dim:
            raise ValueError(f"dim must be an int in [1, {full_dim}] (the module's parameter count), got {dim!r}")
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.full_dim, self.dim, self.projection_name, self.seed = full_dim, dim, projection, seed
        # θ0: the frozen starting point, flattened in named_parameters order
        theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.register_buffer("theta0", theta0)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        cls = DenseProjection if projection == "dense" else FastfoodProjection
        self.project = cls(full_dim=full_dim, dim=dim, seed=seed)
        self.theta_d = nn.Parameter(torch.zeros(dim))

    def flat_parameters(self) -> torch.Tensor:
        """θ = θ0 + P θ_d, flattened (D,)."""
        # θ = θ0 + P θ_d
        return self.theta0 + self.project(self.theta_d)

    def parameters_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped module's parameters at the current θ_d, by name (differentiable w.r.t. θ_d)."""
        flat = self.flat_parameters()
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = flat[start : start + n].view(shape)
            start += n
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.parameters_dict(), args, kwargs)

    def materialize(self) -> nn.Module:
        """A plain, trainable copy of the wrapped module with θ0 + P θ_d written into its parameters."""
        module = copy.deepcopy(self.base)
        with torch.no_grad():
            for name, value in self.parameters_dict().items():
                module.get_parameter(name).copy_(value)
        for p in module.parameters():
            p.requires_grad_(True)
        return module

    def ledger_counts(self) -> LedgerCounts:
        """Total = D (the network still has D weights); trainable and stored = d (θ0 and P come from seeds)."""
        weights = sum(s.numel() for s in self.shapes if len(s) >= 2)
        return LedgerCounts(
            total=self.full_dim,
            active_per_token=self.full_dim,
            stored=self.dim,
            trainable=self.dim,
            flops_per_token=2 * weights,
        )

    def extra_repr(self) -> str:
        return f"D={self.full_dim}, d={self.dim}, projection={self.projection_name!r}, seed={self.seed}"
