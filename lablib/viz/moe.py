"""Lab 01's figures (MoE routers): routing heatmap, expert load over training, capacity and dropped tokens, seed
spread. Pure functions of plain data, like everything in `lablib.viz`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import plotly.graph_objects as go

from lablib.viz import _name, _numbers, _rows_of_numbers, _style, heatmap_figure, line_figure

__all__ = ["routing_heatmap_figure", "expert_load_figure", "capacity_figure", "seed_spread_figure"]


def routing_heatmap_figure(
    shares: Mapping[str, Any],
    *,
    expert_labels: Sequence[str] | None = None,
    title: str = "Share of tokens routed to each expert",
    zmax: float | None = None,
) -> go.Figure:
    """Which expert the tokens go to: `shares = {"row name": [fraction for expert 0, 1, ...]}`, one row per group
    of tokens (a corpus, a byte class), fractions in [0, 1]; each cell is labelled in percent.

    `zmax` fixes the top of the colour scale (e.g. 2 / E to compare layers on one scale); default: the data's max.
    Raises ValueError for an empty mapping, rows of different lengths, values outside [0, 1] or a wrong number of
    expert labels.
    """
    names, values = _rows_of_numbers(shares, what="routing shares")
    bad = [(n, v) for n, row in zip(names, values) for v in row if v is None or not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"routing shares must be fractions in [0, 1]; row {bad[0][0]!r} has {bad[0][1]!r}")
    n_experts = len(values[0])
    labels = list(expert_labels) if expert_labels is not None else [f"expert {e}" for e in range(n_experts)]
    if len(labels) != n_experts:
        raise ValueError(f"expert_labels has {len(labels)} labels but the rows have {n_experts} experts")
    fig = heatmap_figure(values, x_labels=labels, y_labels=names, title=title, colorbar_title="share",
                         colorscale="Blues", text_format=".0%")
    fig.update_traces(zmin=0.0, zmax=zmax if zmax is not None else max(max(row) for row in values))
    return fig


def expert_load_figure(
    curves: Mapping[str, tuple[Any, Any]],
    *,
    reference: Mapping[str, tuple[Any, Any]] | None = None,
    ideal: float = 1.0,
    title: str = "Expert load during training",
    y_title: str = "max load / mean load",
) -> go.Figure:
    """Load-imbalance curves: `curves = {"layer 0": (steps, max/mean load), ...}` drawn as lines, optional
    `reference` curves (e.g. the unbalanced run) as dotted grey lines, and a dashed line at `ideal` (1 = every
    expert equally loaded). Validation as `line_figure`."""
    fig = line_figure(curves, title=title, x_title="training step", y_title=y_title)
    if reference:
        ref = line_figure(reference)
        for trace in ref.data:
            trace.update(line=dict(color="lightgray", dash="dot"), marker=dict(color="lightgray"))
            fig.add_trace(trace)
    fig.add_hline(y=ideal, line_dash="dash", line_color="gray", annotation_text="even load")
    return fig


def capacity_figure(
    dropped: Mapping[str, tuple[Any, Any]],
    load: Any,
    *,
    capacity: int,
    selected_cf: float,
    title: str = "Capacity and dropped tokens",
) -> go.Figure:
    """Two panels. Left: `dropped = {"layer 0": (capacity factors, dropped fraction), ...}`, with a marker at
    `selected_cf`. Right: one layer's per-expert `load` (assignments routed to each expert in one group) as bars
    split into the part under `capacity` (kept) and the part over it (dropped), with the capacity as a line.

    Raises ValueError for empty inputs, negative loads, a capacity < 1, or mismatched curve lengths.
    """
    from plotly.subplots import make_subplots

    if not isinstance(dropped, Mapping) or not dropped:
        raise ValueError("capacity_figure needs a non-empty mapping layer name -> (capacity factors, dropped)")
    counts = _numbers(load, what="load")
    if not counts:
        raise ValueError("load must have one count per expert, got none")
    if any(c is None or c < 0 for c in counts):
        raise ValueError(f"load must hold non-negative counts, got {counts}")
    if isinstance(capacity, bool) or not isinstance(capacity, Integral) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    curves = line_figure(dropped)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=("dropped assignments vs capacity factor",
                                        f"one group's load per expert (capacity {capacity})"))
    for trace in curves.data:
        fig.add_trace(trace, row=1, col=1)
    experts = [f"e{e}" for e in range(len(counts))]
    kept = [min(c, capacity) for c in counts]
    over = [c - k for c, k in zip(counts, kept)]
    fig.add_trace(go.Bar(x=experts, y=kept, name="kept", marker_color="steelblue"), row=1, col=2)
    fig.add_trace(go.Bar(x=experts, y=over, name="dropped", marker_color="indianred"), row=1, col=2)
    fig.update_layout(barmode="stack")
    fig.add_vline(x=selected_cf, line_dash="dot", line_color="black", row=1, col=1)
    fig.add_hline(y=capacity, line_dash="dash", line_color="black", row=1, col=2)
    _style(fig, title=title, x_title=None, y_title=None)
    fig.update_xaxes(title_text="capacity factor", row=1, col=1)
    fig.update_yaxes(title_text="fraction dropped", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="assignments", row=1, col=2)
    fig.update_layout(margin=dict(t=90))
    return fig


def seed_spread_figure(
    values: Mapping[str, Any],
    *,
    title: str = "",
    y_title: str = "validation loss",
) -> go.Figure:
    """One bar per variant at the mean over seeds, an error bar from the lowest to the highest seed, and each seed
    as a dot: `values = {"variant": [value for seed 0, 1, ...]}` (variants may have different seed counts).

    Raises ValueError for an empty mapping or a variant without values.
    """
    if not isinstance(values, Mapping) or not values:
        raise ValueError("seed_spread_figure needs a non-empty mapping variant -> values per seed")
    names, means, low, high, dots_x, dots_y = [], [], [], [], [], []
    for key, raw in values.items():
        name = _name(key, what="variant")
        ys = [float(v) for v in _numbers(raw, what=f"variant {name!r}") if v is not None]
        if not ys:
            raise ValueError(f"variant {name!r} has no values")
        mean = math.fsum(ys) / len(ys)
        names.append(name)
        means.append(mean)
        low.append(mean - min(ys))
        high.append(max(ys) - mean)
        dots_x += [name] * len(ys)
        dots_y += ys
    fig = go.Figure(go.Bar(x=names, y=means, name="mean over seeds", marker_color="lightsteelblue",
                           error_y=dict(type="data", symmetric=False, array=high, arrayminus=low)))
    fig.add_trace(go.Scatter(x=dots_x, y=dots_y, mode="markers", name="one seed", marker=dict(color="black", size=7)))
    fig = _style(fig, title=title, x_title=None, y_title=y_title)
    # the differences of interest are small: zoom the y axis onto the data instead of starting at zero
    span = max(dots_y) - min(dots_y)
    pad = max(span * 0.3, 1e-3)
    fig.update_yaxes(range=[min(dots_y) - pad, max(dots_y) + pad])
    return fig


__all__ += ["routing_heatmap_figure", "expert_load_figure", "capacity_figure", "seed_spread_figure"]
