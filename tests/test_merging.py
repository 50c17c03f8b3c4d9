"""lablib.merging: every method on hand-worked examples and invariants, the shared contract, the registry, the
mergekit YAML export and the FusionBench-style pool. Alignment, interpolation and Fisher estimation live in
test_merging_alignment.py; the comparison with PEFT in test_merging_peft.py."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # the YAML export needs no PyYAML; only reading it back in these tests does
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

from lablib import merging
from lablib.merging import (
    MERGE_METHODS,
    MergeAlgorithm,
    ModelPool,
    StateDictMismatchError,
    merge,
    to_mergekit_yaml,
)


needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")


def vec(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def random_state(seed: int, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 4, generator=g).to(dtype),
        "layer.bias": torch.randn(6, generator=g).to(dtype),
        "head.weight": torch.randn(3, 6, generator=g).to(dtype),
        "steps": torch.tensor(7),
    }


def finetuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for key, value in base.items():
        if value.is_floating_point():
            out[key] = (value.float() + scale * torch.randn(value.shape, generator=g)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def params_for(method: str, models: list[dict[str, torch.Tensor]]) -> dict:
    """Parameters every method accepts on the random fixtures (required ones filled in)."""
    if method == "fisher":
        return {"fishers": [{k: torch.rand(v.shape) + 0.1 for k, v in m.items() if v.is_floating_point()}
                            for m in models]}
    if method == "darex_q":
        return {"q": 0.5, "density": 0.3}
    return {}


# ---------------------------------------------------------------- the registry


def test_registry_holds_every_method_under_mergekit_style_names():
    expected = {"linear", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "darex_q",
                "fisher", "pcb", "iso_c", "iso_cts"}
    assert expected <= set(MERGE_METHODS)
    mergekit_names = {name for name, info in merging.METHOD_INFO.items() if info.in_mergekit}
    assert mergekit_names == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    for name, fn in MERGE_METHODS.items():
        assert fn.__doc__ and len(fn.__doc__) > 100, f"{name} needs a documented function"


def test_merge_dispatches_and_accepts_mergekit_and_fusionbench_aliases():
    base = random_state(0)
    models = [finetuned(base, i) for i in range(2)]
    direct = merging.task_arithmetic(base, models, lambda_=0.3)
    for alias in ("lambda_", "lambda", "scaling_factor"):
        via = merge("task_arithmetic", base, models, **{alias: 0.3})
        assert all(torch.equal(via[k], direct[k]) for k in direct)
    with pytest.raises(TypeError, match="given twice"):
        merge("task_arithmetic", base, models, lambda_=0.3, scaling_factor=0.3)
    with pytest.raises(TypeError, match="takes no parameter 'gamma'"):
        merge("ties", base, models, gamma=0.1)
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        merge("slerp", base, models)


def test_a_new_method_registers_in_one_decorator():
    @merging.merge_method("test_first_model", needs_base=False, reference="none")
    def first(base, models, /, *, exclude=()):
        """Return the first model (a test method)."""
        plan = merging.plan_merge(base, models, needs_base=False, exclude=exclude, method="test_first_model")
        return plan.finish({k: models[0][k].float() for k in plan.merge_keys})

    try:
        base = random_state(0)
        out = merge("test_first_model", None, [base, finetuned(base, 1)])
        assert all(torch.equal(out[k], base[k]) for k in base)
        assert merging.method_parameters("test_first_model") == {"exclude": ()}
        with pytest.raises(ValueError, match="already registered"):
            merging.merge_method("test_first_model", needs_base=False, reference="none")(lambda b, m: {})
    finally:
        MERGE_METHODS.pop("test_first_model")
        merging.METHOD_INFO.pop("test_first_model")


# ---------------------------------------------------------------- the shared contract


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_inputs_are_never_modified_and_outputs_share_no_memory(method):
    base = random_state(1)
    models = [finetuned(base, i) for i in range(3)]
    params = params_for(method, models)
    base_copy, models_copy = copy.deepcopy(base), copy.deepcopy(models)
    out = merge(method, base, models, **params)
    assert list(out) == list(base)
    for key in base:
        assert torch.equal(base[key], base_copy[key])
        for model, model_copy in zip(models, models_copy):
            assert torch.equal(model[key], model_copy[key])
    for value in out.values():
        value.add_(1)
    for key in base:
        assert torch.equal(base[key], base_copy[key])
        assert all(torch.equal(m[key], c[key]) for m, c in zip(models, models_copy))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_are_preserved_and_integer_buffers_copied(method, dtype):
    base = random_state(2, dtype=dtype)
    models = [finetuned(base, i) for i in range(2)]
    out = merge(method, base, models, **params_for(method, models))
    for key, value in base.items():
        assert out[key].dtype == value.dtype, key
        assert out[key].shape == value.shape
        assert torch.isfinite(out[key].float()).all(), key
    assert torch.equal(out["steps"], base["steps"])


def test_tied_tensors_are_merged_once_and_stay_tied():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(5, 4, generator=g)
    base = {"embed.weight": shared, "head.weight": shared, "bias": torch.randn(5, generator=g)}
    models = []
    for i in range(2):
        tied = shared + 0.1 * torch.randn(5, 4, generator=g)
        models.append({"embed.weight": tied, "head.weight": tied, "bias": base["bias"] + 0.1})
    out = merging.dare_linear(base, models, density=0.5, seed=0)
    assert out["embed.weight"] is out["head.weight"]
    plan = merging.plan_merge(base, models, needs_base=True)
    assert plan.aliases == {"head.weight": "embed.weight"} and "head.weight" not in plan.merge_keys


def test_exclude_copies_matching_keys_from_the_base():
    base = random_state(4)
    models = [finetuned(base, i) for i in range(2)]
    out = merging.ties(base, models, exclude=[r"^head\."])
    assert torch.equal(out["head.weight"], base["head.weight"])
    assert not torch.equal(out["layer.weight"], base["layer.weight"])
    with pytest.raises(ValueError, match="not a valid regex"):
        merging.ties(base, models, exclude=["("])


def test_mismatched_keys_shapes_and_dtypes_raise_naming_the_key():
    base = random_state(5)
    good = finetuned(base, 0)
    missing = {k: v for k, v in good.items() if k != "layer.bias"}
    with pytest.raises(StateDictMismatchError, match=r"models\[1\] has no key 'layer.bias'"):
        merging.ties(base, [good, missing])
    extra = {**good, "new.weight": torch.zeros(2)}
    with pytest.raises(StateDictMismatchError, match="has key 'new.weight', which base lacks"):
        merging.task_arithmetic(base, [extra])
    shape = {**good, "head.weight": torch.zeros(3, 7)}
    with pytest.raises(StateDictMismatchError, match=r"key 'head.weight': models\[0\] has shape \(3, 7\)"):
        merging.dare_ties(base, [shape])
    dtype = {**good, "layer.weight": good["layer.weight"].double()}
    with pytest.raises(StateDictMismatchError, match="key 'layer.weight': .*dtype torch.float64"):
        merging.linear(None, [good, dtype])
    with pytest.raises(TypeError, match=r"models\[0\]\['layer.bias'\] must be a torch.Tensor"):
        merging.linear(None, [{**good, "layer.bias": [1.0]}])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda b, m: merging.ties(None, m), ValueError, "ties needs a base"),
        (lambda b, m: merging.ties(b, []), ValueError, "at least one state dict"),
        (lambda b, m: merging.ties(b, {"a": m[0]}), TypeError, "run\\(pool\\)"),
        (lambda b, m: merging.ties(b, m, density=1.5), ValueError, r"density must be in \[0, 1\]"),
        (lambda b, m: merging.ties(b, m, weight=[1.0]), ValueError, "weight has 1 values but there are 2 models"),
        (lambda b, m: merging.ties(b, m, convention="fusionbench"), ValueError, "convention must be one of"),
        (lambda b, m: merging.ties(b, m, majority_sign_method="median"), ValueError, "majority_sign_method"),
        (lambda b, m: merging.dare_linear(b, m, q=0.0), ValueError, r"q must be in \(0, 1\]"),
        (lambda b, m: merging.dare_linear(b, m, q=0.5, rescale_norm="l1"), ValueError, "q .* rescale_norm"),
        (lambda b, m: merging.dare_linear(b, m, seed=-1), TypeError, "seed"),
        (lambda b, m: merging.task_arithmetic(b, m, lambda_=float("nan")), TypeError, "lambda_ must be a finite"),
        (lambda b, m: merging.iso_cts(b, m, common_space_fraction=2), ValueError, "common_space_fraction"),
        (lambda b, m: merging.pcb(b, m, balance="mine"), ValueError, "balance must be one of"),
        (lambda b, m: merging.fisher(None, m, fishers=[{}]), ValueError, "one Fisher state dict per model"),
    ],
)
def test_bad_parameters_raise_clear_errors(call, error, message):
    base = random_state(6)
    models = [finetuned(base, i) for i in range(2)]
    with pytest.raises(error, match=message):
        call(base, models)


# ---------------------------------------------------------------- averaging and task arithmetic


def test_averaging_identical_models_returns_the_model():
    model = random_state(7)
    out = merging.linear(None, [model, copy.deepcopy(model), copy.deepcopy(model)], weight=[1.0, 2.0, 3.0])
    for key in model:
        torch.testing.assert_close(out[key], model[key], rtol=1e-6, atol=1e-7)
    single = merging.linear(None, [model])
    assert all(torch.equal(single[k], model[k]) for k in model)


def test_linear_is_the_weighted_mean_and_normalize_off_is_the_sum():
    a, b = {"x": vec(1.0, 2.0)}, {"x": vec(3.0, -2.0)}
    assert torch.equal(merging.linear(None, [a, b], weight=[1.0, 3.0])["x"], vec(2.5, -1.0))
    assert torch.equal(merging.linear(None, [a, b], weight=[1.0, 3.0], normalize=False)["x"], vec(10.0, -4.0))


def test_task_arithmetic_lambda_zero_is_the_base_and_scales_linearly():
    base = random_state(8)
    models = [finetuned(base, i) for i in range(3)]
    zero = merging.task_arithmetic(base, models, lambda_=0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)
    one = merging.task_arithmetic(base, models[:1], lambda_=1.0)
    for key in base:
        torch.testing.assert_close(one[key], models[0][key])
    full = merging.task_arithmetic(base, models, lambda_=1.0)
    half = merging.task_arithmetic(base, models, lambda_=0.5)
    for key in ("layer.weight", "head.weight"):
        # θ(λ) − θ_0 = λ (θ(1) − θ_0)
        torch.testing.assert_close(half[key] - base[key], 0.5 * (full[key] - base[key]))
    # by hand: θ_0 + λ Σ w_t τ_t
    a = merging.task_arithmetic({"x": vec(1.0, 1.0)}, [{"x": vec(2.0, 0.0)}, {"x": vec(1.0, 3.0)}],
                                weight=[1.0, 0.5], lambda_=2.0)
    assert torch.equal(a["x"], vec(1.0 + 2.0 * (1.0 + 0.0), 1.0 + 2.0 * (-1.0 + 1.0)))


def test_task_vector_helpers_match_fusionbench_arithmetic():
    base = random_state(9)
    model = finetuned(base, 0)
    (tau,) = merging.task_vectors(base, [model])
    restored = merging.state_dict_add(base, merging.state_dict_mul({**base, **tau}, 1.0))
    for key in tau:
        torch.testing.assert_close(restored[key], base[key] + tau[key])
        torch.testing.assert_close(merging.state_dict_sub(model, base)[key], tau[key])
    assert "steps" not in tau


# ---------------------------------------------------------------- TIES, by hand

# Three task vectors of one 1-D tensor (the base is 0, so merged = λ τ_m).
T1 = (4.0, -1.0, 2.0, -3.0, 0.5)
T2 = (-2.0, 3.0, 1.0, 5.0, -0.2)
T3 = (3.0, -4.0, -6.0, 0.1, 2.0)
# trim to the top 3 of 5 (density 0.6):  τ̃1 = [4, 0, 2, -3, 0], τ̃2 = [-2, 3, 0, 5, 0], τ̃3 = [3, -4, -6, 0, 0]
# elect by total mass: sums [5, -1, -4, 2, 0] -> γ = [+, -, -, +, + (tie -> +)]
# disjoint mean: [mean(4, 3), -4, -6, 5, nothing] = [3.5, -4, -6, 5, 0]


def ties_1d(**params):
    base = {"x": torch.zeros(5)}
    models = [{"x": vec(*t)} for t in (T1, T2, T3)]
    return merging.ties(base, models, density=0.6, **params)["x"]


def test_ties_trim_elect_disjoint_mean_by_hand():
    assert torch.equal(ties_1d(), vec(3.5, -4.0, -6.0, 5.0, 0.0))
    assert torch.equal(ties_1d(lambda_=0.5), vec(1.75, -2.0, -3.0, 2.5, 0.0))
    # the intermediate steps, with PEFT's primitive names
    trimmed = torch.stack([merging.prune(vec(*t), density=0.6, method="magnitude") for t in (T1, T2, T3)])
    assert torch.equal(trimmed, torch.tensor([[4.0, 0, 2, -3, 0], [-2, 3, 0, 5, 0], [3, -4, -6, 0, 0]]))
    assert torch.equal(merging.elect_sign(trimmed), vec(1, -1, -1, 1, 1))
    mask = merging.calculate_majority_sign_mask(trimmed)
    assert mask.tolist() == [[True, False, False, False, False], [False, False, False, True, False],
                             [True, True, True, False, False]]
    assert torch.equal(merging.disjoint_merge(trimmed, mask), vec(3.5, -4.0, -6.0, 5.0, 0.0))


def test_ties_frequency_election_by_hand():
    # sign counts of τ̃: [+2-1, 0+1-1, +1-1, -1+1, 0] -> ties elect + -> [mean(4, 3), 3, 2, 5, 0]
    assert torch.equal(ties_1d(majority_sign_method="frequency"), vec(3.5, 3.0, 2.0, 5.0, 0.0))


def test_ties_conventions_differ_only_where_documented_by_hand():
    weight = [1.0, 2.0, 1.0]
    # PEFT: elect on unweighted τ̃ (γ as above), then mean of w_t τ̃_t over the agreeing models
    assert torch.equal(ties_1d(weight=weight, convention="peft"), vec(3.5, -4.0, -6.0, 10.0, 0.0))
    # mergekit: elect on w_t τ̃_t: sums [3, 2, -4, 7, 0] -> γ = [+, +, -, +, +]; divide by the agreeing weights:
    # [(4 + 3)/2, 6/2, -6/1, 10/2, 0]
    assert torch.equal(ties_1d(weight=weight, convention="mergekit"), vec(3.5, 3.0, -6.0, 5.0, 0.0))
    # official: the trim keeps |x| >= the 2nd smallest |x| (4 entries, one more than 0.6·5):
    # τ̃1 = [4, -1, 2, -3, 0], τ̃2 = [-2, 3, 1, 5, 0], τ̃3 = [3, -4, -6, 0, 2]; γ = [+, -, -, +, +]
    assert torch.equal(ties_1d(convention="official"), vec(3.5, -2.5, -6.0, 5.0, 2.0))
    # with equal weights PEFT and mergekit agree
    assert torch.equal(ties_1d(convention="mergekit"), ties_1d(convention="peft"))


def test_folding_lambda_into_weights_works_for_peft_but_cancels_for_mergekit():
    doubled = [2.0, 2.0, 2.0]
    assert torch.equal(ties_1d(weight=doubled, convention="peft"), ties_1d(lambda_=2.0))
    # mergekit's normalize divides by the agreeing weights: λw / Σλw = w / Σw
    assert torch.equal(ties_1d(weight=doubled, convention="mergekit"), ties_1d(convention="mergekit"))
    assert torch.equal(ties_1d(lambda_=2.0, convention="mergekit"), 2 * ties_1d(convention="mergekit"))


def test_ties_zero_sign_options_by_hand():
    base = {"x": torch.zeros(2)}
    models = [{"x": vec(2.0, -1.0)}, {"x": vec(-2.0, -1.0)}]
    # sums [0, -2]: "positive" elects + for the tie, "majority" the majority of the elected signs (−)
    assert torch.equal(merging.ties(base, models, density=1.0)["x"], vec(2.0, -1.0))
    assert torch.equal(merging.ties(base, models, density=1.0, zero_sign="majority")["x"], vec(-2.0, -1.0))


def test_ties_global_scope_trims_across_keys():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    models = [{"a": vec(5.0, 4.0), "b": vec(0.1, 0.2)}]
    # per tensor keeps the larger of each pair; globally the two largest of all four are both in "a"
    per_tensor = merging.ties(base, models, density=0.5)
    assert torch.equal(per_tensor["a"], vec(5.0, 0.0)) and torch.equal(per_tensor["b"], vec(0.0, 0.2))
    # official rule: keep |x| >= the (4 − 2)-th smallest = 0.2 -> 5, 4, 0.2
    scoped = merging.ties(base, models, density=0.5, scope="global")
    assert torch.equal(scoped["a"], vec(5.0, 4.0)) and torch.equal(scoped["b"], vec(0.0, 0.2))


def test_ties_with_one_model_and_no_trim_returns_it():
    base = random_state(10)
    model = finetuned(base, 0)
    out = merging.ties(base, [model], density=1.0)
    for key in base:
        torch.testing.assert_close(out[key], model[key])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), order=st.permutations([0, 1, 2]), density=st.sampled_from([0.2, 0.5, 1.0]))
def test_ties_invariants(seed, order, density):
    g = torch.Generator().manual_seed(seed)
    base = {"x": torch.zeros(40)}
    models = [{"x": torch.randn(40, generator=g)} for _ in range(3)]
    out = merging.ties(base, models, density=density)["x"]
    # task order does not matter
    shuffled = merging.ties(base, [models[i] for i in order], density=density)["x"]
    torch.testing.assert_close(shuffled, out)
    # every merged entry is 0 or has the elected sign, and is no larger than the largest trimmed entry
    trimmed = torch.stack([merging.prune(m["x"], density=density) if density < 1 else m["x"] for m in models])
    gamma = merging.elect_sign(trimmed)
    assert bool(((out == 0) | (out.sign() == gamma)).all())
    assert bool((out.abs() <= trimmed.abs().max(dim=0).values + 1e-6).all())
    # each trimmed row keeps exactly ⌊density·n⌋ entries
    if density < 1:
        assert all(int((row != 0).sum()) == int(density * 40) for row in trimmed)


# ---------------------------------------------------------------- DARE and DAREx-q


def test_dare_is_unbiased_over_many_seeds():
    g = torch.Generator().manual_seed(11)
    base = {"x": torch.randn(30, generator=g)}
    tau = torch.rand(30, generator=g) + 0.5
    model = {"x": base["x"] + tau}
    runs = 3000
    total = torch.zeros(30)
    for seed in range(runs):
        total += merging.dare_linear(base, [model], density=0.5, seed=seed)["x"] - base["x"]
    # each entry is τ·m/0.5 with m ~ Bernoulli(0.5): mean τ, standard deviation τ; the mean of 3000 lies within
    # 4.5σ/√3000 of τ
    torch.testing.assert_close(total / runs, tau, atol=4.5 * 1.5 / math.sqrt(runs), rtol=0)


def test_dare_keeps_about_density_entries_and_rescales_them():
    base = {"x": torch.zeros(10_000)}
    model = {"x": torch.ones(10_000)}
    out = merging.dare_linear(base, [model], density=0.2, seed=3)["x"]
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.2) < 0.02
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 5.0))


def test_dare_with_no_drop_is_the_identity():
    g = torch.Generator().manual_seed(12)
    tau = torch.randn(20, generator=g)
    with pytest.warns(UserWarning, match="no pruning"):
        same = merging.prune(tau, density=1.0, method="random", rescale=True)
    assert same is tau
    base = random_state(12)
    model = finetuned(base, 0)
    dare = merging.dare_linear(base, [model], density=1.0)
    plain = merging.task_arithmetic(base, [model])
    assert all(torch.equal(dare[k], plain[k]) for k in base)
    for key in base:
        torch.testing.assert_close(dare[key], model[key])


def test_dare_seeds_reproduce_and_differ():
    base = random_state(13)
    models = [finetuned(base, i) for i in range(2)]
    a = merging.dare_ties(base, models, density=0.3, seed=1)
    b = merging.dare_ties(base, models, density=0.3, seed=1)
    c = merging.dare_ties(base, models, density=0.3, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer.weight"], c["layer.weight"])
    # one generator per (seed, model, key): a mask does not depend on the other keys
    only = merging.dare_ties(base, models, density=0.3, seed=1, exclude=["head"])
    assert torch.equal(only["layer.weight"], a["layer.weight"])


def test_dare_l1_rescale_matches_the_norm_mergekit_style():
    g = torch.Generator().manual_seed(14)
    tau = torch.randn(200, generator=g)
    pruned = merging.prune(tau, density=0.3, method="random", rescale=True, rescale_norm="l1",
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pruned.abs().sum(), tau.abs().sum())
    base, model = {"x": torch.zeros(200)}, {"x": tau}
    out = merging.dare_linear(base, [model], density=0.3, convention="mergekit")["x"]
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    paper = merging.dare_linear(base, [model], density=0.3)["x"]
    assert torch.equal(paper != 0, out != 0)  # same mask, different scale
    assert not torch.allclose(paper, out)


def test_darex_q_with_q_equal_density_is_dare_bit_for_bit():
    base = random_state(15)
    models = [finetuned(base, i) for i in range(2)]
    dare = merging.dare_linear(base, models, density=0.3, seed=4)
    darex = merging.darex_q(base, models, density=0.3, q=0.3, seed=4)
    assert all(torch.equal(dare[k], darex[k]) for k in base)
    # q = 1: the kept deltas are not amplified at all
    gentle = merging.darex_q({"x": torch.zeros(50)}, [{"x": torch.ones(50)}], density=0.3, q=1.0)["x"]
    assert set(gentle.unique().tolist()) <= {0.0, 1.0}


def test_darex_q_search_scans_the_grid_and_picks_the_minimum():
    g = torch.Generator().manual_seed(16)
    base = {"x": torch.zeros(100)}
    model = {"x": torch.randn(100, generator=g)}

    def distance(state):
        # Σ (m τ / q − τ)² is smallest at q = 1 for any mask
        return float(((state["x"] - model["x"]) ** 2).sum())

    found = merging.darex_q_search(base, model, density=0.1, objective_fn=distance, num=8)
    assert found.qs[0] == 0.1 and found.qs[-1] == 1.0 and len(found.objective) == 8
    assert all(a < b for a, b in zip(found.qs, found.qs[1:]))
    assert found.q == 1.0 and found.objective[-1] == min(found.objective)


# ---------------------------------------------------------------- PCB, by hand


def pcb_reference(rows: list[list[float]], density: float) -> list[float]:
    """PCB's official equations in plain Python, no clipping (clip_ratio 0)."""
    n, d = len(rows), len(rows[0])

    def minmax(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]

    column_sums = [sum(r[j] for r in rows) for j in range(d)]
    scales = []
    for row in rows:
        intra = [math.exp(n * m**2) for m in minmax([abs(x) for x in row])]
        inter = [math.tanh(x * s) for x, s in zip(row, column_sums)]
        beta = [a * b for a, b in zip(intra, inter)]
        floor = sorted(beta)[int(d * (1 - density))]
        scales.append(minmax([max(b, floor) for b in beta]))
    return [
        sum(s[j] * r[j] for s, r in zip(scales, rows)) / max(sum(s[j] for s in scales), 1e-12) for j in range(d)
    ]


