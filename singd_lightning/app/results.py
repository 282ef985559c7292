"""``results.json``: the summary every run writes into its Hydra run directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"

#: Keys every ``results.json`` has (values may be null when a run failed early).
RESULT_KEYS = (
    "status",
    "error",
    "test_acc",
    "test_loss",
    "best_val_acc",
    "final_val_acc",
    "final_train_loss",
    "step_time_ms",
    "optimizer_step_ms",
    "peak_memory_mb",
    "memory_kind",
    "optimizer_state_mb",
    "optimizer",
    "structure",
    "precision",
    "precision_config",
    "model",
    "data",
    "epochs",
    "max_epochs",
    "global_step",
    "diverged_step",
    "num_params",
    "seed",
    "wall_time_s",
    "run_dir",
    "overrides",
)

STATUSES = ("ok", "diverged", "failed")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats to None, tensors/numpy scalars to floats."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def empty_results() -> dict[str, Any]:
    """A result with every key present (None)."""
    return {key: None for key in RESULT_KEYS}


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results`` to ``run_dir/results.json`` atomically; return the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(results), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def summary_values(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers, strings and flags of ``results`` as a flat dict (a run summary for
    W&B): non-finite numbers and missing values are left out; so are the traceback and
    the lists."""
    clean = _clean(results)
    return {
        key: value
        for key, value in clean.items()
        if key != "traceback" and isinstance(value, (bool, int, float, str))
    }


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/results.json``."""
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


__all__ = ["RESULTS_FILE", "RESULT_KEYS", "STATUSES", "empty_results", "read_results", "summary_values", "write_results"]
