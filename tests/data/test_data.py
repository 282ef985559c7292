"""Data modules: the offline digits set, and CIFAR-100 / ImageWoof from fake
files written in the real on-disk layout (no network)."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.utils import calculate_md5

from singd_lightning.data import (
    DATAMODULES,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageWoofDataModule,
    create_datamodule,
)
from singd_lightning.data import cifar100 as cifar_module
from singd_lightning.data import imagewoof as woof_module
from singd_lightning.data._common import split_indices
from singd_lightning.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from singd_lightning.data.imagewoof import IMAGEWOOF_CLASSES

# ----------------------------------------------------------------------------- registry


def test_registry_and_attributes() -> None:
    # mnist1d: test_mnist1d.py; cora: test_cora.py; imagenet100: test_imagenet100.py
    assert set(DATAMODULES) >= {"digits", "cifar100", "imagewoof", "mnist1d", "cora", "imagenet100"}
    for cls, classes in [
        (CIFAR100DataModule, 100),
        (ImageWoofDataModule, 10),
        (DigitsDataModule, 10),
    ]:
        assert cls.num_classes == classes
    dm = create_datamodule("digits", batch_size=8)
    assert isinstance(dm, DigitsDataModule)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, 32)
    assert create_datamodule("imagewoof", image_size=160).image_size == 160
    with pytest.raises(ValueError, match="Valid names: cifar100, cora, digits, imagenet100, imagewoof"):
        create_datamodule("mnist")


def test_split_indices() -> None:
    train, val = split_indices(100, 10, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(100))
    assert split_indices(100, 10, seed=3) == (train, val)
    assert split_indices(100, 10, seed=4) != (train, val)
    assert len(split_indices(100, 0.25, seed=0)[1]) == 25
    for bad in (0, 100, 0.0):
        with pytest.raises(ValueError):
            split_indices(100, bad, seed=0)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_digits_splits_fixed_and_disjoint(digits: DigitsDataModule) -> None:
    assert [len(s) for s in (digits.train_set, digits.val_set, digits.test_set)] == [1257, 270, 270]
    sets = [set(idx.tolist()) for idx in digits.split_indices]
    assert (
        sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    )
    assert len(sets[0] | sets[1] | sets[2]) == 1797


def test_digits_shapes_and_normalisation(digits: DigitsDataModule) -> None:
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    torch.testing.assert_close(x[:, 0], x[:, 2])  # gray repeated to RGB
    images = digits.train_set.tensors[0]
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    assert len(torch.unique(digits.train_set.tensors[1])) == 10
    xv, _ = next(iter(digits.val_dataloader()))
    xt, _ = next(iter(digits.test_dataloader()))
    assert xv.shape[1:] == xt.shape[1:] == (3, 32, 32)


def test_digits_deterministic_across_instances(digits: DigitsDataModule) -> None:
    other = DigitsDataModule(batch_size=32)
    other.setup("fit")
    ours = (digits.train_set, digits.val_set, digits.test_set)
    theirs = (other.train_set, other.val_set, other.test_set)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.tensors[0], b.tensors[0])
        assert torch.equal(a.tensors[1], b.tensors[1])
    val_loader = digits.val_dataloader()
    assert torch.equal(next(iter(val_loader))[0], next(iter(other.val_dataloader()))[0])


def test_digits_other_size_and_seed(digits: DigitsDataModule) -> None:
    dm = DigitsDataModule(batch_size=4, image_size=16, in_chans=1, seed=1)
    dm.setup()
    assert dm.train_set[0][0].shape == (1, 16, 16)
    assert len(dm.val_set) == 270
    assert not torch.equal(dm.split_indices[1], digits.split_indices[1])


# ----------------------------------------------------------------------------- CIFAR-100


def write_fake_cifar100(
    root: Path, monkeypatch: pytest.MonkeyPatch | None, n_train: int = 20, n_test: int = 10
) -> dict[str, np.ndarray]:
    """Write ``root/cifar-100-python/{train,test,meta}`` in the official pickle format.

    With ``monkeypatch``, the files' own MD5s replace the official ones in
    ``CIFAR100_FILE_MD5S`` for the test, so the data module accepts them.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": data,
        }
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        arrays[split] = data
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    if monkeypatch is not None:
        md5s = {name: calculate_md5(folder / name) for name in ("train", "test", "meta")}
        monkeypatch.setattr(cifar_module, "CIFAR100_FILE_MD5S", md5s)
    return arrays