def test_pcb_by_hand():
    rows = [[0.4, -0.2, 0.1, 0.3], [0.2, 0.3, -0.4, 0.1]]
    flat = torch.tensor(rows, dtype=torch.float64)
    scores = merging.pcb_scores(flat, density=0.75, clip_ratio=0.0)
    expected = pcb_reference(rows, 0.75)
    torch.testing.assert_close(scores.merged, torch.tensor(expected, dtype=torch.float64))
    # β_t's two smallest entries per task are dropped: D − ⌊D(1 − r)⌋ − 1 = 2 survive, scaled into (0, 1]
    assert [int((s > 0).sum()) for s in scores.scale] == [2, 2]
    assert bool(((scores.scale >= 0) & (scores.scale <= 1)).all())
    # by hand. Column sums Σ_t V_t = [0.6, 0.1, -0.3, 0.4]. Task 1: β = e^{2·minmax|V|²} tanh(V ⊙ Σ) keeps entries
    # 0 (its largest, scale 1) and 3. Task 2: minmax|V_2| = [1/3, 2/3, 1, 0], so β_2 = [e^{2/9} tanh(0.12),
    # e^{8/9} tanh(0.03), e^{2} tanh(0.12), tanh(0.04)]; the floor is its 2nd smallest, β_2[1]: entry 2 scales to 1,
    # entry 0 to s = (β_2[0] − β_2[1]) / (β_2[2] − β_2[1]).
    beta2 = [math.exp(2 / 9) * math.tanh(0.12), math.exp(8 / 9) * math.tanh(0.03), math.exp(2) * math.tanh(0.12)]
    s = (beta2[0] - beta2[1]) / (beta2[2] - beta2[1])
    assert math.isclose(float(scores.merged[0]), (0.4 + s * 0.2) / (1 + s), rel_tol=1e-12)
    # entry 1: dropped by both tasks -> 0; entry 2: only task 2 keeps it; entry 3: only task 1 keeps it
    assert float(scores.merged[1]) == 0.0
    assert math.isclose(float(scores.merged[2]), -0.4, rel_tol=1e-12)
    assert math.isclose(float(scores.merged[3]), 0.3, rel_tol=1e-12)
    # the state-dict method: θ_0 + λ τ_m
    base = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    models = [{"a": flat[t, :2], "b": 1 + flat[t, 2:]} for t in range(2)]
    out = merging.pcb(base, models, density=0.75, clip_ratio=0.0, lambda_=2.0)
    torch.testing.assert_close(torch.cat([out["a"], out["b"] - 1]), 2.0 * torch.tensor(expected, dtype=torch.float64))


