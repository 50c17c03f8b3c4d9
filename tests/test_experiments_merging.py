"""lablib.experiments.merging: verdict logic on made-up numbers, the recorded file, the live check, checkers."""

from __future__ import annotations

import copy

import pytest
import torch

from lablib.experiments import merging as mx


def _run(seed, *, ties=0.8, ta=0.7, linear=0.6, fisher=0.65, dare=(0.9, 0.89), darex=(0.5, 0.6), barriers=(1.0, 0.1)):
    methods = {m: {"acc": [v] * 3, "mean": v, "params": {}} for m, v in
               dict(ties=ties, task_arithmetic=ta, linear=linear, fisher=fisher).items()}
    return dict(seed=seed, methods=methods,
                dare=dict(drop_rates=[0.0, 0.9, 0.99], dare=[dare[0], dare[1], darex[0]],
                          darex_q=[dare[0], dare[1], darex[1]]),
                alignment=dict(barrier_naive=barriers[0], barrier_aligned=barriers[1]))


def test_verdicts_follow_the_numbers():
    runs = [_run(s) for s in range(3)]
    assert [v.verdict for v in mx.verdicts(runs)] == ["holds"] * 6
    flipped = [_run(s, ties=0.5, fisher=0.5, dare=(0.9, 0.5), darex=(0.6, 0.5), barriers=(0.1, 1.0))
               for s in range(3)]
    assert [v.verdict for v in mx.verdicts(flipped)] == ["does not hold at this scale"] * 6
    mixed = [_run(0), _run(1, ties=0.5), _run(2)]
    assert mx.verdicts(mixed)[0].verdict.startswith("inconclusive")


def test_recorded_file_and_its_verdicts():
    import json

    record = json.loads((mx.RESULTS_DIR / "merging.json").read_text())
    assert {"recorded", "machine", "config", "runs", "verdicts"} <= set(record)
    runs = mx.recorded_runs()
    assert [r["seed"] for r in runs] == list(mx.SEEDS)
    assert [v.verdict for v in mx.verdicts(runs)] == [v["verdict"] for v in record["verdicts"]]


def test_compare_with_recorded_catches_a_change():
    runs = mx.recorded_runs()
    assert mx.compare_with_recorded(runs[:1], runs) == []
    changed = copy.deepcopy(runs[:1])
    changed[0]["methods"]["ties"]["mean"] += 0.2
    assert any("ties" in p for p in mx.compare_with_recorded(changed, runs))


def test_task_subset_and_sign_checker(capsys):
    d = mx.digits_data(0)
    x, y = mx.task_subset(d, (7, 8, 9), split="val")
    assert set(y.tolist()) == {7, 8, 9} and x.shape[0] == y.shape[0] and float(x.max()) <= 1.0
    tvs = [{"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, -2.0, 3.0])}]
    assert mx.check_sign_conflicts(0.5, tvs, key="w")
    assert not mx.check_sign_conflicts(0.25, tvs, key="w")
    assert "not quite" in capsys.readouterr().out


@pytest.mark.slow
def test_live_seed_matches_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("LABLIB_CACHE", str(tmp_path))
    live = mx.run_seeds((0,), use_cache=False)
    assert mx.compare_with_recorded(live, mx.recorded_runs()) == []
