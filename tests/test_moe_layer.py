"""MoELayer checked against an independent per-token reference (outputs and gradients, every router), plus
properties (k experts per kept token, capacity, expert choice, combine weights), identities (one expert = dense FFN,
dropless = unbounded capacity), configuration errors, the ledger, and training inside TinyTransformer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import ledger, models, moe
from lablib.data import TextSplits
from lablib.moe import MoELayer, MoEOutput, MoETransformer, moe_ffn_factory
from lablib.train import train_lm

D_MODEL, D_HIDDEN, E = 6, 8, 4
BATCH, TIME = 2, 5


# ----------------------------------------------------------------------------------------------------------------
# The naive reference: one token at a time, plain Python loops, no sorting, no grouping
# ----------------------------------------------------------------------------------------------------------------


def ref_expert(experts: moe.Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token vector x (d_model,), written out from the formulas."""
    u = experts.w_in[e].t() @ x
    if experts.b_in is not None:
        u = u + experts.b_in[e]
    if experts.activation == "swiglu":
        g = experts.w_gate[e].t() @ x
        if experts.b_gate is not None:
            g = g + experts.b_gate[e]
        h = g * torch.sigmoid(g) * u
    elif experts.activation == "gelu":
        h = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
    elif experts.activation == "relu":
        h = torch.clamp(u, min=0)
    else:
        h = u * torch.sigmoid(u)
    out = experts.w_out[e].t() @ h
    if experts.b_out is not None:
        out = out + experts.b_out[e]
    return out


