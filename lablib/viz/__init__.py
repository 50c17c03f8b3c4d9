"""Figures and interactive panels for the labs: plain data in, plotly figures out.

Every figure function here is **pure**: it takes lists, numpy arrays, torch tensors or dicts (never a model), checks
them, and returns a `plotly.graph_objects.Figure`. The labs compute the numbers; this module only draws them, so
each figure can be unit-tested on its data and re-drawn from a cached result.

`interact_figure(fn, **controls)` is the labs' "Play with it" panel, in the spirit of `ipywidgets.interact`
(<https://ipywidgets.readthedocs.io/en/stable/examples/Using%20Interact.html>): it builds one control per keyword,
shows one `plotly.graph_objects.FigureWidget`, and re-draws it in place when a control moves. Where there is no live
widget frontend (`LABLIB_STATIC=1`, as `make test` / `make notebooks` set it; a plain Python process; ipywidgets or
anywidget not installed) it returns the static figure for the controls' starting values instead, so the same cell
runs everywhere: in JupyterLab, under nbval, and in a script.

`set_plotly_renderer()` is called by each lab's setup cell; it picks a renderer that needs no network (see there).
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from numbers import Integral, Real
from typing import Any

import plotly.graph_objects as go

from lablib._env import in_ipython_kernel as _in_ipython_kernel

__all__ = [
    "static_mode",
    "set_plotly_renderer",
    "line_figure",
    "heatmap_figure",
    "bar_figure",
    "history_figure",
    "ledger_figure",
    "interact_figure",
    "subspace_accuracy_figure",
    "LEDGER_FIELDS",
    "DEFAULT_RENDERER",
]

# Counts that `ledger_figure` draws by default; all are fields of `lablib.ledger.ParamLedger`.
LEDGER_FIELDS = ("total", "active_per_token", "stored", "trainable")

# plotly_mimetype: JupyterLab, VS Code and nbval read the figure JSON (drawn by the jupyterlab-plotly extension).
# Adding "+notebook" embeds plotly.js (~4.8 MB) once per notebook so exported HTML draws figures too; the committed
# labs leave it out to stay small (opt in with LABLIB_PLOTLY_RENDERER=plotly_mimetype+notebook). Neither uses a CDN.
DEFAULT_RENDERER = "plotly_mimetype"
# Renderers that fetch plotly.js (or the page) from the network; the labs never need one.
_NETWORK_RENDERERS = frozenset({"notebook_connected", "iframe_connected", "kaggle", "azure", "colab", "cdn"})

_FIGURE_HEIGHT = 420
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


# --------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------


def static_mode() -> bool:
    """Whether panels should draw static figures instead of live widgets.

    True when `LABLIB_STATIC` is `1`/`true`/`yes`/`on`, when ipywidgets or anywidget (needed by plotly's
    `FigureWidget`) is not installed, or when the code does not run inside a Jupyter kernel.
    """
    if os.environ.get("LABLIB_STATIC", "").strip().lower() in _TRUE_WORDS:
        return True
    if importlib.util.find_spec("ipywidgets") is None or importlib.util.find_spec("anywidget") is None:
        return True
    return not _in_ipython_kernel()


def set_plotly_renderer(renderer: str | None = None) -> str:
    """Make figures display without network access; returns the renderer now in effect.

    Inside a Jupyter kernel the default is `"plotly_mimetype"` (`DEFAULT_RENDERER`): JupyterLab draws the
    `application/vnd.plotly.v1+json` output through the `jupyterlab-plotly` extension and nbval compares that JSON.
    `LABLIB_PLOTLY_RENDERER=plotly_mimetype+notebook` (or passing it here) adds a `text/html` copy with plotly.js
    embedded once per notebook (~4.8 MB, never loaded from a CDN) for exported HTML and frontends without the
    extension; the committed labs leave it out to stay small.

    Outside a kernel nothing changes unless a renderer is passed or `LABLIB_PLOTLY_RENDERER` is set. A renderer that
    loads plotly.js from the network (`notebook_connected`, `iframe_connected`, ...) is refused with ValueError.
    """
    import plotly.io as pio

    chosen = renderer or os.environ.get("LABLIB_PLOTLY_RENDERER") or None
    if chosen is None:
        if not _in_ipython_kernel():
            return pio.renderers.default
        chosen = DEFAULT_RENDERER
    names = chosen.split("+")
    unknown = [name for name in names if name not in pio.renderers]
    if unknown:
        raise ValueError(f"unknown plotly renderer(s) {unknown}; known: {sorted(pio.renderers)}")
    networked = sorted(set(names) & _NETWORK_RENDERERS)
    if networked:
        raise ValueError(
            f"renderer(s) {networked} load plotly.js from the network; the labs run offline, "
            f"use {DEFAULT_RENDERER!r} or 'plotly_mimetype'"
        )
    pio.renderers.default = chosen
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Input checking: everything becomes plain Python lists before it reaches plotly
# --------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """torch tensor / numpy array or scalar -> nested lists of Python scalars; other values unchanged."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(n) for n in shape) if shape is not None else None


