"""Triton grouped-GEMM kernels for the MoE experts, forward and backward, registered as the `"triton"` expert backend.

Written in the style of the official Triton matmul tutorial (https://triton-lang.org/main/getting-started/tutorials/
03-matrix-multiplication.html): each program computes one (BLOCK_M, BLOCK_N) tile of C = A B by walking K in BLOCK_K
steps with pointer blocks and an fp32 accumulator. What MoE adds, following vLLM's `fused_moe_kernel` and ScatterMoE:

* **the rows of a tile are a list, not a range**: tile b covers padded rows b·BM .. b·BM + BM − 1 of the layout from
  `lablib.kernels.permute.sort_assignments`; row p holds assignment a = sorted_ids[p] (or the sentinel M: padding),
  whose input is token a // k. So GEMM1 *gathers* x rows straight from the token order (no permuted copy of x).
* **the B matrix depends on the tile**: every tile belongs to one expert e = block_expert[b] and reads W[e].
* **fused epilogues**: GEMM1 applies the activation (SwiGLU: two accumulators, silu(x W_gate) ⊙ x W_in) before it
  stores; GEMM2 multiplies each row by its routing weight and *scatters* it to the assignment's own row a of a
  (N·k, d_model) buffer, so the scatter back to tokens is a sum over the k slots, y = Y.view(N, k, d).sum(1).

Backward (`TritonMoEFunction.backward`, ScatterMoE's recipe in the padded layout, with O_a = H_a W_out[e]):

    dH^u_p = dy_{t(p)} W_out[e]ᵀ        (GEMM1's kernel, dy gathered by token, W_out read transposed)
    dg_a   = ⟨O_a, dy_t⟩ = ⟨H_p, dH^u_p⟩ (no division by g, so g = 0 is fine)
    dH_p   = g_a dH^u_p,  dU = dH ⊙ act'(U)  (elementwise, in torch)
    dW_out[e] = Σ_{p in e} H_pᵀ (g_a dy_t),  dW_in[e] = Σ_{p in e} x_tᵀ dU_p   (grouped XᵀY kernel: one program per
                                                                              expert and output tile, looping over
                                                                              that expert's rows; 0 if it has none)
    dx_t   = Σ_{p of t} dU_p W_in[e]ᵀ     (GEMM kernel with W_in transposed, then index_add over tokens)

Without CUDA, importing this module sets `TRITON_INTERPRET=1` (unless already set), so the same kernels run in
Triton's numpy interpreter on the CPU: slow, meant for tiny shapes and for checking the kernels, not for speed.
fp32 matmuls use `input_precision="ieee"` (no TF32: ScatterMoE's users traced their mismatches to TF32). Inputs may
be fp32, fp16 or bf16 (fp32 accumulators); Triton 3.9's interpreter computes bf16 `tl.dot` wrongly, so on the CPU
the kernels take fp32/fp16 only and bf16 is checked on a GPU (`tests/test_kernels_triton.py`, marked `gpu`).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Triton has no CPU backend; its interpreter runs kernels with numpy. It must be on before triton is imported:
    # a triton imported earlier (peft and transformers import it) fails inside every kernel with "Cannot call
    # @triton.jit'd outside of the scope of a kernel", so say what to do instead.
    if "triton" in sys.modules:
        raise ImportError(
            "lablib.kernels.triton_moe needs Triton's CPU interpreter here (no CUDA), but triton was already imported "
            "without it (by another package, e.g. peft or transformers): set TRITON_INTERPRET=1 in the environment "
            "before starting Python, or import lablib.kernels before that package"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lablib.kernels.permute import Permutation, sort_assignments  # noqa: E402

__all__ = [
    "KERNEL_ACTIVATIONS",
    "interpreter_mode",
    "grouped_matmul",
    "grouped_weight_grad",
    "moe_experts_triton",
    "triton_expert_backend",
    "TritonMoEFunction",
]

# activation codes of the GEMM1 epilogue
KERNEL_ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "swiglu": 4}
DEFAULT_BLOCK = 16  # tl.dot needs tiles of at least 16 on GPUs; the interpreter is happy with any size


def interpreter_mode() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------------
# Kernel 1: C = epilogue(A[rows] @ W[e]) on the expert-sorted, tile-padded rows
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_matmul_kernel(
    # pointers
    a_ptr, w_ptr, w2_ptr, c_ptr, pre_ptr, pre2_ptr, sorted_ids_ptr, block_expert_ptr, scale_ptr,
    # sizes: P padded rows, K inner, N output columns, M assignments (the sentinel)
    P, N, K, num_assignments,
    # strides
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_cm, stride_cn,
    # meta-parameters
    A_ROWS_DIV: tl.constexpr,  # gathered A: A row = sorted_id // A_ROWS_DIV; 0: A is already in padded-row order
    SCATTER_C: tl.constexpr,  # store row p at C row sorted_ids[p] (padding rows skipped) instead of row p
    ACTIVATION: tl.constexpr,  # KERNEL_ACTIVATIONS; 4 (SwiGLU) also reads w2 (the gate matrix)
    STORE_PRE: tl.constexpr,  # also store the pre-activation(s) (needed by the backward)
    ROW_SCALE: tl.constexpr,  # multiply row p by scale[sorted_ids[p]] (the routing weight)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    # program id -> (tile row pid_m, tile column pid_n), grouped so consecutive programs share A tiles (the tutorial's
    # L2 swizzle; here it also keeps one expert's tiles together)
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(P, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # the tile's rows: assignment ids (sentinel = padding) and its one expert
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_p)
    valid = ids < num_assignments
    expert = tl.load(block_expert_ptr + pid_m)
    if A_ROWS_DIV > 0:
        a_rows = tl.where(valid, ids // A_ROWS_DIV, 0)  # gather token rows straight from x
    else:
        a_rows = offs_p
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if ACTIVATION == 4:
        w2_ptrs = w2_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # acc = A[rows, :] @ W[e][:, cols], BLOCK_K columns of A at a time : (BLOCK_M, BLOCK_N) fp32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if ACTIVATION == 4:
            w2 = tl.load(w2_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
            acc2 = tl.dot(a, w2, acc2, input_precision=INPUT_PRECISION)
            w2_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: activation (GEMM1), routing weight (GEMM2), all in fp32 before the cast
    if ACTIVATION == 1:
        out = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:
        out = acc * tl.sigmoid(acc)
    elif ACTIVATION == 3:
        # exact GELU, as torch's default: x Φ(x) = x (1 + erf(x / √2)) / 2
        out = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 4:
        # SwiGLU: silu(x W_gate) ⊙ (x W_in)
        out = acc2 * tl.sigmoid(acc2) * acc
    else:
        out = acc
    if ROW_SCALE:
        scale = tl.load(scale_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        out = out * scale[:, None]

    col_ok = offs_n[None, :] < N
    if SCATTER_C:
        c_rows = tl.where(valid, ids, 0)
        row_ok = valid[:, None]
    else:
        c_rows = offs_p
        row_ok = offs_p[:, None] < P
    c_offs = c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=row_ok & col_ok)
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=row_ok & col_ok)
        if ACTIVATION == 4:
            tl.store(pre2_ptr + c_offs, acc2.to(pre2_ptr.dtype.element_ty), mask=row_ok & col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Kernel 2: dW[e] = A[rows of e]ᵀ B[rows of e], the grouped XᵀY of the weight gradients
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr, b_ptr, c_ptr, expert_offsets_ptr,
    K, N,
    stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_ck, stride_cn,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per (expert, K tile, N tile); it walks that expert's padded rows BLOCK_M at a time
    expert = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    pid_n = tl.program_id(axis=2)
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # an expert with no rows runs the loop zero times and stores zeros: dW_e = 0, never left uninitialised
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + offs_m
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=offs_k[None, :] < K, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                    mask=offs_n[None, :] < N, other=0.0)
        # acc += A_tileᵀ B_tile : (BLOCK_K, BLOCK_N)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    c_ptrs = c_ptr + expert * stride_ce + offs_k[:, None] * stride_ck + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------------------------


def _check_dtype(*tensors: torch.Tensor) -> None:
    """fp32, fp16 and (compiled only) bf16. fp64: the kernels accumulate in fp32, and Triton 3.9's interpreter
    returns garbage for fp64 and for bf16 `tl.dot` (an fp16 or fp32 run is the CPU check)."""
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton MoE kernels take float32, float16 or bfloat16 tensors, got {t.dtype}")
        if t.dtype == torch.bfloat16 and interpreter_mode():
            raise ValueError("bfloat16 tl.dot is wrong in Triton's CPU interpreter (checked with triton 3.9); use "
                             "float32 or float16 on the CPU, bfloat16 on a GPU")


def _precision(dtype: torch.dtype) -> str:
    # full-precision products for fp32/fp64 (TF32 would cost ~1e-3 relative); bf16/fp16 ignore the setting
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def grouped_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    perm: Permutation,
    *,
    gather: bool,
    scatter: bool = False,
    activation: str = "none",
    w_gate: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    store_pre: bool = False,
    transpose_w: bool = False,
    block_n: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    group_size_m: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch of the grouped GEMM: row p of the result is epilogue(A_row(p) @ W[e(p)]).

    * `a`: (N, K) token rows when `gather` (row p reads token sorted_ids[p] // top_k), else (P, K) padded rows.
    * `w`: (E, K, N_out) stacked weights, or (E, N_out, K) read as its transpose when `transpose_w` (no copy).
    * `scatter`: write row p to row sorted_ids[p] of an (M, N_out) zero buffer instead of an (P, N_out) one.
    * `activation`: "none", "relu", "silu", "gelu", or "swiglu" with `w_gate`; `row_scale` (M,): per-assignment
      factor; `store_pre`: also return the pre-activation(s) (U, and G for SwiGLU).
    Returns (C, U or None, G or None).
    """
    _check_dtype(a, w)
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"unknown kernel activation {activation!r}; choose one of {list(KERNEL_ACTIVATIONS)}")
    if (activation == "swiglu") != (w_gate is not None):
        raise ValueError("w_gate is needed for activation='swiglu' and only for it")
    num_experts = perm.num_experts
    if w.dim() != 3 or w.shape[0] != num_experts:
        raise ValueError(f"w must be (num_experts={num_experts}, K, N), got {tuple(w.shape)}")
    k_dim, n_dim = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    stride_we, stride_wk, stride_wn = w.stride(0), *((w.stride(2), w.stride(1)) if transpose_w
                                                   else (w.stride(1), w.stride(2)))
    if a.dim() != 2 or a.shape[1] != k_dim:
        raise ValueError(f"a must have {k_dim} columns to multiply w {tuple(w.shape)}, got {tuple(a.shape)}")
    if not gather and a.shape[0] != perm.padded_rows:
        raise ValueError(f"a in padded-row order must have {perm.padded_rows} rows, got {a.shape[0]}")
    if w_gate is not None and (w_gate.shape != w.shape or w_gate.stride() != w.stride()):
        raise ValueError(f"w_gate must have the shape and strides of w {tuple(w.shape)}, got {tuple(w_gate.shape)}")
    rows_out = perm.num_assignments if scatter else perm.padded_rows
    out = a.new_zeros(rows_out, n_dim)
    pre = a.new_empty(rows_out, n_dim) if store_pre else out
    pre2 = a.new_empty(rows_out, n_dim) if store_pre and activation == "swiglu" else out
    if perm.padded_rows:
        grid = (triton.cdiv(perm.padded_rows, perm.block_m) * triton.cdiv(n_dim, block_n),)
        _grouped_matmul_kernel[grid](
            a, w, w if w_gate is None else w_gate, out, pre, pre2, perm.sorted_ids, perm.block_expert,
            out if row_scale is None else row_scale,
            perm.padded_rows, n_dim, k_dim, perm.num_assignments,
            a.stride(0), a.stride(1), stride_we, stride_wk, stride_wn, out.stride(0), out.stride(1),
            A_ROWS_DIV=perm.top_k if gather else 0, SCATTER_C=scatter, ACTIVATION=KERNEL_ACTIVATIONS[activation],
            STORE_PRE=store_pre, ROW_SCALE=row_scale is not None, INPUT_PRECISION=_precision(a.dtype),
            BLOCK_M=perm.block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE_M=group_size_m,
        )
    elif store_pre:
        pre.zero_()
        pre2.zero_()
    return out, (pre if store_pre else None), (pre2 if store_pre and activation == "swiglu" else None)


