"""Lab 01's experiments at tiny sizes, the verdict rule on hand-made results, and the recorded sweep's shape."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from lablib import cache, moe
from lablib.experiments import moe_routers as mx

TINY = dict(steps=8, batch_size=4, d_model=16, seq_len=16, eval_batches=2, load_every=4)


@pytest.fixture
def checkpoints(tmp_path):
    return cache.CheckpointCache(tmp_path)


@pytest.fixture(scope="module")
def tiny_linear(tmp_path_factory):
    store = cache.CheckpointCache(tmp_path_factory.mktemp("ckpt"))
    return mx.train_router_lm(variant="linear", progress=False, checkpoint_cache=store, **TINY)


# ----------------------------------------------------------------------------------------------------------------
# Models, budgets, training
# ----------------------------------------------------------------------------------------------------------------


def test_router_variants_share_one_expert_budget():
    """Same expert parameters in every MoE variant, and the same active FFN width as the dense baseline."""
    ledgers = {}
    for variant in mx.ROUTER_VARIANTS:
        model = mx.build_model(variant, seed=0)
        layers = mx.moe_layers(model)
        assert [i for i, _ in layers] == [0, 1]
        experts = sum(p.numel() for _, layer in layers for p in layer.experts.parameters())
        assert experts == 2 * 1024 * 2 * 64  # 2 layers x 1024 hidden units x (in + out) x d_model
        per_token = {layer.routed_top_k * layer.expert_hidden for _, layer in layers}
        assert per_token == {256}
        ledgers[variant] = (sum(p.numel() for p in model.parameters()) - mx.router_params(model))
    assert len(set(ledgers.values())) == 1, ledgers
    assert mx.router_params(mx.build_model("hash", seed=0)) == 0
    assert mx.router_params(mx.build_model("random_fixed", seed=0)) == 0
    assert mx.router_params(mx.build_model("linear", seed=0)) == 2 * 8 * 64
    dense = mx.build_model("dense_256", seed=0)
    assert dense.config.ffn_hidden == 256 and not mx.moe_layers(dense)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="nope"), "unknown variant"),
        (dict(variant="linear", balance="magic"), "unknown balance"),
        (dict(variant="linear", balance="bias"), "bias_update_rate > 0"),
        (dict(variant="linear", balance="none", bias_update_rate=1e-3), "only applies"),
    ],
)
def test_bad_configuration_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mx.train_router_lm(**kwargs)


def test_balance_methods_set_the_layer_options():
    none = mx.moe_layers(mx.build_model("linear", seed=0, balance="none"))[0][1]
    aux = mx.moe_layers(mx.build_model("linear", seed=0, balance="aux_loss"))[0][1]
    bias = mx.moe_layers(mx.build_model("linear", seed=0, balance="bias", bias_update_rate=1e-3))[0][1]
    assert none.router_aux_loss_coef == 0 and none.expert_bias is None
    assert aux.router_aux_loss_coef == mx.AUX_LOSS_COEF and aux.expert_bias is None
    assert bias.router_aux_loss_coef == 0 and bias.expert_bias.bias_update_rate == 1e-3


def test_train_router_lm_records_load_and_is_cached(tiny_linear, checkpoints):
    r = tiny_linear
    assert r.load_steps == [4, 8] and len(r.load_imbalance) == 2
    assert all(1.0 <= v <= 8.0 for layer in r.load_imbalance for v in layer)
    assert set(r.val_loss_by_corpus) == set(mx.CORPORA) and math.isfinite(r.val_loss)
    assert r.val_loss == r.history.final("val_loss") and r.router_params == 2 * 8 * 16
    first = mx.train_router_lm(variant="hash", seed=1, progress=False, checkpoint_cache=checkpoints, **TINY)
    again = mx.train_router_lm(variant="hash", seed=1, progress=False, checkpoint_cache=checkpoints, **TINY)
    assert not first.from_cache and again.from_cache and again.val_loss == first.val_loss
    assert again.load_imbalance == first.load_imbalance


def test_bias_balancing_moves_the_bias_and_dense_has_no_load(checkpoints):
    r = mx.train_router_lm(variant="linear", balance="bias", bias_update_rate=1e-2, progress=False,
                           checkpoint_cache=checkpoints, **TINY)
    biases = [layer.expert_bias.bias for _, layer in mx.moe_layers(r.model)]
    assert all(b.abs().sum() > 0 for b in biases)
    # every step moves each expert's bias by ±u or 0
    assert all(torch.all(b.abs() <= 8 * 1e-2 + 1e-6) for b in biases)
    dense = mx.train_router_lm(variant="dense_64", progress=False, checkpoint_cache=checkpoints, **TINY)
    assert dense.load_steps == [] and dense.load_imbalance == [] and dense.router_params == 0


# ----------------------------------------------------------------------------------------------------------------
# Routing table
# ----------------------------------------------------------------------------------------------------------------


def test_js_divergence_bounds_and_errors():
    assert mx.js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert mx.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert mx.js_divergence([3, 1], [1, 1]) == pytest.approx(mx.js_divergence([1, 1], [0.75, 0.25]))
    with pytest.raises(ValueError, match="same length"):
        mx.js_divergence([1, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        mx.js_divergence([1, -1], [1, 0])


def test_byte_classes():
    assert [mx.byte_class(ord(c)) for c in " \naZ7(é"[:6]] == ["space", "newline", "lowercase", "uppercase",
                                                                "digit", "punctuation"]
    assert mx.byte_class(200) == "other"


def test_routing_table_shares_and_control(tiny_linear):
    table = mx.routing_table(tiny_linear.model, n_windows=6, n_shuffles=10)
    assert table.layers == [0, 1] and table.num_experts == 8 and table.tokens_per_corpus == 6 * 16
    for layer in ("0", "1"):
        for shares in (*table.shares[layer].values(), *table.class_shares[layer].values()):
            assert len(shares) == 8 and sum(shares) == pytest.approx(1.0)
        assert 0 <= table.js_control[layer]["mean"] <= table.js_control[layer]["max"] <= 1
        assert table.js[layer] == pytest.approx(mx.js_divergence(*table.shares[layer].values()))
    table.js["0"] = 2.0  # above any control: reported as specialised
    assert 0 in table.specialized_layers()
    fig = mx.routing_figure(table, layer=1, view="byte class")
    assert list(fig.data[0].y) == list(table.class_shares["1"])
    with pytest.raises(ValueError, match="layer 5"):
        mx.routing_figure(table, layer=5)


# ----------------------------------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------------------------------


def test_dropped_counts_match_the_layer_and_fall_with_capacity(tiny_linear):
    model = tiny_linear.model
    choices = mx.router_choices(model, n_groups=2, batch_size=4)
    assert choices.indices[0].shape == (2, 64, 2) and choices.group_tokens == 64
    fractions = [choices.dropped_fraction(0, cf) for cf in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] == 0.0 and fractions[0] > 0
    # the layer itself, run with a capacity factor on the first group's input, drops exactly as many assignments
    layer = mx.moe_layers(model)[0][1]
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(_first_group(model, n_groups=2, batch_size=4))
    finally:
        handle.remove()
    layer.capacity_factor = 0.5
    try:
        with torch.no_grad():
            out = layer(seen[0])
    finally:
        layer.capacity_factor = None
    capacity = choices.capacity(0.5)
    assert out.capacity == capacity and int(out.tokens_per_expert.max()) <= capacity
    assert out.dropped == int((~moe.capacity_mask(choices.indices[0][0], num_experts=8, capacity=capacity)).sum())
    curves = mx.capacity_curves(choices, (0.5, 1.0))
    assert curves["layer 0"] == ([0.5, 1.0], [choices.dropped_fraction(0, 0.5), choices.dropped_fraction(0, 1.0)])
    fig = mx.capacity_figure(choices, capacity_factor=1.0, layer=1, curves=curves)
    assert "drops" in fig.layout.title.text


def _first_group(model, *, n_groups, batch_size):
    """The first batch of windows `router_choices` draws (same corpus, generator and sizes)."""
    from lablib import data

    val = data.text_corpus(list(mx.CORPORA), max_chars=200_000).val
    generator = torch.Generator().manual_seed(0)
    x, _ = data.sample_lm_batch(val, batch_size=n_groups * batch_size, seq_len=model.config.seq_len,
                                generator=generator)
    return x[:batch_size]


def test_router_choices_refuses_a_dropping_model(tiny_linear):
    layer = mx.moe_layers(tiny_linear.model)[0][1]
    layer.capacity_factor = 1.0
    try:
        with pytest.raises(ValueError, match="dropless"):
            mx.router_choices(tiny_linear.model, n_groups=1, batch_size=2)
    finally:
        layer.capacity_factor = None


# ----------------------------------------------------------------------------------------------------------------
# Balancing sweep
# ----------------------------------------------------------------------------------------------------------------


def test_balance_sweep_runs_each_method(checkpoints):
    tiny = {k: v for k, v in TINY.items() if k not in ("steps", "load_every")}
    result = mx.balance_sweep(bias_rates=(1e-3,), steps=8, load_every=4, checkpoint_cache=checkpoints, **tiny)
    assert sorted(result.runs) == ["aux_loss", "bias u=0.001", "none"]
    assert result.run("bias", 1e-3)["steps"] == [4, 8]
    assert mx.final_imbalance(result.run("none")) >= 1.0
    with pytest.raises(KeyError, match="bias u=0.1"):
        result.run("bias", 0.1)
    fig = mx.balance_figure(result, method="aux_loss")
    assert [t.name for t in fig.data] == ["layer 0", "layer 1", "no balancing, layer 0", "no balancing, layer 1"]
    assert mx.BalanceResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(ValueError, match="scored router"):
        mx.balance_sweep(variant="hash")


# ----------------------------------------------------------------------------------------------------------------
# Equifinality verdict and comparison
# ----------------------------------------------------------------------------------------------------------------


def make_result(losses: dict[str, list[float]]) -> mx.EquifinalityResult:
    seeds = list(range(len(next(iter(losses.values())))))
    return mx.EquifinalityResult(
        variants=list(losses), seeds=seeds,
        val_loss={v: {str(s): x for s, x in zip(seeds, xs)} for v, xs in losses.items()},
        val_loss_by_corpus={v: {str(s): {} for s in seeds} for v in losses},
        ledger={v: dict(total=1, active_per_token=1, router=0) for v in losses},
    )


SANE = {"dense_64": [2.5, 2.6, 2.55], "dense_256": [2.0, 2.05, 2.02]}


def test_verdict_holds_when_routers_differ_less_than_the_seed_spread():
    r = make_result({"linear": [2.0, 2.1, 2.05], "cosine": [2.02, 2.08, 2.1], "hash": [2.01, 2.12, 2.03],
                     "random_fixed": [2.04, 2.0, 2.09], **SANE})
    v = mx.equifinality_verdict(r)
    assert v.verdict == "holds" and v.numbers["effect"] < v.numbers["seed_spread"] and v.numbers["sanity_ok"]


def test_verdict_does_not_hold_when_a_pair_separates():
    r = make_result({"linear": [2.0, 2.02, 2.01], "cosine": [2.02, 2.0, 2.01], "hash": [1.8, 1.81, 1.79],
                     "random_fixed": [2.01, 2.0, 2.02], **SANE})
    v = mx.equifinality_verdict(r)
    assert v.verdict == "does not hold at this scale" and ["hash", "linear"] in v.numbers["separated"]
    assert v.numbers["ordering"][0] == "hash" and v.numbers["effect_ppl"] == pytest.approx(math.expm1(0.21), 1e-2)


def test_verdict_inconclusive_when_the_sanity_check_fails_or_nothing_separates():
    flat = {"dense_64": [2.0, 2.1, 2.05], "dense_256": [2.0, 2.05, 2.02]}
    r = make_result({"linear": [2.0, 2.1, 2.05], "cosine": [2.0, 2.1, 2.05], "hash": [2.0, 2.1, 2.05],
                     "random_fixed": [2.0, 2.1, 2.05], **flat})
    v = mx.equifinality_verdict(r)
    assert v.verdict == "inconclusive" and "sanity check fails" in v.reason
    # means differ by more than the spread, but the worst seed of one overlaps the best of the other
    r = make_result({"linear": [2.0, 2.2, 2.1], "cosine": [2.3, 2.05, 2.55], "hash": [2.1, 2.1, 2.1],
                     "random_fixed": [2.1, 2.1, 2.1], **SANE})
    v = mx.equifinality_verdict(r)
    assert v.verdict == "inconclusive" and "no pair separates" in v.reason
    with pytest.raises(KeyError, match="dense_64"):
        mx.equifinality_verdict(make_result({"linear": [1.0, 1.1]}), routers=("linear",))
    with pytest.raises(ValueError, match="two seeds"):
        mx.equifinality_verdict(make_result({v: [1.0] for v in (*mx.ROUTER_VARIANTS, *mx.DENSE_BASELINES)}))


def test_compare_with_recorded_and_subset():
    recorded = make_result({"linear": [2.0, 2.1], "hash": [1.9, 1.95]})
    live = recorded.subset(variants=["hash"], seeds=[1])
    assert mx.compare_with_recorded(live, recorded) == []
    live.val_loss["hash"]["1"] = 2.0
    assert any("hash seed 1" in p for p in mx.compare_with_recorded(live, recorded))
    live.ledger["hash"] = dict(total=2, active_per_token=1, router=0)
    assert any("ledger" in p for p in mx.compare_with_recorded(live, recorded))
    with pytest.raises(KeyError, match="cosine"):
        recorded.subset(variants=["cosine"], seeds=[0])
    assert "hash on token id" in mx.format_equifinality_table(recorded)
    fig = mx.equifinality_figure(recorded)
    assert list(fig.data[0].x) == [mx.VARIANT_LABELS["linear"], mx.VARIANT_LABELS["hash"]]


def test_tiny_equifinality_sweep_fills_every_cell(checkpoints):
    result = mx.equifinality_sweep(variants=("hash", "dense_64"), seeds=(0, 1), checkpoint_cache=checkpoints,
                                   **TINY)
    assert set(result.val_loss["hash"]) == {"0", "1"} and result.ledger["hash"]["router"] == 0
    assert result.ledger["dense_64"]["total"] == result.ledger["dense_64"]["active_per_token"]
    assert mx.EquifinalityResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(ValueError, match="non-empty"):
        mx.equifinality_sweep(variants=())


# ----------------------------------------------------------------------------------------------------------------
# The recorded sweep
# ----------------------------------------------------------------------------------------------------------------


def test_recorded_sweep_is_complete():
    raw = json.loads((mx.RESULTS_DIR / mx.RECORD_FILE).read_text())
    assert {"recorded", "machine", "versions", "command", "seconds", "result"} <= set(raw)
    rec = mx.recorded_moe_routers()
    assert rec.equifinality.variants == list(mx.RECORDED_VARIANTS)
    assert rec.equifinality.seeds == list(mx.RECORDED_SEEDS)
    for v in rec.equifinality.variants:
        assert len(rec.equifinality.values(v)) == 3
    assert sorted(rec.balance.runs) == sorted(["none", "aux_loss"] + [f"bias u={u:g}" for u in mx.RECORDED_BIAS_RATES])
    assert mx.equifinality_verdict(rec.equifinality).verdict in ("holds", "does not hold at this scale", "inconclusive")


def test_recorded_sweep_used_the_current_defaults():
    """If a default changes, the recording must be redone (the lab compares a live run with it)."""
    config = mx.recorded_moe_routers().equifinality.config
    defaults = {name: p.default for name, p in inspect.signature(mx.train_router_lm).parameters.items()
                if name in {"steps", "batch_size", "lr", "d_model", "n_layers", "n_heads", "seq_len"}}
    assert {k: config[k] for k in defaults} == defaults


def test_recorded_sweep_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lablib sweep moe-routers"):
        mx.recorded_moe_routers(tmp_path / "nope.json")


def test_sweep_is_registered():
    from lablib.__main__ import SWEEPS

    module, function = SWEEPS["moe-routers"]
    assert module == mx.__name__ and callable(getattr(mx, function))


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def test_check_capacity(capsys):
    assert mx.check_capacity(640, num_tokens=2048, num_experts=8, top_k=2, capacity_factor=1.25)
    assert not mx.check_capacity(320, num_tokens=2048, num_experts=8, top_k=2, capacity_factor=1.25)
    assert "top_k" in capsys.readouterr().out


def test_check_js(tiny_linear):
    table = mx.routing_table(tiny_linear.model, n_windows=4, n_shuffles=2)
    assert mx.check_js(table.js["0"], table, layer=0)
    assert not mx.check_js(table.js["0"] + 0.1, table, layer=0)
