"""Byte-level text data: Python's help texts, a fixed contiguous 90/5/5 split, windows
of block_size bytes with next-byte targets, the unigram baseline."""

from __future__ import annotations

import math

import pytest
import torch

from singd_lightning.data import DATAMODULES, TextDataModule, create_datamodule
from singd_lightning.data.text import VOCAB_SIZE, ByteWindows, corpus_bytes, split_bytes, unigram_entropy


def test_corpus_is_the_python_help_texts_split_in_contiguous_blocks() -> None:
    from pydoc_data.topics import topics

    assert DATAMODULES["text"] is TextDataModule
    data, digest = corpus_bytes()
    text = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")
    assert data.dtype == torch.uint8 and bytes(data.tolist()) == text and len(digest) == 64
    assert data.numel() > 300_000  # ~0.47 MB in CPython 3.11
    train, val, test = split_bytes()
    assert train.dtype == torch.int64
    assert torch.equal(torch.cat([train, val, test]), data.long())  # contiguous, in order, all of it
    assert abs(train.numel() / data.numel() - 0.90) < 1e-3 and abs(val.numel() / data.numel() - 0.05) < 1e-3


def test_windows_hold_next_byte_targets() -> None:
    data = torch.arange(20)
    windows = ByteWindows(data, block_size=4, stride=4)
    assert len(windows) == 4  # starts 0, 4, 8, 12 (each needs 5 bytes)
    x, y = windows[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    assert windows[-1][0].tolist() == [12, 13, 14, 15]
    with pytest.raises(IndexError):
        windows[4]
    assert len(ByteWindows(data, block_size=4, stride=1)) == 16
    with pytest.raises(ValueError, match="block_size=30 needs at least 31 bytes per split, got 20"):
        ByteWindows(data, 30, 30)


def test_datamodule_loaders_and_attributes() -> None:
    dm = create_datamodule("text", batch_size=8, block_size=32)
    assert (dm.num_classes, dm.vocab_size, dm.seq_len) == (VOCAB_SIZE, VOCAB_SIZE, 32)
    assert dm.loss_average == "batch+sequence" and dm.byte_level
    dm.setup("fit")
    train, val, test = split_bytes()
    assert len(dm.train_set) == (train.numel() - 33) // 32 + 1
    assert len(dm.val_set) == (val.numel() - 33) // 32 + 1 and len(dm.test_set) == (test.numel() - 33) // 32 + 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 32) and y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x_val, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x_val[0], val[:32])  # validation in order, unshuffled
    overlapping = create_datamodule("text", block_size=32, stride=16)
    overlapping.setup()
    assert len(overlapping.train_set) == (train.numel() - 33) // 16 + 1


def test_training_order_is_seeded_and_resumable() -> None:
    def first_batch(seed: int, epoch: int = 0) -> torch.Tensor:
        dm = TextDataModule(batch_size=4, block_size=16)
        dm.shuffle_seed = seed
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(0, epoch=1))


def test_unigram_baseline() -> None:
    nats, bits = unigram_entropy(torch.tensor([0, 0, 1, 1]))
    assert nats == pytest.approx(math.log(2)) and bits == pytest.approx(1.0)
    assert unigram_entropy(torch.tensor([7, 7, 7])) == (0.0, 0.0)
    dm = TextDataModule()
    assert dm.unigram_nats is None
    dm.setup()
    assert (dm.unigram_nats, dm.unigram_bits) == unigram_entropy(split_bytes()[0])
    assert 2.5 < dm.unigram_nats < 4.0 and dm.unigram_bits == pytest.approx(dm.unigram_nats / math.log(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
        ({"block_size": 2.5}, "block_size must be an integer >= 1"),
        ({"stride": 0}, "stride must be an integer >= 1 or None, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)