def grouped_weight_grad(
    a: torch.Tensor, b: torch.Tensor, perm: Permutation, *, block_k: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """dW (E, K, N) with dW[e] = Σ_{padded rows p of e} a_pᵀ b_p, for a (P, K), b (P, N) in padded-row order
    (padding rows must be zero)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != perm.padded_rows or b.shape[0] != perm.padded_rows:
        raise ValueError(f"a and b must both have {perm.padded_rows} rows (the padded layout), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    _check_dtype(a, b)
    num_experts, (k_dim, n_dim) = perm.num_experts, (a.shape[1], b.shape[1])
    out = a.new_empty(num_experts, k_dim, n_dim)
    grid = (num_experts, triton.cdiv(k_dim, block_k), triton.cdiv(n_dim, block_n))
    _grouped_weight_grad_kernel[grid](
        a, b, out, perm.expert_offsets, k_dim, n_dim,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        INPUT_PRECISION=_precision(a.dtype), BLOCK_M=perm.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def _activation_grad(activation: str, d_h: torch.Tensor, u: torch.Tensor, g: torch.Tensor | None):
    """(dU, dG) from dH and the stored pre-activations: dU = dH ⊙ act'(U); SwiGLU: h = silu(G) U."""
    if activation == "relu":
        return d_h * (u > 0).to(d_h.dtype), None
    if activation == "silu":
        s = torch.sigmoid(u)
        # silu'(u) = σ(u) (1 + u (1 − σ(u)))
        return d_h * s * (1 + u * (1 - s)), None
    if activation == "gelu":
        # gelu'(u) = Φ(u) + u φ(u)
        cdf = 0.5 * (1 + torch.erf(u * 0.7071067811865476))
        pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327
        return d_h * (cdf + u * pdf), None
    if activation == "swiglu":
        s = torch.sigmoid(g)
        # ∂h/∂U = silu(G), ∂h/∂G = U silu'(G)
        return d_h * g * s, d_h * u * s * (1 + g * (1 - s))
    return d_h, None


class TritonMoEFunction(torch.autograd.Function):
    """y = Σ_s g_{t,s} F_{e_{t,s}}(x_t) through the Triton kernels; gradients for x, g (flat, (M,)), W_in, W_gate,
    W_out. `perm` and `activation` are constants."""

    @staticmethod
    def forward(ctx, x, gates, w_in, w_gate, w_out, perm: Permutation, activation: str, block: int):
        num_tokens, d_model = x.shape
        # GEMM1: H = act(x[t(p)] W_in[e]) on the padded rows, U (and G) kept for the backward : (P, d_hidden)
        h, u, g = grouped_matmul(x, w_in, perm, gather=True, activation=activation, w_gate=w_gate,
                                 store_pre=True, block_n=block, block_k=block)
        # GEMM2: Y[a] = g_a · H_p W_out[e], scattered to assignment order : (M, d_model)
        y_slots, _, _ = grouped_matmul(h, w_out, perm, gather=False, scatter=True, row_scale=gates,
                                       block_n=block, block_k=block)
        ctx.save_for_backward(x, gates, w_in, w_gate, w_out, h, u, g)
        ctx.perm, ctx.activation, ctx.block = perm, activation, block
        # scatter back: y_t = Σ_s Y[t·k + s] : (N, d_model)
        return y_slots.view(num_tokens, perm.top_k, d_model).sum(1)

    @staticmethod
    def backward(ctx, dy):
        x, gates, w_in, w_gate, w_out, h, u, g = ctx.saved_tensors
        perm, activation, block = ctx.perm, ctx.activation, ctx.block
        dy = dy.contiguous()
        valid = perm.valid
        token = perm.token_of_row
        # routing weight of each padded row, 0 on padding : (P,)
        g_rows = torch.where(valid, gates[perm.sorted_ids.clamp(max=max(perm.num_assignments - 1, 0))],
                             gates.new_zeros(()))
        # dH^u_p = dy_{t(p)} W_out[e]ᵀ : (P, d_hidden)
        dh_u, _, _ = grouped_matmul(dy, w_out, perm, gather=True, transpose_w=True, block_n=block, block_k=block)
        # dg_a = ⟨H_p, dH^u_p⟩ : (M,)
        d_gates = gates.new_zeros(perm.num_assignments)
        d_gates[perm.sorted_ids[valid]] = (h * dh_u).sum(1)[valid].to(gates.dtype)
        # dO_p = g_a dy_{t(p)}, zero on padding : (P, d_model)
        d_o = dy[token] * g_rows.unsqueeze(1).to(dy.dtype)
        d_w_out = grouped_weight_grad(h, d_o, perm, block_k=block, block_n=block)
        d_h = dh_u * g_rows.unsqueeze(1).to(dh_u.dtype)
        d_u, d_g = _activation_grad(activation, d_h, u, g)
        # x rows in padded order, zero on padding : (P, d_model)
        x_rows = x[token] * valid.unsqueeze(1).to(x.dtype)
        d_w_in = grouped_weight_grad(x_rows, d_u, perm, block_k=block, block_n=block)
        d_w_gate = None if d_g is None else grouped_weight_grad(x_rows, d_g, perm, block_k=block, block_n=block)
        # dX_p = dU_p W_in[e]ᵀ (+ dG_p W_gate[e]ᵀ) : (P, d_model); dx_t = Σ_{p of t} dX_p
        d_rows, _, _ = grouped_matmul(d_u, w_in, perm, gather=False, transpose_w=True, block_n=block, block_k=block)
        if d_g is not None:
            d_rows = d_rows + grouped_matmul(d_g, w_gate, perm, gather=False, transpose_w=True, block_n=block,
                                             block_k=block)[0]
        d_x = torch.zeros_like(x).index_add(0, token[valid], d_rows[valid])
        return d_x, d_gates, d_w_in, d_w_gate, d_w_out, None, None, None


def moe_experts_triton(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "gelu",
    mask: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """The Triton path of `lablib.kernels.reference.moe_experts_reference` (same arguments, same result up to
    fp32 rounding), differentiable in x, weights, w_in, w_gate and w_out. `block` is BLOCK_M = BLOCK_N = BLOCK_K."""
    if activation not in ("gelu", "relu", "silu", "swiglu"):
        raise ValueError(f"unknown activation {activation!r}; choose one of ['gelu', 'relu', 'silu', 'swiglu']")
    if (activation == "swiglu") != (w_gate is not None):
        raise ValueError("w_gate is needed for activation='swiglu' and only for it")
    if x.dim() != 2 or w_in.dim() != 3 or x.shape[1] != w_in.shape[1]:
        raise ValueError(f"x (num_tokens, d_model) and w_in (E, d_model, d_hidden) disagree: {tuple(x.shape)} vs "
                         f"{tuple(w_in.shape)}")
    _check_dtype(x)
    num_experts, d_model, d_hidden = w_in.shape
    if w_out.shape != (num_experts, d_hidden, d_model):
        raise ValueError(f"w_out must be {(num_experts, d_hidden, d_model)}, got {tuple(w_out.shape)}")
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices and weights must both be ({x.shape[0]}, k), got {tuple(indices.shape)} and "
                         f"{tuple(weights.shape)}")
    devices = {t.device for t in (x, w_in, w_out, weights, indices)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.is_cuda == interpreter_mode():
        where = "CUDA" if x.is_cuda else "CPU"
        raise ValueError(f"tensors are on {where} but TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: the "
                         "interpreter needs CPU tensors, compiled kernels need CUDA tensors")
    perm = sort_assignments(indices, num_experts=num_experts, block_m=block, mask=mask)
    gates = weights.reshape(-1).to(x.dtype)
    return TritonMoEFunction.apply(x.contiguous(), gates.contiguous(), w_in.to(x.dtype), None if w_gate is None
                                   else w_gate.to(x.dtype), w_out.to(x.dtype), perm, activation, block)


def triton_expert_backend(experts, x, indices, weights, mask=None) -> torch.Tensor:
    """The `"triton"` backend of `lablib.moe.Experts` (see `lablib.moe.layer.ExpertBackend`)."""
    if experts.bias:
        raise ValueError("the triton expert backend has no bias epilogue; build the experts with bias=False or use "
                         "backend='torch'")
    return moe_experts_triton(x, indices, weights, w_in=experts.w_in, w_out=experts.w_out, w_gate=experts.w_gate,
                              activation=experts.activation, mask=mask)


def _register() -> None:
    from lablib.moe import register_expert_backend

    register_expert_backend("triton", triton_expert_backend)


_register()
