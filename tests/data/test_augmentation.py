"""The transformer recipes' augmentations (timm's data pipeline) in the CIFAR-100 and
ImageWoof data modules, on tiny fabricated files; the loss on mixup's soft targets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch import nn
from torchvision import transforms as T

from singd_lightning.app.module import ImageClassifier
from singd_lightning.data import CIFAR100DataModule, ImageWoofDataModule
from tests.data.test_data import write_fake_cifar100, write_fake_imagewoof


def _types(transform: T.Compose) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_defaults_are_crop_and_flip_only(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(tmp_path)
    assert _types(dm.train_transform()) == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert dm.batch_mixer is None
    woof = ImageWoofDataModule(tmp_path)
    assert _types(woof.train_transform()) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert _types(ImageWoofDataModule(tmp_path, augment=False).train_transform()) == _types(woof.eval_transform())


def test_cifar100_autoaugment_erasing_and_mixing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar100(tmp_path, monkeypatch, n_train=20)
    dm = CIFAR100DataModule(tmp_path, batch_size=6, num_workers=0, val_size=4, auto_augment="cifar10",
                            random_erasing=1.0, mixup=0.8, cutmix=1.0)
    assert _types(dm.train_transform()) == [T.RandomCrop, T.RandomHorizontalFlip, T.AutoAugment, T.ToTensor,
                                            T.Normalize, RandomErasing]
    assert dm.train_transform().transforms[2].policy == T.AutoAugmentPolicy.CIFAR10
    dm.setup("fit")
    torch.manual_seed(0)
    image, _ = dm.train_set[0]
    assert image.shape == (3, 32, 32)
    assert int((image == 0).all(dim=0).sum()) >= 1  # an erased rectangle (0 = the mean colour)
    # Mixing pairs samples: the loader drops the incomplete last batch (16 = 6 + 6 + 4).
    batches = list(dm.train_dataloader())
    assert [len(y) for _, y in batches] == [6, 6]
    assert isinstance(dm.batch_mixer, Mixup)
    x, y = batches[0]
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer((x, y), 0)[1] is y  # evaluation batches stay as they are
    dm.trainer = SimpleNamespace(training=True)
    mixed_x, soft = dm.on_after_batch_transfer((x.clone(), y), 0)
    assert mixed_x.shape == x.shape and soft.shape == (6, 100) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    assert float(soft.max(dim=1).values.min()) < 1.0  # mixed (mix_prob 1)


def test_imagewoof_randaugment(tmp_path: Path) -> None:
    write_fake_imagewoof(tmp_path)
    dm = ImageWoofDataModule(tmp_path, batch_size=4, num_workers=0, image_size=32, val_size=4,
                             auto_augment="rand-m9-mstd0.5-inc1")
    assert _types(dm.train_transform()) == [T.RandomResizedCrop, T.RandomHorizontalFlip, RandAugment, T.ToTensor,
                                            T.Normalize]
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 32, 32)
    assert dm.batch_mixer is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(auto_augment="cifar100"), r"auto_augment must be None, one of \['cifar10', 'imagenet', 'svhn'\]"),
        (dict(random_erasing=1.5), r"random_erasing must be a number in \[0, 1\], got 1.5"),
        (dict(mixup=-1.0), "mixup must be a number >= 0"),
        (dict(cutmix=True), "cutmix must be a number >= 0"),
        (dict(mix_prob=2), r"mix_prob must be a number in \[0, 1\]"),
        (dict(mixup=0.8, batch_size=7), "batch_size must be even with mixup or cutmix"),
    ],
)
def test_bad_augmentation_options_raise(kwargs, match, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        CIFAR100DataModule(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match):
        ImageWoofDataModule(tmp_path, **kwargs)


# ----------------------------------------------------------------- soft targets
def _classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), optimizer={"name": "sgd"}, num_classes=5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_on_soft_targets_is_the_mixed_cross_entropy(smoothing: float) -> None:
    module = _classifier()
    x = torch.randn(4, 3, 2, 2)
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1]), 0.7
    soft = lam * F.one_hot(y_a, 5).float() + (1 - lam) * F.one_hot(y_b, 5).float()
    loss, n = module._step((x, soft), module.train_acc, smoothing)
    logits = module(x)
    # mixup's loss as the authors' sources write it: the mix of the two hard losses
    expected = lam * F.cross_entropy(logits, y_a, label_smoothing=smoothing) + (1 - lam) * F.cross_entropy(
        logits, y_b, label_smoothing=smoothing
    )
    torch.testing.assert_close(loss, expected)
    assert n == 4
    assert module.train_acc.compute() == (logits.argmax(-1) == soft.argmax(-1)).float().mean()


def test_mixup_trains_through_lightning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar100(tmp_path, monkeypatch, n_train=12)
    dm = CIFAR100DataModule(tmp_path, batch_size=4, num_workers=0, val_size=4, mixup=0.8, cutmix=1.0)
    torch.manual_seed(0)
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)), optimizer={"name": "sgd", "lr": 0.1},
                             num_classes=100)
    seen = []
    original = module.training_step

    def spy(batch, batch_idx):
        seen.append(batch[1].shape)
        return original(batch, batch_idx)

    module.training_step = spy
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert seen == [torch.Size([4, 100])] * 2
