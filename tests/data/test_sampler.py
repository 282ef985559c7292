"""The (seed, epoch)-seeded training sampler and loader of :mod:`singd_lightning.data.sampler`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from singd_lightning.data.sampler import EpochShuffleSampler, epoch_seed, epoch_seeded_loader


class RandomAugment(Dataset):
    """Item ``i`` is ``(i, a draw of the process's global generator)``: a stand-in for
    a random augmentation, in a worker or in the main process."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.rand(())


def _epoch(batches: DataLoader | Iterator) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for idx, val in batches for i, v in zip(idx, val)]


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(range(50), seed=3), EpochShuffleSampler(range(50), seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    torch.manual_seed(123)  # the global generator has no say
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first
    assert list(a) == list(EpochShuffleSampler(range(50), seed=3, epoch=1))
    assert list(EpochShuffleSampler(range(50), seed=4)) != first


def test_draws_nothing_from_the_global_generator() -> None:
    state = torch.get_rng_state()
    loader = epoch_seeded_loader(range(20), seed=0, batch_size=4)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_set_epoch_after_iter_applies() -> None:
    """Lightning creates a resumed run's first iterator before calling ``set_epoch``."""
    sampler = EpochShuffleSampler(range(30), seed=0)
    iterator = iter(sampler)
    sampler.set_epoch(2)
    assert list(iterator) == list(EpochShuffleSampler(range(30), seed=0, epoch=2))


def test_epoch_seed_mixes_seed_and_epoch() -> None:
    seeds = {epoch_seed(s, e, k) for s in range(4) for e in range(4) for k in range(2)}
    assert len(seeds) == 32 and all(0 <= s < 2**63 for s in seeds)
    assert epoch_seed(-1, 0) == epoch_seed(2**64 - 1, 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_repeats_batches_and_augmentation(num_workers: int) -> None:
    """Epoch 1 of a loader that served epoch 0 equals epoch 1 of a loader built at
    epoch 1 (a resumed run), worker-side randomness included.

    As in Lightning, the resumed run creates its iterator (starting the workers)
    before the RNG callback restores the global state at the epoch start.
    """
    kwargs = {"batch_size": 4, "num_workers": num_workers}
    torch.manual_seed(0)
    uninterrupted = epoch_seeded_loader(RandomAugment(), seed=5, **kwargs)
    epoch0 = _epoch(uninterrupted)
    uninterrupted.sampler.set_epoch(1)
    state = torch.get_rng_state()  # what the checkpoint holds
    epoch1 = _epoch(uninterrupted)
    torch.manual_seed(99)  # a resumed process
    resumed = iter(epoch_seeded_loader(RandomAugment(), seed=5, epoch=1, **kwargs))
    torch.set_rng_state(state)  # what the RNG callback restores
    assert _epoch(resumed) == epoch1
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0]


def test_refuses_arguments_it_sets() -> None:
    with pytest.raises(ValueError, match="sets shuffle itself"):
        epoch_seeded_loader(range(4), seed=0, shuffle=True)
    with pytest.raises(ValueError, match="persistent_workers=False"):
        epoch_seeded_loader(range(4), seed=0, num_workers=1, persistent_workers=True)
    sampler = EpochShuffleSampler(range(4), seed=0)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        sampler.set_epoch(-1)
    assert sampler.epoch == 0
