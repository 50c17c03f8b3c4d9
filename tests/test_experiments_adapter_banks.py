"""Lab 03's experiments at tiny size: budgets matched by the ledger, cached runs, verdicts from numbers."""

import pytest
import torch

from lablib import adapters, cache, models
from lablib.experiments import adapter_banks as ab


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.TinyTransformer(models.TransformerConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4,
                                                           seq_len=64))


@pytest.mark.parametrize("level", ab.LEVELS)
def test_every_kind_matches_the_lora_budget_by_the_ledger(model, level):
    lora = adapters.adapter_ledger(adapters.attach_adapters(model, ab.kind_config("lora", level))).stored
    assert lora == 4096 * 2**level  # r · Σ(in + out) = r · 4 · (256 + 128 + 320 + 320)
    for kind in ab.KINDS:
        stored = adapters.adapter_ledger(adapters.attach_adapters(model, ab.kind_config(kind, level))).stored
        # Compacter's shared slow factors add phm_dim³ = 64 numbers; everything else is exact
        assert abs(stored - lora) <= (64 if kind == "compacter" else 0), (kind, stored, lora)


def test_kind_config_rejects_unknown_kind_and_level():
    with pytest.raises(ValueError, match="kind"):
        ab.kind_config("dora", 0)
    with pytest.raises(ValueError, match="level"):
        ab.kind_config("lora", 3)


def test_mos_pure_is_pure_sharing(model):
    adapted = adapters.attach_adapters(model, ab.kind_config("mos_pure", 1))
    usage = [u for u in adapters.bank_usage(adapted) if u.factor == "A"]
    for u in usage:
        picks = list(u.indices.values())
        assert all(torch.equal(p, picks[0]) for p in picks)  # every layer the same rows
        assert (u.counts.sum(0) > 0).all()  # and every pool row used


def _toy(kind_vals):
    seeds = [0, 1]
    val = {k: {"0": {"0": v[0], "1": v[1]}} for k, v in kind_vals.items()}
    return ab.AdapterBankResult(kinds=list(kind_vals), levels=[0], seeds=seeds,
                                stored={k: {"0": 100} for k in kind_vals}, val_loss=val, base_val_loss=3.0)


def test_paired_verdict_three_ways():
    claim = "x"
    holds = _toy({"mos": (1.0, 1.1), "lora": (1.2, 1.3)})
    assert ab.paired_verdict(holds, kind="mos", reference="lora", claim=claim).verdict == "holds"
    fails = _toy({"mos": (1.3, 1.4), "lora": (1.2, 1.3)})
    assert ab.paired_verdict(fails, kind="mos", reference="lora", claim=claim).verdict.startswith("does not hold")
    mixed = _toy({"mos": (1.1, 1.4), "lora": (1.2, 1.3)})
    assert ab.paired_verdict(mixed, kind="mos", reference="lora", claim=claim).verdict.startswith("inconclusive")
    with pytest.raises(KeyError, match="vblora"):
        ab.paired_verdict(holds, kind="vblora", reference="lora", claim=claim)


def test_tiny_sweep_is_cached_and_adapts(tmp_path):
    ck = cache.CheckpointCache(tmp_path)
    kw = dict(kinds=("lora", "mos"), levels=(0,), seeds=(0,), base_overrides=dict(steps=20, max_chars=20_000),
              adapt=dict(steps=8, max_chars=20_000), progress=False, checkpoint_cache=ck)
    first = ab.adapter_bank_sweep(**kw)
    again = ab.adapter_bank_sweep(**kw)
    assert first.to_dict() == again.to_dict()
    assert first.stored["lora"]["0"] == first.stored["mos"]["0"] == 4096
    for kind in ("lora", "mos"):
        assert first.val_loss[kind]["0"]["0"] < first.base_val_loss  # adapting to Python helps
    assert first.usage["lora"]["0"] == [] and first.usage["mos"]["0"]
    assert ab.compare_with_recorded(first, again) == []
    worse = ab.AdapterBankResult.from_dict(first.to_dict())
    worse.val_loss["mos"]["0"]["0"] += 0.5
    assert ab.compare_with_recorded(first, worse)
