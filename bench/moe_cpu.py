"""Forward+backward tokens/s of `lablib.moe.MoELayer` on the CPU against three peers, all in one run and process.

* **lablib MoE**: `MoELayer(router="top_k", capacity_factor=None, backend="torch")`, dropless, the grouped dispatch
  (sort the token-expert pairs by expert, one FFN call per expert group, scatter-add back).
* **naive mask**: the dense-mask reference, independent of lablib: every expert runs on every token and the result
  is masked by the combine weight, `for e in experts: y += (mask_e · w_e) ⊙ F_e(x)`. E/k times the expert FLOPs.
* **HF Mixtral**: Hugging Face transformers' `MixtralSparseMoeBlock` with the same shape (hidden_size = d_model,
  intermediate_size = d_hidden, num_local_experts, num_experts_per_tok = top-k, hidden_act = "silu", no jitter),
  its `experts_implementation` set to "eager" (what a standalone block gets: a Python loop over the experts that
  were hit, `torch.where` per expert). With transformers >= 5 also the same block with `experts_implementation=
  "grouped_mm"` (sort by expert, `torch.nn.functional.grouped_mm`; what a v5 model built with `from_pretrained` or
  `from_config` uses by default where it can dispatch). Only when transformers is importable (`pip install
  transformers`, or `pip install -e '.[bench]'`); otherwise those columns say "skipped" and a line says why.
* **dense FFN**: the same active parameters without routing: one FFN of hidden width top_k · d_hidden with the
  experts' activation (SwiGLU: `W_down (silu(x W_gate) ⊙ x W_up)`, separate gate and up matrices as in the experts
  and Llama; GELU: `W_2 gelu(x W_1)`), no biases, plain `nn.Linear`s. Same FLOPs as the MoE minus its router.

Mixtral's experts are SwiGLU, so the default `--activation swiglu` makes every implementation SwiGLU and the
comparison exact (`--activation gelu` benchmarks GELU experts against a GELU dense FFN; HF Mixtral is then skipped).

**Fair comparison.** Per shape, one seeded lablib layer is built and its router and expert weights are copied into
the naive module and the HF block; before timing, each one's output on the same input is checked against the naive
reference (max |Δy| / max |y| <= `REL_TOL`, fp32; the last column reports each one's relative difference).
The dense FFN has its own seeded weights (it is a different function). Inputs x ~ N(0, 1) (seeded), the router and
experts at lablib's init (N(0, 0.02²)): router logits have std ≈ 0.02·sqrt(d_model), so routing is neither uniform
nor collapsed; the table reports the resulting load (max / mean assignments per expert).

**Timing.** One step = zero the gradients (set to None), `y = f(x)`, `y.backward(g)` with a fixed seeded upstream
gradient g, x requiring grad (the layer sits inside a network). The lablib layer's diagnostics (balance loss,
z-loss, entropy) are computed in its forward, so they are in its time; nothing backpropagates through them. After
`--warmup` untimed steps per implementation, `--iters` rounds time one step of each implementation in turn
(`time.perf_counter`, rotating the order every round so background load hits all of them alike), and the table
reports N / median step time. Ratios are time ratios (MoE time / naive time, MoE time / dense time, HF time / dense
time for each HF variant); the target is MoE / dense <= 1.5 at every shape (the physical limit is 1.0), marked
pass/fail per row. The script exits 0 either way: this is a benchmark, not a test. Torch threads: as set by the
environment (`OMP_NUM_THREADS`, ...), printed. The header says whether the machine was shared: the 1-minute load
average before the run, and the cores other processes kept busy during it (from /proc/stat).

    python bench/moe_cpu.py [--quick] [--record] [--activation swiglu|gelu] [--shape D/H/E/K/N ...]
                            [--warmup W] [--iters N] [--seed S]

`--record` appends the table, with the machine it ran on and the load before and after, to bench/results/moe_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lablib.moe import MoELayer

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5
# outputs must agree with the naive reference to this relative max-abs difference (fp32: the implementations sum the
# same products in different orders; observed differences are ~1e-7)
REL_TOL = 1e-5
# other processes busier than this many cores during the run, or a load average above 1 before it: "shared"
SHARED_CORES = 0.25
INSTALL_HINT = "pip install transformers  (or: pip install -e '.[bench]')"


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    num_tokens: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'D/H/E/K/N' -> Shape(d_model=D, d_hidden=H, num_experts=E, top_k=K, num_tokens=N)."""
        parts = text.split("/")
        if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a shape is d_model/d_hidden/num_experts/top_k/num_tokens, positive ints, got {text!r}")
        shape = cls(*(int(p) for p in parts))
        if shape.top_k > shape.num_experts:
            raise ValueError(f"top_k ({shape.top_k}) must be <= num_experts ({shape.num_experts}) in {text!r}")
        return shape

    @property
    def label(self) -> str:
        return f"{self.d_model} / {self.d_hidden} / {self.num_experts} / top-{self.top_k} / {self.num_tokens}"


