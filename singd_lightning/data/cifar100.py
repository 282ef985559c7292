"""CIFAR-100 (Krizhevsky, 2009): 50k training and 10k test images, 100 classes.

The official archive is downloaded (or hand-placed), MD5-checked and extracted
without writing outside ``data_dir``. The extracted files are pickles, and
unpickling runs code named in the file, so they are read only after their MD5
matches the official files' (:data:`CIFAR100_FILE_MD5S`), by
``torchvision.datasets.CIFAR100``, which checks the same sums before unpickling.
Training images get a random 32 px crop with 4 px padding and a horizontal flip
(and, as options, timm's AutoAugment/RandAugment, random erasing, mixup and CutMix:
the transformer recipes); a seeded ``val_size`` slice of the training set (evaluated without augmentation) is
the validation split; the official test set is the test split.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import calculate_md5, download_url

from singd_lightning.data._common import (
    Augmentation,
    ensure_extracted,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    TransformSubset,
    split_indices,
)

CIFAR100_FOLDER = CIFAR100.base_folder  # "cifar-100-python"
CIFAR100_ARCHIVE = CIFAR100.filename  # "cifar-100-python.tar.gz"
CIFAR100_URL = CIFAR100.url
#: MD5 of the official ``cifar-100-python.tar.gz``.
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
#: MD5 of each official file in ``cifar-100-python`` (the same sums torchvision's
#: ``CIFAR100`` lists). Only files with these sums are unpickled. Tests that write tiny
#: files in the official format register those files' own sums here (monkeypatch).
CIFAR100_FILE_MD5S: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class CheckedCIFAR100(CIFAR100):
    """torchvision's ``CIFAR100`` (PIL images, int labels), checked against given sums.

    torchvision verifies the MD5 of ``train``, ``test`` and ``meta`` before unpickling
    any of them; this subclass only makes it use ``md5s`` instead of its built-in
    official sums, and never downloads.

    Args:
        root: Directory holding ``cifar-100-python``.
        train: The training split (else the test split).
        md5s: MD5 of ``train``, ``test`` and ``meta``.
    """

    def __init__(self, root: str | Path, train: bool, md5s: dict[str, str]) -> None:
        self.train_list = [["train", md5s["train"]]]
        self.test_list = [["test", md5s["test"]]]
        self.meta = {**CIFAR100.meta, "md5": md5s["meta"]}
        super().__init__(str(root), train=train, download=False)


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
        auto_augment: None, an AutoAugment policy (``"cifar10"``, ``"imagenet"``,
            ``"svhn"``) or a timm policy string (``"rand-m9-mstd0.5-inc1"``); see
            :class:`~singd_lightning.data._common.Augmentation`.
        random_erasing: Probability of timm's random erasing (0: off).
        mixup: α of timm's mixup (0: off); training targets become soft.
        cutmix: α of timm's CutMix (0: off).
        mix_prob: Probability of mixing a batch.
        mix_switch_prob: With both on, the probability of CutMix rather than mixup.
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
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        augmentation = Augmentation(
            self.image_size, CIFAR100_MEAN, self.num_classes, batch_size,
            auto_augment=auto_augment, random_erasing=random_erasing, mixup=mixup, cutmix=cutmix,
            mix_prob=mix_prob, mix_switch_prob=mix_switch_prob,
        )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.seed = seed
        self.classes: list[str] = []
        self.augmentation = augmentation
        self.batch_mixer = augmentation.batch_mixer()

    @property
    def folder(self) -> Path:
        """The extracted ``cifar-100-python`` directory."""
        return self.data_dir / CIFAR100_FOLDER

    def _files_present(self) -> bool:
        return all((self.folder / name).is_file() for name in ("train", "test", "meta"))

    def _check_files(self) -> None:
        """Compare every extracted file's MD5 with :data:`CIFAR100_FILE_MD5S`.

        Raises:
            DatasetNotFoundError: Naming the first file whose MD5 differs; nothing has
                been unpickled.
        """
        for name, expected in CIFAR100_FILE_MD5S.items():
            path = self.folder / name
            actual = calculate_md5(path)
            if actual != expected:
                raise DatasetNotFoundError(
                    f"CIFAR-100 file '{path.resolve()}' is not the official one (MD5 {actual}, "
                    f"expected {expected}), so it was not loaded: unpickling an unknown file "
                    f"can run arbitrary code. Delete the folder '{self.folder.resolve()}' and "
                    f"put the official archive '{CIFAR100_ARCHIVE}' (from {CIFAR100_URL}, md5 "
                    f"{CIFAR100_MD5}) in '{self.data_dir.resolve()}', or set download=True."
                )

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
        """Make sure the extracted folder exists, check its files and return it.

        Uses, in order: the extracted folder, a hand-placed archive (MD5-checked,
        then extracted), a download (if allowed). Every extracted file must then
        match :data:`CIFAR100_FILE_MD5S`.

        Raises:
            DatasetNotFoundError: The files are absent and cannot be downloaded, the
                archive is corrupted or unsafe, or a file is not the official one.
        """
        ensure_extracted(
            self._files_present,
            self.data_dir / CIFAR100_ARCHIVE,
            CIFAR100_MD5,
            self.download if download is None else download,
            fetch=lambda: download_url(
                CIFAR100_URL, root=str(self.data_dir), filename=CIFAR100_ARCHIVE, md5=CIFAR100_MD5
            ),
            not_found=self._not_found,
            contents="train, test and meta",
        )
        self._check_files()
        return self.folder

    def prepare_data(self) -> None:
        self.ensure_available()

    def train_transform(self) -> T.Compose:
        """Training transform: optional crop/flip, optional AutoAugment, tensor,
        normalisation, optional random erasing."""
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose([
            *aug, *self.augmentation.image_transforms(), T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD),
            *self.augmentation.tensor_transforms(),
        ])

    def eval_transform(self) -> T.Compose:
        """Evaluation transform: tensor and normalisation."""
        return T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.ensure_available()
        # torchvision checks the sums again, right before it unpickles the files
        md5s = dict(CIFAR100_FILE_MD5S)
        train = CheckedCIFAR100(self.data_dir, train=True, md5s=md5s)
        test = CheckedCIFAR100(self.data_dir, train=False, md5s=md5s)
        self.classes = train.classes
        train_idx, val_idx = split_indices(len(train), self.val_size, self.seed)
        self.train_set = TransformSubset(train, train_idx, self.train_transform())
        self.val_set = TransformSubset(train, val_idx, self.eval_transform())
        self.test_set = TransformSubset(test, None, self.eval_transform())


__all__ = [
    "CIFAR100DataModule",
    "CIFAR100_FILE_MD5S",
    "CheckedCIFAR100",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]
