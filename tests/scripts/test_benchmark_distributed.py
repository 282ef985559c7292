"""scripts/benchmark_distributed.py runs end to end at a tiny size and writes its
JSON (the numbers themselves come from running the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_distributed_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_distributed.py"), "--worlds", "2", "--width", "32",
         "--inputs", "8", "--steps", "1", "--warmup", "0", "--structures", "dense", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(records) == {"replicated", "distributed", "fsdp"}
    assert all(r["world"] == 2 and r["optimizer_ms"] > 0 and len(r["state_bytes_per_rank"]) == 2 for r in records.values())
    # Sharding splits the state; distributed work keeps momenta on the owners only.
    replicated = max(records["replicated"]["state_bytes_per_rank"])
    assert max(records["fsdp"]["state_bytes_per_rank"]) < replicated
    assert max(records["distributed"]["state_bytes_per_rank"]) < replicated
    assert " 2 dense         fsdp" in result.stdout
