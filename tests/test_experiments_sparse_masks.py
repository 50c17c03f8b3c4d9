"""Lab 06's experiments at tiny sizes: every part runs and is cached, the numbers repeat, the verdict rules and the
recorded-vs-live comparison decide from numbers (and can fail), and the ledger rows count pruned weights out."""

from __future__ import annotations

import json

import pytest
import torch

from lablib import cache as cache_mod
from lablib import sparse
from lablib.experiments import frontier as fx
from lablib.experiments import sparse_masks as sx
from lablib.experiments.foundations import Verdict

TINY_TASK = dict(fx.TASK, max_chars=4000, d_model=16, n_layers=2, n_heads=2, seq_len=16, batch_size=4, steps=6,
                 base_steps=4, eval_batches=2)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(sx, "TASK", TINY_TASK)
    monkeypatch.setattr(sx, "FINETUNE", dict(sx.FINETUNE, steps=3, fisher_batches=2, fish_density=0.05))
    monkeypatch.setattr(sx, "LEARNED_NM", dict(sx.LEARNED_NM, steps=2))
    monkeypatch.setattr(sx, "CALIBRATION_BATCHES", 2)


def test_one_seed_runs_every_part_and_is_cached_and_repeatable(tiny, tmp_path):
    cache = cache_mod.CheckpointCache(tmp_path)
    run = sx.run_seed(0, checkpoint_cache=cache)
    curves = run["one_shot"]["curves"]
    assert set(curves) == set(sx.ONE_SHOT_METHODS)
    for losses in curves.values():
        assert len(losses) == len(sx.DENSITIES) and losses[0] == pytest.approx(run["one_shot"]["dense"])
        assert all(0 < v < 10 for v in losses)
    assert set(run["nm"]["losses"]) == set(sx.NM_METHODS) and 0 <= run["nm"]["changed_groups"] <= 1
    ft = run["finetune"]
    # the full fine-tune trains every parameter, FISH only its budget
    assert ft["fish_trainable"] < ft["full_trainable"]
    assert ft["graft"][-1] == pytest.approx(ft["full"], abs=1e-5) and ft["graft_fractions"] == list(sx.GRAFT_FRACTIONS)
    assert torch.get_num_threads() >= 1  # one_thread restored the count
    # a second call reads the cache; a fresh cache recomputes the same numbers bit for bit (one thread)
    assert sx.run_seed(0, checkpoint_cache=cache) == run
    again = sx.run_seed(0, checkpoint_cache=cache_mod.CheckpointCache(tmp_path / "fresh"), include=("one_shot",))
    assert again["one_shot"] == run["one_shot"]


def test_run_seed_rejects_unknown_parts_and_bad_seeds(tiny):
    with pytest.raises(ValueError, match="unknown parts"):
        sx.run_seed(0, include=("nope",))
    with pytest.raises(ValueError, match="seed must be"):
        sx.base_model(seed=-1)
    with pytest.raises(ValueError, match="unknown one-shot method"):
        sx.one_shot_mask(torch.nn.Linear(2, 2), "bogus", density=0.5, calib=[], seed=0)


def test_record_and_compare_with_the_live_subset(tiny, tmp_path, monkeypatch):
    path = sx.record_sparse_masks(tmp_path / "rec.json", progress=False, seeds=(0, 1))
    record = json.loads(path.read_text())
    assert record["result"]["seeds"] == [0, 1] and "threads 1" in record["machine"]
    recorded = sx.recorded_sparse_masks(path)
    live = sx.live_subset(checkpoint_cache=cache_mod.CheckpointCache(tmp_path / "live"))
    assert set(live.runs["0"]) == set(sx.LIVE_PARTS)
    assert sx.compare_with_recorded(live, recorded.result) == []
    # a changed number is reported with its path
    live.runs["0"]["nm"]["losses"]["learned 2:4"] += 0.5
    problems = sx.compare_with_recorded(live, recorded.result)
    assert len(problems) == 1 and "learned 2:4" in problems[0]
    verdicts = sx.sparse_verdicts(recorded.result)
    assert set(verdicts) == {"learned_nm", "fish", "fish_vs_full", "grafting"}
    assert all(isinstance(v, Verdict) for v in verdicts.values())
    with pytest.raises(FileNotFoundError, match="sweep sparse-masks"):
        sx.recorded_sparse_masks(tmp_path / "missing.json")


