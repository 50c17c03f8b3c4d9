"""Lab 09's frontier sweep at tiny sizes: every method runs and is counted, the sweep resumes after an
interruption without recomputing finished points, and the budget/Pareto logic on hand-made rows."""

from __future__ import annotations

import json

import pytest

from lablib import cache as cache_mod
from lablib.experiments import frontier as fx

TINY_TASK = dict(fx.TASK, max_chars=4000, d_model=16, n_layers=2, n_heads=2, seq_len=16, batch_size=4, steps=6,
                 base_steps=4, eval_batches=2)
TINY_POINTS = [
    dict(name="dense", method="dense"),
    dict(name="dense small", method="dense", d_model=8),
    dict(name="magnitude", method="magnitude", density=0.5),
    dict(name="nm", method="nm", n=2, m=4),
    dict(name="recursive", method="recursive", num_recursion=2),
    dict(name="relaxed", method="relaxed", num_recursion=2, rank=2),
    dict(name="mor", method="mor", num_recursion=2),
    dict(name="moe", method="moe", num_experts=2, top_k=1),
    dict(name="lora", method="lora", r=2),
    dict(name="unipool", method="unipool", pool_size=2, top_k=1),
    dict(name="rps", method="rps", compression=0.5),
]


def test_every_method_runs_and_is_counted_by_the_ledger(tmp_path):
    cache = cache_mod.CheckpointCache(tmp_path)
    result = fx.frontier_sweep(TINY_POINTS, task=TINY_TASK, checkpoint_cache=cache)
    assert [r["name"] for r in result.rows] == [p["name"] for p in TINY_POINTS]
    assert result.computed == [p["name"] for p in TINY_POINTS]
    rows = {r["name"]: r for r in result.rows}
    for r in result.rows:
        assert 0 < r["val_loss"] < 10 and r["stored"] > 0 and r["flops_per_token"] > 0
    dense = rows["dense"]
    # pruning stores fewer numbers and spends fewer FLOPs; tying blocks stores fewer but computes the same
    assert rows["magnitude"]["stored"] < dense["stored"] and rows["magnitude"]["flops_per_token"] < dense[
        "flops_per_token"]
    assert rows["nm"]["density"] == pytest.approx(0.5)
    assert rows["recursive"]["stored"] < dense["stored"]
    assert rows["recursive"]["flops_per_token"] == dense["flops_per_token"]
    assert rows["recursive"]["stored"] < rows["relaxed"]["stored"] < dense["stored"]
    # MoR: tied blocks plus small routers; tokens skip the second recursion at the default capacities
    assert rows["mor"]["stored"] < dense["stored"] and rows["mor"]["flops_per_token"] < dense["flops_per_token"]
    # MoE: more stored than active
    assert rows["moe"]["active_per_token"] < rows["moe"]["total"]
    # LoRA: stored = frozen base + adapter, the adapter alone is small
    assert rows["lora"]["stored"] == dense["stored"] + rows["lora"]["adapter_stored"]
    assert rows["lora"]["trainable"] == rows["lora"]["adapter_stored"]
    assert rows["dense small"]["stored"] < dense["stored"]
    # UniPool stores one pool for all layers; RPS stores half the weights and computes the dense model's FLOPs
    assert rows["unipool"]["stored"] < rows["moe"]["stored"]
    assert rows["rps"]["stored"] < dense["stored"] and rows["rps"]["flops_per_token"] == dense["flops_per_token"]


