"""FISH, grafting, PERP and lottery tickets: brute-force references and the invariants each method promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lablib import ledger, models
from lablib import sparse
from lablib.train import train


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 3)).to(dtype)


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


def examples(n: int, *, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32):
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(7), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 6, generator=gen, dtype=dtype)
        out.append((x, (x @ teacher).argmax(dim=1)))
    return out


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return model(x, y).loss


def token_batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 16, (4, 9), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# FISH
# ----------------------------------------------------------------------------------------------------------------


def brute_force_fisher(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Σ over examples of squared per-example gradients, one backward per example, through .grad."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        ce(model, batch).backward()
        for name, param in model.named_parameters():
            total[name] += param.grad.detach() ** 2
    model.zero_grad()
    return total


def test_fisher_diagonal_and_fish_mask_match_brute_force_top_k():
    model = tiny_mlp(dtype=torch.float64)
    batches = examples(12, dtype=torch.float64)
    reference = brute_force_fisher(tiny_mlp(dtype=torch.float64), batches)
    before = snapshot(model)
    fisher = sparse.fisher_diagonal(model, batches=batches, loss_fn=ce, num_batches=12)
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name] / 12)
    k = 17
    result = sparse.fish_mask(model, batches=batches, loss_fn=ce, num_batches=12, k=k)
    assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert result.mask.total_kept() == k
    flat = torch.cat([reference[n].reshape(-1) for n in reference])
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.argsort(descending=True, stable=True)[:k]] = True
    got = torch.cat([result.mask[n].reshape(-1) for n in reference])
    assert torch.equal(got, expected)
    assert result.ledger.trainable == k and result.ledger.total == ledger.ledger(model).total


def test_fish_density_budget_and_an_always_trained_head():
    model = tiny_mlp()
    total = sum(p.numel() for p in model.parameters())
    head = ["3.weight", "3.bias"]
    result = sparse.fish_mask(model, batches=examples(4), loss_fn=ce, num_batches=4, density=0.5,
                              always_train=head)
    assert result.mask.total_kept() == math.ceil(0.5 * total)
    assert bool(result.mask["3.weight"].all()) and bool(result.mask["3.bias"].all())
    with pytest.raises(ValueError, match="smaller than the always_train"):
        sparse.fish_mask(model, batches=examples(4), loss_fn=ce, num_batches=4, k=5, always_train=head)
    with pytest.raises(ValueError, match="exactly one of"):
        sparse.fish_mask(model, batches=examples(4), loss_fn=ce, num_batches=4)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sparse.fish_mask(model, batches=examples(4), loss_fn=ce, num_batches=4, density=0.0)


def test_fish_fine_tuning_changes_only_the_masked_entries_even_with_weight_decay():
    model = tiny_mlp()
    before = snapshot(model)
    fish = sparse.fish_mask(model, batches=examples(8), loss_fn=ce, num_batches=8, k=20)
    result = sparse.sparse_finetune(model, mask=fish.mask, batches=examples(30, seed=1, batch=8), loss_fn=ce,
                                    steps=30, lr=5e-2, weight_decay=0.5, progress=False)
    assert_same_state(model, before)
    changed = 0
    for name, param in result.model.named_parameters():
        moved = param.detach() != before[name]
        assert not bool(moved[~fish.mask[name]].any()), f"{name} changed outside the FISH mask"
        changed += int(moved.sum())
    assert 0 < changed <= 20
    assert result.trainable == 20 and result.ledger.trainable == 20
    assert list(result.model.state_dict()) == list(before)
    assert all(p.requires_grad for p in result.model.parameters())


def test_fish_on_a_tied_language_model_keeps_the_tie():
    model = tiny_lm()
    batches = token_batches(6)
    fish = sparse.fish_mask(model, batches=batches, loss_fn=lm_loss, num_batches=3, density=0.05)
    assert "lm_head.weight" not in fish.mask
    result = sparse.sparse_finetune(model, mask=fish.mask, batches=batches[3:], loss_fn=lm_loss, steps=3, lr=1e-2,
                                    progress=False)
    tuned = result.model
    assert tuned.lm_head.weight is tuned.token_embedding.weight
    for name, param in tuned.named_parameters():
        original = model.get_parameter(name).detach()
        assert torch.equal(param.detach()[~fish.mask[name]], original[~fish.mask[name]])


def test_sparse_finetune_rejects_an_empty_mask():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="keeps no entry"):
        sparse.sparse_finetune(model, mask=sparse.Mask({"0.weight": torch.zeros(10, 6, dtype=torch.bool)}),
                               batches=examples(2), loss_fn=ce, steps=1)


# ----------------------------------------------------------------------------------------------------------------
# Grafting
# ----------------------------------------------------------------------------------------------------------------


def fine_tuned_pair():
    base = tiny_mlp()
    tuned = tiny_mlp()
    train(tuned, batches=examples(40, seed=2, batch=16), loss_fn=ce, steps=40, lr=3e-2, progress=False)
    return base, tuned


def test_graft_fraction_one_is_the_fine_tuned_model_and_zero_is_the_base():
    base, tuned = fine_tuned_pair()
    base_state, tuned_state = snapshot(base), snapshot(tuned)
    full = sparse.graft(base, tuned, density=1.0)
    empty = sparse.graft(base, tuned, density=0.0)
    assert_same_state(base, base_state)
    assert_same_state(tuned, tuned_state)
    for key in tuned_state:
        assert torch.equal(full.state_dict[key], tuned_state[key])
        assert torch.equal(empty.state_dict[key], base_state[key])
    assert full.fraction == 1.0 and empty.fraction == 0.0 and empty.kept == 0


def test_graft_keeps_the_entries_that_moved_most():
    base = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([[1.0, 1.0], [1.0, 1.0]])}
    tuned = {"a": torch.tensor([0.5, -3.0, 0.1, 0.0]), "b": torch.tensor([[1.0, 2.0], [0.0, 1.2]])}
    result = sparse.graft(base, tuned, density=0.375)  # ⌈0.375 · 8⌉ = 3: |-3|, |+1|, |-1|
    assert result.mask["a"].tolist() == [False, True, False, False]
    assert result.mask["b"].tolist() == [[False, True], [True, False]]
    assert result.state_dict["a"].tolist() == [0.0, -3.0, 0.0, 0.0]
    assert result.state_dict["b"].tolist() == [[1.0, 2.0], [0.0, 1.0]]
    assert result.kept == 3 and result.considered == 8 and result.fraction == 3 / 8


def test_graft_of_a_tied_model_ranks_the_shared_tensor_once():
    base, tuned = tiny_lm(0), tiny_lm(1)
    result = sparse.graft(base, tuned, density=0.1)
    assert "lm_head.weight" not in result.mask
    assert result.considered == sum(p.numel() for p in base.parameters())
    assert result.state_dict["lm_head.weight"] is result.state_dict["token_embedding.weight"]
    grafted = tiny_lm(0)
    grafted.load_state_dict(result.state_dict)
    assert grafted.lm_head.weight is grafted.token_embedding.weight


def test_graft_errors():
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        sparse.graft({"a": torch.zeros(2)}, {"a": torch.ones(2)}, density=1.5)
    with pytest.raises(KeyError, match="only in finetuned"):
        sparse.graft({"a": torch.zeros(2)}, {"a": torch.ones(2), "b": torch.ones(1)}, density=0.5)
    with pytest.raises(ValueError, match="shape"):
        sparse.graft({"a": torch.zeros(2)}, {"a": torch.ones(3)}, density=0.5)


def test_graft_relaxation_gradient_matches_the_closed_form():
    base, tuned = torch.randn(5, 4), torch.randn(5, 4)
    gamma0 = torch.rand(5, 4) > 0.7
    scores = torch.rand(5, 4)
    part = sparse.GraftParametrization(base=base, finetuned=tuned, gamma0=gamma0, scores=scores, sigmoid_bias=2.0)
    # γ(S) ≈ γ0 when σ(S - b) is small; exactly γ0 rounded
    assert torch.equal(part.gamma() > 0.5, gamma0)
    upstream = torch.randn(5, 4)
    (part(torch.zeros(5, 4)) * upstream).sum().backward()
    g0 = gamma0.float()
    sig = torch.sigmoid(scores - 2.0)
    # ∇_S = ∂L/∂θ ⊙ (θ_ft - θ_base) ⊙ (1 - 2γ0) ⊙ σ'(S - b)
    expected = upstream * (tuned - base) * (1 - 2 * g0) * sig * (1 - sig)
    torch.testing.assert_close(part.scores.grad, expected)


def test_learned_graft_starts_from_the_baseline_and_never_scores_worse():
    base, tuned = fine_tuned_pair()
    before = snapshot(base)
    baseline = sparse.graft(base, tuned, density=0.05)
    frozen = sparse.learned_graft(tiny_mlp(), base=base, finetuned=tuned, batches=examples(4, batch=16),
                                  loss_fn=ce, density=0.05, epochs=1, lr=0.0)
    assert frozen.mask == baseline.mask
    moved = sparse.learned_graft(tiny_mlp(), base=base, finetuned=tuned, batches=examples(6, batch=16),
                                 loss_fn=ce, density=0.05, epochs=2, lr=1e5)
    assert_same_state(base, before)
    assert [h["epoch"] for h in moved.history] == [0, 1, 2]
    assert moved.history[0]["fraction"] == baseline.fraction
    assert max(h["score"] for h in moved.history) >= moved.history[0]["score"]
    assert 0 < moved.fraction < 1


# ----------------------------------------------------------------------------------------------------------------
# PERP and lottery tickets
# ----------------------------------------------------------------------------------------------------------------


def test_perp_retrains_only_biases_and_norms_and_keeps_the_zero_pattern():
    model = tiny_mlp()
    before = snapshot(model)
    pruned = sparse.magnitude_mask(model, density=0.3)
    result = sparse.perp_retrain(model, mask=pruned.mask, batches=examples(20, batch=16), loss_fn=ce, steps=20,
                                 lr=3e-2, progress=False)
    assert_same_state(model, before)
    assert sparse.norm_and_bias_names(model) == ["0.bias", "1.weight", "1.bias", "3.bias"]
    for name, param in result.model.named_parameters():
        value = param.detach()
        if name in pruned.mask:
            assert torch.equal(value, before[name] * pruned.mask[name]), name
        else:
            assert not torch.equal(value, before[name]), f"{name} should have been retrained"
    assert sparse.Mask.from_nonzero(result.model) == pruned.mask
    assert result.trainable == 10 + 10 + 10 + 3
    assert result.ledger.trainable == 33
    assert result.ledger.stored == ledger.ledger(model).stored - (pruned.stats.total_numel - pruned.stats.total_kept)


def test_perp_refuses_to_retrain_a_pruned_tensor():
    model = tiny_lm()
    with pytest.raises(ValueError, match="revive"):
        sparse.perp_retrain(model, mask=sparse.magnitude_mask(model, density=0.5).mask, batches=token_batches(2),
                            loss_fn=lm_loss, steps=1, train_head=True, head_names=["blocks.0.ffn.fc.weight"])
    with pytest.raises(ValueError, match="lm_head"):
        sparse.perp_retrain(tiny_mlp(), mask=sparse.magnitude_mask(tiny_mlp(), density=0.5).mask,
                            batches=examples(2), loss_fn=ce, steps=1, train_head=True)


def test_lottery_ticket_rounds_nest_masks_and_follow_the_density_schedule():
    model = tiny_mlp()
    before = snapshot(model)
    batches = examples(12, batch=16)
    result = sparse.lottery_ticket(model, batches=batches, loss_fn=ce, steps=12, rounds=3, rate=0.2,
                                   rewind_step=2, lr=3e-2, progress=False,
                                   eval_fn=lambda m: {"loss": float(ce(m, batches[0]))})
    assert_same_state(model, before)
    total = 6 * 10 + 10 * 3
    kept = [total]
    for _ in range(3):
        kept.append(math.ceil(0.8 * kept[-1] - 1e-9))
    assert [r.kept for r in result.rounds] == kept
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert abs(result.rounds[-1].density - 0.8 ** 3) < 0.02
    for outer, inner in zip(result.masks, result.masks[1:]):
        assert (inner & outer) == inner  # nested: every kept entry was kept the round before
    assert sparse.Mask.from_nonzero(result.model) == result.mask
    assert all("loss" in r.final for r in result.rounds)
    assert len(result.rewind_history.train_loss) == 2
    assert all(len(r.history.train_loss) == 10 for r in result.rounds)
    assert result.ledger.stored == ledger.ledger(model).stored - (total - result.mask.total_kept())


def test_lottery_ticket_without_rewind_steps_rewinds_to_the_initialisation():
    model = tiny_mlp()
    result = sparse.lottery_ticket(model, batches=lambda: iter(examples(4, batch=8)), loss_fn=ce, steps=4,
                                   rounds=1, rate=0.5, progress=False)
    assert result.rewind_history is None
    for key, value in model.state_dict().items():
        assert torch.equal(result.rewind_state[key], value)
    assert result.mask.total_kept() == math.ceil(0.5 * 90)


@pytest.mark.parametrize("kwargs, match", [
    ({"rate": 1.0}, "rate"),
    ({"rate": 0.0}, "rate"),
    ({"rewind_step": 4}, "rewind_step"),
    ({"rounds": 0}, "rounds"),
])
def test_lottery_ticket_argument_errors(kwargs, match):
    arguments = {"batches": examples(4), "loss_fn": ce, "steps": 4, "rounds": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        sparse.lottery_ticket(tiny_mlp(), **arguments)
