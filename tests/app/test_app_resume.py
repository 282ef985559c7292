"""Resuming ``python train.py callbacks=with_checkpoint`` from ``last.ckpt`` is exact: the
weights after epoch 2 are bit-identical to those of the uninterrupted run."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from singd_lightning.app.callbacks import RNGStateCheckpoint
from singd_lightning.app.pipeline import train
from singd_lightning.data import DigitsDataModule
from singd_lightning.data.sampler import EpochShuffleSampler
from tests.app.helpers import FAST, compose_cfg

BATCHES = 3  # training batches per epoch
RESUME = [*FAST, "callbacks=with_checkpoint", f"trainer.limit_train_batches={BATCHES}", "test=false",
          "eval_test_every_epoch=false", "num_threads=1"]  # fmt: skip


def _run(overrides: list[str], run_dir: Path) -> dict:
    results = train(compose_cfg([*RESUME, *overrides], output_dir=run_dir))
    assert results["status"] == "ok", results.get("error")
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")


# cct_tiny has dropout and drop-path: the RNG callback matters, not only the sampler.
@pytest.mark.parametrize("setting", [["model=cct_tiny"], ["optimizer=adamw"]], ids=["singd-cct", "adamw-vgg"])
def test_resume_from_last_checkpoint_is_bit_identical(setting: list[str], tmp_path: Path) -> None:
    full = _run([*setting, "trainer.max_epochs=2"], tmp_path / "full")
    # the same run stopped after its first epoch (as if killed), then resumed
    _run([*setting, "trainer.max_epochs=2", f"trainer.max_steps={BATCHES}"], tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = _run([*setting, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed")
    assert full["epoch"] == resumed["epoch"] == 1  # last.ckpt is the last epoch's
    assert full["global_step"] == resumed["global_step"] == 2 * BATCHES
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_rng_callback_restores_every_generator_at_the_epoch_start() -> None:
    callback = RNGStateCheckpoint()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = callback.state_dict()
    # through a checkpoint, loaded the way Lightning resumes (weights only)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    callback.load_state_dict(loaded)
    torch.rand(5), np.random.rand(5), random.random()  # the resumed run's set-up draws
    callback.on_train_epoch_start(None, None)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    state = torch.get_rng_state()
    callback.on_train_epoch_start(None, None)  # type: ignore[arg-type]  # only once
    assert torch.equal(torch.get_rng_state(), state)


def test_rng_callback_refuses_a_foreign_state() -> None:
    callback = RNGStateCheckpoint()
    with pytest.raises(TypeError, match="expects the dict of state_dict\\(\\), got NoneType"):
        callback.load_state_dict(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks the torch, numpy and python RNG states"):
        callback.load_state_dict({"rng": {"torch": torch.get_rng_state()}})
    assert callback._pending is None


def test_datamodule_keeps_its_shuffle_seed_in_checkpoints() -> None:
    torch.manual_seed(7)
    datamodule = DigitsDataModule(batch_size=8)
    datamodule.setup("fit")
    sampler = datamodule.train_dataloader().sampler
    assert isinstance(sampler, EpochShuffleSampler) and sampler.seed == 7 == datamodule.state_dict()["shuffle_seed"]
    restored = DigitsDataModule(batch_size=8)
    restored.load_state_dict(datamodule.state_dict())
    restored.setup("fit")
    assert list(restored.train_dataloader().sampler) == list(sampler)
    with pytest.raises(TypeError, match="expects the dict of state_dict\\(\\), got NoneType"):
        restored.load_state_dict(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shuffle_seed must be an integer"):
        restored.load_state_dict({"shuffle_seed": "x"})
    assert restored.shuffle_seed == 7


def test_datamodule_refuses_bad_loader_settings() -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        DigitsDataModule(num_workers=-1)
