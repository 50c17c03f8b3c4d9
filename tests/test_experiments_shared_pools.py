"""lablib.experiments.shared_pools at tiny sizes: models and their ledgers, verdict rules on constructed numbers, the
compression runs' equal-memory accounting, and the recording's agreement with the live defaults."""

from __future__ import annotations

import pytest
import torch

from lablib import cache, ledger
from lablib.experiments import shared_pools as sx


@pytest.fixture
def tmp_cache(tmp_path):
    return cache.CheckpointCache(tmp_path)


def lm_result(values: dict[str, list[float]]) -> sx.LMSweepResult:
    seeds = list(range(len(next(iter(values.values())))))
    return sx.LMSweepResult(variants=list(values), seeds=seeds,
                            val_loss={v: {str(s): x for s, x in zip(seeds, xs)} for v, xs in values.items()},
                            ledger={v: {"total": 1, "experts": 1} for v in values}, config=dict(sx.MODEL_DEFAULTS))


def test_models_count_their_experts_once():
    per_layer = sx.build_lm("per_layer", seed=0)
    pool = sx.build_lm("pool_8", seed=0)
    wide = sx.build_lm("widenet_individual", seed=0)
    one_expert = 2 * sx.MODEL_DEFAULTS["d_model"] * sx.EXPERT_WIDTH
    assert sx._expert_params(per_layer) == 16 * one_expert
    assert sx._expert_params(pool) == 8 * one_expert
    assert sx._expert_params(wide) == sx.WIDENET_EXPERTS * one_expert
    for m in (per_layer, pool, wide):
        assert ledger.ledger(m).total == sum(p.numel() for p in m.parameters())
    # same compute per token (top-2 of width-64 experts in every layer); routers differ by the pool's width only
    diff = ledger.ledger(pool).flops_per_token - ledger.ledger(per_layer).flops_per_token
    assert diff == 4 * 2 * (8 - 4) * sx.MODEL_DEFAULTS["d_model"]
    with pytest.raises(ValueError, match="unknown variant"):
        sx.build_lm("pool_x", seed=0)


def test_lm_sweep_runs_and_is_cached(tmp_cache):
    kwargs = dict(steps=3, batch_size=4, eval_batches=1, checkpoint_cache=tmp_cache)
    first = sx.lm_sweep(variants=["per_layer", "pool_2"], seeds=[0], **kwargs)
    again = sx.lm_sweep(variants=["per_layer", "pool_2"], seeds=[0], **kwargs)
    assert first.val_loss == again.val_loss and 0 < first.mean("pool_2") < 6
    assert sx.compare_lm_with_recorded(first, again) == []
    shifted = sx.LMSweepResult.from_dict(first.to_dict())
    shifted.val_loss["pool_2"]["0"] += 0.1
    assert sx.compare_lm_with_recorded(first, shifted, tolerance=0.05)
    model = sx.train_pool_lm(variant="pool_2", seed=0, progress=False, **kwargs).model
    usage = sx.usage_matrix(model, windows=2)
    assert len(usage) == 4 and all(abs(sum(r) - 1) < 1e-5 for r in usage)


def test_unipool_verdict_rules():
    base = {"per_layer": [2.00, 2.01, 2.02], "pool_2": [2.20, 2.21, 2.22]}
    holds = sx.unipool_verdict(lm_result({**base, "pool_8": [2.01, 2.02, 2.03]}))
    assert holds.verdict == "holds" and holds.numbers["reduced"] == ["pool_8"]
    worse = sx.unipool_verdict(lm_result({**base, "pool_8": [2.10, 2.11, 2.12]}))
    assert worse.verdict == "does not hold at this scale"
    sanity = sx.unipool_verdict(lm_result({**base, "pool_2": [2.0, 2.02, 2.01], "pool_8": [2.0, 2.0, 2.0]}))
    assert sanity.verdict == "inconclusive" and "sanity" in sanity.reason
    with pytest.raises(KeyError):
        sx.unipool_verdict(lm_result({"per_layer": [1.0, 1.0]}))


def test_widenet_verdict_rules():
    base = {"per_layer": [2.00, 2.01, 2.02], "pool_2": [2.20, 2.21, 2.22]}
    v = sx.widenet_verdict(lm_result({**base, "widenet_individual": [2.0, 2.01, 2.0],
                                      "widenet_shared": [2.1, 2.1, 2.11]}))
    assert v.verdict == "holds"
    v = sx.widenet_verdict(lm_result({**base, "widenet_individual": [2.1, 2.1, 2.11],
                                      "widenet_shared": [2.0, 2.01, 2.0]}))
    assert v.verdict == "does not hold at this scale"
    v = sx.widenet_verdict(lm_result({**base, "widenet_individual": [2.0, 2.05, 2.02],
                                      "widenet_shared": [2.03, 2.01, 2.04]}))
    assert v.verdict == "inconclusive (within seed spread)"
    # paired: seed-to-seed variation shared by both variants does not hide a consistent per-seed gap
    v = sx.widenet_verdict(lm_result({**base, "widenet_individual": [2.7, 2.8, 2.5],
                                      "widenet_shared": [2.9, 3.0, 2.7]}))
    assert v.verdict == "holds" and v.numbers["paired_differences"] == pytest.approx([0.2, 0.2, 0.2])


