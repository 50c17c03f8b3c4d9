"""Lab 08's figures, checked on their data."""

from __future__ import annotations

import pytest

from lablib.viz import redundancy as vr


def test_similarity_figure_has_one_bar_series_per_sublayer():
    fig = vr.similarity_figure({"attention": [0.9, 0.99], "mlp": [0.8, 0.7]})
    assert [t.name for t in fig.data] == ["attention", "mlp"]
    assert list(fig.data[0].x) == ["layer 0", "layer 1"] and list(fig.data[1].y) == [0.8, 0.7]
    with pytest.raises(ValueError, match="same non-zero length"):
        vr.similarity_figure({"attention": [0.9], "mlp": [0.8, 0.7]})
    with pytest.raises(ValueError):
        vr.similarity_figure({})


def test_cka_figure_is_a_fixed_scale_heatmap():
    fig = vr.cka_figure([[1.0, 0.5], [0.5, 1.0]])
    assert [list(r) for r in fig.data[0].z] == [[1.0, 0.5], [0.5, 1.0]]
    assert fig.data[0].zmin == 0.0 and fig.data[0].zmax == 1.0 and list(fig.data[0].x) == ["block 0", "block 1"]
    with pytest.raises(ValueError, match="square"):
        vr.cka_figure([[1.0, 0.5]])


def test_drop_figure_marks_the_selected_k():
    fig = vr.drop_figure({"attention": [2.0, 2.1, 2.5], "mlp": [2.0, 2.6, 3.0]}, selected_k=1)
    assert [t.name for t in fig.data] == ["attention (k=1: 2.100)", "mlp (k=1: 2.600)"]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[1].y) == [2.0, 2.6, 3.0]
    assert fig.layout.shapes[0].x0 == 1
    with pytest.raises(ValueError, match="outside"):
        vr.drop_figure({"attention": [2.0]}, selected_k=3)
    with pytest.raises(ValueError, match="empty"):
        vr.drop_figure({"attention": []})


def test_router_probe_figure_bars_per_seed():
    fig = vr.router_probe_figure({"seed 0": [0.1, 0.05, 0.01], "seed 1": [0.2, 0.0, -0.01]})
    assert len(fig.data) == 2 and list(fig.data[1].y) == [0.2, 0.0, -0.01]
    assert list(fig.data[0].x) == ["layer 0", "layer 1", "layer 2"]
    with pytest.raises(ValueError, match="same non-zero length"):
        vr.router_probe_figure({"seed 0": [0.1], "seed 1": [0.1, 0.2]})


def test_merge_figure_lines_and_selection():
    fig = vr.merge_figure([4, 2, 1], {"average": [2.0, 2.1, 2.4], "prune": [2.0, 2.3, 2.9]}, selected=2)
    assert [t.name for t in fig.data] == ["average (2 experts: 2.100)", "prune (2 experts: 2.300)"]
    assert list(fig.data[0].x) == [4, 2, 1] and fig.layout.xaxis.autorange == "reversed"
    with pytest.raises(ValueError, match="not one of"):
        vr.merge_figure([4, 2, 1], {"average": [2.0, 2.1, 2.4]}, selected=3)
    with pytest.raises(ValueError, match="3 expert counts"):
        vr.merge_figure([4, 2, 1], {"average": [2.0, 2.1]})