def test_interrupted_sweep_resumes_without_recomputing_finished_points(tmp_path):
    cache = cache_mod.CheckpointCache(tmp_path)
    points = [dict(name=f"p{i}", method="dense", d_model=8 * (i + 1)) for i in range(3)]
    calls = []

    def fake(point, task, *, progress, checkpoint_cache):
        if point["name"] == "p2" and not calls.count("allow p2"):
            raise KeyboardInterrupt  # the user stops the sweep during the third point
        calls.append(point["name"])
        return dict(name=point["name"], method="dense", val_loss=3.0 - point["d_model"] / 100, stored=point["d_model"],
                    flops_per_token=1)

    with pytest.raises(KeyboardInterrupt):
        fx.frontier_sweep(points, task=TINY_TASK, checkpoint_cache=cache, compute=fake)
    assert calls == ["p0", "p1"] and len(list(tmp_path.glob("*.json"))) == 2
    calls.append("allow p2")
    result = fx.frontier_sweep(points, task=TINY_TASK, checkpoint_cache=cache, compute=fake)
    assert calls == ["p0", "p1", "allow p2", "p2"]  # p0 and p1 were read back, not recomputed
    assert result.computed == ["p2"] and [r["name"] for r in result.rows] == ["p0", "p1", "p2"]
    again = fx.frontier_sweep(points, task=TINY_TASK, checkpoint_cache=cache, compute=fake)
    assert again.computed == [] and again.rows == result.rows
    # another task is another cache key
    other = fx.frontier_sweep(points[:1], task=dict(TINY_TASK, lr=1e-3), checkpoint_cache=cache, compute=fake)
    assert other.computed == ["p0"]


def test_real_points_resume_from_the_cache(tmp_path):
    cache = cache_mod.CheckpointCache(tmp_path)
    first = fx.frontier_sweep(TINY_POINTS[:1], task=TINY_TASK, checkpoint_cache=cache)
    second = fx.frontier_sweep(TINY_POINTS[:2], task=TINY_TASK, checkpoint_cache=cache)
    assert first.computed == ["dense"] and second.computed == ["dense small"]
    assert second.rows[0] == first.rows[0]


def test_sweep_rejects_bad_points():
    with pytest.raises(ValueError, match="unique"):
        fx.frontier_sweep([dict(name="a", method="dense"), dict(name="a", method="dense")], task=TINY_TASK)
    with pytest.raises(ValueError, match="unknown method"):
        fx.frontier_sweep([dict(name="a", method="hashing")], task=TINY_TASK)
    with pytest.raises(ValueError, match="at least one"):
        fx.frontier_sweep([], task=TINY_TASK)


ROWS = [
    dict(name="big", stored=1000, flops_per_token=100, val_loss=2.0),
    dict(name="mid", stored=500, flops_per_token=300, val_loss=2.2),
    dict(name="bad", stored=600, flops_per_token=50, val_loss=2.5),
    dict(name="small", stored=100, flops_per_token=20, val_loss=2.6),
]


def test_pareto_front_and_best_at_budget_by_hand():
    assert fx.pareto_front(ROWS, x="stored") == ["small", "mid", "big"]
    assert fx.pareto_front(ROWS, x="flops_per_token") == ["small", "bad", "big"]
    assert fx.best_at_budget(ROWS, 700)["name"] == "mid"
    assert fx.best_at_budget(ROWS, 99) is None
    assert fx.best_at_budget(ROWS, 60, x="flops_per_token")["name"] == "bad"
    text = fx.budget_table(ROWS, 700)
    assert text.splitlines()[0].startswith("within 700 stored parameters: best is mid") and "bad" in text
    assert "nothing fits" in fx.budget_table(ROWS, 10)
    with pytest.raises(ValueError, match="x must be"):
        fx.pareto_front(ROWS, x="total")
    assert fx.check_best_at_budget("mid", ROWS, 700)


def test_compare_with_recorded_flags_losses_and_counts():
    recorded = fx.FrontierResult(rows=[dict(ROWS[0], total=5)], task=TINY_TASK)
    same = fx.FrontierResult(rows=[dict(ROWS[0], total=5, val_loss=2.04)], task=TINY_TASK)
    assert fx.compare_with_recorded(same, recorded) == []
    off = fx.FrontierResult(rows=[dict(ROWS[0], total=5, val_loss=2.1, stored=999)], task=TINY_TASK)
    problems = fx.compare_with_recorded(off, recorded)
    assert any("val loss" in p for p in problems) and any("stored" in p for p in problems)
    other_task = fx.FrontierResult(rows=[dict(ROWS[0], total=5)], task=dict(TINY_TASK, steps=7))
    assert any("task differs" in p for p in fx.compare_with_recorded(other_task, recorded))


