"""MoE expert kernels: forward and forward+backward time and TFLOP/s of lablib's Triton grouped GEMM against torch
baselines, all measured in one run and process, printed as ratios.

Implementations (SwiGLU experts, `y_t = Σ_s w_{t,s} W_out[e] (silu(x W_gate[e]) ⊙ x W_in[e])`, routing given):
* **triton**: `lablib.kernels.triton_moe.moe_experts_triton` (sort + tile padding, gathered GEMM1 with fused SwiGLU,
  GEMM2 with the routing weight and scatter fused, Triton backward).
* **loop**: a per-expert loop of torch matmuls (`lablib.kernels.reference.moe_experts_reference`: mask, gather,
  3 matmuls, weighted index_add per expert).
* **grouped_mm**: sort by expert, `torch._grouped_mm` with cumulative end offsets for the three matmuls, weighted
  index_add back (skipped, with the reason, where this torch lacks it or rejects the shape/device).
* **padded bmm**: every expert padded to the largest expert's token count, one `torch.bmm` per matmul.
* **dense (ceiling)**: one dense SwiGLU FFN on N·k rows (same FLOPs, no routing, no gather/scatter): the TFLOP/s
  an MoE kernel can hope for.

Shapes (`--preset`):
* `mixtral`: d_model 4096, d_hidden 14336, 8 experts, top-2;
* `fine`: d_model 2048, d_hidden 1408, 64 fine-grained experts, top-8 (DeepSeekMoE / Qwen-MoE style);
* token counts 1k, 4k, 16k, 64k (`--tokens`); `interpret`: d_model 32, d_hidden 48, 4 experts, top-2, 64 tokens, for
  a CPU run in Triton's interpreter (a check that the script and the kernels work, not a speed measurement).
Routing: uniform random top-k (seeded), weights softmax-normalised; dtype bf16 on a GPU (`--dtype`), fp32 in the
interpreter. FLOPs = 2 · N · k · 3 · d_model · d_hidden forward, 3x that for forward+backward.

Before timing each implementation's output is compared with the loop on the same inputs (max |Δy| / max |y|;
tolerance 1e-5 in fp32, 2e-2 in bf16). Timing: `triton.testing.do_bench` (median ms) on CUDA, the median of
`--iters` perf_counter runs elsewhere. Targets on a GPU (from the issue): triton >= 3x loop at 16k tokens,
>= 1.0x grouped_mm, >= 60% of the dense TFLOP/s. Exits 0 either way (a benchmark, not a test).

    python bench/moe_kernels.py [--preset mixtral|fine|interpret ...] [--tokens 1024 4096 ...] [--dtype bf16|fp32]
                                [--iters N] [--record]

`--record` appends the table, with the device and the date, to bench/results/moe_kernels.md and the numbers to
bench/results/moe_kernels.json (read by lab 07's chart).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lablib.kernels import moe_experts_reference  # noqa: E402
from lablib.kernels import triton_moe as tm  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA)

PRESETS = {
    "mixtral": {"d_model": 4096, "d_hidden": 14336, "num_experts": 8, "top_k": 2},
    "fine": {"d_model": 2048, "d_hidden": 1408, "num_experts": 64, "top_k": 8},
    "interpret": {"d_model": 32, "d_hidden": 48, "num_experts": 4, "top_k": 2},
}
GPU_TOKENS = (1024, 4096, 16384, 65536)
INTERPRET_TOKENS = (64,)
IMPLS = ("triton", "loop", "grouped_mm", "padded_bmm", "dense")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Problem:
    x: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    mats: dict[str, torch.Tensor]

    @property
    def flops(self) -> float:
        num_tokens, top_k = self.indices.shape
        _, d_model, d_hidden = self.mats["w_in"].shape
        return 2.0 * num_tokens * top_k * 3 * d_model * d_hidden


def make_problem(*, d_model, d_hidden, num_experts, top_k, num_tokens, dtype, device, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=g)
    indices = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    weights = torch.randn(num_tokens, top_k, generator=g).softmax(dim=1)
    mats = {"w_in": torch.randn(num_experts, d_model, d_hidden, generator=g) / d_model ** 0.5,
            "w_gate": torch.randn(num_experts, d_model, d_hidden, generator=g) / d_model ** 0.5,
            "w_out": torch.randn(num_experts, d_hidden, d_model, generator=g) / d_hidden ** 0.5}
    move = dict(device=device, dtype=dtype)
    return Problem(x.to(**move), indices.to(device), weights.to(**move), {k: v.to(**move) for k, v in mats.items()})


# ----------------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------------


def _swiglu(x, w_in, w_gate, w_out):
    return (F.silu(x @ w_gate) * (x @ w_in)) @ w_out


def _sorted(p: Problem):
    num_tokens, top_k = p.indices.shape
    expert = p.indices.reshape(-1)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=p.mats["w_in"].shape[0])
    return order, order // top_k, counts


def grouped_mm_experts(p: Problem) -> torch.Tensor:
    order, token, counts = _sorted(p)
    offs = counts.cumsum(0).to(torch.int32)
    rows = p.x[token]
    # the three matmuls, each one grouped GEMM over the experts' contiguous row ranges
    u = torch._grouped_mm(rows, p.mats["w_in"], offs=offs)
    g = torch._grouped_mm(rows, p.mats["w_gate"], offs=offs)
    out = torch._grouped_mm(F.silu(g) * u, p.mats["w_out"], offs=offs)
    gate = p.weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(p.x).index_add(0, token, out * gate)


def padded_bmm_experts(p: Problem) -> torch.Tensor:
    order, token, counts = _sorted(p)
    num_experts, capacity = counts.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    expert_sorted = p.indices.reshape(-1)[order]
    slot = torch.arange(order.numel(), device=order.device) - starts[expert_sorted]
    # (E, C, d_model) buffer, every expert padded to the fullest expert's count
    buf = p.x.new_zeros(num_experts, capacity, p.x.shape[1])
    buf[expert_sorted, slot] = p.x[token]
    out = torch.bmm(F.silu(torch.bmm(buf, p.mats["w_gate"])) * torch.bmm(buf, p.mats["w_in"]), p.mats["w_out"])
    gate = p.weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(p.x).index_add(0, token, out[expert_sorted, slot] * gate)


def dense_ceiling(p: Problem) -> torch.Tensor:
    # N·k rows through one expert's matrices: the same FLOPs as the MoE with a perfectly dense layout
    rows = p.x.repeat_interleave(p.indices.shape[1], dim=0)
    return _swiglu(rows, p.mats["w_in"][0], p.mats["w_gate"][0], p.mats["w_out"][0])


def implementations() -> dict[str, Callable[[Problem], torch.Tensor]]:
    return {
        "triton": lambda p: tm.moe_experts_triton(p.x, p.indices, p.weights, activation="swiglu",
                                                  block=16 if tm.interpreter_mode() else 64, **p.mats),
        "loop": lambda p: moe_experts_reference(p.x, p.indices, p.weights, activation="swiglu", **p.mats),
        "grouped_mm": grouped_mm_experts,
        "padded_bmm": padded_bmm_experts,
        "dense": dense_ceiling,
    }


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def _with_grad(p: Problem) -> Problem:
    return Problem(p.x.detach().requires_grad_(True), p.indices, p.weights.detach().requires_grad_(True),
                   {k: v.detach().requires_grad_(True) for k, v in p.mats.items()})


def time_ms(fn: Callable[[], object], *, iters: int) -> float:
    if torch.cuda.is_available() and not tm.interpreter_mode():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=max(iters, 1) * 10))
    fn()
    runs = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def measure(p: Problem, *, iters: int) -> dict[str, dict[str, object]]:
    """{impl: {"fwd_ms", "fwdbwd_ms", "error" or "skipped"}} for one problem."""
    results: dict[str, dict[str, object]] = {}
    reference = implementations()["loop"](p).float()
    scale = float(reference.abs().max())
    for name, fn in implementations().items():
        try:
            y = fn(p)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            results[name] = {"skipped": str(error).splitlines()[0][:80]}
            continue
        row: dict[str, object] = {}
        if name != "dense":
            row["rel_err"] = float((y.float() - reference).abs().max()) / scale
        grad_problem = _with_grad(p)
        upstream = torch.ones_like(y)

        def fwd_bwd():
            out = fn(grad_problem)
            out.backward(upstream)

        with torch.no_grad():
            row["fwd_ms"] = time_ms(lambda: fn(p), iters=iters)
        row["fwdbwd_ms"] = time_ms(fwd_bwd, iters=iters)
        results[name] = row
    return results


def device_name() -> str:
    if torch.cuda.is_available() and not tm.interpreter_mode():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), Triton interpreter"


def table(rows: list[dict]) -> str:
    head = ("| preset | tokens | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs triton "
            "| max rel. err vs loop |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        for name in IMPLS:
            r = row["results"][name]
            if "skipped" in r:
                lines.append(f"| {row['preset']} | {row['tokens']} | {name} | skipped: {r['skipped']} |||||")
                continue
            flops = row["flops"]
            ratio = r["fwdbwd_ms"] / row["results"]["triton"]["fwdbwd_ms"] if "fwdbwd_ms" in row["results"][
                "triton"] else float("nan")
            err = "-" if "rel_err" not in r else f"{r['rel_err']:.1e}"
            lines.append(f"| {row['preset']} | {row['tokens']} | {name} | {r['fwd_ms']:.3f} | "
                         f"{flops / r['fwd_ms'] / 1e9:.3g} | {r['fwdbwd_ms']:.3f} | {3 * flops / r['fwdbwd_ms'] / 1e9:.3g}"
                         f" | {ratio:.2f} | {err} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, per row of a GPU run (fwd+bwd times)."""
    out = []
    for row in rows:
        r = row["results"]
        if "fwdbwd_ms" not in r["triton"]:
            continue
        t = r["triton"]["fwdbwd_ms"]
        parts = [f"{row['preset']} {row['tokens']} tokens:"]
        if "fwdbwd_ms" in r["loop"]:
            parts.append(f"loop/triton {r['loop']['fwdbwd_ms'] / t:.2f}x (target >= 3 at 16k)")
        if "fwdbwd_ms" in r["grouped_mm"]:
            parts.append(f"grouped_mm/triton {r['grouped_mm']['fwdbwd_ms'] / t:.2f}x (target >= 1.0)")
        if "fwdbwd_ms" in r["dense"]:
            parts.append(f"triton TFLOP/s = {r['dense']['fwdbwd_ms'] / t:.0%} of dense (target >= 60%)")
        out.append(" ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available() and not tm.interpreter_mode()
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS),
                        default=["mixtral", "fine"] if on_gpu else ["interpret"])
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help=f"token counts (default {GPU_TOKENS} on a GPU, {INTERPRET_TOKENS} in the interpreter)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--iters", type=int, default=20 if on_gpu else 2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append to bench/results/moe_kernels.{md,json}")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if not on_gpu:
        # tiny CPU matmuls: one thread, immune to OpenMP spin contention on a shared machine
        torch.set_num_threads(1)
    device = "cuda" if on_gpu else "cpu"
    tokens = args.tokens or (GPU_TOKENS if on_gpu else INTERPRET_TOKENS)
    rows, failures = [], []
    for preset in args.preset:
        for num_tokens in tokens:
            p = make_problem(num_tokens=num_tokens, dtype=dtype, device=device, seed=args.seed, **PRESETS[preset])
            results = measure(p, iters=args.iters)
            for name, r in results.items():
                if r.get("rel_err", 0.0) > TOL[dtype]:
                    failures.append(f"MISMATCH {name} {preset} {num_tokens}: rel err {r['rel_err']:.1e}")
            rows.append({"preset": preset, "tokens": num_tokens, "flops": p.flops, "results": results,
                         **PRESETS[preset]})
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"### {stamp} on {device_name()}",
              "",
              f"* torch {torch.__version__}, triton {tm.triton.__version__}, {args.dtype}, Python "
              f"{platform.python_version()}; timing: {'triton.testing.do_bench' if on_gpu else 'perf_counter'} "
              f"median, {args.iters} iters; load average (1 min) {os.getloadavg()[0]:.2f}",
              "* " + ("GPU run" if on_gpu else "Triton INTERPRETER on the CPU: times measure numpy emulation, not a "
                      "GPU; GPU numbers: not yet measured")]
    text = "\n".join(header + ["", table(rows), ""] + [f"* {line}" for line in (targets(rows) if on_gpu else []) + failures])
    print(text)
    if args.record:
        results_dir = ROOT / "bench" / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        md = results_dir / "moe_kernels.md"
        if not md.exists():
            md.write_text("# MoE expert kernels (bench/moe_kernels.py)\n\n")
        with md.open("a") as handle:
            handle.write("\n" + text + "\n")
        js = results_dir / "moe_kernels.json"
        runs = json.loads(js.read_text()) if js.exists() else []
        runs.append({"date": stamp, "device": device_name(), "gpu": on_gpu, "dtype": args.dtype,
                     "torch": torch.__version__, "rows": rows})
        js.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
