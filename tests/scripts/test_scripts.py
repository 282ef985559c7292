"""The benchmark and scaling scripts run end to end and write their outputs
(smoke tests at tiny sizes; the numbers themselves come from running the scripts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--models", "convmixer",
         "--structures", "diagonal", "--T", "2", "--batch-size", "2", "--steps", "2",
         "--warmup", "0", "--methods", "ours", "reference", "--no-peak", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    methods = {(r["method"], r["structure"]) for r in rows}
    assert {("adamw", ""), ("sgd", ""), ("reference", "diagonal"), ("ours", "diagonal")} == methods
    assert all(r["error"] == "" and r["step_ms"] > 0 for r in rows)
    ours = next(r for r in rows if r["method"] == "ours" and r["T"] == 1)
    adamw = next(r for r in rows if r["method"] == "adamw")
    assert 0 < ours["state_bytes"] < adamw["state_bytes"]  # diagonal SINGD is leaner than AdamW
    assert "| convmixer | ours | diagonal | 1 |" in result.stdout
    # T = 2 runs with T = 1 (the collecting step) and reports the mean of a cycle.
    assert {(r["method"], r["T"]) for r in rows if r["structure"]} == {(m, t) for m in ("ours", "reference") for t in (1, 2)}
    for method in ("ours", "reference"):
        one, two = (next(r for r in rows if r["method"] == method and r["T"] == t) for t in (1, 2))
        assert two["extra"]["collecting_step_ms"] == one["step_ms"]
        assert abs(two["step_ms"] - (two["extra"]["plain_step_ms"] + one["step_ms"]) / 2) < 1e-9


def test_benchmark_peak_memory_runs_in_a_fresh_process():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    config = benchmark.Config("convmixer", "ours", "diagonal", T=1, batch_size=2)
    peak = benchmark.measure_peak(config, steps=1)
    assert 2**20 < peak < 8 * 2**30  # what the run allocated at its peak, in bytes


def test_scaling_sweep_plots(tmp_path):
    png, data = tmp_path / "scaling.png", tmp_path / "scaling.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "scaling.py"), "--dims", "8", "16",
         "--structures", "dense", "diagonal", "tril_toeplitz", "--repeats", "1",
         "--out", str(png), "--json", str(data)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    storage = {(r["structure"], r["dim"]): r["storage"] for r in json.loads(data.read_text())}
    assert storage[("dense", 16)] == 256 and storage[("diagonal", 16)] == 16


def test_spike_guard_report_runs(tmp_path):
    out = tmp_path / "spike_guard.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "spike_guard.py"), "--epochs", "1", "--limit-batches", "4",
         "--structures", "diagonal", "--spikes", "1e6", "--spike-steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())
    ordinary = runs[0]
    # Without a spike nothing is clipped and the guarded run equals the paper's.
    assert ordinary["clipped_updates"] == ordinary["clipped_factor_updates"] == 0
    assert ordinary["extra"]["bit_identical_to_unguarded"] is True
    spiked = [r for r in runs if r["spike"] == 1e6 and r["method"] == "singd"]
    assert spiked and spiked[0]["clipped_updates"] > 0
    assert "| ×1e+06 | 2 |" in result.stdout
