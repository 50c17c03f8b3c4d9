"""Lab 09's figure: the parameter-accuracy frontier. One marker per technique point (validation loss against stored
parameters or FLOPs per token, log x), coloured by family, the Pareto front as a line, and a budget line. A pure
function of the sweep's rows, like everything in `lablib.viz`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from lablib.viz import _style

__all__ = ["AXIS_TITLES", "frontier_figure"]

AXIS_TITLES = {"stored": "stored parameters", "flops_per_token": "forward FLOPs per token"}
_REQUIRED = ("name", "family", "val_loss")


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both coordinates (lower x and lower loss), sorted by x."""
    front, best = [], math.inf
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def frontier_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str = "stored",
    budget: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Validation loss against `x` ("stored" or "flops_per_token") for every row (a dict with `name`, `family`,
    `val_loss` and `x`): one scatter trace per family, in first-appearance order, a dashed "Pareto front" line
    through the undominated points, and, when `budget` is given, a vertical line there with the best point within
    budget circled.

    Raises ValueError for no rows, an unknown axis, a row missing a key, or a non-positive x (log axis).
    """
    if x not in AXIS_TITLES:
        raise ValueError(f"x must be one of {sorted(AXIS_TITLES)}, got {x!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("frontier_figure needs at least one row")
    for i, row in enumerate(rows):
        missing = [k for k in (*_REQUIRED, x) if k not in row]
        if missing:
            raise ValueError(f"row {i} ({row.get('name', '?')!r}) has no {missing}")
        if not row[x] > 0:
            raise ValueError(f"row {row['name']!r} has {x} = {row[x]!r}; the log axis needs values > 0")
    fig = go.Figure()
    families: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        families.setdefault(str(row["family"]), []).append(row)
    for family, members in families.items():
        fig.add_trace(go.Scatter(
            x=[r[x] for r in members], y=[r["val_loss"] for r in members], name=family, mode="markers",
            marker=dict(size=10), text=[r["name"] for r in members],
            hovertemplate="%{text}<br>%{x:,.0f}<br>val loss %{y:.3f}<extra></extra>",
        ))
    front = _pareto([(float(r[x]), float(r["val_loss"]), str(r["name"])) for r in rows])
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], name="Pareto front",
                             mode="lines", line=dict(dash="dash", color="black")))
    if budget is not None:
        fig.add_vline(x=budget, line_dash="dot", line_color="gray")
        fitting = [r for r in rows if r[x] <= budget]
        if fitting:
            best = min(fitting, key=lambda r: (r["val_loss"], r[x]))
            fig.add_trace(go.Scatter(x=[best[x]], y=[best["val_loss"]], name=f"best within budget: {best['name']}",
                                     mode="markers", marker=dict(size=20, symbol="circle-open", color="red",
                                                                 line=dict(width=2))))
    default_title = f"Validation loss against {AXIS_TITLES[x]}"
    return _style(fig, title=title or default_title, x_title=AXIS_TITLES[x] + " (log)",
                  y_title="validation loss (nats/byte)", log_x=True)
