"""Synthetic CIFAR-shaped images: offline, instant, learnable.

For checks of the whole training path on a new machine (a GPU, a cluster node)
where no dataset is at hand: every image is its class's fixed random pattern
plus Gaussian noise, so a model's loss falls within a few hundred steps, yet
nothing is downloaded or read from disk. Everything is generated from ``seed``
into memory (about 12 KiB per 32×32 RGB image in float32).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from singd_lightning.data._common import ImageClassificationDataModule


class SyntheticDataModule(ImageClassificationDataModule):
    """Class patterns plus noise, CIFAR-100's shape by default (3×32×32, 100 classes).

    Args:
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes (0 is fastest for in-memory data).
        num_classes: Number of classes (>= 2).
        image_size: Side length of the square images (>= 1).
        in_chans: Number of channels (>= 1).
        train_size: Training images (>= 1).
        val_size: Validation images (>= 1).
        test_size: Test images (>= 1).
        noise: Standard deviation of the noise added to the unit-variance class
            pattern (> 0); larger is harder.
        seed: Seed of the patterns, labels and noise.
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        num_classes: int = 100,
        image_size: int = 32,
        in_chans: int = 3,
        train_size: int = 10000,
        val_size: int = 1000,
        test_size: int = 1000,
        noise: float = 1.0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        for name, value, low in (
            ("num_classes", num_classes, 2), ("image_size", image_size, 1), ("in_chans", in_chans, 1),
            ("train_size", train_size, 1), ("val_size", val_size, 1), ("test_size", test_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise > 0:
            raise ValueError(f"noise must be a number > 0, got {noise!r}.")
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = in_chans
        self.sizes = (train_size, val_size, test_size)
        self.noise = float(noise)
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.in_chans, self.image_size, self.image_size)
        patterns = torch.randn(self.num_classes, *shape, generator=generator)
        splits = []
        for size in self.sizes:
            labels = torch.randint(0, self.num_classes, (size,), generator=generator)
            images = patterns[labels] + self.noise * torch.randn(size, *shape, generator=generator)
            # Unit variance overall, as normalised real images are.
            splits.append(TensorDataset(images / (1.0 + self.noise**2) ** 0.5, labels))
        self.train_set, self.val_set, self.test_set = splits


__all__ = ["SyntheticDataModule"]
