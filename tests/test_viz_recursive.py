"""lablib.viz.recursive: lab 04's figures, checked on their data."""

from __future__ import annotations

import plotly.io as pio
import pytest

from lablib.viz import recursive as viz


def test_depth_text_layout_and_colours():
    chars = list("abcdefg")
    fig = viz.depth_text_figure(chars, [1, 2, 3, 1, 1, 2, 3], num_recursion=3, width=3)
    (trace,) = fig.data
    assert [list(r) for r in trace.z] == [[1, 2, 3], [1, 1, 2], [3, None, None]]
    assert [list(r) for r in trace.text] == [["a", "b", "c"], ["d", "e", "f"], ["g", "", ""]]
    assert trace.zmin == 0.5 and trace.zmax == 3.5
    pio.to_json(fig)


def test_depth_text_rejects_bad_data():
    with pytest.raises(ValueError, match="same length"):
        viz.depth_text_figure(["a"], [1, 2], num_recursion=2)
    with pytest.raises(ValueError, match=r"ints in \[1, 2\]"):
        viz.depth_text_figure(["a", "b"], [1, 3], num_recursion=2)
    with pytest.raises(ValueError, match="single characters"):
        viz.depth_text_figure(["ab"], [1], num_recursion=2)


def test_rank_curve_lines_ring_and_vanilla_star():
    fig = viz.rank_curve_figure([0, 2, 8], [100, 120, 180], {"stepwise": [3.0, 2.5, 2.2], "average": [3.2, 2.4, 2.1]},
                                selected_rank=2, vanilla_loss=2.0, vanilla_params=300)
    names = [t.name for t in fig.data]
    assert names == ["stepwise init", "stepwise r2", "average init", "average r2", "vanilla (untied)"]
    assert list(fig.data[1].x) == [120] and list(fig.data[3].y) == [2.4]
    assert list(fig.data[0].text) == ["r0", "r2", "r8"]
    with pytest.raises(ValueError, match="not one of the ranks"):
        viz.rank_curve_figure([0, 2], [1, 2], {"a": [1, 2]}, selected_rank=4)
    with pytest.raises(ValueError, match="has 1 values for 2 ranks"):
        viz.rank_curve_figure([0, 2], [1, 2], {"a": [1]}, selected_rank=2)


def test_pareto_frontier_by_hand():
    # (x, y): a=(1, 3) b=(2, 2) c=(3, 2.5) d=(4, 1): c is dominated by b
    assert viz.pareto_frontier([1, 2, 3, 4], [3, 2, 2.5, 1]) == [0, 1, 3]
    assert viz.pareto_frontier([2, 1], [1, 1]) == [1]


def test_pareto_figure_two_panels_error_bars_and_frontier():
    points = {"vanilla": dict(loss=2.0, loss_min=1.9, loss_max=2.2, train_flops=1e12, params=3e5),
              "recursive": dict(loss=2.1, loss_min=2.05, loss_max=2.1, train_flops=1e12, params=1e5)}
    fig = viz.pareto_figure(points)
    markers = [t for t in fig.data if t.mode == "markers"]
    assert len(markers) == 4 and markers[0].name == "vanilla"
    assert list(markers[0].error_y.array) == [pytest.approx(0.2)]
    assert list(markers[0].error_y.arrayminus) == [pytest.approx(0.1)]
    frontiers = [t for t in fig.data if t.name == "Pareto frontier"]
    assert [list(t.x) for t in frontiers] == [[1e12], [1e5, 3e5]]
    pio.to_json(fig)
    with pytest.raises(ValueError, match="lacks"):
        viz.pareto_figure({"a": dict(loss=1.0)})
    with pytest.raises(ValueError, match="positive"):
        viz.pareto_figure({"a": dict(loss=1.0, loss_min=1.0, loss_max=1.0, train_flops=0, params=1)})


def test_kv_strategy_figure_bars():
    rows = [dict(label="vanilla", kv_cache_entries=600, kv_cache_bytes=2048 * 60, tokens_per_second=100.0),
            dict(label="MoR", kv_cache_entries=200, kv_cache_bytes=2048 * 20, tokens_per_second=150.0)]
    fig = viz.kv_strategy_figure(rows)
    assert list(fig.data[0].y) == [600, 200] and list(fig.data[1].y) == [100.0, 150.0]
    assert list(fig.data[0].text) == ["120 KiB", "40 KiB"]
    with pytest.raises(ValueError, match="lacks"):
        viz.kv_strategy_figure([dict(label="x")])
    with pytest.raises(ValueError, match="non-empty"):
        viz.kv_strategy_figure([])
