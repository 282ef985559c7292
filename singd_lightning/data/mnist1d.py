"""MNIST-1D (Greydanus, 2020): 1-D digit sequences, generated procedurally offline.

The ``mnist1d`` package turns ten 1-D digit templates into 5000 noisy, padded,
shifted, sheared and scaled sequences of length 40. This module runs its generator
(``mnist1d.data.make_dataset`` with the package's default arguments, seeded) and
never its download path. The package's 4000/1000 train/test split is kept; a fixed,
seeded part of the 4000 training sequences (500 by default) is the validation split.
Sequences are ``(1, 40)`` float32 tensors, already standardised by the generator.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from singd_lightning.data._common import ImageClassificationDataModule, split_indices

#: Sequences in the generator's (train, test) split with its default arguments.
MNIST1D_SIZES: tuple[int, int] = (4000, 1000)
#: Length of every sequence.
MNIST1D_SEQ_LEN: int = 40
#: The generator's default seed, which gives the published dataset.
MNIST1D_DEFAULT_SEED: int = 42


@lru_cache(maxsize=4)
def _generate(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    # make_dataset seeds Python's and NumPy's global generators; keep the caller's.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def seqs(x: np.ndarray) -> Tensor:
        return torch.as_tensor(x, dtype=torch.float32).unsqueeze(1).contiguous()

    def labels(y: np.ndarray) -> Tensor:
        return torch.as_tensor(y, dtype=torch.long)

    return seqs(data["x"]), labels(data["y"]), seqs(data["x_test"]), labels(data["y_test"])


def load_mnist1d_tensors(seed: int = MNIST1D_DEFAULT_SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D (cached in memory per ``seed``).

    Args:
        seed: Seed of the generator; 42 (its default) gives the published dataset.

    Returns:
        Train sequences ``(4000, 1, 40)`` (float32), train labels ``(4000,)``
        (int64), test sequences ``(1000, 1, 40)`` and test labels ``(1000,)``;
        fresh copies, so callers may modify them.
    """
    return tuple(t.clone() for t in _generate(seed))  # type: ignore[return-value]


class MNIST1DDataModule(ImageClassificationDataModule):
    """MNIST-1D: 10 classes, sequences of 1 channel and length 40, no download.

    Exposes ``seq_len`` (40) instead of ``image_size``: the app gives it to the 1-D
    models (``mlp``, ``cnn1d``) and refuses image models on this data.

    Args:
        batch_size: Batch size of every loader.
        num_workers: Loader worker processes (0 is fastest for in-memory data).
        val_size: Training sequences held out for validation (count, or fraction).
        seed: Seed of the train/validation split.
        data_seed: Seed of the generator (42: the published dataset).
        pin_memory: Pin host memory in the loaders.
        drop_last: Drop the last incomplete training batch.
    """

    num_classes = 10
    in_chans = 1
    seq_len = MNIST1D_SEQ_LEN

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int | float = 500,
        seed: int = 0,
        data_seed: int = MNIST1D_DEFAULT_SEED,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        n_train = MNIST1D_SIZES[0]
        count = isinstance(val_size, int) and not isinstance(val_size, bool) and 0 < val_size < n_train
        fraction = isinstance(val_size, float) and 0.0 < val_size < 1.0
        if not (count or fraction):
            raise ValueError(
                f"val_size must be an integer in [1, {n_train - 1}] or a fraction in (0, 1), got {val_size!r}."
            )
        for name, value in (("seed", seed), ("data_seed", data_seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        super().__init__(batch_size, num_workers, pin_memory, drop_last)
        self.save_hyperparameters()
        self.val_size = val_size
        self.seed = seed
        self.data_seed = data_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_test, y_test = load_mnist1d_tensors(self.data_seed)
        train_idx, val_idx = split_indices(len(y), self.val_size, self.seed)
        self.split_indices = (torch.tensor(train_idx), torch.tensor(val_idx))
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x_test, y_test)


__all__ = ["MNIST1D_SEQ_LEN", "MNIST1D_SIZES", "MNIST1DDataModule", "load_mnist1d_tensors"]
