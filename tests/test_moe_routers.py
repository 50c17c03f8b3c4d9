"""The routers on their own: the shared interface, each router's documented invariants, and clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import ledger, models, moe
from lablib.moe import (
    ROUTERS,
    CosineRouter,
    ExpertChoiceRouter,
    HashRouter,
    RandomFixedRouter,
    RecurrentRouter,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
    top_k_gating,
)

D, E, N = 8, 5, 12


def make(name: str, *, top_k: int = 2, init_seed: int = 0, **options) -> moe.Router:
    torch.manual_seed(init_seed)
    if name in ("switch", "hash"):
        top_k = 1
    if name == "hash":
        options.setdefault("num_keys", 20)
    return build_router(name, d_model=D, num_experts=E, top_k=top_k, **options)


def tokens(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def call(router: moe.Router, x: torch.Tensor, **kwargs) -> RouterOutput:
    n = x.shape[0]
    kwargs.setdefault("token_ids", torch.arange(n) % 20)
    kwargs.setdefault("positions", torch.arange(n) % 4)
    return router(x, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The interface every router shares
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_follows_the_interface(name):
    router = make(name)
    out = call(router, tokens())
    assert isinstance(out, RouterOutput)
    k = out.slots
    assert out.weights.shape == out.indices.shape == (N, k)
    assert out.logits.shape == out.probs.shape == (N, E)
    assert out.indices.dtype == torch.long and out.logits.dtype == torch.float32
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < E
    assert all(len(set(row)) == k for row in out.indices.tolist())  # a token's slots name distinct experts
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(N))
    assert bool((out.weights >= 0).all())
    if router.kind == moe.TOKEN_CHOICE:
        assert out.mask is None and k == router.top_k
    else:
        assert out.mask.shape == (N, E) and k == E
    assert router.flops_per_token() >= 0


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_rejects_wrong_width(name):
    with pytest.raises(ValueError, match=rf"expects x of shape \(num_tokens, d_model={D}\), got \(3, {D + 1}\)"):
        call(make(name), torch.randn(3, D + 1))


def test_router_math_runs_in_float32_for_low_precision_inputs():
    router = make("top_k")
    out = router(tokens().bfloat16())
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown router 'learned'; choose one of \['cosine', 'expert_choice'"):
        build_router("learned", d_model=D, num_experts=E, top_k=2)
    with pytest.raises(ValueError, match=r"router 'cosine' does not take \['noisy'\]; it takes \["):
        build_router("cosine", d_model=D, num_experts=E, top_k=2, noisy=True)
    with pytest.raises(ValueError, match=r"top_k \(6\) must be <= num_experts \(5\)"):
        TopKRouter(d_model=D, num_experts=E, top_k=6)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        TopKRouter(d_model=D, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match=r"normalize_top_k must be True, False or None"):
        TopKRouter(d_model=D, num_experts=E, normalize_top_k="yes")
    with pytest.raises(ValueError, match=r"selection_bias must have shape \(5,\)"):
        make("top_k")(tokens(), selection_bias=torch.zeros(4))
    with pytest.raises(ValueError, match=r"ExpertChoiceRouter does not support a selection bias"):
        make("expert_choice")(tokens(), selection_bias=torch.zeros(E))
    with pytest.raises(TypeError):
        TopKRouter(D, E)  # keyword-only


# ----------------------------------------------------------------------------------------------------------------
# Softmax top-k, noise, Switch
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, E), normalize=st.sampled_from([None, True, False]), seed=st.integers(0, 10_000))
def test_top_k_weights_follow_the_renormalisation_option(k, normalize, seed):
    router = make("top_k", top_k=k, normalize_top_k=normalize, init_seed=seed)
    out = router(tokens(seed))
    probs = out.logits.softmax(-1)
    # the k largest probabilities, in descending order
    torch.testing.assert_close(probs.gather(1, out.indices), probs.topk(k, dim=1).values)
    raw = probs.gather(1, out.indices)
    renormalise = (k > 1) if normalize is None else normalize
    if renormalise:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(N))
        # = a softmax over the k kept logits (Mixtral)
        torch.testing.assert_close(out.weights, out.logits.gather(1, out.indices).softmax(-1))
    else:
        torch.testing.assert_close(out.weights, raw)


def test_top1_renormalisation_starves_the_router_of_gradient():
    # the documented pitfall: w = p / p = 1, so the task loss cannot reach the router
    for normalize, expect_grad in ((True, False), (None, True)):
        router = make("top_k", top_k=1, normalize_top_k=normalize)
        out = router(tokens())
        (out.weights * torch.arange(N).unsqueeze(1)).sum().backward()
        has_grad = router.gate.weight.grad is not None and router.gate.weight.grad.abs().max() > 1e-5
        assert has_grad == expect_grad


def test_selection_bias_changes_choices_not_weights():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    weights, indices = top_k_gating(probs, 1, normalize=False, selection_bias=bias)
    assert indices.squeeze(1).tolist() == [2, 2]  # the bias decided
    torch.testing.assert_close(weights.squeeze(1), torch.tensor([0.2, 0.3]))  # from the unbiased probabilities
    # a bias that does not change the selected set never changes the weights
    for k in (1, 2, 3):
        plain = top_k_gating(probs, k, normalize=True)
        shifted = top_k_gating(probs, k, normalize=True, selection_bias=torch.full((3,), 0.7))
        assert torch.equal(plain[1], shifted[1]) and torch.equal(plain[0], shifted[0])
    # through a router: a huge bias on expert 3 sends everything there, with its true probability
    router = make("top_k", top_k=1)
    out = router(tokens(), selection_bias=torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0]))
    assert out.indices.unique().tolist() == [3]
    torch.testing.assert_close(out.weights.squeeze(1), out.probs[:, 3])


def test_noisy_top_k_is_noisy_only_in_training_and_seeded():
    router = make("top_k", noisy=True)
    clean = make("top_k")
    with torch.no_grad():
        clean.gate.weight.copy_(router.gate.weight)
    x = tokens()
    router.eval()
    assert torch.equal(router(x).indices, clean(x).indices)
    torch.testing.assert_close(router(x).weights, clean(x).weights)
    router.train()
    torch.manual_seed(7)
    a = router(x)
    torch.manual_seed(7)
    b = router(x)
    torch.manual_seed(8)
    c = router(x)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, c.weights)
    torch.testing.assert_close(a.logits, clean(x).logits)  # logits stay the clean ones (z-loss input)
    assert router.noise.weight.abs().sum() == 0  # zero-initialised noise weights (Shazeer et al.)


def test_switch_router_is_top1_with_the_raw_probability():
    router = make("switch")
    out = router(tokens())
    torch.testing.assert_close(out.weights.squeeze(1), out.probs.max(dim=1).values)
    assert torch.equal(out.indices.squeeze(1), out.probs.argmax(dim=1))
    with pytest.raises(ValueError, match=r"switch routing is top-1, got top_k=2"):
        SwitchRouter(d_model=D, num_experts=E, top_k=2)
    jittery = SwitchRouter(d_model=D, num_experts=E, jitter_eps=0.3).train()
    torch.manual_seed(0)
    a = jittery(tokens())
    torch.manual_seed(1)
    b = jittery(tokens())
    assert not torch.equal(a.logits, b.logits)
    jittery.eval()
    assert torch.equal(jittery(tokens()).logits, jittery(tokens()).logits)


# ----------------------------------------------------------------------------------------------------------------
# Expert choice
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), cf=st.floats(0.05, 4.0), k=st.integers(1, E), seed=st.integers(0, 10_000))
def test_expert_choice_capacity_and_selection(n, cf, k, seed):
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(d_model=D, num_experts=E, top_k=k, capacity_factor=cf)
    out = router(tokens(seed, n))
    C = min(n, math.ceil(cf * k * n / E))
    assert out.capacity == C == router.capacity(n)
    assert out.mask.sum(0).tolist() == [C] * E  # every expert exactly C tokens
    # each expert's picks are its C highest-probability tokens
    for e in range(E):
        picked = out.probs[out.mask[:, e], e]
        others = out.probs[~out.mask[:, e], e]
        if others.numel():
            assert float(picked.min().detach()) >= float(others.max().detach())
    torch.testing.assert_close(out.weights, out.probs * out.mask)
    assert out.indices.tolist() == [list(range(E))] * n


def test_expert_choice_permuting_tokens_permutes_the_routing():
    router = make("expert_choice")
    x = tokens()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    a, b = router(x), router(x[perm])
    assert torch.equal(a.mask[perm], b.mask)
    torch.testing.assert_close(a.weights[perm], b.weights)


# ----------------------------------------------------------------------------------------------------------------
# Cosine routing
# ----------------------------------------------------------------------------------------------------------------


def test_cosine_router_invariants():
    router = make("cosine", d_space=6, temperature=4.0)
    x = tokens()
    out = router(x)
    tau = float(router.temperature.detach())
    assert tau == pytest.approx(4.0)
    assert float(out.logits.detach().abs().max()) <= tau + 1e-5  # |z| <= τ
    scaled = router(3.7 * x)  # routing ignores the scale of x
    assert torch.equal(scaled.indices, out.indices)
    torch.testing.assert_close(scaled.weights, out.weights)
    # centroids pairwise orthogonal at initialisation (E <= d_space)
    gram = F.normalize(router.centroids, dim=1) @ F.normalize(router.centroids, dim=1).t()
    torch.testing.assert_close(gram, torch.eye(E), atol=1e-5, rtol=0)
    # the temperature learns; frozen, it is a buffer
    (out.weights * torch.randn(N, 2)).sum().backward()
    assert router.theta.grad is not None and router.centroids.grad is not None
    frozen = make("cosine", learn_temperature=False)
    assert "theta" in dict(frozen.named_buffers()) and "theta" not in dict(frozen.named_parameters())
    # fewer routing parameters than a linear router when d_space is small relative to d_model
    wide = CosineRouter(d_model=64, num_experts=8, d_space=4)
    assert sum(p.numel() for p in wide.parameters()) < 64 * 8


# ----------------------------------------------------------------------------------------------------------------
# Hash routing
# ----------------------------------------------------------------------------------------------------------------


def test_hash_router_is_a_fixed_table():
    router = make("hash", num_keys=20)
    assert sum(p.numel() for p in router.parameters()) == 0
    # every expert owns an equal share (±1) of the ids
    share = torch.bincount(router.table, minlength=E)
    assert int(share.max() - share.min()) <= 1 and int(share.sum()) == 20
    ids = torch.tensor([3, 7, 3, 19, 0, 7])
    a = router(tokens(0, 6), token_ids=ids)
    b = router(tokens(1, 6), token_ids=ids)  # other contexts, same ids -> same experts
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices.squeeze(1), router.table[ids])
    assert torch.equal(a.weights, torch.ones(6, 1))
    torch.testing.assert_close(a.probs, F.one_hot(a.indices.squeeze(1), E).float())
    # load equals the token-frequency mass of each bucket
    load = torch.bincount(a.indices.squeeze(1), minlength=E)
    expected = torch.zeros(E, dtype=torch.long)
    for i in ids.tolist():
        expected[int(router.table[i])] += 1
    assert torch.equal(load, expected)
    # seeded, and carried by checkpoints
    assert torch.equal(make("hash", num_keys=20, seed=0).table, router.table)
    assert not torch.equal(make("hash", num_keys=20, seed=5).table, router.table)
    assert "table" in router.state_dict()
    positional = make("hash", num_keys=4, hash_on="position")
    out = positional(tokens(0, 8), positions=torch.arange(8) % 4)
    assert torch.equal(out.indices[:4], out.indices[4:])


def test_hash_router_errors():
    router = make("hash", num_keys=20)
    with pytest.raises(ValueError, match=r"hash routing on tokens needs token_ids"):
        router(tokens())
    with pytest.raises(ValueError, match=r"hash keys must lie in \[0, num_keys=20\), got min 0, max 25"):
        router(tokens(0, 2), token_ids=torch.tensor([0, 25]))
    with pytest.raises(ValueError, match=r"hash keys must be int64 of shape \(2,\)"):
        router(tokens(0, 2), token_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"hash_on must be 'token' or 'position'"):
        HashRouter(d_model=D, num_experts=E, num_keys=3, hash_on="bigram")
    with pytest.raises(ValueError, match=r"hash routing sends each token to exactly one expert, got top_k=2"):
        HashRouter(d_model=D, num_experts=E, top_k=2, num_keys=3)


# ----------------------------------------------------------------------------------------------------------------
# Random-fixed routing
# ----------------------------------------------------------------------------------------------------------------


def test_random_fixed_router_is_frozen_and_seeded():
    router = make("random_fixed", seed=0)
    assert list(router.parameters()) == []
    assert "weight" in router.state_dict()
    x = tokens().requires_grad_()
    out = router(x)
    (out.weights.sum()).backward()
    assert x.grad is not None  # routing depends on x ...
    assert not torch.equal(router(tokens(1)).indices, out.indices)
    torch.testing.assert_close(router.weight.std(), torch.tensor(1 / math.sqrt(D)), rtol=0.35, atol=0)
    # ... and on the seed only, not on the global RNG or on TinyTransformer's initialisation
    again = RandomFixedRouter(d_model=D, num_experts=E, seed=0)
    assert torch.equal(again.weight, router.weight)
    assert not torch.equal(RandomFixedRouter(d_model=D, num_experts=E, seed=1).weight, router.weight)
    config = models.TransformerConfig(vocab_size=11, d_model=D, n_layers=2, n_heads=2, seq_len=4)
    model = models.TinyTransformer(config, ffn_factory=moe.moe_ffn_factory(num_experts=E, router="random_fixed",
                                                                         seed=0))
    assert torch.equal(model.blocks[0].ffn.router.weight, router.weight)  # layer 0 gets seed + 0


# ----------------------------------------------------------------------------------------------------------------
# Recurrent router (RMoE)
# ----------------------------------------------------------------------------------------------------------------


def test_recurrent_router_first_layer_is_w2_gru_w1_from_zero():
    router = make("recurrent", d_state=4)
    x = tokens()
    out = router(x)
    a = x @ router.input_proj.weight.t()
    h = router.cell(a, torch.zeros(N, 4))
    torch.testing.assert_close(out.state, h)
    torch.testing.assert_close(out.logits, h @ router.output_proj.weight.t())
    # given a state, the router steps the GRU from it
    prev = torch.randn(N, 4)
    torch.testing.assert_close(router(x, state=prev).state, router.cell(a, prev))
    # no mixing across tokens: permuting tokens (and their states) permutes the logits
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(router(x[perm], state=prev[perm]).logits, router(x, state=prev).logits[perm])
    with pytest.raises(ValueError, match=r"recurrent router state must have shape \(12, 4\), got \(12, 3\)"):
        router(x, state=torch.zeros(N, 3))


def test_recurrent_cell_sharing_counts_the_gru_once():
    owner = make("recurrent", d_state=4)
    borrower = RecurrentRouter(d_model=D, num_experts=E, top_k=2, d_state=4, cell=owner.cell)
    assert borrower.gru is owner.cell and not borrower.owns_cell
    own_params = sum(p.numel() for p in owner.parameters())
    gru = 6 * 4 * 4 + 6 * 4  # (3 gates x (input + hidden) matrices) + their biases
    assert own_params == 4 * D + E * 4 + gru
    assert sum(p.numel() for p in borrower.parameters()) == own_params - gru
    assert not any("cell" in key for key in borrower.state_dict())
    # gradients from the borrower reach the shared cell
    borrower(tokens()).weights.sum().backward()
    assert owner.cell.weight_hh.grad is not None
    pair = torch.nn.ModuleList([owner, borrower])
    clone = copy.deepcopy(pair)
    assert clone[1].gru is clone[0].cell and clone[0].cell is not owner.cell
    with pytest.raises(ValueError, match=r"cell must be an nn.GRUCell\(4, 4\)"):
        RecurrentRouter(d_model=D, num_experts=E, d_state=4, cell=torch.nn.GRUCell(3, 3))
    config = models.TransformerConfig(vocab_size=11, d_model=D, n_layers=3, n_heads=2, seq_len=4)
    model = moe.MoETransformer(config, ffn_factory=moe.moe_ffn_factory(num_experts=E, router="recurrent",
                                                                       router_kwargs={"d_state": 4}))
    row = ledger.ledger(model)
    assert row.total == sum(p.numel() for p in model.parameters())
    # a second model from the same factory gets its own cell
    factory = moe.moe_ffn_factory(num_experts=E, router="recurrent", router_kwargs={"d_state": 4})
    m1, m2 = models.TinyTransformer(config, ffn_factory=factory), models.TinyTransformer(config, ffn_factory=factory)
    assert m1.blocks[2].ffn.router.gru is m1.blocks[0].ffn.router.cell
    assert m2.blocks[2].ffn.router.gru is m2.blocks[0].ffn.router.cell is not m1.blocks[0].ffn.router.cell
