"""Synthetic CIFAR-shaped data: offline, seeded, learnable, validated."""

from __future__ import annotations

import pytest
import torch
from singd_lightning.data import DATAMODULES, SyntheticDataModule, create_datamodule
from tests.app.helpers import compose_cfg


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors


def test_cifar_shaped_seeded_and_learnable():
    assert DATAMODULES["synthetic"] is SyntheticDataModule
    dm = create_datamodule("synthetic", batch_size=8, train_size=400, val_size=50, test_size=60, seed=3)
    dm.setup()
    x, y = _tensors(dm.train_set)
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.float32 and y.max() < 100
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (100, 3, 32)
    assert len(dm.val_set) == 50 and len(dm.test_set) == 60
    assert abs(x.var().item() - 1.0) < 0.05  # normalised like real images
    again = SyntheticDataModule(train_size=400, val_size=50, test_size=60, seed=3)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], x) and torch.equal(again.train_set.tensors[1], y)
    # Learnable: the class means of the training set classify the test set.
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    small = SyntheticDataModule(num_classes=5, train_size=500, val_size=10, test_size=200, seed=0)
    small.setup()
    (xt, yt), (xs, ys) = _tensors(small.train_set), _tensors(small.test_set)
    means = torch.stack([xt[yt == c].mean(0) for c in range(5)]).flatten(1)
    predicted = torch.cdist(xs.flatten(1), means).argmin(1)
    assert (predicted == ys).float().mean() > 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"train_size": 0}, "train_size must be an integer >= 1, got 0"),
        ({"image_size": 2.5}, "image_size must be an integer >= 1, got 2.5"),
        ({"noise": 0.0}, "noise must be a number > 0, got 0.0"),
    ],
)
def test_invalid_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticDataModule(**kwargs)


def test_app_config_builds_it():
    cfg = compose_cfg(["data=synthetic_cifar"])
    assert cfg.data.name == "synthetic" and cfg.data.num_classes == 100 and cfg.data.image_size == 32
