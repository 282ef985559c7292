"""scripts/warm_start.py runs end to end at tiny sizes and writes its JSON and PNG
(the numbers themselves come from running the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_warm_start_script_writes_json_and_png(tmp_path):
    out, png = tmp_path / "warm.json", tmp_path / "warm.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "warm_start.py"), "--workloads", "digits",
         "--configs", "ingd_identity", "ingd_warm", "--lrs", "0.003", "--epochs", "2", "--width", "16",
         "--long-epochs", "2", "--kl-clip", "1e-3", "--limit", "200", "--small-batches", "8", "--start-cost", "8x4",
         "--json", str(out), "--png", str(png)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [(r["config"], r["lr"]) for r in data["runs"]] == [("ingd_identity", 0.003), ("ingd_warm", 0.003)]
    assert [r["config"] for r in data["long"]] == ["ingd", "ingd_kl_clip0.001"]
    for r in data["runs"] + data["long"]:
        assert len(r["train_loss"]) == len(r["test_acc"]) == 2
    # The warm start moved the factors away from the identity at the first step.
    assert data["runs"][1]["max_factor"][0] != 1.0
    assert [(r["start"], r["batch"]) for r in data["small_batches"]] == [("identity", 8), ("warm", 8)]
    assert all(r["clipped_factor_updates"] >= 0 and r["final_loss"] > 0 for r in data["small_batches"])
    cost = data["start_cost"]
    assert [(r["shape"], r["structure"]) for r in cost] == [("8x4", s) for s in ("dense", "hierarchical", "diagonal")]
    assert all(r["identity_s"] > 0 and r["warm_s"] > 0 for r in cost)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| digits | ingd_warm | 0.003 |" in result.stdout