def _result(pairs):
    """A two-method result: nm losses per seed (learned, magnitude) and fine-tune numbers."""
    runs = {}
    for seed, (learned, magnitude) in enumerate(pairs):
        runs[str(seed)] = dict(
            nm=dict(losses={"learned 2:4": learned, "magnitude 2:4": magnitude, "wanda 2:4": 3.0}),
            finetune=dict(base=3.0, full=2.0, fish=2.5, random_mask=2.9, graft_fractions=[0.001, 0.01, 1.0],
                          graft=[2.9, 2.4 + 0.2 * seed, 2.0]))
    return sx.SparseResult(seeds=list(range(len(pairs))), runs=runs)


def test_verdicts_follow_the_numbers():
    holds = sx.sparse_verdicts(_result([(2.0, 2.1), (2.0, 2.2)]))
    assert holds["learned_nm"].verdict == "holds" and holds["fish"].verdict == "holds"
    assert holds["learned_nm"].numbers["gaps"] == pytest.approx([0.1, 0.2])
    # grafting: seed 0 recovers 60 % at 1 %, seed 1 40 %: the seeds split
    assert holds["grafting"].verdict.startswith("inconclusive")
    assert holds["grafting"].numbers["recovery_at_tiny"] == pytest.approx([0.6, 0.4])
    assert sx.sparse_verdicts(_result([(2.2, 2.0), (2.3, 2.0)]))["learned_nm"].verdict == "does not hold at this scale"
    # FISH 2.5 vs full 2.0: half a nat behind on both seeds, half of the improvement kept
    assert holds["fish_vs_full"].verdict == "does not hold at this scale"
    assert holds["fish_vs_full"].numbers["recovery"] == pytest.approx([0.5, 0.5])
    close = _result([(2.0, 2.1), (2.0, 2.2)])
    for run in close.runs.values():
        run["finetune"]["fish"] = 2.03
    assert sx.sparse_verdicts(close)["fish_vs_full"].verdict == "holds"
    assert sx.sparse_verdicts(_result([(2.0, 2.1), (2.1, 2.0)]))["learned_nm"].verdict.startswith("inconclusive")
    with pytest.raises(ValueError, match="at least two seeds"):
        sx.sparse_verdicts(_result([(2.0, 2.1)]))


def test_recovery_by_hand():
    assert sx.recovery(3.0, 2.0, 2.5) == pytest.approx(0.5)
    run = dict(base=3.0, full=2.0, graft_fractions=[0.001, 0.01, 1.0], graft=[2.9, 2.4, 2.0])
    assert sx.graft_recovery(run) == pytest.approx([0.1, 0.6, 1.0])
    assert sx.smallest_fraction_recovering(run) == 0.01 and sx.smallest_fraction_recovering(run, 1.01) is None
    with pytest.raises(ValueError, match="must improve"):
        sx.recovery(2.0, 2.0, 1.0)


def test_pruning_ledger_rows_count_pruned_weights_out():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    rows = sx.pruning_ledger_rows(model, [1.0, 0.5], [2.0, 2.5])
    weights = 8 * 8 + 8 * 4
    assert rows[0]["stored"] == sum(p.numel() for p in model.parameters())
    # half of the prunable weights gone, biases kept
    assert rows[0]["stored"] - rows[1]["stored"] == weights // 2
    assert rows[1]["flops_per_token"] < rows[0]["flops_per_token"] and rows[1]["val_loss"] == 2.5
    assert set(sparse.prunable_names(model)) == {"0.weight", "2.weight"}
    with pytest.raises(ValueError, match="2 densities but 1 losses"):
        sx.pruning_ledger_rows(model, [1.0, 0.5], [2.0])


def test_check_nm_kept(capsys):
    assert sx.check_nm_kept(32, rows=8, cols=8, n=2, m=4)
    assert not sx.check_nm_kept(16, rows=8, cols=8, n=2, m=4)
    assert "too low" in capsys.readouterr().out
    with pytest.raises(ValueError, match="divisible"):
        sx.check_nm_kept(1, rows=2, cols=6, n=2, m=4)
