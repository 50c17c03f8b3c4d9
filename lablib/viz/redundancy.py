"""Lab 08's figures (redundancy): per-layer similarity bars, CKA across depth, drop-k curves, the random-routing
probe and expert-merging curves. Pure functions of plain data, like everything in `lablib.viz`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from lablib.viz import _numbers, bar_figure, heatmap_figure, line_figure

__all__ = ["similarity_figure", "cka_figure", "drop_figure", "router_probe_figure", "merge_figure"]


def similarity_figure(
    scores: Mapping[str, Sequence[float]], *, title: str = "Input/output similarity of each sublayer"
) -> go.Figure:
    """Grouped bars per layer: `scores = {"attention": [cos per layer], "mlp": [...]}` (all the same length).

    Raises ValueError for an empty mapping or series of different lengths.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("similarity_figure needs a non-empty mapping sublayer -> per-layer scores")
    lengths = {name: len(_numbers(values, what=f"scores {name!r}")) for name, values in scores.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"every sublayer needs one score per layer (same non-zero length), got {lengths}")
    n = next(iter(lengths.values()))
    fig = bar_figure([f"layer {i}" for i in range(n)], dict(scores), title=title, y_title="cos(input, output)",
                     text_format=".3f")
    fig.update_yaxes(range=[min(0.0, min(min(v) for v in scores.values())), 1.0])
    return fig


def cka_figure(matrix: Sequence[Sequence[float]], *, title: str = "Linear CKA between block outputs") -> go.Figure:
    """The (L, L) CKA matrix as a heatmap on a fixed [0, 1] scale, labelled by block. ValueError if not square."""
    rows = [list(r) for r in matrix]
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(f"cka_figure needs a non-empty square matrix, got {len(rows)} rows")
    labels = [f"block {i}" for i in range(len(rows))]
    fig = heatmap_figure(rows, x_labels=labels, y_labels=labels, title=title, colorbar_title="CKA",
                         colorscale="Viridis", text_format=".2f")
    fig.update_traces(zmin=0.0, zmax=1.0)
    return fig


def drop_figure(
    curves: Mapping[str, Sequence[float]],
    *,
    selected_k: int | None = None,
    title: str = "Dropping the most similar sublayers first",
) -> go.Figure:
    """Validation loss against the number of dropped sublayers: `curves = {"attention": [loss at k=0, 1, ...]}`.

    A dotted line marks `selected_k`, and the legend shows each curve's loss there. Raises ValueError for an empty
    mapping, an empty curve, or a `selected_k` beyond some curve.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("drop_figure needs a non-empty mapping kind -> losses for k = 0, 1, ...")
    series = {}
    for name, losses in curves.items():
        ys = _numbers(losses, what=f"curve {name!r}")
        if not ys:
            raise ValueError(f"curve {name!r} is empty")
        label = str(name)
        if selected_k is not None:
            if not 0 <= selected_k < len(ys):
                raise ValueError(f"selected_k={selected_k} is outside curve {name!r} (k = 0..{len(ys) - 1})")
            label = f"{name} (k={selected_k}: {ys[selected_k]:.3f})"
        series[label] = (list(range(len(ys))), ys)
    fig = line_figure(series, title=title, x_title="sublayers dropped (k)", y_title="validation loss (nats/byte)",
                      markers=True)
    if selected_k is not None:
        fig.add_vline(x=selected_k, line_dash="dot", line_color="black")
    return fig


def router_probe_figure(
    deltas: Mapping[str, Sequence[float]],
    *,
    title: str = "Random routing in one layer: loss increase",
) -> go.Figure:
    """Bars per MoE layer of the loss increase when that layer routes uniformly at random; one series per seed
    (`deltas = {"seed 0": [Δ layer 0, Δ layer 1, ...]}`). ValueError for ragged or empty input."""
    if not isinstance(deltas, Mapping) or not deltas:
        raise ValueError("router_probe_figure needs a non-empty mapping series -> per-layer loss increases")
    lengths = {name: len(_numbers(v, what=f"deltas {name!r}")) for name, v in deltas.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"every series needs one value per MoE layer (same non-zero length), got {lengths}")
    n = next(iter(lengths.values()))
    fig = bar_figure([f"layer {i}" for i in range(n)], dict(deltas), title=title,
                     y_title="loss increase (nats/byte)", x_title="MoE layer (depth →)")
    fig.add_hline(y=0.0, line_color="gray")
    return fig


def merge_figure(
    groups: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    *,
    selected: int | None = None,
    title: str = "Merging experts: loss against experts kept per layer",
) -> go.Figure:
    """Loss against experts kept per layer, one line per merge method: `curves = {"average": [loss per groups[i]]}`.

    `selected` marks one expert count with a dotted line. ValueError for empty or mismatched input, or a `selected`
    that is not in `groups`.
    """
    xs = list(groups)
    if not xs:
        raise ValueError("merge_figure needs at least one expert count")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("merge_figure needs a non-empty mapping method -> losses")
    if selected is not None and selected not in xs:
        raise ValueError(f"selected={selected} is not one of the expert counts {xs}")
    series: dict[str, Any] = {}
    for name, losses in curves.items():
        ys = _numbers(losses, what=f"curve {name!r}")
        if len(ys) != len(xs):
            raise ValueError(f"curve {name!r} has {len(ys)} losses for {len(xs)} expert counts")
        label = f"{name} ({selected} experts: {ys[xs.index(selected)]:.3f})" if selected is not None else str(name)
        series[label] = (xs, ys)
    fig = line_figure(series, title=title, x_title="experts per layer after merging",
                      y_title="validation loss (nats/byte)", markers=True)
    fig.update_xaxes(autorange="reversed")
    if selected is not None:
        fig.add_vline(x=selected, line_dash="dot", line_color="black")
    return fig
