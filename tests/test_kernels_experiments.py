"""lablib.experiments.triton_kernels: skewed routing, layout, padding sweep and verdicts, the interpreter check, and
the benchmark loader/verdict on hand-made runs."""

from __future__ import annotations

import json

import pytest
import torch

from lablib.experiments import triton_kernels as tk


def test_skewed_routing():
    idx = tk.skewed_routing(num_tokens=4000, num_experts=4, top_k=1, skew=1.0, seed=0)
    share = torch.bincount(idx.reshape(-1), minlength=4) / 4000
    # p ∝ 1, 1/2, 1/3, 1/4 -> 0.48, 0.24, 0.16, 0.12
    assert torch.allclose(share, torch.tensor([0.48, 0.24, 0.16, 0.12]), atol=0.03)
    two = tk.skewed_routing(num_tokens=50, num_experts=5, top_k=3, skew=2.0, seed=1)
    assert all(len(set(row)) == 3 for row in two.tolist())  # distinct experts per token
    assert torch.equal(two, tk.skewed_routing(num_tokens=50, num_experts=5, top_k=3, skew=2.0, seed=1))
    with pytest.raises(ValueError, match="top_k"):
        tk.skewed_routing(num_tokens=2, num_experts=2, top_k=3)


def test_layout_example_is_consistent():
    layout = tk.layout_example(num_tokens=6, num_experts=3, top_k=2, block_m=4, seed=2)
    assert sorted(layout.sorted_assignments) == list(range(12))
    assert [a for a in layout.padded_rows if a >= 0] == layout.sorted_assignments
    assert len(layout.padded_rows) % 4 == 0
    for a, e in zip(layout.padded_rows, layout.row_expert):
        if a >= 0:
            assert layout.expert_of_assignment[a] == e


def test_padding_sweep_by_hand_and_verdict():
    sweep = tk.padding_sweep(num_tokens=3, num_experts=2, top_k=1, block_sizes=(1, 4), skews=(0.0,), seeds=(0,))
    counts = torch.bincount(tk.skewed_routing(num_tokens=3, num_experts=2, top_k=1, seed=0).reshape(-1), minlength=2)
    padded = sum(-(-int(c) // 4) * 4 for c in counts)
    assert sweep.waste[0.0] == [0.0, pytest.approx((padded - 3) / padded)]
    big = tk.padding_sweep(num_tokens=16384, num_experts=64, top_k=8, skews=(0.0, 2.0), seeds=(0,))
    assert tk.padding_verdict(big).verdict == "holds"
    small = tk.padding_sweep(num_tokens=64, num_experts=64, top_k=8, skews=(0.0,), seeds=(0,))
    assert tk.padding_verdict(small).verdict == "does not hold at this scale"


def test_interpreter_check_passes_and_reports_every_gradient():
    check = tk.interpreter_check(num_tokens=9, d_model=8, d_hidden=8, num_experts=3, top_k=2)
    assert set(check.errors) == {"y", "dx", "dweights", "dw_in", "dw_gate", "dw_out"}
    assert check.ok and check.torch_backend_error <= 1e-6
    if not torch.cuda.is_available():
        assert check.shape["interpreter"]


def _run(gpu, loop, gmm, dense, tokens=16384):
    res = {"triton": {"fwdbwd_ms": 1.0}, "loop": {"fwdbwd_ms": loop}, "grouped_mm": {"fwdbwd_ms": gmm},
           "dense": {"fwdbwd_ms": dense}}
    return {"device": "GPU X" if gpu else "CPU", "date": "d", "gpu": gpu,
            "rows": [{"preset": "fine", "tokens": tokens, "flops": 1.0, "results": res}]}


def test_benchmark_verdict(tmp_path):
    assert tk.benchmark_verdict([]).verdict == "inconclusive"
    assert tk.benchmark_verdict([_run(False, 9, 9, 9)]).verdict == "inconclusive"  # interpreter runs never count
    assert tk.benchmark_verdict([_run(True, 3.5, 1.1, 0.7)]).verdict == "holds"
    assert tk.benchmark_verdict([_run(True, 3.5, 0.9, 0.7)]).verdict == "does not hold at this scale"
    assert tk.benchmark_verdict([_run(True, 3.5, 1.1, 0.7, tokens=1024)]).verdict == "inconclusive"
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([_run(True, 1, 1, 1)]))
    assert tk.load_benchmark(path)[0]["device"] == "GPU X"
    assert tk.load_benchmark(tmp_path / "missing.json") == []
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a list of bench/moe_kernels.py runs"):
        tk.load_benchmark(path)
    # the committed file loads, and has no GPU run until one is measured
    runs = tk.load_benchmark()
    assert all("device" in r for r in runs)


def test_check_padded_rows(capsys):
    assert tk.check_padded_rows(24, counts=[3, 5, 0, 9], block_m=4)
    assert not tk.check_padded_rows(17, counts=[3, 5, 0, 9], block_m=4)
