"""Lab 06's figures: sparse masks. Loss against density per pruning method (with the slider's density marked), mask
images per layer, an N:M pattern up close, per-seed comparisons (learned vs magnitude N:M, FISH vs full fine-tuning)
and the grafting recovery curve. Pure functions of plain numbers and boolean arrays, like everything in
`lablib.viz`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lablib.viz import _style

__all__ = ["density_figure", "graft_figure", "mask_images_figure", "nm_zoom_figure", "seed_bars_figure"]

_LOSS = "validation loss (nats/byte)"


def _matrix(values: Any, *, what: str) -> list[list[float]]:
    """A 2-D array-like (tensor, ndarray, nested lists) as nested lists of floats; ValueError if not 2-D."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    if (not isinstance(values, (list, tuple)) or not values
            or any(not isinstance(r, (list, tuple)) or not r or len(r) != len(values[0]) for r in values)):
        raise ValueError(f"{what} must be a non-empty 2-D array")
    return [[float(v) for v in row] for row in values]


def density_figure(
    densities: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    density: float | None = None,
    dense_loss: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Validation loss against density (kept fraction, 1 = dense), one line per method in `curves` ({method: loss per
    density}); a dotted horizontal line at `dense_loss` and, when `density` is given, a vertical line there with
    each method's loss at that density in the hover and the legend name.

    Raises ValueError for no curves, a curve whose length differs from `densities`, a density outside [0, 1], or a
    `density` that is not one of `densities`.
    """
    densities = [float(d) for d in densities]
    if not curves:
        raise ValueError("density_figure needs at least one curve")
    if not densities or any(not 0.0 <= d <= 1.0 for d in densities):
        raise ValueError(f"densities must be a non-empty list in [0, 1], got {densities}")
    for method, losses in curves.items():
        if len(losses) != len(densities):
            raise ValueError(f"curve {method!r} has {len(losses)} losses for {len(densities)} densities")
    if density is not None and not any(math.isclose(density, d) for d in densities):
        raise ValueError(f"density {density} is not one of the swept densities {densities}")
    at = None if density is None else min(range(len(densities)), key=lambda i: abs(densities[i] - density))
    fig = go.Figure()
    for method, losses in curves.items():
        name = method if at is None else f"{method}: {float(losses[at]):.3f}"
        fig.add_trace(go.Scatter(x=densities, y=[float(v) for v in losses], name=name, mode="lines+markers",
                                 hovertemplate="density %{x:.2f}<br>val loss %{y:.3f}<extra>" + method + "</extra>"))
    if dense_loss is not None:
        fig.add_hline(y=dense_loss, line_dash="dot", line_color="gray")
    if density is not None:
        fig.add_vline(x=density, line_dash="dash", line_color="black")
    fig = _style(fig, title=title or "Loss after one-shot pruning, no retraining", x_title="density (kept fraction)",
                 y_title=_LOSS)
    fig.update_xaxes(autorange="reversed")  # sparser to the right: the way a pruning run goes
    return fig


def mask_images_figure(
    masks: Mapping[str, Any],
    *,
    columns: int = 4,
    max_rows: int = 64,
    max_cols: int = 64,
    title: str | None = None,
) -> go.Figure:
    """One small image per layer: the top-left `max_rows` x `max_cols` corner of each boolean mask (kept = dark),
    titled with the layer name and its density over the whole tensor. `masks` maps names to 2-D arrays of 0/1.

    Raises ValueError for no masks, a mask that is not 2-D, or `columns` < 1.
    """
    if not masks:
        raise ValueError("mask_images_figure needs at least one mask")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    names = list(masks)
    grids = {name: _matrix(masks[name], what=f"mask {name!r}") for name in names}
    columns = min(columns, len(names))
    n_rows = math.ceil(len(names) / columns)
    titles = []
    for name in names:
        grid = grids[name]
        density = sum(map(sum, grid)) / (len(grid) * len(grid[0]))
        titles.append(f"{name} ({density:.0%})")
    fig = make_subplots(rows=n_rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=0.12 / max(n_rows, 1) + 0.04)
    for i, name in enumerate(names):
        corner = [row[:max_cols] for row in grids[name][:max_rows]]
        fig.add_trace(go.Heatmap(z=corner, zmin=0, zmax=1, colorscale=[[0, "white"], [1, "#1f3b73"]],
                                 showscale=False, name=name,
                                 hovertemplate="out %{y}, in %{x}: %{z}<extra>" + name + "</extra>"),
                      row=i // columns + 1, col=i % columns + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_annotations(font_size=10)
    fig = _style(fig, title=title or "Masks per layer (kept = dark; top-left corner of each weight)", x_title=None,
                 y_title=None)
    fig.update_layout(height=max(260, 190 * n_rows))
    return fig


def nm_zoom_figure(
    weight: Any,
    mask: Any,
    *,
    m: int = 4,
    title: str | None = None,
) -> go.Figure:
    """An N:M pattern up close: the weights of a small block (rows = outputs, columns = inputs), pruned entries
    blanked, every kept weight printed, and a vertical line between consecutive groups of `m` inputs.

    Raises ValueError when `weight` and `mask` differ in shape, the column count is not a multiple of `m`, or m < 1.
    """
    values = _matrix(weight, what="weight")
    kept = _matrix(mask, what="mask")
    if len(values) != len(kept) or len(values[0]) != len(kept[0]):
        raise ValueError(f"weight is {len(values)}x{len(values[0])} but mask is {len(kept)}x{len(kept[0])}")
    if m < 1 or len(values[0]) % m:
        raise ValueError(f"the {len(values[0])} columns must split into groups of m={m}")
    shown = [[v if k else None for v, k in zip(vr, kr)] for vr, kr in zip(values, kept)]
    text = [[f"{v:+.2f}" if k else "" for v, k in zip(vr, kr)] for vr, kr in zip(values, kept)]
    fig = go.Figure(go.Heatmap(z=shown, text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0,
                               showscale=False, xgap=1, ygap=1,
                               hovertemplate="out %{y}, in %{x}: %{z:.3f}<extra></extra>"))
    for boundary in range(m, len(values[0]), m):
        fig.add_vline(x=boundary - 0.5, line_color="black", line_width=2)
    fig = _style(fig, title=title or f"Kept weights, groups of {m} inputs between the black lines",
                 x_title="input (column)", y_title="output (row)")
    fig.update_yaxes(autorange="reversed")
    return fig


def seed_bars_figure(
    values: Mapping[str, Sequence[float]],
    *,
    seeds: Sequence[int] | None = None,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
    y_title: str = _LOSS,
) -> go.Figure:
    """One bar per method at its mean over seeds ({method: value per seed}), each seed as a dot on its bar, and
    labelled dotted horizontal lines for `reference` values (e.g. the dense model or the base before fine-tuning).

    Raises ValueError for no methods, methods with different seed counts, or `seeds` of another length.
    """
    if not values:
        raise ValueError("seed_bars_figure needs at least one method")
    counts = {len(v) for v in values.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every method needs the same non-zero number of seeds, got {counts}")
    count = counts.pop()
    seeds = list(range(count)) if seeds is None else list(seeds)
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds given for {count} values per method")
    methods = list(values)
    means = [sum(map(float, values[k])) / count for k in methods]
    fig = go.Figure(go.Bar(x=methods, y=means, name="mean over seeds", text=[f"{v:.3f}" for v in means],
                           textposition="outside", marker_color="#9fb4d9"))
    fig.add_trace(go.Scatter(
        x=[k for k in methods for _ in range(count)], y=[float(v) for k in methods for v in values[k]],
        mode="markers", name="one seed", marker=dict(color="black", size=7),
        text=[f"seed {s}" for _ in methods for s in seeds], hovertemplate="%{text}: %{y:.3f}<extra></extra>"))
    for label, value in (reference or {}).items():
        fig.add_hline(y=value, line_dash="dot", line_color="gray", annotation_text=f"{label} {value:.3f}",
                      annotation_position="top left")
    fig = _style(fig, title=title, x_title=None, y_title=y_title)
    lows = [float(v) for k in methods for v in values[k]] + list((reference or {}).values())
    highs = lows
    pad = 0.15 * (max(highs) - min(lows) or 1.0)
    fig.update_yaxes(range=[min(lows) - pad, max(highs) + pad])
    return fig


def graft_figure(
    fractions: Sequence[float],
    recovery: Mapping[str, Sequence[float]],
    *,
    most: float = 0.5,
    fraction: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Grafting: share of the fine-tune's loss improvement recovered (1 = the fine-tuned model, 0 = the base)
    against the fraction of weights grafted (log x), one line per seed ({label: recovery per fraction}), a dotted
    line at `most`, and a vertical line at the slider's `fraction`.

    Raises ValueError for no curves, a curve of the wrong length, or a non-positive fraction (log axis).
    """
    fractions = [float(f) for f in fractions]
    if not recovery:
        raise ValueError("graft_figure needs at least one recovery curve")
    if not fractions or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be > 0 for the log axis, got {fractions}")
    for label, values in recovery.items():
        if len(values) != len(fractions):
            raise ValueError(f"curve {label!r} has {len(values)} values for {len(fractions)} fractions")
    fig = go.Figure()
    for label, values in recovery.items():
        fig.add_trace(go.Scatter(x=fractions, y=[float(v) for v in values], name=label, mode="lines+markers",
                                 hovertemplate="%{x:.2%} grafted: %{y:.0%} recovered<extra>" + label + "</extra>"))
    fig.add_hline(y=most, line_dash="dot", line_color="gray", annotation_text=f"{most:.0%} of the fine-tune")
    fig.add_hline(y=1.0, line_color="lightgray")
    if fraction is not None:
        fig.add_vline(x=fraction, line_dash="dash", line_color="black")
    fig = _style(fig, title=title or "How much of the fine-tune a few grafted weights recover",
                 x_title="fraction of weights grafted (log)", y_title="share of the loss improvement recovered",
                 log_x=True)
    fig.update_yaxes(tickformat=".0%")
    return fig
