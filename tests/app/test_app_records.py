"""What a run prints and records: one console line per message, the run's own config
and precision, torchmetrics accuracies and the W&B run summary."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

import singd_lightning.app.pipeline as pipeline
from singd_lightning.app.hydra_utils import QUIET_LIGHTNING_MESSAGES, configure_lightning_logging
from singd_lightning.app.module import ImageClassifier
from singd_lightning.app.pipeline import train
from singd_lightning.models import create_model
from tests.app.helpers import FAST, compose_cfg, run_cli

#: FAST, but with the model summary (whose default Lightning replaces with a note) and 2 epochs.
RUN = [o for o in FAST if "model_summary" not in o and o != "trainer.max_epochs=1"] + [
    "trainer.max_epochs=2", "num_threads=1",
]  # fmt: skip


def test_cli_run_prints_once_and_records_what_ran(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*RUN, "seed=5", "trainer.precision=bf16-mixed", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # each Lightning INFO message once (Hydra's root handler, not Lightning's own too)
    for message in ("Seed set to 5", "Using bfloat16 Automatic Mixed Precision", "GPU available: False",
                    "`Trainer.fit` stopped"):  # fmt: skip
        assert console.count(message) == 1, (message, console[-3000:])
    assert "INFO: " not in proc.stderr  # Lightning's console format
    for noise in ("litlogger", "already configured with model summary callbacks"):
        assert noise not in console
    assert "Trainable params" in console  # the summary itself still prints
    # ... and into the job's log file through Hydra's root handler
    assert "Seed set to 5" in (run_dir / "train.log").read_text()

    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["seed"] == 5  # the run's seed, not the data module's saved one
    assert hparams["trainer"]["precision"] == "bf16-mixed" and hparams["optimizer"]["name"] == "singd"  # nested
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["precision"], results["precision_config"]) == ("bf16-mixed", "fp32")
    assert results["seed"] == 5

    # val/acc_best is the running maximum of val/acc over the epochs
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    accs = [float(r["val/acc"]) for r in rows]
    bests = [float(r["val/acc_best"]) for r in rows]
    assert len(accs) == 2 and bests == [max(accs[: i + 1]) for i in range(len(accs))]
    assert math.isclose(results["best_val_acc"], max(accs), rel_tol=1e-6)


def test_module_metrics_are_torchmetrics() -> None:
    module = ImageClassifier(create_model("vgg_small", num_classes=10), optimizer={"name": "adamw"})
    for name in ("train_acc", "val_acc", "epoch_test_acc", "test_acc"):
        metric = getattr(module, name)
        assert isinstance(metric, MulticlassAccuracy) and metric.average == "micro"
    assert isinstance(module.val_acc_best, MaxMetric)
    assert math.isnan(module.best_val_acc)  # no epoch validated yet
    # micro accuracy is the fraction of correct predictions (the values logged before)
    logits, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    module.val_acc.update(logits.argmax(-1), y)
    assert math.isclose(float(module.val_acc.compute()), float((logits.argmax(-1) == y).float().mean()), rel_tol=1e-6)
    # the best accuracy travels with checkpoints
    module.val_acc_best.update(torch.tensor(0.75))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = ImageClassifier(create_model("vgg_small", num_classes=10), optimizer={"name": "adamw"})
    restored.on_load_checkpoint(checkpoint)
    assert restored.best_val_acc == pytest.approx(0.75)


def test_module_needs_the_number_of_classes() -> None:
    net = torch.nn.Linear(4, 3)  # no num_classes attribute
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(net, optimizer={"name": "adamw"})
    assert ImageClassifier(net, optimizer={"name": "adamw"}, num_classes=3).num_classes == 3


def test_lightning_logging_hands_over_to_the_root_logger() -> None:
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    saved_filters = rank_zero.filters[:]
    root = logging.getLogger()
    handler = logging.Handler()
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    root.addHandler(handler)
    # An in-process run of the app earlier in the session may have installed it already.
    rank_zero.filters[:] = [f for f in saved_filters if type(f).__name__ != "_DropMessages"]
    try:
        configure_lightning_logging()
        configure_lightning_logging()  # idempotent: one filter, no error
        for lg in loggers:
            assert lg.propagate and not any(type(h) is logging.StreamHandler for h in lg.handlers)
        assert sum(type(f).__name__ == "_DropMessages" for f in rank_zero.filters) == 1
        level = root.level
        root.setLevel(logging.INFO)
        rank_zero.info("GPU available: False")
        rank_zero.info(QUIET_LIGHTNING_MESSAGES[0] + " ...")
        root.setLevel(level)
        assert [r.getMessage() for r in records] == ["GPU available: False"]
    finally:
        root.removeHandler(handler)
        rank_zero.filters[:] = saved_filters
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers[:] = handlers
            lg.propagate = propagate


def test_wandb_summary_holds_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    captured: dict = {}
    finish = pipeline.finish_wandb

    def capture_then_finish() -> str | None:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            captured["summary"] = dict(wandb.run.summary)
            captured["config"] = dict(wandb.run.config)
        return finish()

    monkeypatch.setattr(pipeline, "finish_wandb", capture_then_finish)
    cfg = compose_cfg(["logger=wandb", "seed=5", *FAST], output_dir=tmp_path)
    results = train(cfg)
    summary = captured["summary"]
    assert summary["status"] == "ok" and summary["optimizer"] == "singd" and summary["precision"] == "32-true"
    for key in ("test_acc", "best_val_acc", "step_time_ms", "optimizer_state_mb", "num_params"):
        assert summary[key] == pytest.approx(results[key]), key
    assert "traceback" not in summary and "overrides" not in summary
    assert captured["config"]["seed"] == 5 and captured["config"]["data"]["_target_"]  # the run's config, nested
    assert not any(re.match(r"^data/", k) for k in captured["config"])  # not flattened
