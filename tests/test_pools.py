"""lablib.pools: UniPool, WideNet, randomized parameter sharing and unified embeddings, against hand-worked cases and
naive references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import ledger, models, moe, pools

CFG = models.TransformerConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, seq_len=8)


def tokens(seed=0, batch=2):
    return torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------------
# UniPool
# ------------------------------------------------------------------------------------------------------------------


def test_every_layer_addresses_the_same_pool_tensors():
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=5, top_k=2)
    bank = model.expert_pool.experts
    for block in model.blocks:
        assert block.ffn.experts is bank and block.ffn.experts.w_in is bank.w_in
    # registered once: the model's parameter list holds the pool's tensors exactly once, layers hold none
    ids = [id(p) for p in model.parameters()]
    assert ids.count(id(bank.w_in)) == 1
    assert all(id(p) != id(bank.w_in) for p in model.blocks[0].ffn.parameters())
    assert sum(k.endswith("w_in") for k in model.state_dict()) == 1


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_gradients_from_each_layer_land_in_the_pool(layer):
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=4, top_k=2)
    x = torch.randn(2, CFG.seq_len, CFG.d_model)
    out = model.blocks[layer].ffn(x)
    out.y.square().sum().backward()
    bank = model.expert_pool.experts
    used = out.tokens_per_expert > 0
    assert bank.w_in.grad is not None
    # exactly the experts this layer used get a gradient
    assert torch.equal(bank.w_in.grad.abs().sum(dim=(1, 2)) > 0, used)
    others = [p for i, b in enumerate(model.blocks) if i != layer for p in b.ffn.router.parameters()]
    assert all(p.grad is None for p in others)


def test_full_model_gradient_in_pool_is_the_sum_over_layers():
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=4, top_k=2, pool_aux_loss_coef=0.0)
    idx = tokens()
    model(idx, idx).loss.backward()
    full = model.expert_pool.experts.w_out.grad.clone()
    # unrolled: every layer gets its own copy of the pool, same values; the shared gradient is the sum of theirs
    unrolled = copy.deepcopy(model)
    unrolled.zero_grad()
    copies = []
    for block in unrolled.blocks:
        bank = copy.deepcopy(unrolled.expert_pool.experts)
        object.__setattr__(block.ffn, "experts", bank)
        copies.append(bank)
    out = unrolled(idx, idx)
    assert torch.allclose(out.logits, model(idx).logits, atol=1e-6)
    out.loss.backward()
    total = sum(bank.w_out.grad for bank in copies)
    assert torch.allclose(total, full, atol=1e-7, rtol=1e-4)
    assert all(bank.w_out.grad.abs().sum() > 0 for bank in copies)  # every layer contributes


def test_pool_loss_hand_worked():
    counts = [torch.tensor([2, 1, 1]), torch.tensor([0, 2, 2])]
    probs = [torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.1, 0.45, 0.45])]
    # f = [2, 3, 3] / 8, P = [0.3, 0.35, 0.35], L = 3 (0.25·0.3 + 2·0.375·0.35) = 1.0125
    assert pools.pool_balance_loss(counts, probs).item() == pytest.approx(1.0125)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 2))
def test_pool_loss_with_one_layer_is_the_switch_loss(seed, num_experts, top_k):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(12, num_experts, generator=g).softmax(dim=-1)
    indices = probs.topk(top_k, dim=-1).indices
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    ours = pools.pool_balance_loss([counts], [probs.mean(dim=0)])
    assert torch.allclose(ours, moe.load_balancing_loss(probs, indices))


def test_pool_loss_prefers_a_balanced_pool_not_balanced_layers():
    # each layer uses half the pool, together they use all of it evenly: pool loss = 1 (the minimum at uniform P)
    counts = [torch.tensor([4, 4, 0, 0]), torch.tensor([0, 0, 4, 4])]
    uniform = [torch.full((4,), 0.25)] * 2
    assert pools.pool_balance_loss(counts, uniform).item() == pytest.approx(1.0)
    lopsided = [torch.tensor([4, 4, 0, 0]), torch.tensor([4, 4, 0, 0])]
    peaked = [torch.tensor([0.5, 0.5, 0.0, 0.0])] * 2
    assert pools.pool_balance_loss(lopsided, peaked).item() == pytest.approx(2.0)


def test_model_aux_loss_includes_the_pool_loss():
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=4, top_k=2, pool_aux_loss_coef=0.5)
    idx = tokens()
    out = model(idx, idx)
    assert torch.allclose(out.aux_loss, 0.5 * pools.pool_loss_of(out.layer_outputs))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 50.0))
def test_norm_router_matches_its_definition_and_is_scale_invariant(seed, scale):
    torch.manual_seed(seed)
    router = pools.NormRouter(d_model=8, num_experts=5, top_k=2, score_scale=1.5)
    with torch.no_grad():
        router.sigma.fill_(0.7)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    out = router(x)
    for t in range(6):
        z = [sum(router.weight[e, j].item() * x[t, j].item() for j in range(8)) for e in range(5)]
        norm = math.sqrt(sum(v * v for v in z))
        s = [0.7 * 1.5 * max(v / (norm + router.eps), 0.0) for v in z]
        assert out.probs[t].tolist() == pytest.approx(s, abs=1e-5)
        best = sorted(out.indices[t].tolist())
        chosen = [s[e] for e in best]
        assert min(chosen) >= max([s[e] for e in range(5) if e not in best], default=-1) - 1e-6
        # weights are the scores themselves, not renormalised
        assert out.weights[t].tolist() == pytest.approx([s[e] for e in out.indices[t].tolist()], abs=1e-5)
    assert (out.probs >= 0).all() and (out.probs.norm(dim=-1) <= 0.7 * 1.5 + 1e-5).all()
    scaled = router(x * scale)
    assert torch.allclose(scaled.probs, out.probs, atol=1e-3)  # exact up to ε in ‖z‖ + ε


def test_ledger_counts_the_pool_once_and_independent_of_depth():
    torch.manual_seed(0)
    shallow = pools.UniPoolTransformer(models.TransformerConfig(**{**CFG.to_dict(), "n_layers": 2}), pool_size=4)
    deep = pools.UniPoolTransformer(models.TransformerConfig(**{**CFG.to_dict(), "n_layers": 4}), pool_size=4)
    for m in (shallow, deep):
        row = ledger.ledger(m)
        assert row.total == sum(p.numel() for p in m.parameters()) == row.stored
    bank = shallow.expert_pool.experts
    per_layer = (sum(p.numel() for p in deep.blocks[0].parameters())
                 - 0)  # attention, 2 LayerNorms, router: everything a block owns (experts are the pool's)
    assert ledger.ledger(deep).total - ledger.ledger(shallow).total == 2 * per_layer
    assert per_layer < bank.params_per_expert  # the experts did not come along
    # FLOPs: top_k expert calls per layer; active: the distinct experts a token may visit
    row = ledger.ledger(deep)
    vanilla = moe.MoETransformer(models.TransformerConfig(**{**CFG.to_dict(), "n_layers": 4}),
                                 ffn_factory=moe.moe_ffn_factory(num_experts=4, top_k=2))
    router_diff = 4 * 2 * (4 * CFG.d_model - 4 * CFG.d_model)  # same router size (4 experts)
    assert row.flops_per_token == ledger.ledger(vanilla).flops_per_token + router_diff
    assert row.active_per_token == row.total  # 4 layers x top-2 can visit all 4 pool experts


def test_pool_usage_rows_are_distributions():
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=5, top_k=2)
    usage = pools.pool_usage(model, tokens())
    assert usage.shape == (CFG.n_layers, 5)
    assert torch.allclose(usage.sum(dim=1), torch.ones(CFG.n_layers))
    assert model.training  # mode restored


def test_bad_pool_configurations_raise():
    with pytest.raises(ValueError, match="pool size .* must be >= top_k"):
        pools.UniPoolTransformer(CFG, pool_size=1, top_k=2)
    with pytest.raises(ValueError, match="pool_size"):
        pools.UniPoolTransformer(CFG, pool_size=0, top_k=1)
    with pytest.raises(ValueError, match="unknown router"):
        pools.UniPoolTransformer(CFG, pool_size=4, router="nope")
    with pytest.raises(ValueError, match="pool_aux_loss_coef"):
        pools.UniPoolTransformer(CFG, pool_size=4, pool_aux_loss_coef=-1)
    pool = pools.ExpertPool(num_experts=4, d_model=16, d_hidden=8, top_k=2)
    with pytest.raises(ValueError, match="comes from the pool"):
        pools.PoolMoELayer(pool=pool, num_experts=3)


def test_unipool_with_a_softmax_router_trains_and_saves(tmp_path):
    torch.manual_seed(0)
    model = pools.UniPoolTransformer(CFG, pool_size=4, top_k=2, router="top_k")
    idx = tokens()
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    assert model.expert_pool.experts.w_in.grad is not None
    clone = pools.UniPoolTransformer(CFG, pool_size=4, top_k=2, router="top_k")
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(idx).logits, model(idx).logits)
    dup = copy.deepcopy(model)
    assert dup.blocks[1].ffn.experts is dup.expert_pool.experts


# ------------------------------------------------------------------------------------------------------------------
# WideNet
# ------------------------------------------------------------------------------------------------------------------


def test_widenet_shares_everything_but_the_layer_norms():
    torch.manual_seed(0)
    model = pools.WideNetTransformer(CFG, num_experts=4, top_k=2)
    tied = pools.WideNetTransformer(CFG, num_experts=4, top_k=2, share_norms=True)
    for block in model.blocks:
        assert block.attn is model.shared_attn and block.ffn is model.shared_ffn
    assert len({id(b.ffn_norm) for b in model.blocks}) == CFG.n_layers
    assert len({id(b.ffn_norm) for b in tied.blocks}) == 1
    block_params = sum(p.numel() for p in model.shared_attn.parameters()) + sum(
        p.numel() for p in model.shared_ffn.parameters())
    embeddings = CFG.vocab_size * CFG.d_model + CFG.seq_len * CFG.d_model
    ln = 2 * CFG.d_model
    # params = shared block + L · 2 LayerNorms + embeddings + final LN
    assert ledger.ledger(model).total == block_params + CFG.n_layers * 2 * ln + embeddings + ln
    assert ledger.ledger(tied).total == block_params + 2 * ln + embeddings + ln
    # compute is paid at every depth
    assert ledger.ledger(model).flops_per_token == ledger.ledger(
        moe.MoETransformer(CFG, ffn_factory=moe.moe_ffn_factory(num_experts=4, top_k=2))).flops_per_token


def test_widenet_routes_identically_with_equal_norms_and_differently_without():
    torch.manual_seed(0)
    model = pools.WideNetTransformer(CFG, num_experts=4, top_k=2)
    x = torch.randn(2, CFG.seq_len, CFG.d_model)
    b0, b1 = model.blocks[0], model.blocks[1]
    same = model.shared_ffn(b0.ffn_norm(x)).indices
    assert torch.equal(same, model.shared_ffn(b1.ffn_norm(x)).indices)  # both LNs at (1, 0)
    with torch.no_grad():
        b1.ffn_norm.weight.copy_(torch.rand(CFG.d_model) * 2)
        b1.ffn_norm.bias.copy_(torch.randn(CFG.d_model))
    assert not torch.equal(same, model.shared_ffn(b1.ffn_norm(x)).indices)


def test_widenet_shared_gradient_is_the_sum_over_depths():
    torch.manual_seed(0)
    model = pools.WideNetTransformer(CFG, num_experts=4, top_k=2, router_aux_loss_coef=0.0)
    idx = tokens()
    model(idx, idx).loss.backward()
    shared_grad = model.shared_attn.qkv.weight.grad.clone()
    # unrolled: an independent copy of the shared block per depth, same values
    unrolled = copy.deepcopy(model)
    for block in unrolled.blocks:
        block.attn = copy.deepcopy(block.attn)
        block.ffn = copy.deepcopy(block.ffn)
    unrolled.zero_grad()
    out = unrolled(idx, idx)
    assert torch.allclose(out.logits, model(idx).logits, atol=1e-6)
    out.loss.backward()
    total = sum(b.attn.qkv.weight.grad for b in unrolled.blocks)
    assert torch.allclose(total, shared_grad, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Randomized parameter sharing
# ------------------------------------------------------------------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    return models.MLPClassifier(in_features=12, hidden_sizes=[10, 8], num_classes=3)


@pytest.mark.parametrize("mapping", ["randomfold", "roast"])
@pytest.mark.parametrize("compression", [0.05, 0.3, 1.0])
def test_rps_stored_count_equals_the_budget(mapping, compression):
    base = mlp()
    weights = sum(p.numel() for p in base.parameters() if p.dim() >= 2)
    biases = sum(p.numel() for p in base.parameters() if p.dim() < 2)
    kwargs = dict(chunk_size=4) if mapping == "roast" else {}
    rps = pools.RandomizedSharing(base, compression=compression, mapping=mapping, **kwargs)
    memory = round(compression * weights)
    row = ledger.ledger(rps)
    assert rps.memory_size == memory
    assert row.stored == row.total == memory + biases
    budget = 120 + biases
    exact = pools.RandomizedSharing(base, memory_size=budget - biases)
    assert ledger.ledger(exact).stored == budget
    assert row.flops_per_token == ledger.ledger(base).flops_per_token  # same compute as the dense model


@pytest.mark.parametrize("gradient_scaling", [True, False])
def test_rps_forward_equals_an_explicit_gather(gradient_scaling):
    base = mlp()
    rps = pools.RandomizedSharing(base, compression=0.2, seed=3, gradient_scaling=gradient_scaling)
    memory = rps.memory.detach().tolist()
    index, sign = rps.index.tolist(), rps.sign.tolist()
    weights, start = {}, 0
    for name in rps.shared_names:
        rows, cols = rps.shapes[name]
        r = rps.scales[name]
        w = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                k = start + i * cols + j
                # w_ij = r_t s_k φ[h(k)]
                w[i, j] = r * sign[k] * memory[index[k]]
        weights[name] = w
        start += rows * cols
    x = torch.randn(5, 12)
    h = x
    for li, layer in enumerate(base.layers):
        h = F.linear(h, weights[f"layers.{li}.weight"], layer.bias)
        if li < len(base.layers) - 1:
            h = F.relu(h)
    assert torch.allclose(rps(x), h, atol=1e-6)


def test_rps_does_not_touch_the_wrapped_model():
    base = mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rps = pools.RandomizedSharing(base, compression=0.5)
    rps(torch.randn(2, 12)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.grad is None for p in base.parameters())


def test_randomfold_balances_load_and_is_a_bijection_at_compression_one():
    rps = pools.RandomizedSharing(mlp(), compression=1.0)
    assert sorted(rps.index.tolist()) == list(range(rps.num_virtual))
    for c in (0.07, 0.33):
        load = pools.RandomizedSharing(mlp(), compression=c).load_per_slot()
        assert int(load.max() - load.min()) <= 1
    roast = pools.RandomizedSharing(mlp(), compression=1.0, mapping="roast")
    assert int(roast.load_per_slot().max()) > 1  # ROAST still collides at compression 1 (no Pareto-continuity)


def test_gradient_scaling_divides_each_tensors_gradient_by_its_scale_squared():
    base = models.MLPClassifier(in_features=6, hidden_sizes=[], num_classes=4)  # one shared tensor
    x = torch.randn(3, 6)
    grads = {}
    for scaling in (True, False):
        rps = pools.RandomizedSharing(base, compression=0.5, gradient_scaling=scaling, seed=1)
        rps(x).square().sum().backward()
        grads[scaling] = rps.memory.grad
        r = rps.scales["layers.0.weight"]
    assert r == pytest.approx(1.0)  # a single tensor is its own mean scale
    two = models.MLPClassifier(in_features=6, hidden_sizes=[5], num_classes=4)
    with torch.no_grad():
        two.layers[1].weight.mul_(10)  # a second tensor at 10x the scale
    out = {}
    for scaling in (True, False):
        rps = pools.RandomizedSharing(two, compression=1.0, gradient_scaling=scaling, seed=1)
        rps(x).square().sum().backward()
        out[scaling] = (rps, rps.memory.grad.clone())
    rps, g_scaled = out[True]
    _, g_plain = out[False]
    n0 = math.prod(rps.shapes["layers.0.weight"])
    for name, lo, hi in (("layers.0.weight", 0, n0), ("layers.1.weight", n0, rps.num_virtual)):
        slots = rps.index[lo:hi]
        r = rps.scales[name]
        assert torch.allclose(g_scaled[slots] * r**2, g_plain[slots], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_compression_outside_zero_one_raises(bad):
    with pytest.raises(ValueError, match=r"compression .* must be in \(0, 1\]"):
        pools.RandomizedSharing(mlp(), compression=bad)


def test_rps_bad_arguments_raise():
    with pytest.raises(ValueError, match="exactly one"):
        pools.RandomizedSharing(mlp())
    with pytest.raises(ValueError, match="memory_size"):
        pools.RandomizedSharing(mlp(), memory_size=10**9)
    with pytest.raises(ValueError, match="unknown mapping"):
        pools.RandomizedSharing(mlp(), compression=0.5, mapping="xor")
    with pytest.raises(ValueError, match="unknown parameter"):
        pools.RandomizedSharing(mlp(), compression=0.5, names=["nope"])
    with pytest.raises(ValueError, match="chunk_size only"):
        pools.RandomizedSharing(mlp(), compression=0.5, chunk_size=4)


# ------------------------------------------------------------------------------------------------------------------
# Unified embedding
# ------------------------------------------------------------------------------------------------------------------


def naive_row(v, a, b, rows):
    return ((a * v + b) % (2**31 - 1)) % rows


@pytest.mark.parametrize("multiplexed", [True, False])
def test_unified_embedding_lookups_are_deterministic_and_follow_the_hash(multiplexed):
    cards = [50, 7, 3]
    emb = pools.UnifiedEmbedding(cardinalities=cards, num_rows=20, d_embed=4, multiplexed=multiplexed, seed=5)
    again = pools.UnifiedEmbedding(cardinalities=cards, num_rows=20, d_embed=4, multiplexed=multiplexed, seed=5)
    g = torch.Generator().manual_seed(0)
    values = torch.stack([torch.randint(0, c, (30,), generator=g) for c in cards], dim=1)
    rows = emb.rows(values)
    assert torch.equal(rows, again.rows(values)) and torch.equal(rows, emb.rows(values))
    for i in range(30):
        for f in range(3):
            expect = naive_row(int(values[i, f]), emb.hash_a[f], emb.hash_b[f], emb.rows_per_feature[f])
            assert int(rows[i, f]) == expect + emb.row_offset[f]
    out = emb(values).view(30, 3, 4)
    # two (feature, value) pairs share a vector exactly when the hash sends them to the same row
    flat_rows, flat_vecs = rows.reshape(-1), out.reshape(-1, 4)
    for p in range(0, 90, 7):
        for q in range(90):
            assert torch.equal(flat_vecs[p], flat_vecs[q]) == (int(flat_rows[p]) == int(flat_rows[q]))
    if not multiplexed:
        for f in range(3):
            lo, hi = emb.row_offset[f], emb.row_offset[f] + emb.rows_per_feature[f]
            assert bool(((rows[:, f] >= lo) & (rows[:, f] < hi)).all())
    assert ledger.ledger(emb).total == 20 * 4


def test_unified_embedding_collision_rate_and_bad_input():
    emb = pools.UnifiedEmbedding(cardinalities=[10, 10], num_rows=1000, d_embed=2)
    assert 0.0 <= emb.collision_rate() < 0.1
    tiny = pools.UnifiedEmbedding(cardinalities=[10, 10], num_rows=2, d_embed=2)
    assert tiny.collision_rate() == 1.0
    with pytest.raises(ValueError, match=r"values of feature f must lie in \[0, cardinalities\[f\]\)"):
        emb(torch.tensor([[10, 0]]))
    with pytest.raises(ValueError, match="shape"):
        emb(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_rows"):
        pools.UnifiedEmbedding(cardinalities=[3, 3, 3], num_rows=2, d_embed=2)


def test_click_data_is_seeded_and_learnable():
    a = pools.make_click_data(cardinalities=[30, 5], n_train=500, n_val=200, seed=1)
    b = pools.make_click_data(cardinalities=[30, 5], n_train=500, n_val=200, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert (a.x_train[:, 0] < 30).all() and (a.x_train[:, 1] < 5).all()
    assert 0 < a.bayes_val_loss < math.log(2)
    model = pools.ClickModel(embedding=pools.UnifiedEmbedding(cardinalities=[30, 5], num_rows=16, d_embed=3))
    assert model(a.x_val).shape == (200,)