def test_pcb_clipping_and_paper_balance():
    g = torch.Generator().manual_seed(17)
    flat = torch.randn(3, 20_000, generator=g)
    flat[0, 0] = 1e3  # an outlier: clipped to the 1 − 1e-4 quantile of its row
    scores = merging.pcb_scores(flat, density=0.1)
    assert float(scores.clipped[0].abs().max()) < 10
    nonzero = (scores.scale > 0).sum(dim=1)
    assert all(abs(int(c) - 2000) <= 1 for c in nonzero)
    paper = merging.pcb_scores(flat, density=0.1, balance="paper")
    assert paper.merged.shape == scores.merged.shape and not torch.allclose(paper.merged, scores.merged)


# ---------------------------------------------------------------- Iso-C / Iso-CTS


def iso_inputs(rows: int = 7, cols: int = 4, n_tasks: int = 3, seed: int = 18):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(rows, cols, generator=g, dtype=torch.float64),
            "b": torch.randn(rows, generator=g, dtype=torch.float64)}
    models = []
    for _ in range(n_tasks):
        models.append({"w": base["w"] + torch.randn(rows, cols, generator=g, dtype=torch.float64),
                       "b": base["b"] + torch.randn(rows, generator=g, dtype=torch.float64)})
    return base, models


def test_iso_c_flattens_the_spectrum_and_keeps_the_subspace():
    base, models = iso_inputs()
    out = merging.iso_c(base, models, lambda_=1.0)
    delta = (out["w"] - base["w"]).numpy()
    summed = sum((m["w"] - base["w"]).numpy() for m in models)
    u, s, vt = np.linalg.svd(summed, full_matrices=False)
    # all singular values equal mean(σ(Σ τ_t)): a flat spectrum, the nuclear norm kept
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False), np.full(4, s.mean()), rtol=1e-10)
    # the same singular subspaces: Δ_iso = mean(σ) U Vᵀ with Σ τ_t = U Σ Vᵀ (numpy's SVD as the reference)
    np.testing.assert_allclose(delta, s.mean() * u @ vt, atol=1e-10)
    projector = u @ u.T
    np.testing.assert_allclose(projector @ delta, delta, atol=1e-10)
    # 1-D tensors fall back to task arithmetic on the mean task vector
    mean_tau = sum(m["b"] - base["b"] for m in models) / 3
    torch.testing.assert_close(out["b"], base["b"] + mean_tau)
    summed_fallback = merging.iso_c(base, models, fallback="sum")
    torch.testing.assert_close(summed_fallback["b"], base["b"] + 3 * mean_tau)
    # an excluded 2-D weight falls back the same way (it is not copied from the base)
    excluded = merging.iso_c(base, models, exclude=[r"^w$"])
    torch.testing.assert_close(excluded["w"], base["w"] + sum(m["w"] - base["w"] for m in models) / 3)


