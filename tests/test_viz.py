"""lablib.viz: figures are checked on their data (traces, values, axes), panels without a browser."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from lablib import viz


def _rows(z) -> list[list]:
    return [list(row) for row in z]


# --------------------------------------------------------------------------------------------------------------
# line_figure
# --------------------------------------------------------------------------------------------------------------


def test_line_figure_traces_values_and_axes():
    fig = viz.line_figure(
        {"adam": ([1, 2, 3], [3.0, 2.0, 1.5]), "sgd": ([1, 2, 3], [3.0, 2.5, 2.25])},
        title="loss",
        x_title="step",
        y_title="cross-entropy",
        log_x=True,
        log_y=True,
    )
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["adam", "sgd"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[1].y) == [3.0, 2.5, 2.25]
    assert fig.layout.title.text == "loss"
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "cross-entropy"
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def test_line_figure_linear_axes_by_default():
    fig = viz.line_figure({"a": ([0, 1], [0.0, -1.0])})
    assert fig.layout.xaxis.type != "log" and fig.layout.yaxis.type != "log"


def test_line_figure_converts_tensors_and_arrays_to_lists():
    xs, ys = np.arange(4), torch.tensor([0.5, 0.25, 0.125, 0.0625])
    fig = viz.line_figure({"halving": (xs, ys)})
    assert list(fig.data[0].x) == [0, 1, 2, 3]
    assert list(fig.data[0].y) == [0.5, 0.25, 0.125, 0.0625]
    # plain Python scalars, not numpy/torch objects, so the figure JSON is portable
    assert all(type(v) is int for v in fig.data[0].x) and all(type(v) is float for v in fig.data[0].y)
    pio.to_json(fig)  # serialisable


def test_line_figure_does_not_mutate_input():
    ys = torch.tensor([1.0, 2.0])
    before = ys.clone()
    viz.line_figure({"a": ([0, 1], ys)})
    assert torch.equal(ys, before)


def test_line_figure_mismatched_lengths_names_series():
    with pytest.raises(ValueError, match=r"series 'sgd' has 3 x values but 2 y values"):
        viz.line_figure({"adam": ([1, 2], [1, 2]), "sgd": ([1, 2, 3], [1.0, 2.0])})


def test_line_figure_empty_series_and_empty_mapping():
    with pytest.raises(ValueError, match="series 'empty' is empty"):
        viz.line_figure({"empty": ([], [])})
    with pytest.raises(ValueError, match="at least one series"):
        viz.line_figure({})


def test_line_figure_rejects_2d_values_and_bad_pairs():
    with pytest.raises(ValueError, match=r"series 'a' y must be 1-D, got shape \(2, 2\)"):
        viz.line_figure({"a": ([0, 1], np.zeros((2, 2)))})
    with pytest.raises(ValueError, match=r"series 'a' must be an \(xs, ys\) pair"):
        viz.line_figure({"a": [1, 2, 3]})
    with pytest.raises(TypeError, match="must hold numbers"):
        viz.line_figure({"a": ([0, 1], ["x", "y"])})


def test_line_figure_log_axis_rejects_non_positive_values():
    with pytest.raises(ValueError, match=r"series 'a' y has non-positive values"):
        viz.line_figure({"a": ([1, 2], [1.0, 0.0])}, log_y=True)
    with pytest.raises(ValueError, match=r"series 'a' x has non-positive values"):
        viz.line_figure({"a": ([0, 1], [1.0, 2.0])}, log_x=True)
    # NaN (a diverged run) is a gap, not an error
    viz.line_figure({"a": ([1, 2], [1.0, math.nan])}, log_y=True)


# --------------------------------------------------------------------------------------------------------------
# heatmap_figure
# --------------------------------------------------------------------------------------------------------------


def test_heatmap_z_equals_input_matrix():
    matrix = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    fig = viz.heatmap_figure(
        matrix, x_labels=["a", "b", "c"], y_labels=["r0", "r1"], title="w", colorbar_title="value"
    )
    (trace,) = fig.data
    assert trace.type == "heatmap"
    assert _rows(trace.z) == matrix.tolist()
    assert list(trace.x) == ["a", "b", "c"] and list(trace.y) == ["r0", "r1"]
    assert trace.colorbar.title.text == "value" and fig.layout.title.text == "w"
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top, as the matrix is printed


def test_heatmap_accepts_numpy_and_nested_lists():
    assert _rows(viz.heatmap_figure(np.eye(2)).data[0].z) == [[1.0, 0.0], [0.0, 1.0]]
    assert _rows(viz.heatmap_figure([[1, 2], [3, 4]]).data[0].z) == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.zeros(3), r"2-D matrix, got shape \(3,\)"),
        (torch.zeros(2, 2, 2), r"2-D matrix, got shape \(2, 2, 2\)"),
        ([1, 2, 3], "2-D matrix"),
        ([[1, 2], [3]], r"equal length, got row lengths \[1, 2\]"),
        ([], "non-empty matrix"),
        (np.zeros((2, 0)), r"non-empty matrix, got shape \(2, 0\)"),
    ],
)
def test_heatmap_bad_shapes(matrix, message):
    with pytest.raises(ValueError, match=message):
        viz.heatmap_figure(matrix)


def test_heatmap_label_count_must_match():
    with pytest.raises(ValueError, match="x_labels has 2 labels but the matrix has 3 columns"):
        viz.heatmap_figure(np.zeros((2, 3)), x_labels=["a", "b"])
    with pytest.raises(ValueError, match="y_labels has 3 labels but the matrix has 2 rows"):
        viz.heatmap_figure(np.zeros((2, 3)), y_labels=["a", "b", "c"])


# --------------------------------------------------------------------------------------------------------------
# bar_figure, history_figure, ledger_figure
# --------------------------------------------------------------------------------------------------------------


def test_bar_figure_groups_series_over_categories():
    fig = viz.bar_figure(
        ["dense", "lora"], {"total": [100, 104], "trainable": [100, 4]}, y_title="params", log_y=True
    )
    assert [t.type for t in fig.data] == ["bar", "bar"]
    assert [t.name for t in fig.data] == ["total", "trainable"]
    assert list(fig.data[0].x) == ["dense", "lora"] and list(fig.data[1].y) == [100, 4]
    assert fig.layout.barmode == "group" and fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text == "params"


def test_bar_figure_horizontal_swaps_axes():
    fig = viz.bar_figure(["a", "b"], {"n": [1, 2]}, x_title="item", y_title="count", horizontal=True, log_y=True)
    assert list(fig.data[0].y) == ["a", "b"] and list(fig.data[0].x) == [1, 2]
    assert fig.data[0].orientation == "h"
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "count"


def test_bar_figure_bad_input():
    with pytest.raises(ValueError, match="series 'n' has 1 values but there are 2 categories"):
        viz.bar_figure(["a", "b"], {"n": [1]})
    with pytest.raises(ValueError, match="at least one category"):
        viz.bar_figure([], {"n": []})
    with pytest.raises(ValueError, match=r"unique, repeated: \['a'\]"):
        viz.bar_figure(["a", "a"], {"n": [1, 2]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        viz.bar_figure(["a"], {})
    with pytest.raises(ValueError, match="series 'n' has negative values"):
        viz.bar_figure(["a"], {"n": [-1]}, log_y=True)


class _FakeHistory:
    """Stands in for lablib.train.History: only to_dict() is used."""

    def to_dict(self):
        return {
            "steps": [0, 1, 2],
            "train_loss": [3.0, 2.0, 1.0],
            "evals": [{"step": 0, "val_loss": 3.1}, {"step": 2, "val_loss": 1.2, "accuracy": 0.5}],
            "seconds": 1.0,
        }


def test_history_figure_train_and_eval_metrics():
    histories = {"run a": _FakeHistory(), "run b": _FakeHistory().to_dict()}
    train = viz.history_figure(histories)
    assert [t.name for t in train.data] == ["run a", "run b"]
    assert list(train.data[0].x) == [0, 1, 2] and list(train.data[0].y) == [3.0, 2.0, 1.0]
    assert train.layout.xaxis.title.text == "step" and train.layout.yaxis.title.text == "train_loss"

    val = viz.history_figure(histories, "val_loss", log_y=True)
    assert list(val.data[0].x) == [0, 2] and list(val.data[0].y) == [3.1, 1.2]
    assert val.layout.yaxis.type == "log"

    accuracy = viz.history_figure(histories, "accuracy")
    assert list(accuracy.data[1].x) == [2] and list(accuracy.data[1].y) == [0.5]

    both = viz.history_figure({"a": _FakeHistory()}, ["train_loss", "val_loss"])
    assert [t.name for t in both.data] == ["a: train_loss", "a: val_loss"]


def test_history_figure_unknown_metric_lists_available():
    available = r"\['accuracy', 'train_loss', 'val_loss'\]"
    with pytest.raises(KeyError, match=rf"history 'a' has no metric 'bleu'; it has {available}"):
        viz.history_figure({"a": _FakeHistory()}, "bleu")
    with pytest.raises(ValueError, match="non-empty mapping"):
        viz.history_figure({})


class _FakeLedger:
    """Stands in for lablib.ledger.ParamLedger: only as_row() is used."""

    def __init__(self, name, total, trainable):
        self.row = dict(name=name, total=total, active_per_token=total, stored=total, trainable=trainable,
                        flops_per_token=2 * total, notes="")

    def as_row(self):
        return dict(self.row)


def test_ledger_figure_groups_fields_per_model():
    fig = viz.ledger_figure([_FakeLedger("dense", 1000, 1000), _FakeLedger("lora", 1040, 40).as_row()])
    assert [t.name for t in fig.data] == list(viz.LEDGER_FIELDS)
    assert list(fig.data[0].x) == ["dense", "lora"]
    assert list(fig.data[0].y) == [1000, 1040]  # total
    assert list(fig.data[3].y) == [1000, 40]  # trainable
    assert fig.layout.yaxis.type == "log"

    flops = viz.ledger_figure([_FakeLedger("dense", 10, 10)], fields=["flops_per_token"], log_y=False)
    assert list(flops.data[0].y) == [20] and flops.layout.yaxis.type != "log"


def test_ledger_figure_bad_rows():
    with pytest.raises(KeyError, match="ledger row 'x' has no field 'stored'"):
        viz.ledger_figure([{"name": "x", "total": 1, "active_per_token": 1, "trainable": 1}])
    with pytest.raises(ValueError, match="at least one ledger row"):
        viz.ledger_figure([])
    with pytest.raises(ValueError, match="unique"):
        viz.ledger_figure([_FakeLedger("a", 1, 1), _FakeLedger("a", 2, 2)])


# --------------------------------------------------------------------------------------------------------------
# static_mode, set_plotly_renderer
# --------------------------------------------------------------------------------------------------------------


def test_static_mode(monkeypatch):
    monkeypatch.setenv("LABLIB_STATIC", "1")
    assert viz.static_mode()
    monkeypatch.delenv("LABLIB_STATIC")
    # pytest is not a Jupyter kernel
    assert viz.static_mode()
    monkeypatch.setattr(viz, "_in_ipython_kernel", lambda: True)
    assert not viz.static_mode()
    monkeypatch.setattr(viz.importlib.util, "find_spec", lambda name: None)
    assert viz.static_mode()  # no ipywidgets


@pytest.fixture
def restore_renderer():
    saved = pio.renderers.default
    yield
    pio.renderers.default = saved


def test_set_plotly_renderer(monkeypatch, restore_renderer):
    monkeypatch.delenv("LABLIB_PLOTLY_RENDERER", raising=False)
    before = pio.renderers.default
    assert viz.set_plotly_renderer() == before  # outside a kernel: unchanged
    monkeypatch.setattr(viz, "_in_ipython_kernel", lambda: True)
    assert viz.set_plotly_renderer() == "plotly_mimetype" == pio.renderers.default
    monkeypatch.setenv("LABLIB_PLOTLY_RENDERER", "plotly_mimetype+notebook")
    assert viz.set_plotly_renderer() == "plotly_mimetype+notebook" == pio.renderers.default
    with pytest.raises(ValueError, match="network"):
        viz.set_plotly_renderer("notebook_connected")
    with pytest.raises(ValueError, match="unknown plotly renderer"):
        viz.set_plotly_renderer("plotly_mimetype+nope")


# --------------------------------------------------------------------------------------------------------------
# interact_figure
# --------------------------------------------------------------------------------------------------------------


def _parabola(d: int = 10, scale: float = 1.0, kind: str = "square") -> go.Figure:
    xs = list(range(d))
    ys = [scale * x * x if kind == "square" else scale * x for x in xs]
    return viz.line_figure({kind: (xs, ys)}, title=f"d={d}")


def test_interact_static_returns_default_figure_and_prints(capsys):
    fig = viz.interact_figure(_parabola, static=True, d=(1, 100), scale=(0.5, 2.0), kind=["line", "square"])
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    # fn's defaults win when they fit the control (d=10, scale=1.0, kind="square")
    assert fig.to_dict() == _parabola(10, 1.0, "square").to_dict()
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("static view at d=10, scale=1, kind=square")


def test_interact_static_mode_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("LABLIB_STATIC", "1")

    def fn(n, flag):
        return viz.line_figure({"n": ([0, 1], [n, n])}, title=str(flag))

    fig = viz.interact_figure(fn, n=(0, 10, 2), flag=True)
    # no default in fn: slider midpoint on a step, checkbox value
    assert list(fig.data[0].y) == [4, 4] and fig.layout.title.text == "True"
    assert "static view at n=4, flag=True" in capsys.readouterr().out


def test_interact_widget_mode_updates_figure_in_place():
    import ipywidgets as widgets

    panel = viz.interact_figure(
        _parabola, static=False, d=(1, 100), scale=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1),
        kind=["line", "square"],
    )
    assert isinstance(panel, widgets.VBox)
    assert isinstance(panel.figure, go.FigureWidget) and panel.figure in panel.children
    assert isinstance(panel.controls["d"], widgets.IntSlider)
    assert isinstance(panel.controls["kind"], widgets.Dropdown)
    assert panel.controls["scale"].description == "scale"  # unlabelled widget gets the keyword
    widget_before = panel.figure
    assert list(panel.figure.data[0].y) == list(_parabola(10).data[0].y)

    panel.controls["d"].value = 5
    expected = _parabola(5)
    assert panel.figure is widget_before  # same widget, updated in place
    assert list(panel.figure.data[0].x) == list(expected.data[0].x) == [0, 1, 2, 3, 4]
    assert list(panel.figure.data[0].y) == list(expected.data[0].y)
    assert panel.figure.layout.title.text == "d=5"  # layout follows too

    panel.controls["kind"].value = "line"
    assert panel.figure.data[0].name == "line"
    assert list(panel.figure.data[0].y) == [0, 1, 2, 3, 4]
    panel.controls["scale"].value = 10.0
    assert list(panel.figure.data[0].y) == [0, 10, 20, 30, 40]
    assert panel.values == {"d": 5, "scale": 10.0, "kind": "line"}


def test_interact_widget_mode_replaces_traces_when_their_shape_changes():
    def fn(n_lines=1, bars=False):
        if bars:
            return viz.bar_figure(["a", "b"], {"n": [n_lines, 2 * n_lines]})
        return viz.line_figure({f"line {i}": ([0, 1], [i, i + 1]) for i in range(n_lines)})

    panel = viz.interact_figure(fn, static=False, n_lines=(1, 3), bars=False)
    assert [t.name for t in panel.figure.data] == ["line 0"]
    panel.controls["n_lines"].value = 3
    assert [t.name for t in panel.figure.data] == ["line 0", "line 1", "line 2"]
    panel.controls["bars"].value = True
    assert [t.type for t in panel.figure.data] == ["bar"]
    assert list(panel.figure.data[0].y) == [3, 6]


def test_interact_widget_mode_shows_errors_and_keeps_last_figure():
    def fn(d=2):
        if d == 3:
            raise ValueError("d=3 is not allowed")
        return viz.line_figure({"a": (list(range(d)), list(range(d)))})

    panel = viz.interact_figure(fn, static=False, d=(1, 5))
    panel.controls["d"].value = 3
    assert "ValueError: d=3 is not allowed" in panel.status.value
    assert list(panel.figure.data[0].x) == [0, 1]
    panel.controls["d"].value = 4
    assert panel.status.value == "" and list(panel.figure.data[0].x) == [0, 1, 2, 3]


def test_interact_float_slider_defaults():
    panel = viz.interact_figure(_parabola, static=False, scale=(0.0, 4.0))
    slider = panel.controls["scale"]
    assert type(slider).__name__ == "FloatSlider"
    assert (slider.min, slider.max, slider.step, slider.value) == (0.0, 4.0, 0.04, 1.0)


def test_interact_bad_controls():
    with pytest.raises(TypeError, match=r"has no parameter\(s\) \['depth'\]"):
        viz.interact_figure(_parabola, static=True, depth=(1, 3))
    with pytest.raises(TypeError, match=r"needs a control \(or a default\) for parameter\(s\) \['n'\]"):
        viz.interact_figure(lambda n, m=1: go.Figure(), static=True, m=(1, 3))
    with pytest.raises(ValueError, match="control 'd': slider range needs min < max"):
        viz.interact_figure(_parabola, static=True, d=(5, 1))
    with pytest.raises(ValueError, match="control 'd': slider step must be > 0"):
        viz.interact_figure(_parabola, static=True, d=(1, 5, 0))
    with pytest.raises(TypeError, match="control 'kind': expected an ipywidgets widget"):
        viz.interact_figure(_parabola, static=True, kind="square")
    with pytest.raises(ValueError, match="at least one control"):
        viz.interact_figure(_parabola)
    with pytest.raises(TypeError, match="must return a plotly go.Figure"):
        viz.interact_figure(lambda d=1: {"data": []}, static=True, d=(1, 2))


def test_interact_widget_mode_drops_layout_the_new_figure_no_longer_sets():
    def fn(marked=True):
        fig = viz.line_figure({"a": ([0, 1], [0.0, 1.0])}, title="marked" if marked else "")
        if marked:
            fig.add_hline(y=0.5)
        return fig

    panel = viz.interact_figure(fn, static=False, marked=True)
    assert panel.figure.layout.title.text == "marked" and len(panel.figure.layout.shapes) == 1
    panel.controls["marked"].value = False
    assert panel.figure.layout.title.text is None and len(panel.figure.layout.shapes) == 0
    panel.controls["marked"].value = True
    assert panel.figure.layout.title.text == "marked" and len(panel.figure.layout.shapes) == 1


# --------------------------------------------------------------------------------------------------------------
# subspace_accuracy_figure
# --------------------------------------------------------------------------------------------------------------


def test_subspace_accuracy_figure_data():
    fractions = {"width 16": {10: 0.2, 100: 0.8, 400: 0.95}, "width 64": {"10": 0.3, "100": 0.9}}
    fig = viz.subspace_accuracy_figure(fractions, selected_d=100, threshold=0.9)
    assert [t.name for t in fig.data] == ["width 16 (at d=100: 0.80)", "width 64 (at d=100: 0.90)"]
    assert list(fig.data[0].x) == [10, 100, 400] and list(fig.data[0].y) == [0.2, 0.8, 0.95]
    assert list(fig.data[1].x) == [10, 100] and list(fig.data[1].y) == [0.3, 0.9]
    assert fig.layout.xaxis.type == "log"
    lines = {(s.type, s.x0, s.y0) for s in fig.layout.shapes}
    assert ("line", 100, 0) in lines  # the vertical marker at d (yref paper)
    assert any(s.y0 == 0.9 and s.y1 == 0.9 for s in fig.layout.shapes)  # the threshold


def test_subspace_accuracy_figure_bad_input():
    with pytest.raises(ValueError, match="non-empty mapping"):
        viz.subspace_accuracy_figure({})
    with pytest.raises(ValueError, match="curve 'w'"):
        viz.subspace_accuracy_figure({"w": {}})
    with pytest.raises(ValueError, match="selected_d=7"):
        viz.subspace_accuracy_figure({"w": {10: 0.5}}, selected_d=7)
