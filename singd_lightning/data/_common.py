"""Shared pieces of the data modules: split helper, subset view, base class, and
the optional augmentations of the transformer recipes (timm's data pipeline)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from singd_lightning.data._archives import ArchiveRefusedError, extract_tar_safely
from singd_lightning.data.sampler import epoch_seeded_loader


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent and could not (or may not) be downloaded."""


def ensure_extracted(
    present: Callable[[], bool],
    archive: Path,
    md5: str | None,
    download: bool,
    fetch: Callable[[], None],
    not_found: Callable[[str], Exception],
    contents: str,
) -> None:
    """Make a dataset's extracted files available, or raise a clear error.

    Uses, in order: the extracted files (``present()``), a hand-placed ``archive``,
    ``fetch()`` (which downloads ``archive``, if ``download``). The archive is
    MD5-checked unless ``md5`` is None, then extracted next to it; extraction never
    writes outside ``archive.parent`` (see :func:`extract_tar_safely`).

    Raises:
        DatasetNotFoundError: built by ``not_found(reason)``.
    """
    if present():
        return
    if not archive.is_file():
        if not download:
            raise not_found("download=False")
        try:
            os.makedirs(archive.parent, exist_ok=True)
            fetch()
        except Exception as err:  # network, disk or checksum failure
            raise not_found(f"download failed: {err}") from err
        if not archive.is_file():
            raise not_found(f"the download did not produce '{archive}'")
    if md5 is not None and not check_integrity(str(archive), md5):
        raise not_found(f"'{archive}' is corrupted: MD5 differs from {md5}")
    try:
        extract_tar_safely(archive, archive.parent)
    except ArchiveRefusedError as err:
        raise not_found(str(err)) from err
    if not present():
        raise not_found(f"the archive did not contain {contents}")


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into train and validation indices.

    Args:
        n: Number of samples.
        val_size: Validation samples, as a count (int) or a fraction of ``n`` (float
            in ``(0, 1)``).
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        ``(train_indices, val_indices)``, each sorted.

    Raises:
        ValueError: If the validation part would be empty or take every sample.
    """
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < n:
        raise ValueError(f"val_size={val_size!r} must leave both splits non-empty (n={n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class TransformSubset(Dataset):
    """A view of ``base[indices]`` whose first item element goes through ``transform``.

    Lets a training and a validation split share one underlying dataset while
    using different transforms.

    Args:
        base: Dataset yielding ``(image, label)``.
        indices: Indices of ``base`` in this view; ``None`` for all.
        transform: Applied to the image.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image, label = self.base[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, label


#: AutoAugment's learned policies (Cubuk et al., 2019), by the data they were learned
#: on (torchvision's implementation: timm's AutoAugment holds only ImageNet policies,
#: and the CIFAR recipes of Compact-Transformers v1.0 and SPT_LSA_ViT use the CIFAR-10
#: policy, their ``utils/autoaug.py`` ``CIFAR10Policy``).
AUTO_AUGMENT_POLICIES = {
    "cifar10": T.AutoAugmentPolicy.CIFAR10,
    "imagenet": T.AutoAugmentPolicy.IMAGENET,
    "svhn": T.AutoAugmentPolicy.SVHN,
}


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


class Augmentation:
    """Optional training augmentations beyond crop and flip, from timm's data pipeline.

    Args:
        image_size: Side of the (square) training images, for timm's translations.
        mean: Normalisation mean (fill colour of AutoAugment's geometric operations).
        num_classes: Classes, for the soft targets of mixup and CutMix.
        batch_size: Training batch size (mixup and CutMix pair samples: even).
        auto_augment: None; ``"cifar10"``, ``"imagenet"`` or ``"svhn"`` (AutoAugment's
            policy for that data); or a timm policy string: RandAugment
            (``"rand-m9-mstd0.5-inc1"``), timm's AutoAugment (``"original"``, ``"v0"``)
            or AugMix (``"augmix-m5-w4-d2"``).
        random_erasing: Probability of erasing a random rectangle of a training image
            (timm's ``RandomErasing``, filled with 0, i.e. the mean colour after
            normalisation; area up to 0.4 and aspect ratio from 0.3, SPT_LSA_ViT's
            ``--re_sh 0.4 --re_r1 0.3``).
        mixup: α of mixup's Beta(α, α) (0: off), timm's ``Mixup``.
        cutmix: α of CutMix's Beta(α, α) (0: off).
        mix_prob: Probability of mixing a batch.
        mix_switch_prob: With both on, the probability of CutMix rather than mixup.

    Raises:
        ValueError: For an unknown policy, a probability outside [0, 1], a negative α,
            or an odd ``batch_size`` with mixing on.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        num_classes: int,
        batch_size: int,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ) -> None:
        self.random_erasing = _probability("random_erasing", random_erasing)
        self.mix_prob = _probability("mix_prob", mix_prob)
        self.mix_switch_prob = _probability("mix_switch_prob", mix_switch_prob)
        for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
                raise ValueError(f"{name} must be a number >= 0 (the Beta distribution's alpha; 0: off), got {alpha!r}.")
        self.mixup_alpha, self.cutmix_alpha = float(mixup), float(cutmix)
        if self.mixing and batch_size % 2:
            raise ValueError(
                f"batch_size must be even with mixup or cutmix (they pair the samples of a batch), got {batch_size}."
            )
        self.image_size = image_size
        self.mean = tuple(mean)
        self.num_classes = num_classes
        self.auto_augment = auto_augment
        self._auto_augment = self._build_auto_augment()  # validates the policy now

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (mixup or CutMix on, with a non-zero probability)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    def _build_auto_augment(self) -> Callable[[Any], Any] | None:
        spec = self.auto_augment
        if spec is None:
            return None
        fill = [min(255, round(255 * m)) for m in self.mean]
        if spec in AUTO_AUGMENT_POLICIES:
            return T.AutoAugment(AUTO_AUGMENT_POLICIES[spec], fill=fill)
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        # The hyper-parameters timm's create_transform passes (transforms_factory.py).
        params = dict(translate_const=int(self.image_size * 0.45), img_mean=tuple(fill))
        try:
            if not isinstance(spec, str):
                raise TypeError(spec)
            if spec.startswith("rand"):
                return rand_augment_transform(spec, params)
            if spec.startswith("augmix"):
                return augment_and_mix_transform(spec, {**params, "translate_pct": 0.3})
            return auto_augment_transform(spec, params)
        except (AssertionError, KeyError, TypeError, ValueError, IndexError):
            raise ValueError(
                f"auto_augment must be None, one of {list(AUTO_AUGMENT_POLICIES)} or a timm policy such as "
                f"'rand-m9-mstd0.5-inc1', 'original' or 'augmix-m5-w4-d2', got {spec!r}."
            ) from None

    def image_transforms(self) -> list[Callable[[Any], Any]]:
        """The transforms on the PIL image (after crop and flip)."""
        return [] if self._auto_augment is None else [self._auto_augment]

    def tensor_transforms(self) -> list[Callable[[Tensor], Tensor]]:
        """The transforms on the normalised tensor."""
        if self.random_erasing == 0.0:
            return []
        from timm.data.random_erasing import RandomErasing

        return [RandomErasing(probability=self.random_erasing, max_area=0.4, min_aspect=0.3, mode="const",
                              device="cpu")]

    def batch_mixer(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """timm's ``Mixup`` for training batches (soft targets), or None when off.

        Its label smoothing is 0: the loss's ``label_smoothing`` applies to the soft
        targets, which is the same (smoothing is linear in the target)."""
        if not self.mixing:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.mix_prob,
            switch_prob=self.mix_switch_prob, mode="batch", label_smoothing=0.0, num_classes=self.num_classes,
        )


class ImageClassificationDataModule(L.LightningDataModule):
    """Base data module: holds the three splits and builds their loaders.

    Subclasses set ``num_classes``, ``in_chans`` and ``image_size`` and fill
    ``train_set``, ``val_set`` and ``test_set`` in ``setup``.

    Args:
        batch_size: Batch size of every loader (>= 1).
        num_workers: Loader worker processes (>= 0).
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
        shuffle_seed: Seed of the training loader's shuffling; None: torch's initial
            seed (the run's seed after ``seed_everything``). Saved in checkpoints.

    The training loader shuffles by ``(shuffle_seed, epoch)`` alone (see
    :func:`~singd_lightning.data.sampler.epoch_seeded_loader`), so a run resumed from
    an epoch-end checkpoint sees the same batches as the uninterrupted run.

    A subclass may set ``batch_mixer`` (e.g. timm's ``Mixup``): it then mixes every
    training batch on the device (soft targets), and the training loader drops its
    last incomplete batch (mixing pairs samples).
    """

    num_classes: int
    in_chans: int
    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        shuffle_seed: int | None = None,
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise ValueError(f"shuffle_seed must be an integer or None, got {shuffle_seed!r}.")
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.batch_mixer: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def _fit_epoch(self) -> int:
        """The epoch the attached trainer's fit loop trains next (0 without a trainer).

        It is the value the fit loop passes to ``set_epoch``; the loader must start
        there because Lightning creates the first iterator of a resumed run (whose
        workers prefetch indices) before it calls ``set_epoch``.
        """
        fit_loop = getattr(self.trainer, "fit_loop", None)
        epoch = getattr(getattr(getattr(fit_loop, "epoch_progress", None), "current", None), "processed", 0)
        return epoch if isinstance(epoch, int) and epoch >= 0 else 0

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        if train:
            if self.shuffle_seed is None:
                self.shuffle_seed = torch.initial_seed()
            return epoch_seeded_loader(
                dataset,
                seed=self.shuffle_seed,
                epoch=self._fit_epoch(),
                batch_size=self.batch_size,
                drop_last=self.drop_last or self.batch_mixer is not None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The shuffle seed, so a resumed run shuffles as the uninterrupted one did."""
        return {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the shuffle seed of :meth:`state_dict` (a checkpoint's)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict expects the dict of state_dict(), got {type(state_dict).__name__}.")
        seed = state_dict.get("shuffle_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"the state's shuffle_seed must be an integer or None, got {seed!r}.")
        if seed is not None:
            self.shuffle_seed = seed

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mix training batches with ``batch_mixer`` (on the device, as timm does)."""
        trainer = self.trainer
        if self.batch_mixer is not None and trainer is not None and trainer.training:
            x, y = batch
            return self.batch_mixer(x, y)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
