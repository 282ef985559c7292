"""Training-set shuffling that a checkpoint can reproduce: the order of every epoch
is a function of ``(seed, epoch)`` only.

``DataLoader(shuffle=True)`` draws each epoch's permutation (and its workers' seeds)
from torch's global generator, whose state a checkpoint does not hold, so a run
resumed from a checkpoint sees other batches than the uninterrupted run.
:func:`epoch_seeded_loader` builds a training loader that does not touch the global
generator at all::

    loader = epoch_seeded_loader(train_set, seed=0, batch_size=64, num_workers=4)

Lightning's fit loop calls ``loader.sampler.set_epoch(epoch)`` before each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

#: Streams of :func:`epoch_seed`: the permutation and the loader's worker seeds.
PERMUTATION_STREAM, WORKER_STREAM = 0, 1


def epoch_seed(seed: int, epoch: int, stream: int = PERMUTATION_STREAM) -> int:
    """A 63-bit seed for one epoch of a run: distinct for distinct ``(seed, epoch, stream)``
    (NumPy's ``SeedSequence`` mixes them, so seed 1 epoch 0 differs from seed 0 epoch 1).

    Args:
        seed: The run's seed (any integer; taken modulo 2**64).
        epoch: The epoch (>= 0).
        stream: Which random stream of the epoch.
    """
    state = np.random.SeedSequence([seed % 2**64, epoch, stream]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class EpochShuffleSampler(RandomSampler):
    """A fresh permutation of ``range(len(data_source))`` each epoch, seeded by ``(seed, epoch)``.

    It never draws from torch's global generator. :attr:`worker_generator`, given to
    the :class:`~torch.utils.data.DataLoader` as its ``generator``, is reseeded by
    :meth:`set_epoch` as well: the loader draws the seed of its worker processes (and
    thereby their random augmentation) from it.

    A :class:`~torch.utils.data.RandomSampler` subclass, so that Lightning's
    distributed strategies replace it with their ``DistributedSampler`` (which also
    shuffles by seed and epoch), as they would a plain shuffled loader's sampler.

    Args:
        data_source: The dataset (only its length is used).
        seed: Seed of the run.
        epoch: The first epoch this sampler serves; :meth:`set_epoch` changes it.
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.worker_generator = torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` from the next ``iter()`` on (Lightning calls it before each epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}.")
        self.epoch = epoch
        self.worker_generator.manual_seed(epoch_seed(self.seed, epoch, WORKER_STREAM))

    def __iter__(self) -> Iterator[int]:
        # A generator: the permutation is drawn at the first ``next()``, after the fit
        # loop's ``set_epoch`` even when Lightning created the iterator before it.
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def epoch_seeded_loader(dataset: Dataset, seed: int, epoch: int = 0, **loader_kwargs: Any) -> DataLoader:
    """A shuffled training :class:`~torch.utils.data.DataLoader` whose batches, and the
    random state of its workers, depend only on ``(seed, epoch)``.

    Worker processes are started anew each epoch (``persistent_workers=False``): a
    persistent worker's random state would carry over from the epochs before, which a
    resumed run does not have.

    Args:
        dataset: A map-style dataset.
        seed: Seed of the shuffling.
        epoch: The first epoch (for a loader built when training resumes mid-run).
        **loader_kwargs: Other ``DataLoader`` arguments (``batch_size``, ``num_workers``,
            ``drop_last``, ...); not ``shuffle``, ``sampler``, ``generator`` or
            ``persistent_workers=True``.

    Raises:
        ValueError: For one of the arguments above.
    """
    taken = sorted({"shuffle", "sampler", "batch_sampler", "generator"} & set(loader_kwargs))
    if taken:
        raise ValueError(f"epoch_seeded_loader sets {', '.join(taken)} itself; do not pass it.")
    if loader_kwargs.pop("persistent_workers", False):
        raise ValueError("epoch_seeded_loader needs persistent_workers=False (see its docstring).")
    sampler = EpochShuffleSampler(dataset, seed=seed, epoch=epoch)  # type: ignore[arg-type]
    return DataLoader(dataset, sampler=sampler, generator=sampler.worker_generator, **loader_kwargs)


__all__ = ["EpochShuffleSampler", "epoch_seed", "epoch_seeded_loader"]