def test_recorded_frontier_covers_every_point_with_the_live_task():
    raw = json.loads((fx.RESULTS_DIR / fx.RESULTS_FILE).read_text())
    assert {"recorded", "machine", "versions", "command", "result", "not_yet_on_the_frontier"} <= set(raw)
    recorded = fx.recorded_frontier()
    assert recorded.task == fx.TASK
    assert [r["name"] for r in recorded.rows] == [p["name"] for p in fx.POINTS]
    assert set(fx.LIVE_POINTS) <= {r["name"] for r in recorded.rows}
    assert {r["method"] for r in recorded.rows} == set(fx.FAMILIES)


def test_recorded_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lablib frontier"):
        fx.recorded_frontier(tmp_path / "nope.json")


def test_dense_interpolation_and_verdicts_by_hand():
    rows = [
        dict(name="dense d32", method="dense", stored=100, flops_per_token=10, val_loss=3.0),
        dict(name="dense d64", method="dense", stored=400, flops_per_token=40, val_loss=2.0),
        dict(name="dense d64, 2 layers", method="dense", stored=200, flops_per_token=20, val_loss=9.0),
        dict(name="RPS 50%", method="rps", stored=200, flops_per_token=40, val_loss=2.3),
        dict(name="RPS 25%", method="rps", stored=50, flops_per_token=40, val_loss=2.3),
        dict(name="recursive 2 blocks x2", method="recursive", stored=200, flops_per_token=40, val_loss=2.6),
        dict(name="relaxed 2 blocks x2, r=8", method="relaxed", stored=250, flops_per_token=40, val_loss=2.58),
    ]
    # log-linear between (100, 3.0) and (400, 2.0): at 200 halfway -> 2.5; the 2-layer model is not on the curve
    assert fx.dense_loss_at(rows, 200) == pytest.approx(2.5)
    assert fx.dense_loss_at(rows, 50) is None and fx.dense_loss_at(rows, 400) == pytest.approx(2.0)
    verdicts = {v.claim.split(" (")[0]: v for v in fx.frontier_verdicts(rows)}
    rps = verdicts["RPS beats a smaller dense model at equal memory"]
    assert rps.verdict == fx.HOLDS and rps.gap == pytest.approx(0.2)
    assert verdicts["RPS beats a smaller dense model at high compression"].verdict == fx.INCONCLUSIVE
    looped = verdicts["looping 2 tied blocks twice beats the 2-layer dense model with the same stored parameters"]
    assert looped.verdict == fx.HOLDS and looped.gap == pytest.approx(9.0 - 2.6)
    relaxed = verdicts["relaxed recursion beats pure recursion"]
    assert relaxed.verdict == fx.INCONCLUSIVE and relaxed.gap == pytest.approx(0.02)


def test_frontier_command_lists_points_and_rejects_unknown_ones(capsys):
    from lablib.__main__ import SWEEPS, main

    assert main(["frontier", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(p["name"] in out for p in fx.POINTS)
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", "--points", "no such point"])
    assert exit_info.value.code == 2 and "frontier --list" in capsys.readouterr().err
    assert SWEEPS["frontier"] == ("lablib.experiments.frontier", "record_frontier")


def test_frontier_command_runs_chosen_points_into_out(tmp_path, monkeypatch):
    from lablib.__main__ import main

    calls = []

    def fake_record(path, *, progress, points):
        calls.append((path, [p["name"] for p in points]))
        return path

    monkeypatch.setattr(fx, "record_frontier", fake_record)
    assert main(["frontier", "--points", "dense d32", "RPS 50%", "--out", str(tmp_path / "f.json")]) == 0
    assert calls == [(tmp_path / "f.json", ["dense d32", "RPS 50%"])]
