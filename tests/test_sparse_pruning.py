"""Magnitude pruning and Wanda against hand-worked examples and naive per-row Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lablib import ledger, models
from lablib import sparse


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def set_weights(model: nn.Module, **weights: list) -> nn.Module:
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name.replace("_", ".")).copy_(torch.tensor(value))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Magnitude
# ----------------------------------------------------------------------------------------------------------------


def test_layerwise_magnitude_by_hand():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    set_weights(model, **{"0_weight": [[0.1, -0.5, 0.3, 0.05], [2.0, -1.0, 0.2, 0.0]],
                          "1_weight": [[0.01, 0.02], [-0.03, 0.04]]})
    result = sparse.magnitude_mask(model, density=0.5, scope="layer")
    # layer 0 keeps ⌈0.5 · 8⌉ = 4: 2.0, -1.0, -0.5, 0.3;  layer 1 keeps 2: 0.04, -0.03
    assert result.mask["0.weight"].tolist() == [[False, True, True, False], [True, True, False, False]]
    assert result.mask["1.weight"].tolist() == [[False, False], [True, True]]
    assert result.stats.density == {"0.weight": 0.5, "1.weight": 0.5}
    assert result.method == "magnitude/layer"
    assert torch.equal(result.scores["0.weight"], model[0].weight.detach().abs())


def test_global_magnitude_by_hand_can_empty_a_small_layer():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    set_weights(model, **{"0_weight": [[0.1, -0.5, 0.3, 0.05], [2.0, -1.0, 0.2, 0.0]],
                          "1_weight": [[0.01, 0.02], [-0.03, 0.04]]})
    result = sparse.magnitude_mask(model, density=0.5, scope="global")
    # 6 of 12 over both layers: 2.0, -1.0, -0.5, 0.3, 0.2, 0.1 -- all in layer 0 (layer collapse of layer 1)
    assert result.mask["0.weight"].tolist() == [[True, True, True, False], [True, True, True, False]]
    assert result.mask["1.weight"].tolist() == [[False, False], [False, False]]
    assert result.stats.kept == {"0.weight": 6, "1.weight": 0}
    assert result.stats.overall_density == 0.5


def test_magnitude_reports_a_mask_aware_ledger_and_leaves_the_model_alone():
    model = tiny_mlp()
    before = snapshot(model)
    result = sparse.magnitude_mask(model, density=0.25, scope="global")
    assert_same_state(model, before)
    pruned = result.stats.total_numel - result.stats.total_kept
    assert result.stats.total_kept == math.ceil(0.25 * (8 * 12 + 12 * 4))
    assert result.ledger.stored == ledger.ledger(model).stored - pruned


@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=40, deadline=None)
def test_magnitude_keeps_exactly_k_and_every_kept_beats_every_pruned(shape, density, seed):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    keep = sparse.mask_from_scores({"w": weight.abs()}, density=density, scope="layer")["w"]
    assert int(keep.sum()) == sparse.kept_count(density=density, numel=weight.numel())
    if keep.any() and (~keep).any():
        assert weight.abs()[keep].min() >= weight.abs()[~keep].max()
    glob = sparse.mask_from_scores({"w": weight.abs()}, density=density, scope="global")["w"]
    assert torch.equal(glob, keep)  # global over one tensor is layer-wise


# ----------------------------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------------------------


def calibration(seed: int = 0, n_batches: int = 3, scale: torch.Tensor | None = None) -> list:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(8) if scale is None else scale
    return [(torch.randn(5, 8, generator=gen) * scale, torch.zeros(5, dtype=torch.long)) for _ in range(n_batches)]


def naive_wanda(model: nn.Sequential, batches, density: float) -> dict[str, list[list[bool]]]:
    """Per-row loops over Python floats: layer inputs recomputed by hand, ‖X_j‖ summed token by token."""
    inputs = {"0.weight": [], "2.weight": []}
    with torch.no_grad():
        for x, _ in batches:
            inputs["0.weight"] += x.tolist()
            inputs["2.weight"] += torch.relu(model[0](x)).tolist()
    out = {}
    for name, rows in inputs.items():
        weight = model.get_parameter(name).detach().tolist()
        n_in = len(weight[0])
        norms = [math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(n_in)]
        k = math.ceil(density * n_in - 1e-9)
        mask = []
        for w_row in weight:
            scored = sorted(range(n_in), key=lambda j: (-abs(w_row[j]) * norms[j], j))
            kept = set(scored[:k])
            mask.append([j in kept for j in range(n_in)])
        out[name] = mask
    return out


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_wanda_matches_a_naive_per_row_loop(density):
    model = tiny_mlp()
    batches = calibration(scale=torch.linspace(0.1, 3.0, 8))
    before = snapshot(model)
    result = sparse.wanda_mask(model, batches=batches, num_batches=3, density=density)
    assert_same_state(model, before)
    expected = naive_wanda(model, batches, density)
    for name in expected:
        assert result.mask[name].tolist() == expected[name], name
    assert result.num_tokens == 15
    assert result.method == "wanda/row"
    for name, mask in result.mask.items():
        assert bool((mask.sum(dim=1) == math.ceil(density * mask.shape[1] - 1e-9)).all())


def test_wanda_with_equal_column_norms_is_per_row_magnitude():
    model = nn.Sequential(nn.Linear(8, 6))
    # every input column has norm 2 over the calibration set: ±1 entries, 4 rows
    x = torch.tensor([[1.0, -1, 1, -1, 1, -1, 1, -1]] * 4)
    result = sparse.wanda_mask(model, batches=[(x, None)], num_batches=1, density=0.5)
    by_row = sparse.mask_from_scores({"0.weight": model[0].weight.detach().abs()}, density=0.5, scope="row")
    assert result.mask == by_row


def test_wanda_mask_is_invariant_to_rescaling_an_input_feature_against_its_weights():
    model = tiny_mlp()
    batches = calibration()
    reference = sparse.wanda_mask(model, batches=batches, num_batches=3, density=0.5, names=["0.weight"]).mask
    scaled_model = tiny_mlp()
    scale = torch.tensor([4.0, 1, 1, 0.25, 1, 2, 1, 1])
    with torch.no_grad():
        scaled_model[0].weight.div_(scale)  # W[:, j] / c
    scaled_batches = [(x * scale, y) for x, y in batches]  # x_j · c
    scaled = sparse.wanda_mask(scaled_model, batches=scaled_batches, num_batches=3, density=0.5,
                               names=["0.weight"]).mask
    assert scaled == reference


def test_wanda_semi_structured_gives_a_valid_nm_mask():
    model = tiny_mlp()
    result = sparse.wanda_mask(model, batches=calibration(), num_batches=3, n=2, m=4)
    assert result.method == "wanda/2:4"
    for tensor in result.mask.values():
        assert sparse.is_nm_mask(tensor, n=2, m=4)


def test_wanda_on_the_tiny_transformer_hooks_every_linear():
    torch.manual_seed(0)
    config = models.TransformerConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, seq_len=8)
    model = models.TinyTransformer(config)
    tokens = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    result = sparse.wanda_mask(model, batches=[(tokens, tokens)], num_batches=1, density=0.5)
    assert set(result.input_norms) == set(sparse.prunable_names(model))
    assert result.num_tokens == 16
    assert result.stats.overall_density == 0.5
    assert model.training  # modes restored


def test_wanda_argument_errors():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="either density"):
        sparse.wanda_mask(model, batches=calibration(), num_batches=1, density=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="both n and m"):
        sparse.wanda_mask(model, batches=calibration(), num_batches=1, n=2)
    with pytest.raises(ValueError, match="ran out"):
        sparse.wanda_mask(model, batches=calibration(n_batches=1), num_batches=2, density=0.5)
    with pytest.raises(ValueError, match="not the weight of an nn.Linear"):
        sparse.wanda_mask(model, batches=calibration(), num_batches=1, density=0.5, names=["0.bias"])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sparse.wanda_mask(model, batches=calibration(), num_batches=1, density=1.2)
