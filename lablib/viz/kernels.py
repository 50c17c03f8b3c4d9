"""Lab 07's figures (Triton MoE kernels): the token permutation, the padding cost of one-expert tiles, the kernel
check, and the recorded GPU benchmark. Pure functions of plain data, like everything in `lablib.viz`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative

from lablib.viz import _style, bar_figure, line_figure

__all__ = ["permutation_figure", "padding_waste_figure", "kernel_check_figure", "benchmark_figure"]

_PALETTE = qualitative.Plotly
_PAD_COLOR = "#d0d0d0"


def _ints(values: Any, *, what: str) -> list[int]:
    out = list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{what} must be ints, got {out!r}")
    return out


def permutation_figure(
    *,
    expert_of_assignment: Sequence[int],
    padded_rows: Sequence[int],
    row_expert: Sequence[int],
    top_k: int,
    block_m: int,
    title: str | None = None,
) -> go.Figure:
    """Three columns of the same assignments: in token order (t.s = token t, slot s), sorted by expert, and in the
    padded tiles (padding rows grey, a dashed line between tiles); colour = expert, grey lines follow each assignment.

    `expert_of_assignment` (M,): expert of assignment a = t·k + s; `padded_rows` (P,): the assignment in each padded
    row, −1 for padding; `row_expert` (P,): the expert of each row's tile. Raises ValueError when the rows are not a
    permutation of the assignments plus padding, the lengths disagree, or P is not a multiple of block_m.
    """
    experts = _ints(expert_of_assignment, what="expert_of_assignment")
    rows = _ints(padded_rows, what="padded_rows")
    row_experts = _ints(row_expert, what="row_expert")
    if top_k < 1 or block_m < 1:
        raise ValueError(f"top_k and block_m must be >= 1, got {top_k} and {block_m}")
    if len(rows) != len(row_experts) or len(rows) % block_m:
        raise ValueError(f"padded_rows ({len(rows)}) and row_expert ({len(row_experts)}) must have one equal length, "
                         f"a multiple of block_m={block_m}")
    real = [a for a in rows if a >= 0]
    if sorted(real) != list(range(len(experts))):
        raise ValueError("padded_rows must hold every assignment 0..M-1 exactly once (and -1 for padding)")
    if any(experts[a] != e for a, e in zip(rows, row_experts) if a >= 0):
        raise ValueError("an assignment sits in a tile of another expert")
    label = [f"t{a // top_k}.s{a % top_k}" for a in range(len(experts))]
    sorted_ids = real  # padded order with the padding removed is the sorted order
    position = {"token order": {a: a for a in range(len(experts))},
                "sorted by expert": {a: i for i, a in enumerate(sorted_ids)},
                "padded tiles": {a: i for i, a in enumerate(rows) if a >= 0}}
    columns = list(position)
    fig = go.Figure()
    # grey lines: where each assignment moves
    line_x, line_y = [], []
    for a in range(len(experts)):
        line_x += [columns[0], columns[1], columns[2], None]
        line_y += [position[c][a] for c in columns] + [None]
    fig.add_trace(go.Scatter(x=line_x, y=line_y, mode="lines", line=dict(color="#bbbbbb", width=1),
                             hoverinfo="skip", showlegend=False))
    for e in sorted(set(experts)):
        xs, ys, texts = [], [], []
        for c in columns:
            for a, y in position[c].items():
                if experts[a] == e:
                    xs.append(c)
                    ys.append(y)
                    texts.append(label[a])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=texts, textposition="middle right",
                                 marker=dict(symbol="square", size=12, color=_PALETTE[e % len(_PALETTE)]),
                                 name=f"expert {e}"))
    pads = [i for i, a in enumerate(rows) if a < 0]
    if pads:
        fig.add_trace(go.Scatter(x=[columns[2]] * len(pads), y=pads, mode="markers+text", text=["pad"] * len(pads),
                                 textposition="middle right",
                                 marker=dict(symbol="square-open", size=12, color="#999999"), name="padding"))
    for boundary in range(block_m, len(rows), block_m):
        fig.add_shape(type="line", xref="x", yref="y", x0=1.7, x1=2.6, y0=boundary - 0.5, y1=boundary - 0.5,
                      line=dict(color="#666666", dash="dash", width=1))
    title = title or (f"{len(experts)} assignments -> {len(rows)} padded rows in tiles of {block_m} "
                      f"({len(pads)} padding)")
    _style(fig, title=title, x_title=None, y_title="row")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(360, 22 * len(rows) + 120))
    return fig


def padding_waste_figure(
    block_sizes: Sequence[int],
    waste: Mapping[Any, Sequence[float]],
    *,
    selected_block: int | None = None,
    title: str = "Padding share of a one-expert-per-tile layout",
) -> go.Figure:
    """Share of padded rows that are padding against the tile height, one line per routing skew
    (`waste = {skew: [share per block size]}`, shares in [0, 1]); `selected_block` draws a vertical marker."""
    blocks = _ints(block_sizes, what="block_sizes")
    series = {}
    for skew, shares in waste.items():
        shares = [float(v) for v in shares]
        if len(shares) != len(blocks):
            raise ValueError(f"skew {skew!r} has {len(shares)} shares for {len(blocks)} block sizes")
        if not all(0.0 <= v <= 1.0 for v in shares):
            raise ValueError(f"padding shares must lie in [0, 1]; skew {skew!r} has {shares}")
        series[f"skew {skew:g}" if isinstance(skew, (int, float)) else str(skew)] = (blocks, shares)
    fig = line_figure(series, title=title, x_title="tile height block_m (rows)", y_title="padding share", log_x=True)
    fig.update_yaxes(tickformat=".0%")
    if selected_block is not None:
        if selected_block not in blocks:
            raise ValueError(f"selected_block {selected_block} is not one of {blocks}")
        fig.add_vline(x=selected_block, line_dash="dot", line_color="#444444")
    return fig


def kernel_check_figure(errors: Mapping[str, float], *, tolerance: float,
                        title: str = "Triton vs reference: max relative error") -> go.Figure:
    """One bar per compared quantity (output, each gradient) on a log axis, with the tolerance as a line."""
    if not errors:
        raise ValueError("kernel_check_figure needs at least one error")
    values = [float(v) for v in errors.values()]
    if not all(math.isfinite(v) and v >= 0 for v in values) or tolerance <= 0:
        raise ValueError(f"errors must be finite and >= 0 and tolerance > 0, got {values} and {tolerance}")
    # a bit-exact 0 cannot sit on a log axis: draw it at 1e-12 (labelled as 0)
    shown = [max(v, 1e-12) for v in values]
    fig = bar_figure(list(errors), {"max |Δ| / max |ref|": shown}, title=title, y_title="relative error", log_y=True)
    fig.data[0].text = [f"{v:.1e}" for v in values]
    fig.add_hline(y=tolerance, line_dash="dash", line_color="#d62728", annotation_text=f"tolerance {tolerance:g}")
    return fig


def benchmark_figure(run: Mapping[str, Any] | None, *, preset: str | None = None, backward: bool = True) -> go.Figure:
    """TFLOP/s of each implementation against the token count for one recorded `bench/moe_kernels.py` run (one
    preset), or an empty figure saying that no GPU run is recorded yet when `run` is None."""
    if run is None:
        fig = go.Figure()
        fig.add_annotation(text="no GPU benchmark recorded yet:<br>run `python bench/moe_kernels.py --record` on a GPU",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=16))
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return _style(fig, title="GPU benchmark: not yet measured", x_title=None, y_title=None)
    rows = [r for r in run["rows"] if preset is None or r["preset"] == preset]
    if not rows:
        raise ValueError(f"the run has no rows for preset {preset!r}")
    key, factor = ("fwdbwd_ms", 3.0) if backward else ("fwd_ms", 1.0)
    series = {}
    impls = list(rows[0]["results"])
    for name in impls:
        pts = [(r["tokens"], factor * r["flops"] / r["results"][name][key] / 1e9) for r in rows
               if key in r["results"][name]]
        if pts:
            series[name] = ([p[0] for p in pts], [p[1] for p in pts])
    what = "forward+backward" if backward else "forward"
    fig = line_figure(series, title=f"{what} TFLOP/s, {rows[0]['preset']} ({run['device']}, {run['date']})",
                      x_title="tokens", y_title="TFLOP/s", log_x=True)
    return fig