def _vector(values: Any, *, what: str) -> list:
    """A 1-D sequence as a list; `what` names it in errors ("series 'adam' y")."""
    shape = _shape_of(values)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"{what} must be 1-D, got shape {shape}")
    if isinstance(values, (str, bytes)) or not isinstance(_plain(values), (list, tuple, range)):
        raise TypeError(f"{what} must be a sequence (list, tuple, numpy array or tensor), got {type(values).__name__}")
    items = [_plain(item) for item in _plain(values)]
    nested = [i for i, item in enumerate(items) if isinstance(item, (list, tuple))]
    if nested:
        raise ValueError(f"{what} must be 1-D, but item {nested[0]} is a sequence")
    return items


def _numbers(values: Any, *, what: str) -> list[float | int | None]:
    """A 1-D sequence of numbers (None allowed for a gap)."""
    items = _vector(values, what=what)
    for i, item in enumerate(items):
        if item is not None and (isinstance(item, bool) or not isinstance(item, Real)):
            raise TypeError(f"{what} must hold numbers, item {i} is {item!r}")
    return items


def _finite_positive_check(values: list, *, what: str, axis: str) -> None:
    """A log axis cannot show zero or negative values; say which series has them instead of dropping points."""
    bad = [v for v in values if v is not None and not math.isnan(v) and v <= 0]
    if bad:
        raise ValueError(f"{what} has non-positive values (e.g. {bad[0]!r}) that a log {axis} axis cannot show")


