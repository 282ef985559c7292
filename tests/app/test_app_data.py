"""CIFAR-100 and ImageWoof-10 through the app's configs, from tiny fake copies
written in the real on-disk formats (downloads disabled)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch

from singd_lightning.app.pipeline import build_datamodule, train
from tests.app.helpers import FAST, compose_cfg
from tests.data.test_data import write_fake_cifar100, write_fake_imagewoof

LOCAL = ["data.download=false", "data.num_workers=0", "data.pin_memory=false"]


def test_cifar100_config_reads_the_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar100(tmp_path, monkeypatch, n_train=24, n_test=8)
    cfg = compose_cfg(["data=cifar100", f"paths.data_dir={tmp_path}", "data.val_size=4", "data.batch_size=4", *LOCAL])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (20, 4, 8)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= y.min() and y.max() < 100


def test_imagewoof_experiment_config_reads_the_folders(tmp_path: Path) -> None:
    write_fake_imagewoof(tmp_path, n_train=2, n_val=1)
    cfg = compose_cfg(["experiment=imagewoof10_vgg", f"paths.data_dir={tmp_path}", "data.val_size=4",
                       "data.batch_size=4", *LOCAL])  # fmt: skip
    datamodule = build_datamodule(cfg)  # test set as a second validation loader
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (16, 4, 10)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (4, 3, 128, 128) and y.max() < 10
    val_loader, test_loader = datamodule.val_dataloader()
    assert len(test_loader.dataset) == 10


def test_train_on_fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar100(tmp_path / "data", monkeypatch, n_train=40, n_test=8)
    cfg = compose_cfg(
        ["experiment=cifar100_convmixer", "model.name=convmixer_tiny", f"paths.data_dir={tmp_path / 'data'}",
         "data.val_size=8", *LOCAL, *FAST, "data.batch_size=8", "trainer.max_epochs=1"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["data"] == "cifar100" and saved["model"] == "convmixer_tiny"
    assert saved["test_acc"] is not None
