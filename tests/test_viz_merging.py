"""lablib.viz.merging: each figure checked on its data."""

from __future__ import annotations

import pytest
import torch

from lablib.viz import merging as vm


def test_sign_conflicts_hand_worked():
    a = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])
    assert vm.sign_conflicts([a, b]).tolist() == [[0.0, 1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="at least two"):
        vm.sign_conflicts([a])
    with pytest.raises(ValueError, match="shape"):
        vm.sign_conflicts([a, torch.zeros(3)])


def test_sign_conflict_figure():
    tvs = [{"w": torch.tensor([[1.0, -1.0]])}, {"w": torch.tensor([[1.0, 1.0]])}]
    fig = vm.sign_conflict_figure(tvs, key="w")
    assert fig.data[0].z == ((0.0, 1.0),) or list(map(list, fig.data[0].z)) == [[0.0, 1.0]]
    assert "50%" in fig.layout.title.text
    with pytest.raises(ValueError, match="no key"):
        vm.sign_conflict_figure(tvs, key="nope")


def test_magnitude_histograms_leave_out_zeros():
    tvs = [{"w": torch.tensor([0.0, 0.1, 10.0])}, {"w": torch.tensor([1.0])}]
    fig = vm.magnitude_histogram_figure(tvs, names=["a", "b"])
    assert [round(v, 6) for v in fig.data[0].x] == [-1.0, 1.0]
    assert [tr.name for tr in fig.data] == ["a", "b"]
    with pytest.raises(ValueError, match="names"):
        vm.magnitude_histogram_figure(tvs, names=["a"])


def test_method_bars():
    fig = vm.method_bars_figure({"ties": [0.5, 1.0], "linear": [0.2, 0.4]}, task_names=["t0", "t1"])
    assert list(fig.data[0].y) == [0.5, 0.2] and list(fig.data[1].y) == [1.0, 0.4]
    assert list(fig.data[2].y) == pytest.approx([0.75, 0.3])
    with pytest.raises(ValueError, match="tasks"):
        vm.method_bars_figure({"ties": [0.5]}, task_names=["t0", "t1"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vm.method_bars_figure({"ties": [1.5, 0.1]}, task_names=["t0", "t1"])


def test_dare_and_interpolation():
    fig = vm.dare_curve_figure({"drop_rates": [0, 0.9], "dare": [0.9, 0.8], "darex_q": [0.9, 0.85]})
    assert list(fig.data[1].y) == [0.9, 0.85]
    with pytest.raises(ValueError, match="drop rates"):
        vm.dare_curve_figure({"drop_rates": [0], "dare": [0.9, 0.8], "darex_q": [0.9]})
    curves = {"alphas": [0, 0.5, 1], "naive": [1, 3, 1], "aligned": [1, 1.2, 1], "barrier_naive": 2.0,
              "barrier_aligned": 0.2}
    fig = vm.interpolation_figure(curves, alpha=0.5)
    assert list(fig.data[0].y) == [1, 3, 1] and "2.00 naive" in fig.layout.title.text
    with pytest.raises(ValueError, match="finite"):
        vm.interpolation_figure(dict(curves, naive=[1, float("nan"), 1]))
