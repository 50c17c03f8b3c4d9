"""lablib.adapters kinds: NOLA, VB-LoRA, MoS and Compacter against their updates written out by hand (explicit sums,
loops, torch.kron), the sharing each promises, ledger counts against hand counts, and a few training steps for every
kind with lablib.train."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lablib import adapters, ledger
from lablib.train import train


def toy(seed: int = 0) -> nn.Sequential:
    """Three Linears: two 8 -> 8 of one module type ("*") and one 8 -> 12 (names "0", "2", "4")."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 12))


def stack(seed: int = 0, n: int = 3) -> nn.Sequential:
    """n same-shaped 8 -> 8 Linears (names "0", "2", ...): one MoS group of L = n layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Linear(8, 8)] + ([nn.Tanh()] if i < n - 1 else [])
    return nn.Sequential(*layers)


def randomize_(adapted: nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


TARGETS = ["0", "2", "4"]
SHAPES = {"0": (8, 8), "2": (8, 8), "4": (8, 12)}  # name -> (in, out)

KIND_CONFIGS = {
    "lora": adapters.LoraConfig(r=2, alpha=4, target_modules=TARGETS),
    "nola": adapters.NolaConfig(r=2, alpha=4, num_basis=5, num_basis_b=3, target_modules=TARGETS),
    "vblora": adapters.VBLoraConfig(r=2, num_vectors=6, vector_length=4, topk=2, target_modules=TARGETS),
    "vblora_topk": adapters.VBLoraConfig(r=2, num_vectors=6, vector_length=4, topk=2, target_modules=TARGETS,
                                         save_only_topk_weights=True),
    # active rank r <= r_e here, because the 8 -> 12 layer is a group of its own (L = 1)
    "mos": adapters.MosConfig(r=2, alpha=2, equivalent_r=2, shards_per_vector=2, private_r=1,
                              target_modules=TARGETS),
    "compacter": adapters.CompacterConfig(r=1, phm_dim=4, target_modules=TARGETS),
    "compacter_own": adapters.CompacterConfig(r=2, phm_dim=2, target_modules=TARGETS, shared_slow=False),
}


def hand_counts(kind: str) -> tuple[int, int]:
    """(trainable, stored) adapter numbers for the toy, written from each paper's parameter count."""
    if kind == "lora":
        n = sum(2 * (i + o) for i, o in SHAPES.values())
        return n, n
    if kind == "nola":
        return 3 * (5 + 3), 3 * (5 + 3)  # k + l coefficients per layer; bases and seeds stored 0
    if kind.startswith("vblora"):
        h, b, r, k = 6, 4, 2, 2
        logits = sum(h * r * (i + o) // b for i, o in SHAPES.values())
        subvectors = sum(r * (i + o) // b for i, o in SHAPES.values())
        trainable = h * b + logits
        return trainable, (h * b + 2 * k * subvectors) if kind == "vblora_topk" else trainable
    if kind == "mos":
        # r_e · L · (in + out) per group: {"0", "2"} (8 -> 8, L = 2) and {"4"} (8 -> 12, L = 1)
        n = 2 * 2 * (8 + 8) + 2 * 1 * (8 + 12)
        return n, n
    if kind == "compacter":
        n = sum(1 * (i + o) for i, o in SHAPES.values()) + 4**3  # r (in + out) per layer + n³ shared once
        return n, n
    if kind == "compacter_own":
        n = sum(2 * (i + o) for i, o in SHAPES.values()) + 3 * 2**3  # each layer its own n³
        return n, n
    raise KeyError(kind)


# ----------------------------------------------------------------------------------------------------------------
# Every kind: ledger, start, merge, training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_ledger_trainable_and_stored_equal_hand_counts(kind):
    model = toy()
    adapted = adapters.attach_adapters(model, KIND_CONFIGS[kind])
    trainable, stored = hand_counts(kind)
    base = ledger.ledger(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tensor counted by two self-accounting modules
        row = ledger.ledger(adapted)
    assert row.trainable == trainable
    assert row.stored == base.stored + stored
    assert row.total == base.total + trainable
    only = adapters.adapter_ledger(adapted)
    assert (only.trainable, only.stored, only.total) == (trainable, stored, trainable)
    assert trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    # stored = what adapter_state_dict holds, seeds aside
    state = adapters.adapter_state_dict(adapted)
    assert stored == sum(v.numel() for k, v in state.items() if not k.endswith(".seed"))


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_adapted_model_starts_at_the_base_except_vblora_and_merge_round_trips(kind):
    model = toy().eval()
    adapted = adapters.attach_adapters(model, KIND_CONFIGS[kind])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    if kind.startswith("vblora"):
        # A and B share the bank, so ΔW != 0 at the start (PEFT's init)
        assert not torch.equal(adapted(x), model(x))
    else:
        assert torch.equal(adapted(x), model(x))
    randomize_(adapted)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    out = adapted(x)
    adapters.merge_adapters_(adapted)
    torch.testing.assert_close(adapted(x), out, rtol=1e-5, atol=1e-5)
    adapters.unmerge_adapters_(adapted)
    for key, value in adapted.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_a_few_training_steps_reduce_the_loss_and_leave_the_base_bit_identical(kind):
    model = toy()
    torch.manual_seed(1)
    adapted = adapters.attach_adapters(model, KIND_CONFIGS[kind])
    teacher = toy(seed=5)
    data = torch.Generator().manual_seed(2)

    def batches():
        while True:
            x = torch.randn(32, 8, generator=data)
            # (not `with torch.no_grad(): yield ...`: a suspended generator would keep grad mode off for the caller)
            yield x, teacher(x).detach()

    def mse(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    x_eval = torch.randn(256, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y_eval = teacher(x_eval)
        before_loss = float(F.mse_loss(adapted(x_eval), y_eval))
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(adapted, batches=batches(), loss_fn=mse, steps=40, lr=2e-2, progress=False)
    with torch.no_grad():
        after_loss = float(F.mse_loss(adapted(x_eval), y_eval))
    assert after_loss < 0.9 * before_loss, (before_loss, after_loss, history.train_loss[::10])
    for name, layer in adapted.adapted_layers.items():
        assert torch.equal(layer.base_layer.weight, base_before[f"{name}.weight"])
        assert torch.equal(layer.base_layer.bias, base_before[f"{name}.bias"])


@pytest.mark.parametrize("kind", ["lora", "nola", "vblora", "mos"])
def test_a_rank_larger_than_a_layer_allows_raises_for_every_low_rank_kind(kind):
    config = adapters.config_from_dict({**KIND_CONFIGS[kind].to_dict(), "r": 9})
    with pytest.raises(ValueError, match=r"r=9 is larger than layer '0' allows: its weight is 8 x 8"):
        adapters.attach_adapters(toy(), config)


def test_saving_needs_the_adapted_model_when_banks_are_shared():
    model = toy()
    adapted = adapters.attach_adapters_(model, KIND_CONFIGS["vblora"])
    assert set(adapters.adapter_state_dict(adapted)) > {"adapter_banks.vector_bank.vectors"}
    with pytest.raises(ValueError, match="pass the AdaptedModel"):
        adapters.adapter_state_dict(model)


# ----------------------------------------------------------------------------------------------------------------
# NOLA
# ----------------------------------------------------------------------------------------------------------------


def test_nola_bases_are_regenerated_identically_from_a_seed():
    kwargs = dict(r=2, in_features=8, out_features=12, num_basis_a=5, num_basis_b=3)
    a1, b1 = adapters.nola_bases(seed=11, **kwargs)
    a2, b2 = adapters.nola_bases(seed=11, **kwargs)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == (5, 2, 8) and b1.shape == (3, 12, 2)
    a3, _ = adapters.nola_bases(seed=12, **kwargs)
    assert not torch.equal(a1, a3)
    # the global RNG plays no part
    torch.manual_seed(0)
    a4, _ = adapters.nola_bases(seed=11, **kwargs)
    assert torch.equal(a1, a4)


def test_nola_delta_is_the_explicit_sum_of_coefficients_times_bases():
    adapted = adapters.attach_adapters(toy(), KIND_CONFIGS["nola"])
    randomize_(adapted)
    for name, layer in adapted.adapted_layers.items():
        assert int(layer.seed) == adapters.derive_seed(0, name)
        basis_a, basis_b = adapters.nola_bases(seed=int(layer.seed), r=2, in_features=layer.in_features,
                                               out_features=layer.out_features, num_basis_a=5, num_basis_b=3)
        a = sum(layer.coef_A[i] * basis_a[i] for i in range(5))
        b = sum(layer.coef_B[j] * basis_b[j] for j in range(3))
        # ΔW = (alpha / r) (Σ β_j B_j)(Σ α_i A_i)
        torch.testing.assert_close(layer.delta_weight(), (4 / 2) * b @ a)
    # only the coefficients train
    assert {n.rsplit(".", 1)[-1] for n, p in adapted.named_parameters() if p.requires_grad} == {"coef_A", "coef_B"}


def test_nola_stores_only_seeds_and_coefficients_and_reloading_regenerates_identical_bases():
    config = KIND_CONFIGS["nola"]
    adapted = adapters.attach_adapters(toy(), config)
    randomize_(adapted)
    state = adapters.adapter_state_dict(adapted)
    assert {k.rsplit(".", 1)[-1] for k in state} == {"coef_A", "coef_B", "seed"}
    assert sum(v.numel() for v in state.values()) == 3 * (5 + 3 + 1)
    # a model adapted with another seed has other bases until the state's seeds are loaded
    other = adapters.attach_adapters(toy(), adapters.config_from_dict({**config.to_dict(), "seed": 99}))
    layer, other_layer = adapted.adapted_layers["2"], other.adapted_layers["2"]
    assert not torch.equal(layer.basis_A, other_layer.basis_A)
    adapters.load_adapter_state_dict_(other, state)
    assert torch.equal(layer.basis_A, other_layer.basis_A) and torch.equal(layer.basis_B, other_layer.basis_B)
    x = torch.randn(4, 8)
    assert torch.equal(other(x), adapted(x))


# ----------------------------------------------------------------------------------------------------------------
# VB-LoRA
# ----------------------------------------------------------------------------------------------------------------


def hand_subvector(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_i softmax(top-k values)_i · bank[idx_i] for one logit vector, by sorting and a loop."""
    order = sorted(range(logits.numel()), key=lambda j: -float(logits[j]))[:k]
    values = [float(logits[j]) for j in order]
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return sum((w / total) * bank[j] for w, j in zip(weights, order))


def test_vblora_sub_vectors_are_top_k_softmax_weighted_sums_of_bank_vectors():
    adapted = adapters.attach_adapters(toy(), KIND_CONFIGS["vblora"])
    bank = adapted.adapter_banks["vector_bank"].vectors.detach()
    b, k = 4, 2
    for name, layer in adapted.adapted_layers.items():
        a_mat, b_mat = (t.detach() for t in layer.factors())
        for rho in range(layer.r):
            for j in range(layer.in_features // b):
                expected = hand_subvector(layer.logits_A[rho, j].detach(), bank, k)
                torch.testing.assert_close(a_mat[rho, j * b:(j + 1) * b], expected)
            for o in range(layer.out_features // b):
                expected = hand_subvector(layer.logits_B[o, rho].detach(), bank, k)
                torch.testing.assert_close(b_mat[o * b:(o + 1) * b, rho], expected)
        # Δ(x) = x Aᵀ Bᵀ, no scaling
        torch.testing.assert_close(layer.delta_weight(), b_mat @ a_mat)


def test_vblora_bank_is_one_shared_tensor_and_only_top_k_logits_get_gradients():
    adapted = adapters.attach_adapters(toy(), KIND_CONFIGS["vblora"])
    bank = adapted.adapter_banks["vector_bank"]
    layers = list(adapted.adapted_layers.values())
    assert all(layer.bank is bank for layer in layers)
    assert sum(1 for p in adapted.parameters() if p is bank.vectors) == 1
    assert [k for k in adapted.state_dict() if "vectors" in k] == ["adapter_banks.vector_bank.vectors"]
    adapted(torch.randn(6, 8)).pow(2).sum().backward()
    assert bank.vectors.grad is not None
    for layer in layers:
        picked = torch.zeros_like(layer.logits_A, dtype=torch.bool)
        picked.scatter_(-1, layer.logits_A.topk(2, dim=-1).indices, True)
        assert torch.all(layer.logits_A.grad[~picked] == 0)
        assert layer.logits_A.grad[picked].abs().sum() > 0


def test_vblora_top_k_only_state_reproduces_the_adapter():
    config = KIND_CONFIGS["vblora_topk"]
    adapted = adapters.attach_adapters(toy(), config)
    randomize_(adapted, scale=1.0)
    state = adapters.adapter_state_dict(adapted)
    assert not any(k.endswith("logits_A") for k in state)
    # (out / b, r, k) indices for B of the 8 -> 12 layer
    assert state["base_model.4.logits_B.topk_indices"].shape == (12 // 4, 2, 2)
    torch.manual_seed(7)
    fresh = adapters.attach_adapters(toy(), config)
    adapters.load_adapter_state_dict_(fresh, state)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), adapted(x))


def test_vblora_needs_widths_divisible_by_the_vector_length():
    with pytest.raises(ValueError, match=r"layer '4' \(12 x 8\) cannot be split by vector_length=5"):
        adapters.attach_adapters(toy(), adapters.VBLoraConfig(r=2, vector_length=5, target_modules=["4"]))


def test_bank_usage_of_vblora_counts_top_k_picks():
    adapted = adapters.attach_adapters(toy(), KIND_CONFIGS["vblora"])
    usage = adapters.bank_usage(adapted)
    assert [(u.bank, u.factor) for u in usage] == [("vector_bank", "A"), ("vector_bank", "B")]
    for u in usage:
        assert u.layers == TARGETS and u.counts.shape == (3, 6)
        for row, name in enumerate(u.layers):
            layer = adapted.adapted_layers[name]
            logits = layer.logits_A if u.factor == "A" else layer.logits_B
            # every sub-vector picks k = 2 vectors, and its weights sum to 1
            assert int(u.counts[row].sum()) == 2 * logits[..., 0].numel()
            torch.testing.assert_close(u.weights[row].sum(), torch.tensor(float(logits[..., 0].numel())))
            assert torch.equal(u.indices[name], logits.topk(2, dim=-1).indices)
    assert adapters.bank_usage(adapters.attach_adapters(toy(), KIND_CONFIGS["lora"])) == []


# ----------------------------------------------------------------------------------------------------------------
# MoS
# ----------------------------------------------------------------------------------------------------------------

FLAGS = ("subset_selection", "pair_dissociation", "vector_sharding", "shard_privatization")


def mos(n: int = 3, **flags) -> adapters.AdaptedModel:
    settings = {flag: False for flag in FLAGS} | flags
    config = adapters.MosConfig(r=4, alpha=4, equivalent_r=2, shards_per_vector=2, private_r=1,
                                target_modules=r"\d+", exclude_modules=[str(2 * i + 1) for i in range(n)], **settings)
    adapted = adapters.attach_adapters(stack(n=n), config)
    randomize_(adapted)
    return adapted


def factors(adapted: adapters.AdaptedModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.detach() for t in layer.factors()) for layer in adapted.adapted_layers.values()]


def test_mos_with_every_strategy_off_is_pure_sharing():
    adapted = mos()
    pool = adapted.adapter_banks["mos_0"]
    assert pool.group == "*" and pool.num_layers == 3 and pool.pool_A.shape == (2 * 3, 8)
    assert all(torch.equal(pool.index_A[j], pool.index_A[0]) for j in range(3))
    assert torch.equal(pool.index_B, pool.index_A)
    (a0, b0), *rest = factors(adapted)
    for a, b in rest:
        assert torch.equal(a, a0) and torch.equal(b, b0)
    deltas = [layer.delta_weight() for layer in adapted.adapted_layers.values()]
    assert all(torch.equal(d, deltas[0]) for d in deltas)


def test_mos_subset_selection_alone_gives_each_layer_its_own_subset_of_whole_paired_vectors():
    pool = mos(subset_selection=True).adapter_banks["mos_0"]
    assert pool.index_A.shape == (3, 4) and pool.shards_per_vector == 1 and pool.private_r == 0
    assert not all(torch.equal(pool.index_A[j], pool.index_A[0]) for j in range(3))
    assert torch.equal(pool.index_B, pool.index_A)  # pairs stay together
    for row in pool.index_A:
        assert len(set(row.tolist())) == 4  # without replacement within a layer


def test_mos_pair_dissociation_alone_unpairs_a_and_b_but_keeps_layers_identical():
    adapted = mos(pair_dissociation=True)
    pool = adapted.adapter_banks["mos_0"]
    assert not torch.equal(pool.index_B, pool.index_A)
    assert all(torch.equal(pool.index_A[j], pool.index_A[0]) and torch.equal(pool.index_B[j], pool.index_B[0])
               for j in range(3))
    (a0, b0), *rest = factors(adapted)
    assert all(torch.equal(a, a0) and torch.equal(b, b0) for a, b in rest)


def test_mos_vector_sharding_alone_builds_rank_vectors_from_independent_shards():
    adapted = mos(vector_sharding=True)
    pool = adapted.adapter_banks["mos_0"]
    assert pool.pool_A.shape == (2 * 3 * 2, 4) and pool.index_A.shape == (3, 8)
    a, b = factors(adapted)[1]
    for rho in range(4):
        rows = pool.index_A[1, 2 * rho:2 * rho + 2]
        # rank vector ρ of A = concat of two shards of length in / 2
        torch.testing.assert_close(a[rho], torch.cat([pool.pool_A[rows[0]], pool.pool_A[rows[1]]]).detach())
        rows_b = pool.index_B[1, 2 * rho:2 * rho + 2]
        torch.testing.assert_close(b[:, rho], torch.cat([pool.pool_B[rows_b[0]], pool.pool_B[rows_b[1]]]).detach())
    assert torch.equal(pool.index_B, pool.index_A)
    (a0, _), *rest = factors(adapted)
    assert all(torch.equal(x, a0) for x, _ in rest)  # no subset selection: layers still identical


def test_mos_shard_privatization_alone_gives_each_layer_private_rank_vectors():
    adapted = mos(shard_privatization=True)
    pool = adapted.adapter_banks["mos_0"]
    shared = (2 - 1) * 3  # (r_e − r_p) · L · l rows
    assert pool.shared_rows == shared
    private = [pool.index_A[j, -1].item() for j in range(3)]
    assert private == [shared, shared + 1, shared + 2]  # layer j owns row S + j
    assert all(int(pool.index_A[j, :-1].max()) < shared for j in range(3))
    a_mats = [a for a, _ in factors(adapted)]
    for a in a_mats[1:]:
        assert torch.equal(a[:3], a_mats[0][:3])  # the shared rank vectors agree
        assert not torch.equal(a[3], a_mats[0][3])  # the private one does not
    usage = adapters.bank_usage(adapted)
    assert usage[0].private_from == shared and usage[0].counts.shape == (3, 2 * 3)


def test_mos_with_every_strategy_on():
    adapted = mos(**{flag: True for flag in FLAGS})
    pool = adapted.adapter_banks["mos_0"]
    assert pool.index_A.shape == (3, 4 * 2)
    assert not torch.equal(pool.index_A, pool.index_B)
    assert len({tuple(row.tolist()) for row in pool.index_A}) == 3
    # trainable budget = r_e · L · (in + out), whatever the active rank
    assert adapters.adapter_ledger(adapted).trainable == 2 * 3 * (8 + 8)


def test_mos_routing_is_seeded_and_reloads_from_the_seed():
    first = adapters.mos_routing(num_layers=3, r=4, equivalent_r=2, shards_per_vector=2, private_r=1,
                                 subset_selection=True, pair_dissociation=True, seed=5)
    second = adapters.mos_routing(num_layers=3, r=4, equivalent_r=2, shards_per_vector=2, private_r=1,
                                  subset_selection=True, pair_dissociation=True, seed=5)
    assert torch.equal(first.index_a, second.index_a) and torch.equal(first.index_b, second.index_b)
    adapted = mos(**{flag: True for flag in FLAGS})
    state = adapters.adapter_state_dict(adapted)
    config = adapters.config_from_dict({**adapted.adapter_config.to_dict(), "seed": 1})
    other = adapters.attach_adapters(stack(), config)
    assert not torch.equal(other.adapter_banks["mos_0"].index_A, adapted.adapter_banks["mos_0"].index_A)
    adapters.load_adapter_state_dict_(other, state)
    assert torch.equal(other.adapter_banks["mos_0"].index_A, adapted.adapter_banks["mos_0"].index_A)
    x = torch.randn(3, 8)
    assert torch.equal(other(x), adapted(x))


def test_mos_refuses_a_shared_pool_too_small_for_the_active_rank():
    with pytest.raises(ValueError, match=r"needs \(r - private_r\) \* shards_per_vector = 14 distinct"):
        adapters.attach_adapters(stack(), adapters.MosConfig(r=8, equivalent_r=2, private_r=1,
                                                             target_modules=["0", "2", "4"]))
    with pytest.raises(ValueError, match="shards_per_vector >= 2"):
        adapters.MosConfig(target_modules=["0"], shards_per_vector=1)
    with pytest.raises(ValueError, match=r"private_r in \[1, min\(r, equivalent_r\)\]"):
        adapters.MosConfig(target_modules=["0"], private_r=3)


def test_mos_groups_layers_by_module_type_and_shape():
    assert adapters.module_type("blocks.12.attn.qkv") == "blocks.*.attn.qkv"
    adapted = adapters.attach_adapters(toy(), KIND_CONFIGS["mos"])
    pools = adapted.adapter_banks
    assert sorted(pools) == ["mos_0", "mos_1"]
    assert pools["mos_0"].layer_names == ["0", "2"] and pools["mos_1"].layer_names == ["4"]


# ----------------------------------------------------------------------------------------------------------------
# Compacter
# ----------------------------------------------------------------------------------------------------------------


def test_compacter_delta_is_the_explicit_sum_of_kronecker_products():
    adapted = adapters.attach_adapters(toy(), adapters.CompacterConfig(r=2, alpha=3, phm_dim=4,
                                                                        target_modules=TARGETS))
    randomize_(adapted)
    rule = adapted.adapter_banks["phm_rule"].rule.detach()
    for layer in adapted.adapted_layers.values():
        u, v = layer.fast_u.detach(), layer.fast_v.detach()
        assert u.shape == (4, layer.out_features // 4, 2) and v.shape == (4, layer.in_features // 4, 2)
        # ΔW = (alpha / r) Σ_i S_i ⊗ (U_i V_iᵀ)
        expected = (3 / 2) * sum(torch.kron(rule[i], u[i] @ v[i].T) for i in range(4))
        torch.testing.assert_close(layer.delta_weight(), expected)
        x = torch.randn(7, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, rtol=1e-5, atol=1e-6)


def test_compacter_shares_slow_factors_across_layers_unless_told_not_to():
    shared = adapters.attach_adapters(toy(), KIND_CONFIGS["compacter"])
    rule = shared.adapter_banks["phm_rule"]
    assert all(layer.shared is rule and layer.own_rule is None for layer in shared.adapted_layers.values())
    shared(torch.randn(4, 8)).sum().backward()
    assert rule.rule.grad is not None
    own = adapters.attach_adapters(toy(), KIND_CONFIGS["compacter_own"])
    assert len(own.adapter_banks) == 0
    rules = [layer.rule for layer in own.adapted_layers.values()]
    assert len({id(r) for r in rules}) == 3


def test_compacter_needs_widths_divisible_by_phm_dim_and_a_rank_that_fits():
    with pytest.raises(ValueError, match=r"cannot be split by phm_dim=3"):
        adapters.attach_adapters(toy(), adapters.CompacterConfig(phm_dim=3, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"r=3 is larger than layer '0' allows"):
        adapters.attach_adapters(toy(), adapters.CompacterConfig(r=3, phm_dim=4, target_modules=["0"]))
