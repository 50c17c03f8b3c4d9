"""What the labs' seeded sweeps share: `one_thread` for repeatable runs, and a result holding one validation loss per
variant and seed.

`SeededLosses` is a mixin for a dataclass with `seeds: list[int]` and `val_loss: {variant: {str(seed): loss}}`
(string keys, so the result round-trips through JSON unchanged): it adds the per-variant summaries the verdicts and
tables use, and the dict round trip the recorded sweeps are written and read with.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Mapping

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread (restored afterwards, even on error): float sums then repeat bit for bit between a
    recorded sweep and a lab's live rerun whatever the machine's thread count, and two threads cannot spin against
    each other on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SeededLosses:
    """Mixin: `values`, `mean`, `seed_range` of one variant over `self.seeds`; `to_dict` / `from_dict`."""

    seeds: list[int]
    val_loss: dict[str, dict[str, float]]

    def values(self, variant: str) -> list[float]:
        """The variant's loss at every seed, in `seeds` order (KeyError names a missing variant or seed)."""
        if variant not in self.val_loss:
            raise KeyError(f"no variant {variant!r}; known: {sorted(self.val_loss)}")
        missing = [s for s in self.seeds if str(s) not in self.val_loss[variant]]
        if missing:
            raise KeyError(f"variant {variant!r} has no loss for seeds {missing}")
        return [self.val_loss[variant][str(s)] for s in self.seeds]

    def mean(self, variant: str) -> float:
        return statistics.fmean(self.values(variant))

    def seed_range(self, variant: str) -> float:
        """max - min over the seeds: the spread the verdicts compare effects with."""
        values = self.values(variant)
        return max(values) - min(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # the subclass is a dataclass

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]):
        return cls(**raw)
