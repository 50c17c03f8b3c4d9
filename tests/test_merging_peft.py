"""lablib.merging against `peft.utils.merge_utils` on random tensors, same seeds and settings (skipped without peft).

PEFT's merge utilities are plain torch functions in one file, so the test loads that file on its own rather than
importing `peft` (whose package import pulls in transformers and takes seconds).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lablib import merging


def _load_peft_merge_utils():
    try:
        spec = importlib.util.find_spec("peft")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


peft_merge = _load_peft_merge_utils()
pytestmark = pytest.mark.skipif(peft_merge is None, reason="peft is not installed")

SHAPES = [(7,), (5, 6), (3, 4, 2)]


def task_tensors(seed: int, shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def lablib_merge(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, **params) -> torch.Tensor:
    # PEFT merges task tensors directly: a zero base makes θ_0 + τ_m = τ_m
    base = {"t": torch.zeros_like(tensors[0])}
    return merging.merge(method, base, [{"t": t} for t in tensors], weight=weights.tolist(), **params)["t"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deterministic_methods_match_peft_exactly(seed, shape):
    tensors = task_tensors(seed, shape)
    weights = torch.tensor([0.5, 1.0, 1.7])
    assert torch.equal(lablib_merge("task_arithmetic", tensors, weights), peft_merge.task_arithmetic(tensors, weights))
    for density in (0.3, 0.7):
        assert torch.equal(
            lablib_merge("magnitude_prune", tensors, weights, density=density),
            peft_merge.magnitude_prune(tensors, weights, density),
        )
        for sign_method in ("total", "frequency"):
            assert torch.equal(
                lablib_merge("ties", tensors, weights, density=density, majority_sign_method=sign_method),
                peft_merge.ties(tensors, weights, density, majority_sign_method=sign_method),
            )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_methods_match_peft_for_the_same_global_rng_state(seed, shape):
    tensors = task_tensors(seed, shape)
    weights = torch.tensor([1.2, 0.4, 1.0])
    for density in (0.2, 0.6):
        torch.manual_seed(100 + seed)
        reference = peft_merge.dare_linear(tensors, weights, density)
        torch.manual_seed(100 + seed)
        assert torch.equal(lablib_merge("dare_linear", tensors, weights, density=density, seed=None), reference)
        torch.manual_seed(200 + seed)
        reference = peft_merge.dare_ties(tensors, weights, density)
        torch.manual_seed(200 + seed)
        assert torch.equal(lablib_merge("dare_ties", tensors, weights, density=density, seed=None), reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_primitives_match_peft(seed):
    tensors = task_tensors(seed, (6, 5))
    for density in (0.0, 0.25, 0.8):
        for t in tensors:
            assert torch.equal(merging.prune(t, density=density, method="magnitude"),
                               peft_merge.prune(t, density, method="magnitude"))
            if density == 0:
                continue  # PEFT divides 0 by 0 there (NaN); lablib returns zeros
            torch.manual_seed(seed)
            reference = peft_merge.prune(t, density, method="random", rescale=True)
            torch.manual_seed(seed)
            assert torch.equal(merging.prune(t, density=density, method="random", rescale=True), reference)
    stacked = torch.stack([peft_merge.prune(t, 0.5, method="magnitude") for t in tensors])
    for method in ("total", "frequency"):
        mask = merging.calculate_majority_sign_mask(stacked, method=method)
        assert torch.equal(mask, peft_merge.calculate_majority_sign_mask(stacked, method=method))
        assert torch.equal(merging.disjoint_merge(stacked, mask), peft_merge.disjoint_merge(stacked, mask))


def test_the_mergekit_convention_differs_from_peft_only_with_unequal_weights():
    tensors = task_tensors(7, (50,))
    equal = torch.ones(3)
    assert torch.equal(
        lablib_merge("ties", tensors, equal, density=0.4, convention="mergekit"),
        peft_merge.ties(tensors, equal, 0.4),
    )
    unequal = torch.tensor([0.2, 1.0, 3.0])
    assert not torch.allclose(
        lablib_merge("ties", tensors, unequal, density=0.4, convention="mergekit"),
        peft_merge.ties(tensors, unequal, 0.4),
    )
