"""Lab 08's experiments at tiny sizes, and the verdict rules on hand-made runs."""

from __future__ import annotations

import json

import pytest

from lablib.experiments import redundancy as rx

TINY = dict(model=dict(d_model=16, n_layers=2, n_heads=2, seq_len=16), moe_options=dict(num_experts=2, d_hidden=16,
                                                                                          top_k=1))


def fake_run(seed: int, *, attn: list[float], mlp: list[float], probe: list[float], base: float = 2.0) -> dict:
    """A hand-made run: losses after dropping k = 1.. sublayers, and per-layer probe increases."""
    drop = {"attention": {"order": [0], "loss": [base, *attn]}, "mlp": {"order": [1], "loss": [base, *mlp]},
            "block": {"order": [0], "loss": [base, *mlp]}}
    return {"seed": seed,
            "dense": {"val_loss": base, "drop": drop},
            "moe": {"val_loss": base, "drop": drop,
                    "router_probe": {"layers": list(range(len(probe))), "base": base,
                                     "loss": [base + d for d in probe], "delta": probe}}}


def test_drop_gap_averages_k_up_to_half_the_depth():
    run = fake_run(0, attn=[2.1, 2.2, 2.9, 3.5], mlp=[2.5, 2.8, 3.0, 3.6], probe=[0.1, 0.0])
    # L = 4 -> k = 1, 2: ((2.5 - 2.1) + (2.8 - 2.2)) / 2
    assert rx.drop_gap(run) == pytest.approx(0.5)
    assert rx.drop_gap(run, max_k=1) == pytest.approx(0.4)


def test_router_gap_compares_shallow_and_deep_halves():
    run = fake_run(0, attn=[2.0], mlp=[2.0], probe=[0.3, 0.1, 0.0, 0.05, 0.01, 0.02])
    assert rx.router_gap(run) == pytest.approx((0.3 + 0.1 + 0.0) / 3 - (0.05 + 0.01 + 0.02) / 3)
    # without layer 0: layers 1, 2 against 4, 5 (the middle layer 3 is left out)
    assert rx.router_gap(run, skip=1) == pytest.approx((0.1 + 0.0) / 2 - (0.01 + 0.02) / 2)


@pytest.mark.parametrize(
    "gaps, verdict",
    [
        ([0.2, 0.3, 0.25], rx.HOLDS),
        ([-0.2, -0.3, -0.1], rx.FAILS),
        ([0.2, -0.1, 0.3], rx.INCONCLUSIVE),
        ([0.2, 0.005, 0.3], rx.INCONCLUSIVE),
    ],
)
def test_drop_verdict_from_seed_signs(gaps, verdict):
    runs = [fake_run(s, attn=[2.0, 2.0], mlp=[2.0 + g, 2.0], probe=[0.0, 0.0]) for s, g in enumerate(gaps)]
    # L = 2 -> only k = 1 counts
    v = rx.drop_verdict(runs)
    assert v.verdict == verdict and v.numbers["gaps"] == pytest.approx(gaps)
    assert v.claim == rx.DROP_CLAIM


def test_router_verdict_holds_when_deep_layers_hurt_less_for_every_seed():
    runs = [fake_run(s, attn=[2.0], mlp=[2.0], probe=[0.2 + s / 10, 0.02]) for s in range(3)]
    assert rx.router_verdict(runs).verdict == rx.HOLDS
    flipped = [fake_run(s, attn=[2.0], mlp=[2.0], probe=[0.02, 0.2]) for s in range(3)]
    assert rx.router_verdict(flipped).verdict == rx.FAILS


def test_compare_with_recorded():
    rec = fake_run(0, attn=[2.1, 2.2], mlp=[2.5, 2.8], probe=[0.1, 0.0])
    assert rx.compare_with_recorded(rec, [rec]) == []
    off = json.loads(json.dumps(rec))
    off["moe"]["router_probe"]["loss"][1] += 0.2
    off["dense"]["drop"]["mlp"]["loss"][2] -= 0.1
    problems = rx.compare_with_recorded(off, [rec])
    assert any("router probe layer 1" in p for p in problems) and any("dense drop 2 mlp" in p for p in problems)
    with pytest.raises(KeyError, match="seed 3"):
        rx.compare_with_recorded(fake_run(3, attn=[2.0], mlp=[2.0], probe=[0.0]), [rec])


def test_tiny_run_is_complete_consistent_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LABLIB_CACHE", str(tmp_path))
    run = rx.redundancy_run(seed=0, steps=3, **TINY)
    dense, moe = run["dense"], run["moe"]
    assert len(dense["similarity"]["attention"]) == 2 and len(dense["similarity"]["cka"]) == 2
    for kind in ("attention", "mlp", "block"):
        losses = dense["drop"][kind]["loss"]
        assert len(losses) == 3 and losses[0] == pytest.approx(dense["val_loss"])
        assert sorted(dense["drop"][kind]["order"]) == [0, 1]
    # dropping every block of both models leaves embeddings -> head only; losses are finite and above 0
    assert 0 < dense["drop"]["block"]["loss"][2] < 10 and 0 < moe["drop"]["block"]["loss"][2] < 10
    probe = moe["router_probe"]
    assert probe["layers"] == [0, 1] and probe["delta"] == pytest.approx([x - probe["base"] for x in probe["loss"]])
    merge = moe["merge"]
    assert merge["groups"] == [2, 1] and set(merge["loss"]) == set(rx.MERGE_METHODS)
    assert len({merge["loss"][m][0] for m in rx.MERGE_METHODS}) == 1  # no merge: the same model
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.safetensors"))
    again = rx.redundancy_run(seed=0, steps=3, **TINY)
    assert again == run
    uncached = rx.redundancy_run(seed=0, steps=3, use_cache=False, **TINY)
    assert uncached["dense"]["drop"] == run["dense"]["drop"]
    assert rx.check_most_droppable(run["dense"]["drop"]["mlp"]["order"][0], run, kind="mlp")


def test_run_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        rx.redundancy_run(seed=-1)
    with pytest.raises(ValueError, match="kind"):
        rx.build_model("sparse", seed=0)


def test_recorded_runs_are_complete_and_used_the_live_defaults():
    path = rx.RESULTS_DIR / rx.RESULTS_FILE
    raw = json.loads(path.read_text())
    assert {"recorded", "machine", "versions", "command", "result"} <= set(raw)
    runs = rx.recorded_redundancy()
    assert [r["seed"] for r in runs] == list(rx.RECORDED_SEEDS)
    for run in runs:
        config = run["config"]
        assert config["model"] == rx.MODEL_DEFAULTS and config["moe"] == rx.MOE_DEFAULTS
        assert config["train"] == rx.TRAIN_DEFAULTS and config["eval_batches"] == rx.EVAL_BATCHES
        assert config["merge_rank"] == rx.MERGE_RANK
        n = rx.MODEL_DEFAULTS["n_layers"]
        assert len(run["moe"]["router_probe"]["delta"]) == n
        assert all(len(run[m]["drop"][k]["loss"]) == n + 1 for m in ("dense", "moe") for k in ("attention", "mlp"))


def test_recorded_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lablib sweep redundancy"):
        rx.recorded_redundancy(tmp_path / "nope.json")
