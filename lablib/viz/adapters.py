"""Lab 03's figures (adapters from shared banks): adapted validation loss against stored parameters per adapter kind,
and which bank entries each layer picks. Pure functions of plain data, like everything in `lablib.viz`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from lablib.viz import _numbers, _style

__all__ = ["budget_figure", "bank_usage_figure"]

_PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")


def budget_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], *, selected: float | None = None,
                  base_loss: float | None = None, title: str = "Adapted validation loss vs stored parameters"
                  ) -> go.Figure:
    """One line per kind: `curves[kind] = {"stored": [...], "loss": [...], "low": [...], "high": [...]}` (low/high:
    the seed range, optional). `selected` draws a vertical line at that budget and enlarges each kind's point there;
    `base_loss` a horizontal line (the base LM before adapting). Log x axis. Raises ValueError on ragged or
    non-positive data."""
    if not curves:
        raise ValueError("curves must name at least one kind")
    fig = go.Figure()
    for i, (kind, curve) in enumerate(curves.items()):
        for key in ("stored", "loss"):
            if key not in curve:
                raise ValueError(f"curves[{kind!r}] has no {key!r}")
        stored = _numbers(curve["stored"], what=f"curves[{kind!r}]['stored']")
        loss = _numbers(curve["loss"], what=f"curves[{kind!r}]['loss']")
        if len(stored) != len(loss) or not stored:
            raise ValueError(f"curves[{kind!r}]: stored ({len(stored)}) and loss ({len(loss)}) must be non-empty and "
                             "of equal length")
        if any(s is None or s <= 0 for s in stored):
            raise ValueError(f"curves[{kind!r}]['stored'] must be positive (log axis)")
        error = None
        if "low" in curve and "high" in curve:
            low = _numbers(curve["low"], what="low")
            high = _numbers(curve["high"], what="high")
            if len(low) != len(loss) or len(high) != len(loss):
                raise ValueError(f"curves[{kind!r}]: low/high must match loss in length")
            error = dict(type="data", symmetric=False, array=[h - m for h, m in zip(high, loss)],
                         arrayminus=[m - lo for m, lo in zip(loss, low)], thickness=1)
        sizes = [8] * len(stored)
        if selected is not None:
            nearest = min(range(len(stored)), key=lambda j: abs(stored[j] - selected))
            sizes[nearest] = 16
        fig.add_trace(go.Scatter(x=stored, y=loss, mode="lines+markers", name=str(kind), error_y=error,
                                 marker=dict(size=sizes, color=_PALETTE[i % len(_PALETTE)]),
                                 line=dict(color=_PALETTE[i % len(_PALETTE)])))
    if selected is not None:
        fig.add_vline(x=selected, line_dash="dot", line_color="gray")
    if base_loss is not None:
        fig.add_hline(y=base_loss, line_dash="dash", line_color="gray", annotation_text="base LM, not adapted")
    return _style(fig, title=title, x_title="stored parameters (adapter_ledger)",
                  y_title="validation loss on Python (nats/byte)", log_x=True)


def bank_usage_figure(layers: Sequence[str], counts: Sequence[Sequence[float]], *, private_from: int | None = None,
                      title: str = "Bank usage: how often each layer picks each bank entry") -> go.Figure:
    """A heatmap, one row per layer, one column per bank entry (a VB-LoRA vector or a MoS pool row), coloured by how
    many of that layer's sub-vectors / shards use it; `private_from` marks where layer-private rows start."""
    layers = [str(name) for name in layers]
    rows = [_numbers(row, what="counts row") for row in counts]
    if not layers or len(rows) != len(layers):
        raise ValueError(f"counts must have one row per layer: {len(rows)} rows for {len(layers)} layers")
    width = len(rows[0])
    if width == 0 or any(len(row) != width for row in rows):
        raise ValueError("counts rows must be non-empty and of equal length")
    if any(v is None or v < 0 for row in rows for v in row):
        raise ValueError("counts must be non-negative numbers")
    if private_from is not None and not 0 <= private_from <= width:
        raise ValueError(f"private_from must be in [0, {width}], got {private_from}")
    fig = go.Figure(go.Heatmap(z=rows, y=layers, x=list(range(width)), colorscale="Blues",
                               colorbar=dict(title="picks")))
    if private_from is not None and private_from < width:
        fig.add_vline(x=private_from - 0.5, line_color="#e45756", annotation_text="private rows")
    fig = _style(fig, title=title, x_title="bank entry", y_title=None)
    fig.update_yaxes(autorange="reversed")
    return fig
