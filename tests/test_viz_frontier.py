"""Lab 09's frontier figure, checked on its data."""

from __future__ import annotations

import pytest

from lablib.viz import frontier as vf

ROWS = [
    dict(name="big", family="dense", stored=1000, flops_per_token=100, val_loss=2.0),
    dict(name="mid", family="pruned", stored=500, flops_per_token=300, val_loss=2.2),
    dict(name="bad", family="pruned", stored=600, flops_per_token=50, val_loss=2.5),
    dict(name="small", family="dense", stored=100, flops_per_token=20, val_loss=2.6),
]


def test_one_trace_per_family_and_the_pareto_front():
    fig = vf.frontier_figure(ROWS)
    assert [t.name for t in fig.data] == ["dense", "pruned", "Pareto front"]
    assert list(fig.data[0].x) == [1000, 100] and list(fig.data[1].y) == [2.2, 2.5]
    assert list(fig.data[2].x) == [100, 500, 1000] and list(fig.data[2].y) == [2.6, 2.2, 2.0]
    assert fig.layout.xaxis.type == "log"
    flops = vf.frontier_figure(ROWS, x="flops_per_token")
    assert list(flops.data[2].x) == [20, 50, 100]


def test_budget_marks_the_best_point_within_it():
    fig = vf.frontier_figure(ROWS, budget=700)
    assert fig.data[-1].name == "best within budget: mid" and list(fig.data[-1].x) == [500]
    assert fig.layout.shapes[0].x0 == 700
    nothing = vf.frontier_figure(ROWS, budget=10)
    assert len(nothing.data) == 3


def test_bad_rows_are_rejected():
    with pytest.raises(ValueError, match="at least one row"):
        vf.frontier_figure([])
    with pytest.raises(ValueError, match="x must be"):
        vf.frontier_figure(ROWS, x="total")
    with pytest.raises(ValueError, match="has no"):
        vf.frontier_figure([dict(name="a", family="f", val_loss=1.0)])
    with pytest.raises(ValueError, match="log axis"):
        vf.frontier_figure([dict(ROWS[0], stored=0)])
