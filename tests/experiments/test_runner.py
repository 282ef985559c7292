"""The paper runner: the smoke suite end to end (a 3-job prefix, few batches), the
reports of failed/diverged jobs, and the GPU suites' grids (dry run)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "experiments" / "run.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _load_runner():
    spec = importlib.util.spec_from_file_location("experiments_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["experiments_run"] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def test_smoke_suite_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--suite", "smoke", "--out", str(out), "--limit", "3",
         "-o", "trainer.limit_train_batches=4", "-o", "trainer.limit_val_batches=2",
         "-o", "trainer.limit_test_batches=2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == [
        "singd_diagonal_vgg_small_fp32", "sgd_vgg_small_fp32_lr1e6", "kfac_vgg_small_bf16-true",
    ]  # fmt: skip
    status = {r["job"]: r["status"] for r in rows}
    assert status["singd_diagonal_vgg_small_fp32"] == "ok"
    assert status["sgd_vgg_small_fp32_lr1e6"] == "diverged"  # reported, and the suite went on
    assert status["kfac_vgg_small_bf16-true"] in ("ok", "diverged", "failed")  # whatever happens
    # "precision" is the job's group option (the tables' key), "trainer_precision" what ran
    assert [(r["precision"], r["trainer_precision"]) for r in rows] == [
        ("fp32", "32-true"), ("fp32", "32-true"), ("bf16-true", "bf16-true"),
    ]  # fmt: skip
    for r in rows:
        assert r["optimizer"] and r["model"] == "vgg_small" and r["data"] == "digits"
        assert float(r["peak_memory_mb"]) > 0 and float(r["step_time_ms"]) > 0
        if r["status"] == "ok":
            assert 0 <= float(r["test_err"]) <= 1
    report = (out / "results.md").read_text()
    assert "| SINGD-Diag | " in report and "| SGD (lr=1e6) | diverged / " in report
    assert "| KFAC | " in report
    assert "## digits: test error (%) / peak memory (GB) / wall time (min)" in report
    assert "| optimizer | vgg_small fp32 | vgg_small bf16-true |" in report
    for png in ("test_error_digits_vgg_small_fp32.png", "test_error_digits_vgg_small_bf16-true.png", "memory.png"):
        assert (out / png).read_bytes().startswith(PNG), png
    for r in rows:
        run_dir = Path(r["run_dir"])
        assert (run_dir / "results.json").exists() and (run_dir / "csv" / "metrics.csv").exists()


def test_failed_and_diverged_jobs_show_in_the_table(tmp_path: Path) -> None:
    rows = [
        {"job": "a", "label": "SINGD-Diag", "optimizer": "singd", "model": "vgg", "precision": "bf16", "data": "cifar100",
         "status": "ok", "test_acc": 0.7, "test_err": 0.3, "peak_memory_mb": 1000.0, "optimizer_state_mb": 1.5,
         "run_dir": str(tmp_path / "a")},
        {"job": "b", "label": "KFAC", "optimizer": "kfac", "model": "vgg", "precision": "bf16", "data": "cifar100",
         "status": "failed", "error": "RuntimeError: boom", "run_dir": str(tmp_path / "b")},
        {"job": "c", "label": "AdamW", "optimizer": "adamw", "model": "vgg", "precision": "bf16", "data": "cifar100",
         "status": "diverged", "peak_memory_mb": 900.0, "run_dir": str(tmp_path / "c")},
    ]  # fmt: skip
    rows[0]["wall_time_s"] = 90.0
    report = runner.markdown_report(rows, "cifar100")
    # test error (%) / peak memory (GB = 1e9 bytes; results.json has MiB) / wall time (min)
    assert "| AdamW | diverged / 0.94 / – |" in report
    assert "| KFAC | failed / – / – |" in report
    assert "| SINGD-Diag | 30.0 / 1.05 / 1.5 |" in report
    assert "RuntimeError: boom" in report
    assert report.index("| AdamW |") < report.index("| KFAC |") < report.index("| SINGD-Diag |")  # paper order
    runner.report(rows, tmp_path, "cifar100")  # plots with missing logs still render
    assert (tmp_path / "memory.png").read_bytes().startswith(PNG)
    assert (tmp_path / "test_error_cifar100_vgg_bf16.png").exists()


@pytest.mark.parametrize("suite", ["cifar100", "imagewoof10"])
def test_paper_suites_dry_run(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert runner.main(["--suite", suite, "--out", str(tmp_path), "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    models = ("vgg", "convmixer", "cct", "swin", "gcvit", "repvit", "hdvt")  # the paper's list
    # 7 models x 2 precisions x (SGD, AdamW, KFAC, IKFAC, INGD + SINGD x 3 structures)
    assert len(commands) == 7 * 2 * 8
    for model in models:
        assert sum(f"experiment={suite}_{model} " in c for c in commands) == 16
    assert sum("optimizer=singd" in c for c in commands) == 7 * 2 * 3
    assert all("trainer=gpu" in c and "hydra.run.dir=" in c for c in commands)
    assert runner.main(["--suite", suite, "--out", str(tmp_path), "--dry-run", "--models", "cct",
                        "--optimizers", "singd", "--structures", "hierarchical", "--precisions", "bf16"]) == 0
    assert capsys.readouterr().out.count("train.py") == 1
