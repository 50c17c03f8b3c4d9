"""WEMoE: uniform routing is task arithmetic; the batched per-sample forward equals a naive loop; router training
touches only the routers and lowers the entropy; bad task vectors are rejected."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lablib import ledger, merging
from lablib.merging.wemoe import WeightEnsemblingMoE, train_wemoe_router, wemoe, wemoe_modules
from lablib.models import MLPClassifier, TinyTransformer, TransformerConfig
from lablib.moe.routers import TopKRouter


def _perturbed(model: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def _tiny() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(TransformerConfig(vocab_size=17, d_model=8, n_layers=2, n_heads=2, seq_len=6))


def test_uniform_routing_is_task_arithmetic_transformer():
    base = _tiny()
    experts = [_perturbed(base, s) for s in (1, 2, 3)]
    model = wemoe(base, experts, lambda_=0.4)
    assert wemoe_modules(base) == ["blocks.0.ffn", "blocks.1.ffn"]
    assert all(isinstance(model.get_submodule(n), WeightEnsemblingMoE) for n in wemoe_modules(base))
    assert isinstance(model.blocks[0].ffn.router, TopKRouter)
    reference = copy.deepcopy(base)
    reference.load_state_dict(merging.task_arithmetic(base.state_dict(), [e.state_dict() for e in experts],
                                                      lambda_=0.4))
    idx = torch.randint(0, 17, (5, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(idx).logits, reference(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    routing = model.blocks[0].ffn.last_routing
    torch.testing.assert_close(routing, torch.full((5, 3), 1 / 3))


def test_per_sample_forward_matches_naive_loop():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
    taus = [{n: torch.randn_like(p) for n, p in mlp.named_parameters()} for _ in range(2)]
    moe = WeightEnsemblingMoE(module=mlp, task_vectors=taus, lambda_=0.7)
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.randn(2, 4))
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        got = moe(x)
    for b in range(3):
        # p = mean over tokens of softmax(x W_gᵀ); θ = θ_0 + λ T Σ p_t τ_t
        p = torch.softmax(x[b] @ moe.router.gate.weight.T, dim=-1).mean(dim=0)
        merged = copy.deepcopy(mlp)
        with torch.no_grad():
            for n, param in merged.named_parameters():
                param.add_(sum(0.7 * 2 * p[t] * taus[t][n] for t in range(2)))
            torch.testing.assert_close(got[b], merged(x[b]), rtol=1e-5, atol=1e-5)
    # 2-D inputs: one token per sample (an MLPClassifier hidden layer)
    with torch.no_grad():
        assert moe(torch.randn(7, 4)).shape == (7, 4)


def test_router_training_changes_only_routers_and_lowers_entropy():
    torch.manual_seed(0)
    base = MLPClassifier(in_features=6, hidden_sizes=[12], num_classes=4)
    experts = [_perturbed(base, s, 0.5) for s in (1, 2)]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = wemoe(base, experts, lambda_=0.5, moe_modules=["layers.0", "layers.1"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "router" not in k}
    batches = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    record = train_wemoe_router(model, batches, steps=60, lr=0.05)
    assert record.losses[-1] < record.losses[0] - 1e-3
    assert set(record.mean_routing) == {"layers.0", "layers.1"}
    for k, v in model.state_dict().items():
        if "router" not in k:
            assert torch.equal(v, frozen[k]), k
    assert model.layers[0].router.gate.weight.abs().sum() > 0
    assert all(torch.equal(base.state_dict()[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.layers[0].router.parameters())


def test_ledger_counts():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    taus = [{n: torch.zeros_like(p) for n, p in mlp.named_parameters()} for _ in range(3)]
    moe = WeightEnsemblingMoE(module=mlp, task_vectors=taus)
    counts = moe.ledger_counts()
    p = 4 * 6 + 6 + 6 * 4 + 4
    assert counts.total == 3 * 4 + 4 * p
    assert counts.active_per_token == 12 + p
    assert counts.flops_per_token == 2 * 12 + 2 * 48
    row = ledger.ledger(moe)
    assert (row.total, row.trainable) == (counts.total, 12)


def test_bad_inputs():
    mlp = nn.Linear(3, 3)
    good = {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="missing keys"):
        WeightEnsemblingMoE(module=mlp, task_vectors=[{"weight": torch.zeros(3, 3)}])
    with pytest.raises(ValueError, match="'bias'.*shape"):
        WeightEnsemblingMoE(module=mlp, task_vectors=[good, {"weight": torch.zeros(3, 3), "bias": torch.zeros(4)}])
    with pytest.raises(ValueError, match="non-empty"):
        WeightEnsemblingMoE(module=mlp, task_vectors=[])
    with pytest.raises(ValueError, match="no submodule"):
        wemoe(mlp, [mlp], moe_modules=["nope"])
    with pytest.raises(ValueError, match="ffn"):
        wemoe(mlp, [mlp])
    moe = WeightEnsemblingMoE(module=mlp, task_vectors=[good])
    with pytest.raises(ValueError, match="shape"):
        moe(torch.zeros(2, 2, 2, 3))
    with pytest.raises(ValueError, match="no WeightEnsemblingMoE"):
        train_wemoe_router(mlp, [torch.zeros(1, 3)])
