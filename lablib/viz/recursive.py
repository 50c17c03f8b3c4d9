"""Lab 04's figures (recursive transformers): text coloured by recursion depth, the relaxed-recursion rank curve, the
loss Pareto chart against training FLOPs and parameters, and KV-cache size / speed per KV strategy. Pure functions of
plain data, like everything in `lablib.viz`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lablib.viz import _name, _numbers, _style, _vector

__all__ = ["depth_text_figure", "rank_curve_figure", "pareto_figure", "pareto_frontier", "kv_strategy_figure"]

_PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")


def depth_text_figure(chars: Sequence[str], depths: Sequence[int], *, num_recursion: int, width: int = 48,
                      title: str = "Recursion depth per byte") -> go.Figure:
    """The text laid out in rows of `width` characters, each cell coloured by its depth (1..num_recursion) and
    labelled with its character. Raises ValueError when lengths differ, a depth is out of range or a char is not one
    character."""
    chars = _vector(chars, what="chars")
    depths = _numbers(depths, what="depths")
    if len(chars) != len(depths):
        raise ValueError(f"chars ({len(chars)}) and depths ({len(depths)}) must have the same length")
    if not chars:
        raise ValueError("chars must be non-empty")
    if not isinstance(num_recursion, int) or num_recursion < 1:
        raise ValueError(f"num_recursion must be an int >= 1, got {num_recursion!r}")
    bad = [d for d in depths if d is None or d != int(d) or not 1 <= d <= num_recursion]
    if bad:
        raise ValueError(f"depths must be ints in [1, {num_recursion}], got {bad[0]!r}")
    if any(not isinstance(c, str) or len(c) != 1 for c in chars):
        raise ValueError("chars must be single characters")
    rows = math.ceil(len(chars) / width)
    z = [[None] * width for _ in range(rows)]
    text = [[""] * width for _ in range(rows)]
    for i, (c, d) in enumerate(zip(chars, depths)):
        z[i // width][i % width] = int(d)
        text[i // width][i % width] = c
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", textfont=dict(family="monospace", size=12),
        colorscale="Blues", zmin=0.5, zmax=num_recursion + 0.5, xgap=1, ygap=1,
        colorbar=dict(title="depth", tickvals=list(range(1, num_recursion + 1))),
        hovertemplate="char %{text}<br>depth %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    _style(fig, title=title, x_title=None, y_title=None)
    fig.update_layout(height=max(160, 28 * rows + 90))
    return fig


def rank_curve_figure(ranks: Sequence[int], params: Sequence[int], loss_by_init: Mapping[str, Sequence[float]], *,
                      selected_rank: int, vanilla_loss: float | None = None, vanilla_params: int | None = None,
                      title: str = "Relaxed recursion: parameters vs loss, no training") -> go.Figure:
    """Validation loss against parameters, one line per initialisation, each point a LoRA rank (0 = pure recursion);
    the `selected_rank` is ringed; optional vanilla model as a star. Raises ValueError on mismatched lengths or a
    selected rank not in `ranks`."""
    ranks = _numbers(ranks, what="ranks")
    params = _numbers(params, what="params")
    if len(ranks) != len(params) or not ranks:
        raise ValueError(f"ranks ({len(ranks)}) and params ({len(params)}) must be non-empty and of equal length")
    if selected_rank not in ranks:
        raise ValueError(f"selected_rank {selected_rank!r} is not one of the ranks {ranks}")
    if not loss_by_init:
        raise ValueError("loss_by_init must be non-empty")
    fig = go.Figure()
    at = ranks.index(selected_rank)
    for i, (init, losses) in enumerate(loss_by_init.items()):
        losses = _numbers(losses, what=f"loss {_name(init, what='initialization')!r}")
        if len(losses) != len(ranks):
            raise ValueError(f"loss {init!r} has {len(losses)} values for {len(ranks)} ranks")
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=params, y=losses, mode="lines+markers+text", name=f"{init} init",
                                 text=[f"r{int(r)}" for r in ranks], textposition="top center",
                                 line=dict(color=color)))
        fig.add_trace(go.Scatter(x=[params[at]], y=[losses[at]], mode="markers", showlegend=False,
                                 marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(color=color, width=3)),
                                 name=f"{init} r{selected_rank}"))
    if vanilla_loss is not None and vanilla_params is not None:
        fig.add_trace(go.Scatter(x=[vanilla_params], y=[vanilla_loss], mode="markers", name="vanilla (untied)",
                                 marker=dict(symbol="star", size=14, color="black")))
    return _style(fig, title=title, x_title="parameters", y_title="validation loss (nats/byte)")


def pareto_frontier(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both x and y (lower is better), sorted by x."""
    xs, ys = list(xs), list(ys)
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    frontier, best = [], math.inf
    for i in order:
        if ys[i] < best:
            frontier.append(i)
            best = ys[i]
    return frontier