def ref_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_gru(cell: torch.nn.GRUCell, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h' = (1 - z) ⊙ n + z ⊙ h with the reset/update/new gates written out (PyTorch's gate order r, z, n)."""
    W_ir, W_iz, W_in = cell.weight_ih.chunk(3, dim=0)
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3, dim=0)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(W_ir @ a + b_ir + W_hr @ h + b_hr)
    z = torch.sigmoid(W_iz @ a + b_iz + W_hz @ h + b_hz)
    n = torch.tanh(W_in @ a + b_in + r * (W_hn @ h + b_hn))
    return (1 - z) * n + z * h


def ref_logits(router: moe.Router, x: torch.Tensor, state: torch.Tensor | None, noise: torch.Tensor | None):
    """Per-token router scores: (logits (E,), selection scores (E,), new state or None)."""
    if isinstance(router, moe.TopKRouter):
        logits = router.gate.weight @ x
        scores = logits
        if noise is not None:
            sigma = F.softplus(router.noise.weight @ x) + router.noise_eps
            scores = logits + noise * sigma
        return logits, scores, None
    if isinstance(router, moe.RandomFixedRouter):
        logits = router.weight @ x
        return logits, logits, None
    if isinstance(router, moe.CosineRouter):
        u = router.proj_in.weight @ x
        u_hat = u / torch.clamp(u.norm(), min=1e-6)
        c_hat = router.centroids / router.centroids.norm(dim=1, keepdim=True)
        logits = router.theta.abs() * (c_hat @ u_hat)
        return logits, logits, None
    if isinstance(router, moe.RecurrentRouter):
        h_prev = torch.zeros(router.d_state, dtype=x.dtype) if state is None else state
        h = ref_gru(router.gru, router.input_proj.weight @ x, h_prev)
        logits = router.output_proj.weight @ h
        return logits, logits, h
    if isinstance(router, moe.ExpertChoiceRouter):
        logits = router.gate.weight @ x
        return logits, logits, None
    raise AssertionError(type(router))


def reference_layer(layer: MoELayer, x: torch.Tensor, *, token_ids=None, router_state=None, noise=None):
    """(y (B, T, d), aux_loss, state) of `layer` computed token by token from its parameters."""
    batch, time, _ = x.shape
    router, experts = layer.router, layer.experts
    E_r, k = layer.num_routed_experts, layer.routed_top_k
    tokens = [x[b, t] for b in range(batch) for t in range(time)]
    N = len(tokens)
    logits, probs, states, assignments = [], [], [], []  # assignments: (token, expert, weight, slot)
    for n, xt in enumerate(tokens):
        if isinstance(router, moe.HashRouter):
            key = int(token_ids.reshape(-1)[n]) if router.hash_on == "token" else n % time
            e = int(router.table[key])
            logits.append(torch.zeros(E_r, dtype=x.dtype))
            probs.append(F.one_hot(torch.tensor(e), E_r).to(x.dtype))
            assignments.append((n, e, torch.ones((), dtype=x.dtype), 0))
            continue
        state = None if router_state is None else router_state.reshape(N, -1)[n]
        z, s, h = ref_logits(router, xt, state, None if noise is None else noise[n])
        p_sel = ref_softmax(s)
        logits.append(z)
        probs.append(p_sel)
        states.append(h)
        if isinstance(router, moe.ExpertChoiceRouter):
            continue
        bias = layer.expert_bias.bias if layer.expert_bias is not None else torch.zeros(E_r, dtype=x.dtype)
        ranked = sorted(range(E_r), key=lambda e: float((p_sel[e] + bias[e]).detach()), reverse=True)[:k]
        w = [p_sel[e] for e in ranked]
        if router.normalize_top_k:
            total = sum(w)
            w = [wi / total for wi in w]
        assignments += [(n, e, wi, slot) for slot, (e, wi) in enumerate(zip(ranked, w))]
    if isinstance(router, moe.ExpertChoiceRouter):
        C = min(N, math.ceil(router.capacity_factor * router.top_k * N / E_r))
        for e in range(E_r):
            for n in sorted(range(N), key=lambda n: float(probs[n][e].detach()), reverse=True)[:C]:
                assignments.append((n, e, probs[n][e], e))
    routed = [0] * E_r
    for _, e, _, _ in assignments:
        routed[e] += 1
    kept = assignments
    if layer.capacity_factor is not None and not isinstance(router, moe.ExpertChoiceRouter):
        C = math.ceil(layer.capacity_factor * k * N / E_r)
        used, kept = [0] * E_r, []
        for slot in range(k):  # all first choices, then all second choices, ..., each in token order
            for a in sorted((a for a in assignments if a[3] == slot), key=lambda a: a[0]):
                if used[a[1]] < C:
                    used[a[1]] += 1
                    kept.append(a)
    y = [torch.zeros(layer.d_model, dtype=x.dtype) for _ in range(N)]
    for n, e, w, _ in kept:
        y[n] = y[n] + w * ref_expert(experts, e, tokens[n])
    if layer.shared_experts is not None:
        y = [y[n] + ref_expert(layer.shared_experts, 0, tokens[n]) for n in range(N)]
    # aux: E Σ f P  and  mean logsumexp²
    f = torch.tensor(routed, dtype=x.dtype) / sum(routed)
    P = torch.stack(probs).mean(0)
    balance = E_r * (f * P).sum()
    z_loss = torch.stack([torch.logsumexp(z, 0) ** 2 for z in logits]).mean()
    aux = torch.zeros((), dtype=x.dtype)
    if layer.router_aux_loss_coef > 0 and router.uses_load_balance_loss:
        aux = aux + layer.router_aux_loss_coef * balance
    if layer.z_loss_coef > 0 and router.uses_z_loss:
        aux = aux + layer.z_loss_coef * z_loss
    new_state = torch.stack(states).reshape(batch, time, -1) if states and states[0] is not None else None
    return torch.stack(y).reshape(batch, time, -1), aux, new_state


# ----------------------------------------------------------------------------------------------------------------
# Every router against the reference: outputs and gradients
# ----------------------------------------------------------------------------------------------------------------

CASES = {
    "top_k": dict(router="top_k", top_k=2),
    "top_k_raw_weights_dropping": dict(router="top_k", top_k=2, capacity_factor=0.5,
                                       router_kwargs={"normalize_top_k": False}),
    "top_k_noisy_train": dict(router="top_k", top_k=2, router_kwargs={"noisy": True}),
    "switch_capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=1.0),
    "cosine": dict(router="cosine", top_k=2, router_kwargs={"d_space": 3}),
    "hash_token": dict(router="hash", top_k=1, router_kwargs={"num_keys": 11}),
    "hash_position": dict(router="hash", top_k=1, router_kwargs={"num_keys": TIME, "hash_on": "position"}),
    "random_fixed": dict(router="random_fixed", top_k=2, router_kwargs={"seed": 3}),
    "recurrent": dict(router="recurrent", top_k=2, router_kwargs={"d_state": 5}),
    "shared_fine_grained_swiglu_bias": dict(router="top_k", top_k=1, n_shared_experts=2, expert_granularity=2,
                                            activation="swiglu", bias=True),
    "selection_bias": dict(router="top_k", top_k=2, bias_update_rate=0.1),
}


def build(seed: int = 0, **kwargs) -> MoELayer:
    torch.manual_seed(seed)
    kwargs.setdefault("num_experts", E)
    kwargs.setdefault("z_loss_coef", 0.01)
    return MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, **kwargs)


def inputs(seed: int = 1, *, dtype=torch.float64, batch=BATCH, time=TIME, d=D_MODEL) -> torch.Tensor:
    return torch.randn(batch, time, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_per_token_reference_outputs_and_gradients(case):
    layer = build(**CASES[case]).double()
    if layer.expert_bias is not None:
        layer.expert_bias.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.25]))
    # perturb the biases and temperature away from their initial values so their gradients are exercised
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("b_in", "b_gate", "b_out")):
                p.normal_(0, 0.1)
            if name.endswith("noise.weight"):
                p.normal_(0, 0.5)
        for p in layer.experts.parameters():
            p.mul_(10)  # larger experts make any routing mistake visible
    x = inputs().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    token_ids = torch.randint(0, 11, (BATCH, TIME), generator=torch.Generator().manual_seed(2))
    state = None
    if case == "recurrent":
        state = torch.randn(BATCH, TIME, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    noisy = case == "top_k_noisy_train"
    layer.train(noisy)
    torch.manual_seed(123)
    out = layer(x, token_ids=token_ids, router_state=state)
    noise = None
    if noisy:
        torch.manual_seed(123)
        noise = torch.randn(BATCH * TIME, E, dtype=torch.float64)
    ref_y, ref_aux, ref_state = reference_layer(layer, x_ref, token_ids=token_ids, router_state=state, noise=noise)

    torch.testing.assert_close(out.y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.aux_loss, ref_aux, rtol=1e-10, atol=1e-12)
    if ref_state is not None:
        torch.testing.assert_close(out.router_state, ref_state)
    if case == "top_k_raw_weights_dropping":
        assert out.dropped > 0  # the case really drops

    upstream = torch.randn(BATCH, TIME, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for p in layer.parameters() if p.requires_grad]
    loss = (out.y * upstream).sum() + out.aux_loss
    ref_loss = (ref_y * upstream).sum() + ref_aux
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, *params], allow_unused=True)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        g = torch.zeros_like(r) if g is None and r is not None else g
        r = torch.zeros_like(g) if r is None and g is not None else r
        if g is None:
            continue
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=lambda m: f"gradient of {name}: {m}")
    # the router really receives a gradient (except the routers with nothing to train)
    router_grads = [g for n, g in zip(names, grads) if n.startswith("router.")]
    if case not in ("hash_token", "hash_position", "random_fixed"):
        assert router_grads and any(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_dispatch_runs_each_expert_only_on_its_tokens():
    layer = build(router="top_k", top_k=2, capacity_factor=0.75).eval()
    calls = []
    original = layer.experts.expert_forward

    def counting(e, rows, **kwargs):
        calls.append((e, rows.shape[0]))
        return original(e, rows, **kwargs)

    layer.experts.expert_forward = counting
    out = layer(inputs(dtype=torch.float32, batch=4, time=8))
    computed = {e: n for e, n in calls}
    assert sum(computed.values()) == int(out.kept.sum()) < 4 * 8 * 2  # assignments, not E·N rows
    assert len(calls) == len(computed)  # each expert called at most once
    for e in range(E):
        assert computed.get(e, 0) == int(out.tokens_per_expert[e])


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    tokens=st.integers(1, 24),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_token_choice_properties(num_experts, k_frac, tokens, capacity_factor, seed):
    top_k = 1 + round(k_frac * (num_experts - 1))
    torch.manual_seed(seed)
    layer = MoELayer(d_model=4, d_hidden=4, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        out = layer(torch.randn(1, tokens, 4))
    indices, kept = out.indices[0], out.kept[0]
    # every token's k experts are distinct, in range
    assert indices.shape == (tokens, top_k)
    assert all(len(set(row.tolist())) == top_k for row in indices)
    assert int(indices.min()) >= 0 and int(indices.max()) < num_experts
    # each kept token reaches exactly k experts; dropless keeps everything
    fully_kept = kept.all(dim=1)
    assert all(len(set(indices[t][kept[t]].tolist())) == top_k for t in range(tokens) if fully_kept[t])
    if capacity_factor is None:
        assert bool(kept.all()) and out.dropped == 0 and out.capacity is None
    # bookkeeping
    assert out.tokens_per_expert.tolist() == torch.bincount(indices[kept], minlength=num_experts).tolist()
    assert out.routed_per_expert.tolist() == torch.bincount(indices.reshape(-1), minlength=num_experts).tolist()
    assert out.dropped == tokens * top_k - int(kept.sum())
    if capacity_factor is not None:
        C = math.ceil(capacity_factor * top_k * tokens / num_experts)
        assert out.capacity == C
        # capacity never exceeded, and an assignment is only dropped when its expert is full
        assert int(out.tokens_per_expert.max()) <= C
        for e in indices[~kept].tolist():
            assert int(out.tokens_per_expert[e]) == C
        # first choices are never dropped in favour of second choices
        if top_k > 1 and bool((~kept[:, 0]).any()):
            dropped_first = set(indices[:, 0][~kept[:, 0]].tolist())
            assert not any(e in dropped_first for e in indices[:, 1:][kept[:, 1:]].tolist())
    # combine weights: renormalised rows sum to 1 when k > 1, raw probability when k = 1
    weights, probs = out.weights[0], out.probs[0]
    if top_k > 1:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(tokens))
    else:
        torch.testing.assert_close(weights, probs.gather(1, indices))


@settings(max_examples=30, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    tokens=st.integers(1, 20),
    capacity_factor=st.floats(0.1, 3.0),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_expert_choice_gives_every_expert_exactly_c_tokens(num_experts, tokens, capacity_factor, top_k, seed):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = MoELayer(d_model=4, d_hidden=4, num_experts=num_experts, top_k=top_k, router="expert_choice",
                     capacity_factor=capacity_factor)
    with torch.no_grad():
        out = layer(torch.randn(2, tokens, 4))
    N = 2 * tokens
    C = min(N, math.ceil(capacity_factor * top_k * N / num_experts))
    assert out.capacity == C
    assert out.tokens_per_expert.tolist() == [C] * num_experts
    assert out.dropped == 0
    kept = out.kept.reshape(N, num_experts)
    assert kept.sum(dim=0).tolist() == [C] * num_experts
    # weights: the token's probability for a picking expert, 0 elsewhere
    weights, probs = out.weights.reshape(N, -1), out.probs.reshape(N, -1)
    torch.testing.assert_close(weights, probs * kept)


def test_renormalisation_options_change_combine_weights_as_documented():
    x = inputs(dtype=torch.float32)
    outs = {}
    for normalize in (None, True, False):
        layer = build(router="top_k", top_k=2, router_kwargs={"normalize_top_k": normalize}).eval()
        outs[normalize] = layer(x)
    torch.testing.assert_close(outs[None].weights.sum(-1), torch.ones(BATCH, TIME))  # Mixtral default for k > 1
    torch.testing.assert_close(outs[True].weights, outs[None].weights)
    raw = outs[False]
    torch.testing.assert_close(raw.weights, raw.probs.gather(-1, raw.indices))  # DeepSeekMoE-16B / Qwen
    assert bool((raw.weights.sum(-1) < 1).all())
    # same experts either way; renormalised = raw / row sum
    assert torch.equal(raw.indices, outs[True].indices)
    torch.testing.assert_close(outs[True].weights, raw.weights / raw.weights.sum(-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["top_k", "switch", "cosine", "random_fixed", "recurrent", "expert_choice"])
def test_one_expert_top1_equals_the_dense_ffn(router):
    config = models.TransformerConfig(vocab_size=11, d_model=D_MODEL, n_layers=1, n_heads=2, seq_len=TIME,
                                      d_hidden=D_HIDDEN)
    torch.manual_seed(0)
    dense = models.MLP(config).eval()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer = MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=1, top_k=1, router=router, bias=True).eval()
    with torch.no_grad():
        layer.experts.w_in[0].copy_(dense.fc.weight.t())
        layer.experts.b_in[0].copy_(dense.fc.bias)
        layer.experts.w_out[0].copy_(dense.proj.weight.t())
        layer.experts.b_out[0].copy_(dense.proj.bias)
    x = inputs(dtype=torch.float32)
    out = layer(x)
    torch.testing.assert_close(out.y, dense(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.weights, torch.ones_like(out.weights))
    assert float(out.load_balance_loss.detach()) == pytest.approx(1.0)


def test_dropless_equals_unbounded_capacity():
    x = inputs(dtype=torch.float32, batch=3, time=7)
    dropless = build(router="top_k", top_k=2).eval()
    roomy = build(router="top_k", top_k=2, capacity_factor=E / 2).eval()  # C = N: nothing can drop
    a, b = dropless(x), roomy(x)
    assert b.dropped == 0
    torch.testing.assert_close(a.y, b.y)


def test_fine_grained_segmentation_keeps_total_and_active_expert_parameters():
    base = MoELayer(d_model=8, d_hidden=16, num_experts=4, top_k=1)
    fine = MoELayer(d_model=8, d_hidden=16, num_experts=4, top_k=1, expert_granularity=4)
    assert (fine.num_routed_experts, fine.routed_top_k, fine.expert_hidden) == (16, 4, 4)
    expert_params = lambda layer: sum(p.numel() for p in layer.experts.parameters())  # noqa: E731
    assert expert_params(fine) == expert_params(base)
    active = lambda layer: layer.routed_top_k * layer.experts.params_per_expert  # noqa: E731
    assert active(fine) == active(base)
    out = fine(torch.randn(2, 3, 8))
    assert out.indices.shape == (2, 3, 4)


def test_shared_experts_get_a_gradient_from_every_token():
    layer = build(router="top_k", top_k=1, n_shared_experts=1, capacity_factor=0.25)
    x = inputs(dtype=torch.float32)
    out = layer(x)
    assert out.dropped > 0
    out.y.sum().backward()
    # the shared expert sees all tokens, dropped or not: its output bias... (no bias) so check w_out's grad rank
    assert layer.shared_experts.w_in.grad.abs().sum() > 0
    # a token whose every assignment was dropped still gets the shared experts' output
    fully_dropped = (~out.kept).all(-1)
    assert bool(fully_dropped.any())
    shared_only = layer.shared_experts.expert_forward(0, x.reshape(-1, D_MODEL)).reshape(BATCH, TIME, D_MODEL)
    torch.testing.assert_close(out.y[fully_dropped], shared_only[fully_dropped])


# ----------------------------------------------------------------------------------------------------------------
# Hygiene: inputs untouched, determinism, outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["top_k_raw_weights_dropping", "expert_choice", "hash_token", "recurrent",
                                  "selection_bias"])
def test_inputs_are_never_mutated(case):
    layer = build(**CASES[case]).train()
    x = inputs(dtype=torch.float32).requires_grad_()
    ids = torch.randint(0, 11, (BATCH, TIME))
    state = torch.randn(BATCH, TIME, 5) if case == "recurrent" else None
    before = (x.detach().clone(), ids.clone(), None if state is None else state.clone())
    out = layer(x, token_ids=ids, router_state=state)
    (out.y.sum() + out.aux_loss).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(ids, before[1])
    if state is not None:
        assert torch.equal(state, before[2])


@pytest.mark.parametrize("router", sorted(moe.ROUTERS))
def test_empty_and_bfloat16_inputs(router):
    k = 1 if router in ("switch", "hash") else 2
    options = {"num_keys": 11} if router == "hash" else {}
    layer = build(router=router, top_k=k, router_kwargs=options, capacity_factor=1.0)
    empty = layer(torch.randn(2, 0, D_MODEL), token_ids=torch.zeros(2, 0, dtype=torch.long))
    assert empty.y.shape == (2, 0, D_MODEL) and empty.tokens_per_expert.tolist() == [0] * E
    out = layer(inputs(dtype=torch.float32).bfloat16(), token_ids=torch.randint(0, 11, (BATCH, TIME)))
    assert out.y.dtype == torch.bfloat16 and out.y.shape == (BATCH, TIME, D_MODEL)
    assert bool(torch.isfinite(out.y.float()).all())


def test_same_seed_same_layer_and_outputs():
    def run(seed):
        layer = build(seed, router="top_k", top_k=2, router_kwargs={"noisy": True}).train()
        torch.manual_seed(seed + 100)
        return layer(inputs(dtype=torch.float32))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.y, c.y)


def test_output_record_fields():
    layer = build(router="top_k", top_k=2, capacity_factor=1.0).train()
    x = inputs(dtype=torch.float32).requires_grad_()
    out = layer(x)
    assert isinstance(out, MoEOutput)
    assert out.y.shape == x.shape and out.aux_loss.dim() == 0 and out.aux_loss.requires_grad
    assert out.tokens_per_expert.dtype == torch.long and out.tokens_per_expert.shape == (E,)
    assert isinstance(out.dropped, int) and out.capacity == math.ceil(2 * BATCH * TIME / E)
    for t in (out.weights, out.indices, out.kept, out.probs, out.router_entropy):
        assert not t.requires_grad
    assert 0.0 <= float(out.router_entropy) <= math.log(E) + 1e-6
    assert out.probs.shape == (BATCH, TIME, E)
    # aux_loss is exactly the enabled, weighted terms
    torch.testing.assert_close(out.aux_loss, 0.01 * out.load_balance_loss + 0.01 * out.z_loss)
    off = build(router="top_k", top_k=2, router_aux_loss_coef=0.0, z_loss_coef=0.0)(x)
    assert float(off.aux_loss) == 0.0 and float(off.load_balance_loss.detach()) > 0


def test_router_specific_losses_are_added_to_aux_loss():
    class PenalisedRouter(moe.TopKRouter):
        def forward(self, x, **kwargs):
            out = super().forward(x, **kwargs)
            out.extra_losses["penalty"] = 0.5 * out.logits.square().mean()
            return out

    torch.manual_seed(0)
    router = PenalisedRouter(d_model=D_MODEL, num_experts=E, top_k=2)
    layer = MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=E, top_k=2, router=router,
                     router_aux_loss_coef=0.0)
    out = layer(inputs(dtype=torch.float32))
    assert set(out.router_losses) == {"penalty"}
    torch.testing.assert_close(out.aux_loss, out.router_losses["penalty"])


# ----------------------------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 5}, r"top_k \(5\) must be <= num_experts \(4\)"),
        ({"capacity_factor": 0}, r"capacity_factor must be None \(dropless\) or a finite number > 0"),
        ({"capacity_factor": -1.0}, r"capacity_factor must be None"),
        ({"router": "linear"}, r"unknown router 'linear'; choose one of"),
        ({"backend": "cuda"}, r"unknown backend 'cuda'; choose one of \['auto', 'torch', 'triton'"),
        ({"expert_granularity": 3}, r"expert_granularity \(3\) must divide d_hidden \(8\)"),
        ({"n_shared_experts": -1}, r"n_shared_experts must be an int >= 0"),
        ({"activation": "tanh"}, r"unknown activation 'tanh'"),
        ({"router": "switch", "top_k": 2}, r"switch routing is top-1"),
        ({"router": "hash", "top_k": 1}, r"hash routing needs num_keys"),
        ({"router": "top_k", "router_kwargs": {"d_space": 3}}, r"router 'top_k' does not take \['d_space'\]"),
        ({"router": "expert_choice", "bias_update_rate": 1e-3}, r"bias_update_rate needs a token-choice router"),
        ({"bias_update_rate": -1.0}, r"bias_update_rate must be a finite number >= 0"),
        ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef must be a finite number >= 0"),
        ({"num_experts": 0}, r"num_experts must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_bad_configuration_raises_value_error_naming_the_problem(kwargs, message):
    kwargs = {"num_experts": E, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, **kwargs)


def test_mismatched_dimensions_raise_value_error():
    layer = build(router="top_k", top_k=2)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, time, d_model=6\), got \(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"got \(10, 6\)"):
        layer(torch.randn(10, 6))
    with pytest.raises(ValueError, match=r"router instance has \(d_model, num_experts, top_k\) = \(6, 4, 2\) but "
                                         r"the layer needs \(6, 8, 4\)"):
        MoELayer(d_model=6, d_hidden=8, num_experts=4, top_k=2, expert_granularity=2,
                 router=moe.TopKRouter(d_model=6, num_experts=4, top_k=2))
    hashed = build(router="hash", top_k=1, router_kwargs={"num_keys": 11})
    with pytest.raises(ValueError, match=r"hash routing on tokens needs token_ids.*MoETransformer"):
        hashed(inputs(dtype=torch.float32))
    with pytest.raises(ValueError, match=r"token_ids must have shape \(batch, time\) = \(2, 5\)"):
        hashed(inputs(dtype=torch.float32), token_ids=torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"router_state must have shape \(batch, time, d_state\)"):
        build(router="recurrent", top_k=2)(inputs(dtype=torch.float32), router_state=torch.zeros(3, 5, 32))
    with pytest.raises(ValueError, match=r"no selection bias; build it with bias_update_rate"):
        layer.update_bias(torch.ones(E))


def test_backend_registry_hook():
    calls = []

    def traced(experts, x, indices, weights, mask):
        calls.append(indices.shape)
        return moe.grouped_torch_experts(experts, x, indices, weights, mask)

    moe.register_expert_backend("traced_test", traced)
    try:
        torch.manual_seed(0)
        a = MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=E, backend="traced_test")
        torch.manual_seed(0)
        b = MoELayer(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=E)
        x = inputs(dtype=torch.float32)
        torch.testing.assert_close(a(x).y, b(x).y)
        assert calls == [(BATCH * TIME, 2)]
    finally:
        del moe.EXPERT_BACKENDS["traced_test"]


# ----------------------------------------------------------------------------------------------------------------
# Ledger and the model
# ----------------------------------------------------------------------------------------------------------------


def test_ledger_counts_by_hand():
    layer = MoELayer(d_model=8, d_hidden=16, num_experts=4, top_k=2, n_shared_experts=1, expert_granularity=2,
                     bias=True)
    # routed: 8 experts of width 8: w_in 8·8, w_out 8·8, b_in 8, b_out 8 -> 144 each; shared: width 8 -> 144
    # router: 8 x 8 gate
    counts = layer.ledger_counts()
    assert counts.total == 8 * 144 + 144 + 64 == sum(p.numel() for p in layer.parameters())
    assert counts.active_per_token == 64 + 144 + 4 * 144
    assert counts.stored == counts.total
    assert counts.flops_per_token == 2 * (64 + 2 * 8 * 8 + 4 * 2 * 8 * 8)
    aux_free = MoELayer(d_model=8, d_hidden=16, num_experts=4, top_k=2, bias_update_rate=1e-3)
    assert aux_free.ledger_counts().stored == aux_free.ledger_counts().total + 4  # the bias buffer
    hashed = MoELayer(d_model=8, d_hidden=16, num_experts=4, top_k=1, router="hash",
                      router_kwargs={"num_keys": 50})
    hc = hashed.ledger_counts()
    assert hc.active_per_token == 2 * 8 * 16 and hc.stored == hc.total + 50


SMALL = models.TransformerConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, seq_len=8)


def synthetic_splits(n: int = 600) -> TextSplits:
    """A tiny learnable stream: a repeating pattern with noise, vocabulary 13."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    tokens = pattern.repeat(n // 12 + 1)[:n].clone()
    flip = torch.rand(n, generator=g) < 0.1
    tokens[flip] = torch.randint(0, 13, (int(flip.sum()),), generator=g)
    return TextSplits(train=tokens[:500], val=tokens[500:], test=tokens[:0], tokenizer=None, name="synthetic")


