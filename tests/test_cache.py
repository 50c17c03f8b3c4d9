"""Tests for lablib.cache: hashing, safetensors round trips, atomic writes and self-healing of bad entries."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from lablib import cache as cm
from lablib import train as tr

# ----------------------------------------------------------------------------------------------------------------
# config_hash
# ----------------------------------------------------------------------------------------------------------------


def test_config_hash_matches_hand_built_canonical_json():
    config = {"b": [0.1, True, None, "x"], "a": 1}
    canonical = '{"config":{"a":1,"b":[0.1,true,null,"x"]},"schema":' + str(cm.CACHE_SCHEMA) + "}"
    assert cm.config_hash(config) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert len(cm.config_hash(config)) == 16


def test_config_hash_distinguishes_what_matters_and_only_that():
    base = {"lr": 0.1, "layers": [1, 2], "nested": {"x": 1, "y": None}}
    reordered = {"nested": {"y": None, "x": 1}, "layers": (1, 2), "lr": 0.1}
    assert cm.config_hash(base) == cm.config_hash(reordered)
    assert cm.config_hash({"lr": 0.1}) != cm.config_hash({"lr": 0.1 + 0.2 - 0.2})  # 0.10000000000000003
    assert len({cm.config_hash({"v": v}) for v in (1, 1.0, True, "1", None)}) == 5
    assert cm.config_hash({"lr": 0.3}) != cm.config_hash({"lr": 0.30000000000000004})
    assert '"lr":0.1' in cm._canonical_json({"lr": 0.1})


@dataclass
class Inner:
    width: int = 8
    scale: float = 0.5


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    sizes: tuple = (1, 2)


def test_config_hash_of_dataclasses_equals_their_field_dict():
    as_dict = {"name": "run", "inner": {"width": 8, "scale": 0.5}, "sizes": [1, 2]}
    assert cm.config_hash(Outer()) == cm.config_hash(as_dict)
    assert cm.config_hash(Outer(inner=Inner(width=9))) != cm.config_hash(Outer())
    assert cm.config_hash({"outer": Outer()}) == cm.config_hash({"outer": as_dict})


@pytest.mark.parametrize(
    "config, path",
    [
        ({"model": {"init": torch.zeros(2)}}, r"config\['model'\]\['init'\] of type Tensor"),
        ({"fns": [1, len]}, r"config\['fns'\]\[1\] of type builtin_function_or_method"),
        ({"f": lambda: 0}, r"config\['f'\] of type function"),
        (Outer(inner=Inner(scale=torch.tensor(0.5))), r"config\.inner\.scale of type Tensor"),
        ({"s": {1, 2}}, r"config\['s'\] of type set"),
        ({1: "a"}, r"string keys, got 1 \(int\) in config"),
    ],
)
def test_config_hash_rejects_unsupported_values_naming_the_key_path(config, path):
    with pytest.raises(TypeError, match=path):
        cm.config_hash(config)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=4), json_values, max_size=5))
def test_config_hash_is_stable_under_key_order_and_json_round_trips(config):
    reversed_order = dict(reversed(list(config.items())))
    assert cm.config_hash(config) == cm.config_hash(reversed_order)
    assert cm.config_hash(config) == cm.config_hash(json.loads(json.dumps(config)))


# ----------------------------------------------------------------------------------------------------------------
# Cache directory
# ----------------------------------------------------------------------------------------------------------------


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setenv("LABLIB_CACHE", str(tmp_path / "here"))
    assert cm.cache_dir() == tmp_path / "here"
    assert cm.CheckpointCache().root == tmp_path / "here"
    monkeypatch.delenv("LABLIB_CACHE")
    assert str(cm.cache_dir()) == platformdirs.user_cache_dir("lablib")


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


class TiedNet(nn.Module):
    """Embedding and output head sharing one weight (like a tied LM head), plus a persistent buffer."""

    def __init__(self, vocab: int = 10, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(idx)))) * self.scale


def fresh(seed: int, **kwargs) -> TiedNet:
    torch.manual_seed(seed)
    return TiedNet(**kwargs)


def test_save_load_round_trip_keeps_ties_and_metadata(tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    source = fresh(0)
    with torch.no_grad():
        source.scale.fill_(2.5)
    meta = {"history": {"steps": [0, 1], "loss": [0.1, 0.2]}, "note": "é"}
    path = cache.save("abc123", source, meta)
    assert path == cache.path("abc123") == tmp_path / "abc123.safetensors"

    # the metadata is one JSON string in the safetensors header; the tensors need no pickle
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["lablib_meta"]) == meta
        assert "head.weight" not in handle.keys() or "embed.weight" not in handle.keys()

    target = fresh(1)
    assert cache.load("abc123", target) == meta
    assert target.head.weight is target.embed.weight
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    idx = torch.arange(10)
    assert torch.equal(source(idx), target(idx))
    assert cache.load("missing", fresh(1)) is None


def test_save_does_not_mutate_and_rejects_bad_meta_and_keys(tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    meta = {"a": 1}
    cache.save("k", fresh(0), meta)
    assert meta == {"a": 1}
    with pytest.raises(TypeError, match="JSON-serialisable"):
        cache.save("k2", fresh(0), {"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="meta must be a dict"):
        cache.save("k2", fresh(0), [1, 2])
    assert not cache.path("k2").exists()
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="cache key"):
            cache.path(bad)


def _crashing_save_model(model, filename, metadata=None, force_contiguous=True):
    with open(filename, "wb") as handle:
        handle.write(b"\x10\x00\x00\x00partial")  # half a file, then the "crash"
    raise RuntimeError("disk on fire")


def test_crash_mid_write_leaves_no_partial_entry(tmp_path, monkeypatch):
    cache = cm.CheckpointCache(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_model", _crashing_save_model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.save("k", fresh(0), {"v": 1})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # an older good entry survives a crashed overwrite untouched
    cache.save("k", fresh(0), {"v": 1})
    monkeypatch.setattr(safetensors.torch, "save_model", _crashing_save_model)
    with pytest.raises(RuntimeError):
        cache.save("k", fresh(2), {"v": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]
    assert cache.load("k", fresh(1)) == {"v": 1}


def _corrupt(kind: str, path, cache: cm.CheckpointCache, key: str) -> None:
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a safetensors file" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "shape_mismatch":
        cache.save(key, fresh(0, width=7), {"v": "other width"})
    elif kind == "missing_and_unexpected_keys":
        torch.manual_seed(0)
        cache.save(key, nn.Sequential(nn.Linear(6, 6)), {"v": "other module"})
    elif kind == "wrong_schema":
        safetensors.torch.save_file({"x": torch.zeros(1)}, str(path), metadata={"lablib_schema": "0"})
    elif kind == "metadata_not_json":
        tensors = {k: v.contiguous() for k, v in fresh(0).state_dict().items() if k != "head.weight"}
        safetensors.torch.save_file(tensors, str(path), metadata={"lablib_schema": str(cm.CACHE_SCHEMA),
                                                                 "lablib_meta": "{not json"})
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated", "garbage", "empty", "shape_mismatch", "missing_and_unexpected_keys", "wrong_schema",
               "metadata_not_json"]
PROBLEMS = {
    "truncated": "cannot read it as safetensors",
    "garbage": "cannot read it as safetensors",
    "empty": "cannot read it as safetensors",
    "shape_mismatch": r"embed.weight has shape \(10, 7\), the model wants \(10, 6\)",
    "missing_and_unexpected_keys": r"missing tensors \[.*'embed.weight'.*unexpected tensors \['0.bias', '0.weight'\]",
    "wrong_schema": "cache schema '0'",
    "metadata_not_json": "no readable metadata JSON",
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_entry_warns_deletes_and_leaves_model_untouched(kind, tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    path = cache.save("k", fresh(0), {"v": 1})
    _corrupt(kind, path, cache, "k")
    target = fresh(3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.warns(cm.CorruptCacheWarning, match=str(path)) as record:
        assert cache.load("k", target) is None
    assert len(record) == 1
    assert re.search(PROBLEMS[kind], str(record[0].message)), record[0].message
    assert not path.exists()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# cached_train / cached_json
# ----------------------------------------------------------------------------------------------------------------


def make_run(calls: list[str], *, steps: int = 5):
    def build() -> TiedNet:
        return fresh(0)

    def fit(model: TiedNet) -> dict:
        calls.append("fit")
        idx = torch.arange(10)
        history = tr.train(
            model, batches=iter(lambda: (idx, idx), None), steps=steps, lr=1e-2, progress=False,
            loss_fn=lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]),
        )
        return {**history.to_dict(), "tags": ("a", "b")}

    return build, fit


def test_cached_train_second_call_comes_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABLIB_CACHE", str(tmp_path))
    calls: list[str] = []
    build, fit = make_run(calls)
    config = {"experiment": "tied", "steps": 5, "lr": 1e-2}

    trained, meta, from_cache = cm.cached_train(config, build=build, fit=fit)
    assert (from_cache, calls) == (False, ["fit"])
    assert meta["tags"] == ["a", "b"]  # what the JSON header gives back, on both calls
    assert (tmp_path / f"{cm.config_hash(config)}.safetensors").is_file()

    loaded, meta2, from_cache2 = cm.cached_train(dict(reversed(config.items())), build=build, fit=fit)
    assert (from_cache2, calls) == (True, ["fit"])
    assert meta2 == meta and tr.History.from_dict(meta2).train_loss == meta["train_loss"]
    idx = torch.arange(10)
    assert torch.equal(loaded(idx), trained(idx))
    assert not torch.equal(loaded(idx), build()(idx))  # it really is the trained weights

    cm.cached_train({**config, "lr": 2e-2}, build=build, fit=fit)
    assert calls == ["fit", "fit"]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "shape_mismatch", "missing_and_unexpected_keys"])
def test_cached_train_rebuilds_and_resaves_a_corrupt_entry(kind, tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    calls: list[str] = []
    build, fit = make_run(calls, steps=3)
    config = {"experiment": "heal"}
    reference, meta, _ = cm.cached_train(config, build=build, fit=fit, cache=cache)
    path = cache.path(cm.config_hash(config))
    _corrupt(kind, path, cache, path.stem)

    with pytest.warns(cm.CorruptCacheWarning, match=path.name):
        rebuilt, meta2, from_cache = cm.cached_train(config, build=build, fit=fit, cache=cache)
    assert not from_cache and calls == ["fit", "fit"]
    idx = torch.arange(10)
    # rebuilt from a clean build(): the same deterministic training run as the first time
    assert torch.equal(rebuilt(idx), reference(idx)) and meta2["train_loss"] == meta["train_loss"]
    _, _, from_cache = cm.cached_train(config, build=build, fit=fit, cache=cache)
    assert from_cache and calls == ["fit", "fit"]


def test_cached_train_bad_inputs(tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    with pytest.raises(TypeError, match="build\\(\\) must return an nn.Module"):
        cm.cached_train({"a": 1}, build=lambda: "model", fit=lambda m: {}, cache=cache)
    with pytest.raises(TypeError, match="fit\\(model\\)'s return value must be JSON-serialisable"):
        cm.cached_train({"a": 1}, build=lambda: fresh(0), fit=lambda m: {"w": m.mix.weight}, cache=cache)
    with pytest.raises(TypeError, match=r"config\['x'\]"):
        cm.cached_train({"x": torch.ones(1)}, build=lambda: fresh(0), fit=lambda m: {}, cache=cache)
    assert cache.entries() == []


def test_cached_json_computes_once_and_heals(tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"acc": (0.5, 0.75)}

    first = cm.cached_json({"sweep": 1}, compute, cache=cache)
    second = cm.cached_json({"sweep": 1}, compute, cache=cache)
    assert first == second == {"acc": [0.5, 0.75]} and len(calls) == 1
    path = tmp_path / f"{cm.config_hash({'sweep': 1})}.json"
    assert json.loads(path.read_text())["config"] == {"sweep": 1}
    path.write_text('{"schema": 1, "result": ')
    with pytest.warns(cm.CorruptCacheWarning, match=path.name):
        assert cm.cached_json({"sweep": 1}, compute, cache=cache) == first
    assert len(calls) == 2 and path.is_file()


def test_clear_removes_only_cache_files(tmp_path):
    cache = cm.CheckpointCache(tmp_path)
    cache.save("a", fresh(0), {})
    cm.cached_json({"b": 1}, lambda: {"x": 1}, cache=cache)
    (tmp_path / ".a.safetensors.xyz.tmp").write_bytes(b"left over")
    (tmp_path / "notes.txt").write_text("mine")
    assert len(cache.entries()) == 2
    assert cache.clear() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert cm.CheckpointCache(tmp_path / "nowhere").clear() == 0
