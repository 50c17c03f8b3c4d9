"""lablib.merging's data-dependent parts: permutation alignment by weight matching, interpolation curves, the
diagonal Fisher and Fisher-weighted averaging, each against an independent reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lablib import merging
from lablib.models import MLPClassifier


def mlp_state(seed: int, hidden=(6, 5)) -> tuple[MLPClassifier, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = MLPClassifier(in_features=4, hidden_sizes=list(hidden), num_classes=3)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_mlp(state: dict[str, torch.Tensor], x: torch.Tensor, hidden=(6, 5)) -> torch.Tensor:
    model = MLPClassifier(in_features=4, hidden_sizes=list(hidden), num_classes=3)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- weight matching


def test_mlp_layers_finds_the_chain_and_rejects_other_models():
    _, state = mlp_state(0)
    assert merging.mlp_layers(state) == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(ValueError, match="'norm.weight' is not the weight or bias"):
        merging.mlp_layers({**state, "norm.weight": torch.ones(6)})
    broken = {**state, "layers.1.weight": torch.zeros(5, 7)}
    with pytest.raises(ValueError, match="do not form a chain"):
        merging.mlp_layers(broken)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 1000),
    perm0=st.permutations(list(range(6))),
    perm1=st.permutations(list(range(5))),
)
def test_weight_matching_recovers_a_permuted_copy_exactly(seed, perm0, perm1):
    _, state_a = mlp_state(seed)
    perms = [torch.tensor(perm0), torch.tensor(perm1)]
    state_b = merging.permute_hidden_units(state_a, perms)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    # a permuted network computes the same function
    torch.testing.assert_close(run_mlp(state_b, x), run_mlp(state_a, x))
    result = merging.weight_matching(state_a, state_b)
    # ... and matching it back against A recovers A exactly, and the inverse permutations
    assert all(torch.equal(result.state_dict[k], state_a[k]) for k in state_a)
    for found, used in zip(result.permutations, perms):
        assert torch.equal(found, torch.argsort(used))
    torch.testing.assert_close(run_mlp(result.state_dict, x), run_mlp(state_a, x))


def test_weight_matching_keeps_the_function_and_never_lowers_the_objective():
    _, state_a = mlp_state(1, hidden=(8, 8, 8))
    _, state_b = mlp_state(2, hidden=(8, 8, 8))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for init in ("forward", "identity"):
        result = merging.weight_matching(state_a, state_b, init=init, seed=3)
        torch.testing.assert_close(run_mlp(result.state_dict, x, (8, 8, 8)), run_mlp(state_b, x, (8, 8, 8)))
        assert all(later >= earlier - 1e-9 for earlier, later in zip(result.objective, result.objective[1:]))
        assert result.layers == ["layers.0", "layers.1", "layers.2", "layers.3"]
    identity = merging.weight_matching(state_a, state_b, init="identity", max_sweeps=1)
    unaligned = sum(float((state_a[k] * state_b[k]).sum()) for k in state_a)
    assert identity.objective[0] == pytest.approx(unaligned)


def test_weight_matching_errors():
    _, state = mlp_state(0)
    with pytest.raises(merging.StateDictMismatchError, match="layers.0.weight"):
        merging.weight_matching(state, {**state, "layers.0.weight": torch.zeros(6, 5)})
    with pytest.raises(ValueError, match="init must be"):
        merging.weight_matching(state, state, init="random")
    with pytest.raises(ValueError, match=r"permutations\[1\] must be a permutation of range\(5\)"):
        merging.permute_hidden_units(state, [torch.arange(6), torch.tensor([0, 0, 1, 2, 3])])


# ---------------------------------------------------------------- interpolation


def test_interpolation_curve_endpoints_are_the_evaluated_endpoints():
    model, state_a = mlp_state(4)
    _, state_b = mlp_state(5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)

    def loss(state):
        return float(F.cross_entropy(run_mlp(state, x), y))

    curve = merging.interpolation_curve(state_a, state_b, loss)
    assert curve.alphas == [i / 10 for i in range(11)]
    assert curve.values[0] == loss(state_a) == curve.value_a
    assert curve.values[-1] == loss(state_b) == curve.value_b
    assert curve.barrier == max(v - ((1 - a) * curve.value_a + a * curve.value_b)
                                for a, v in zip(curve.alphas, curve.values))
    inner = merging.interpolation_curve(state_a, state_b, loss, alphas=[0.25, 0.5])
    assert inner.value_a == loss(state_a) and inner.values[1] == curve.values[5]
    for key in state_a:
        assert torch.equal(merging.interpolate(state_a, state_b, 0.0)[key], state_a[key])
        assert torch.equal(merging.interpolate(state_a, state_b, 1.0)[key], state_b[key])


def test_a_linear_evaluation_has_no_barrier():
    _, state_a = mlp_state(6)
    _, state_b = mlp_state(7)

    def linear_in_weights(state):
        return float(sum(v.double().sum() for v in state.values()))

    curve = merging.interpolation_curve(state_a, state_b, linear_in_weights, alphas=[0.0, 0.3, 0.7, 1.0])
    assert abs(curve.barrier) < 1e-5


def test_alignment_lowers_the_barrier_between_two_trained_mlps():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 4, generator=g) * 2
    labels = torch.randint(0, 3, (256,), generator=g)
    x = centers[labels % 4] + 0.8 * torch.randn(256, 4, generator=g)
    y = (labels + (x[:, 0] > 0).long()) % 3
    states = []
    for seed in (10, 11):
        model, _ = mlp_state(seed, hidden=(32, 32))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def loss(state):
        return float(F.cross_entropy(run_mlp(state, x, (32, 32)), y))

    before = merging.interpolation_curve(states[0], states[1], loss)
    aligned = merging.weight_matching(states[0], states[1]).state_dict
    after = merging.interpolation_curve(states[0], aligned, loss)
    assert after.value_b == pytest.approx(before.value_b, abs=1e-6)
    assert after.barrier < 0.5 * before.barrier


# ---------------------------------------------------------------- diagonal Fisher and Fisher merging


def test_exact_fisher_of_softmax_regression_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(64, 5, generator=g)
    fisher = merging.diagonal_fisher(model, [(x[:40], None), x[40:]], labels="exact")
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    # for z = W x + b: F(W_kj) = E_x[p_k (1 − p_k) x_j²] and F(b_k) = E_x[p_k (1 − p_k)]
    variance = p * (1 - p)
    torch.testing.assert_close(fisher["weight"], (variance.T @ x**2) / 64)
    torch.testing.assert_close(fisher["bias"], variance.mean(dim=0))


def test_empirical_fisher_matches_a_per_example_autograd_loop():
    model, _ = mlp_state(8)
    model.train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    fisher = merging.diagonal_fisher(model, [(x, y)], labels="empirical")
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(12):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            reference[n] += p.grad**2 / 12
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name])
    assert model.training  # modes restored
    capped = merging.diagonal_fisher(model, [(x, y)], labels="empirical", max_examples=5)
    first5 = merging.diagonal_fisher(model, [(x[:5], y[:5])], labels="empirical")
    assert all(torch.allclose(capped[n], first5[n]) for n in capped)


def test_sampled_fisher_is_seeded_and_close_to_the_exact_one():
    torch.manual_seed(2)
    model = nn.Linear(3, 3)
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(3))
    exact = merging.diagonal_fisher(model, [x], labels="exact")
    sampled = merging.diagonal_fisher(model, [x], labels="sampled", seed=5)
    again = merging.diagonal_fisher(model, [x], labels="sampled", seed=5)
    assert all(torch.equal(sampled[n], again[n]) for n in sampled)
    torch.testing.assert_close(sampled["weight"], exact["weight"], rtol=0.15, atol=0.01)
    with pytest.raises(ValueError, match="loss_fn is not used"):
        merging.diagonal_fisher(model, [x], labels="exact", loss_fn=lambda out, y: out.sum())
    with pytest.raises(ValueError, match="needs batches of \\(inputs, targets\\)"):
        merging.diagonal_fisher(model, [x], labels="empirical")


def test_fisher_merge_with_equal_fishers_is_averaging():
    _, base = mlp_state(9)
    models = [mlp_state(s)[1] for s in (10, 11, 12)]
    equal = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) + 0.1 for k, v in base.items()}
    merged = merging.fisher(None, models, fishers=[equal, copy.deepcopy(equal), copy.deepcopy(equal)],
                            weight=[1.0, 2.0, 1.0])
    average = merging.linear(None, models, weight=[1.0, 2.0, 1.0])
    for key in base:
        torch.testing.assert_close(merged[key], average[key])


def test_fisher_merge_by_hand_and_with_zero_fisher():
    a, b = {"x": torch.tensor([1.0, 1.0, 5.0])}, {"x": torch.tensor([3.0, 3.0, 7.0])}
    fa, fb = {"x": torch.tensor([1.0, 3.0, 0.0])}, {"x": torch.tensor([1.0, 1.0, 0.0])}
    # (F_a θ_a + F_b θ_b) / (F_a + F_b) = [2, (3 + 3)/4, all-zero Fisher -> the average 6]
    out = merging.fisher(None, [a, b], fishers=[fa, fb])["x"]
    torch.testing.assert_close(out, torch.tensor([2.0, 1.5, 6.0]))
    # a model whose Fisher is 0 is ignored
    ignored = merging.fisher(None, [a, b], fishers=[{"x": torch.ones(3)}, {"x": torch.zeros(3)}])["x"]
    torch.testing.assert_close(ignored, a["x"])
    # normalize_fisher divides each Fisher by its global norm first
    scaled = merging.fisher(None, [a, b], fishers=[{"x": torch.full((3,), 10.0)}, {"x": torch.ones(3)}],
                            normalize_fisher=True)["x"]
    torch.testing.assert_close(scaled, torch.tensor([2.0, 2.0, 6.0]))
    with pytest.raises(merging.StateDictMismatchError, match=r"key 'x': fishers\[1\] has shape \(2,\)"):
        merging.fisher(None, [a, b], fishers=[fa, {"x": torch.ones(2)}])
    with pytest.raises(ValueError, match="negative"):
        merging.fisher(None, [a, b], fishers=[fa, {"x": -torch.ones(3)}])


def test_fisher_merge_end_to_end_with_estimated_fishers():
    models = []
    fishers = []
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 4, generator=g)
    for seed in (13, 14):
        model, _ = mlp_state(seed)
        models.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        fishers.append(merging.diagonal_fisher(model, [x], labels="exact"))
    assert set(fishers[0]) == set(models[0])
    out = merging.merge("fisher", None, models, fishers=fishers)
    for key in out:
        low = torch.minimum(models[0][key], models[1][key]) - 1e-6
        high = torch.maximum(models[0][key], models[1][key]) + 1e-6
        # a Fisher-weighted mean of two values lies between them
        assert bool(((out[key] >= low) & (out[key] <= high)).all())