def _name(key: Any, *, what: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{what} names must be strings, got {key!r}")
    return key


def _style(
    fig: go.Figure,
    *,
    title: str | None,
    x_title: str | None,
    y_title: str | None,
    log_x: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """The shared look: white template, compact margins, legend on top, optional log axes."""
    fig.update_layout(
        template="plotly_white",
        title=title or None,
        height=_FIGURE_HEIGHT,
        margin=dict(l=60, r=20, t=60 if title else 30, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    )
    fig.update_xaxes(title_text=x_title or None, type="log" if log_x else None)
    fig.update_yaxes(title_text=y_title or None, type="log" if log_y else None)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------


def line_figure(
    series: Mapping[str, tuple[Any, Any]],
    *,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    log_x: bool = False,
    log_y: bool = False,
    markers: bool | None = None,
) -> go.Figure:
    """One line per named series; `series = {"name": (xs, ys), ...}` (lists, arrays or tensors).

    Trace order follows the mapping. `markers=None` draws markers only for short series (<= 30 points).
    Raises ValueError for no series, an empty series, x/y of different lengths, or non-positive values on a log
    axis (named by series).
    """
    if not isinstance(series, Mapping):
        raise TypeError(f"series must be a mapping name -> (xs, ys), got {type(series).__name__}")
    if not series:
        raise ValueError("line_figure needs at least one series, got an empty mapping")
    fig = go.Figure()
    for key, pair in series.items():
        name = _name(key, what="series")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"series {name!r} must be an (xs, ys) pair, got {type(pair).__name__}")
        xs = _vector(pair[0], what=f"series {name!r} x")
        ys = _numbers(pair[1], what=f"series {name!r} y")
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r} has {len(xs)} x values but {len(ys)} y values")
        if not ys:
            raise ValueError(f"series {name!r} is empty")
        if log_x:
            _finite_positive_check(_numbers(xs, what=f"series {name!r} x"), what=f"series {name!r} x", axis="x")
        if log_y:
            _finite_positive_check(ys, what=f"series {name!r} y", axis="y")
        show_markers = len(ys) <= 30 if markers is None else markers
        fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers" if show_markers else "lines"))
    return _style(fig, title=title, x_title=x_title, y_title=y_title, log_x=log_x, log_y=log_y)


def heatmap_figure(
    matrix: Any,
    *,
    x_labels: Sequence[Any] | None = None,
    y_labels: Sequence[Any] | None = None,
    title: str = "",
    colorbar_title: str = "",
    x_title: str = "",
    y_title: str = "",
    colorscale: str = "Viridis",
    zmid: float | None = None,
    text_format: str | None = None,
) -> go.Figure:
    """A 2-D matrix (rows x columns) as a heatmap, row 0 at the top like a printed matrix.

    `z` of the trace is exactly the input, as nested lists. `zmid=0` with a diverging `colorscale` ("RdBu") centres
    signed data; `text_format` (a d3 format such as ".2f") writes each value in its cell.
    Raises ValueError for a non-2-D, ragged or empty matrix and for label counts that do not match its shape.
    """
    shape = _shape_of(matrix)
    if shape is not None and len(shape) != 2:
        raise ValueError(f"heatmap_figure needs a 2-D matrix, got shape {shape}")
    rows = _plain(matrix)
    if not isinstance(rows, (list, tuple)) or not all(isinstance(_plain(r), (list, tuple)) for r in rows):
        raise ValueError("heatmap_figure needs a 2-D matrix (a sequence of rows), got a 1-D or scalar value")
    z = [_numbers(row, what=f"heatmap row {i}") for i, row in enumerate(rows)]
    if not z or not z[0]:
        raise ValueError(f"heatmap_figure needs a non-empty matrix, got shape ({len(z)}, {len(z[0]) if z else 0})")
    widths = sorted({len(row) for row in z})
    if len(widths) != 1:
        raise ValueError(f"heatmap_figure needs rows of equal length, got row lengths {widths}")
    n_rows, n_cols = len(z), widths[0]
    if x_labels is not None and len(x_labels) != n_cols:
        raise ValueError(f"x_labels has {len(x_labels)} labels but the matrix has {n_cols} columns")
    if y_labels is not None and len(y_labels) != n_rows:
        raise ValueError(f"y_labels has {len(y_labels)} labels but the matrix has {n_rows} rows")
    trace = go.Heatmap(
        z=z,
        x=_vector(x_labels, what="x_labels") if x_labels is not None else None,
        y=_vector(y_labels, what="y_labels") if y_labels is not None else None,
        colorscale=colorscale,
        zmid=zmid,
        colorbar=dict(title=dict(text=colorbar_title)) if colorbar_title else None,
        texttemplate=f"%{{z:{text_format}}}" if text_format else None,
    )
    fig = _style(go.Figure(trace), title=title, x_title=x_title, y_title=y_title)
    fig.update_yaxes(autorange="reversed")
    return fig


def bar_figure(
    categories: Sequence[Any],
    series: Mapping[str, Any],
    *,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    log_y: bool = False,
    barmode: str = "group",
    horizontal: bool = False,
    text_format: str | None = None,
) -> go.Figure:
    """Bars for each named series over shared categories: `series = {"name": values}` with one value per category.

    `barmode` is "group" (side by side) or "stack"; `horizontal=True` swaps the axes (categories on y);
    `text_format` (d3, e.g. ".3s" for 1.2M) labels each bar. On a log axis a value of 0 draws no bar.
    Raises ValueError for no categories or series, a series whose length differs from the categories, duplicate
    categories, or negative values on a log axis.
    """
    labels = _vector(categories, what="categories")
    if not labels:
        raise ValueError("bar_figure needs at least one category, got none")
    duplicates = sorted({str(c) for c in labels if labels.count(c) > 1})
    if duplicates:
        raise ValueError(f"bar_figure categories must be unique, repeated: {duplicates}")
    if barmode not in ("group", "stack"):
        raise ValueError(f"barmode must be 'group' or 'stack', got {barmode!r}")
    if not isinstance(series, Mapping) or not series:
        raise ValueError("bar_figure needs a non-empty mapping name -> values")
    fig = go.Figure()
    for key, values in series.items():
        name = _name(key, what="series")
        ys = _numbers(values, what=f"series {name!r}")
        if len(ys) != len(labels):
            raise ValueError(f"series {name!r} has {len(ys)} values but there are {len(labels)} categories")
        if log_y:
            negative = [v for v in ys if v is not None and v < 0]
            if negative:
                raise ValueError(f"series {name!r} has negative values (e.g. {negative[0]!r}) on a log axis")
        x, y = (ys, labels) if horizontal else (labels, ys)
        fig.add_trace(
            go.Bar(
                x=x,
                y=y,
                name=name,
                orientation="h" if horizontal else None,
                texttemplate=f"%{{{'x' if horizontal else 'y'}:{text_format}}}" if text_format else None,
            )
        )
    fig.update_layout(barmode=barmode)
    value_title, category_title = y_title, x_title
    if horizontal:
        return _style(fig, title=title, x_title=value_title, y_title=category_title, log_x=log_y)
    return _style(fig, title=title, x_title=category_title, y_title=value_title, log_y=log_y)


def _history_dict(history: Any, *, name: str) -> Mapping[str, Any]:
    """A `lablib.train.History` (anything with `to_dict()`) or its dict form."""
    if hasattr(history, "to_dict") and not isinstance(history, Mapping):
        history = history.to_dict()
    if not isinstance(history, Mapping):
        raise TypeError(f"history {name!r} must be a History or its to_dict() mapping, got {type(history).__name__}")
    return history


def history_figure(
    histories: Mapping[str, Any],
    metric: str | Sequence[str] = "train_loss",
    *,
    title: str = "",
    y_title: str | None = None,
    log_y: bool = False,
) -> go.Figure:
    """Learning curves of several runs: `histories = {"run name": History or History.to_dict()}`.

    `metric="train_loss"` plots `steps` vs `train_loss`; any other metric is read from the `evals` entries that have
    it (each has a "step"). Several metrics (a list) give one line per run and metric, named "run: metric".
    Raises KeyError naming the run and the metrics it has when a metric is missing.
    """
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("history_figure needs a non-empty mapping run name -> History")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics:
        raise ValueError("history_figure needs at least one metric")
    series: dict[str, tuple[list, list]] = {}
    for key, history in histories.items():
        name = _name(key, what="history")
        record = _history_dict(history, name=name)
        evals = list(record.get("evals") or [])
        for wanted in metrics:
            if wanted == "train_loss":
                if "steps" not in record or "train_loss" not in record:
                    raise KeyError(f"history {name!r} has no 'steps'/'train_loss' lists (keys: {sorted(record)})")
                xs, ys = list(_plain(record["steps"])), list(_plain(record["train_loss"]))
            else:
                points = [e for e in evals if wanted in e]
                if not points:
                    available = sorted({"train_loss"} | {k for e in evals for k in e if k != "step"})
                    raise KeyError(f"history {name!r} has no metric {wanted!r}; it has {available}")
                xs, ys = [e["step"] for e in points], [_plain(e[wanted]) for e in points]
            series[name if len(metrics) == 1 else f"{name}: {wanted}"] = (xs, ys)
    default_y = metrics[0] if len(metrics) == 1 else "value"
    return line_figure(
        series, title=title, x_title="step", y_title=default_y if y_title is None else y_title, log_y=log_y
    )


def _ledger_row(row: Any, *, index: int) -> Mapping[str, Any]:
    """A `lablib.ledger.ParamLedger` (anything with `as_row()`) or its dict form."""
    if hasattr(row, "as_row") and not isinstance(row, Mapping):
        row = row.as_row()
    if not isinstance(row, Mapping):
        raise TypeError(f"ledger row {index} must be a ParamLedger or its as_row() mapping, got {type(row).__name__}")
    return row


def ledger_figure(
    rows: Sequence[Any],
    *,
    fields: Sequence[str] = LEDGER_FIELDS,
    title: str = "Parameter ledger",
    log_y: bool = True,
) -> go.Figure:
    """Grouped bars comparing `ParamLedger` rows (or their `as_row()` dicts): one group per model, one bar per field.

    Counts span orders of magnitude, so the y axis is logarithmic by default; bars carry SI labels (1.2M).
    Raises KeyError naming the row and the missing field, ValueError for no rows or repeated model names.
    """
    records = [_ledger_row(row, index=i) for i, row in enumerate(rows)]
    if not records:
        raise ValueError("ledger_figure needs at least one ledger row")
    if not fields:
        raise ValueError(f"ledger_figure needs at least one field, e.g. {list(LEDGER_FIELDS)}")
    names = []
    for i, record in enumerate(records):
        if "name" not in record:
            raise KeyError(f"ledger row {i} has no 'name' (keys: {sorted(record)})")
        names.append(str(record["name"]))
    series = {}
    for field in fields:
        missing = [name for name, record in zip(names, records) if field not in record]
        if missing:
            raise KeyError(f"ledger row {missing[0]!r} has no field {field!r}; known fields: {list(LEDGER_FIELDS)}")
        series[field] = [record[field] for record in records]
    return bar_figure(names, series, title=title, x_title="model", y_title="count", log_y=log_y, text_format=".3s")


# --------------------------------------------------------------------------------------------------------------
# Interactive panels
# --------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Control:
    """One parsed control: what widget to build and where it starts (static mode needs only `start`)."""

    kind: str  # "widget", "checkbox", "int_slider", "float_slider", "dropdown"
    start: Any
    low: Real | None = None
    high: Real | None = None
    step: Real | None = None
    options: tuple = ()


def _parse_control(name: str, spec: Any, default: Any) -> _Control:
    """Read one keyword the way `ipywidgets.interact` reads its abbreviations, without importing ipywidgets."""
    if isinstance(spec, bool):
        return _Control("checkbox", spec)
    if isinstance(spec, tuple) and len(spec) in (2, 3) and all(_is_number(v) for v in spec):
        low, high = spec[0], spec[1]
        integer = all(isinstance(v, Integral) for v in spec)
        if not low < high:
            raise ValueError(f"control {name!r}: slider range needs min < max, got {spec}")
        step = spec[2] if len(spec) == 3 else (1 if integer else (high - low) / 100)
        if step <= 0:
            raise ValueError(f"control {name!r}: slider step must be > 0, got {spec}")
        # fn's own default when it lies in range, else the middle of the range, on a step
        if _is_number(default) and low <= default <= high and (not integer or isinstance(default, Integral)):
            start = default
        elif integer:
            start = low + ((high - low) // 2) // step * step
        else:
            start = low + round((high - low) / 2 / step) * step
        return _Control("int_slider" if integer else "float_slider", start, low, high, step)
    if isinstance(spec, Mapping) or isinstance(spec, (list, tuple)):
        options = tuple(spec.items()) if isinstance(spec, Mapping) else tuple(spec)
        if not options:
            raise ValueError(f"control {name!r}: a dropdown needs at least one option")
        values = [value for _, value in options] if isinstance(spec, Mapping) else list(options)
        return _Control("dropdown", default if default in values else values[0], options=options)
    if hasattr(spec, "value") and hasattr(spec, "observe"):  # an ipywidgets ValueWidget
        return _Control("widget", spec.value)
    raise TypeError(
        f"control {name!r}: expected an ipywidgets widget, a (min, max[, step]) tuple, a list of options, a dict "
        f"label -> value, or a bool; got {spec!r}"
    )


def _build_widget(name: str, spec: Any, control: _Control) -> Any:
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    if control.kind == "widget":
        if not getattr(spec, "description", ""):
            spec.description = name  # an unlabelled control is a puzzle in a panel with several
        return spec
    if control.kind == "checkbox":
        return widgets.Checkbox(value=control.start, description=name, style=style)
    if control.kind == "dropdown":
        return widgets.Dropdown(options=list(control.options), value=control.start, description=name, style=style)
    slider = widgets.IntSlider if control.kind == "int_slider" else widgets.FloatSlider
    return slider(
        value=control.start,
        min=control.low,
        max=control.high,
        step=control.step,
        description=name,
        # re-draw when the slider is released, not on every pixel of a drag
        continuous_update=False,
        style=style,
        **({} if control.kind == "int_slider" else {"readout_format": ".3g"}),
    )


def _check_controls(fn: Callable[..., Any], controls: Mapping[str, Any]) -> dict[str, Any]:
    """Match controls to fn's parameters; return fn's defaults for them (inspect.Parameter.empty if none)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return {name: inspect.Parameter.empty for name in controls}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(controls) - accepted) if not takes_any else []
    if unknown:
        raise TypeError(
            f"{fn.__name__}() has no parameter(s) {unknown} for these controls; it takes {sorted(accepted)}"
        )
    required = sorted(
        n for n in accepted if parameters[n].default is inspect.Parameter.empty and n not in controls
    )
    if required:
        raise TypeError(f"{fn.__name__}() needs a control (or a default) for parameter(s) {required}")
    return {name: parameters[name].default if name in parameters else inspect.Parameter.empty for name in controls}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _as_figure(result: Any, *, fn: Callable[..., Any]) -> go.Figure:
    if not isinstance(result, go.Figure):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} must return a plotly go.Figure, got {type(result).__name__}")
    return result


def _trace_signature(fig: go.Figure) -> list[tuple[str, frozenset[str]]]:
    """What must match to update traces in place: each trace's type and the properties it sets."""
    return [(trace.type, frozenset(trace.to_plotly_json()) - {"uid"}) for trace in fig.data]


@dataclass(frozen=True)
class _Shown:
    """What a FigureWidget shows, remembered so that a redraw need not read it back from the widget."""

    traces: list[tuple[str, frozenset[str]]]
    layout_keys: frozenset[str]

    @classmethod
    def of(cls, fig: go.Figure) -> _Shown:
        return cls(_trace_signature(fig), frozenset(fig.layout.to_plotly_json()))


def _redraw(widget: go.FigureWidget, new: go.Figure, *, shown: _Shown) -> _Shown:
    """Make `widget` (currently showing `shown`) show `new`, sending as little as possible to the frontend."""
    signature = _trace_signature(new)
    if signature != shown.traces:
        # different number/type/properties of traces: replace them all (plotly cannot retype a trace in place)
        widget.data = []
        widget.add_traces(list(new.data))
    else:
        with widget.batch_update():
            for old_trace, new_trace in zip(widget.data, new.data):
                properties = new_trace.to_plotly_json()
                properties.pop("uid", None)
                properties.pop("type", None)
                old_trace.update(properties, overwrite=True)
    new_layout = new.layout.to_plotly_json()
    with widget.batch_update():
        # layout keys the new figure no longer sets (a title, shapes, ...) must go, not linger
        for stale in shown.layout_keys - set(new_layout):
            widget.layout[stale] = None
        widget.update_layout(new_layout, overwrite=True)
    return _Shown(signature, frozenset(new_layout))


@cache
def _panel_class() -> type:
    """`FigurePanel`, defined on first use so that importing lablib.viz does not need ipywidgets."""
    import ipywidgets as widgets

    class FigurePanel(widgets.VBox):
        """The live panel: a box of controls above one `FigureWidget` (and a status line for errors).

        `panel.controls` maps each keyword to its widget, `panel.figure` is the FigureWidget, `panel.values` the
        current keyword values. Setting a control's `.value` re-draws the figure, with or without a frontend.
        """

        def __init__(self, *, fn, controls, figure, status):
            self.fn = fn
            self.controls = controls
            self.figure = figure
            self.status = status
            self._shown = _Shown.of(figure)
            super().__init__(
                [widgets.VBox(list(controls.values())), status, figure],
                layout=widgets.Layout(width="100%"),
            )

        @property
        def values(self) -> dict[str, Any]:
            return {name: control.value for name, control in self.controls.items()}

        def refresh(self, _change=None) -> None:
            """Recompute fn(**values) and update the figure; an error is shown, the last good figure kept."""
            try:
                new = _as_figure(self.fn(**self.values), fn=self.fn)
            except Exception as error:  # noqa: BLE001 - shown to the learner instead of lost in the JS console
                self.status.value = f"<span style='color:#b00'>{html.escape(f'{type(error).__name__}: {error}')}</span>"
                return
            self.status.value = ""
            self._shown = _redraw(self.figure, new, shown=self._shown)

    return FigurePanel


def interact_figure(fn: Callable[..., go.Figure], /, *, static: bool | None = None, **controls: Any) -> Any:
    """A figure with controls: `fn(**values)` must return a `go.Figure`; each keyword is one control.

    Controls, as in `ipywidgets.interact`: an ipywidgets widget (used as is); `(min, max)` or `(min, max, step)`
    (all ints -> IntSlider, else FloatSlider, 100 steps by default); a list or tuple of options, or a dict
    label -> value (Dropdown); a bool (Checkbox). A control starts at fn's default for that parameter when it has a
    valid one, else at the middle of the range / the first option. Sliders re-draw when released.

    Live mode returns a `FigurePanel` (an ipywidgets VBox: controls, status line, `go.FigureWidget`); each change
    calls fn once and updates the FigureWidget in place (data and layout when the traces keep their shape, a
    trace swap otherwise). Static mode (`static=True`, or `static=None` and `static_mode()`) prints one line naming
    the values and returns `fn(**values)` as a plain `go.Figure`. Either way, leave the call as the cell's last
    expression to display it. (`static` is therefore not usable as a control name.)
    """
    if not callable(fn):
        raise TypeError(f"interact_figure needs a function returning a go.Figure, got {type(fn).__name__}")
    if not controls:
        raise ValueError("interact_figure needs at least one control, e.g. interact_figure(fn, d=(1, 100))")
    defaults = _check_controls(fn, controls)
    use_static = static_mode() if static is None else static
    parsed = {name: _parse_control(name, spec, defaults[name]) for name, spec in controls.items()}
    if use_static:
        values = {name: control.start for name, control in parsed.items()}
        shown = ", ".join(f"{name}={_format_value(value)}" for name, value in values.items())
        print(f"static view at {shown} (open in JupyterLab with a live kernel to use the controls)")
        return _as_figure(fn(**values), fn=fn)

    import ipywidgets as widgets

    built = {name: _build_widget(name, controls[name], control) for name, control in parsed.items()}
    initial = _as_figure(fn(**{name: widget.value for name, widget in built.items()}), fn=fn)
    panel = _panel_class()(fn=fn, controls=built, figure=go.FigureWidget(initial), status=widgets.HTML(value=""))
    for widget in built.values():
        widget.observe(panel.refresh, names="value")
    return panel


# --------------------------------------------------------------------------------------------------------------
# Lab figures
# --------------------------------------------------------------------------------------------------------------


def subspace_accuracy_figure(
    fractions: Mapping[str, Mapping[int, float]],
    *,
    selected_d: int | None = None,
    threshold: float = 0.9,
    title: str = "Subspace training: accuracy as a fraction of full training",
) -> go.Figure:
    """Intrinsic-dimension curves: `fractions = {"width 64": {d: accuracy(d) / full accuracy, ...}, ...}`.

    One line per model on a log-d axis, a dashed line at `threshold` (the d_int90 criterion), and, when
    `selected_d` is given, a vertical marker there with each model's value at that d in the legend.
    Raises ValueError for an empty mapping, an empty curve, or a `selected_d` that no curve has.
    """
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError("subspace_accuracy_figure needs a non-empty mapping model name -> {d: fraction}")
    series = {}
    for key, curve in fractions.items():
        name = _name(key, what="curve")
        if not isinstance(curve, Mapping) or not curve:
            raise ValueError(f"curve {name!r} must be a non-empty mapping d -> fraction of full accuracy")
        dims = sorted(int(d) for d in curve)
        values = [float(curve[d]) if d in curve else float(curve[str(d)]) for d in dims]
        if selected_d is not None and selected_d in dims:
            name = f"{name} (at d={selected_d}: {values[dims.index(selected_d)]:.2f})"
        series[name] = (dims, values)
    if selected_d is not None and not any(selected_d in {int(d) for d in c} for c in fractions.values()):
        raise ValueError(f"selected_d={selected_d} is not on any curve's grid")
    fig = line_figure(series, title=title, x_title="subspace dimension d", y_title="accuracy / full accuracy", log_x=True)
    fig.add_hline(y=threshold, line_dash="dash", line_color="gray", annotation_text=f"{threshold:.0%} of full")
    if selected_d is not None:
        fig.add_vline(x=selected_d, line_dash="dot", line_color="black")
    return fig


def _rows_of_numbers(rows: Mapping[str, Any], *, what: str) -> tuple[list[str], list[list[float]]]:
    """A non-empty mapping name -> 1-D numbers, all the same length: (names, rows)."""
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError(f"{what} needs a non-empty mapping name -> values")
    names = [_name(key, what=what) for key in rows]
    values = [_numbers(rows[key], what=f"{what} {key!r}") for key in rows]
    lengths = sorted({len(v) for v in values})
    if lengths[0] == 0:
        raise ValueError(f"{what} rows must not be empty")
    if len(lengths) != 1:
        raise ValueError(f"{what} rows must all have the same length, got lengths {lengths}")
    return names, values
