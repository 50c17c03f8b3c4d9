"""lablib.experiments.seeded: the per-seed loss summaries every recorded sweep shares, on hand-worked numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lablib.experiments.seeded import SeededLosses


@dataclass
class Toy(SeededLosses):
    seeds: list[int]
    val_loss: dict[str, dict[str, float]]
    config: dict = field(default_factory=dict)


def test_values_follow_the_seed_order_and_summaries_are_hand_worked():
    toy = Toy(seeds=[2, 0], val_loss={"a": {"0": 1.0, "2": 1.5}, "b": {"0": 2.0, "2": 2.0}})
    assert toy.values("a") == [1.5, 1.0]  # seeds order, not key order
    assert toy.mean("a") == pytest.approx(1.25) and toy.seed_range("a") == pytest.approx(0.5)
    assert toy.seed_range("b") == 0.0


def test_round_trip_and_missing_entries_are_named():
    toy = Toy(seeds=[0, 1], val_loss={"a": {"0": 1.0}}, config={"steps": 3})
    assert Toy.from_dict(toy.to_dict()) == toy
    with pytest.raises(KeyError, match="no variant 'z'"):
        toy.values("z")
    with pytest.raises(KeyError, match=r"'a' has no loss for seeds \[1\]"):
        toy.mean("a")


def test_one_thread_sets_one_and_restores_even_on_error():
    import torch

    from lablib.experiments.seeded import one_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
