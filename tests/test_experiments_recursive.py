"""lablib.experiments.recursive: lab 04's runs at tiny sizes, the isoFLOP budget, the verdict rules, the recording."""

from __future__ import annotations

import json

import pytest
import torch

from lablib import cache as cache_mod
from lablib import models
from lablib.experiments import recursive as rx
from lablib.recursive import MixtureOfRecursionsTransformer, RecursiveTransformer, recursion_ledger

TINY = dict(d_model=16, n_heads=2, seq_len=16)
TINY_TRAIN = dict(base_steps=6, batch_size=4, max_chars=20_000, eval_batches=2)


@pytest.fixture
def fresh_cache(tmp_path):
    return cache_mod.CheckpointCache(tmp_path)


def test_every_variant_spends_the_same_training_flops():
    base = rx.planned_flops_per_token("vanilla_6") * 600
    for v in rx.VARIANTS:
        steps = rx.steps_for_budget(v, base_steps=600)
        flops = rx.planned_flops_per_token(v)
        assert abs(steps * flops - base) <= flops / 2 + 1, v  # within half a step of the budget
    assert rx.steps_for_budget("vanilla_2", base_steps=600) > 2 * 600  # a cheaper model gets more steps


def test_relaxed_and_recursive_3x2_have_equal_parameters_and_vanilla_2_matches_recursive_2x3():
    p = {v: recursion_ledger(rx.build_model(v, seed=0)).total for v in rx.VARIANTS}
    assert abs(p["relaxed_2x3"] - p["recursive_3x2"]) < 0.05 * p["recursive_3x2"]
    assert p["vanilla_2"] == p["recursive_2x3"]
    assert p["mor_expert"] - p["recursive_2x3"] == 3 * 48  # three d -> 1 routers
    with pytest.raises(ValueError, match="variant"):
        rx.build_model("nope", seed=0)


def test_train_variant_caches_and_measures(fresh_cache):
    a = rx.train_variant("mor_expert", seed=0, progress=False, checkpoint_cache=fresh_cache, **TINY_TRAIN, **TINY)
    b = rx.train_variant("mor_expert", seed=0, progress=False, checkpoint_cache=fresh_cache, **TINY_TRAIN, **TINY)
    assert not a.from_cache and b.from_cache and a.val_loss == b.val_loss
    assert torch.isfinite(torch.tensor(a.val_loss)) and 1.0 <= a.mean_depth <= 3.0
    assert isinstance(b.model, MixtureOfRecursionsTransformer)
    # tied parameters survive the cache round trip
    assert b.model.blocks[0].attn.qkv.weight is b.model.blocks[2].attn.qkv.weight
    assert a.train_flops == 3.0 * a.flops_per_token * a.steps * 4 * 16


def test_sweep_compare_and_subset(fresh_cache):
    live = rx.isoflop_sweep(variants=("vanilla_2", "recursive_2x3"), seeds=(0,), checkpoint_cache=fresh_cache,
                            **TINY_TRAIN, **TINY)
    assert rx.compare_with_recorded(live, live) == []
    moved = rx.SweepResult.from_dict(json.loads(json.dumps(live.to_dict())))
    moved.val_loss["vanilla_2"]["0"] += 0.1
    assert rx.compare_with_recorded(live, moved) == [
        f"vanilla_2 seed 0: validation loss {live.val_loss['vanilla_2']['0']:.4f} vs recorded "
        f"{moved.val_loss['vanilla_2']['0']:.4f}"]
    with pytest.raises(KeyError):
        live.subset(variants=["vanilla_6"], seeds=[0])
    assert "recursive, 2 blocks x 3" in rx.format_sweep_table(live)


def synthetic(losses: dict[str, list[float]]) -> rx.SweepResult:
    budget = {v: dict(total_params=100_000, flops_per_token=1, steps=1, train_flops=1.0, kv_cache_entries=1)
              for v in losses}
    return rx.SweepResult(variants=list(losses), seeds=[0, 1, 2],
                          val_loss={v: {str(i): x for i, x in enumerate(xs)} for v, xs in losses.items()},
                          budget=budget)


