"""Lab 07's experiments: the MoE token permutation and its padding cost, the Triton kernels checked in the CPU
interpreter, and the recorded GPU benchmark.

* `skewed_routing`: top-k routing whose expert popularity follows p_e ∝ (e + 1)^(−skew) (skew 0: uniform; 1: Zipf),
  sampled without replacement per token, seeded.
* `layout_example`: a small routing laid out three ways (token order, sorted by expert, padded tiles): the data of
  the permutation figure.
* `padding_sweep` / `padding_verdict`: the share of a tiled grouped GEMM's rows that are padding, over tile heights
  and routing skews; the verdict on "one-expert-per-tile padding is cheap at training batch sizes" is computed.
* `interpreter_check`: the Triton path against the plain-torch reference and `lablib.moe`'s torch backend, forward
  and backward, at a tiny shape in Triton's interpreter.
* `load_benchmark` / `benchmark_verdict`: the runs `bench/moe_kernels.py --record` saved, and the issue's speed
  targets decided from a GPU run, or "inconclusive" when none is recorded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lablib import moe
from lablib.experiments.foundations import Verdict
from lablib.kernels import moe_experts_reference, padding_fraction, sort_assignments

__all__ = [
    "BENCH_FILE",
    "skewed_routing",
    "Layout",
    "layout_example",
    "PaddingSweep",
    "padding_sweep",
    "padding_verdict",
    "KernelCheck",
    "interpreter_check",
    "load_benchmark",
    "gpu_runs",
    "benchmark_verdict",
    "check_padded_rows",
]

BENCH_FILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "moe_kernels.json"
PADDING_CLAIM = ("padding each expert to whole tiles wastes little at training batch sizes (< 5% of the rows for "
                 "64 experts, top-8, 16k tokens, tiles of 64 or 128)")
SPEED_CLAIM = ("the Triton grouped GEMM is >= 3x a per-expert loop at 16k tokens, >= 1.0x torch's grouped matmul and "
               ">= 60% of a dense matmul's TFLOP/s (forward+backward)")


def skewed_routing(*, num_tokens: int, num_experts: int, top_k: int, skew: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(num_tokens, top_k) distinct expert ids per token, expert e drawn with probability ∝ (e + 1)^(−skew)."""
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if skew < 0:
        raise ValueError(f"skew must be >= 0, got {skew}")
    probs = torch.arange(1, num_experts + 1, dtype=torch.float64) ** (-float(skew))
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs.expand(num_tokens, -1), top_k, replacement=False, generator=g)


@dataclass(frozen=True)
class Layout:
    """A routing laid out for the permutation figure (M = num_tokens · top_k assignments, P padded rows).

    `expert_of_assignment` (M,) in token order; `sorted_assignments` (M,) the assignment ids in expert order;
    `padded_rows` (P,) assignment id per padded row, −1 for padding; `row_expert` (P,) the tile's expert per row."""

    num_tokens: int
    top_k: int
    num_experts: int
    block_m: int
    expert_of_assignment: list[int]
    sorted_assignments: list[int]
    padded_rows: list[int]
    row_expert: list[int]

    @property
    def padding(self) -> int:
        return sum(1 for a in self.padded_rows if a < 0)


def layout_example(*, num_tokens: int = 8, num_experts: int = 4, top_k: int = 2, block_m: int = 4, skew: float = 1.0,
                   seed: int = 0) -> Layout:
    indices = skewed_routing(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, skew=skew, seed=seed)
    perm = sort_assignments(indices, num_experts=num_experts, block_m=block_m)
    rows = perm.sorted_ids.tolist()
    m = perm.num_assignments
    return Layout(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, block_m=block_m,
                  expert_of_assignment=indices.reshape(-1).tolist(),
                  sorted_assignments=[a for a in rows if a < m],
                  padded_rows=[a if a < m else -1 for a in rows],
                  row_expert=torch.repeat_interleave(perm.block_expert, block_m).tolist())


@dataclass(frozen=True)
class PaddingSweep:
    """`waste[skew][i]`: share of padded rows that are padding at `block_sizes[i]` (mean over `seeds`)."""

    num_tokens: int
    num_experts: int
    top_k: int
    block_sizes: list[int]
    skews: list[float]
    waste: dict[float, list[float]]


def padding_sweep(*, num_tokens: int, num_experts: int, top_k: int, block_sizes: Sequence[int] = (16, 32, 64, 128),
                  skews: Sequence[float] = (0.0, 1.0, 2.0), seeds: Sequence[int] = (0, 1, 2)) -> PaddingSweep:
    """Padding share over tile heights and routing skews (pure counting: milliseconds even at 64k tokens)."""
    waste: dict[float, list[float]] = {}
    for skew in skews:
        counts = [torch.bincount(skewed_routing(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k,
                                                skew=skew, seed=s).reshape(-1), minlength=num_experts)
                  for s in seeds]
        waste[float(skew)] = [sum(padding_fraction(c, b) for c in counts) / len(counts) for b in block_sizes]
    return PaddingSweep(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, block_sizes=list(block_sizes),
                        skews=[float(s) for s in skews], waste=waste)


def padding_verdict(sweep: PaddingSweep, *, threshold: float = 0.05, blocks: Sequence[int] = (64, 128)) -> Verdict:
    """Holds if the padding share stays below `threshold` for every skew at the given tile heights."""
    worst = {b: max(sweep.waste[s][sweep.block_sizes.index(b)] for s in sweep.skews) for b in blocks}
    ok = all(w < threshold for w in worst.values())
    reason = (f"{sweep.num_experts} experts, top-{sweep.top_k}, {sweep.num_tokens} tokens: worst padding share over "
              f"skews {sweep.skews} is " + ", ".join(f"{w:.1%} at tiles of {b}" for b, w in worst.items())
              + f" ({'below' if ok else 'not below'} {threshold:.0%})")
    return Verdict(claim=PADDING_CLAIM, verdict="holds" if ok else "does not hold at this scale", reason=reason,
                   numbers={"worst_waste": worst})


