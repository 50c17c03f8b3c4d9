"""lablib.adapters LoRA against PEFT's LoRA on the same base weights and adapter values: forward outputs and merged
weights (skipped when peft is not installed; it is not in the project's lock)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lablib import adapters

peft = pytest.importorskip("peft")


def base_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (3, 5)])
def test_lora_matches_peft_forward_and_merged_weights(r, alpha, rslora):
    base = base_model().eval()
    ours = adapters.attach_adapters(base, adapters.LoraConfig(r=r, alpha=alpha, use_rslora=rslora,
                                                              target_modules=["0", "2"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, target_modules=["0", "2"]))
    theirs.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in ours.adapted_layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            a = torch.randn(layer.lora_A.shape, generator=gen)
            b = torch.randn(layer.lora_B.shape, generator=gen)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
    x = torch.randn(6, 8, generator=gen)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    for name, layer in ours.adapted_layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"))
    merged_ours = adapters.merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for key, value in merged_theirs.state_dict().items():
        torch.testing.assert_close(merged_ours.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_ours(x), merged_theirs(x), rtol=1e-6, atol=1e-6)


def test_lora_trainable_parameters_match_peft():
    base = base_model()
    ours = adapters.attach_adapters(base, adapters.LoraConfig(r=4, target_modules=["0", "2"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["0", "2"]))
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert adapters.adapter_ledger(ours).trainable == trainable == 4 * (8 + 12) + 4 * (12 + 4)
