"""Lab 02's figures (shared pools): pool size vs loss, per-layer x pool-expert usage, the compression Pareto curve,
and the WideNet LayerNorm ablation. Pure functions of plain data, like everything in `lablib.viz`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from lablib.viz import _name, _numbers, _style, heatmap_figure

__all__ = ["pool_size_figure", "pool_usage_figure", "pareto_figure", "layernorm_figure"]

_KEYS = ("params", "mean", "low", "high")


def pool_size_figure(points: Mapping[str, Mapping[str, Sequence[float]]], *, selected_params: float | None = None,
                     title: str = "Validation loss vs parameters") -> go.Figure:
    """One series per model family: `points = {name: {"params": [...], "mean": [...], "low": [...], "high": [...],
    optional "pool_size": [...]}}`; error bars span low..high (the seeds). `selected_params` draws a vertical line
    (the pool size picked on the slider). Raises ValueError for missing keys or lists of different lengths."""
    if not isinstance(points, Mapping) or not points:
        raise ValueError("pool_size_figure needs at least one series")
    fig = go.Figure()
    for key, series in points.items():
        name = _name(key, what="series")
        missing = [k for k in _KEYS if k not in series]
        if missing:
            raise ValueError(f"series {name!r} lacks {missing}")
        cols = {k: _numbers(series[k], what=f"series {name!r} {k}") for k in _KEYS}
        if len({len(v) for v in cols.values()}) != 1 or not cols["params"]:
            raise ValueError(f"series {name!r} needs equal, non-empty lists for {list(_KEYS)}")
        sizes = series.get("pool_size")
        text = [f"{int(s)} experts" for s in sizes] if sizes is not None else None
        fig.add_trace(go.Scatter(
            x=cols["params"], y=cols["mean"], name=name, mode="lines+markers" if len(cols["params"]) > 1 else "markers",
            text=text, marker=dict(size=9 if len(cols["params"]) > 1 else 14,
                                   symbol="circle" if len(cols["params"]) > 1 else "star"),
            error_y=dict(type="data", symmetric=False, array=[h - m for h, m in zip(cols["high"], cols["mean"])],
                         arrayminus=[m - lo for m, lo in zip(cols["mean"], cols["low"])])))
    if selected_params is not None:
        fig.add_vline(x=float(selected_params), line_dash="dot", line_color="gray")
    return _style(fig, title=title, x_title="parameters (ledger total)", y_title="validation loss (nats / byte)")


def pool_usage_figure(usage: Sequence[Sequence[float]], *, title: str = "Share of each layer's assignments per "
                      "pool expert") -> go.Figure:
    """(n_layers, experts) routing shares, rows = layers (each row sums to 1), columns = the shared pool's experts."""
    rows = [_numbers(r, what=f"usage row {i}") for i, r in enumerate(usage)]
    if not rows or not rows[0]:
        raise ValueError("pool_usage_figure needs a non-empty (n_layers, experts) matrix")
    bad = [v for r in rows for v in r if v is None or not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"usage values must be shares in [0, 1], got {bad[0]!r}")
    return heatmap_figure(rows, x_labels=[f"E{e}" for e in range(len(rows[0]))],
                          y_labels=[f"layer {i}" for i in range(len(rows))], title=title, colorbar_title="share",
                          x_title="pool expert", y_title="layer", text_format=".2f")


def pareto_figure(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                  selected_stored: float | None = None, title: str = "Accuracy vs stored parameters",
                  y_title: str = "validation accuracy") -> go.Figure:
    """One line per method, `points = {name: (stored parameters, accuracy)}`, log-scaled x; `selected_stored` marks
    the compression picked on the slider."""
    if not isinstance(points, Mapping) or not points:
        raise ValueError("pareto_figure needs at least one method")
    fig = go.Figure()
    for key, pair in points.items():
        name = _name(key, what="method")
        xs, ys = _numbers(pair[0], what=f"{name} x"), _numbers(pair[1], what=f"{name} y")
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"method {name!r} needs equal, non-empty x and y lists")
        if any(x is None or x <= 0 for x in xs):
            raise ValueError(f"method {name!r} has a non-positive stored count (log axis)")
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        fig.add_trace(go.Scatter(x=[xs[i] for i in order], y=[ys[i] for i in order], name=name,
                                 mode="lines+markers" if len(xs) > 1 else "markers",
                                 marker=dict(size=8 if len(xs) > 1 else 14)))
    if selected_stored is not None:
        fig.add_vline(x=float(selected_stored), line_dash="dot", line_color="gray")
    return _style(fig, title=title, x_title="stored parameters", y_title=y_title, log_x=True)


def layernorm_figure(values: Mapping[str, Sequence[float]], *, selected: str | None = None,
                     title: str = "WideNet: validation loss by LayerNorm sharing") -> go.Figure:
    """Mean bar and one dot per seed for each variant (`values = {name: [loss per seed]}`); `selected` is
    highlighted, the others greyed."""
    if not isinstance(values, Mapping) or not values:
        raise ValueError("layernorm_figure needs at least one variant")
    names = [_name(k, what="variant") for k in values]
    if selected is not None and selected not in names:
        raise ValueError(f"selected {selected!r} is not one of {names}")
    fig = go.Figure()
    for name, vals in zip(names, values.values()):
        nums = _numbers(vals, what=f"variant {name!r}")
        if not nums:
            raise ValueError(f"variant {name!r} has no values")
        colour = "#1f77b4" if selected in (None, name) else "#c7c7c7"
        fig.add_trace(go.Bar(x=[name], y=[sum(nums) / len(nums)], marker_color=colour, name=name, showlegend=False))
        fig.add_trace(go.Scatter(x=[name] * len(nums), y=nums, mode="markers", marker=dict(color="black", size=8),
                                 name=f"{name} seeds", showlegend=False))
    lows = [min(_numbers(v, what="v")) for v in values.values()]
    highs = [max(_numbers(v, what="v")) for v in values.values()]
    pad = max(0.02, (max(highs) - min(lows)) * 0.5)
    fig.update_yaxes(range=[min(lows) - pad, max(highs) + pad])
    return _style(fig, title=title, x_title="", y_title="validation loss (nats / byte)")
