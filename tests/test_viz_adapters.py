"""Lab 03's figures, checked on their data."""

import pytest

from lablib.viz import adapters as va

CURVES = {"lora": {"stored": [100, 200, 400], "loss": [2.0, 1.9, 1.8], "low": [1.9, 1.8, 1.7],
                   "high": [2.1, 2.0, 1.9]},
          "mos": {"stored": [100, 200, 400], "loss": [1.95, 1.85, 1.8]}}


def test_budget_figure_one_trace_per_kind_with_selection_and_seed_range():
    fig = va.budget_figure(CURVES, selected=210, base_loss=2.5)
    assert [t.name for t in fig.data] == ["lora", "mos"]
    assert list(fig.data[0].y) == [2.0, 1.9, 1.8]
    assert list(fig.data[0].marker.size) == [8, 16, 8]  # the point nearest 210 is enlarged
    assert [round(v, 6) for v in fig.data[0].error_y.array] == [0.1, 0.1, 0.1]
    assert fig.data[1].error_y.array is None
    assert fig.layout.xaxis.type == "log"
    assert len(fig.layout.shapes) == 2  # the selected budget and the base loss


def test_budget_figure_rejects_bad_data():
    with pytest.raises(ValueError, match="equal length"):
        va.budget_figure({"lora": {"stored": [1, 2], "loss": [1.0]}})
    with pytest.raises(ValueError, match="positive"):
        va.budget_figure({"lora": {"stored": [0, 2], "loss": [1.0, 2.0]}})
    with pytest.raises(ValueError, match="no 'loss'"):
        va.budget_figure({"lora": {"stored": [1]}})
    with pytest.raises(ValueError, match="at least one"):
        va.budget_figure({})


def test_bank_usage_figure_heatmap_and_private_marker():
    fig = va.bank_usage_figure(["a", "b"], [[1, 0, 2], [0, 1, 1]], private_from=2)
    assert [list(r) for r in fig.data[0].z] == [[1, 0, 2], [0, 1, 1]]
    assert list(fig.data[0].y) == ["a", "b"]
    assert fig.layout.shapes[0].x0 == 1.5
    with pytest.raises(ValueError, match="one row per layer"):
        va.bank_usage_figure(["a"], [[1], [2]])
    with pytest.raises(ValueError, match="equal length"):
        va.bank_usage_figure(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="private_from"):
        va.bank_usage_figure(["a"], [[1, 2]], private_from=5)
    with pytest.raises(ValueError, match="non-negative"):
        va.bank_usage_figure(["a"], [[-1, 2]])
