"""Byte-level text: the help-topic texts of Python's standard library, offline.

The corpus is ``pydoc_data.topics.topics``, the dict of help texts that
``help("topics")`` shows (79 topics, about 0.47 MB of English prose with code
examples in CPython 3.11). It ships with every CPython installation, under the
Python Software Foundation License (PSF-2.0), as part of the Python
documentation. The topics are joined in sorted order of their names (blank lines
between them) and encoded as UTF-8: the byte sequence is the data, its 256 byte
values the vocabulary. Its content follows the running Python's documentation, so
the exact bytes (and the numbers measured on them) can differ between Python
versions; :func:`corpus_bytes` gives a fingerprint to record.

The split is fixed, by contiguous blocks: the first 90 % of the bytes train, the
next 5 % validate, the last 5 % test (no random split: neighbouring windows of a
text are nearly duplicates). Each split is cut into non-overlapping windows of
``block_size + 1`` bytes (training may use a smaller ``stride``); a sample is the
window's first ``block_size`` bytes and, as targets, the ``block_size`` bytes one
position later (next-byte prediction).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.data import Dataset

from singd_lightning.data._common import ImageClassificationDataModule

#: Bytes in the vocabulary: every byte value.
VOCAB_SIZE: int = 256
#: Fractions of the corpus in the (train, validation, test) splits, in this order.
SPLIT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)
#: What separates two topics in the joined corpus.
TOPIC_SEPARATOR: str = "\n\n"


@lru_cache(maxsize=1)
def _corpus() -> Tensor:
    from pydoc_data.topics import topics

    text = TOPIC_SEPARATOR.join(topics[name] for name in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def corpus_bytes() -> tuple[Tensor, str]:
    """The whole corpus as bytes, and its SHA-256 (hex), which names its version.

    Returns:
        A fresh ``(n,)`` uint8 tensor and the digest of its bytes.
    """
    data = _corpus().clone()
    return data, hashlib.sha256(data.numpy().tobytes()).hexdigest()


def split_bytes() -> tuple[Tensor, Tensor, Tensor]:
    """The (train, validation, test) bytes of the fixed 90/5/5 split, as int64
    tensors (fresh copies)."""
    data = _corpus()
    n = data.numel()
    n_train = int(n * SPLIT_FRACTIONS[0])
    n_val = int(n * SPLIT_FRACTIONS[1])
    parts = (data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :])
    return tuple(part.to(torch.int64) for part in parts)  # type: ignore[return-value]


def unigram_entropy(data: Tensor) -> tuple[float, float]:
    """The entropy of the byte distribution of ``data``: the loss of the best model
    that ignores context (it predicts every byte with the bytes' frequencies).

    Returns:
        ``(nats per byte, bits per byte)``.
    """
    counts = torch.bincount(data.flatten().to(torch.int64), minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    nats = float(-(p * p.log()).sum())
    return nats, nats / math.log(2)


class ByteWindows(Dataset):
    """Windows of a byte sequence: item ``i`` is ``(x, y)``, ``x`` the
    ``block_size`` bytes from ``i * stride`` and ``y`` the bytes one later, both
    int64 of shape ``(block_size,)``.

    Args:
        data: The bytes, a 1-D integer tensor.
        block_size: Length of a sample.
        stride: Offset between consecutive windows (``block_size``: no overlap).
    """

    def __init__(self, data: Tensor, block_size: int, stride: int) -> None:
        if data.numel() < block_size + 1:
            raise ValueError(
                f"block_size={block_size} needs at least {block_size + 1} bytes per split, got {data.numel()}."
            )
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (self.data.numel() - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows.")
        start = (index % len(self)) * self.stride
        window = self.data[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class TextDataModule(ImageClassificationDataModule):
    """Next-byte prediction on the Python help texts (see the module docstring).

    Batches are ``(x, y)`` of shape ``(batch_size, block_size)`` (int64): the model
    maps ``x`` to logits ``(batch_size, block_size, 256)``, the loss is the mean
    over every position. Exposes ``num_classes`` = ``vocab_size`` = 256,
    ``seq_len`` = ``block_size``, ``loss_average = "batch+sequence"`` (what the
    Kronecker methods must assume for a loss averaged over positions),
    ``byte_level = True`` (the app then logs bits per byte) and, after
    :meth:`setup`, ``unigram_nats`` and ``unigram_bits``: the entropy of the
    training bytes, the loss to beat.

    Args:
        batch_size: Sequences per batch.
        block_size: Bytes per sequence (the model's context length).
        stride: Offset between training windows (``None``: ``block_size``, no
            overlap); validation and test windows never overlap.
        num_workers: Loader worker processes (0 is fastest for in-memory data).
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
    """

    num_classes = VOCAB_SIZE
    vocab_size = VOCAB_SIZE
    in_chans = 1
    loss_average = "batch+sequence"
    byte_level = True

    def __init__(
        self,
        batch_size: int = 32,
        block_size: int = 128,
        stride: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise ValueError(f"stride must be an integer >= 1 or None, got {stride!r}.")
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self.save_hyperparameters()
        self.block_size = block_size
        self.seq_len = block_size
        self.stride = block_size if stride is None else stride
        self.unigram_nats: float | None = None
        self.unigram_bits: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, test = split_bytes()
        self.train_set = ByteWindows(train, self.block_size, self.stride)
        self.val_set = ByteWindows(val, self.block_size, self.block_size)
        self.test_set = ByteWindows(test, self.block_size, self.block_size)
        self.unigram_nats, self.unigram_bits = unigram_entropy(train)


__all__ = [
    "SPLIT_FRACTIONS",
    "VOCAB_SIZE",
    "ByteWindows",
    "TextDataModule",
    "corpus_bytes",
    "split_bytes",
    "unigram_entropy",
]
