"""ImageNet-100: 100 ImageNet classes (about 126k training and 5000 validation images)
as an ImageFolder data module.

The standard class list is that of Tian et al., "Contrastive Multiview Coding"
(ECCV 2020), :data:`IMAGENET100_CLASSES`. ImageNet is not downloadable without an
account, so the data module reads a folder you provide::

    <data_dir>/<folder>/train/<wnid>/*.JPEG     (or .png, ...)
    <data_dir>/<folder>/val/<wnid>/*.JPEG

``classes="found"`` (the default) uses every class folder of ``train/`` (``val/``
must have the same ones): an extracted ImageNet-100, or any other ImageFolder data.
``classes="cmc"`` uses only the 100 CMC classes, so the folder may be a full
ImageNet-1k (``train/`` and ``val/`` in class folders); a missing one is an error.
The ``val/`` folder is the test split; a seeded slice of ``train/`` is the
validation split. Training images get ``RandomResizedCrop`` and a horizontal flip
(and, as options, timm's AutoAugment/RandAugment, random erasing, mixup and CutMix, as
the other image data modules); evaluation images are resized to ``image_size /
crop_pct`` and centre-cropped (224 px and 0.875: the standard ImageNet evaluation).
"""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from singd_lightning.data._common import (
    Augmentation,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    TransformSubset,
    split_indices,
)
from singd_lightning.data.imagewoof import IMAGENET_MEAN, IMAGENET_STD

#: The ImageNet-100 classes of Tian et al. (CMC, 2020), as WordNet ids.
IMAGENET100_CLASSES: tuple[str, ...] = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831",
    "n04517823", "n04589890", "n03062245", "n01773797", "n01735189", "n07831146",
    "n07753275", "n03085013", "n04485082", "n02105505", "n01983481", "n02788148",
    "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531",
    "n02877765", "n04429376", "n02009229", "n01978455", "n02106550", "n01820546",
    "n01692333", "n07714571", "n02974003", "n02114855", "n03785016", "n03764736",
    "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417",
    "n02326432", "n03637318", "n01980166", "n02113799", "n02086240", "n03903868",
    "n02483362", "n04127249", "n02089973", "n03017168", "n02093428", "n02804414",
    "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252",
    "n02138441", "n02104029", "n03837869", "n03494278", "n04136333", "n03794056",
    "n03492542", "n02018207", "n04067472", "n03930630", "n03584829", "n02123045",
    "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)
#: Valid values of the data module's ``classes`` argument.
CLASS_CHOICES = ("found", "cmc")


