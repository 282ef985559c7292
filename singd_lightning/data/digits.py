"""scikit-learn's bundled handwritten digits as a small, offline image dataset.

1797 real 8×8 grayscale digit images ship inside scikit-learn, so this module
needs no download. Images are bilinearly resized to ``image_size`` (32 px by
default), repeated to three channels and normalised with the training split's
mean and standard deviation. The train/val/test split (1257/270/270) is a fixed,
seeded permutation. All tensors live in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from singd_lightning.data._common import ImageClassificationDataModule

#: Sizes of the (train, val, test) splits; they add up to the 1797 images.
DIGITS_SPLIT_SIZES: tuple[int, int, int] = (1257, 270, 270)


def load_digits_tensors(image_size: int = 32, in_chans: int = 3) -> tuple[Tensor, Tensor]:
    """All digits as images in ``[0, 1]``.

    Args:
        image_size: Output side length (bilinear resize from 8 px).
        in_chans: Output channels; the gray channel is repeated.

    Returns:
        Images ``(1797, in_chans, image_size, image_size)`` (float32) and labels
        ``(1797,)`` (int64).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = images.clamp_(0.0, 1.0).repeat(1, in_chans, 1, 1)
    return images.contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(ImageClassificationDataModule):
    """Offline default data: scikit-learn digits, 10 classes, 32×32 RGB.

    Args:
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes (0 is fastest for in-memory data).
        image_size: Side length the 8 px images are resized to (>= 1).
        in_chans: Number of channels (the gray channel is repeated; >= 1).
        seed: Seed of the fixed split permutation.
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        in_chans: int = 3,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        for name, value in (("image_size", image_size), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self.save_hyperparameters()
        self.image_size = image_size
        self.in_chans = in_chans
        self.seed = seed
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size, self.in_chans)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val, _ = DIGITS_SPLIT_SIZES
        splits = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
        train_images = images[splits[0]]
        self.mean = train_images.mean().item()
        self.std = train_images.std().item()
        images = (images - self.mean) / self.std
        self.split_indices = tuple(s.sort().values for s in splits)
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(images[idx], labels[idx]) for idx in self.split_indices
        )


__all__ = ["DIGITS_SPLIT_SIZES", "DigitsDataModule", "load_digits_tensors"]
