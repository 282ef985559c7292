"""CIFAR-100 (Krizhevsky, 2009): 50k training and 10k test images, 100 classes.

The archive is fetched with ``torchvision.datasets.CIFAR100`` (which checks its
MD5). The extracted pickles are then read directly, so hand-placed files work
offline. Training images get a random 32 px crop with 4 px padding and a
horizontal flip; a seeded ``val_size`` slice of the training set (evaluated
without augmentation) is the validation split; the official test set is the
test split.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from singd_lightning.data._common import (
    ensure_extracted,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    TransformSubset,
    split_indices,
)

CIFAR100_FOLDER = CIFAR100.base_folder  # "cifar-100-python"
CIFAR100_ARCHIVE = CIFAR100.filename  # "cifar-100-python.tar.gz"
CIFAR100_URL = CIFAR100.url
CIFAR100_MD5 = CIFAR100.tgz_md5
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


class CIFAR100Pickles(Dataset):
    """One split of the extracted ``cifar-100-python`` folder, as PIL images.

    Args:
        folder: The ``cifar-100-python`` directory.
        split: ``"train"`` or ``"test"``.
    """

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = Path(folder)
        entry = _unpickle(folder / split)
        self.data: np.ndarray = (
            np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        self.targets: list[int] = [int(t) for t in entry["fine_labels"]]
        if len(self.targets) != len(self.data):
            raise ValueError(
                f"{folder / split}: {len(self.data)} images but {len(self.targets)} labels"
            )
        self.classes: list[str] = list(_unpickle(folder / "meta")["fine_label_names"])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.targets[i]


class CIFAR100DataModule(ImageClassificationDataModule):
    """CIFAR-100 with a seeded train/validation split.

    Args:
        data_dir: Directory holding (or receiving) ``cifar-100-python``.
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes.
        download: Download the archive when the files are absent.
        val_size: Validation images carved from the training set (int count
            or float fraction).
        augment: Random crop (pad 4) and horizontal flip for training.
        seed: Seed of the train/validation split.
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
    """

    num_classes = 100
    in_chans = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        val_size: int | float = 5000,
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.seed = seed
        self.classes: list[str] = []

    @property
    def folder(self) -> Path:
        """The extracted ``cifar-100-python`` directory."""
        return self.data_dir / CIFAR100_FOLDER

    def _files_present(self) -> bool:
        return all((self.folder / name).is_file() for name in ("train", "test", "meta"))

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"CIFAR-100 not found in '{self.data_dir.resolve()}' ({reason}). Put the "
            f"extracted '{CIFAR100_FOLDER}' folder (with the files train, test and meta) "
            f"at '{self.folder.resolve()}', or the archive '{CIFAR100_ARCHIVE}' "
            f"(from {CIFAR100_URL}, md5 {CIFAR100_MD5}) at "
            f"'{(self.data_dir / CIFAR100_ARCHIVE).resolve()}', "
            "or set download=True on a machine with internet access."
        )

    def ensure_available(self, download: bool | None = None) -> Path:
        """Make sure the extracted folder exists and return it.

        Uses, in order: the extracted folder, a hand-placed archive (MD5-checked,
        then extracted), a download (if allowed).

        Raises:
            DatasetNotFoundError: The files are absent and cannot be downloaded.
        """
        ensure_extracted(
            self._files_present,
            self.data_dir / CIFAR100_ARCHIVE,
            CIFAR100_MD5,
            self.download if download is None else download,
            fetch=lambda: CIFAR100(str(self.data_dir), train=True, download=True),
            not_found=self._not_found,
            contents="train, test and meta",
        )
        return self.folder

    def prepare_data(self) -> None:
        self.ensure_available()

    def train_transform(self) -> T.Compose:
        """Training transform: optional crop/flip, tensor, normalisation."""
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose([*aug, T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def eval_transform(self) -> T.Compose:
        """Evaluation transform: tensor and normalisation."""
        return T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = self.ensure_available()
        train = CIFAR100Pickles(folder, "train")
        test = CIFAR100Pickles(folder, "test")
        self.classes = train.classes
        train_idx, val_idx = split_indices(len(train), self.val_size, self.seed)
        self.train_set = TransformSubset(train, train_idx, self.train_transform())
        self.val_set = TransformSubset(train, val_idx, self.eval_transform())
        self.test_set = TransformSubset(test, None, self.eval_transform())


__all__ = [
    "CIFAR100DataModule",
    "CIFAR100Pickles",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]
