"""lablib.recursive: tying, relaxed recursion, Mixture-of-Recursions, KV caches, halting, Mixture-of-Depths, ledger.

References are independent of the library's mask-based engine: a per-sequence loop that gathers the selected tokens
in position order and runs `models.Block.forward` on them (MoR), an explicit per-query attention loop (KV sharing),
the untied vanilla model (tying, relaxed recursion), numpy's SVD and linspace, and hand-written parameter formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import ledger, models
from lablib.recursive import (
    MixtureOfDepthsTransformer,
    MixtureOfRecursionsTransformer,
    RecursiveTransformer,
    RelaxedRecursiveTransformer,
    active_mask,
    block_schedule,
    block_step,
    causal_mask,
    check_capacities,
    generate_cached,
    rank_parameters,
    recursion_ledger,
    source_layers,
    tokens_at_step,
)

VOCAB, D, T = 16, 8, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def config(n_layers: int = 4, seq_len: int = T, d_model: int = D) -> models.TransformerConfig:
    return models.TransformerConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, seq_len=seq_len)


def vanilla(n_layers: int = 4, seed: int = 0, *, perturb_vectors: bool = False, seq_len: int = T):
    """A random vanilla model; weights are scaled up so layers differ clearly (a trained-like spread)."""
    torch.manual_seed(seed)
    model = models.TinyTransformer(config(n_layers, seq_len))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                p.normal_(0, 0.3)
            elif perturb_vectors and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(batch: int = 2, time: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, time), generator=g)


# ------------------------------------------------------------------------------------------------ tying


def test_schedules_by_hand():
    assert block_schedule(num_unique=2, num_recursion=2, sharing="cycle") == [0, 1, 0, 1]
    assert block_schedule(num_unique=2, num_recursion=2, sharing="sequence") == [0, 0, 1, 1]
    assert block_schedule(num_unique=3, num_recursion=2, sharing="sequence") == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="sharing"):
        block_schedule(num_unique=2, num_recursion=2, sharing="bogus")


@pytest.mark.parametrize("n_layers,num_recursion", [(4, 2), (6, 3), (6, 2), (8, 4), (5, 5), (9, 3)])
def test_stepwise_is_rounded_linspace(n_layers, num_recursion):
    k = n_layers // num_recursion
    want = [[int(i)] for i in np.round(np.linspace(0, n_layers - 1, k))]
    got = source_layers(n_layers=n_layers, num_recursion=num_recursion, sharing="cycle", initialization="stepwise")
    assert got == want
    assert source_layers(n_layers=n_layers, num_recursion=num_recursion, sharing="cycle",
                         initialization="upper") == [[n_layers - k + i] for i in range(k)]


def test_tied_layers_share_one_parameter_and_gradients_accumulate():
    v = vanilla()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2, sharing="cycle")
    # one Parameter object for depths 0 and 2 (cycle), distinct modules
    assert r.blocks[0] is not r.blocks[2]
    assert r.blocks[0].attn.qkv.weight is r.blocks[2].attn.qkv.weight
    assert r.blocks[1].ffn.fc.bias is r.blocks[3].ffn.fc.bias
    assert r.blocks[0].attn.qkv.weight is not r.blocks[1].attn.qkv.weight
    n_unique = sum(p.numel() for p in r.parameters())
    assert n_unique == sum(p.numel() for p in v.parameters()) - 2 * sum(p.numel() for p in v.blocks[0].parameters())
    # reference: an untied vanilla model holding the tied weights at every depth; the tied gradient is the sum of
    # the gradients of the depths it stands for
    untied = models.TinyTransformer(v.config)
    untied.load_state_dict(r.state_dict())
    idx, tgt = tokens(), tokens(seed=2)
    r(idx, tgt).loss.backward()
    untied(idx, tgt).loss.backward()
    for name, p in r.blocks[0].named_parameters():
        grads = [dict(untied.blocks[d].named_parameters())[name].grad for d in (0, 2)]
        want = grads[0] + grads[1]
        torch.testing.assert_close(p.grad, want)


def test_num_recursion_one_is_vanilla_and_vanilla_untouched():
    v = vanilla().eval()
    before = {k: t.clone() for k, t in v.state_dict().items()}
    r = RecursiveTransformer.from_vanilla(v, num_recursion=1).eval()
    idx = tokens()
    torch.testing.assert_close(r(idx).logits, v(idx).logits)
    for k, t in v.state_dict().items():
        assert torch.equal(t, before[k])


@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper"])
def test_initialization_by_hand(sharing, init):
    v = vanilla()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2, sharing=sharing, initialization=init)
    src = [dict(b.named_parameters()) for b in v.blocks]
    tied = {"cycle": {0: [0, 2], 1: [1, 3]}, "sequence": {0: [0, 1], 1: [2, 3]}}[sharing]
    layers = {"stepwise": {0: [0], 1: [3]}, "lower": {0: [0], 1: [1]}, "upper": {0: [2], 1: [3]},
              "average": tied}[init]
    for k, blk in enumerate(r.unique_blocks):
        for name, p in blk.named_parameters():
            want = sum(src[d][name] for d in layers[k]) / len(layers[k])
            torch.testing.assert_close(p, want)
    torch.testing.assert_close(r.token_embedding.weight, v.token_embedding.weight)
    assert r.schedule == block_schedule(num_unique=2, num_recursion=2, sharing=sharing)


def test_ln_share_false_keeps_layernorms_per_depth():
    v = vanilla(perturb_vectors=True)
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2, ln_share=False)
    assert r.blocks[0].attn_norm.weight is not r.blocks[2].attn_norm.weight
    torch.testing.assert_close(r.blocks[2].attn_norm.weight, v.blocks[2].attn_norm.weight)
    assert r.blocks[0].attn.qkv.weight is r.blocks[2].attn.qkv.weight


def test_bad_configurations_raise_clearly():
    with pytest.raises(ValueError, match="not divisible by num_recursion=3"):
        RecursiveTransformer.from_vanilla(vanilla(), num_recursion=3)
    with pytest.raises(ValueError, match="num_recursion"):
        RecursiveTransformer(config(), num_recursion=0)
    with pytest.raises(ValueError, match="initialization"):
        RecursiveTransformer.from_vanilla(vanilla(), num_recursion=2, initialization="x")
    with pytest.raises(ValueError, match="sharing"):
        RecursiveTransformer(config(), num_recursion=2, sharing="middle")
    for bad in ((1.0, 0.0), (1.0, 1.5), (1.0, -0.1)):
        with pytest.raises(ValueError, match=r"capacity must be in \(0, 1\]"):
            MixtureOfRecursionsTransformer(config(), num_recursion=2, capacities=bad)
    with pytest.raises(ValueError, match="capacities\\[0\\] must be 1.0"):
        check_capacities((0.5, 0.5), num_recursion=2)
    with pytest.raises(ValueError, match="non-increasing"):
        check_capacities((1.0, 0.25, 0.5), num_recursion=3)
    with pytest.raises(ValueError, match="one value per recursion step"):
        check_capacities((1.0,), num_recursion=2)
    with pytest.raises(ValueError, match="sharing must be 'cycle'"):
        MixtureOfRecursionsTransformer(config(), num_recursion=2, sharing="sequence")
    with pytest.raises(ValueError, match="halting_threshold"):
        RecursiveTransformer(config(), num_recursion=2, halting_threshold=-1.0)
    with pytest.raises(ValueError, match="routing"):
        MixtureOfRecursionsTransformer(config(), num_recursion=2, routing="x")
    with pytest.raises(ValueError, match="kv_strategy"):
        MixtureOfRecursionsTransformer(config(), num_recursion=2, kv_strategy="x")
    mor = MixtureOfRecursionsTransformer(config(), num_recursion=2)
    with pytest.raises(ValueError, match="kv_strategy"):
        mor.kv_strategy = "shared"
    with pytest.raises(TypeError, match="causal_routing"):
        mor.causal_routing = 1


def test_block_step_equals_block_forward():
    v = vanilla()
    x = torch.randn(2, T, D)
    want = v.blocks[1](x).x
    got, own, _ = block_step(v.blocks[1], x, attn_mask=causal_mask(2, T, x.device))
    torch.testing.assert_close(got, want)
    got2, _, _ = block_step(v.blocks[1], x, attn_mask=active_mask(torch.ones(2, T, dtype=torch.bool)))
    torch.testing.assert_close(got2, want)
    # incremental: the last token with the first T-1 tokens' keys as past equals the full pass's last row
    _, past, _ = block_step(v.blocks[1], x[:, :-1], attn_mask=causal_mask(2, T - 1, x.device))
    last, _, _ = block_step(v.blocks[1], x[:, -1:], attn_mask=torch.ones(2, 1, T, dtype=torch.bool), past=past)
    torch.testing.assert_close(last[:, 0], want[:, -1])


def test_recursive_ledger_counts_parameters_once_and_flops_per_depth():
    v = vanilla()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2)
    block_params = sum(p.numel() for p in v.blocks[0].parameters())
    lv, lr, mine = ledger.ledger(v), ledger.ledger(r), recursion_ledger(r)
    assert lv.total - lr.total == 2 * block_params
    assert mine.total == lr.total == ledger.transformer_param_formula(v.config) - 2 * block_params
    formula = ledger.transformer_flops_formula(v.config)
    assert lr.flops_per_token == lv.flops_per_token == mine.flops_per_token == formula
    # a plain KV cache holds one entry per token per layer
    assert mine.kv_cache_entries == 4 * T == recursion_ledger(v).kv_cache_entries
    assert mine.kv_cache_numbers == 4 * T * 2 * D


def test_per_depth_adapters_attach_cleanly_with_lablib_adapters():
    from lablib.adapters import LoraConfig, attach_adapters

    r = RecursiveTransformer.from_vanilla(vanilla(), num_recursion=2)
    adapted = attach_adapters(r, LoraConfig(r=2, alpha=2, target_modules=["qkv"]))
    layers = adapted.adapted_layers
    assert len(layers) == 4  # one LoRA per depth
    assert layers["blocks.0.attn.qkv"].base_layer.weight is layers["blocks.2.attn.qkv"].base_layer.weight
    assert layers["blocks.0.attn.qkv"].lora_A is not layers["blocks.2.attn.qkv"].lora_A


# ------------------------------------------------------------------------------------------------ relaxed


@pytest.mark.parametrize("sharing,init", [("cycle", "stepwise"), ("sequence", "average")])
def test_relaxed_full_rank_reproduces_untied_and_rank0_is_recursive(sharing, init):
    v = vanilla(perturb_vectors=True).eval()
    idx = tokens()
    kw = dict(num_recursion=2, sharing=sharing, initialization=init, ln_share=False)
    full = RelaxedRecursiveTransformer.from_vanilla(v, rank=10_000, **kw).eval()
    torch.testing.assert_close(full(idx).logits, v(idx).logits, atol=1e-5, rtol=1e-4)
    zero = RelaxedRecursiveTransformer.from_vanilla(v, rank=0, **kw).eval()
    pure = RecursiveTransformer.from_vanilla(v, **kw).eval()
    torch.testing.assert_close(zero(idx).logits, pure(idx).logits)
    assert not zero.lora_layers()
    assert (pure(idx).logits - v(idx).logits).abs().max() > 1e-2  # sharing does change the model


def test_relaxed_svd_init_is_best_rank_r_approximation_and_trains_jointly():
    v = vanilla()
    model = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, rank=2)
    layer = model.lora_layers()["blocks.2.ffn.fc"]
    resid = (v.blocks[2].ffn.fc.weight - layer.base_layer.weight).detach().double().numpy()
    u, s, vh = np.linalg.svd(resid, full_matrices=False)
    want = (u[:, :2] * s[:2]) @ vh[:2]
    got = layer.delta_weight().detach().double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert layer.scaling == 1.0
    assert layer.base_layer.weight is model.lora_layers()["blocks.0.ffn.fc"].base_layer.weight
    model(tokens(), tokens(seed=3)).loss.backward()
    assert layer.lora_A.grad is not None and layer.base_layer.weight.grad is not None


def test_relaxed_ledger_is_recursive_plus_lora():
    v = vanilla()
    pure = RecursiveTransformer.from_vanilla(v, num_recursion=2)
    for rank in (1, 3):
        model = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, rank=rank)
        lora = sum(p.numel() for p in model.lora_parameters())
        # by hand: per depth, qkv 8->24, proj 8->8, fc 8->32, proj 32->8
        by_hand = 4 * rank * ((8 + 24) + (8 + 8) + (8 + 32) + (32 + 8))
        assert lora == rank_parameters(v.config, rank=rank) == by_hand
        row = recursion_ledger(model)
        assert row.total == recursion_ledger(pure).total + by_hand
        assert row.flops_per_token == recursion_ledger(pure).flops_per_token + 2 * by_hand
    assert rank_parameters(v.config, rank=10_000) == 4 * (8 * 32 + 8 * 16 + 8 * 40 + 8 * 40)
    with pytest.raises(ValueError, match="rank"):
        RelaxedRecursiveTransformer(config(), num_recursion=2, rank=-1)


# ------------------------------------------------------------------------------------------------ MoR


def route_reference(model, h, active, r, h0_state):
    """Independent routing decisions (expert choice top-k / threshold, token choice argmax)."""
    if model.routing == "token_choice":
        return active & (h0_state["last"] >= r), None
    logit = h @ model.routers[r].weight[0]
    gate = model.alpha * torch.sigmoid(logit) if model.gate == "sigmoid" else torch.ones_like(logit)
    if r == 0:
        return active.clone(), gate
    if model.causal_routing:
        return active & (logit > 0), gate
    k = max(1, math.floor(model.capacities[r] * h.shape[0] + 1e-9))
    cand = torch.nonzero(active).flatten().tolist()
    best = sorted(cand, key=lambda t: -float(logit[t]))[:k]
    sel = torch.zeros_like(active)
    sel[best] = True
    return sel, gate


def attend_loop(block, x, step0_kv):
    """One block where each query t attends to step 0's keys/values s <= t (explicit loop)."""
    attn = block.attn
    a = block.attn_norm(x)
    q = attn.qkv(a)[:, :D]
    out = []
    for t in range(x.shape[0]):
        heads = []
        for hd in range(attn.n_heads):
            sl = slice(hd * (D // attn.n_heads), (hd + 1) * (D // attn.n_heads))
            k, v = step0_kv[0][: t + 1, sl], step0_kv[1][: t + 1, sl]
            w = torch.softmax(q[t, sl] @ k.T / math.sqrt(D // attn.n_heads), dim=0)
            heads.append(w @ v)
        out.append(torch.cat(heads))
    x = x + attn.proj(torch.stack(out))
    return x + block.ffn(block.ffn_norm(x))


def mor_reference(model, idx):
    """Per sequence: gather the selected tokens in position order, run Block.forward on them, scatter back."""
    K = model.num_unique
    results = []
    for b in range(idx.shape[0]):
        pos = torch.arange(idx.shape[1])
        h = model.token_embedding(idx[b]) + model.position_embedding(pos)
        h0 = h.clone()
        state = {}
        if model.routing == "token_choice":
            probs = torch.softmax(h0 @ model.router.gate.weight.T, dim=-1)
            state["last"] = probs.argmax(-1)
            state["w"] = model.alpha * probs.max(-1).values
        active = torch.ones(idx.shape[1], dtype=torch.bool)
        step0 = []
        for r in range(model.num_recursion):
            sel, gate = route_reference(model, h, active, r, state)
            where = torch.nonzero(sel).flatten()
            if len(where) == 0:
                active = sel
                continue
            if model.kv_strategy == "kv_sharing" and r > 0:
                y = h
                for j in range(K):
                    y = attend_loop(model.blocks[r * K + j], y, step0[j])
                y = y[where]
            else:
                y = h[where][None]
                for j in range(K):
                    blk = model.blocks[r * K + j]
                    if r == 0:
                        a = blk.attn_norm(y[0])
                        _, k, v = blk.attn.qkv(a).split(D, dim=-1)
                        step0.append((k, v))
                    y = blk(y).x
                y = y[0]
            h = h.clone()
            w = 1.0 if gate is None else gate[where][:, None]
            h[where] = h[where] + w * (y - h[where])
            active = sel
        if model.routing == "token_choice" and model.gate == "sigmoid":
            h = h0 + state["w"][:, None] * (h - h0)
        results.append(model.lm_head(model.final_norm(h)))
    return torch.stack(results)


def make_mor(seed=0, **kw):
    v = vanilla(n_layers=kw.pop("n_layers", 6), seed=seed)
    model = MixtureOfRecursionsTransformer.from_vanilla(v, **kw).eval()
    torch.manual_seed(seed + 100)
    with torch.no_grad():  # routers strong enough to give varied depths
        if model.routing == "expert_choice":
            for router in model.routers:
                router.weight.normal_(0, 1.0)
        else:
            model.router.gate.weight.normal_(0, 2.0)
    return model


@pytest.mark.parametrize("routing,causal", [("expert_choice", False), ("expert_choice", True),
                                            ("token_choice", False)])
@pytest.mark.parametrize("kv_strategy", ["recursion_wise", "kv_sharing"])
@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_mor_matches_gather_reference(routing, causal, kv_strategy, gate):
    model = make_mor(num_recursion=3, routing=routing, kv_strategy=kv_strategy, gate=gate, causal_routing=causal)
    idx = tokens(batch=3)
    with torch.no_grad():
        out = model(idx)
        want = mor_reference(model, idx)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    depth = out.recursion.depth
    assert depth.min() >= 1 and depth.max() <= 3
    if routing == "expert_choice" and not causal:
        for r in range(3):
            k = tokens_at_step(model.capacities[r], T)
            assert ((depth > r).sum(1) == k).all()  # exactly k_r tokens per sequence at step r


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), time=st.integers(1, 12), c1=st.floats(0.05, 1.0), c2=st.floats(0.05, 1.0))
def test_mor_expert_choice_nesting_and_capacity(seed, time, c1, c2):
    caps = (1.0, max(c1, c2), min(c1, c2))
    torch.manual_seed(seed)
    model = MixtureOfRecursionsTransformer(config(n_layers=3, seq_len=12), num_recursion=3, capacities=caps)
    for router in model.routers:
        torch.nn.init.normal_(router.weight, 0, 1.0)
    idx = torch.randint(0, VOCAB, (2, time))
    with torch.no_grad():
        diag = model(idx).recursion
    # depth > r  <=>  selected at step r; nested by construction of depth, so count per step per sequence
    for r, c in enumerate(caps):
        assert ((diag.depth > r).sum(1) == tokens_at_step(c, time)).all()
    assert diag.tokens_per_step == [2 * tokens_at_step(c, time) for c in caps]
    assert diag.kv_cache_entries == sum(diag.tokens_per_step) * model.num_unique


def test_mor_all_full_depth_equals_recursive_model():
    v = vanilla(n_layers=6)
    idx = tokens()
    pure = RecursiveTransformer.from_vanilla(v, num_recursion=3).eval()
    mor = MixtureOfRecursionsTransformer.from_vanilla(v, num_recursion=3, gate="none",
                                                      capacities=(1.0, 1.0, 1.0)).eval()
    torch.testing.assert_close(mor(idx).logits, pure(idx).logits, atol=1e-6, rtol=1e-5)
    assert mor(idx).recursion.depth.eq(3).all()
    tc = MixtureOfRecursionsTransformer.from_vanilla(v, num_recursion=3, routing="token_choice", gate="none").eval()
    short = tokens(batch=1, time=4)  # 4 tokens in d_model = 8: a router row can score every one of them +1
    h0 = (tc.token_embedding(short) + tc.position_embedding(torch.arange(4))).detach().reshape(-1, D)
    with torch.no_grad():
        tc.router.gate.weight.zero_()
        w = torch.linalg.lstsq(h0, torch.ones(4, 1)).solution[:, 0]
        tc.router.gate.weight[2] = 50 * w  # only the last depth scores > 0
    assert (h0 @ w > 0.5).all()
    torch.testing.assert_close(tc(short).logits, pure(short).logits, atol=1e-6, rtol=1e-5)
    assert tc(short).recursion.depth.eq(3).all()


def test_mor_training_gradients_and_aux_losses():
    for routing in ("expert_choice", "token_choice"):
        model = MixtureOfRecursionsTransformer(config(n_layers=4), num_recursion=2, routing=routing)
        out = model(tokens(), tokens(seed=5))
        assert out.aux_loss > 0
        (out.loss + out.aux_loss).backward()
        router = model.routers[1].weight if routing == "expert_choice" else model.router.gate.weight
        assert router.grad is not None and router.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("kind", ["recursive", "expert_choice", "token_choice", "halting"])
@pytest.mark.parametrize("kv_strategy", ["recursion_wise", "kv_sharing"])
def test_cached_generation_equals_uncached(kind, kv_strategy):
    if kind in ("recursive", "halting"):
        if kv_strategy == "kv_sharing":
            pytest.skip("KV sharing is a Mixture-of-Recursions option")
        model = RecursiveTransformer.from_vanilla(vanilla(n_layers=6, seq_len=16), num_recursion=3).eval()
        if kind == "halting":
            model.halting_threshold = 0.5
    else:
        v = vanilla(n_layers=6, seq_len=16)
        model = MixtureOfRecursionsTransformer.from_vanilla(v, num_recursion=3, routing=kind, kv_strategy=kv_strategy,
                                                            causal_routing=True).eval()
        torch.manual_seed(3)
        with torch.no_grad():
            for p in (model.routers.parameters() if kind == "expert_choice" else model.router.parameters()):
                p.normal_(0, 1.0)
    prompt = tokens(batch=3, time=4)
    greedy = generate_cached(model, prompt, max_new_tokens=10)
    assert torch.equal(greedy.tokens, models.generate(model, prompt, max_new_tokens=10, temperature=0))
    sampled = generate_cached(model, prompt, max_new_tokens=10, temperature=1.0,
                              generator=torch.Generator().manual_seed(7))
    want = models.generate(model, prompt, max_new_tokens=10, temperature=1.0,
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(sampled.tokens, want)
    # the cache holds what the full forward says it would
    with torch.no_grad():
        diag = model(greedy.tokens).recursion
    if diag is not None:
        assert torch.equal(greedy.depth, diag.depth)
        assert greedy.kv_cache_entries == diag.kv_cache_entries
        if kind != "halting":
            # the ledger's per-sequence average, rounded
            assert abs(greedy.kv_cache_entries - 3 * recursion_ledger(model, diagnostics=diag).kv_cache_entries) <= 2
    if kv_strategy == "kv_sharing":
        assert greedy.kv_cache_entries == 3 * 14 * model.num_unique
    else:
        assert greedy.kv_cache_entries == int(greedy.depth.sum()) * model.num_unique
    assert greedy.kv_cache_bytes == greedy.kv_cache_entries * 2 * 8 * 4


def test_generation_rejects_noncausal_expert_choice_and_long_outputs():
    model = MixtureOfRecursionsTransformer(config(n_layers=4), num_recursion=2)
    with pytest.raises(ValueError, match="causal_routing"):
        generate_cached(model, tokens(time=2), max_new_tokens=2)
    model.causal_routing = True
    with pytest.raises(ValueError, match="exceeds seq_len"):
        generate_cached(model, tokens(time=4), max_new_tokens=5)
    with pytest.raises(TypeError, match="RecursiveTransformer"):
        generate_cached(vanilla(), tokens(time=2), max_new_tokens=1)


# ------------------------------------------------------------------------------------------------ halting


def test_halting_thresholds():
    v = vanilla(n_layers=6)
    idx = tokens()
    model = RecursiveTransformer.from_vanilla(v, num_recursion=3).eval()
    plain = model(idx).logits
    model.halting_threshold = 0.0
    torch.testing.assert_close(model(idx).logits, plain)
    assert model(idx).recursion.depth.eq(3).all()
    model.halting_threshold = float("inf")
    one = model(idx)
    assert one.recursion.depth.eq(1).all()
    # reference: a 2-layer model made of the unique blocks, run once
    single = RecursiveTransformer(v.config.__class__(**{**v.config.to_dict(), "n_layers": 2}), num_recursion=1)
    state = {k: t for k, t in model.state_dict().items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}
    single.load_state_dict(state)
    torch.testing.assert_close(one.logits, single.eval()(idx).logits)
    depths = []
    for tau in (0.0, 0.3, 0.6, 1.0, 2.0, float("inf")):
        model.halting_threshold = tau
        depths.append(model(idx).recursion.depth)
    for a, b in zip(depths, depths[1:]):
        assert (b <= a).all()  # a larger threshold never deepens a token
    assert depths[2].float().mean() < 3  # the toy thresholds do halt some tokens


# ------------------------------------------------------------------------------------------------ MoD


def test_mod_capacity_one_is_vanilla_and_exact_capacity():
    v = vanilla(2).eval()
    idx = tokens()
    m = MixtureOfDepthsTransformer(v.config, capacity=1.0, gate="none", route_every=1).eval()
    m.load_state_dict(v.state_dict(), strict=False)
    torch.testing.assert_close(m(idx).logits, v(idx).logits)
    half = MixtureOfDepthsTransformer(v.config, capacity=0.3, route_every=2)
    assert half.routed_layers == [1]
    shapes = []
    for b in half.blocks:
        b.register_forward_hook(lambda mod, i, o: shapes.append(tuple(i[0].shape)))
    half(idx, idx).loss.backward()
    assert shapes == [(2, 8, 8), (2, 2, 8)]  # floor(0.3 * 8) = 2 tokens in the routed block
    assert half.routers["1"].weight.grad is not None
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="capacity"):
            MixtureOfDepthsTransformer(v.config, capacity=bad)


def test_mod_unselected_tokens_pass_unchanged():
    torch.manual_seed(0)
    m = MixtureOfDepthsTransformer(config(n_layers=1), capacity=0.25, route_every=1).eval()
    x = torch.randn(2, T, D)
    out = m._run_blocks(x).x
    scores = m.routers["0"](x).squeeze(-1)
    chosen = scores.topk(2, dim=1).indices
    for b in range(2):
        for t in range(T):
            if t in chosen[b].tolist():
                assert not torch.equal(out[b, t], x[b, t])
            else:
                assert torch.equal(out[b, t], x[b, t])


def test_mod_and_mor_ledgers_by_hand():
    cfg = config(n_layers=4)
    mod = MixtureOfDepthsTransformer(cfg, capacity=0.5, route_every=2)
    block_w = 2 * (4 * D * D + 2 * D * 4 * D)  # 2 * matmul weights per block
    head = 2 * VOCAB * D
    full_block = block_w + 4 * T * D
    routed = 2 * D + 0.5 * (block_w + 4 * 4 * D)
    row = recursion_ledger(mod)
    assert row.flops_per_token == head + 2 * full_block + 2 * routed
    assert row.kv_cache_entries == 2 * T + 2 * 4
    assert row.total == ledger.ledger(mod).total
    mor = MixtureOfRecursionsTransformer(config(n_layers=6), num_recursion=3)  # k_r = 8, 5, 2 of 8
    f = [1.0, 5 / 8, 2 / 8]
    want = head + sum(fr * 2 * (block_w + 4 * fr * T * D) for fr in f) + 2 * D * (1 + f[0] + f[1])
    row = recursion_ledger(mor)
    assert row.flops_per_token == round(want)
    assert row.kv_cache_entries == 2 * (8 + 5 + 2)
    share = MixtureOfRecursionsTransformer(config(n_layers=6), num_recursion=3, kv_strategy="kv_sharing")
    want_share = head + sum(fr * 2 * (block_w + 4 * T * D) for fr in f) + 2 * D * (1 + f[0] + f[1])
    assert recursion_ledger(share).flops_per_token == round(want_share)
    assert recursion_ledger(share).kv_cache_entries == 2 * T
    with pytest.raises(TypeError):
        recursion_ledger(torch.nn.Linear(2, 2))


def test_ledger_fractions_override_and_validation():
    mor = MixtureOfRecursionsTransformer(config(n_layers=6), num_recursion=3, routing="token_choice")
    full = recursion_ledger(mor)  # token choice without diagnostics: full depth, an upper bound
    planned = recursion_ledger(mor, fractions=(1.0, 5 / 8, 2 / 8))
    ec = recursion_ledger(MixtureOfRecursionsTransformer(config(n_layers=6), num_recursion=3))
    assert planned.flops_per_token < full.flops_per_token and planned.mean_depth == pytest.approx(15 / 8)
    # same fractions as expert choice's k_r: the two differ only by their routers' FLOPs
    assert planned.flops_per_token - ec.flops_per_token == 2 * D * 3 - 2 * D * (1 + 1 + 5 / 8)
    for bad in ((1.0, 0.5), (0.5, 1.0, 0.2), (1.0, 1.0, 1.5)):
        with pytest.raises(ValueError, match="fractions"):
            recursion_ledger(mor, fractions=bad)


@pytest.mark.parametrize("sharing,inner", [("middle_cycle", [1, 2, 1, 2]), ("middle_sequence", [1, 1, 2, 2])])
def test_middle_sharing_keeps_first_and_last_layers(sharing, inner):
    assert block_schedule(num_unique=2, num_recursion=2, sharing=sharing) == [0, *inner, 3]
    v = vanilla(n_layers=6, perturb_vectors=True).eval()
    # stepwise: first and last kept, the middle blocks from round(linspace(1, L-2, K)) = layers 1 and 4
    stepwise = source_layers(n_layers=6, num_recursion=2, sharing=sharing, initialization="stepwise")
    assert stepwise == [[0], [1], [4], [5]]
    model = RecursiveTransformer.from_vanilla(v, num_recursion=2, sharing=sharing).eval()
    twin = 3 if sharing == "middle_cycle" else 2  # the other depth tied to depth 1
    assert len(model.unique_blocks) == 4 and model.blocks[1].ffn.fc.weight is model.blocks[twin].ffn.fc.weight
    torch.testing.assert_close(model.blocks[0].ffn.fc.weight, v.blocks[0].ffn.fc.weight)
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight, v.blocks[5].attn.qkv.weight)
    block_params = sum(p.numel() for p in v.blocks[0].parameters())
    row = recursion_ledger(model)
    assert row.total == ledger.ledger(model).total == ledger.ledger(v).total - 2 * block_params
    assert row.flops_per_token == ledger.ledger(v).flops_per_token and row.kv_cache_entries == 6 * T
    full = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, sharing=sharing, rank=100, ln_share=False)
    idx = tokens()
    torch.testing.assert_close(full.eval()(idx).logits, v(idx).logits, atol=1e-5, rtol=1e-4)
    assert "blocks.0.attn.qkv" not in full.lora_layers() and "blocks.1.attn.qkv" in full.lora_layers()
    assert sum(p.numel() for p in full.lora_parameters()) == rank_parameters(v.config, rank=100, sharing=sharing)
    with pytest.raises(ValueError, match="middle layers"):
        RecursiveTransformer(config(n_layers=5), num_recursion=2, sharing=sharing)
    with pytest.raises(ValueError, match="halting"):
        model.halting_threshold = 0.1
    with pytest.raises(ValueError, match="generate_cached"):
        generate_cached(model, tokens(time=2), max_new_tokens=1)
