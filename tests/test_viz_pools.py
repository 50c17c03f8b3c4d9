"""lablib.viz.pools: figures carry exactly their data; bad data raises."""

import pytest

from lablib.viz import pools as vp


def test_pool_size_figure_data_and_error_bars():
    pts = {"UniPool": {"params": [10, 20], "mean": [2.0, 1.9], "low": [1.9, 1.85], "high": [2.1, 1.95],
                       "pool_size": [2, 4]},
           "per-layer": {"params": [40], "mean": [1.92], "low": [1.9], "high": [1.93]}}
    fig = vp.pool_size_figure(pts, selected_params=20)
    assert [t.name for t in fig.data] == ["UniPool", "per-layer"]
    assert list(fig.data[0].y) == [2.0, 1.9]
    assert list(fig.data[0].error_y.array) == pytest.approx([0.1, 0.05])
    assert list(fig.data[0].error_y.arrayminus) == pytest.approx([0.1, 0.05])
    assert fig.data[1].marker.symbol == "star"
    with pytest.raises(ValueError, match="lacks"):
        vp.pool_size_figure({"a": {"params": [1]}})
    with pytest.raises(ValueError, match="equal"):
        vp.pool_size_figure({"a": {"params": [1, 2], "mean": [1], "low": [1], "high": [1]}})


def test_pool_usage_figure():
    fig = vp.pool_usage_figure([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    assert [list(r) for r in fig.data[0].z] == [[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]
    assert list(fig.data[0].y) == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match="shares"):
        vp.pool_usage_figure([[1.5, 0.0]])


def test_pareto_figure_sorts_by_stored_and_uses_log_x():
    fig = vp.pareto_figure({"rps": ([100, 10], [0.9, 0.5]), "dense": ([1000], [0.95])}, selected_stored=100)
    assert list(fig.data[0].x) == [10, 100] and list(fig.data[0].y) == [0.5, 0.9]
    assert fig.layout.xaxis.type == "log"
    with pytest.raises(ValueError, match="non-positive"):
        vp.pareto_figure({"x": ([0], [1.0])})


def test_layernorm_figure_highlights_the_selection():
    fig = vp.layernorm_figure({"individual": [2.0, 2.1], "shared": [2.2, 2.3]}, selected="shared")
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.y[0] for b in bars] == pytest.approx([2.05, 2.25])
    assert bars[1].marker.color == "#1f77b4" and bars[0].marker.color == "#c7c7c7"
    with pytest.raises(ValueError, match="selected"):
        vp.layernorm_figure({"a": [1.0]}, selected="b")