SHAPES = (
    Shape(256, 512, 8, 2, 4096),
    Shape(256, 256, 32, 4, 4096),
    Shape(512, 1024, 8, 2, 2048),
)
FULL = {"warmup": 3, "iters": 20}
QUICK = {"warmup": 1, "iters": 3}
# HF variants: key in the table -> experts_implementation
HF_VARIANTS = {"hf": "eager", "hf_gmm": "grouped_mm"}
HF_LABELS = {"hf": "HF Mixtral eager", "hf_gmm": "HF Mixtral grouped_mm"}


# ----------------------------------------------------------------------------------------------------------------
# The peers
# ----------------------------------------------------------------------------------------------------------------


def _act(activation: str, u: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    # SwiGLU: silu(gate) ⊙ up; GELU: gelu(u)
    return F.silu(g) * u if activation == "swiglu" else F.gelu(u)


class NaiveMaskMoE(nn.Module):
    """The dense-mask reference, written without lablib: softmax top-k router (renormalised over the k, as Mixtral
    and lablib's default for k > 1), then every expert on every token, masked by its combine weight."""

    def __init__(self, *, d_model: int, d_hidden: int, num_experts: int, top_k: int, activation: str) -> None:
        super().__init__()
        self.top_k, self.activation = top_k, activation
        E, d, h = num_experts, d_model, d_hidden
        self.router = nn.Parameter(torch.zeros(E, d))
        self.w_in = nn.Parameter(torch.zeros(E, d, h))
        self.w_gate = nn.Parameter(torch.zeros(E, d, h)) if activation == "swiglu" else None
        self.w_out = nn.Parameter(torch.zeros(E, h, d))

    @classmethod
    def from_layer(cls, layer: MoELayer) -> NaiveMaskMoE:
        """A copy of `layer`'s router and expert weights (a top-k router, no biases, no shared experts)."""
        experts = layer.experts
        naive = cls(d_model=layer.d_model, d_hidden=experts.d_hidden, num_experts=experts.num_experts,
                    top_k=layer.routed_top_k, activation=experts.activation)
        with torch.no_grad():
            naive.router.copy_(layer.router.gate.weight)
            naive.w_in.copy_(experts.w_in)
            if naive.w_gate is not None:
                naive.w_gate.copy_(experts.w_gate)
            naive.w_out.copy_(experts.w_out)
        return naive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # router: p = softmax(x W_gᵀ) in fp32, top-k, w = p_top / Σ p_top : (N, k)
        probs = F.linear(x.float(), self.router.float()).softmax(dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top = top / top.sum(dim=-1, keepdim=True)
        # combine weights with zeros for unrouted experts, mask_e · w_e : (N, E)
        combine = torch.zeros_like(probs).scatter(1, idx, top).to(x.dtype)
        # per-expert views via one unbind each: indexing w[e] per expert would make autograd build a full
        # (E, d, h) gradient per expert, an artefact that would slow the reference for no reason
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        w_gate = self.w_gate.unbind(0) if self.w_gate is not None else None
        y = torch.zeros_like(x)
        for e in range(len(w_in)):
            g = x @ w_gate[e] if w_gate is not None else None
            # y += (mask_e · w_e) ⊙ F_e(x), every token through every expert
            y = y + combine[:, e:e + 1] * (_act(self.activation, x @ w_in[e], g) @ w_out[e])
        return y.reshape(shape)


class DenseFFN(nn.Module):
    """The equal-active-parameter dense FFN: hidden width top_k · d_hidden, the experts' activation, no biases."""

    def __init__(self, *, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.gate = nn.Linear(d_model, d_hidden, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x) if self.gate is not None else None
        return self.down(_act(self.activation, self.up(x), g))


class MixtralUnavailable(Exception):
    """The HF Mixtral block cannot be built here; the message says why."""


def load_mixtral() -> tuple[Any, Any, str]:
    """(MixtralConfig, MixtralSparseMoeBlock, transformers version); raises ImportError without transformers."""
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralConfig, MixtralSparseMoeBlock, transformers.__version__


def _expert_pieces(experts: Any, e: int) -> dict[str, torch.Tensor]:
    """Per-expert (gate, up, down) nn.Linear-layout weights of an old-style expert list (transformers 4.x)."""
    module = experts[e]
    names = {"gate": ("w1", "gate_proj"), "up": ("w3", "up_proj"), "down": ("w2", "down_proj")}
    out = {}
    for role, candidates in names.items():
        found = next((getattr(module, n) for n in candidates if hasattr(module, n)), None)
        if found is None:
            raise MixtralUnavailable(f"expert {e} ({type(module).__name__}) has none of {candidates}")
        out[role] = found.weight
    return out


def copy_into_mixtral(layer: MoELayer, block: nn.Module) -> str:
    """Copy `layer`'s router and SwiGLU expert weights into an HF `MixtralSparseMoeBlock`; returns the layout used.

    lablib: router `gate.weight` (E, d); `w_gate`, `w_in` (E, d, h); `w_out` (E, h, d);
    y = (silu(x w_gate) ⊙ x w_in) w_out.
    Layouts handled (the block's API changed across transformers versions):
    * v5: `block.gate.weight` (E, d); `block.experts.gate_up_proj` (E, 2h, d) = [gate; up] stacked along dim 1
      (`is_concatenated`, else interleaved rows) used as `F.linear(x, gate_up_proj[e])`, or (E, d, 2h) when the
      experts say `is_transposed`; `down_proj` (E, d, h), or (E, h, d) transposed.
    * 4.x: `block.gate` an `nn.Linear(d, E)`; `block.experts` a ModuleList whose members hold `w1` (gate), `w3` (up),
      `w2` (down) `nn.Linear`s (or `gate_proj` / `up_proj` / `down_proj`).
    """
    experts = layer.experts
    if experts.activation != "swiglu" or experts.bias:
        raise MixtralUnavailable("Mixtral experts are SwiGLU without biases; the lablib layer is not")
    E, h = experts.num_experts, experts.d_hidden
    hf_experts = block.experts
    router = getattr(block, "gate", None)
    if router is None or not hasattr(router, "weight") or tuple(router.weight.shape) != (E, layer.d_model):
        raise MixtralUnavailable(f"unexpected router on {type(block).__name__}: {type(router).__name__}")
    with torch.no_grad():
        router.weight.copy_(layer.router.gate.weight)
        # nn.Linear layout (out, in) per expert: gate = w_gateᵀ (h, d), up = w_inᵀ (h, d), down = w_outᵀ (d, h)
        gate_t = experts.w_gate.transpose(1, 2)
        up_t = experts.w_in.transpose(1, 2)
        down_t = experts.w_out.transpose(1, 2)
        if hasattr(hf_experts, "gate_up_proj"):
            transposed = bool(getattr(hf_experts, "is_transposed", False))
            concatenated = bool(getattr(hf_experts, "is_concatenated", True))
            if concatenated:
                fused = torch.cat([gate_t, up_t], dim=1)  # (E, 2h, d)
            else:
                fused = torch.stack([gate_t, up_t], dim=2).reshape(E, 2 * h, -1)  # rows gate0, up0, gate1, ...
            if transposed:
                fused, down = fused.transpose(1, 2), experts.w_out
            else:
                down = down_t
            if hf_experts.gate_up_proj.shape != fused.shape or hf_experts.down_proj.shape != down.shape:
                raise MixtralUnavailable(f"unexpected fused expert shapes {tuple(hf_experts.gate_up_proj.shape)}, "
                                         f"{tuple(hf_experts.down_proj.shape)}")
            hf_experts.gate_up_proj.copy_(fused)
            hf_experts.down_proj.copy_(down)
            return (f"fused 3-D gate_up_proj/down_proj ({'transposed' if transposed else 'F.linear'} layout, "
                    f"{'concatenated' if concatenated else 'interleaved'} gate/up)")
        if isinstance(hf_experts, (nn.ModuleList, list, tuple)) and len(hf_experts) == E:
            for e in range(E):
                pieces = _expert_pieces(hf_experts, e)
                pieces["gate"].copy_(gate_t[e])
                pieces["up"].copy_(up_t[e])
                pieces["down"].copy_(down_t[e])
            return "per-expert nn.Linear modules (w1 gate, w3 up, w2 down)"
    raise MixtralUnavailable(f"unknown expert layout {type(hf_experts).__name__}")


def build_mixtral(layer: MoELayer, experts_implementation: str = "eager") -> tuple[nn.Module, str]:
    """An HF `MixtralSparseMoeBlock` with `layer`'s weights, and a note on the version and layout.

    Raises ImportError (no transformers) or MixtralUnavailable (an API this adapter does not know)."""
    MixtralConfig, MixtralSparseMoeBlock, version = load_mixtral()
    if experts_implementation != "eager":
        try:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        except ImportError as exc:
            raise MixtralUnavailable(f"transformers {version} has no experts implementations other than eager") from exc
        if experts_implementation not in ALL_EXPERTS_FUNCTIONS:
            raise MixtralUnavailable(f"transformers {version} has no experts_implementation "
                                     f"{experts_implementation!r}")
    config = MixtralConfig(hidden_size=layer.d_model, intermediate_size=layer.experts.d_hidden,
                           num_local_experts=layer.experts.num_experts, num_experts_per_tok=layer.routed_top_k,
                           hidden_act="silu", router_jitter_noise=0.0)
    if hasattr(config, "_experts_implementation"):  # transformers >= 5: pick the experts kernel explicitly
        config._experts_implementation = experts_implementation
        impl = experts_implementation
    elif experts_implementation == "eager":
        impl = "eager (the only one)"
    else:
        raise MixtralUnavailable(f"transformers {version} cannot select experts_implementation "
                                 f"{experts_implementation!r}")
    block = MixtralSparseMoeBlock(config)
    layout = copy_into_mixtral(layer, block)
    return block, f"transformers {version}, MixtralSparseMoeBlock, experts_implementation {impl}, {layout}"


# ----------------------------------------------------------------------------------------------------------------
# Building, checking and timing
# ----------------------------------------------------------------------------------------------------------------


def mixtral_forward(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn(x) -> y` for an HF block: transformers 4.x returns (hidden_states, router_logits), 5.x the hidden states."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    return fn


@dataclass
class Impl:
    """One implementation: `fn(x (B, T, d_model)) -> y` and the module holding its parameters."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.module.parameters())


def build_impls(shape: Shape, *, activation: str = "swiglu", seed: int = 0, hf: bool = True,
                notes: list[str] | None = None) -> tuple[dict[str, Impl], MoELayer]:
    """The implementations for one shape, keyed "lablib", "naive", "hf" and "hf_gmm" (when available), "dense".

    `notes` collects one line per skipped or described peer."""
    notes = notes if notes is not None else []
    torch.manual_seed(seed)
    layer = MoELayer(d_model=shape.d_model, d_hidden=shape.d_hidden, num_experts=shape.num_experts,
                     top_k=shape.top_k, router="top_k", activation=activation, capacity_factor=None,
                     backend="torch")
    impls = {"lablib": Impl("lablib", lambda x: layer(x).y, layer)}
    naive = NaiveMaskMoE.from_layer(layer)
    impls["naive"] = Impl("naive", naive, naive)
    for key, implementation in HF_VARIANTS.items() if hf else ():
        try:
            block, note = build_mixtral(layer, implementation)
            impls[key] = Impl(key, mixtral_forward(block), block)
            notes.append(note)
        except ImportError as exc:
            notes.append(f"{HF_LABELS[key]} skipped: transformers is not importable ({exc}); to include it: "
                         f"{INSTALL_HINT}")
        except Exception as exc:  # an API this adapter does not know: skip, never fail
            notes.append(f"{HF_LABELS[key]} skipped: {type(exc).__name__}: {exc}")
    torch.manual_seed(seed + 1)
    dense = DenseFFN(d_model=shape.d_model, d_hidden=shape.top_k * shape.d_hidden, activation=activation)
    impls["dense"] = Impl("dense", dense, dense)
    return impls, layer


def make_inputs(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, N, d_model) ~ N(0, 1) requiring grad, and the upstream gradient g (1, N, d_model) ~ N(0, 1), seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, shape.num_tokens, shape.d_model, generator=gen).requires_grad_(True)
    g = torch.randn(1, shape.num_tokens, shape.d_model, generator=gen)
    return x, g


def relative_diffs(impls: dict[str, Impl], x: torch.Tensor, *, grads: bool = False,
                   g: torch.Tensor | None = None) -> dict[str, float]:
    """max |y_impl - y_naive| / max |y_naive| for every MoE implementation (and, with `grads`, the same for
    dL/dx with L = Σ g ⊙ y, as "<name> dx")."""
    def run(impl: Impl) -> tuple[torch.Tensor, torch.Tensor | None]:
        xi = x.detach().clone().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            y = impl.fn(xi)
            if not grads:
                return y.detach(), None
            y.backward(g)
            return y.detach(), xi.grad

    ref_y, ref_dx = run(impls["naive"])
    out = {}
    for name in impls:
        if name not in ("naive", "dense"):
            y, dx = run(impls[name])
            out[name] = float((y - ref_y).abs().max() / ref_y.abs().max())
            if grads:
                out[f"{name} dx"] = float((dx - ref_dx).abs().max() / ref_dx.abs().max())
    return out


def step(impl: Impl, x: torch.Tensor, g: torch.Tensor) -> None:
    """One forward+backward: fresh gradients, y = f(x), backprop g."""
    x.grad = None
    for p in impl.params:
        p.grad = None
    impl.fn(x).backward(g)


def measure(impls: dict[str, Impl], x: torch.Tensor, g: torch.Tensor, *, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per forward+backward step of each implementation, interleaved round by round."""
    names = list(impls)
    for name in names:
        for _ in range(warmup):
            step(impls[name], x, g)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        # rotate the order each round, so a burst of background load does not always hit the same implementation
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            step(impls[name], x, g)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_imbalance(layer: MoELayer, x: torch.Tensor) -> float:
    """max / mean assignments per expert on this input."""
    with torch.no_grad():
        counts = layer(x).tokens_per_expert.float()
    return float(counts.max() / counts.mean())


@dataclass
class Row:
    shape: Shape
    seconds: dict[str, float]
    diffs: dict[str, float]
    imbalance: float

    def tokens_per_s(self, name: str) -> float | None:
        return self.shape.num_tokens / self.seconds[name] if name in self.seconds else None

    def ratio(self, a: str, b: str) -> float | None:
        return self.seconds[a] / self.seconds[b] if a in self.seconds and b in self.seconds else None


def bench_shape(shape: Shape, *, activation: str, seed: int, warmup: int, iters: int, hf: bool,
                notes: list[str]) -> Row:
    impls, layer = build_impls(shape, activation=activation, seed=seed, hf=hf, notes=notes)
    x, g = make_inputs(shape, seed)
    diffs = relative_diffs(impls, x)
    for key in HF_VARIANTS:
        if diffs.get(key, 0.0) > REL_TOL:
            notes.append(f"{HF_LABELS[key]} dropped at {shape.label}: its output differs from the naive reference "
                         f"by {diffs[key]:.1e} (relative), so the weight copy is not faithful")
            del impls[key]
    seconds = measure(impls, x, g, warmup=warmup, iters=iters)
    return Row(shape, seconds, diffs, load_imbalance(layer, x.detach()))


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def machine() -> str:
    return (f"{platform.node() or 'unknown host'}: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}")


def _fmt_tps(value: float | None) -> str:
    return "skipped" if value is None else f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(rows: list[Row]) -> str:
    lines = [
        "| shape (d_model / d_hidden / experts / top-k / tokens) | load max/mean | lablib MoE tok/s | "
        "naive mask tok/s | HF eager tok/s | HF grouped_mm tok/s | dense FFN tok/s | MoE/naive | MoE/dense | "
        f"HF eager/dense | HF grouped_mm/dense | MoE/dense <= {TARGET} | agrees with naive (max rel. diff of y) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        moe_dense = r.ratio("lablib", "dense")
        verdict = "pass" if moe_dense is not None and moe_dense <= TARGET else "fail"
        agree = ", ".join(f"{name} {'ok' if d <= REL_TOL else 'MISMATCH'} ({d:.1e})" for name, d in r.diffs.items())
        lines.append(
            f"| {r.shape.label} | {r.imbalance:.2f} | {_fmt_tps(r.tokens_per_s('lablib'))} | "
            f"{_fmt_tps(r.tokens_per_s('naive'))} | {_fmt_tps(r.tokens_per_s('hf'))} | "
            f"{_fmt_tps(r.tokens_per_s('hf_gmm'))} | {_fmt_tps(r.tokens_per_s('dense'))} | "
            f"{_fmt_ratio(r.ratio('lablib', 'naive'))} | {_fmt_ratio(moe_dense)} | "
            f"{_fmt_ratio(r.ratio('hf', 'dense'))} | {_fmt_ratio(r.ratio('hf_gmm', 'dense'))} | {verdict} | {agree} |"
        )
    return "\n".join(lines)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # cpu user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        ticks = [int(v) for v in fields[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuShare:
    """How many cores other processes kept busy while the benchmark ran: (all busy CPU time - this process's CPU
    time) / wall time. The 1-minute load average after the run cannot say this: it counts our own threads."""

    def __init__(self) -> None:
        self.busy, self.own, self.wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()

    def others(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        return max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall if wall > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['warmup']} warmup + {QUICK['iters']} timed steps "
                             f"(default {FULL['warmup']} + {FULL['iters']})")
    parser.add_argument("--record", action="store_true", help="append the table to bench/results/moe_cpu.md")
    parser.add_argument("--activation", choices=("swiglu", "gelu"), default="swiglu",
                        help="expert activation (swiglu, as Mixtral: default; gelu skips HF Mixtral)")
    parser.add_argument("--shape", action="append", type=Shape.parse, metavar="D/H/E/K/N",
                        help="d_model/d_hidden/num_experts/top_k/num_tokens (repeatable; default: the three "
                             "shapes of issue 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per implementation")
    parser.add_argument("--iters", type=int, help="timed steps per implementation (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = dict(QUICK if args.quick else FULL)
    if args.warmup is not None:
        counts["warmup"] = args.warmup
    if args.iters is not None:
        counts["iters"] = args.iters
    if counts["warmup"] < 0 or counts["iters"] < 1:
        parser.error("need --warmup >= 0 and --iters >= 1")
    shapes = args.shape or list(SHAPES)

    load_before = _load()
    share = CpuShare()
    notes: list[str] = []
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, activation=args.activation, seed=args.seed, hf=args.activation == "swiglu",
                                notes=notes, **counts))
        print(f"measured {shape.label}", file=sys.stderr)
    load_after = _load()
    others = share.others()
    if args.activation != "swiglu":
        notes.append("HF Mixtral skipped: Mixtral's experts are SwiGLU; run with --activation swiglu to include it")
    lablib_bad = [r.shape.label for r in rows if r.diffs.get("lablib", 0.0) > REL_TOL]
    if lablib_bad:
        notes.append(f"lablib MoE output DIFFERS from the naive reference at {'; '.join(lablib_bad)}: a bug to fix")

    act = "SwiGLU" if args.activation == "swiglu" else "GELU"
    hf_note = ("SwiGLU (hidden_act=silu)" if any(k in r.seconds for r in rows for k in HF_VARIANTS)
               else "skipped")
    # shared: load above 1 before we started, or other processes averaging more than a quarter of a core while we ran
    # (our threads fill every core, so even a part-time neighbour slows them)
    shared = (load_before is not None and load_before > 1.0) or (others is not None and others > SHARED_CORES)
    lines = [
        f"### {dt.date.today().isoformat()} on {machine()}",
        "",
        f"* torch threads: {torch.get_num_threads()} (as set by the environment); "
        f"{counts['warmup']} warmup + {counts['iters']} timed forward+backward steps per implementation, median, "
        f"interleaved{' (--quick)' if args.quick else ''}; seed {args.seed}; fp32",
        f"* activations: lablib MoE {act}, naive mask {act}, HF Mixtral {hf_note}, dense FFN {act} with hidden "
        f"top_k x d_hidden (same active expert parameters; no router)",
        f"* load average (1 min) before / after: "
        + " / ".join("n/a" if v is None else f"{v:.2f}" for v in (load_before, load_after))
        + " (after includes this run's own threads); other processes kept "
        + ("n/a" if others is None else f"{others:.2f}") + f" of {os.cpu_count()} cores busy during the run"
        + (f" -- the machine was SHARED (load before > 1, or others > {SHARED_CORES} core): timings are noisy, the "
           "interleaved ratios less so" if shared
           else f" -- the machine was not shared (load before <= 1, others <= {SHARED_CORES} core)"),
    ]
    # one line per distinct note (the HF description is the same for every shape)
    lines += [f"* {note}" for note in dict.fromkeys(notes)]
    lines += [
        f"* ratios are time ratios (MoE/naive < 1: grouped dispatch ahead of the naive loop); target MoE/dense <= "
        f"{TARGET}; outputs checked against the naive reference before timing (tolerance {REL_TOL:.0e} relative)",
        "",
        format_table(rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        out = ROOT / "bench" / "results" / "moe_cpu.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else "# MoE layer forward+backward on the CPU (bench/moe_cpu.py)\n\n"
        with out.open("a") as f:
            f.write(header + table + "\n\n")
    failing = [r.shape.label for r in rows if (r.ratio("lablib", "dense") or math.inf) > TARGET]
    if failing:
        print(f"MoE/dense above the {TARGET} target at: {'; '.join(failing)} (a benchmark: exit 0)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
