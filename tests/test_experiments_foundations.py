"""Lab 00's experiments at tiny sizes, and the verdict rule on hand-made results."""

from __future__ import annotations

import json

import pytest

from lablib.experiments import foundations as fx
from lablib.models import TransformerConfig


def make_result(curves: dict[int, dict[int, float]], *, baseline: float = 0.95, sizes=None, seeds=(0,)):
    """A hand-made sweep: `curves[width][d] = accuracy`, the same for every seed."""
    widths = sorted(curves)
    sizes = sizes or {w: 100 * w * w for w in widths}
    return fx.IntrinsicDimResult(
        dataset="toy",
        widths=widths,
        dims=sorted({d for c in curves.values() for d in c}),
        seeds=list(seeds),
        full_dim={str(w): sizes[w] for w in widths},
        baseline_acc={str(w): {str(s): baseline for s in seeds} for w in widths},
        subspace_acc={str(w): {str(s): {str(d): a for d, a in curves[w].items()} for s in seeds} for w in widths},
    )


def test_first_dim_reaching_is_the_smallest_d_at_or_above_target():
    assert fx.first_dim_reaching({100: 0.9, 10: 0.5, 50: 0.86}, target=0.855) == 50
    assert fx.first_dim_reaching({10: 0.5}, target=0.9) is None


def test_d_int90_uses_90_percent_of_the_baseline():
    result = make_result({8: {10: 0.80, 20: 0.855, 40: 0.9}}, baseline=0.95)  # 0.9 * 0.95 = 0.855
    assert result.d_int90(8, 0) == 20
    assert result.d_int90(8, 0, threshold=0.8) == 10


def test_verdict_holds_when_d_int90_is_flat_across_sizes():
    curve = {10: 0.5, 100: 0.9, 400: 0.95}
    v = fx.intrinsic_dimension_verdict(make_result({4: curve, 64: curve}))
    assert v.verdict == "holds" and v.numbers["d_int90_ratio"] == 1.0


def test_verdict_does_not_hold_when_d_int90_grows_with_size():
    v = fx.intrinsic_dimension_verdict(make_result({4: {10: 0.9, 400: 0.95}, 64: {10: 0.5, 400: 0.9}}))
    assert v.verdict == "does not hold at this scale" and v.numbers["d_int90_ratio"] == 40


@pytest.mark.parametrize(
    "curves, kwargs, reason",
    [
        ({4: {10: 0.5, 100: 0.7}, 64: {10: 0.9}}, {}, "never reach"),
        ({4: {10: 0.7}, 64: {10: 0.7}}, {"baseline": 0.5}, "fewer than two widths"),
        ({4: {10: 0.9}, 5: {10: 0.9}}, {"sizes": {4: 100, 5: 150}}, "span only"),
    ],
)
def test_verdict_is_inconclusive_when_the_numbers_cannot_decide(curves, kwargs, reason):
    v = fx.intrinsic_dimension_verdict(make_result(curves, **kwargs))
    assert v.verdict == "inconclusive" and reason in v.reason


def test_verdict_sets_aside_widths_too_small_to_solve_the_task():
    result = make_result({2: {10: 0.6}, 4: {10: 0.5, 100: 0.9}, 64: {10: 0.5, 100: 0.9}})
    result.baseline_acc["2"]["0"] = 0.6
    v = fx.intrinsic_dimension_verdict(result)
    assert v.verdict == "holds" and v.numbers["set_aside"] == [2] and "set aside widths [2]" in v.reason
    assert 2 not in v.numbers["median_d_int90"]


