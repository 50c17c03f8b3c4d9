"""Subspace training (θ = θ0 + P θ_d) checked against explicit, naive constructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard
from torch import nn

from lablib.intrinsic import FastfoodProjection, SubspaceModel, fwht


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def explicit_matrix(model: SubspaceModel) -> torch.Tensor:
    """P as a dense D x d matrix, read off by projecting each basis vector."""
    eye = torch.eye(model.dim)
    with torch.no_grad():
        return torch.stack([model.project(eye[i]) for i in range(model.dim)], dim=1)


@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=10_000))
@settings(max_examples=20, deadline=None)
def test_fwht_matches_hadamard_matrix(log_length, seed):
    length = 1 << log_length
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = x @ torch.tensor(hadamard(length), dtype=torch.float64)
    torch.testing.assert_close(fwht(x), expected)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(6))


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_zero_theta_d_reproduces_the_initial_model(projection):
    base = small_mlp()
    wrapped = SubspaceModel(base, dim=4, projection=projection, seed=3)
    x = torch.randn(8, 5)
    torch.testing.assert_close(wrapped(x), base(x))


def test_dense_basis_vectors_have_unit_norm_over_the_whole_model():
    wrapped = SubspaceModel(small_mlp(), dim=6, projection="dense", seed=1)
    norms = explicit_matrix(wrapped).norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(6))


def test_fastfood_matches_naive_matrix_and_has_unit_columns_when_D_is_a_power_of_two():
    full_dim, dim = 16, 5
    proj = FastfoodProjection(full_dim=full_dim, dim=dim, seed=7)
    h = torch.tensor(hadamard(16), dtype=torch.float32)
    perm = torch.eye(16)[proj.perm]  # (Π x)_i = x_{perm[i]}
    naive = proj.scale * (h @ torch.diag(proj.gauss) @ perm @ h @ torch.diag(proj.signs))
    theta = torch.randn(dim)
    expected = naive[:, :dim] @ theta
    torch.testing.assert_close(proj(theta), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive[:, :dim].norm(dim=0), torch.ones(dim), rtol=1e-5, atol=1e-5)


def test_fastfood_columns_are_close_to_unit_norm_when_truncated():
    wrapped = SubspaceModel(small_mlp(), dim=10, projection="fastfood", seed=2)  # D = 66, L = 128
    norms = explicit_matrix(wrapped).norm(dim=0)
    assert 0.6 < norms.mean().item() < 1.4


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_gradient_is_P_transpose_times_full_gradient(projection):
    """Chain rule against a naive reference: dL/dθ_d = Pᵀ dL/dθ."""
    base = small_mlp()
    wrapped = SubspaceModel(base, dim=5, projection=projection, seed=0)
    with torch.no_grad():
        wrapped.theta_d.copy_(torch.randn(5))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    nn.functional.cross_entropy(wrapped(x), y).backward()
    # naive: load θ into a plain copy, take the full gradient, project it back with the explicit P
    plain = wrapped.materialize()
    nn.functional.cross_entropy(plain(x), y).backward()
    full_grad = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    expected = explicit_matrix(wrapped).T @ full_grad
    torch.testing.assert_close(wrapped.theta_d.grad, expected, rtol=1e-4, atol=1e-6)


def test_only_theta_d_trains_and_the_users_module_is_untouched():
    base = small_mlp()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = SubspaceModel(base, dim=8, seed=0)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["theta_d"]
    opt = torch.optim.Adam(wrapped.parameters(), lr=0.1)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(wrapped(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), f"user module's {key} was modified"
    assert all(p.requires_grad for p in base.parameters())


def test_materialize_matches_the_wrapped_forward():
    wrapped = SubspaceModel(small_mlp(), dim=4, projection="fastfood", seed=5)
    with torch.no_grad():
        wrapped.theta_d.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
    x = torch.randn(4, 5)
    torch.testing.assert_close(wrapped.materialize()(x), wrapped(x))


def test_projection_is_reproducible_from_the_seed():
    a = SubspaceModel(small_mlp(), dim=3, seed=11)
    b = SubspaceModel(small_mlp(), dim=3, seed=11)
    c = SubspaceModel(small_mlp(), dim=3, seed=12)
    assert torch.equal(explicit_matrix(a), explicit_matrix(b))
    assert not torch.equal(explicit_matrix(a), explicit_matrix(c))
    assert "matrix" not in a.state_dict()  # regenerated from the seed, not stored


def test_ledger_counts_report_d_trainable_and_D_total():
    wrapped = SubspaceModel(small_mlp(), dim=4, seed=0)
    counts = wrapped.ledger_counts()
    assert counts.total == 5 * 7 + 7 + 7 * 3 + 3
    assert counts.trainable == counts.stored == 4
    assert counts.flops_per_token == 2 * (5 * 7 + 7 * 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0}, r"dim must be an int in \[1, 66\]"),
        ({"dim": 67}, r"dim must be an int in \[1, 66\]"),
        ({"dim": 2.5}, r"dim must be an int"),
        ({"dim": 3, "projection": "sparse"}, r"unknown projection 'sparse'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SubspaceModel(small_mlp(), **kwargs)


def test_module_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="no parameters"):
        SubspaceModel(nn.ReLU(), dim=1)


def test_float64_numpy_reference_for_dense_projection():
    """θ = θ0 + P θ_d computed by hand with numpy equals the module's flat parameters."""
    wrapped = SubspaceModel(small_mlp(), dim=3, seed=4)
    theta_d = np.array([0.3, -0.2, 1.5])
    with torch.no_grad():
        wrapped.theta_d.copy_(torch.tensor(theta_d, dtype=torch.float32))
        got = wrapped.flat_parameters().numpy()
    expected = wrapped.theta0.numpy() + explicit_matrix(wrapped).numpy() @ theta_d
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
