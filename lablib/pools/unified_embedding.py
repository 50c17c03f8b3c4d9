"""Unified Embedding: several categorical features multiplexed into one shared embedding table.

    e_f(v) = T[h_f(v)],   h_f(v) = ((a_f · v + b_f) mod p) mod R,   one table T ∈ R^{R × d} for every feature f

Coleman et al., *Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems* (NeurIPS 2023):
"feature multiplexing" puts all features in one representation space instead of one table per feature; the model
still tells features apart because each feature's values land on its own pseudo-random rows, and the shared rows are
used where the data needs them. The abstract gives no hash, so we use a seeded universal hash per feature (Carter &
Wegman), p = 2³¹ − 1: deterministic from the seed, nothing stored besides the table.

* `UnifiedEmbedding`: one table of `num_rows` rows for all features (`multiplexed=True`), or the baseline with the same
  total rows split evenly into one hashed table per feature (`multiplexed=False`). Output (B, F · d_embed).
* `make_click_data`: a synthetic click-prediction task with known feature cardinalities (Zipf-distributed values,
  a logistic model with per-value biases and pairwise interactions), generated from a seed.
* `ClickModel`: embeddings -> an MLP -> one logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["HASH_PRIME", "hash_rows", "UnifiedEmbedding", "ClickData", "make_click_data", "ClickModel"]

HASH_PRIME = 2**31 - 1


def _check_cardinalities(cardinalities: Sequence[int]) -> list[int]:
    cards = list(cardinalities)
    if not cards or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cards):
        raise ValueError(f"cardinalities must be a non-empty list of positive ints, got {cardinalities!r}")
    return cards


def hash_rows(values: torch.Tensor, *, a: int, b: int, num_rows: int) -> torch.Tensor:
    """((a · v + b) mod p) mod num_rows for int64 values v ≥ 0 (no overflow: a, b, v < p < 2³¹)."""
    # h(v) = ((a v + b) mod p) mod R
    return ((values * a + b) % HASH_PRIME) % num_rows


class UnifiedEmbedding(nn.Module):
    """Embeddings for F categorical features from one shared table (or one table per feature, the baseline).

    Keyword-only: `cardinalities` (values of feature f are in [0, cardinalities[f])), `num_rows` (total rows over all
    tables), `d_embed`, `multiplexed`, `seed` (the hash coefficients a_f ∈ [1, p), b_f ∈ [0, p)).
    Forward: values (B, F) int64 -> (B, F · d_embed), feature f's embedding in columns [f·d, (f+1)·d).
    """

    def __init__(self, *, cardinalities: Sequence[int], num_rows: int, d_embed: int, multiplexed: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.cardinalities = _check_cardinalities(cardinalities)
        num_features = len(self.cardinalities)
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < num_features:
            raise ValueError(f"num_rows must be an int >= the number of features ({num_features}), got {num_rows!r}")
        if isinstance(d_embed, bool) or not isinstance(d_embed, int) or d_embed < 1:
            raise ValueError(f"d_embed must be a positive int, got {d_embed!r}")
        self.num_rows, self.d_embed, self.multiplexed, self.seed = num_rows, d_embed, bool(multiplexed), seed
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(1, HASH_PRIME, (num_features,), generator=g)
        b = torch.randint(0, HASH_PRIME, (num_features,), generator=g)
        self.hash_a, self.hash_b = a.tolist(), b.tolist()
        if multiplexed:
            # every feature hashes into all R rows of the one table
            self.rows_per_feature = [num_rows] * num_features
            self.row_offset = [0] * num_features
        else:
            # the same R rows split evenly: feature f owns rows [offset_f, offset_f + R_f)
            base, extra = divmod(num_rows, num_features)
            self.rows_per_feature = [base + (f < extra) for f in range(num_features)]
            self.row_offset = [sum(self.rows_per_feature[:f]) for f in range(num_features)]
        self.table = nn.Embedding(num_rows, d_embed)
        nn.init.normal_(self.table.weight, std=d_embed ** -0.5)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """(B, F) the table row each (feature, value) reads."""
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != len(self.cardinalities):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values must have shape (batch, {len(self.cardinalities)}), got {got}")
        if values.dtype != torch.long:
            raise TypeError(f"values must be int64 category ids, got {values.dtype}")
        cards = torch.tensor(self.cardinalities, device=values.device)
        if values.numel() and (bool((values < 0).any()) or bool((values >= cards).any())):
            raise ValueError(f"values of feature f must lie in [0, cardinalities[f]) = {self.cardinalities}")
        cols = [hash_rows(values[:, f], a=self.hash_a[f], b=self.hash_b[f], num_rows=self.rows_per_feature[f])
                + self.row_offset[f] for f in range(values.shape[1])]
        return torch.stack(cols, dim=1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # (B, F) -> (B, F, d) -> (B, F d)
        return self.table(self.rows(values)).flatten(1)

    def collision_rate(self) -> float:
        """Fraction of all (feature, value) pairs that share their row with another pair."""
        rows = []
        for f, card in enumerate(self.cardinalities):
            v = torch.arange(card)
            rows.append(hash_rows(v, a=self.hash_a[f], b=self.hash_b[f], num_rows=self.rows_per_feature[f])
                        + self.row_offset[f])
        counts = torch.bincount(torch.cat(rows), minlength=self.num_rows)
        all_rows = torch.cat(rows)
        return float((counts[all_rows] > 1).float().mean())

    def extra_repr(self) -> str:
        return (f"features={len(self.cardinalities)}, num_rows={self.num_rows}, d_embed={self.d_embed}, "
                f"multiplexed={self.multiplexed}")


@dataclass
class ClickData:
    """Synthetic click logs: `x_*` (n, F) int64 category ids, `y_*` (n,) float 0/1 labels, and the ground truth's
    Bayes log loss on the validation split (`bayes_val_loss`, the best any model can do)."""

    cardinalities: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    bayes_val_loss: float


def make_click_data(*, cardinalities: Sequence[int] = (1000, 500, 100, 20, 5), n_train: int = 20_000,
                    n_val: int = 5_000, d_latent: int = 4, zipf: float = 1.1, seed: int = 0) -> ClickData:
    """Clicks from a known logistic model: logit = Σ_f β_f[v_f] + Σ_{f<g} ⟨u_f[v_f], u_g[v_g]⟩ / √d_latent − 1.

    Value v of feature f is drawn with probability ∝ (rank + 1)^(−zipf) (a few frequent values, a long tail).
    """
    cards = _check_cardinalities(cardinalities)
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    cols, logit = [], torch.full((n,), -1.0)
    latents = []
    for card in cards:
        weights = (torch.arange(card, dtype=torch.float64) + 1) ** (-zipf)
        v = torch.multinomial(weights, n, replacement=True, generator=g)
        beta = torch.randn(card, generator=g) * 0.5
        u = torch.randn(card, d_latent, generator=g)
        cols.append(v)
        logit = logit + beta[v]
        latents.append(u[v])
    for f in range(len(cards)):
        for h in range(f + 1, len(cards)):
            logit = logit + (latents[f] * latents[h]).sum(dim=1) / d_latent ** 0.5
    p = torch.sigmoid(logit)
    y = torch.bernoulli(p, generator=g)
    x = torch.stack(cols, dim=1)
    pv, yv = p[n_train:].clamp(1e-7, 1 - 1e-7), y[n_train:]
    bayes = float(-(yv * pv.log() + (1 - yv) * (1 - pv).log()).mean())
    return ClickData(cardinalities=cards, x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:],
                     y_val=y[n_train:], bayes_val_loss=bayes)


class ClickModel(nn.Module):
    """`UnifiedEmbedding` -> Linear(F·d, hidden) -> ReLU -> Linear(hidden, 1): one click logit per row (B,)."""

    def __init__(self, *, embedding: UnifiedEmbedding, hidden: int = 32) -> None:
        super().__init__()
        self.embedding = embedding
        width = len(embedding.cardinalities) * embedding.d_embed
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(values)).squeeze(-1)
