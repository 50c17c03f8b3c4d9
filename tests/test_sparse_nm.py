"""N:M masks (property tests), torch's semi-structured conversion, and MaskLLM-style learned N:M masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lablib import sparse


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------------------------------------------------------
# N:M by magnitude
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def nm_case(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    groups = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 10_000))
    return n, m, (*lead, groups * m), seed


@given(nm_case())
@settings(max_examples=60, deadline=None)
def test_every_group_of_m_along_the_last_dimension_keeps_exactly_n(case):
    n, m, shape, seed = case
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    keep = sparse.nm_mask_from_scores(scores, n=n, m=m)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    # groups are m consecutive entries of the last dimension: in row-major order, reshape(-1, m) lists them
    groups, kept = scores.reshape(-1, m), keep.reshape(-1, m)
    assert bool((kept.sum(dim=1) == n).all())
    for g in range(groups.shape[0]):
        if n < m:
            assert groups[g][kept[g]].min() >= groups[g][~kept[g]].max()
    assert sparse.is_nm_mask(keep, n=n, m=m)


@given(st.integers(2, 8), st.integers(1, 8), st.integers(0, 4), st.integers(1, 3), st.data())
@settings(max_examples=30, deadline=None)
def test_a_last_dimension_not_divisible_by_m_raises_naming_the_shape(m, n, groups, rows, data):
    n = min(n, m)
    remainder = data.draw(st.integers(1, m - 1))
    shape = (rows, groups * m + remainder)
    with pytest.raises(ValueError, match=rf"shape \({rows}, {shape[1]}\).*not divisible by {m}"):
        sparse.nm_mask_from_scores(torch.zeros(shape), n=n, m=m)


def test_groups_run_along_the_input_dimension_by_hand():
    scores = torch.tensor([[1.0, 2, 3, 4, 8, 7, 6, 5],
                           [4.0, 3, 2, 1, 5, 6, 7, 8]])
    keep = sparse.nm_mask_from_scores(scores, n=2, m=4)
    assert keep.int().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0],
                                   [1, 1, 0, 0, 0, 0, 1, 1]]
    assert sparse.is_nm_mask(keep, n=2, m=4)
    # a 2:4 mask along the columns (the output dimension) is not one along the inputs
    assert not sparse.is_nm_mask(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]).bool(),
                                 n=2, m=4)


@pytest.mark.parametrize("n, m, error", [(3, 2, ValueError), (0, 4, ValueError), (2, 0, ValueError),
                                         (2.0, 4, TypeError), (True, 4, TypeError)])
def test_bad_n_and_m_raise(n, m, error):
    with pytest.raises(error):
        sparse.nm_mask_from_scores(torch.zeros(2, 4), n=n, m=m)


def test_n_greater_than_m_names_both():
    with pytest.raises(ValueError, match=r"n=3 > m=2"):
        sparse.nm_patterns(n=3, m=2)


def test_nm_mask_on_a_model_names_the_tensor_that_does_not_divide():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6))
    before = snapshot(model)
    result = sparse.nm_mask(model, n=2, m=4)
    assert_same_state(model, before)
    assert result.ledger.stored == sum(p.numel() for p in model.parameters()) - (32 + 24) // 2
    assert result.stats.density == {"0.weight": 0.5, "2.weight": 0.5}
    assert all(sparse.is_nm_mask(t, n=2, m=4) for t in result.mask.values())
    with pytest.raises(ValueError, match=r"0.weight with shape \(4, 8\)"):
        sparse.nm_mask(model, n=1, m=3)


# ----------------------------------------------------------------------------------------------------------------
# torch semi-structured sparse tensors
# ----------------------------------------------------------------------------------------------------------------


def test_semi_structured_on_cpu_returns_the_masked_reference_and_says_why():
    weight = torch.randn(32, 64)
    mask = sparse.nm_mask_from_scores(weight.abs(), n=2, m=4)
    result = sparse.to_semi_structured(weight, mask=mask)
    assert not result.converted
    assert "CUDA" in result.reason and "reference" in result.reason
    assert torch.equal(result.weight, weight * mask)
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, result.weight), x @ (weight * mask).T)


def test_semi_structured_rejects_weights_that_are_not_2_4():
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        sparse.to_semi_structured(torch.ones(4, 8))
    with pytest.raises(ValueError, match="2-D"):
        sparse.to_semi_structured(torch.ones(8))
    with pytest.raises(ValueError, match=r"shape \(4, 6\)"):
        sparse.to_semi_structured(torch.zeros(4, 6))


def test_to_semi_structured_in_place_falls_back_to_masked_dense_on_cpu():
    model = nn.Sequential(nn.Linear(64, 32))
    mask = sparse.nm_mask(model, n=2, m=4).mask
    dense = model[0].weight.detach().clone()
    results = sparse.to_semi_structured_(model, mask=mask)
    assert not results["0.weight"].converted
    assert torch.equal(model[0].weight.detach(), dense * mask["0.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs an Ampere-or-newer CUDA GPU")
def test_semi_structured_on_cuda_matches_the_masked_dense_layer():
    weight = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    mask = sparse.nm_mask_from_scores(weight.abs(), n=2, m=4)
    result = sparse.to_semi_structured(weight, mask=mask)
    assert result.converted, result.reason
    torch.testing.assert_close(result.weight.to_dense(), weight * mask)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(F.linear(x, result.weight), F.linear(x, weight * mask), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# MaskLLM: candidate patterns, the Gumbel-softmax mask, learning
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(1, 1), (1, 4), (2, 4), (3, 4), (4, 4), (2, 8), (3, 6)])
def test_candidate_patterns_enumerate_exactly_m_choose_n_distinct_patterns(n, m):
    patterns = sparse.nm_patterns(n=n, m=m)
    assert patterns.shape == (math.comb(m, n), m)
    assert bool((patterns.sum(dim=1) == n).all())
    assert len({tuple(row.tolist()) for row in patterns}) == math.comb(m, n)


def test_two_four_patterns_in_the_documented_order():
    assert ["".join(str(int(v)) for v in row) for row in sparse.nm_patterns(n=2, m=4)] == [
        "1100", "1010", "1001", "0110", "0101", "0011"]


@given(st.integers(0, 10_000), st.floats(0.05, 5.0), st.floats(0.1, 100.0))
@settings(max_examples=25, deadline=None)
def test_soft_group_masks_sum_to_n_for_any_logits(seed, temperature, scale):
    gen = torch.Generator().manual_seed(seed)
    part = sparse.LearnedNMParametrization(logits=torch.randn(6, 6, generator=gen), n=2, m=4, shape=(3, 8))
    part.temperature, part.scale = temperature, scale
    for noise in (False, True):
        soft = part.soft_mask(noise=noise)
        assert soft.shape == (3, 8)
        torch.testing.assert_close(soft.reshape(-1, 4).sum(dim=1), torch.full((6,), 2.0))
        assert bool(((soft >= 0) & (soft <= 1 + 1e-6)).all())
    assert sparse.is_nm_mask(part.hard_mask(), n=2, m=4)


def test_noise_free_low_temperature_soft_mask_equals_the_hard_read_out():
    part = sparse.LearnedNMParametrization(logits=torch.randn(10, 6, generator=torch.Generator().manual_seed(3)),
                                           n=2, m=4, shape=(5, 8))
    part.temperature, part.scale = 1e-4, 1.0
    torch.testing.assert_close(part.soft_mask(noise=False), part.hard_mask().float())


def test_magnitude_prior_makes_the_initial_argmax_the_prior_pattern():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    prior = sparse.nm_mask_from_scores(weight.abs(), n=2, m=4)
    logits = sparse.prior_logits(prior, n=2, m=4, strength=50.0, generator=torch.Generator().manual_seed(1))
    part = sparse.LearnedNMParametrization(logits=logits, n=2, m=4, shape=(6, 16))
    assert torch.equal(part.hard_mask(), prior)


def misleading_regression(seed: int = 0, in_features: int = 16, out_features: int = 8):
    """y = x Wᵀ with input features on wildly different scales: small weights on large inputs matter more than large
    weights on tiny inputs, so magnitude N:M keeps the wrong entries. The best 2:4 mask here is Wanda's."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    scales = torch.exp(1.5 * torch.randn(in_features, generator=gen))
    model = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)

    def batches(count: int, data_seed: int):
        data_gen = torch.Generator().manual_seed(data_seed)
        out = []
        for _ in range(count):
            x = torch.randn(64, in_features, generator=data_gen) * scales
            out.append((x, x @ weight.T))
        return out

    return model, batches


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def test_learned_nm_mask_beats_magnitude_where_magnitude_is_misleading():
    model, make_batches = misleading_regression()
    train_batches, test_batches = make_batches(300, 1), make_batches(4, 2)
    before = snapshot(model)

    def test_loss(mask: sparse.Mask) -> float:
        pruned = mask.apply(model)
        with torch.no_grad():
            return sum(float(mse(pruned, b)) for b in test_batches) / len(test_batches)

    magnitude = sparse.nm_mask(model, n=2, m=4)
    learned = sparse.learned_nm_mask(model, batches=train_batches, loss_fn=mse, steps=300, n=2, m=4, seed=0,
                                     progress=False)
    assert_same_state(model, before)
    assert sparse.is_nm_mask(learned.mask["weight"], n=2, m=4)
    assert learned.method == "maskllm/2:4" and learned.stats.overall_density == 0.5
    assert learned.prior == magnitude.mask
    # it started at the magnitude mask (the prior) and moved away from it in most groups
    assert learned.prior_agreement < 0.5
    assert test_loss(learned.mask) < 0.5 * test_loss(magnitude.mask)
    # and it finds (nearly) the optimal mask, which for independent inputs is Wanda's
    wanda = sparse.wanda_mask(model, batches=train_batches, num_batches=8, n=2, m=4)
    assert test_loss(learned.mask) <= 1.05 * test_loss(wanda.mask)
    assert len(learned.history.train_loss) == 300
    assert learned.logits["weight"].shape == (32, 6)


def test_learned_nm_mask_argument_errors():
    model, make_batches = misleading_regression()
    batches = make_batches(2, 0)
    with pytest.raises(ValueError, match=r"n=5 > m=4"):
        sparse.learned_nm_mask(model, batches=batches, loss_fn=mse, steps=1, n=5, m=4)
    with pytest.raises(ValueError, match=r"shape \(8, 16\)"):
        sparse.learned_nm_mask(model, batches=batches, loss_fn=mse, steps=1, n=2, m=3)
    with pytest.raises(ValueError, match="temperature"):
        sparse.learned_nm_mask(model, batches=batches, loss_fn=mse, steps=1, temperature=(4.0, 0.0))
    with pytest.raises(ValueError, match="prior"):
        sparse.learned_nm_mask(model, batches=batches, loss_fn=mse, steps=1, prior="wanda")
    with pytest.raises(KeyError, match="nope"):
        sparse.learned_nm_mask(model, batches=batches, loss_fn=mse, steps=1, names=["nope"])