def test_compare_with_recorded_flags_differences_and_accepts_neighbours():
    recorded = make_result({8: {10: 0.5, 20: 0.86, 40: 0.9}})
    same = make_result({8: {10: 0.5, 20: 0.86, 40: 0.9}})
    assert fx.compare_with_recorded(same, recorded) == []
    neighbour = make_result({8: {10: 0.5, 20: 0.84, 40: 0.9}})  # d_int90 moves 20 -> 40, accuracies within 0.03
    assert fx.compare_with_recorded(neighbour, recorded) == []
    off = make_result({8: {10: 0.7, 20: 0.86, 40: 0.9}})
    assert any("d=10" in p for p in fx.compare_with_recorded(off, recorded))
    with pytest.raises(KeyError, match="16"):
        fx.compare_with_recorded(make_result({16: {10: 0.5}}), recorded)


def test_fraction_of_baseline_averages_seeds():
    result = make_result({8: {10: 0.475, 20: 0.95}}, baseline=0.95, seeds=(0, 1))
    result.subspace_acc["8"]["1"]["10"] = 0.285
    (label, curve), = fx.fraction_of_baseline(result).items()
    assert label.startswith("width 8 ") and curve == {10: pytest.approx(0.4), 20: pytest.approx(1.0)}
    fig = fx.intrinsic_dimension_figure(result, selected_d=20)
    assert list(fig.data[0].y) == [pytest.approx(0.4), pytest.approx(1.0)]


def test_tiny_sweep_runs_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LABLIB_CACHE", str(tmp_path))
    kwargs = dict(widths=(4, 8), dims=(5, 20, 1000), seeds=(0,), steps=30, steps_full=30, projection="dense")
    first = fx.intrinsic_dimension_sweep(**kwargs)
    assert first.full_dim == {"4": 64 * 4 + 4 + 4 * 4 + 4 + 4 * 10 + 10, "8": 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10}
    assert set(first.subspace_acc["4"]["0"]) == {"5", "20"}  # d = 1000 > D is skipped
    assert all(0.0 <= a <= 1.0 for a in first.subspace_acc["8"]["0"].values())
    assert list(tmp_path.glob("*.json")), "the sweep should be cached as JSON"
    again = fx.intrinsic_dimension_sweep(**kwargs)
    uncached = fx.intrinsic_dimension_sweep(**kwargs, use_cache=False)
    assert again.to_dict() == first.to_dict() == uncached.to_dict()


def test_sweep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        fx.intrinsic_dimension_sweep(widths=(), use_cache=False)
    with pytest.raises(ValueError, match="positive"):
        fx.intrinsic_dimension_sweep(dims=(0, 10), use_cache=False)


def test_recorded_sweep_is_complete_and_reproduces_its_own_verdict_inputs():
    raw = json.loads((fx.RESULTS_DIR / "intrinsic_dimension.json").read_text())
    assert {"recorded", "machine", "versions", "command", "result"} <= set(raw)
    recorded = fx.recorded_intrinsic_dimension()
    assert recorded.widths == list(fx.RECORDED_WIDTHS) and recorded.seeds == list(fx.RECORDED_SEEDS)
    for w in recorded.widths:
        for s in recorded.seeds:
            assert set(recorded.subspace_acc[str(w)][str(s)]) == {
                str(d) for d in recorded.dims if d <= recorded.full_dim[str(w)]
            }


def test_recorded_sweep_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lablib sweep intrinsic-dimension"):
        fx.recorded_intrinsic_dimension(tmp_path / "nope.json")


def test_check_param_count(capsys):
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8)
    from lablib.ledger import transformer_param_formula

    assert fx.check_param_count(transformer_param_formula(cfg), cfg)
    assert not fx.check_param_count(transformer_param_formula(cfg) - 32, cfg)
    assert "not quite" in capsys.readouterr().out


def test_recorded_sweep_used_the_same_settings_as_the_live_default():
    """If a default of the sweep changes, the recording must be redone (the lab compares the two)."""
    import inspect

    recorded = fx.recorded_intrinsic_dimension().config
    defaults = {
        name: p.default
        for name, p in inspect.signature(fx.intrinsic_dimension_sweep).parameters.items()
        if name not in {"widths", "seeds", "progress", "use_cache"}
    }
    defaults["dims"] = sorted(defaults["dims"])
    assert {k: recorded[k] for k in defaults} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}
