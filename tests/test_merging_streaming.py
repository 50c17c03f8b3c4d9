"""Streaming safetensors merge: identical to the in-memory merge, header-checked inputs, and the CLI end to end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lablib import merging  # noqa: E402
from lablib.__main__ import main  # noqa: E402
from lablib.merging.streaming import (  # noqa: E402
    STREAMABLE,
    SafetensorsReader,
    merge_safetensors,
    write_safetensors,
)


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(11, 6, generator=g).to(dtype),
        "mlp.fc1.weight": torch.randn(8, 6, generator=g).to(dtype),
        "mlp.fc1.bias": torch.randn(8, generator=g).to(dtype),
        "norm.weight": torch.randn(6, generator=g).to(dtype),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


@pytest.fixture
def checkpoints(tmp_path):
    base = _state(0)
    models = [{k: v + 0.3 * torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for _ in range(3)]
    torch.manual_seed(1)
    paths = []
    save_file(base, str(tmp_path / "base.safetensors"))
    # model 0 is sharded into a folder; the others are single files
    shard = tmp_path / "m0"
    shard.mkdir()
    keys = list(base)
    save_file({k: models[0][k] for k in keys[:2]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: models[0][k] for k in keys[2:]}, str(shard / "model-00002-of-00002.safetensors"))
    paths.append(shard)
    for i in (1, 2):
        save_file(models[i], str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    return tmp_path / "base.safetensors", paths, base, models


CASES = [
    ("linear", {}),
    ("task_arithmetic", {"lambda_": 0.7}),
    ("magnitude_prune", {"density": 0.5}),
    ("ties", {"density": 0.4, "lambda_": 1.2}),
    ("ties", {"density": 0.4, "convention": "mergekit", "weight": [1.0, 0.5, 2.0]}),
    ("dare_linear", {"density": 0.3, "seed": 5}),
    ("dare_ties", {"density": 0.3, "seed": 5, "convention": "mergekit"}),
    ("darex_q", {"density": 0.1, "q": 0.3, "seed": 2}),
    ("pcb", {"density": 0.5, "scope": "per_tensor"}),
    ("iso_c", {"lambda_": 1.1}),
    ("iso_cts", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(checkpoints, tmp_path, method, params):
    base_path, paths, base, models = checkpoints
    report = merge_safetensors(method, base_path, paths, tmp_path / "out", **params)
    streamed = load_file(str(report.path))
    expected = merging.merge(method, base, models, **params)
    assert sorted(streamed) == sorted(expected)
    for key in expected:
        assert streamed[key].dtype == expected[key].dtype
        assert torch.equal(streamed[key], expected[key]), key
    assert report.num_tensors == len(base)
    assert report.largest_tensor_bytes == 11 * 6 * 4


def test_every_streamable_method_is_tested():
    assert {m for m, _ in CASES} == set(STREAMABLE)


def test_bf16_roundtrip_and_metadata(tmp_path):
    base, a, b = (_state(s, torch.bfloat16) for s in range(3))
    for name, state in (("b", base), ("a", a), ("c", b)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    report = merge_safetensors("task_arithmetic", tmp_path / "b.safetensors",
                               [tmp_path / "a.safetensors", tmp_path / "c.safetensors"], tmp_path / "o.safetensors")
    got = load_file(str(report.path))
    want = merging.task_arithmetic(base, [a, b])
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == torch.bfloat16 for k in want if k != "steps")
    with safe_open(str(report.path), framework="pt") as handle:
        assert handle.metadata()["merge_method"] == "task_arithmetic"


def test_writer_matches_safetensors(tmp_path):
    state = _state(4)
    state["mask"] = torch.tensor([True, False, True])
    write_safetensors(state, tmp_path / "w.safetensors", metadata={"x": 1})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_mismatch_names_the_key(tmp_path):
    base = _state(0)
    other = dict(_state(1))
    other["mlp.fc1.bias"] = torch.zeros(9)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(other, str(tmp_path / "a.safetensors"))
    with pytest.raises(merging.StateDictMismatchError, match="mlp.fc1.bias"):
        merge_safetensors("ties", tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o")
    del other["mlp.fc1.bias"]
    save_file(other, str(tmp_path / "a.safetensors"))
    with pytest.raises(merging.StateDictMismatchError, match="missing key 'mlp.fc1.bias'"):
        merge_safetensors("ties", tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o")
    other["mlp.fc1.bias"] = torch.zeros(8, dtype=torch.float16)
    save_file(other, str(tmp_path / "a.safetensors"))
    with pytest.raises(merging.StateDictMismatchError, match="dtype"):
        merge_safetensors("ties", tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o")


def test_refuses_global_methods_and_bad_paths(checkpoints, tmp_path):
    base_path, paths, _, _ = checkpoints
    with pytest.raises(ValueError, match="cannot be merged tensor by tensor"):
        merge_safetensors("fisher", None, paths, tmp_path / "o")
    with pytest.raises(ValueError, match="global"):
        merge_safetensors("ties", base_path, paths, tmp_path / "o", convention="official")
    with pytest.raises(ValueError, match="global"):
        merge_safetensors("pcb", base_path, paths, tmp_path / "o")
    with pytest.raises(ValueError, match="needs a base"):
        merge_safetensors("ties", None, paths, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="neither"):
        merge_safetensors("linear", None, [tmp_path / "nope.safetensors"], tmp_path / "o")
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_safetensors("nope", None, paths, tmp_path / "o")


def test_reader_reads_one_tensor(checkpoints):
    _, paths, _, models = checkpoints
    reader = SafetensorsReader(paths[0])
    assert sorted(reader.keys()) == sorted(models[0])
    assert torch.equal(reader.get("norm.weight"), models[0]["norm.weight"])
    assert reader.nbytes() == sum(v.numel() * v.element_size() for v in models[0].values())


def test_cli_merges_end_to_end(checkpoints, tmp_path, capsys):
    base_path, paths, base, models = checkpoints
    code = main(["merge", "--method", "ties", "--base", str(base_path), "--models", *map(str, paths),
                 "--out", str(tmp_path / "cli"), "--density", "0.4", "--lambda", "0.9",
                 "--param", "convention=\"mergekit\""])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    got = load_file(str(tmp_path / "cli" / "model.safetensors"))
    want = merging.ties(base, models, density=0.4, lambda_=0.9, convention="mergekit")
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a bad option fails with a readable message, exit code 2
    assert main(["merge", "--method", "ties", "--models", str(paths[1]), "--out", str(tmp_path / "x")]) == 2
    assert "needs a base" in capsys.readouterr().err


def test_reader_rejects_broken_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        SafetensorsReader(tmp_path / "junk.safetensors")
    save_file({"w": torch.ones(100)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated at key 'w'"):
        SafetensorsReader(tmp_path / "t.safetensors").get("w")