def test_cifar100_reads_official_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fake_cifar100(tmp_path, monkeypatch)
    dm = CIFAR100DataModule(tmp_path, batch_size=8, num_workers=0, download=False, val_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    assert dm.classes[:2] == ["fine_0", "fine_1"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    x0, _ = dm.test_set[0]
    expected = torch.as_tensor(arrays["test"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean, std = (
        torch.tensor(CIFAR100_MEAN)[:, None, None],
        torch.tensor(CIFAR100_STD)[:, None, None],
    )
    torch.testing.assert_close(x0, (expected - mean) / std)
    # the split is seeded and the validation split is not augmented
    other = CIFAR100DataModule(tmp_path, download=False, val_size=4)
    other.setup()
    assert other.val_set.indices == dm.val_set.indices
    torch.testing.assert_close(other.val_set[0][0], dm.val_set[0][0])


def test_cifar100_missing_gives_clear_error(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(tmp_path / "nowhere", download=False)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        message = str(info.value)
        assert str((tmp_path / "nowhere").resolve()) in message
        assert "cifar-100-python" in message and "cifar-100-python.tar.gz" in message
    assert isinstance(info.value, FileNotFoundError)


def test_cifar100_failed_download_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(cifar_module, "download_url", offline)
    dm = CIFAR100DataModule(tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed: no network.*cifar-100-python"):
        dm.prepare_data()


def test_cifar100_corrupt_archive_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        CIFAR100DataModule(tmp_path).setup()


# ----------------------------------------------------------------------------- ImageWoof


def write_fake_imagewoof(root: Path, n_train: int = 2, n_val: int = 1) -> None:
    """Write ``root/imagewoof2-160/{train,val}/<wnid>/*.JPEG`` with small JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for wnid in IMAGEWOOF_CLASSES:
            folder = root / "imagewoof2-160" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)


def test_imagewoof_reads_folder_tree(tmp_path: Path) -> None:
    write_fake_imagewoof(tmp_path)
    dm = ImageWoofDataModule(
        tmp_path, batch_size=4, num_workers=0, download=False, image_size=32, val_size=4
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == sorted(IMAGEWOOF_CLASSES)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 32, 32)
    assert yt.tolist() == [0, 1, 2, 3]  # one val image per class, in class order
    # evaluation is deterministic; training augmentation is random
    torch.manual_seed(0)
    torch.testing.assert_close(dm.val_set[0][0], dm.val_set[0][0])
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0])


def test_imagewoof_extracts_hand_placed_archive(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_fake_imagewoof(source, n_train=1, n_val=1)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "imagewoof2-160.tgz", "w:gz") as tar:
        tar.add(source / "imagewoof2-160", arcname="imagewoof2-160")
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        ImageWoofDataModule(data_dir).prepare_data()  # fake archive fails the real MD5
    dm = ImageWoofDataModule(data_dir, batch_size=2, image_size=32, val_size=2, md5=None)
    dm.prepare_data()
    dm.setup()
    assert (data_dir / "imagewoof2-160" / "val").is_dir()
    assert len(dm.test_set) == 10


def test_imagewoof_missing_gives_clear_error(tmp_path: Path) -> None:
    dm = ImageWoofDataModule(tmp_path / "absent", download=False)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        message = str(info.value)
        assert str((tmp_path / "absent").resolve()) in message
        assert "imagewoof2-160" in message and "imagewoof2-160.tgz" in message


def test_imagewoof_failed_download_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(url, **kwargs):
        calls.append((url, kwargs))
        raise OSError("no network")

    monkeypatch.setattr(woof_module, "download_url", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed: no network"):
        ImageWoofDataModule(tmp_path, download=True).prepare_data()
    url, kwargs = calls[0]
    assert url == "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz"
    assert kwargs["md5"] == "3d200a7be99704a0d7509be2a9fbfe15"
