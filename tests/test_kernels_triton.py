"""The Triton MoE kernels (lablib.kernels.triton_moe) in Triton's CPU interpreter (TRITON_INTERPRET=1, set by the
module when there is no CUDA) at tiny shapes, against the plain-torch reference (lablib.kernels.reference) and
lablib.moe's torch backend: outputs and the gradients of x, the routing weights and every expert matrix.

Tolerance (fp32, TF32 off): max |a - b| <= 1e-5 · max |b| + 1e-6. The kernels sum the same products in another order
(tiles of 16 along K, fp32 accumulators); observed differences are ~1e-7 relative. A wrong expert, a missing
routing weight or a transposed matrix is off by O(1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import moe
from lablib.kernels import moe_experts_reference, sort_assignments
from lablib.kernels import triton_moe as tm

REL = 1e-5


def _close(a, b):
    return float((a - b).abs().max()) <= REL * float(b.abs().max()) + 1e-6


def _problem(*, num_tokens, d_model, d_hidden, num_experts, top_k, activation, seed=0, unused=(), masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=g)
    # routing: distinct experts per token, never an expert in `unused`
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    scores = torch.rand(num_tokens, len(allowed), generator=g)
    idx = allowed[scores.topk(top_k, dim=1).indices]
    w = torch.rand(num_tokens, top_k, generator=g)
    mask = (torch.rand(num_tokens, top_k, generator=g) > 0.25) if masked else None
    mats = {"w_in": torch.randn(num_experts, d_model, d_hidden, generator=g) / d_model ** 0.5,
            "w_out": torch.randn(num_experts, d_hidden, d_model, generator=g) / d_hidden ** 0.5}
    if activation == "swiglu":
        mats["w_gate"] = torch.randn(num_experts, d_model, d_hidden, generator=g) / d_model ** 0.5
    return x, idx, w, mask, mats


def _forward_backward(fn, x, idx, w, mask, mats, activation, upstream):
    leaves = {"x": x.clone().requires_grad_(True), "weights": w.clone().requires_grad_(True)}
    leaves.update({k: v.clone().requires_grad_(True) for k, v in mats.items()})
    y = fn(leaves["x"], idx, leaves["weights"], activation=activation, mask=mask,
           **{k: leaves[k] for k in mats})
    grads = torch.autograd.grad(y, list(leaves.values()), upstream)
    return y.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("case", [
    # tokens not a multiple of the block (16), d_model/d_hidden not multiples of it either, top-2, one empty expert
    {"num_tokens": 19, "d_model": 20, "d_hidden": 24, "num_experts": 4, "top_k": 2, "unused": (2,)},
    # top-3 with dropped slots (capacity / router masks), two empty experts
    {"num_tokens": 7, "d_model": 8, "d_hidden": 12, "num_experts": 5, "top_k": 3, "unused": (0, 4), "masked": True},
])
def test_triton_matches_reference_outputs_and_gradients(activation, case):
    x, idx, w, mask, mats = _problem(activation=activation, **case)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y_t, g_t = _forward_backward(tm.moe_experts_triton, x, idx, w, mask, mats, activation, upstream)
    y_r, g_r = _forward_backward(moe_experts_reference, x, idx, w, mask, mats, activation, upstream)
    assert _close(y_t, y_r)
    for name in g_r:
        assert _close(g_t[name], g_r[name]), name
    # experts that receive no token get exactly zero weight gradients
    for e in case["unused"]:
        for name in mats:
            assert bool((g_t[name][e] == 0).all()), (name, e)
    if mask is not None:
        # dropped slots get no gradient on their routing weight
        assert bool((g_t["weights"][~mask] == 0).all())


def test_the_comparison_has_teeth():
    # a transposed output matrix (a classic layout bug) is far outside the tolerance
    x, idx, w, _, mats = _problem(num_tokens=9, d_model=8, d_hidden=8, num_experts=3, top_k=2, activation="gelu")
    y_t = tm.moe_experts_triton(x, idx, w, w_in=mats["w_in"], w_out=mats["w_out"].transpose(1, 2).contiguous())
    assert not _close(y_t, moe_experts_reference(x, idx, w, **mats))


@settings(max_examples=8, deadline=None)
@given(num_tokens=st.integers(1, 20), num_experts=st.integers(1, 5), top_k=st.integers(1, 3), seed=st.integers(0, 99),
       activation=st.sampled_from(["gelu", "swiglu"]))
def test_random_routings(num_tokens, num_experts, top_k, seed, activation):
    top_k = min(top_k, num_experts)
    x, idx, w, _, mats = _problem(num_tokens=num_tokens, d_model=6, d_hidden=10, num_experts=num_experts,
                                  top_k=top_k, activation=activation, seed=seed)
    # hypothesis may route several slots of a token to one expert and make experts empty
    idx = torch.randint(0, num_experts, idx.shape, generator=torch.Generator().manual_seed(seed))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    y_t, g_t = _forward_backward(tm.moe_experts_triton, x, idx, w, None, mats, activation, upstream)
    y_r, g_r = _forward_backward(moe_experts_reference, x, idx, w, None, mats, activation, upstream)
    assert _close(y_t, y_r) and all(_close(g_t[n], g_r[n]) for n in g_r)


def test_grouped_weight_grad_against_a_loop():
    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([[0], [2], [2], [0], [2]])
    perm = sort_assignments(idx, num_experts=3, block_m=4)
    a = torch.randn(perm.padded_rows, 5, generator=g) * perm.valid.unsqueeze(1)
    b = torch.randn(perm.padded_rows, 6, generator=g) * perm.valid.unsqueeze(1)
    got = tm.grouped_weight_grad(a, b, perm, block_k=4, block_n=4)
    for e in range(3):
        rows = slice(int(perm.expert_offsets[e]), int(perm.expert_offsets[e + 1]))
        assert torch.allclose(got[e], a[rows].T @ b[rows], atol=1e-6)
    assert bool((got[1] == 0).all())


def test_moe_layer_triton_backend_matches_torch_backend():
    torch.manual_seed(0)
    layers = {}
    for backend in ("torch", "triton", "auto"):
        torch.manual_seed(0)
        layers[backend] = moe.MoELayer(d_model=16, d_hidden=24, num_experts=4, top_k=2, activation="swiglu",
                                       backend=backend)
    x = torch.randn(2, 5, 16)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        xb = x.clone().requires_grad_(True)
        out = layer(xb)
        (out.y.square().sum() + out.aux_loss).backward()
        outs[backend] = out.y.detach()
        grads[backend] = {"x": xb.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert _close(outs["triton"], outs["torch"])
    for name, grad in grads["torch"].items():
        assert _close(grads["triton"][name], grad), name
    # "auto" on CPU tensors is the torch dispatch, bit for bit
    assert torch.equal(outs["auto"], outs["torch"])


def test_backend_errors():
    experts = moe.Experts(num_experts=2, d_model=4, d_hidden=4, bias=True, backend="triton")
    with pytest.raises(ValueError, match="no bias epilogue"):
        experts(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    x, idx, w, _, mats = _problem(num_tokens=4, d_model=4, d_hidden=4, num_experts=2, top_k=1, activation="gelu")
    with pytest.raises(ValueError, match="w_out must be"):
        tm.moe_experts_triton(x, idx, w, w_in=mats["w_in"], w_out=mats["w_out"][:, :3])
    with pytest.raises(ValueError, match="w_gate is needed"):
        tm.moe_experts_triton(x, idx, w, activation="swiglu", **mats)
    with pytest.raises(ValueError, match="unknown kernel activation"):
        tm.grouped_matmul(x, mats["w_in"], sort_assignments(idx, num_experts=2, block_m=4), gather=True,
                          activation="tanh")


def test_half_precision_and_unsupported_dtypes():
    x, idx, w, _, mats = _problem(num_tokens=13, d_model=16, d_hidden=16, num_experts=3, top_k=2, activation="swiglu")
    half = {k: v.half() for k, v in mats.items()}
    y = tm.moe_experts_triton(x.half(), idx, w.half(), activation="swiglu", **half)
    ref = moe_experts_reference(x.double(), idx, w.double(), activation="swiglu",
                                **{k: v.double() for k, v in mats.items()})
    # fp16 inputs, fp32 accumulation: a few fp16 ulps (2^-11 ≈ 5e-4) relative
    assert y.dtype == torch.float16 and float((y.double() - ref).abs().max()) <= 3e-3 * float(ref.abs().max())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 tensors, got torch.float64"):
        tm.moe_experts_triton(x.double(), idx, w.double(), activation="swiglu",
                              **{k: v.double() for k, v in mats.items()})
    if tm.interpreter_mode():
        with pytest.raises(ValueError, match="bfloat16 tl.dot is wrong in Triton's CPU interpreter"):
            tm.moe_experts_triton(x.bfloat16(), idx, w, activation="swiglu", **mats)


def test_interpreter_is_on_without_cuda():
    if not torch.cuda.is_available():
        assert tm.interpreter_mode()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(dtype):
    if not torch.cuda.is_available() or tm.interpreter_mode():
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    x, idx, w, _, mats = _problem(num_tokens=1000, d_model=256, d_hidden=512, num_experts=8, top_k=2,
                                  activation="swiglu")
    cuda = {k: v.cuda().to(dtype) for k, v in mats.items()}
    y = tm.moe_experts_triton(x.cuda().to(dtype), idx.cuda(), w.cuda().to(dtype), activation="swiglu", block=64,
                              **cuda)
    ref = moe_experts_reference(x.double(), idx, w.double(), activation="swiglu",
                                **{k: v.double() for k, v in mats.items()})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert float((y.double().cpu() - ref).abs().max()) <= tol * float(ref.abs().max())


def test_lazy_backend_import_failure_is_a_clear_error(monkeypatch):
    from lablib.moe import layer as moe_layer

    monkeypatch.setitem(moe_layer._LAZY_BACKENDS, "fake_kernels", "lablib.no_such_module")
    with pytest.raises(ValueError, match=r"backend 'fake_kernels' needs lablib.no_such_module, which failed to import"):
        moe.Experts(num_experts=2, d_model=4, d_hidden=4, backend="fake_kernels")
    # the triton backend registers itself on first use
    assert moe.Experts(num_experts=2, d_model=4, d_hidden=4, backend="triton").backend == "triton"
    assert moe.EXPERT_BACKENDS["triton"] is tm.triton_expert_backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without CUDA")
def test_a_triton_imported_before_the_interpreter_was_on_gives_a_clear_error():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton\nimport lablib.kernels.triton_moe"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "set TRITON_INTERPRET=1" in run.stderr, run.stderr[-2000:]
    fine = subprocess.run([sys.executable, "-c", "import lablib.kernels.triton_moe as tm; import triton;"
                           "assert tm.interpreter_mode()"], env=env, capture_output=True, text=True, timeout=300)
    assert fine.returncode == 0, fine.stderr[-2000:]
