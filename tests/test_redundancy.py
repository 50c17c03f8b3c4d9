"""lablib.redundancy on constructed cases: identity layers, identical layers and experts, naive references."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import ledger, moe, redundancy
from lablib.models import TinyTransformer, TransformerConfig

CFG = TransformerConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8)


def tiny(seed: int = 0, **kwargs) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(CFG, **kwargs)


def tokens(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), generator=torch.Generator().manual_seed(seed))


def zero_attention_(model: TinyTransformer, layer: int) -> None:
    """Make layer's attention branch output exactly 0: an identity sublayer."""
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight.zero_()
        model.blocks[layer].attn.proj.bias.zero_()


def zero_mlp_(model: TinyTransformer, layer: int) -> None:
    with torch.no_grad():
        model.blocks[layer].ffn.proj.weight.zero_()
        model.blocks[layer].ffn.proj.bias.zero_()


# ---------------------------------------------------------------------------------------------------------------
# similarity measures
# ---------------------------------------------------------------------------------------------------------------


def naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s definition through n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_io_cosine_hand_cases():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert redundancy.io_cosine(x, x) == pytest.approx(1.0)
    assert redundancy.io_cosine(x, -x) == pytest.approx(-1.0)
    # rows: cos([1,0],[0,1]) = 0, cos([0,2],[0,5]) = 1 -> mean 0.5
    assert redundancy.io_cosine(x, torch.tensor([[0.0, 1.0], [0.0, 5.0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        redundancy.io_cosine(x, torch.zeros(3, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        redundancy.io_cosine([[1.0]], x)


def test_linear_cka_identical_is_one_and_matches_naive():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = torch.randn(40, 9, generator=g)
    assert redundancy.linear_cka(x, x) == pytest.approx(1.0)
    assert redundancy.linear_cka(x, y) == pytest.approx(naive_cka(x, y), abs=1e-10)
    # invariant to an orthogonal map and an isotropic scaling, not to an anisotropic one
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert redundancy.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    assert redundancy.linear_cka(x, x * torch.tensor([1.0, 1, 1, 1, 1, 50])) < 0.99
    # a (B, T, d) tensor is flattened over tokens
    assert redundancy.linear_cka(x.view(4, 10, 6), y.view(4, 10, 9)) == pytest.approx(naive_cka(x, y), abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 20), d1=st.integers(1, 6), d2=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_linear_cka_matches_naive_property(n, d1, d2, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)
    value = redundancy.linear_cka(x, y)
    assert value == pytest.approx(naive_cka(x, y), abs=1e-9)
    assert -1e-12 <= value <= 1 + 1e-12
    assert value == pytest.approx(redundancy.linear_cka(y, x), abs=1e-12)


def test_linear_cka_errors_and_constant_input():
    with pytest.raises(ValueError, match="same tokens"):
        redundancy.linear_cka(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        redundancy.linear_cka(torch.zeros(4), torch.zeros(4))
    assert redundancy.linear_cka(torch.ones(5, 3), torch.randn(5, 3)) == 0.0


def test_cka_matrix_is_symmetric_with_unit_diagonal():
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(12, 4, generator=g) for _ in range(3)]
    m = redundancy.cka_matrix(states)
    assert [m[i][i] for i in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    assert m[0][2] == m[2][0] == pytest.approx(naive_cka(states[0], states[2]))
    with pytest.raises(ValueError):
        redundancy.cka_matrix([])


# ---------------------------------------------------------------------------------------------------------------
# hidden states and layer similarity
# ---------------------------------------------------------------------------------------------------------------


def test_hidden_states_follow_the_blocks_by_hand():
    model, idx = tiny(), tokens()
    states = redundancy.hidden_states(model, idx)
    assert states.n_layers == 4 and len(states.mid) == len(states.block_out) == 4
    block = model.blocks[1]
    x = states.block_in[1]
    with torch.no_grad():
        mid = x + block.attn(block.attn_norm(x))
        out = mid + block.ffn(block.ffn_norm(mid))
        logits = model.lm_head(model.final_norm(states.block_out[-1]))
        reference = model(idx).logits
    torch.testing.assert_close(states.mid[1], mid)
    torch.testing.assert_close(states.block_out[1], out)
    for i in range(3):
        assert torch.equal(states.block_out[i], states.block_in[i + 1])
    torch.testing.assert_close(logits, reference)
    assert model.training  # mode restored
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.blocks)  # hooks removed


def test_identity_sublayers_have_similarity_one_and_identical_layers_cka_one():
    model = tiny()
    zero_attention_(model, 1)
    zero_attention_(model, 2)
    zero_mlp_(model, 2)  # block 2 is the identity: its output equals block 1's output
    sim = redundancy.layer_similarity(model, tokens())
    assert sim.attention[1] == pytest.approx(1.0, abs=1e-6)
    assert sim.block[2] == pytest.approx(1.0, abs=1e-6) and sim.mlp[2] == pytest.approx(1.0, abs=1e-6)
    assert sim.attention[0] < 1 - 1e-5  # an untrained layer changes the stream a little
    assert sim.cka[1][2] == pytest.approx(1.0, abs=1e-9) and sim.cka[2][1] == sim.cka[1][2]
    assert sim.cka[0][3] < 0.9999
    assert sim.ranking("attention")[:2] == [1, 2]
    with pytest.raises(ValueError, match="kind"):
        sim.scores("head")


# ---------------------------------------------------------------------------------------------------------------
# dropping
# ---------------------------------------------------------------------------------------------------------------


def test_dropping_an_identity_layer_changes_nothing():
    model, idx = tiny(), tokens()
    zero_attention_(model, 2)
    zero_mlp_(model, 3)
    before = copy.deepcopy(model.state_dict())
    dropped = redundancy.drop_sublayers(model, attention=[2], mlp=[3])
    with torch.no_grad():
        torch.testing.assert_close(dropped(idx).logits, model(idx).logits, rtol=0, atol=0)
    # a real layer does change the output
    other = redundancy.drop_sublayers(model, attention=[0])
    with torch.no_grad():
        assert not torch.allclose(other(idx).logits, model(idx).logits)
    # the original is untouched, the copy lost parameters and FLOPs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.blocks[2].attn, torch.nn.Module) and not isinstance(model.blocks[2].attn,
                                                                                  redundancy.ZeroBranch)
    full, less = ledger.ledger(model), ledger.ledger(dropped)
    attn_params = sum(p.numel() for p in model.blocks[2].attn.parameters())
    mlp_params = sum(p.numel() for p in model.blocks[3].ffn.parameters())
    assert full.total - less.total == attn_params + mlp_params
    assert less.flops_per_token < full.flops_per_token


def test_drop_sublayers_rejects_bad_indices():
    model = tiny()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        redundancy.drop_sublayers(model, attention=[4])
    with pytest.raises(ValueError, match="twice"):
        redundancy.drop_sublayers(model, mlp=[1, 1])
    with pytest.raises(TypeError, match="TinyTransformer"):
        redundancy.drop_sublayers(torch.nn.Linear(2, 2), attention=[0])


def test_drop_most_similar_drops_identity_layers_first():
    model, idx = tiny(), tokens()
    zero_attention_(model, 3)
    zero_mlp_(model, 1)
    sim = redundancy.layer_similarity(model, idx)
    result = redundancy.drop_most_similar(model, sim, kind="attention", k=1)
    assert result.dropped == [3] and result.scores[0] == pytest.approx(1.0, abs=1e-6)
    assert isinstance(result.model.blocks[3].attn, redundancy.ZeroBranch)
    mlp = redundancy.drop_most_similar(model, sim, kind="mlp", k=1)
    assert mlp.dropped == [1]
    with torch.no_grad():
        torch.testing.assert_close(mlp.model(idx).logits, model(idx).logits, rtol=0, atol=0)
    block = redundancy.drop_most_similar(model, sim, kind="block", k=2)
    assert all(isinstance(block.model.blocks[i].attn, redundancy.ZeroBranch) and
               isinstance(block.model.blocks[i].ffn, redundancy.ZeroBranch) for i in block.dropped)
    assert redundancy.drop_most_similar(model, sim, kind="mlp", k=0).dropped == []
    with pytest.raises(ValueError, match="k must be"):
        redundancy.drop_most_similar(model, sim, kind="mlp", k=5)


# ---------------------------------------------------------------------------------------------------------------
# random routing
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(num_experts=st.integers(1, 9), data=st.data(), n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_uniform_random_router_picks_distinct_experts_with_equal_weights(num_experts, data, n, seed):
    top_k = data.draw(st.integers(1, num_experts))
    router = redundancy.UniformRandomRouter(d_model=4, num_experts=num_experts, top_k=top_k, seed=seed)
    out = router(torch.randn(n, 4))
    assert out.indices.shape == (n, top_k) and out.weights.shape == (n, top_k)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < num_experts
    assert all(len(set(row)) == top_k for row in out.indices.tolist())
    torch.testing.assert_close(out.weights, torch.full((n, top_k), 1.0 / top_k))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(n))


def test_uniform_random_router_is_uniform_reproducible_and_leaves_global_rng():
    router = redundancy.UniformRandomRouter(d_model=4, num_experts=4, top_k=2, seed=3)
    state = torch.random.get_rng_state()
    first = router(torch.zeros(4000, 4)).indices
    assert torch.equal(torch.random.get_rng_state(), state)
    counts = torch.bincount(first.reshape(-1), minlength=4).double()
    # each expert gets 2/4 of 4000 tokens = 2000 assignments; binomial sd ~ 32
    assert (counts - 2000).abs().max() < 150
    router.reset()
    assert torch.equal(router(torch.zeros(4000, 4)).indices, first)
    clone = copy.deepcopy(router)
    assert torch.equal(clone(torch.zeros(10, 4)).indices, router(torch.zeros(10, 4)).indices)
    with pytest.raises(ValueError, match="seed"):
        redundancy.UniformRandomRouter(d_model=4, num_experts=4, top_k=2, seed=-1)


def moe_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_experts=4, top_k=2, d_hidden=8)
    options.update(kwargs)
    return moe.MoETransformer(CFG, ffn_factory=moe.moe_ffn_factory(**options))


def make_experts_identical_(layer: moe.MoELayer) -> None:
    with torch.no_grad():
        for name in ("w_in", "w_out"):
            t = getattr(layer.experts, name)
            t.copy_(t[0:1].expand_as(t))


def test_random_router_probe_changes_nothing_when_experts_are_identical():
    model, idx = moe_model(), tokens()
    make_experts_identical_(model.blocks[2].ffn)
    probed = redundancy.with_random_router(model, 2, seed=1)
    assert isinstance(probed.blocks[2].ffn.router, redundancy.UniformRandomRouter)
    assert not isinstance(model.blocks[2].ffn.router, redundancy.UniformRandomRouter)
    with torch.no_grad():
        # learned top-2 weights sum to 1, random ones are 1/2 + 1/2: identical experts give the same output
        torch.testing.assert_close(probed(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-6)
        other = redundancy.with_random_router(model, 1, seed=1)
        assert not torch.allclose(other(idx).logits, model(idx).logits)
    assert redundancy.moe_layer_indices(model) == [0, 1, 2, 3]


def test_random_router_probe_errors():
    dense = tiny()
    with pytest.raises(ValueError, match="no MoELayer"):
        redundancy.with_random_router(dense, 0)
    half = moe_model(moe_layers=[1])
    assert redundancy.moe_layer_indices(half) == [1]
    with pytest.raises(ValueError, match=r"MoE layers are \[1\]"):
        redundancy.with_random_router(half, 0)
    ec = moe_model(router="expert_choice", top_k=1)
    with pytest.raises(ValueError, match="expert-choice"):
        redundancy.with_random_router(ec, 0)


# ---------------------------------------------------------------------------------------------------------------
# expert similarity and merging
# ---------------------------------------------------------------------------------------------------------------


def layer_and_tokens(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(d_model=8, d_hidden=6, num_experts=4, top_k=2)
    options.update(kwargs)
    layer = moe.MoELayer(**options)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(seed))
    return layer, x


def test_expert_outputs_match_each_expert_and_similarity_of_copies_is_one():
    layer, x = layer_and_tokens()
    outs = redundancy.expert_outputs(layer, x)
    assert outs.shape == (4, 20, 8)
    e = 2
    by_hand = torch.nn.functional.gelu(x.reshape(-1, 8) @ layer.experts.w_in[e]) @ layer.experts.w_out[e]
    torch.testing.assert_close(outs[e], by_hand)
    with torch.no_grad():
        layer.experts.w_in[1].copy_(layer.experts.w_in[0])
        layer.experts.w_out[1].copy_(layer.experts.w_out[0])
        layer.experts.w_in[3].copy_(layer.experts.w_in[0])
        layer.experts.w_out[3].copy_(-layer.experts.w_out[0])
    sim = redundancy.expert_similarity(layer, x)
    assert sim[0][1] == pytest.approx(1.0) and sim[0][3] == pytest.approx(-1.0)
    assert all(sim[i][i] == pytest.approx(1.0) for i in range(4))
    with pytest.raises(ValueError, match="d_model=8"):
        redundancy.expert_outputs(layer, torch.zeros(3, 5))


def test_routing_frequency_counts_assignments():
    layer, x = layer_and_tokens()
    freq = redundancy.routing_frequency(layer, x)
    with torch.no_grad():
        indices = layer.router(x.reshape(-1, 8)).indices
    assert freq == torch.bincount(indices.reshape(-1), minlength=4).tolist() and sum(freq) == 40


def test_cluster_experts_by_hand():
    sim = [
        [1.0, 0.9, 0.1, 0.0],
        [0.9, 1.0, 0.2, 0.1],
        [0.1, 0.2, 1.0, 0.5],
        [0.0, 0.1, 0.5, 1.0],
    ]
    assert redundancy.cluster_experts(sim, num_groups=4) == [[0], [1], [2], [3]]
    assert redundancy.cluster_experts(sim, num_groups=3) == [[0, 1], [2], [3]]
    assert redundancy.cluster_experts(sim, num_groups=2) == [[0, 1], [2, 3]]
    # average linkage: {0,1} to {2,3} = (0.1 + 0 + 0.2 + 0.1) / 4
    assert redundancy.cluster_experts(sim, num_groups=1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="num_groups"):
        redundancy.cluster_experts(sim, num_groups=0)
    with pytest.raises(ValueError, match="square"):
        redundancy.cluster_experts([[1.0, 0.0]], num_groups=1)


@pytest.mark.parametrize("method", redundancy.MERGE_METHODS)
def test_merging_identical_experts_changes_nothing(method):
    layer, x = layer_and_tokens(seed=1)
    with torch.no_grad():
        for name in ("w_in", "w_out"):
            t = getattr(layer.experts, name)
            t[1].copy_(t[0])
            t[3].copy_(t[2])
    result = redundancy.merge_experts(layer, x, num_groups=2, method=method)
    assert result.groups == [[0, 1], [2, 3]]
    with torch.no_grad():
        torch.testing.assert_close(result.layer(x).y, layer(x).y, rtol=1e-5, atol=1e-6)
    assert result.stored_expert_params == 2 * layer.experts.params_per_expert
    assert result.original_expert_params == 4 * layer.experts.params_per_expert


def test_full_rank_subspace_merge_equals_frequency_average_and_truncation_differs():
    layer, x = layer_and_tokens(seed=2, num_experts=6)
    before = copy.deepcopy(layer.state_dict())
    avg = redundancy.merge_experts(layer, x, num_groups=3, method="average")
    sub = redundancy.merge_experts(layer, x, num_groups=3, method="subspace")
    torch.testing.assert_close(sub.layer.experts.w_in, avg.layer.experts.w_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sub.layer.experts.w_out, avg.layer.experts.w_out, rtol=1e-5, atol=1e-6)
    # the average by hand for one group
    group = avg.groups[0]
    counts = [avg.frequency[i] for i in group]
    expected = sum(c * layer.experts.w_in[i] for c, i in zip(counts, group)) / sum(counts)
    for i in group:
        torch.testing.assert_close(avg.layer.experts.w_in[i], expected)
    low = redundancy.merge_experts(layer, x, num_groups=3, method="subspace", rank=1)
    assert not torch.allclose(low.layer.experts.w_in, avg.layer.experts.w_in)
    # a rank-1 merged w_in per group: (d_model, d_hidden) of rank 1
    assert torch.linalg.matrix_rank(low.layer.experts.w_in[group[0]].detach(), rtol=1e-4) == 1
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # input untouched


def test_prune_keeps_the_most_used_expert_of_each_group():
    layer, x = layer_and_tokens(seed=3)
    result = redundancy.merge_experts(layer, x, num_groups=1, method="prune")
    keep = max(range(4), key=lambda i: (result.frequency[i], -i))
    for i in range(4):
        torch.testing.assert_close(result.layer.experts.w_out[i], layer.experts.w_out[keep])


def test_merge_experts_errors():
    layer, x = layer_and_tokens()
    with pytest.raises(ValueError, match="method"):
        redundancy.merge_experts(layer, x, num_groups=2, method="ties")
    with pytest.raises(ValueError, match="rank only"):
        redundancy.merge_experts(layer, x, num_groups=2, method="average", rank=2)
    with pytest.raises(TypeError, match="MoELayer"):
        redundancy.merge_experts(torch.nn.Linear(8, 8), x, num_groups=2)


def test_replace_ffn_puts_a_merged_layer_into_a_copy():
    model, idx = moe_model(), tokens()
    make_experts_identical_(model.blocks[0].ffn)
    states = redundancy.hidden_states(model, idx)
    merged = redundancy.merge_experts(model.blocks[0].ffn, states.mid[0], num_groups=1, method="average")
    swapped = redundancy.replace_ffn(model, 0, merged.layer)
    assert swapped.blocks[0].ffn is not model.blocks[0].ffn
    with torch.no_grad():
        torch.testing.assert_close(swapped(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        redundancy.replace_ffn(model, 9, merged.layer)