def pareto(acc: dict[str, dict[float, list[float]]], dense=(0.98, 0.98, 0.98)) -> sx.ParetoResult:
    seeds = [0, 1, 2]
    cs = sorted(next(iter(acc.values())))
    return sx.ParetoResult(methods=list(acc), compressions=cs, seeds=seeds,
                           accuracy={m: {str(c): {str(s): a for s, a in zip(seeds, v)} for c, v in d.items()}
                                     for m, d in acc.items()},
                           stored={m: {str(c): int(c * 1000) for c in cs} for m in acc},
                           dense_accuracy={str(s): a for s, a in zip(seeds, dense)}, dense_stored=1000)


def test_rps_verdict_rules():
    good = pareto({"rps": {0.5: [0.95, 0.95, 0.95], 0.01: [0.8, 0.81, 0.8]},
                   "pruning": {0.5: [0.95, 0.96, 0.95], 0.01: [0.6, 0.6, 0.61]},
                   "smaller": {0.5: [0.94, 0.95, 0.95], 0.01: [0.5, 0.5, 0.51]}})
    assert sx.rps_verdict(good).verdict == "holds"
    bad = pareto({"rps": {0.5: [0.80, 0.80, 0.80], 0.01: [0.8, 0.81, 0.8]},
                  "pruning": {0.5: [0.95, 0.96, 0.95], 0.01: [0.6, 0.6, 0.61]},
                  "smaller": {0.5: [0.94, 0.95, 0.95], 0.01: [0.5, 0.5, 0.51]}})
    assert sx.rps_verdict(bad).verdict == "does not hold at this scale"
    flat = pareto({"rps": {0.5: [0.95, 0.95, 0.95], 0.01: [0.6, 0.6, 0.6]},
                   "pruning": {0.5: [0.95, 0.95, 0.95], 0.01: [0.6, 0.6, 0.6]},
                   "smaller": {0.5: [0.95, 0.95, 0.95], 0.01: [0.6, 0.6, 0.6]}})
    assert sx.rps_verdict(flat).verdict == "inconclusive"
    points = sx.pareto_points(good)
    xs, ys = points[sx.METHOD_LABELS["rps"]]
    assert xs == [10, 500] and ys == pytest.approx([0.80333, 0.95], abs=1e-4)


def test_smaller_width_is_the_closest_budget():
    for budget in (500, 5_000, 60_000):
        w = sx.smaller_width_for(budget, in_features=784, num_classes=10)
        params = lambda k: 785 * k + (k + 1) * k + (k + 1) * 10  # noqa: E731
        assert all(abs(params(w) - budget) <= abs(params(k) - budget) for k in range(1, 400))


def test_compression_runs_store_the_same_budget(tmp_cache):
    kwargs = dict(compression=0.02, seed=0, steps=3, finetune_steps=2, checkpoint_cache=tmp_cache)
    rps = sx.compression_run(method="rps", **kwargs)
    pruned = sx.compression_run(method="pruning", **kwargs)
    small = sx.compression_run(method="smaller", **kwargs)
    weights = 784 * 128 + 128 * 128 + 128 * 10
    biases = 128 + 128 + 10
    assert rps["stored"] == round(0.02 * weights) + biases
    assert abs(pruned["stored"] - rps["stored"]) <= 3  # per-layer rounding of kept weights
    assert abs(small["stored"] - rps["stored"]) <= 1100 / 2  # one unit of width moves the count by ~1100
    assert all(0 <= r["accuracy"] <= 1 for r in (rps, pruned, small))
    with pytest.raises(ValueError, match="compression"):
        sx.compression_run(method="rps", compression=0.0, checkpoint_cache=tmp_cache)
    with pytest.raises(ValueError, match="unknown method"):
        sx.compression_run(method="lottery", compression=0.5, checkpoint_cache=tmp_cache)


def test_embedding_run(tmp_cache):
    r = sx.embedding_run(num_rows=16, multiplexed=False, steps=3, checkpoint_cache=tmp_cache)
    assert r["val_loss"] > r["bayes_val_loss"] > 0 and r["stored"] > 16 * 8


def test_checkers(capsys):
    assert sx.check_pool_fraction(0.5, pool_size=8)
    assert not sx.check_pool_fraction(0.25, pool_size=8)
    assert sx.check_rps_memory(5, num_virtual=100, compression=0.05)
    assert not sx.check_rps_memory(6, num_virtual=100, compression=0.05)


def test_recording_matches_the_live_defaults():
    try:
        rec = sx.recorded_shared_pools()
    except FileNotFoundError:
        pytest.skip("no recorded sweep yet")
    assert rec.lm.config["steps"] == sx.TRAIN_DEFAULTS["steps"]
    assert rec.lm.config["d_model"] == sx.MODEL_DEFAULTS["d_model"]
    assert set(rec.lm.variants) == set(sx.RECORDED_LM_VARIANTS) and rec.lm.seeds == list(sx.RECORDED_SEEDS)
    assert rec.pareto.config["steps"] == sx.RPS_TRAIN["steps"]
    assert rec.pareto.compressions == list(sx.COMPRESSIONS)
    assert torch.tensor(rec.embedding["rows"]).tolist() == list(sx.EMBEDDING_ROWS)