@dataclass(frozen=True)
class KernelCheck:
    """Max |a − b| / max |b| of the Triton path against the reference (output and each gradient), and of the
    reference against `lablib.moe`'s torch backend; `seconds`: wall time of the Triton forward+backward."""

    shape: dict[str, Any]
    errors: dict[str, float]
    torch_backend_error: float
    seconds: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.errors.values()) <= self.tolerance and self.torch_backend_error <= self.tolerance


def interpreter_check(*, num_tokens: int = 19, d_model: int = 16, d_hidden: int = 24, num_experts: int = 4,
                      top_k: int = 2, activation: str = "swiglu", seed: int = 0, tolerance: float = 1e-5) -> KernelCheck:
    """Run the Triton kernels (CPU interpreter without CUDA) on an `lablib.moe.Experts` bank and compare."""
    from lablib.kernels import triton_moe  # imports Triton; without CUDA it switches on the interpreter

    torch.manual_seed(seed)
    experts = moe.Experts(num_experts=num_experts, d_model=d_model, d_hidden=d_hidden, activation=activation,
                          init_std=d_model ** -0.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=g)
    indices = skewed_routing(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, skew=1.0, seed=seed)
    weights = torch.rand(num_tokens, top_k, generator=g)
    upstream = torch.randn(num_tokens, d_model, generator=g)
    mats = {"w_in": experts.w_in, "w_out": experts.w_out, "w_gate": experts.w_gate}

    def run(fn):
        xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = fn(xr, indices, wr, activation=activation, **mats)
        grads = torch.autograd.grad(y, [xr, wr, *[m for m in mats.values() if m is not None]], upstream)
        names = ["dx", "dweights", *[f"d{n}" for n, m in mats.items() if m is not None]]
        return {"y": y.detach(), **dict(zip(names, grads))}

    start = time.perf_counter()
    got = run(triton_moe.moe_experts_triton)
    seconds = time.perf_counter() - start
    want = run(moe_experts_reference)
    errors = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want}
    with torch.no_grad():
        y_torch = experts(x, indices, weights)
    torch_error = float((y_torch - want["y"]).abs().max() / want["y"].abs().max())
    shape = {"num_tokens": num_tokens, "d_model": d_model, "d_hidden": d_hidden, "num_experts": num_experts,
             "top_k": top_k, "activation": activation, "interpreter": triton_moe.interpreter_mode()}
    return KernelCheck(shape=shape, errors=errors, torch_backend_error=torch_error, seconds=seconds,
                       tolerance=tolerance)


def load_benchmark(path: Path | None = None) -> list[dict[str, Any]]:
    """The runs saved by `bench/moe_kernels.py --record` (oldest first); [] when the file does not exist."""
    path = BENCH_FILE if path is None else Path(path)
    if not path.exists():
        return []
    runs = json.loads(path.read_text())
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "rows" in r and "device" in r for r in runs):
        raise ValueError(f"{path} is not a list of bench/moe_kernels.py runs (each with 'device' and 'rows')")
    return runs


def gpu_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("gpu")]


def benchmark_verdict(runs: Sequence[dict[str, Any]]) -> Verdict:
    """The issue's targets from the latest GPU run at 16k tokens; inconclusive without one."""
    gpu = gpu_runs(runs)
    if not gpu:
        return Verdict(claim=SPEED_CLAIM, verdict="inconclusive", numbers={},
                       reason="no GPU run of bench/moe_kernels.py is recorded yet (the interpreter measures numpy, "
                              "not kernels); GPU numbers: not yet measured")
    run = gpu[-1]
    rows = [r for r in run["rows"] if r["tokens"] == 16384 and "fwdbwd_ms" in r["results"]["triton"]]
    if not rows:
        return Verdict(claim=SPEED_CLAIM, verdict="inconclusive", numbers={},
                       reason=f"the GPU run of {run['date']} has no 16k-token row with a Triton time")
    numbers, ok = {}, True
    for row in rows:
        res, t = row["results"], row["results"]["triton"]["fwdbwd_ms"]
        loop = res["loop"].get("fwdbwd_ms", float("nan")) / t
        gmm = res["grouped_mm"].get("fwdbwd_ms", float("nan")) / t
        dense = res["dense"].get("fwdbwd_ms", float("nan")) / t
        numbers[row["preset"]] = {"loop_over_triton": loop, "grouped_mm_over_triton": gmm, "dense_share": dense}
        ok = ok and loop >= 3 and (gmm != gmm or gmm >= 1.0) and dense >= 0.6
    reason = f"{run['device']}, {run['date']}: " + "; ".join(
        f"{p}: loop/triton {n['loop_over_triton']:.2f}x, grouped_mm/triton {n['grouped_mm_over_triton']:.2f}x, "
        f"{n['dense_share']:.0%} of dense" for p, n in numbers.items())
    return Verdict(claim=SPEED_CLAIM, verdict="holds" if ok else "does not hold at this scale", reason=reason,
                   numbers=numbers)


def check_padded_rows(answer: int, *, counts: Sequence[int], block_m: int) -> bool:
    """Exercise: how many rows does the padded layout have for these per-expert counts and tile height?"""
    want = sum((c + block_m - 1) // block_m * block_m for c in counts)
    if int(answer) == want:
        print(f"correct: {want} rows, {want - sum(counts)} of them padding")
        return True
    print(f"not quite: round each expert's count up to a multiple of {block_m} and add them up")
    return False
