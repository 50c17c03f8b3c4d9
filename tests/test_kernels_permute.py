"""lablib.kernels.permute and reference: hand-worked layout (the vLLM docstring example), hypothesis properties of
the sort (a permutation plus sentinels, one expert per tile, stable order, padding counts, inverse), and the
reference checked against a per-token loop and against lablib.moe's torch backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import moe
from lablib.kernels import (
    expert_ffn,
    inverse_permutation,
    moe_experts_reference,
    padded_counts,
    padding_fraction,
    sort_assignments,
)


def test_hand_worked_layout():
    # k = 3, E = 4, block_m = 4 (vLLM's moe_align_block_size example, 0-based expert ids)
    idx = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]])
    perm = sort_assignments(idx, num_experts=4, block_m=4)
    assert perm.sorted_ids.tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert perm.block_expert.tolist() == [0, 1, 2, 3]
    assert perm.counts.tolist() == [3, 3, 3, 3] and perm.padded.tolist() == [4, 4, 4, 4]
    assert perm.expert_offsets.tolist() == [0, 4, 8, 12, 16]
    assert perm.padding == 4 and perm.padded_rows == 16
    assert perm.token_of_row.tolist()[:4] == [1, 2, 3, 0]


def test_empty_experts_and_mask():
    idx = torch.tensor([[2, 0], [2, 0], [2, 2]])
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    perm = sort_assignments(idx, num_experts=4, block_m=2, mask=mask)
    # expert 0: assignment 3; expert 2: 0, 2, 4, 5; experts 1 and 3 get no tile
    assert perm.counts.tolist() == [1, 0, 4, 0] and perm.padded.tolist() == [2, 0, 4, 0]
    assert perm.sorted_ids.tolist() == [3, 6, 0, 2, 4, 5]
    assert perm.block_expert.tolist() == [0, 2, 2]
    assert inverse_permutation(perm).tolist() == [2, -1, 3, 0, 4, 5]


def test_padding_helpers():
    assert padded_counts(torch.tensor([0, 1, 16, 17]), 16).tolist() == [0, 16, 16, 32]
    assert padding_fraction(torch.tensor([0, 1, 16, 17]), 16) == pytest.approx((64 - 34) / 64)
    assert padding_fraction(torch.tensor([0, 0]), 8) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"indices": torch.zeros(3, dtype=torch.long)}, r"indices must be a 2-D"),
    ({"indices": torch.zeros(3, 2)}, r"integer expert ids"),
    ({"indices": torch.tensor([[0, 4]])}, r"expert ids must lie in \[0, 4\)"),
    ({"indices": torch.tensor([[0, -1]])}, r"expert ids must lie in \[0, 4\)"),
    ({"indices": torch.tensor([[0, 1]]), "block_m": 0}, r"block_m must be a positive int"),
    ({"indices": torch.tensor([[0, 1]]), "mask": torch.ones(1, 3, dtype=torch.bool)}, r"mask must be a bool"),
])
def test_bad_input(kwargs, message):
    kwargs = {"num_experts": 4, "block_m": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sort_assignments(kwargs.pop("indices"), **kwargs)


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 6))
    num_tokens = draw(st.integers(0, 20))
    top_k = draw(st.integers(1, 3))
    ids = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    keep = draw(st.lists(st.booleans(), min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    block_m = draw(st.integers(1, 8))
    indices = torch.tensor(ids, dtype=torch.long).reshape(num_tokens, top_k)
    mask = torch.tensor(keep, dtype=torch.bool).reshape(num_tokens, top_k)
    return indices, mask, num_experts, block_m


@settings(max_examples=150, deadline=None)
@given(routings(), st.booleans())
def test_sort_properties(routing, use_mask):
    indices, mask, num_experts, block_m = routing
    mask = mask if use_mask else None
    perm = sort_assignments(indices, num_experts=num_experts, block_m=block_m, mask=mask)
    num_assignments = indices.numel()
    flat = indices.reshape(-1)
    kept = torch.arange(num_assignments) if mask is None else torch.nonzero(mask.reshape(-1)).reshape(-1)
    # (a) the real rows are exactly the kept assignments, once each; the rest are sentinels
    real = perm.sorted_ids[perm.valid]
    assert sorted(real.tolist()) == kept.tolist()
    assert bool((perm.sorted_ids[~perm.valid] == num_assignments).all())
    # (b) padding counts: Σ padded = P, a multiple of block_m, each expert padded by less than block_m
    assert perm.padded_rows == int(perm.padded.sum()) and perm.padded_rows % block_m == 0
    assert perm.counts.tolist() == [int((flat[kept] == e).sum()) for e in range(num_experts)]
    assert bool(((perm.padded - perm.counts) < block_m).all()) and bool((perm.padded >= perm.counts).all())
    # every tile holds one expert, and its real rows belong to that expert
    tile_of_row = torch.arange(perm.padded_rows) // block_m
    row_expert = perm.block_expert[tile_of_row]
    assert bool((flat[real] == row_expert[perm.valid]).all())
    # stable: inside one expert the assignment ids ascend, and real rows come before the padding
    for e in range(num_experts):
        start, end = perm.expert_offsets[e].item(), perm.expert_offsets[e + 1].item()
        ids = perm.sorted_ids[start:end].tolist()
        assert ids == sorted(ids)
    # the inverse undoes the sort
    inverse = inverse_permutation(perm)
    assert bool((perm.sorted_ids[inverse[kept]] == kept).all())
    assert bool((inverse[inverse >= 0].sort().values == torch.nonzero(perm.valid).reshape(-1)).all())


@settings(max_examples=40, deadline=None)
@given(routings())
def test_gather_identity_scatter_returns_k_x(routing):
    # gather rows in padded order, identity experts, scatter-add with unit weights: Σ over kept slots of x_t
    indices, mask, num_experts, block_m = routing
    perm = sort_assignments(indices, num_experts=num_experts, block_m=block_m, mask=mask)
    x = torch.randn(indices.shape[0], 3, dtype=torch.float64)
    rows = x[perm.token_of_row] * perm.valid.unsqueeze(1)
    y = torch.zeros_like(x).index_add(0, perm.token_of_row, rows)
    assert torch.allclose(y, mask.sum(1, keepdim=True).to(x.dtype) * x)


def _per_token_loop(x, indices, weights, w_in, w_out, w_gate, activation, mask):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            if mask is None or mask[t, s]:
                e = int(indices[t, s])
                y[t] += weights[t, s] * expert_ffn(x[t:t + 1], w_in[e], w_out[e], activation=activation,
                                                   w_gate=None if w_gate is None else w_gate[e])[0]
    return y


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_reference_equals_per_token_loop(activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 5, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(9, 2, generator=g) > 0.3
    w_in, w_out = torch.randn(5, 6, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, 6, generator=g,
                                                                                        dtype=torch.float64)
    w_gate = torch.randn(5, 6, 7, generator=g, dtype=torch.float64) if activation == "swiglu" else None
    got = moe_experts_reference(x, idx, w, w_in=w_in, w_out=w_out, w_gate=w_gate, activation=activation, mask=mask)
    assert torch.allclose(got, _per_token_loop(x, idx, w, w_in, w_out, w_gate, activation, mask))


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
def test_reference_equals_lablib_moe_torch_backend(activation):
    torch.manual_seed(1)
    experts = moe.Experts(num_experts=4, d_model=6, d_hidden=10, activation=activation, init_std=0.5)
    x = torch.randn(13, 6)
    idx, w = torch.randint(0, 4, (13, 3)), torch.rand(13, 3)
    mask = torch.rand(13, 3) > 0.2
    y = experts(x, idx, w, mask)
    ref = moe_experts_reference(x, idx, w, w_in=experts.w_in, w_out=experts.w_out, w_gate=experts.w_gate,
                                activation=activation, mask=mask)
    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-5)


def test_reference_bad_input():
    w_in, w_out = torch.zeros(2, 3, 4), torch.zeros(2, 4, 3)
    x, idx, w = torch.zeros(5, 3), torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 1)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        moe_experts_reference(x, idx, w, w_in=w_in, w_out=w_out, activation="tanh")
    with pytest.raises(ValueError, match="w_gate is needed"):
        moe_experts_reference(x, idx, w, w_in=w_in, w_out=w_out, activation="swiglu")
    with pytest.raises(ValueError, match="shapes disagree"):
        moe_experts_reference(torch.zeros(5, 4), idx, w, w_in=w_in, w_out=w_out)
    with pytest.raises(ValueError, match=r"indices and weights must both be \(5, k\)"):
        moe_experts_reference(x, idx, torch.zeros(5, 2), w_in=w_in, w_out=w_out)
