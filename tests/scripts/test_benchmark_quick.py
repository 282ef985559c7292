"""``scripts/benchmark.py --quick``: the CPU regression guard writes its baseline,
passes against it and fails, one line per ratio, against a baseline it cannot meet
(run in this process on the tiny ConvMixer, to stay within seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import benchmark
finally:
    sys.path.pop(0)

TINY = ["--quick", "--models", "tiny", "--batch-size", "2", "--steps", "3", "--warmup", "1"]
KEYS = {
    f"tiny {method} {structure} T={T}".replace("  ", " ")
    for method, structure in benchmark.QUICK_METHODS for T in benchmark.QUICK_T
}


@pytest.fixture(autouse=True)
def _keep_threads():
    """``--quick`` runs on one thread; the rest of the test session must not."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _quick(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(args)
    return exit_info.value.code


def test_quick_writes_its_baseline_and_passes_against_it(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert _quick([*TINY, "--write-baseline", "--baseline", str(baseline)]) == 0
    record = json.loads(baseline.read_text())
    assert set(record["ratios"]) == KEYS
    assert all(ratio > 0 for ratio in record["ratios"].values())
    assert record["threads"] == 1 and record["batch_size"] == 2
    # A wide margin: steps of a few milliseconds on a shared machine are noisy.
    assert _quick([*TINY, "--baseline", str(baseline), "--margin", "20"]) == 0
    assert "quick check: no regression" in capsys.readouterr().out


def test_quick_fails_against_an_impossible_baseline(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"ratios": {key: 0.01 for key in KEYS}}))
    assert _quick([*TINY, "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("REGRESSION ")]
    assert len(lines) == len(KEYS)  # one line per regressed ratio
    assert "REGRESSION tiny ours hierarchical T=10: " in out
    assert "baseline 0.01× (limit 0.01× with --margin 1.5)" in lines[0]
    assert f"quick check: {len(KEYS)} ratio(s) regressed" in out


def test_quick_regressions_only_above_the_margin():
    baseline = {"a": 1.0, "b": 2.0}
    lines = benchmark.quick_regressions({"a": 1.49, "b": 3.1, "c": 9.0}, baseline, margin=1.5)
    assert lines == ["REGRESSION b: 3.10× AdamW's step, baseline 2.00× (limit 3.00× with --margin 1.5)"]


def test_quick_without_a_baseline_fails_with_one_line(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert _quick([*TINY, "--baseline", str(missing)]) == 1
    assert f"--baseline {missing} does not exist" in capsys.readouterr().err
    unrelated = tmp_path / "other.json"
    unrelated.write_text(json.dumps({"ratios": {"vgg_quick ours diagonal T=1": 1.0}}))
    assert _quick([*TINY, "--baseline", str(unrelated)]) == 1
    assert "has none of the measured ratios" in capsys.readouterr().err


def test_quick_rejects_options_it_cannot_honour(capsys):
    assert _quick(["--quick", "--device", "cuda"]) == 2
    assert "--quick runs on the CPU" in capsys.readouterr().err
    assert _quick(["--write-baseline"]) == 2
    assert "--baseline and --write-baseline belong to --quick" in capsys.readouterr().err
    assert _quick(["--quick", "--margin", "0.9"]) == 2
    assert "--margin must be above 1" in capsys.readouterr().err
    assert _quick(["--quick", "--steps", "0"]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_the_recorded_baseline_covers_the_quick_models():
    ratios = json.loads(Path(benchmark.QUICK_BASELINE).read_text())["ratios"]
    expected = {
        f"{model} {method} {structure} T={T}".replace("  ", " ")
        for model in benchmark.QUICK_MODELS for method, structure in benchmark.QUICK_METHODS for T in benchmark.QUICK_T
    }
    assert set(ratios) == expected
