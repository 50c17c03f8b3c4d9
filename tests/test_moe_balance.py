"""Balancing: the load-balancing loss and z-loss against hand-worked values and their formulas, and the
auxiliary-loss-free bias (its update rule, and that it really evens out a skewed load)."""

from __future__ import annotations

import math

import pytest
import torch

from lablib import models, moe
from lablib.data import lm_batches
from lablib.moe import (
    ExpertBias,
    MoELayer,
    load_balancing_loss,
    load_imbalance,
    lm_loss_with_bias_update,
    router_entropy,
    router_z_loss,
    update_expert_biases,
)
from lablib.train import train


# ----------------------------------------------------------------------------------------------------------------
# Load-balancing loss
# ----------------------------------------------------------------------------------------------------------------


def test_load_balancing_loss_hand_worked_example():
    # 4 tokens, 2 experts, top-1: choices 0, 0, 1, 0 -> f = (3/4, 1/4)
    # P = column means of the probabilities = (0.65, 0.35)
    # L = E · Σ f P = 2 · (0.75 · 0.65 + 0.25 · 0.35) = 2 · 0.575 = 1.15
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    indices = torch.tensor([[0], [0], [1], [0]])
    assert float(load_balancing_loss(probs, indices)) == pytest.approx(1.15)
    # top-2 over 3 experts: choices {0,1}, {0,2} -> f = (2, 1, 1) / 4; P = (0.5, 0.3, 0.2)
    # L = 3 · (0.5·0.5 + 0.25·0.3 + 0.25·0.2) = 3 · 0.375 = 1.125
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    indices = torch.tensor([[0, 1], [0, 2]])
    assert float(load_balancing_loss(probs, indices)) == pytest.approx(1.125)
    # a mask drops slots from f (expert choice): only (t0, e1) and (t1, e0) count -> f = (1/2, 1/2, 0)
    # L = 3 · (0.5·0.5 + 0.5·0.3) = 1.2
    full = torch.tensor([[0, 1, 2], [0, 1, 2]])
    mask = torch.tensor([[False, True, False], [True, False, False]])
    assert float(load_balancing_loss(probs, full, mask=mask)) == pytest.approx(1.2)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balancing_loss_is_one_at_perfect_balance_for_any_k(k):
    E, N = 4, 8
    probs = torch.full((N, E), 1.0 / E)
    # token t picks experts t, t+1, ... (mod E): every expert chosen equally often
    indices = (torch.arange(N).unsqueeze(1) + torch.arange(k)) % E
    assert float(load_balancing_loss(probs, indices)) == pytest.approx(1.0)
    # all tokens on one expert with confident probabilities: the loss approaches E
    skewed = torch.zeros(N, E)
    skewed[:, 0] = 1.0
    assert float(load_balancing_loss(skewed, torch.zeros(N, 1, dtype=torch.long))) == pytest.approx(E)


def test_load_balancing_gradient_flows_only_through_the_mean_probability():
    E, N = 3, 5
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = logits.softmax(-1)
    probs.retain_grad()
    indices = torch.tensor([[0], [0], [1], [2], [0]])
    load_balancing_loss(probs, indices).backward()
    f = torch.tensor([3.0, 1.0, 1.0]) / 5
    # ∂L/∂p_{t,e} = E · f_e / N for every token
    torch.testing.assert_close(probs.grad, (E * f / N).expand(N, E))
    # relabelling the experts leaves the loss unchanged
    perm = torch.tensor([2, 0, 1])
    inverse = torch.argsort(perm)
    p = probs.detach()
    torch.testing.assert_close(load_balancing_loss(p[:, perm], inverse[indices]), load_balancing_loss(p, indices))


