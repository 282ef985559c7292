"""ImageWoof (Howard, fast.ai): ten hard-to-tell dog breeds from ImageNet.

Uses the official 160 px archive ``imagewoof2-160.tgz`` (shorter side 160 px;
9025 training and 3929 validation images). The archive's ``val`` folder is the
test split; a seeded slice of ``train`` is the validation split. Training
images get ``RandomResizedCrop`` and a horizontal flip (and, as options, timm's
AutoAugment/RandAugment, random erasing, mixup and CutMix); evaluation images are
resized to ``image_size / crop_pct`` and centre-cropped.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import download_url

from singd_lightning.data._common import (
    Augmentation,
    ensure_extracted,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    TransformSubset,
    split_indices,
)

IMAGEWOOF_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz"
IMAGEWOOF_ARCHIVE = "imagewoof2-160.tgz"
IMAGEWOOF_FOLDER = "imagewoof2-160"
#: MD5 of the current ``imagewoof2-160.tgz``, as recorded by several public loaders
#: (its SHA256, recorded elsewhere, is
#: 663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf). Pass ``md5=None``
#: to the data module to skip the check (e.g. for a re-packed archive).
IMAGEWOOF_MD5 = "3d200a7be99704a0d7509be2a9fbfe15"
#: The ten ImageNet WordNet ids in ImageWoof and their breeds.
IMAGEWOOF_CLASSES: dict[str, str] = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "Beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "Golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "Dingo",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageWoofDataModule(ImageClassificationDataModule):
    """ImageWoof-10 (160 px archive) as train/val/test loaders.

    Args:
        data_dir: Directory holding (or receiving) ``imagewoof2-160``.
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes.
        download: Download and extract the archive when the files are absent.
        image_size: Side length of the square model input.
        val_size: Validation images carved from ``train`` (int count or float
            fraction).
        augment: ``RandomResizedCrop`` and horizontal flip for training; without
            it training uses the evaluation transform.
        crop_scale: Area range of ``RandomResizedCrop``.
        crop_pct: Evaluation resizes the shorter side to ``image_size / crop_pct``
            before the centre crop.
        seed: Seed of the train/validation split.
        md5: Expected MD5 of the archive; ``None`` skips the check.
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

    num_classes = 10
    in_chans = 3

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        num_workers: int = 4,
        download: bool = False,
        image_size: int = 128,
        val_size: int | float = 0.1,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        crop_pct: float = 0.875,
        seed: int = 0,
        md5: str | None = IMAGEWOOF_MD5,
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
            image_size, IMAGENET_MEAN, self.num_classes, batch_size,
            auto_augment=auto_augment, random_erasing=random_erasing, mixup=mixup, cutmix=cutmix,
            mix_prob=mix_prob, mix_switch_prob=mix_switch_prob,
        )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download
        self.image_size = image_size
        self.val_size = val_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.crop_pct = crop_pct
        self.seed = seed
        self.md5 = md5
        self.classes: list[str] = []
        self.augmentation = augmentation
        self.batch_mixer = augmentation.batch_mixer()

    @property
    def folder(self) -> Path:
        """The extracted ``imagewoof2-160`` directory."""
        return self.data_dir / IMAGEWOOF_FOLDER

    def _files_present(self) -> bool:
        return all(
            (self.folder / split).is_dir()
            and any(p.is_dir() for p in (self.folder / split).iterdir())
            for split in ("train", "val")
        )

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"ImageWoof not found in '{self.data_dir.resolve()}' ({reason}). Put the extracted "
            f"'{IMAGEWOOF_FOLDER}' folder (with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG) at "
            f"'{self.folder.resolve()}', or the archive '{IMAGEWOOF_ARCHIVE}' (from "
            f"{IMAGEWOOF_URL}) at '{(self.data_dir / IMAGEWOOF_ARCHIVE).resolve()}', "
            "or set download=True on a machine with internet access."
        )

    def ensure_available(self, download: bool | None = None) -> Path:
        """Make sure the extracted folder exists and return it.

        Uses, in order: the extracted folder, a hand-placed archive, a download (if
        allowed). The archive is MD5-checked unless ``md5`` is None, then extracted;
        even unchecked, extraction never writes outside ``data_dir``.

        Raises:
            DatasetNotFoundError: The files are absent and cannot be downloaded, or the
                archive is corrupted or unsafe.
        """
        ensure_extracted(
            self._files_present,
            self.data_dir / IMAGEWOOF_ARCHIVE,
            self.md5,
            self.download if download is None else download,
            fetch=lambda: download_url(
                IMAGEWOOF_URL, root=str(self.data_dir), filename=IMAGEWOOF_ARCHIVE, md5=self.md5
            ),
            not_found=self._not_found,
            contents="train/ and val/ class folders",
        )
        return self.folder

    def prepare_data(self) -> None:
        self.ensure_available()

    def _resize_crop(self) -> list:
        return [T.Resize(round(self.image_size / self.crop_pct)), T.CenterCrop(self.image_size)]

    def eval_transform(self) -> T.Compose:
        """Resize to ``image_size / crop_pct``, centre-crop, tensor, normalise."""
        return T.Compose([*self._resize_crop(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def train_transform(self) -> T.Compose:
        """``RandomResizedCrop`` and flip (if ``augment``; else the evaluation's
        resize and crop), optional AutoAugment, tensor, normalise, optional random
        erasing."""
        if self.augment:
            geometric = [T.RandomResizedCrop(self.image_size, scale=self.crop_scale), T.RandomHorizontalFlip()]
        else:
            geometric = self._resize_crop()
        return T.Compose([
            *geometric, *self.augmentation.image_transforms(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            *self.augmentation.tensor_transforms(),
        ])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = self.ensure_available()
        train = ImageFolder(str(folder / "train"))
        test = ImageFolder(str(folder / "val"))
        if train.classes != test.classes:
            raise ValueError(
                f"{folder}: train and val hold different class folders "
                f"({train.classes} vs {test.classes})"
            )
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"{folder}: expected {self.num_classes} class folders, found {len(train.classes)}"
            )
        self.classes = train.classes
        train_idx, val_idx = split_indices(len(train), self.val_size, self.seed)
        self.train_set = TransformSubset(train, train_idx, self.train_transform())
        self.val_set = TransformSubset(train, val_idx, self.eval_transform())
        self.test_set = TransformSubset(test, None, self.eval_transform())


__all__ = ["IMAGEWOOF_CLASSES", "IMAGEWOOF_MD5", "IMAGEWOOF_URL", "ImageWoofDataModule"]
