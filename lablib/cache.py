"""A checkpoint cache keyed by configuration, so a lab reruns instantly once it has trained.

The idea is content addressing: a run is named by a hash of everything that determines its result (its
configuration), so "have I trained this before?" is a file lookup. `cached_train(config, build=..., fit=...)`
builds the model, loads the weights stored under `config_hash(config)` if there are any, and otherwise trains it
and stores the weights.

* **Format**: weights are [safetensors](https://huggingface.co/docs/safetensors) files, written with
  `safetensors.torch.save_model` (which drops the duplicate names of tied tensors, e.g. a tied LM head). Loading
  only ever parses safetensors and JSON, never pickle, so a cache file cannot run code. The run's metadata (a
  JSON-serialisable dict, for instance `History.to_dict()`) is stored as one JSON string in the safetensors header.
* **Atomic writes**: a file is written to a temporary name in the cache directory and moved into place with
  `os.replace`, so a crash mid-write never leaves a partial entry under the real name.
* **Self-healing**: an entry that cannot be used (truncated, garbage, written for a different architecture: missing
  or unexpected tensors, wrong shapes or dtypes) triggers a `CorruptCacheWarning` naming the file and the problem; the
  file is deleted and the caller rebuilds. The model is only touched once the whole file has been checked.
* **Location**: `$LABLIB_CACHE` if set, else the user cache directory (`platformdirs.user_cache_dir("lablib")`).

`config_hash` hashes canonical JSON (sorted keys; floats by `repr`, so 0.1 stays `0.1`) plus `CACHE_SCHEMA`. Bump
`CACHE_SCHEMA` when the training code changes what a configuration produces, to retire old entries. Lists and
tuples hash alike (both are JSON arrays), and a dataclass hashes like the dict of its fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CACHE_SCHEMA",
    "CorruptCacheWarning",
    "cache_dir",
    "config_hash",
    "CheckpointCache",
    "cached_train",
    "cached_json",
]

# part of every hash and every file: bump to invalidate all entries at once
CACHE_SCHEMA = 1
_META_KEY = "lablib_meta"
_SCHEMA_KEY = "lablib_schema"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TMP_SUFFIX = ".tmp"


class CorruptCacheWarning(UserWarning):
    """A cache entry could not be used; it was deleted and will be rebuilt."""


def cache_dir() -> Path:
    """`$LABLIB_CACHE` when set (and non-empty), else the platform's user cache directory for lablib."""
    override = os.environ.get("LABLIB_CACHE", "").strip()
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lablib"))


# ----------------------------------------------------------------------------------------------------------------
# Hashing configurations
# ----------------------------------------------------------------------------------------------------------------


def _canonical(value: Any, path: str) -> Any:
    """A JSON-ready copy of `value` built only from dict/list/str/int/float/bool/None; TypeError names the path."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):  # int and numpy integers
        return int(value)
    if isinstance(value, float):  # float and numpy.float64; json writes repr(x), the shortest exact form
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"config_hash needs string keys, got {key!r} ({type(key).__name__}) in {path}")
            out[key] = _canonical(item, f"{path}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"config_hash cannot hash {path} of type {type(value).__name__}; use dicts, dataclasses, lists, tuples, "
        "str, int, float, bool or None (convert tensors with .tolist(), describe functions by name)"
    )


def _canonical_json(config: Any) -> str:
    payload = {"schema": CACHE_SCHEMA, "config": _canonical(config, "config")}
    # sorted keys and fixed separators: the same config always gives the same bytes
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def config_hash(config: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of `config` and `CACHE_SCHEMA`.

    Same config -> same hash, whatever the key order; 0.1 and 0.1000000001 differ; 1 and 1.0 and True differ.
    Raises TypeError naming the key path (e.g. `config['model']['init']`) of a value it cannot hash.
    """
    return hashlib.sha256(_canonical_json(config).encode("ascii")).hexdigest()[:16]


def _json_dumps_meta(meta: Any, *, what: str) -> str:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-serialisable: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run `write(tmp_name)` on a temporary file next to `path`, then move it into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp_name)
        # flush to disk before the rename, so a power cut cannot leave a renamed but empty file
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