def test_load_balancing_loss_errors():
    with pytest.raises(ValueError, match=r"probs must have shape \(num_tokens, num_experts\)"):
        load_balancing_loss(torch.ones(3), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must have shape \(3, k\)"):
        load_balancing_loss(torch.ones(3, 2), torch.zeros(2, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# z-loss and entropy
# ----------------------------------------------------------------------------------------------------------------


def test_z_loss_equals_its_formula():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    by_hand = sum(math.log(sum(math.exp(float(z)) for z in row)) ** 2 for row in logits) / 6
    assert float(router_z_loss(logits)) == pytest.approx(by_hand, rel=1e-12)
    # zero logits: (log E)²
    assert float(router_z_loss(torch.zeros(3, 8))) == pytest.approx(math.log(8) ** 2, rel=1e-6)
    # not shift-invariant: that is what it penalises
    assert float(router_z_loss(logits + 5)) > float(router_z_loss(logits))
    # low-precision logits are promoted before the logsumexp
    assert router_z_loss(torch.zeros(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_router_entropy():
    assert float(router_entropy(torch.full((5, 4), 0.25))) == pytest.approx(math.log(4))
    assert float(router_entropy(torch.eye(4))) == 0.0


def test_load_imbalance():
    assert load_imbalance(torch.tensor([3, 3, 3, 3])) == 1.0
    assert load_imbalance(torch.tensor([8, 0, 0, 0])) == 4.0
    with pytest.raises(ValueError, match="sums to 0"):
        load_imbalance(torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing
# ----------------------------------------------------------------------------------------------------------------


def test_expert_bias_update_rule():
    bias = ExpertBias(num_experts=4, bias_update_rate=0.01)
    assert torch.equal(bias.bias, torch.zeros(4)) and bias.bias.dtype == torch.float32
    step = bias.update(torch.tensor([10, 2, 4, 4]))  # mean 5
    # overloaded expert 0 goes down, underloaded ones go up, by exactly the rate
    torch.testing.assert_close(step, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    torch.testing.assert_close(bias.bias, step)
    step = bias.update(torch.tensor([5, 5, 5, 5]))  # balanced: no change
    assert torch.equal(step, torch.zeros(4))
    assert not bias.bias.requires_grad and list(bias.parameters()) == []
    assert "bias" in bias.state_dict()
    # kept in float32 when the model goes to half precision
    assert bias.to(torch.bfloat16).bias.dtype == torch.float32
    with pytest.raises(ValueError, match=r"tokens_per_expert must have shape \(4,\), got \(3,\)"):
        bias.update(torch.ones(3))
    with pytest.raises(ValueError, match=r"bias_update_rate must be a finite number >= 0, got -0.1"):
        ExpertBias(num_experts=4, bias_update_rate=-0.1)


def skewed_batches(seed: int, *, steps: int, n: int = 128, d: int = 8, direction: torch.Tensor):
    """Token streams whose mean points along `direction`, so a router aligned with it overloads one expert."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (torch.randn(1, n, d, generator=g) + 3.0 * direction).float()


def routed_imbalance(layer: MoELayer, x: torch.Tensor) -> float:
    with torch.no_grad():
        return load_imbalance(layer(x).routed_per_expert)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_free_balancing_reduces_imbalance_on_a_skewed_stream(top_k):
    def build(rate: float) -> MoELayer:
        torch.manual_seed(0)
        layer = MoELayer(d_model=8, d_hidden=8, num_experts=4, top_k=top_k, bias_update_rate=rate).eval()
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 1.0)
        return layer

    balanced, control = build(0.02), build(0.0)
    direction = balanced.router.gate.weight[0].detach() / balanced.router.gate.weight[0].detach().norm()
    held_out = next(skewed_batches(99, steps=1, direction=direction))
    before = routed_imbalance(balanced, held_out)
    # the stream really is skewed towards expert 0 (the worst possible imbalance is E / k)
    assert before > {1: 2.0, 2: 1.8}[top_k]
    for x in skewed_batches(0, steps=150, direction=direction):
        for layer in (balanced, control):
            with torch.no_grad():
                out = layer(x)
            layer.update_bias(out.routed_per_expert)
    after = routed_imbalance(balanced, held_out)
    assert after < 1.5 and after < 0.75 * before
    assert routed_imbalance(control, held_out) == before  # rate 0: nothing moves
    # the favoured expert's bias went down, and every bias moved in whole steps of the rate
    assert int(balanced.expert_bias.bias.argmin()) == 0
    steps = balanced.expert_bias.bias / 0.02
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    # the combine weights still come from the unbiased probabilities
    with torch.no_grad():
        out = balanced(held_out)
    raw = out.probs.gather(-1, out.indices)
    expected = raw if top_k == 1 else raw / raw.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights, expected)


SMALL = models.TransformerConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=2, seq_len=8)


def test_bias_updates_through_the_training_loop():
    torch.manual_seed(0)
    factory = moe.moe_ffn_factory(num_experts=4, top_k=2, bias_update_rate=1e-2, router_aux_loss_coef=0.0)
    model = models.TinyTransformer(SMALL, ffn_factory=factory)
    tokens = torch.randint(0, 13, (400,), generator=torch.Generator().manual_seed(0))
    history = train(model, batches=lm_batches(tokens, batch_size=4, seq_len=8, seed=0),
                    loss_fn=lm_loss_with_bias_update, steps=5, progress=False)
    assert all(math.isfinite(v) for v in history.train_loss)
    for block in model.blocks:
        bias = block.ffn.expert_bias.bias
        assert bias.abs().sum() > 0
        steps = bias / 1e-2
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
        assert float(bias.abs().max()) <= 5 * 1e-2 + 1e-6
    # evaluation does not update; an explicit call with the model's output does
    model.eval()
    frozen = [block.ffn.expert_bias.bias.clone() for block in model.blocks]
    idx = tokens[:16].view(2, 8)
    with torch.no_grad():
        lm_loss_with_bias_update(model, (idx, idx))
    assert all(torch.equal(b, block.ffn.expert_bias.bias) for b, block in zip(frozen, model.blocks))
    steps = update_expert_biases(model, model(idx, idx))
    assert len(steps) == 2
    with pytest.raises(ValueError, match=r"need one layer output per block \(2\)"):
        update_expert_biases(model, [None])
    with pytest.raises(ValueError, match=r"needs a model with `.blocks`"):
        update_expert_biases(torch.nn.Linear(2, 2), [])
