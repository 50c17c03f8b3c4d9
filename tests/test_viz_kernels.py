"""lablib.viz.kernels: each figure carries the data it was given, and rejects inconsistent input."""

from __future__ import annotations

import pytest

from lablib.experiments import triton_kernels as tk
from lablib.viz import kernels as vk


def _layout_kwargs(layout):
    return dict(expert_of_assignment=layout.expert_of_assignment, padded_rows=layout.padded_rows,
                row_expert=layout.row_expert, top_k=layout.top_k, block_m=layout.block_m)


def test_permutation_figure_positions():
    layout = tk.layout_example(num_tokens=5, num_experts=3, top_k=2, block_m=4, seed=1)
    fig = vk.permutation_figure(**_layout_kwargs(layout))
    marks = {(x, y): t for trace in fig.data[1:] if trace.name.startswith("expert")
             for x, y, t in zip(trace.x, trace.y, trace.text)}
    # token order: row a is assignment a
    assert marks[("token order", 3)] == "t1.s1"
    # padded tiles: each real row shows its assignment
    for row, a in enumerate(layout.padded_rows):
        if a >= 0:
            assert marks[("padded tiles", row)] == f"t{a // 2}.s{a % 2}"
    pad = next(t for t in fig.data if t.name == "padding")
    assert list(pad.y) == [i for i, a in enumerate(layout.padded_rows) if a < 0]
    assert len(fig.layout.shapes) == len(layout.padded_rows) // 4 - 1


def test_permutation_figure_rejects_bad_layouts():
    kwargs = dict(expert_of_assignment=[0, 1], padded_rows=[0, -1, 1, -1], row_expert=[0, 0, 1, 1], top_k=1,
                  block_m=2)
    vk.permutation_figure(**kwargs)
    with pytest.raises(ValueError, match="exactly once"):
        vk.permutation_figure(**{**kwargs, "padded_rows": [0, -1, 0, -1]})
    with pytest.raises(ValueError, match="tile of another expert"):
        vk.permutation_figure(**{**kwargs, "row_expert": [1, 1, 0, 0]})
    with pytest.raises(ValueError, match="multiple of block_m=3"):
        vk.permutation_figure(**{**kwargs, "block_m": 3})


def test_padding_waste_figure():
    fig = vk.padding_waste_figure([16, 64], {0.0: [0.1, 0.3], 1.0: [0.2, 0.4]}, selected_block=64)
    assert [t.name for t in fig.data] == ["skew 0", "skew 1"]
    assert list(fig.data[1].y) == [0.2, 0.4] and list(fig.data[0].x) == [16, 64]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        vk.padding_waste_figure([16], {0.0: [1.5]})
    with pytest.raises(ValueError, match="2 block sizes"):
        vk.padding_waste_figure([16, 32], {0.0: [0.1]})
    with pytest.raises(ValueError, match="selected_block 8"):
        vk.padding_waste_figure([16], {0.0: [0.1]}, selected_block=8)


def test_kernel_check_figure():
    fig = vk.kernel_check_figure({"y": 1e-7, "dx": 0.0}, tolerance=1e-5)
    assert list(fig.data[0].x) == ["y", "dx"] and list(fig.data[0].y) == [1e-7, 1e-12]
    assert list(fig.data[0].text) == ["1.0e-07", "0.0e+00"]
    with pytest.raises(ValueError, match="finite"):
        vk.kernel_check_figure({"y": float("nan")}, tolerance=1e-5)


def test_benchmark_figure():
    empty = vk.benchmark_figure(None)
    assert "not yet measured" in empty.layout.title.text and not empty.data
    run = {"device": "GPU X", "date": "2026-01-01", "rows": [
        {"preset": "fine", "tokens": 1024, "flops": 2e12,
         "results": {"triton": {"fwd_ms": 1.0, "fwdbwd_ms": 4.0}, "loop": {"skipped": "no"}}},
        {"preset": "fine", "tokens": 4096, "flops": 8e12,
         "results": {"triton": {"fwd_ms": 2.0, "fwdbwd_ms": 8.0}, "loop": {"fwd_ms": 4.0, "fwdbwd_ms": 12.0}}}]}
    fig = vk.benchmark_figure(run)
    by_name = {t.name: t for t in fig.data}
    # 3 · 2e12 FLOPs / 4 ms = 1.5e15 FLOP/s = 1500 TFLOP/s
    assert list(by_name["triton"].y) == [1500.0, 3000.0]
    assert list(by_name["loop"].x) == [4096]
    assert "GPU X" in fig.layout.title.text
    with pytest.raises(ValueError, match="preset 'mixtral'"):
        vk.benchmark_figure(run, preset="mixtral")
