"""The app's per-epoch records the converge suite reads: the training time and the
optimizer steps so far, in the row of every validation's metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from singd_lightning.app.pipeline import train
from tests.app.helpers import FAST, compose_cfg


@pytest.fixture(autouse=True)
def _no_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_every_validation_row_has_the_training_time_and_steps(tmp_path: Path) -> None:
    cfg = compose_cfg(["optimizer=adamw", *FAST, "trainer.max_epochs=3", "trainer.limit_train_batches=3"],
                      output_dir=tmp_path)  # fmt: skip
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/acc"]]
    assert [float(r["perf/train_steps"]) for r in rows] == [3, 6, 9]
    times = [float(r["perf/train_time_s"]) for r in rows]
    assert 0 < times[0] < times[1] < times[2] <= results["wall_time_s"]