def test_verdict_rules_on_constructed_numbers():
    holds = synthetic({"relaxed_2x3": [2.0, 2.01, 2.02], "recursive_3x2": [2.1, 2.11, 2.12]})
    assert rx.relaxed_verdict(holds).verdict == "holds"
    fails = synthetic({"relaxed_2x3": [2.1, 2.11, 2.12], "recursive_3x2": [2.0, 2.01, 2.02]})
    assert rx.relaxed_verdict(fails).verdict == "does not hold at this scale"
    noisy = synthetic({"relaxed_2x3": [2.0, 2.2, 2.1], "recursive_3x2": [2.1, 2.05, 2.15]})
    assert rx.relaxed_verdict(noisy).verdict == "inconclusive (within seed spread)"
    mor = synthetic({"mor_expert": [2.0, 2.0, 2.0], "vanilla_6": [2.1, 2.1, 2.1], "recursive_2x3": [2.0, 2.01, 1.99]})
    v = rx.mor_verdict(mor)
    assert v.verdict == "inconclusive (within seed spread)" and v.numbers["comparisons"]["vanilla_6"]["separated"]
    mor.val_loss["recursive_2x3"] = {"0": 1.5, "1": 1.5, "2": 1.5}
    assert rx.mor_verdict(mor).verdict == "does not hold at this scale"
    unequal = synthetic({"relaxed_2x3": [1, 1, 1], "recursive_3x2": [1, 1, 1]})
    unequal.budget["relaxed_2x3"]["total_params"] = 200_000
    with pytest.raises(ValueError, match="equal parameters"):
        rx.relaxed_verdict(unequal)


def test_rank_curve_full_rank_recovers_untrained_vanilla():
    torch.manual_seed(0)
    v = models.TinyTransformer(rx.model_config(n_layers=4, **TINY))
    with torch.no_grad():
        for name, p in v.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                p.normal_(0, 0.2)
    curve = rx.relaxed_rank_curve(v, num_recursion=2, ranks=(0, 16), initializations=("stepwise",), batches=1)
    assert curve.loss["stepwise"][1] == pytest.approx(curve.vanilla_loss, abs=1e-4)  # biases are 0: exact
    assert abs(curve.loss["stepwise"][0] - curve.vanilla_loss) > 1e-3
    assert curve.params[0] < curve.params[1]


def test_depth_text_and_kv_benchmark():
    torch.manual_seed(0)
    config = rx.model_config(n_layers=4, **TINY)
    mor = MixtureOfRecursionsTransformer(config, num_recursion=2)
    with torch.no_grad():
        for r in mor.routers:
            r.weight.normal_(0, 1.0)
    chars, depths = rx.depth_text(mor, "def f(x):\n    return x\n" * 2)
    assert len(chars) == len(depths) == 46 and chars[9] == "⏎" and set(depths) <= {1, 2}
    vanilla = models.TinyTransformer(config)
    rec = RecursiveTransformer(config, num_recursion=2)
    rows = rx.kv_benchmark(rx.kv_strategy_models(mor, vanilla=vanilla, recursive=rec),
                           torch.zeros(1, 2, dtype=torch.long), max_new_tokens=6, repeats=1)
    by = {r.label: r for r in rows}
    assert all(r.same_as_uncached for r in rows)
    assert by["vanilla 6 layers"].kv_cache_entries == 4 * 8 == by["recursive 2x3"].kv_cache_entries
    assert by["MoR kv-sharing"].kv_cache_entries == 2 * 8  # step 0's keys only: T x K
    assert by["MoR kv-sharing"].kv_cache_entries <= by["MoR recursion-wise"].kv_cache_entries


def test_check_helpers():
    assert rx.check_kv_entries(2 * (8 + 5 + 2), seq_len=8, num_unique=2, capacities=(1, 2 / 3, 1 / 3),
                               kv_strategy="recursion_wise")
    assert not rx.check_kv_entries(1, seq_len=8, num_unique=2, capacities=(1, 0.5), kv_strategy="kv_sharing")
    config = rx.model_config()
    assert rx.check_lora_params(6 * 6 * 768, config=config, rank=6)


def test_recorded_sweep_used_the_live_defaults():
    try:
        rec = rx.recorded_recursive()
    except FileNotFoundError:
        pytest.skip("no recorded sweep yet")
    cfg = rec.sweep.config
    for key, value in {**rx.TRAIN_DEFAULTS, **rx.MODEL_DEFAULTS}.items():
        assert cfg[key] == value, key
    assert rec.sweep.variants == list(rx.VARIANTS) and rec.sweep.seeds == list(rx.RECORDED_SEEDS)
    for v in rec.sweep.variants:
        assert rec.sweep.budget[v]["steps"] == rx.steps_for_budget(v, base_steps=rx.TRAIN_DEFAULTS["base_steps"])
    assert rx.relaxed_verdict(rec.sweep).verdict in ("holds", "does not hold at this scale",
                                                     "inconclusive (within seed spread)")