def test_iso_cts_is_isotropic_and_equals_iso_c_at_full_common_space():
    base, models = iso_inputs(rows=9, cols=8, n_tasks=3)
    iso = merging.iso_c(base, models)
    full = merging.iso_cts(base, models, common_space_fraction=1.0)
    torch.testing.assert_close(full["w"], iso["w"])
    cts = merging.iso_cts(base, models, common_space_fraction=0.5)
    singular = torch.linalg.svdvals(cts["w"] - base["w"])
    torch.testing.assert_close(singular, singular.mean().expand(8))
    assert not torch.allclose(cts["w"], iso["w"])
    torch.testing.assert_close(cts["b"], iso["b"])


def test_iso_cts_rank_split_adds_up():
    for rank in range(1, 30):
        for n_tasks in range(1, 9):
            for fraction in (0.0, 0.3, 0.8, 1.0):
                common, per_task = merging.iso_cts_ranks(rank, n_tasks, fraction)
                assert common >= 0 and per_task >= 0 and common + per_task * n_tasks == rank
    # k = ⌊8·0.5⌋ = 4, s = round(4/3) = 1, then k = 8 − 1·3 = 5
    assert merging.iso_cts_ranks(8, 3, 0.5) == (5, 1)
    # s = round(6/4) = 2 would make k = 6 − 8 < 0: s is capped at ⌊6/4⌋ = 1
    assert merging.iso_cts_ranks(6, 4, 0.0) == (2, 1)


