"""Streaming merge of safetensors checkpoints: one tensor per input model in memory at a time.

`merge_safetensors(method, base, models, out)` merges checkpoints stored as safetensors files (one file, or a folder
of shards, with or without a `model.safetensors.index.json`) key by key:

    for each key k (in the base's order):
        read θ_0[k], θ_1[k], ..., θ_T[k] from the memory-mapped inputs        (one tensor per input)
        θ[k] = merge(method, {k: θ_0[k]}, [{k: θ_t[k]}])                        (the registry's own function)
        append θ[k]'s bytes to the output file, whose header was written first  (nothing kept)

so peak memory stays near (T + 2) tensors, not whole models. Because it calls the same registered function on
one-key state dicts, it gives exactly the in-memory result for every method that works key by key (everything in
`STREAMABLE`; DARE's random masks are seeded per key and model, `key_generator`, so they match too). Methods that
need all keys at once are refused with the reason: `fisher` (needs Fisher state dicts), the official TIES trim
(`scope="global"` ranks magnitudes over the whole flattened model) and PCB unless `scope="per_tensor"`.

The output header is written before any tensor: shapes and dtypes are the base's (the merge contract keeps the
reference's dtypes), so the writer never holds more than the tensor it is writing. The file follows the safetensors
format (8-byte little-endian header length, JSON header with `dtype`, `shape`, `data_offsets`, then the raw
little-endian bytes), read back by `safetensors` in the tests. Reading and writing use plain file I/O, so the
module needs no safetensors package and no memory map.

Command line: `python -m lablib merge --method ties --base B --models A1 A2 --out DIR --density 0.2`.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lablib.merging.core import METHOD_INFO, StateDictMismatchError, canonical_params, merge

__all__ = ["STREAMABLE", "StreamingMergeReport", "SafetensorsReader", "merge_safetensors", "write_safetensors"]

STREAMABLE = (
    "linear", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "darex_q", "pcb", "iso_c",
    "iso_cts",
)

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (key -> {dtype, shape, data_offsets}) and where its data starts."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file (bad header: {error})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsReader:
    """A safetensors checkpoint (a file, or a folder of `*.safetensors` shards) read one tensor at a time.

    Keys, shapes and dtypes come from the headers only; `get(key)` seeks to that tensor and reads just its bytes with
    plain file reads (no memory map, so pages of other tensors never count toward the process's memory).
    """

    def __init__(self, path: str | os.PathLike, *, name: str = "model") -> None:
        self.path = Path(path)
        self.name = name
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{name}: no *.safetensors file in folder {self.path}")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"{name}: {self.path} is neither a safetensors file nor a folder of them")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self._where: dict[str, tuple[int, int]] = {}
        for file in files:
            header, data_start = _read_header(file)
            for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                entry = header[key]
                if key in self.file_of:
                    raise ValueError(f"{name}: key {key!r} appears in two shards ({self.file_of[key]} and {file})")
                if entry["dtype"] not in _DTYPES:
                    raise TypeError(f"{name}: key {key!r} has dtype {entry['dtype']}, which lablib cannot merge")
                begin, end = entry["data_offsets"]
                self.file_of[key] = file
                self.shape[key] = tuple(int(n) for n in entry["shape"])
                self.dtype[key] = _DTYPES[entry["dtype"]]
                self._where[key] = (data_start + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise StateDictMismatchError(f"{self.name} has no key {key!r}")
        offset, size = self._where[key]
        buffer = bytearray(size)
        with open(self.file_of[key], "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != size:
                raise ValueError(f"{self.name}: {self.file_of[key]} is truncated at key {key!r}")
        dtype = self.dtype[key]
        if size == 0:
            return torch.empty(self.shape[key], dtype=dtype)
        storage = torch.uint8 if dtype == torch.bool else dtype
        tensor = torch.frombuffer(buffer, dtype=storage).reshape(self.shape[key])
        return tensor.to(torch.bool) if dtype == torch.bool else tensor

    def nbytes(self) -> int:
        return sum(size for _, size in self._where.values())


def _check_streams(reference: SafetensorsReader, others: Sequence[SafetensorsReader]) -> None:
    """Same keys, shapes and dtypes everywhere, checked from the headers before reading any tensor."""
    ref_keys = set(reference.keys())
    for other in others:
        missing = sorted(ref_keys - set(other.keys()))
        extra = sorted(set(other.keys()) - ref_keys)
        if missing:
            raise StateDictMismatchError(f"{other.name} is missing key {missing[0]!r} that {reference.name} has")
        if extra:
            raise StateDictMismatchError(f"{other.name} has key {extra[0]!r} that {reference.name} lacks")
        for key in reference.keys():
            if other.shape[key] != reference.shape[key]:
                raise StateDictMismatchError(
                    f"key {key!r}: {other.name} has shape {other.shape[key]}, {reference.name} "
                    f"{reference.shape[key]}"
                )
            if other.dtype[key] != reference.dtype[key]:
                raise StateDictMismatchError(
                    f"key {key!r}: {other.name} has dtype {other.dtype[key]}, {reference.name} "
                    f"{reference.dtype[key]}"
                )


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim) so RSS tracks what is live, not what glibc keeps
    after a key's tensors of mixed sizes fragmented its heap. A no-op where there is no glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _header(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"key {key!r}: dtype {dtype} cannot be written to safetensors")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # the format pads the header with spaces so the data starts 8-byte aligned
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata=None) -> Path:
    """Write a state dict to one safetensors file (header first, then the tensors in order). Returns the path."""
    path = Path(path)
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    with open(path, "wb") as handle:
        handle.write(_header(entries, metadata))
        for key, value in state.items():
            handle.write(_tensor_bytes(value))
    return path


@dataclass(frozen=True)
class StreamingMergeReport:
    """What `merge_safetensors` did: the output file, the tensors merged and copied, bytes read and written, the
    largest single tensor (the unit of memory it holds per input), and the wall time."""

    path: Path
    method: str
    params: dict[str, Any]
    num_tensors: int
    bytes_read: int
    bytes_written: int
    largest_tensor_bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / max(self.seconds, 1e-9)


def merge_safetensors(
    method: str,
    base: str | os.PathLike | None,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    /,
    **params: Any,
) -> StreamingMergeReport:
    """Merge safetensors checkpoints tensor by tensor with registry method `method`; write `out`.

    `base` and each of `models` is a `.safetensors` file or a folder of shards; `out` is a folder (the merge is
    written to `out/model.safetensors`) or a path ending in `.safetensors`. `params` are the method's parameters,
    as for `merging.merge`. Returns a `StreamingMergeReport`. The result equals
    `merge(method, load(base), [load(m) ...], **params)` for every method in `STREAMABLE`.
    """
    if method not in METHOD_INFO:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(METHOD_INFO)}")
    if method not in STREAMABLE:
        raise ValueError(
            f"{method} cannot be merged tensor by tensor (it needs all keys at once); streamable methods: "
            f"{list(STREAMABLE)}. Load the state dicts and call merging.merge instead."
        )
    params = canonical_params(method, params)
    # PCB scores all keys together unless told scope="per_tensor"; TIES's official convention trims globally
    global_scope = params.get("scope", "global" if method == "pcb" else None) == "global"
    if params.get("convention") == "official" or global_scope:
        raise ValueError(
            f"{method} with the official/global trim ranks magnitudes over the whole model, so it cannot stream; "
            "use convention='peft' or 'mergekit' (per-tensor trim), or merge in memory"
        )
    if isinstance(models, (str, bytes, os.PathLike)) or len(models) == 0:
        raise ValueError("models must be a non-empty list of safetensors paths")
    info = METHOD_INFO[method]
    if info.needs_base and base is None:
        raise ValueError(f"{method} needs a base checkpoint (task vectors are models minus base)")
    readers = [SafetensorsReader(m, name=f"models[{i}] ({m})") for i, m in enumerate(models)]
    base_reader = SafetensorsReader(base, name=f"base ({base})") if base is not None else None
    reference = base_reader if base_reader is not None else readers[0]
    _check_streams(reference, [r for r in [base_reader, *readers] if r is not None and r is not reference])

    out = Path(out)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "model.safetensors"
    keys = reference.keys()
    entries = [(k, reference.dtype[k], reference.shape[k]) for k in keys]
    metadata = {"format": "pt", "merge_method": method, "merge_params": json.dumps(params, default=str)}
    start = time.perf_counter()
    bytes_read = bytes_written = largest = 0
    with open(out, "wb") as handle:
        handle.write(_header(entries, metadata))
        for key in keys:
            # one tensor per input model in memory
            base_state = {key: base_reader.get(key)} if base_reader is not None else None
            model_states = [{key: r.get(key)} for r in readers]
            size = model_states[0][key].numel() * model_states[0][key].element_size()
            bytes_read += size * (len(readers) + (base_reader is not None))
            largest = max(largest, size)
            merged = merge(method, base_state, model_states, **params)[key]
            if merged.dtype != reference.dtype[key] or tuple(merged.shape) != reference.shape[key]:
                raise RuntimeError(f"{method} changed key {key!r}'s dtype or shape; the header was already written")
            data = _tensor_bytes(merged)
            handle.write(data)
            bytes_written += len(data)
            del base_state, model_states, merged, data
            _release_freed_memory()
    return StreamingMergeReport(
        path=out, method=method, params=params, num_tensors=len(keys), bytes_read=bytes_read,
        bytes_written=bytes_written, largest_tensor_bytes=largest, seconds=time.perf_counter() - start,
    )