def test_tiny_transformer_with_moe_trains_and_the_ledger_shows_active_below_total():
    torch.manual_seed(0)
    factory = moe_ffn_factory(num_experts=4, top_k=2, capacity_factor=1.25, z_loss_coef=1e-3)
    model = models.TinyTransformer(SMALL, ffn_factory=factory)
    assert all(isinstance(block.ffn, MoELayer) for block in model.blocks)
    history = train_lm(model, synthetic_splits(), steps=12, batch_size=8, lr=1e-2, progress=False, eval_batches=2)
    assert all(math.isfinite(v) for v in history.train_loss)
    assert history.train_loss[-1] < history.train_loss[0]
    row = ledger.ledger(model)
    assert row.active_per_token < row.total == sum(p.numel() for p in model.parameters())
    assert row.trainable == row.total
    # the model sums the layers' aux losses and keeps their MoEOutputs
    idx = torch.randint(0, 13, (2, 8))
    out = model(idx, idx)
    assert all(isinstance(o, MoEOutput) for o in out.layer_outputs)
    torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in out.layer_outputs))


def test_moe_transformer_passes_token_ids_and_recurrent_state():
    torch.manual_seed(0)
    recurrent = MoETransformer(SMALL, ffn_factory=moe_ffn_factory(num_experts=4, top_k=2, router="recurrent",
                                                                   router_kwargs={"d_state": 4}))
    routers = [block.ffn.router for block in recurrent.blocks]
    assert routers[0].owns_cell and not routers[1].owns_cell and routers[1].gru is routers[0].cell
    # the GRU is counted once: by parameters(), the optimizer, the state dict and the ledger
    assert sum(p.numel() for p in recurrent.parameters()) == ledger.ledger(recurrent).total
    assert sum(k.endswith("router.cell.weight_ih") for k in recurrent.state_dict()) == 1
    idx = torch.randint(0, 13, (2, 8))
    out = recurrent(idx, idx)
    first, second = out.layer_outputs
    assert first.router_state.shape == (2, 8, 4)
    # layer 2's router started from layer 1's state: recompute it by hand from layer 2's input
    block = recurrent.blocks[1]
    h = recurrent.blocks[0](recurrent.token_embedding(idx) + recurrent.position_embedding(torch.arange(8)),
                            router_state=None).x
    u = block.ffn_norm(h + block.attn(block.attn_norm(h)))
    again = block.ffn(u, router_state=first.router_state)
    torch.testing.assert_close(again.router_state, second.router_state)
    fresh = block.ffn(u)  # a plain TinyTransformer would start from zeros: a different state
    assert not torch.allclose(fresh.router_state, second.router_state)
    # a copy keeps the sharing
    clone = copy.deepcopy(recurrent)
    assert clone.blocks[1].ffn.router.gru is clone.blocks[0].ffn.router.cell

    torch.manual_seed(0)
    hashed = MoETransformer(SMALL, ffn_factory=moe_ffn_factory(num_experts=4, top_k=1, router="hash"))
    out = hashed(idx, idx)
    table = hashed.blocks[0].ffn.router.table
    assert torch.equal(out.layer_outputs[0].indices[..., 0], table[idx])
    assert not torch.equal(hashed.blocks[0].ffn.router.table, hashed.blocks[1].ffn.router.table)
    with pytest.raises(ValueError, match="MoETransformer"):
        models.TinyTransformer(SMALL, ffn_factory=moe_ffn_factory(num_experts=4, top_k=1, router="hash"))(idx)
    for model in (recurrent, hashed):
        history = train_lm(model, synthetic_splits(), steps=3, batch_size=4, progress=False, eval_batches=1)
        assert all(math.isfinite(v) for v in history.train_loss)


