"""The GPU check runs end to end on CPU (``--dry-run``), so that it works the
moment a GPU is lent; its target checks and summary are tested on made-up rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from singd_lightning.structures import toeplitz

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import gpu_check
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    return result, out


def test_dry_run_writes_every_stage(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    assert list(summary["stages"]) == ["tests", "train", "toeplitz", "batching", "benchmark"]
    tests = summary["stages"]["tests"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    assert (out / "tests" / "junit.xml").exists()
    run = summary["stages"]["train"]["runs"]["convmixer"]
    assert run["status"] == "ok" and run["global_step"] == 2
    assert json.loads(Path(run["results"]).read_text())["precision"] == "bf16-mixed"
    rows = json.loads((out / "benchmark" / "tiny.json").read_text())
    assert {(r["method"], r["T"]) for r in rows} >= {("adamw", 1), ("ours", 1), ("ours", 2)}
    assert all(r["error"] == "" for r in rows)
    batching = json.loads((out / "batching.json").read_text())
    assert {r["operation"] for r in batching["totals"]} == {"precondition", "statistic", "factor_product"}
    assert all(r["same"] for r in batching["groups"])
    assert {r["structure"] for r in batching["steps"]} == {"diagonal", "block_diagonal", "hierarchical"}
    assert {(r["structure"], r["T"]) for r in batching["train_steps"]} == {
        (s, T) for s in ("diagonal", "block_diagonal", "hierarchical") for T in (1, 10)}
    assert "## Same-shaped layers" in (out / "summary.md").read_text()
    calibration = json.loads((out / "toeplitz.json").read_text())
    assert [r["d"] for r in calibration] == [64, 256]
    assert all(r["measured_constant"] > 0 and r["assumed_constant"] == toeplitz.FFT_COST for r in calibration)
    text = (out / "summary.md").read_text()
    for heading in ("## CUDA tests", "## Training runs", "## Toeplitz cost constant", "## Step time and peak memory"):
        assert heading in text
    assert "| convmixer | ok | 2 |" in text


def _row(structure: str, method: str = "ours", T: int = 10, step_ms: float = 10.0, peak: int = 100) -> dict:
    return {"model": "m", "method": method, "structure": structure, "T": T, "step_ms": step_ms,
            "peak_bytes": peak, "error": ""}


def test_targets_are_checked_against_adamw_of_the_same_model():
    rows = [
        _row("", "adamw", 1, 10.0, 100),
        _row("hierarchical", step_ms=10.4, peak=90),  # met: 1.04 ≤ 1.05, 0.9 ≤ 1
        _row("diagonal", step_ms=11.0, peak=120),  # missed both
        _row("tril_toeplitz", step_ms=50.0, peak=100),  # no time target; peak 1.0 met
        _row("diagonal", T=1, step_ms=99.0),  # T = 1: no targets
    ]
    checks = {(c["structure"], c["what"]): (c["value"], c["met"]) for c in gpu_check.check_targets(rows)}
    assert checks == {
        ("hierarchical", "step time ×AdamW"): (1.04, True),
        ("hierarchical", "peak memory ×AdamW"): (0.9, True),
        ("diagonal", "step time ×AdamW"): (1.1, False),
        ("diagonal", "peak memory ×AdamW"): (1.2, False),
        ("tril_toeplitz", "peak memory ×AdamW"): (1.0, True),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_only_the_dry_run_is_accepted(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "unused"])
    assert "no CUDA device is visible; on a CPU use --dry-run" in capsys.readouterr().err


def test_a_broken_stage_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "run_tests", broken)
    assert gpu_check.main(["--dry-run", "--stages", "tests", "toeplitz", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["tests"] == {"ok": False, "error": "RuntimeError: boom"}
    assert summary["stages"]["toeplitz"]["ok"] and not summary["ok"]
    assert "Stage tests broke: RuntimeError: boom" in (tmp_path / "summary.md").read_text()


def test_benchmark_times_survive_a_run_stopped_during_the_peaks(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"

    def stopped(config, steps):
        raise KeyboardInterrupt  # as a timeout's kill would, mid-peaks

    monkeypatch.setattr(benchmark, "measure_peak", stopped)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--models", "tiny", "--structures", "diagonal", "--methods", "ours", "--T", "1",
                        "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"adamw", "sgd", "ours"} and all(r["step_ms"] > 0 for r in rows)


@pytest.mark.parametrize("model", list(gpu_check.MODELS.values()))
def test_every_gpu_training_run_composes(model):
    """The GPU runs' configs resolve (a typo would only show on the device)."""
    from omegaconf import OmegaConf

    from tests.app.helpers import compose_cfg

    cfg = compose_cfg(gpu_check.train_overrides(model, dry_run=False, epochs=2, steps_per_epoch=100))
    assert cfg.data.name == "synthetic" and cfg.data.train_size == 12800 and cfg.data.batch_size == 128
    assert cfg.precision.trainer_precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    paper_names = {"vgg": "vgg16", "convmixer": "convmixer_256_8", "cct": "cct_7_3x1_32", "swin": "swin_tiny_32"}
    assert OmegaConf.to_container(cfg.model, resolve=True)["name"] == paper_names[model]