def pareto_figure(points: Mapping[str, Mapping[str, float]], *,
                  title: str = "Validation loss vs training FLOPs and vs parameters") -> go.Figure:
    """Two panels, loss against training FLOPs (left) and against parameters (right), one marker per model with
    its seed range as an error bar and the Pareto frontier as a dashed line. `points = {label: {"loss", "loss_min",
    "loss_max", "train_flops", "params"}}`. Raises ValueError on missing keys or non-positive x values."""
    if not points:
        raise ValueError("points must be non-empty")
    keys = ("loss", "loss_min", "loss_max", "train_flops", "params")
    for label, p in points.items():
        missing = [k for k in keys if k not in p]
        if missing:
            raise ValueError(f"point {label!r} lacks {missing}")
        if p["train_flops"] <= 0 or p["params"] <= 0:
            raise ValueError(f"point {label!r} needs positive train_flops and params for the log axes")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("vs training FLOPs", "vs parameters"))
    labels = list(points)
    for col, xkey in ((1, "train_flops"), (2, "params")):
        xs = [points[lab][xkey] for lab in labels]
        ys = [points[lab]["loss"] for lab in labels]
        for i, lab in enumerate(labels):
            p = points[lab]
            fig.add_trace(go.Scatter(
                x=[xs[i]], y=[ys[i]], mode="markers", name=lab, legendgroup=lab, showlegend=col == 1,
                marker=dict(size=11, color=_PALETTE[i % len(_PALETTE)]),
                error_y=dict(type="data", symmetric=False, array=[p["loss_max"] - p["loss"]],
                             arrayminus=[p["loss"] - p["loss_min"]])), row=1, col=col)
        front = pareto_frontier(xs, ys)
        fig.add_trace(go.Scatter(x=[xs[i] for i in front], y=[ys[i] for i in front], mode="lines",
                                 line=dict(dash="dash", color="grey"), name="Pareto frontier",
                                 showlegend=col == 1, legendgroup="frontier"), row=1, col=col)
        fig.update_xaxes(type="log", row=1, col=col, title_text="training FLOPs" if col == 1 else "parameters")
    _style(fig, title=title, x_title=None, y_title=None)
    fig.update_xaxes(type="log")
    fig.update_yaxes(title_text="validation loss (nats/byte)", row=1, col=1)
    fig.update_layout(height=480, legend=dict(orientation="h", y=-0.25, yanchor="top"),
                      margin=dict(b=140))
    return fig


def kv_strategy_figure(rows: Sequence[Mapping[str, Any]], *,
                       title: str = "Generation: KV-cache size and speed per strategy") -> go.Figure:
    """Two bar panels over the rows' labels: KV-cache entries ((token, layer) pairs; kibibytes in the hover) and
    tokens per second. `rows = [{"label", "kv_cache_entries", "kv_cache_bytes", "tokens_per_second"}]`."""
    if not rows:
        raise ValueError("rows must be non-empty")
    for r in rows:
        missing = [k for k in ("label", "kv_cache_entries", "kv_cache_bytes", "tokens_per_second") if k not in r]
        if missing:
            raise ValueError(f"row {r.get('label', '?')!r} lacks {missing}")
    labels = [str(r["label"]) for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KV-cache entries (token x layer)", "tokens / second"))
    fig.add_trace(go.Bar(x=labels, y=[r["kv_cache_entries"] for r in rows], name="KV entries",
                         text=[f"{r['kv_cache_bytes'] / 1024:.0f} KiB" for r in rows], textposition="outside",
                         marker_color=_PALETTE[0]), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r["tokens_per_second"] for r in rows], name="tokens/s",
                         text=[f"{r['tokens_per_second']:.0f}" for r in rows], textposition="outside",
                         marker_color=_PALETTE[1]), row=1, col=2)
    _style(fig, title=title, x_title=None, y_title=None)
    fig.update_layout(showlegend=False, height=420)
    return fig
