"""lablib.viz, lab 01's figures: routing heatmap, expert load, capacity and seed spread, checked on their data."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from lablib.viz import moe as viz


def test_routing_heatmap_rows_columns_and_percent_labels():
    fig = viz.routing_heatmap_figure({"shakespeare": [0.5, 0.25, 0.25], "python": torch.tensor([0.1, 0.1, 0.8])})
    (trace,) = fig.data
    assert trace.type == "heatmap"
    assert list(trace.y) == ["shakespeare", "python"] and list(trace.x) == ["expert 0", "expert 1", "expert 2"]
    assert [list(r) for r in trace.z] == [[0.5, 0.25, 0.25], [pytest.approx(0.1), pytest.approx(0.1),
                                                                pytest.approx(0.8)]]
    assert trace.texttemplate == "%{z:.0%}" and trace.zmin == 0.0 and trace.zmax == pytest.approx(0.8)
    assert viz.routing_heatmap_figure({"a": [1.0, 0.0]}, zmax=0.5).data[0].zmax == 0.5
    pio.to_json(fig)


def test_routing_heatmap_rejects_bad_shares():
    with pytest.raises(ValueError, match="same length"):
        viz.routing_heatmap_figure({"a": [0.5, 0.5], "b": [1.0]})
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]; row 'b'"):
        viz.routing_heatmap_figure({"a": [0.5, 0.5], "b": [1.5, -0.5]})
    with pytest.raises(ValueError, match="non-empty"):
        viz.routing_heatmap_figure({})
    with pytest.raises(ValueError, match="expert_labels has 1 labels"):
        viz.routing_heatmap_figure({"a": [0.5, 0.5]}, expert_labels=["x"])


def test_expert_load_figure_lines_reference_and_ideal_line():
    fig = viz.expert_load_figure({"layer 0": ([0, 10], [3.0, 1.2])}, reference={"none, layer 0": ([0, 10], [3.0, 4.0])})
    assert [t.name for t in fig.data] == ["layer 0", "none, layer 0"]
    assert fig.data[1].line.dash == "dot" and list(fig.data[1].y) == [3.0, 4.0]
    assert any(shape.y0 == 1.0 and shape.y1 == 1.0 for shape in fig.layout.shapes)
    assert fig.layout.xaxis.title.text == "training step"
    with pytest.raises(ValueError, match="series 'a' has 2 x values but 1 y values"):
        viz.expert_load_figure({"a": ([0, 1], [1.0])})


def test_capacity_figure_splits_kept_and_dropped_at_the_capacity():
    fig = viz.capacity_figure({"layer 0": ([0.5, 1.0, 2.0], [0.4, 0.1, 0.0])}, [5, 1, 3], capacity=3,
                              selected_cf=1.0)
    names = [t.name for t in fig.data]
    assert names == ["layer 0", "kept", "dropped"]
    kept, dropped = fig.data[1], fig.data[2]
    assert list(kept.y) == [3, 1, 3] and list(dropped.y) == [2, 0, 0]
    assert fig.layout.barmode == "stack"
    assert any(s.type == "line" and s.x0 == 1.0 for s in fig.layout.shapes)  # the selected capacity factor
    assert any(s.type == "line" and s.y0 == 3 for s in fig.layout.shapes)  # the capacity
    pio.to_json(fig)


@pytest.mark.parametrize(
    "dropped, load, capacity, match",
    [
        ({}, [1], 1, "non-empty mapping"),
        ({"a": ([1.0], [0.0])}, [], 1, "one count per expert"),
        ({"a": ([1.0], [0.0])}, [-1, 2], 1, "non-negative"),
        ({"a": ([1.0], [0.0])}, [1, 2], 0, "capacity must be an int >= 1"),
    ],
)
def test_capacity_figure_rejects_bad_input(dropped, load, capacity, match):
    with pytest.raises(ValueError, match=match):
        viz.capacity_figure(dropped, load, capacity=capacity, selected_cf=1.0)


def test_seed_spread_figure_mean_bars_error_bars_and_dots():
    fig = viz.seed_spread_figure({"linear": [2.0, 2.2, 2.1], "hash": [1.9]}, title="loss")
    bars, dots = fig.data
    assert isinstance(bars, go.Bar) and list(bars.x) == ["linear", "hash"]
    assert list(bars.y) == [pytest.approx(2.1), pytest.approx(1.9)]
    assert list(bars.error_y.array) == [pytest.approx(0.1), 0.0]
    assert list(bars.error_y.arrayminus) == [pytest.approx(0.1), 0.0]
    assert list(dots.x) == ["linear"] * 3 + ["hash"] and list(dots.y) == [2.0, 2.2, 2.1, 1.9]
    low, high = fig.layout.yaxis.range
    assert low < 1.9 and high > 2.2
    with pytest.raises(ValueError, match="variant 'a' has no values"):
        viz.seed_spread_figure({"a": []})
    with pytest.raises(ValueError, match="non-empty"):
        viz.seed_spread_figure({})


def test_new_figures_are_exported():
    for name in ("routing_heatmap_figure", "expert_load_figure", "capacity_figure", "seed_spread_figure"):
        assert name in viz.__all__ and callable(getattr(viz, name))
