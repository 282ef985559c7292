"""ImageNet-100 as an ImageFolder data module, on a tiny fabricated folder tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from singd_lightning.data import DATAMODULES, DatasetNotFoundError
from singd_lightning.data.imagenet100 import IMAGENET100_CLASSES, ImageNet100DataModule
from tests.paper_data import write_image_folder

CLASSES = ["n01558993", "n01692333", "n99999999"]  # two CMC classes and another


def test_registered_and_the_cmc_class_list() -> None:
    assert DATAMODULES["imagenet100"] is ImageNet100DataModule
    assert len(IMAGENET100_CLASSES) == 100 == len(set(IMAGENET100_CLASSES))
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in IMAGENET100_CLASSES)


def test_reads_the_folders_it_finds(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imagenet100", CLASSES, {"train": 4, "val": 2})
    dm = ImageNet100DataModule(tmp_path, batch_size=4, num_workers=0, image_size=32, val_size=3)
    assert dm.num_classes == 3  # before setup, from the folders
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == sorted(CLASSES)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.max() < 3
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [0, 0, 1, 1]  # PNG and JPEG alike, class order


def test_augmentations_and_mixup_for_the_classes_found(tmp_path: Path) -> None:
    from timm.data import Mixup

    write_image_folder(tmp_path / "imagenet100", CLASSES, {"train": 2, "val": 1})
    dm = ImageNet100DataModule(tmp_path, batch_size=2, num_workers=0, image_size=32, val_size=2,
                               auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0)
    assert dm.batch_mixer is None  # the classes are not known before setup
    dm.setup("fit")
    assert isinstance(dm.batch_mixer, Mixup) and dm.batch_mixer.num_classes == 3
    names = [type(t).__name__ for t in dm.train_transform().transforms]
    assert names[2] == "RandAugment" and names[-1] == "RandomErasing"
    assert dm.train_set[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="batch_size must be even with mixup"):
        ImageNet100DataModule(tmp_path, batch_size=3, mixup=0.8)


def test_cmc_classes_from_a_larger_folder(tmp_path: Path) -> None:
    root = tmp_path / "imagenet100"
    for split in ("train", "val"):
        for wnid in (*IMAGENET100_CLASSES, "n00000001"):  # a full ImageNet has more classes
            (root / split / wnid).mkdir(parents=True)
    dm = ImageNet100DataModule(tmp_path, classes="cmc")
    assert dm.find_classes() == sorted(IMAGENET100_CLASSES) and dm.num_classes == 100
    (root / "val" / IMAGENET100_CLASSES[5]).rmdir()
    with pytest.raises(DatasetNotFoundError, match=r"1 of the 100 CMC classes lack a train/ or val/ folder"):
        ImageNet100DataModule(tmp_path, classes="cmc").find_classes()


def test_missing_or_mismatched_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"no 'train' folder.*cannot be downloaded"):
        ImageNet100DataModule(tmp_path).prepare_data()
    write_image_folder(tmp_path / "imagenet100", CLASSES[:2], {"train": 1})
    write_image_folder(tmp_path / "imagenet100", CLASSES[1:], {"val": 1})
    with pytest.raises(DatasetNotFoundError, match="train/ and val/ hold different class folders"):
        ImageNet100DataModule(tmp_path).num_classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": "all"}, "classes must be one of found, cmc, got 'all'"),
        ({"image_size": 0}, "image_size must be an integer >= 1"),
        ({"crop_pct": 1.5}, r"crop_pct must be a number in \(0, 1\]"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageNet100DataModule(**kwargs)