class CheckpointCache:
    """Weights (+ metadata) on disk, one safetensors file per key: `<root>/<key>.safetensors`.

    `root` defaults to `cache_dir()` at construction time. Keys are what `config_hash` returns (any name of
    letters, digits, `_`, `.`, `-` starting with a letter or digit works).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_dir()

    def __repr__(self) -> str:
        return f"CheckpointCache(root={str(self.root)!r})"

    def _file(self, key: str, suffix: str) -> Path:
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"cache key must be letters, digits, '_', '.', '-' (not starting with them), got {key!r}")
        return self.root / f"{key}{suffix}"

    def path(self, key: str) -> Path:
        """Where the weights for `key` live (the file may not exist)."""
        return self._file(key, ".safetensors")

    def _discard(self, path: Path, problem: str) -> None:
        warnings.warn(
            f"lablib cache entry {path} is unusable ({problem}); deleted it, it will be rebuilt",
            CorruptCacheWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)

    def save(self, key: str, model: nn.Module, meta: Mapping[str, Any]) -> Path:
        """Store `model`'s state dict and `meta` (JSON-serialisable) under `key`, atomically; returns the path."""
        import safetensors.torch

        meta_json = _json_dumps_meta(meta, what="meta")
        path = self.path(key)
        header = {_META_KEY: meta_json, _SCHEMA_KEY: str(CACHE_SCHEMA)}
        # save_model adds an entry to the header for each tied name it drops; give it a fresh dict every time
        _write_atomically(path, lambda tmp: safetensors.torch.save_model(model, tmp, metadata=dict(header)))
        return path

    def load(self, key: str, model: nn.Module) -> dict[str, Any] | None:
        """Load the weights stored under `key` into `model` and return their metadata; None when there is no entry.

        An unusable entry (unreadable, wrong schema, or tensors that do not fit `model`) gives a
        `CorruptCacheWarning`, is deleted, and None is returned with `model` left untouched.
        """
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                stored = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own SafetensorError, OSError for I/O trouble
            self._discard(path, f"cannot read it as safetensors: {error}")
            return None

        if header.get(_SCHEMA_KEY) != str(CACHE_SCHEMA):
            self._discard(path, f"cache schema {header.get(_SCHEMA_KEY)!r}, expected {str(CACHE_SCHEMA)!r}")
            return None
        try:
            meta = json.loads(header[_META_KEY])
        except (KeyError, ValueError) as error:
            self._discard(path, f"no readable metadata JSON in the header: {error!r}")
            return None
        if not isinstance(meta, dict):
            self._discard(path, f"metadata is a {type(meta).__name__}, not a dict")
            return None

        state = self._match_state(path, stored, model)
        if state is None:
            return None
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        return meta

    def _match_state(
        self, path: Path, stored: dict[str, torch.Tensor], model: nn.Module
    ) -> dict[str, torch.Tensor] | None:
        """The full state dict for `model` from the file's tensors, or None (after discarding) if they do not fit."""
        wanted = model.state_dict()
        state, missing = {}, []
        for name, tensor in wanted.items():
            if name in stored:
                state[name] = stored[name]
                continue
            # a tied tensor was saved under one of its names only (save_model drops the duplicates)
            alias = next((other for other in stored if other in wanted and _shares_memory(wanted[other], tensor)), None)
            if alias is None:
                missing.append(name)
            else:
                state[name] = stored[alias]
        unexpected = sorted(set(stored) - set(wanted))
        problems = []
        if missing:
            problems.append(f"missing tensors {missing}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected}")
        for name, tensor in state.items():
            if tensor.shape != wanted[name].shape:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, the model wants {tuple(wanted[name].shape)}")
            elif tensor.dtype != wanted[name].dtype:
                problems.append(f"{name} has dtype {tensor.dtype}, the model wants {wanted[name].dtype}")
        if problems:
            self._discard(path, "does not fit the model: " + "; ".join(problems))
            return None
        return state

    def _json_path(self, key: str) -> Path:
        return self._file(key, ".json")

    def _load_json(self, key: str) -> dict[str, Any] | None:
        path = self._json_path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            self._discard(path, f"not valid JSON: {error}")
            return None
        if not isinstance(record, dict) or record.get("schema") != CACHE_SCHEMA or not isinstance(
            record.get("result"), dict
        ):
            self._discard(path, f"not a lablib schema-{CACHE_SCHEMA} record with a 'result' dict")
            return None
        return record["result"]

    def _save_json(self, key: str, result: Mapping[str, Any], config: Any) -> Path:
        _json_dumps_meta(result, what="result")  # TypeError now, before anything is written
        record = {"schema": CACHE_SCHEMA, "config": _canonical(config, "config"), "result": result}
        text = json.dumps(record, sort_keys=True, indent=1)
        path = self._json_path(key)
        _write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path

    def entries(self) -> list[Path]:
        """The cache's files (weights and JSON results), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))

    def clear(self) -> int:
        """Delete this cache's entries (and leftover temporary files); other files in `root` are left alone.

        Returns how many files were removed.
        """
        if not self.root.is_dir():
            return 0
        leftovers = [p for p in self.root.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(
            _TMP_SUFFIX)]
        removed = 0
        for path in [*self.entries(), *leftovers]:
            path.unlink(missing_ok=True)
            removed += 1
        return removed


def _through_json(meta: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """`meta` as it will read back from the cache (so a fresh run and a cached one return equal dicts)."""
    return json.loads(_json_dumps_meta(meta, what=what))


def cached_train(
    config: Mapping[str, Any],
    *,
    build: Callable[[], nn.Module],
    fit: Callable[[nn.Module], Mapping[str, Any]],
    cache: CheckpointCache | None = None,
) -> tuple[nn.Module, dict[str, Any], bool]:
    """`(model, meta, from_cache)`: the trained model for `config`, from the cache when possible.

    `build()` makes the untrained model (seed it inside build); `fit(model)` trains it in place and returns a
    JSON-serialisable dict (e.g. `History.to_dict()`), stored with the weights and returned as `meta`. On a hit,
    `fit` is not called and `from_cache` is True. `meta` is the JSON round trip of what `fit` returned either way.
    """
    key = config_hash(config)
    cache = CheckpointCache() if cache is None else cache
    model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"build() must return an nn.Module, got {type(model).__name__}")
    meta = cache.load(key, model)
    if meta is not None:
        return model, meta, True
    meta = _through_json(fit(model), what="fit(model)'s return value")
    cache.save(key, model, meta)
    return model, meta, False


def cached_json(
    config: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]], *, cache: CheckpointCache | None = None
) -> dict[str, Any]:
    """A JSON-serialisable result (a sweep's numbers, no weights) cached under `config_hash(config)`.

    Stored as `<root>/<key>.json` with the canonical config beside it, for inspection; same healing rules as
    weights. Returns the JSON round trip of `compute()` (so fresh and cached calls return equal dicts).
    """
    key = config_hash(config)
    cache = CheckpointCache() if cache is None else cache
    result = cache._load_json(key)
    if result is not None:
        return result
    result = _through_json(compute(), what="compute()'s return value")
    cache._save_json(key, result, config)
    return result