# ---------------------------------------------------------------- mergekit YAML and FusionBench pools


@needs_yaml
@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_mergekit_yaml_round_trips(method):
    names = ["org/task-a", "org/task-b"]
    params = {"weight": [0.25, 1e-05]} if "weight" in merging.METHOD_INFO[method].per_model else {}
    if method == "darex_q":
        params["q"] = 0.4
    text = to_mergekit_yaml(method, params, names, base_model="org/base", dtype="bfloat16")
    config = yaml.safe_load(text)
    assert config["merge_method"] == method
    assert [m["model"] for m in config["models"]] == names
    assert config["dtype"] == "bfloat16"
    assert ("base_model" in config) == merging.METHOD_INFO[method].needs_base
    if "weight" in params:
        assert [m["parameters"]["weight"] for m in config["models"]] == [0.25, 1e-05]
    if not merging.METHOD_INFO[method].in_mergekit:
        assert "lablib-only method" in text


@needs_yaml
def test_mergekit_yaml_for_ties_carries_mergekit_names_and_resolved_values():
    text = to_mergekit_yaml("ties", {"density": [0.2, 0.4], "lambda_": 0.7, "convention": "mergekit"},
                            ["a", "b"], base_model="base")
    config = yaml.safe_load(text)
    assert config["base_model"] == "base"
    assert [m["parameters"] for m in config["models"]] == [{"weight": 1.0, "density": 0.2},
                                                          {"weight": 1.0, "density": 0.4}]
    assert config["parameters"] == {"lambda": 0.7, "normalize": True}
    dare = yaml.safe_load(to_mergekit_yaml("dare_ties", {"convention": "mergekit"}, ["a"], base_model="base"))
    assert dare["parameters"] == {"lambda": 1.0, "normalize": False, "rescale": True}
    # a convention mergekit does not compute is flagged in a comment
    peft = to_mergekit_yaml("ties", {"weight": [1.0, 2.0]}, ["a", "b"], base_model="base")
    assert "# note: lablib elected signs on unweighted deltas" in peft
    linear = yaml.safe_load(to_mergekit_yaml("linear", {}, ["a", "b"]))
    assert "base_model" not in linear and linear["parameters"] == {"normalize": True}
    with pytest.raises(ValueError, match="needs base_model"):
        to_mergekit_yaml("ties", {}, ["a"])
    with pytest.raises(TypeError, match="takes no parameter"):
        to_mergekit_yaml("ties", {"t": 0.5}, ["a"], base_model="b")


