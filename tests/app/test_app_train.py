"""One fast epoch through :func:`singd_lightning.app.pipeline.train` on digits: every
model, optimizer and precision at least once; results.json in every outcome."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from singd_lightning.app import pipeline as train_module
from singd_lightning.app.results import RESULT_KEYS
from singd_lightning.app.pipeline import objective, train
from tests.app.helpers import FAST, compose_cfg

# Every model, optimizer and precision once (not the product).
CASES = [
    ("vgg_small", "singd", "fp32"),
    ("convmixer_tiny", "ingd", "bf16"),
    ("cct_tiny", "ikfac", "fp16"),
    ("swin_nano", "kfac", "bf16-true"),
    ("vgg_small", "adamw", "bf16"),
    ("convmixer_tiny", "sgd", "fp32"),
]


@pytest.mark.parametrize(("model", "optimizer", "precision"), CASES)
def test_one_fast_epoch(model: str, optimizer: str, precision: str, tmp_path: Path) -> None:
    cfg = compose_cfg(
        [f"model={model}", f"optimizer={optimizer}", f"precision={precision}", "structure=diagonal", *FAST],
        output_dir=tmp_path,
    )
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(RESULT_KEYS) <= set(saved)
    assert saved["status"] == "ok" and saved["error"] is None
    assert (saved["optimizer"], saved["model"], saved["precision_config"], saved["data"]) == (
        optimizer, model, precision, "digits",
    )  # fmt: skip
    # what the trainer ran: on a CPU Lightning runs fp16's 16-mixed as bf16-mixed
    ran = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "bf16-mixed", "bf16-true": "bf16-true"}
    assert saved["precision"] == ran[precision]
    assert saved["structure"] == {"singd": "diagonal", "ingd": "dense", "ikfac": "dense", "kfac": "dense"}.get(optimizer)
    for key in ("test_acc", "best_val_acc", "final_train_loss", "step_time_ms", "optimizer_step_ms",
                "peak_memory_mb", "optimizer_state_mb"):  # fmt: skip
        assert isinstance(saved[key], float) and saved[key] >= 0, key
    assert 0 <= saved["test_acc"] <= 1
    assert saved["epochs"] == 1 and saved["global_step"] == 2
    # CSV log: losses, accuracies, learning rate, step time, memory, per-epoch test accuracy
    with open(tmp_path / "csv" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    expected = {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best",
                "test/acc", "test/loss", "epoch_test/acc", "perf/step_time_ms", "perf/optimizer_step_ms",
                "perf/peak_memory_mb", "perf/optimizer_state_mb"}  # fmt: skip
    assert expected <= columns, expected - columns
    assert any(c.startswith("lr-") for c in columns)
    if optimizer in ("singd", "ingd", "ikfac", "kfac"):  # the plugin's diagnostics callback
        assert any(c.startswith("singd/") for c in columns)
    assert (tmp_path / "csv" / "hparams.yaml").read_text().count("optimizer") >= 1


def test_kronecker_state_is_smaller_with_structure(tmp_path: Path) -> None:
    sizes = {}
    for structure in ("dense", "diagonal"):
        cfg = compose_cfg([f"structure={structure}", *FAST], output_dir=tmp_path / structure)
        sizes[structure] = train(cfg)["optimizer_state_mb"]
    assert sizes["diagonal"] < sizes["dense"]


def test_diverged_run_stops_early(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["optimizer=sgd", "optimizer.lr=1e6", *FAST, "trainer.max_epochs=5", "trainer.limit_train_batches=5"],
        output_dir=tmp_path,
    )
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == saved["status"] == "diverged"
    assert saved["test_acc"] is None  # not tested
    assert saved["diverged_step"] is not None and saved["global_step"] < 5 * 5  # stopped early
    assert objective(cfg, results) != objective(cfg, results)  # NaN: a failed trial for Optuna
    cfg.objective_if_missing = 0.0  # as hparams_search sets it: a diverged trial is the worst
    assert objective(cfg, results) == 0.0


def test_failed_run_writes_results_and_raises(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["data=cifar100", f"paths.data_dir={tmp_path / 'missing'}", "data.download=false", *FAST],
        output_dir=tmp_path / "run",
    )
    with pytest.raises(FileNotFoundError, match="CIFAR-100 not found"):
        train(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "failed"
    assert "CIFAR-100 not found" in saved["error"]
    assert saved["optimizer"] == "singd" and saved["data"] == "cifar100"


def test_wandb_offline_run_gets_the_resolved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    captured = {}
    finish = train_module.finish_wandb

    def capture_then_finish():
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            captured["config"] = dict(wandb.run.config)
            captured["offline"] = wandb.run.settings.mode
        return finish()

    monkeypatch.setattr(train_module, "finish_wandb", capture_then_finish)
    cfg = compose_cfg(["logger=wandb", "optimizer.lr=0.0123", *FAST], output_dir=tmp_path)
    assert train(cfg)["status"] == "ok"
    config = captured["config"]
    assert config["optimizer"]["lr"] == 0.0123
    assert config["optimizer"]["structures"][0] == {"name": "hierarchical", "k1": 15, "k2": 15}  # resolved
    assert config["precision"]["name"] == "fp32"
    assert captured["offline"] in ("offline", "dryrun")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert sys.modules["wandb"].run is None  # finished: the next job gets its own run


def test_torch_threads_option(tmp_path: Path) -> None:
    cfg = compose_cfg(["num_threads=1", *FAST], output_dir=tmp_path)
    train(cfg)
    assert torch.get_num_threads() == 1
