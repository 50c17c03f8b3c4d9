"""lablib.adapters core: target matching (PEFT's rules), attaching, freezing, merge / unmerge, saving and loading,
with LoRA checked against the update written out by hand."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lablib import adapters, ledger, models


def tiny_lm(seed: int = 0, n_layers: int = 2) -> models.TinyTransformer:
    torch.manual_seed(seed)
    config = models.TransformerConfig(vocab_size=16, d_model=8, n_layers=n_layers, n_heads=2, seq_len=8)
    return models.TinyTransformer(config).eval()


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))


class Nested(nn.Module):
    """A toy with a ModuleDict, a Sequential and a non-Linear module whose name ends like a Linear's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"query": nn.Linear(6, 6), "value": nn.Linear(6, 6), "norm": nn.LayerNorm(6)})
        self.decoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder["norm"](self.encoder["query"](x) + self.encoder["value"](x))
        return self.head(self.decoder(h))


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(seed))


def randomize_(adapted: adapters.AdaptedModel, seed: int = 3) -> None:
    """Give every adapter parameter random values (B = 0 at init would hide bugs in B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Target matching
# ----------------------------------------------------------------------------------------------------------------


def test_list_entries_match_exact_names_or_dotted_suffixes_on_a_transformer():
    model = tiny_lm()
    assert adapters.match_modules(model, ["proj"]) == [
        "blocks.0.attn.proj", "blocks.0.ffn.proj", "blocks.1.attn.proj", "blocks.1.ffn.proj"]
    assert adapters.match_modules(model, ["attn.proj"]) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert adapters.match_modules(model, ["blocks.1.ffn.fc", "lm_head"]) == ["blocks.1.ffn.fc", "lm_head"]
    # a suffix only counts at a dot: "kv" is not a suffix of "qkv"
    assert adapters.match_modules(model, ["kv"]) == []
    assert adapters.match_modules(model, ["proj"], ["ffn.proj"]) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]


def test_a_string_is_a_full_match_regex():
    model = tiny_lm()
    assert adapters.match_modules(model, r"blocks\.0\.attn\.qkv") == ["blocks.0.attn.qkv"]
    assert adapters.match_modules(model, r"blocks\.\d+\.(attn\.qkv|ffn\.fc)") == [
        "blocks.0.attn.qkv", "blocks.0.ffn.fc", "blocks.1.attn.qkv", "blocks.1.ffn.fc"]
    # a partial match is no match (re.fullmatch), unlike a list entry
    assert adapters.match_modules(model, "qkv") == []
    assert adapters.match_modules(model, r".*qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert adapters.match_modules(model, r".*qkv", r"blocks\.1\..*") == ["blocks.0.attn.qkv"]


def test_matching_on_a_nested_toy_model():
    model = Nested()
    assert adapters.match_modules(model, ["query"]) == ["encoder.query"]
    assert adapters.match_modules(model, ["encoder.query", "head"]) == ["encoder.query", "head"]
    assert adapters.match_modules(model, ["0", "2"]) == ["decoder.0", "decoder.2"]
    assert adapters.match_modules(model, r"encoder\.(query|value)") == ["encoder.query", "encoder.value"]
    assert adapters.match_modules(model, r"decoder\.\d") == ["decoder.0", "decoder.1", "decoder.2"]
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["query", "value", "head"]))
    assert sorted(adapted.adapted_layers) == ["encoder.query", "encoder.value", "head"]


@pytest.mark.parametrize("pattern", ["query", ["uery"], ["missing", "nothing"]])
def test_a_pattern_matching_nothing_raises_naming_it(pattern):
    with pytest.raises(ValueError, match="matched no module") as err:
        adapters.attach_adapters(Nested(), adapters.LoraConfig(r=2, target_modules=pattern))
    assert repr(pattern if isinstance(pattern, str) else tuple(pattern)) in str(err.value)
    assert "encoder.query" in str(err.value)  # lists the Linear layers there are


def test_excluding_every_match_says_so():
    with pytest.raises(ValueError, match="exclude_modules"):
        adapters.attach_adapters(Nested(), adapters.LoraConfig(r=2, target_modules=["query"],
                                                               exclude_modules=r"encoder\..*"))


def test_a_matched_module_that_is_not_linear_raises_naming_pattern_module_and_type():
    with pytest.raises(TypeError, match=r"\('norm',\).*'encoder\.norm', a LayerNorm"):
        adapters.attach_adapters(Nested(), adapters.LoraConfig(r=2, target_modules=["norm"]))
    with pytest.raises(TypeError, match=r"'decoder\.1', a Tanh"):
        adapters.attach_adapters(Nested(), adapters.LoraConfig(r=2, target_modules=r"decoder\.\d"))
    with pytest.raises(TypeError, match="CausalSelfAttention"):
        adapters.attach_adapters(tiny_lm(), adapters.LoraConfig(r=2, target_modules=["attn"]))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        adapters.LoraConfig(target_modules="blocks.(")
    with pytest.raises(ValueError, match="must not be empty"):
        adapters.LoraConfig(target_modules=[])
    with pytest.raises(TypeError, match="target_modules is required"):
        adapters.LoraConfig(target_modules=None)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        adapters.LoraConfig(target_modules=["0"], r=0)
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0.0, 1.0\)"):
        adapters.LoraConfig(target_modules=["0"], dropout=1.0)
    with pytest.raises(TypeError, match="adapter kind's config"):
        adapters.attach_adapters(tiny_mlp(), adapters.AdapterConfig(target_modules=["0"]))


def test_a_rank_larger_than_the_layer_allows_raises_naming_layer_and_shape():
    with pytest.raises(ValueError, match=r"r=9 is larger than layer '0' allows: its weight is 12 x 8"):
        adapters.attach_adapters(tiny_mlp(), adapters.LoraConfig(r=9, target_modules=["0", "2"]))
    # validation happens before anything changes
    model = tiny_mlp()
    with pytest.raises(ValueError):
        adapters.attach_adapters_(model, adapters.LoraConfig(r=9, target_modules=["0", "2"]))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Attaching: copy vs in place, freezing, one adapter per model
# ----------------------------------------------------------------------------------------------------------------


def test_attach_adapters_leaves_the_model_untouched_and_attach_adapters_underscore_adapts_it_in_place():
    model = tiny_mlp()
    before = snapshot(model)
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert adapted.base_model is not model and isinstance(adapted.base_model[0], adapters.LoraLinear)

    adapted_ = adapters.attach_adapters_(model, adapters.LoraConfig(r=2, target_modules=["0"]))
    assert adapted_.base_model is model
    assert isinstance(model[0], adapters.LoraLinear) and model[0].base_layer.weight.data_ptr() == \
        adapted_.base_model[0].base_layer.weight.data_ptr()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_only_adapter_parameters_require_grad_and_base_parameters_never_get_gradients():
    adapted = adapters.attach_adapters(tiny_lm(), adapters.LoraConfig(r=2, target_modules=["qkv", "fc"]))
    randomize_(adapted)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.blocks.{i}.{m}.lora_{f}" for i in (0, 1) for m in ("attn.qkv", "ffn.fc")
                         for f in "AB"}
    out = adapted(tokens(), tokens(2))
    out.loss.backward()
    for name, param in adapted.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_one_adapter_per_model():
    model = tiny_mlp()
    adapted = adapters.attach_adapters_(model, adapters.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="already has a LoraLinear adapter"):
        adapters.attach_adapters_(model, adapters.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="already an AdaptedModel"):
        adapters.attach_adapters(adapted, adapters.LoraConfig(r=2, target_modules=["2"]))
    # modules inside a wrapper are never matched
    assert adapters.match_modules(model, r".*") == ["0", "1", "2"]


def test_a_reused_module_is_refused():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    with pytest.raises(ValueError, match="reused"):
        adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["0"]))


def test_adapted_model_forwards_attributes_but_not_ledger_hooks():
    adapted = adapters.attach_adapters(tiny_lm(), adapters.LoraConfig(r=2, target_modules=["qkv"]))
    assert adapted.config.seq_len == 8
    assert not hasattr(adapted, "ledger_counts")
    out = models.generate(adapted, tokens()[:, :2], max_new_tokens=3, temperature=0)
    assert out.shape == (3, 5)


# ----------------------------------------------------------------------------------------------------------------
# LoRA against the update written out by hand
# ----------------------------------------------------------------------------------------------------------------


def test_lora_starts_equal_to_the_base_model():
    model = tiny_lm()
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=r".*(qkv|proj|fc)"))
    assert torch.equal(adapted(tokens()).logits, model(tokens()).logits)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_is_base_plus_scaled_b_a_x(rslora):
    model = tiny_mlp()
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=3, alpha=5.0, use_rslora=rslora,
                                                                  target_modules=["0"]))
    randomize_(adapted)
    layer = adapted.base_model[0]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    scale = 5.0 / (3**0.5 if rslora else 3)
    # y = W0 x + b + (alpha / r) B A x, row by row
    expected = torch.stack([model[0].weight @ xi + model[0].bias + scale * (layer.lora_B @ (layer.lora_A @ xi))
                            for xi in x])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), scale * layer.lora_B @ layer.lora_A)
    assert layer.lora_A.shape == (3, 8) and layer.lora_B.shape == (12, 3)


def test_lora_dropout_applies_to_the_adapter_input_in_training_only():
    adapted = adapters.attach_adapters(tiny_mlp(), adapters.LoraConfig(r=2, dropout=0.5, target_modules=["0"]))
    randomize_(adapted)
    layer = adapted.base_model[0]
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T)
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    torch.manual_seed(0)
    mask_input = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(noisy, layer.base_layer(x) + layer.scaling * mask_input @ layer.lora_A.T @
                               layer.lora_B.T)


# ----------------------------------------------------------------------------------------------------------------
# Merge / unmerge
# ----------------------------------------------------------------------------------------------------------------


def test_merge_then_unmerge_restores_the_weights_and_merged_forward_equals_unmerged():
    adapted = adapters.attach_adapters(tiny_lm(), adapters.LoraConfig(r=2, target_modules=["qkv", "proj", "fc"]))
    randomize_(adapted)
    before = snapshot(adapted)
    x = tokens()
    unmerged = adapted(x).logits
    adapters.merge_adapters_(adapted)
    for name, layer in adapted.adapted_layers.items():
        assert layer.merged
        torch.testing.assert_close(layer.base_layer.weight, before[f"base_model.{name}.base_layer.weight"] +
                                   layer.scaling * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(adapted(x).logits, unmerged, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        adapters.merge_adapters_(adapted)
    adapters.unmerge_adapters_(adapted)
    for key, value in adapted.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        adapters.unmerge_adapters_(adapted)


def test_unmerge_subtracts_what_merge_added_even_if_the_adapter_changed():
    adapted = adapters.attach_adapters(tiny_mlp(), adapters.LoraConfig(r=2, target_modules=["0", "2"]))
    randomize_(adapted)
    before = snapshot(adapted)
    adapters.merge_adapters_(adapted)
    randomize_(adapted, seed=9)
    adapters.unmerge_adapters_(adapted)
    for name in ("0", "2"):
        key = f"base_model.{name}.base_layer.weight"
        torch.testing.assert_close(adapted.state_dict()[key], before[key], rtol=0, atol=1e-6)


def test_merging_into_a_tied_weight_is_refused():
    adapted = adapters.attach_adapters(tiny_lm(), adapters.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"tied to \['base_model\.token_embedding\.weight'\]"):
        adapters.merge_adapters_(adapted)
    assert not adapted.adapted_layers["lm_head"].merged


def test_training_while_merged_warns():
    adapted = adapters.attach_adapters(tiny_mlp(), adapters.LoraConfig(r=2, target_modules=["0"]))
    adapters.merge_adapters_(adapted)
    adapted.train()
    with pytest.warns(UserWarning, match="merged adapter"):
        adapted(torch.randn(2, 8))


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = tiny_lm()
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["qkv", "ffn.proj"]))
    randomize_(adapted)
    plain = adapters.merge_and_unload(adapted)
    assert not adapters.adapted_layers(plain) and isinstance(plain.blocks[0].attn.qkv, nn.Linear)
    assert all(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(tokens()).logits, adapted(tokens()).logits, rtol=1e-5, atol=1e-6)
    assert not any(layer.merged for layer in adapted.adapted_layers.values())
    assert set(plain.state_dict()) == set(model.state_dict())


def test_disable_adapters_gives_the_base_outputs_merged_or_not():
    model = tiny_lm()
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["qkv", "fc"]))
    randomize_(adapted)
    base = model(tokens()).logits
    assert not torch.allclose(adapted(tokens()).logits, base)
    with adapted.disable_adapters():
        torch.testing.assert_close(adapted(tokens()).logits, base)
    adapters.merge_adapters_(adapted)
    with adapted.disable_adapters():
        torch.testing.assert_close(adapted(tokens()).logits, base, rtol=1e-5, atol=1e-6)
    assert all(layer.enabled for layer in adapted.adapted_layers.values())


# ----------------------------------------------------------------------------------------------------------------
# Saving, loading, configs, ledger
# ----------------------------------------------------------------------------------------------------------------


def test_adapter_state_dict_holds_only_adapter_tensors_and_reloads_exactly():
    config = adapters.LoraConfig(r=2, target_modules=["qkv", "fc"])
    adapted = adapters.attach_adapters(tiny_lm(), config)
    randomize_(adapted)
    state = adapters.adapter_state_dict(adapted)
    assert sorted(state) == sorted(f"base_model.blocks.{i}.{m}.lora_{f}" for i in (0, 1)
                                   for m in ("attn.qkv", "ffn.fc") for f in "AB")
    torch.manual_seed(123)
    fresh = adapters.attach_adapters(tiny_lm(), config)
    assert not torch.equal(fresh(tokens()).logits, adapted(tokens()).logits)
    adapters.load_adapter_state_dict_(fresh, state)
    assert torch.equal(fresh(tokens()).logits, adapted(tokens()).logits)
    with pytest.raises(KeyError, match="missing"):
        adapters.load_adapter_state_dict_(fresh, {k: v for k, v in state.items() if "blocks.0" not in k})


@pytest.mark.parametrize("config", [
    adapters.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], use_rslora=True),
    adapters.NolaConfig(r=2, num_basis=5, num_basis_b=3, target_modules=r"\d", seed=7),
    adapters.VBLoraConfig(r=2, num_vectors=6, vector_length=4, target_modules=["0"], exclude_modules=["2"]),
    adapters.MosConfig(r=2, equivalent_r=1, private_r=1, target_modules=["0"], pair_dissociation=False),
    adapters.CompacterConfig(r=1, phm_dim=2, target_modules=["0", "2"], shared_slow=False),
])
def test_configs_round_trip_through_json(config):
    raw = json.loads(json.dumps(config.to_dict()))
    assert raw["kind"] == config.kind
    assert adapters.config_from_dict(raw) == config


def test_the_ledger_counts_base_plus_adapter_without_warnings():
    model = tiny_lm()
    adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=2, target_modules=["qkv", "fc"]))
    base_row = ledger.ledger(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = ledger.ledger(adapted)
    # per layer r (in + out): qkv 8 -> 24, fc 8 -> 32, two blocks
    lora = 2 * (2 * (8 + 24) + 2 * (8 + 32))
    assert row.total == base_row.total + lora and row.stored == base_row.stored + lora
    assert row.trainable == lora
    assert row.flops_per_token == base_row.flops_per_token + 2 * lora
    only = adapters.adapter_ledger(adapted)
    assert (only.total, only.stored, only.trainable, only.flops_per_token) == (lora, lora, lora, 2 * lora)
    adapters.merge_adapters_(adapted)
    assert ledger.ledger(adapted).flops_per_token == base_row.flops_per_token