class _SelectedImageFolder(ImageFolder):
    """An ``ImageFolder`` restricted to the given class folders (in that order, sorted)."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._selected = classes
        super().__init__(root)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._selected, {name: i for i, name in enumerate(self._selected)}


class ImageNet100DataModule(ImageClassificationDataModule):
    """ImageNet-100 (or any train/ + val/ ImageFolder) as train/val/test loaders.

    Args:
        data_dir: Directory holding ``folder``.
        folder: Name of the data set's folder inside ``data_dir``.
        classes: ``"found"``: every class folder of ``train/``; ``"cmc"``: the
            100 classes of :data:`IMAGENET100_CLASSES` (e.g. from a full ImageNet).
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes.
        image_size: Side length of the square model input.
        val_size: Validation images carved from ``train/`` (int count or float
            fraction).
        augment: ``RandomResizedCrop`` and horizontal flip for training; without
            it training uses the evaluation transform.
        crop_scale: Area range of ``RandomResizedCrop``.
        crop_pct: Evaluation resizes the shorter side to ``image_size / crop_pct``
            before the centre crop.
        seed: Seed of the train/validation split.
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
        auto_augment: None, an AutoAugment policy (``"imagenet"``, ...) or a timm
            policy string (``"rand-m9-mstd0.5-inc1"``); see
            :class:`~singd_lightning.data._common.Augmentation`.
        random_erasing: Probability of timm's random erasing (0: off).
        mixup: α of timm's mixup (0: off); training targets become soft.
        cutmix: α of timm's CutMix (0: off).
        mix_prob: Probability of mixing a batch.
        mix_switch_prob: With both on, the probability of CutMix rather than mixup.

    Raises:
        ValueError: ``classes`` is not one of :data:`CLASS_CHOICES`, a size is not
            positive, or an augmentation option is invalid.
    """

    in_chans = 3

    def __init__(
        self,
        data_dir: str | Path = "data",
        folder: str = "imagenet100",
        classes: str = "found",
        batch_size: int = 128,
        num_workers: int = 8,
        image_size: int = 224,
        val_size: int | float = 5000,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
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
        if classes not in CLASS_CHOICES:
            raise ValueError(f"classes must be one of {', '.join(CLASS_CHOICES)}, got {classes!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}.")
        if not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool) or not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop_pct!r}.")
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self._augmentation_options = dict(
            auto_augment=auto_augment, random_erasing=random_erasing, mixup=mixup, cutmix=cutmix,
            mix_prob=mix_prob, mix_switch_prob=mix_switch_prob,
        )
        # checked now; mixup's soft targets get the number of classes in setup, from the folders
        self.augmentation = Augmentation(image_size, IMAGENET_MEAN, 2, batch_size, **self._augmentation_options)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.folder_name = folder
        self.classes_choice = classes
        self.image_size = image_size
        self.val_size = val_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.crop_pct = crop_pct
        self.seed = seed
        self.classes: list[str] = []
        self._num_classes: int | None = None

    @property
    def root(self) -> Path:
        """The data set's folder, ``data_dir/folder``."""
        return self.data_dir / self.folder_name

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"ImageNet-100 not found in '{self.root.resolve()}' ({reason}). It cannot be downloaded "
            "automatically (ImageNet needs an account): put train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
            "there (an ImageNet-100 extract, or a full ImageNet with data.classes=cmc)."
        )

    def _class_folders(self, split: str) -> list[str]:
        path = self.root / split
        if not path.is_dir():
            raise self._not_found(f"no '{split}' folder")
        return sorted(p.name for p in path.iterdir() if p.is_dir())

    def find_classes(self) -> list[str]:
        """The class folders this data module uses (see ``classes``), sorted.

        Raises:
            DatasetNotFoundError: ``train/`` or ``val/`` is missing, holds no class
                folder, the two differ, or a CMC class is missing.
        """
        train, val = self._class_folders("train"), self._class_folders("val")
        if self.classes_choice == "cmc":
            missing = sorted(set(IMAGENET100_CLASSES) - (set(train) & set(val)))
            if missing:
                raise self._not_found(
                    f"{len(missing)} of the 100 CMC classes lack a train/ or val/ folder, e.g. {missing[:3]}"
                )
            return sorted(IMAGENET100_CLASSES)
        if not train:
            raise self._not_found("train/ holds no class folder")
        if train != val:
            diff = sorted(set(train) ^ set(val))
            raise self._not_found(f"train/ and val/ hold different class folders, e.g. {diff[:3]}")
        return train

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of classes, from the folders (read once)."""
        if self._num_classes is None:
            self._num_classes = len(self.find_classes())
        return self._num_classes

    def prepare_data(self) -> None:
        self.find_classes()

    def eval_transform(self) -> T.Compose:
        """Resize to ``image_size / crop_pct``, centre-crop, tensor, normalise."""
        return T.Compose(
            [
                T.Resize(round(self.image_size / self.crop_pct)),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def train_transform(self) -> T.Compose:
        """``RandomResizedCrop`` and flip (if ``augment``; else the evaluation's resize
        and crop), optional AutoAugment, tensor, normalise, optional random erasing."""
        if self.augment:
            geometric = [T.RandomResizedCrop(self.image_size, scale=self.crop_scale), T.RandomHorizontalFlip()]
        else:
            geometric = [T.Resize(round(self.image_size / self.crop_pct)), T.CenterCrop(self.image_size)]
        return T.Compose([
            *geometric, *self.augmentation.image_transforms(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            *self.augmentation.tensor_transforms(),
        ])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        classes = self.find_classes()
        try:
            train = _SelectedImageFolder(str(self.root / "train"), classes)
            test = _SelectedImageFolder(str(self.root / "val"), classes)
        except FileNotFoundError as err:  # a class folder without a single image
            raise self._not_found(str(err)) from err
        self.classes = classes
        self._num_classes = len(classes)
        self.augmentation = Augmentation(
            self.image_size, IMAGENET_MEAN, len(classes), self.batch_size, **self._augmentation_options
        )
        self.batch_mixer = self.augmentation.batch_mixer()
        train_idx, val_idx = split_indices(len(train), self.val_size, self.seed)
        self.train_set = TransformSubset(train, train_idx, self.train_transform())
        self.val_set = TransformSubset(train, val_idx, self.eval_transform())
        self.test_set = TransformSubset(test, None, self.eval_transform())


__all__ = ["CLASS_CHOICES", "IMAGENET100_CLASSES", "ImageNet100DataModule"]
