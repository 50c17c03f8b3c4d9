"""Lab 05's figures: task vectors (sign conflicts, magnitudes), per-task accuracy of every merge, DARE drop curves
and the interpolation curve with and without permutation alignment. Pure functions of plain numbers and tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch

from lablib.viz import _style

__all__ = [
    "sign_conflicts",
    "sign_conflict_figure",
    "magnitude_histogram_figure",
    "method_bars_figure",
    "dare_curve_figure",
    "interpolation_figure",
]


def sign_conflicts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """1.0 where the tensors' nonzero entries do not all share one sign, else 0.0 (same shape as each tensor)."""
    if len(tensors) < 2:
        raise ValueError(f"sign conflicts need at least two task vectors, got {len(tensors)}")
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ValueError(f"task vectors differ in shape: {[tuple(t.shape) for t in tensors]}")
    stacked = torch.stack([t.detach().float() for t in tensors])
    return ((stacked > 0).any(dim=0) & (stacked < 0).any(dim=0)).float()


def sign_conflict_figure(task_vectors: Sequence[Mapping[str, torch.Tensor]], *, key: str, max_rows: int = 64,
                         title: str | None = None) -> go.Figure:
    """Heatmap of weight matrix `key`: where the task vectors disagree in sign (1) or agree (0)."""
    for t, tv in enumerate(task_vectors):
        if key not in tv:
            raise ValueError(f"task_vectors[{t}] has no key {key!r}")
    conflicts = sign_conflicts([tv[key] for tv in task_vectors])
    if conflicts.dim() == 1:
        conflicts = conflicts.unsqueeze(0)
    if conflicts.dim() != 2:
        raise ValueError(f"{key!r} must be a vector or a matrix, got shape {tuple(conflicts.shape)}")
    fraction = float(conflicts.mean())
    fig = go.Figure(go.Heatmap(z=conflicts[:max_rows].tolist(), zmin=0, zmax=1, showscale=False,
                               colorscale=[[0, "#f0f0f0"], [1, "#c0392b"]]))
    fig = _style(fig, title=title or f"{key}: sign conflicts (red) in {fraction:.0%} of entries",
                 x_title="input unit", y_title="output unit")
    fig.update_yaxes(autorange="reversed")
    return fig


def magnitude_histogram_figure(task_vectors: Sequence[Mapping[str, torch.Tensor]], *, names: Sequence[str],
                               bins: int = 40, title: str | None = None) -> go.Figure:
    """Overlaid histograms of log10 |τ| over all entries of each task vector (zeros left out)."""
    if len(names) != len(task_vectors):
        raise ValueError(f"got {len(names)} names for {len(task_vectors)} task vectors")
    fig = go.Figure()
    for name, tv in zip(names, task_vectors):
        flat = torch.cat([v.detach().float().reshape(-1) for v in tv.values()]).abs()
        flat = flat[flat > 0]
        fig.add_trace(go.Histogram(x=flat.log10().tolist(), name=str(name), opacity=0.6, nbinsx=bins))
    fig.update_layout(barmode="overlay")
    return _style(fig, title=title or "task-vector magnitudes", x_title="log10 |τ|", y_title="entries")


def method_bars_figure(rows: Mapping[str, Sequence[float]], *, task_names: Sequence[str],
                       title: str | None = None) -> go.Figure:
    """Grouped bars: per-task accuracy (one bar per task) for each method, plus the mean as a marker."""
    if not rows:
        raise ValueError("rows is empty")
    methods = list(rows)
    for m in methods:
        if len(rows[m]) != len(task_names):
            raise ValueError(f"{m!r} has {len(rows[m])} accuracies for {len(task_names)} tasks")
        if any(not (0 <= float(a) <= 1) for a in rows[m]):
            raise ValueError(f"{m!r}: accuracies must lie in [0, 1]")
    fig = go.Figure()
    for t, name in enumerate(task_names):
        fig.add_trace(go.Bar(x=methods, y=[float(rows[m][t]) for m in methods], name=str(name)))
    fig.add_trace(go.Scatter(x=methods, y=[sum(map(float, rows[m])) / len(task_names) for m in methods],
                             mode="markers", marker=dict(symbol="diamond", size=10, color="black"), name="mean"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1])
    return _style(fig, title=title, x_title=None, y_title="accuracy on the task's digits")


def dare_curve_figure(curve: Mapping[str, Any], *, title: str | None = None) -> go.Figure:
    """Accuracy against drop rate p for DARE and DAREx-q (`experiments.merging.dare_curve`'s dict)."""
    p = [float(x) for x in curve["drop_rates"]]
    fig = go.Figure()
    for name in ("dare", "darex_q"):
        if len(curve[name]) != len(p):
            raise ValueError(f"{name!r} has {len(curve[name])} values for {len(p)} drop rates")
        fig.add_trace(go.Scatter(x=p, y=list(curve[name]), mode="lines+markers",
                                 name="DARE (÷ 1−p)" if name == "dare" else "DAREx-q (÷ q)"))
    return _style(fig, title=title or "pruning one expert's task vector", x_title="drop rate p",
                  y_title="own-task accuracy")


def interpolation_figure(curves: Mapping[str, Any], *, alpha: float | None = None,
                         title: str | None = None) -> go.Figure:
    """Loss along (1−α)θ_A + αθ_B, naive and after weight matching; an optional marker at `alpha`."""
    alphas = [float(a) for a in curves["alphas"]]
    fig = go.Figure()
    for name, label in (("naive", "naive"), ("aligned", "after weight matching")):
        values = [float(v) for v in curves[name]]
        if len(values) != len(alphas) or any(not math.isfinite(v) for v in values):
            raise ValueError(f"{name!r} must hold one finite loss per alpha")
        fig.add_trace(go.Scatter(x=alphas, y=values, mode="lines+markers", name=label))
    if alpha is not None:
        fig.add_vline(x=float(alpha), line_dash="dot")
    barriers = f"barrier {curves['barrier_naive']:.2f} naive, {curves['barrier_aligned']:.2f} aligned"
    return _style(fig, title=title or f"linear interpolation: {barriers}", x_title="α (0 = A, 1 = B)",
                  y_title="validation loss")
