"""MNIST-1D data module: generated offline, seeded, 3500/500/1000 sequences of length 40."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from singd_lightning.data import DATAMODULES, MNIST1DDataModule, create_datamodule
from singd_lightning.data.mnist1d import load_mnist1d_tensors
from singd_lightning.data.sampler import epoch_seeded_loader


def _setup(**kwargs) -> MNIST1DDataModule:
    dm = create_datamodule("mnist1d", batch_size=32, **kwargs)
    dm.setup("fit")
    return dm


def test_generated_sizes_and_attributes() -> None:
    assert DATAMODULES["mnist1d"] is MNIST1DDataModule
    x, y, x_test, y_test = load_mnist1d_tensors()
    assert x.shape == (4000, 1, 40) and x_test.shape == (1000, 1, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert y.shape == (4000,) and y_test.shape == (1000,)
    assert set(y.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))
    dm = MNIST1DDataModule()
    assert (dm.num_classes, dm.in_chans, dm.seq_len) == (10, 1, 40)


def test_splits_and_loader_shapes() -> None:
    dm = _setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3500, 500, 1000)
    train_idx, val_idx = dm.split_indices
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 40) and y.shape == (32,)
    # the test split is the generator's 1000 test sequences, in order
    x_test, y_test = load_mnist1d_tensors()[2:]
    assert torch.equal(dm.test_set.tensors[0], x_test) and torch.equal(dm.test_set.tensors[1], y_test)


def test_deterministic_for_a_seed_and_rng_left_alone() -> None:
    random.seed(1)
    np.random.seed(1)
    before = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    a, b = _setup(seed=3), _setup(seed=3)
    # the generator reseeds the global generators: they must be restored
    assert (random.random(), np.random.rand()) == before
    for sa, sb in zip((a.train_set, a.val_set), (b.train_set, b.val_set)):
        assert all(torch.equal(ta, tb) for ta, tb in zip(sa.tensors, sb.tensors))
    other = _setup(seed=4)
    assert not torch.equal(a.split_indices[1], other.split_indices[1])
    # another generator seed gives other sequences; the cache hands out copies
    assert not torch.equal(load_mnist1d_tensors(7)[0], load_mnist1d_tensors()[0])
    load_mnist1d_tensors()[0].zero_()
    assert load_mnist1d_tensors()[0].abs().sum() > 0


def test_training_loader_uses_the_epoch_seeded_sampler() -> None:
    dm = _setup()
    dm.shuffle_seed = 5
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    expected = torch.cat([y for _, y in epoch_seeded_loader(dm.train_set, seed=5, epoch=0, batch_size=32)])
    assert torch.equal(labels, expected) and len(labels) == 3500
    dm.shuffle_seed = 6
    assert not torch.equal(torch.cat([y for _, y in dm.train_dataloader()]), labels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 0}, "val_size must be an integer in \\[1, 3999\\] or a fraction"),
        ({"val_size": 4000}, "val_size must be an integer"),
        ({"val_size": 1.5}, "val_size must be an integer"),
        ({"seed": "a"}, "seed must be an integer"),
        ({"data_seed": 1.0}, "data_seed must be an integer"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MNIST1DDataModule(**kwargs)


def test_val_size_fraction() -> None:
    dm = _setup(val_size=0.25)
    assert (len(dm.train_set), len(dm.val_set)) == (3000, 1000)