def test_factory_options_and_plain_model_compatibility():
    torch.manual_seed(0)
    model = models.TinyTransformer(SMALL, ffn_factory=moe_ffn_factory(num_experts=4, top_k=1, router="switch",
                                                                       moe_layers=[1]))
    assert isinstance(model.blocks[0].ffn, models.MLP) and isinstance(model.blocks[1].ffn, MoELayer)
    layer = model.blocks[1].ffn
    assert layer.experts.out_init_std == pytest.approx(0.02 / math.sqrt(4))
    assert layer.d_hidden == SMALL.ffn_hidden
    out = model(torch.randint(0, 13, (2, 8)))
    assert out.layer_outputs[0] is None and isinstance(out.layer_outputs[1], MoEOutput)
    with pytest.raises(ValueError, match=r"unknown router 'nope'; choose one of"):
        moe_ffn_factory(router="nope")
    with pytest.raises(ValueError, match=r"moe_layers must be a non-empty list of layer indices >= 0"):
        moe_ffn_factory(moe_layers=[])
    with pytest.raises(ValueError, match=r"moe_layers \[5\] has indices >= n_layers \(2\)"):
        models.TinyTransformer(SMALL, ffn_factory=moe_ffn_factory(moe_layers=[5]))
    # dense models are unaffected by the hooks
    torch.manual_seed(0)
    dense = models.TinyTransformer(SMALL)
    torch.manual_seed(0)
    dense_again = models.TinyTransformer(SMALL)
    idx = torch.randint(0, 13, (2, 8))
    torch.testing.assert_close(dense(idx).logits, dense_again(idx).logits)