@needs_yaml
def test_yaml_scalars_survive_pyyaml():
    from lablib.merging.interop import _yaml_scalar

    for value in (0.1, 1e-05, 2.5e20, -3.0, 1e100, 7, True, False, None, "a: b", 'quote " and \\ back', "ü"):
        assert yaml.safe_load(f"x: {_yaml_scalar(value)}")["x"] == value
    assert math.isinf(yaml.safe_load(f"x: {_yaml_scalar(float('inf'))}")["x"])


@needs_yaml
def test_fusionbench_style_run_on_a_pool():
    base = random_state(19)
    models = {"task_a": finetuned(base, 0), "task_b": finetuned(base, 1)}
    expected = merging.task_arithmetic(base, list(models.values()), lambda_=0.3)
    pool = ModelPool(models=models, base=base)
    assert list(pool) == ["task_a", "task_b"] and len(pool) == 2 and pool["task_a"] is models["task_a"]
    for result in (
        MergeAlgorithm("task_arithmetic", scaling_factor=0.3).run(pool),
        merging.run({"_pretrained_": base, **models}, method="task_arithmetic", scaling_factor=0.3),
    ):
        assert all(torch.equal(result[k], expected[k]) for k in expected)
    algorithm = MergeAlgorithm("ties", density=0.5)
    config = yaml.safe_load(algorithm.to_mergekit_yaml(pool))
    assert config["base_model"] == "base" and [m["model"] for m in config["models"]] == ["task_a", "task_b"]
    broken = ModelPool(models={**models, "task_c": {k: v for k, v in models["task_a"].items() if k != "layer.bias"}},
                       base=base)
    with pytest.raises(StateDictMismatchError, match="task_c has no key 'layer.bias'"):
        algorithm.run(broken)
    with pytest.raises(TypeError, match="takes no parameter"):
        MergeAlgorithm("ties", gamma=0.1)
