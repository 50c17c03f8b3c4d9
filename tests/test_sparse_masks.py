"""lablib.sparse masks: the Mask object, applying / attaching / removing it, masked training and the masked ledger,
checked against hand-worked numbers and plain tensor arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lablib import ledger, models
from lablib import sparse
from lablib.train import train


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def tiny_lm(seed: int = 0) -> models.TinyTransformer:
    torch.manual_seed(seed)
    config = models.TransformerConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, seq_len=8)
    return models.TinyTransformer(config)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def half_mask(model: nn.Module, seed: int = 1) -> sparse.Mask:
    gen = torch.Generator().manual_seed(seed)
    return sparse.Mask({n: torch.rand(model.get_parameter(n).shape, generator=gen) < 0.5
                        for n in sparse.prunable_names(model)})


def stream(seed: int = 0):
    teacher = torch.randn(8, 4, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 8, generator=gen)
        yield x, (x @ teacher).argmax(dim=1)


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------------------------------------------
# The Mask object
# ----------------------------------------------------------------------------------------------------------------


def test_mask_stats_by_hand():
    mask = sparse.Mask({"a": torch.tensor([[1, 0], [1, 1]]), "b": torch.tensor([True, False, False, False])})
    assert mask["a"].dtype == torch.bool
    stats = mask.stats()
    assert stats.kept == {"a": 3, "b": 1}
    assert stats.numel == {"a": 4, "b": 4}
    assert stats.density == {"a": 0.75, "b": 0.25}
    assert stats.overall_density == 0.5 and mask.density == 0.5
    assert stats.total_kept == 4 and stats.total_numel == 8
    assert math.isclose(stats.sparsity, 0.5)
    assert mask.densities() == {"a": 0.75, "b": 0.25}
    assert [row["name"] for row in stats.rows()] == ["a", "b"]


def test_mask_copies_its_input_and_compares_by_value():
    source = torch.tensor([True, False])
    mask = sparse.Mask({"w": source})
    source[1] = True
    assert mask["w"].tolist() == [True, False]
    assert mask == sparse.Mask({"w": torch.tensor([1, 0])})
    assert mask != sparse.Mask({"w": torch.tensor([1, 1])})
    assert (mask & sparse.Mask({"w": torch.tensor([1, 1])})) == mask
    assert (mask | sparse.Mask({"w": torch.tensor([0, 1])})).density == 1.0


@pytest.mark.parametrize("bad, error", [
    ({"w": torch.tensor([0.0, 0.5])}, ValueError),
    ({"w": [1, 0]}, TypeError),
    ({3: torch.tensor([True])}, TypeError),
    ([("w", torch.tensor([True]))], TypeError),
])
def test_mask_rejects_bad_tensors(bad, error):
    with pytest.raises(error):
        sparse.Mask(bad)


def test_check_names_unknown_parameters_and_shapes():
    model = tiny_mlp()
    with pytest.raises(KeyError, match="nope.weight"):
        sparse.Mask({"nope.weight": torch.ones(3, dtype=torch.bool)}).check(model)
    with pytest.raises(ValueError, match=r"\(12, 8\)"):
        sparse.Mask({"0.weight": torch.ones(8, 12, dtype=torch.bool)}).check(model)
    with pytest.raises(KeyError, match="nope"):
        sparse.magnitude_mask(model, density=0.5, names=["nope"])


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval_raises(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sparse.magnitude_mask(tiny_mlp(), density=density)
    with pytest.raises(ValueError, match="density"):
        sparse.mask_from_scores({"w": torch.ones(4)}, density=density)


def test_density_must_be_a_number():
    with pytest.raises(TypeError, match="density"):
        sparse.magnitude_mask(tiny_mlp(), density=True)
    with pytest.raises(TypeError, match="density"):
        sparse.magnitude_mask(tiny_mlp(), density="0.5")


def test_prunable_names_skip_embeddings_heads_biases_and_norms():
    names = sparse.prunable_names(tiny_lm())
    assert names == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.ffn.fc.weight",
                     "blocks.0.ffn.proj.weight"]
    assert sparse.prunable_names(tiny_mlp()) == ["0.weight", "2.weight"]


# ----------------------------------------------------------------------------------------------------------------
# apply / apply_ / attach_ / remove_
# ----------------------------------------------------------------------------------------------------------------


def test_apply_returns_a_masked_copy_and_leaves_the_model_alone():
    model = tiny_mlp()
    before = snapshot(model)
    mask = half_mask(model)
    masked = mask.apply(model)
    assert masked is not model
    assert_same_state(model, before)
    for name in mask:
        expected = before[name] * mask[name]
        assert torch.equal(masked.get_parameter(name).detach(), expected)
    assert torch.equal(masked.get_parameter("0.bias"), model.get_parameter("0.bias"))


def test_apply_in_place_and_state_dict_version():
    model = tiny_mlp()
    before = snapshot(model)
    mask = half_mask(model)
    masked_state = mask.apply_to_state_dict(model.state_dict())
    assert_same_state(model, before)
    assert mask.apply_(model) is model
    for name in mask:
        assert torch.equal(model.get_parameter(name).detach(), before[name] * mask[name])
        assert torch.equal(masked_state[name], before[name] * mask[name])


def test_attached_layer_equals_dense_layer_with_masked_weight():
    layer = nn.Linear(6, 5)
    mask = sparse.Mask({"weight": torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) < 0.5})
    dense_weight = layer.weight.detach().clone()
    mask.attach_(layer)
    x = torch.randn(7, 6)
    expected = F.linear(x, dense_weight * mask["weight"], layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert sparse.parameter_names(layer) == ["weight", "bias"]
    assert sparse.attached_mask(layer) == mask


def test_remove_restores_the_original_weights_exactly():
    model = tiny_mlp()
    before = snapshot(model)
    mask = half_mask(model)
    mask.attach_(model)
    assert torch.equal(model[0].weight, before["0.weight"] * mask["0.weight"])
    mask.remove_(model)
    assert_same_state(model, before)
    assert sparse.attached_mask(model) is None
    assert isinstance(model[0].weight, nn.Parameter)


def test_remove_with_bake_keeps_the_masked_weights():
    model = tiny_mlp()
    before = snapshot(model)
    mask = half_mask(model)
    mask.attach_(model)
    mask.remove_(model, bake=True)
    assert torch.equal(model[0].weight.detach(), before["0.weight"] * mask["0.weight"])
    assert list(model.state_dict()) == list(before)


def test_attach_twice_and_remove_without_mask_raise():
    model = tiny_mlp()
    mask = half_mask(model)
    mask.attach_(model)
    with pytest.raises(ValueError, match="already"):
        mask.attach_(model)
    mask.remove_(model)
    with pytest.raises(ValueError, match="no mask attached"):
        mask.remove_(model)


def test_attach_to_a_tied_tensor_masks_every_use_and_keeps_the_tie():
    model = tiny_lm()
    before = snapshot(model)
    assert model.lm_head.weight is model.token_embedding.weight
    names = sparse.parameter_names(model)
    assert "token_embedding.weight" in names and "lm_head.weight" not in names
    mask = sparse.Mask({"token_embedding.weight": torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) > 0.3})
    mask.attach_(model)
    assert torch.equal(model.lm_head.weight, model.token_embedding.weight)
    assert bool((model.lm_head.weight[~mask["token_embedding.weight"]] == 0).all())
    mask.remove_(model)
    assert model.lm_head.weight is model.token_embedding.weight
    assert_same_state(model, before)


# ----------------------------------------------------------------------------------------------------------------
# Masked training keeps zeros at zero
# ----------------------------------------------------------------------------------------------------------------


def test_attached_mask_keeps_pruned_weights_zero_through_lablib_train():
    model = tiny_mlp()
    mask = half_mask(model)
    mask.attach_(model)
    start = {n: model.get_submodule(n.rsplit(".", 1)[0]).weight.detach().clone() for n in mask}
    train(model, batches=stream(), loss_fn=ce, steps=30, lr=3e-2, weight_decay=0.1, progress=False)
    for name in mask:
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
        assert bool((weight[~mask[name]] == 0).all()), name
        assert not torch.equal(weight[mask[name]], start[name][mask[name]]), "kept weights should train"


def test_without_attaching_training_revives_pruned_weights():
    """The negative control for the test above: zeroed weights alone do not stay zero under AdamW."""
    model = tiny_mlp()
    mask = half_mask(model)
    mask.apply_(model)
    train(model, batches=stream(), loss_fn=ce, steps=5, lr=3e-2, progress=False)
    assert bool((model[0].weight.detach()[~mask["0.weight"]] != 0).any())


def test_masked_train_returns_a_sparse_trained_copy():
    model = tiny_mlp()
    before = snapshot(model)
    mask = half_mask(model)
    result = sparse.masked_train(model, mask=mask, batches=stream, loss_fn=ce, steps=20, lr=3e-2, progress=False)
    assert_same_state(model, before)
    assert sparse.attached_mask(result.model) is None
    for name in mask:
        weight = result.model.get_parameter(name).detach()
        assert bool((weight[~mask[name]] == 0).all())
    assert sparse.Mask.from_nonzero(result.model) == mask
    assert len(result.history.train_loss) == 20
    assert result.stats == mask.stats()
    assert result.ledger.stored == ledger.ledger(model).stored - (mask.total_numel() - mask.total_kept())


# ----------------------------------------------------------------------------------------------------------------
# Saving, loading, the masked ledger
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    mask = half_mask(tiny_mlp())
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    loaded = sparse.Mask.load(path)
    assert loaded == mask
    assert list(loaded) == list(mask)
    assert all(t.dtype == torch.bool for t in loaded.values())


def test_load_rejects_a_file_that_is_not_a_mask(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    with pytest.raises(ValueError, match="not a lablib mask"):
        sparse.Mask.load(path)


def test_masked_ledger_by_hand():
    model = tiny_mlp()
    mask = sparse.Mask({"0.weight": torch.zeros(12, 8, dtype=torch.bool).index_fill_(1, torch.tensor([0, 1]), True),
                        "2.weight": torch.ones(4, 12, dtype=torch.bool)})
    pruned = 12 * 6  # six of eight input columns of the first layer
    dense = ledger.ledger(model)
    assert dense.total == 8 * 12 + 12 + 12 * 4 + 4
    row = sparse.masked_ledger(model, mask, name="mlp")
    assert row.total == dense.total
    assert row.stored == dense.stored - pruned
    assert row.active_per_token == dense.active_per_token - pruned
    assert row.trainable == dense.trainable - pruned
    assert row.flops_per_token == 2 * (8 * 12 + 12 * 4) - 2 * pruned
    assert "pruned" in row.notes and row.name == "mlp"
    mask.attach_(model)
    assert sparse.masked_ledger(model) == dataclass_replace_name(row, "Sequential")


def dataclass_replace_name(row, name):
    import dataclasses

    return dataclasses.replace(row, name=name)


def test_masked_ledger_needs_a_mask():
    with pytest.raises(ValueError, match="no mask attached"):
        sparse.masked_ledger(tiny_mlp())


def test_mask_from_scores_scopes_by_hand():
    scores = {"a": torch.tensor([[4.0, 1.0, 3.0], [0.5, 2.0, 6.0]]), "b": torch.tensor([10.0, 0.1])}
    layer = sparse.mask_from_scores(scores, density=0.5, scope="layer")
    # a keeps ⌈0.5 · 6⌉ = 3 entries (6, 4, 3), b keeps 1 (10)
    assert layer["a"].tolist() == [[True, False, True], [False, False, True]]
    assert layer["b"].tolist() == [True, False]
    row = sparse.mask_from_scores(scores, density=0.5, scope="row")
    assert row["a"].tolist() == [[True, False, True], [False, True, True]]
    glob = sparse.mask_from_scores(scores, density=0.5, scope="global")
    # 4 of 8 over both tensors: 10, 6, 4, 3
    assert glob["a"].tolist() == [[True, False, True], [False, False, True]] and glob["b"].tolist() == [True, False]
    with pytest.raises(ValueError, match="scope"):
        sparse.mask_from_scores(scores, density=0.5, scope="tensor")


def test_kept_count_rounds_up_and_absorbs_float_noise():
    assert sparse.kept_count(density=0.5, numel=6) == 3
    assert sparse.kept_count(density=0.7, numel=10) == 7
    assert sparse.kept_count(density=0.9, numel=10) == 9
    assert sparse.kept_count(density=0.34, numel=3) == 2
    assert sparse.kept_count(density=1.0, numel=5) == 5
