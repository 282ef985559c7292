"""One prepared check of the CUDA path, for the few minutes a GPU is lent.

Five stages, each in its own processes and time budget, everything written
under one folder (``--out``)::

    tests/       pytest -m cuda: every test that needs CUDA (16-mixed with
                 Lightning's GradScaler, bf16-mixed/true, a CUDA checkpoint
                 resume, host-device syncs per step, ...): junit.xml, pytest.log
    train/       one short bf16 run per paper model (VGG-16, ConvMixer, CCT, Swin)
                 through train.py on synthetic CIFAR-shaped data: <model>/results.json
    toeplitz.json  the Toeplitz FFT-versus-dense cost constant measured on the
                 device (matmul of d × d factors with 8192 columns both ways), next
                 to the one the cost model assumes
    batching.json  scripts/batch_layers.py on the device: preconditioning,
                 statistic projections and factor products of each group of
                 same-shaped layers (CCT, Swin), one call per layer against one
                 batched call per group, the whole step and training step with
                 batch_layers off and on
    benchmark/   scripts/benchmark.py --device cuda --dtype bf16 at batch 128 per
                 model: AdamW, SGD, KFAC, the reference package and SINGD
                 (diagonal, block-diagonal, hierarchical, Toeplitz) at T = 1 and
                 10: <model>.json, <model>.log
    summary.json, summary.md   what ran, what passed, the numbers and the targets

Usage::

    scripts/gpu_check.sh                       # on the GPU machine (< 8 min on an H100/H200)
    scripts/gpu_check.sh --dry-run --out /tmp/x  # on CPU, tiny sizes: checks the plumbing

It exits with 1 if a stage failed (the summary says which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# This checkout's package, installed or not (its subprocesses get it by PYTHONPATH).
sys.path.insert(0, str(ROOT))

#: The paper's CIFAR-size models: benchmark name → the app's model config.
MODELS = {"vgg16": "vgg", "convmixer": "convmixer", "cct": "cct", "swin": "swin"}
#: Their tiny stand-ins of the dry run (same families, seconds on a CPU).
DRY_MODELS = {"convmixer": "convmixer_tiny"}
STRUCTURES = ["diagonal", "block_diagonal", "hierarchical", "tril_toeplitz"]
#: Issue targets on the GPU (bf16, T = 10): step time ×AdamW of these structures...
TIME_TARGETS = {"hierarchical": 1.05, "diagonal": 1.05}
#: ... and peak memory ×AdamW of the sparse structures.
PEAK_TARGET = 1.0


def _run(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``command`` in the repository root with its output in ``log``."""
    start = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    environment.update(env or {})
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=environment,
                                timeout=max(timeout, 1.0), check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"command": command, "returncode": rc, "seconds": round(time.perf_counter() - start, 1), "log": str(log)}


class Budget:
    """A deadline ``seconds`` from now."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def take(self, seconds: float) -> float:
        """``seconds``, or what is left if that is less."""
        return min(seconds, self.end - time.perf_counter())

    def stage(self, cap: float) -> Budget:
        """A stage's own budget: at most ``cap`` seconds of what is left."""
        return Budget(max(self.take(cap), 0.0))


#: Most seconds each stage may take of the whole budget (the benchmark takes the rest).
STAGE_CAPS = {"tests": 100.0, "train": 130.0, "toeplitz": 20.0, "batching": 45.0, "benchmark": 10.0**9}
STAGES = list(STAGE_CAPS)


def run_tests(out: Path, budget: Budget, dry_run: bool) -> dict:
    """``pytest -m cuda``; on a dry run only one file (which skips without CUDA)."""
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    paths = ["tests/optim/test_syncs.py"] if dry_run else ["tests"]
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *paths]
    # Deterministic cuBLAS, should a test ask for deterministic algorithms.
    result = _run(command, out / "pytest.log", budget.take(10**9), env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.exists():
        root = ET.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    # Pytest exits 5 when every test was deselected: no CUDA test at all is a failure too.
    ok = result["returncode"] == 0 and counts["tests"] > 0
    return {**result, **counts, "failed": failed, "ok": ok}


def train_overrides(model: str, dry_run: bool, epochs: int, steps_per_epoch: int) -> list[str]:
    """The ``train.py`` overrides of one run: bf16, SINGD hierarchical, synthetic data."""
    batch = 16 if dry_run else 128
    return [
        f"model={model}", "data=synthetic_cifar", "precision=bf16", "optimizer=singd", "structure=hierarchical",
        f"trainer.max_epochs={epochs}", f"data.batch_size={batch}", f"data.train_size={batch * steps_per_epoch}",
        f"data.val_size={batch}", f"data.test_size={batch}", "eval_test_every_epoch=false",
        f"trainer.accelerator={'cpu' if dry_run else 'gpu'}",
    ]


def run_training(out: Path, budget: Budget, dry_run: bool, epochs: int, steps_per_epoch: int) -> dict:
    """One short bf16 run per paper model through ``train.py`` on synthetic data."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    models = DRY_MODELS if dry_run else MODELS
    for index, (name, model) in enumerate(models.items()):
        run_dir = out / name
        command = [sys.executable, "train.py", *train_overrides(model, dry_run, epochs, steps_per_epoch),
                   f"hydra.run.dir={run_dir}"]
        # An equal share of what is left, so that a slow model cannot starve the rest.
        share = budget.take(10**9) / (len(models) - index)
        result = _run(command, out / f"{name}.log", share)
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        keep = ("status", "error", "global_step", "final_train_loss", "best_val_acc", "test_acc",
                "step_time_ms", "optimizer_step_ms", "peak_memory_mb", "memory_kind", "wall_time_s")
        runs[name] = {**result, **{k: results.get(k) for k in keep}, "results": str(results_file)}
        runs[name]["ok"] = result["returncode"] == 0 and results.get("status") == "ok"
    return {"runs": runs, "ok": all(r["ok"] for r in runs.values())}


def run_benchmark(out: Path, budget: Budget, dry_run: bool) -> dict:
    """``scripts/benchmark.py`` per model (a killed model loses only its own rows)."""
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        models = ["tiny"]
        options = ["--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "0", "--T", "1", "2",
                   "--structures", "diagonal", "--methods", "ours", "--no-peak"]
    else:
        models = list(MODELS)
        options = ["--device", "cuda", "--batch-size", "128", "--steps", "8", "--warmup", "3", "--T", "1", "10",
                   "--structures", *STRUCTURES, "--methods", "kfac", "reference", "ours"]
    rows, per_model = [], {}
    for index, model in enumerate(models):
        json_file = out / f"{model}.json"
        command = [sys.executable, "scripts/benchmark.py", "--models", model, "--dtype", "bf16", *options,
                   "--json", str(json_file)]
        share = budget.take(10**9) / (len(models) - index)
        result = _run(command, out / f"{model}.log", share)
        model_rows = json.loads(json_file.read_text()) if json_file.exists() else []
        rows += model_rows
        per_model[model] = {**result, "rows": len(model_rows), "ok": result["returncode"] == 0 and bool(model_rows)}
    return {"models": per_model, "rows": rows, "targets": check_targets(rows),
            "ok": all(m["ok"] for m in per_model.values())}


def calibrate_toeplitz(out: Path, budget: Budget, dry_run: bool) -> dict:
    """Time Toeplitz products by the FFT and the dense route on this device and
    turn the ratio into the cost model's constant (multiply-adds of a float32
    matrix product per N·log2(N) of one transform): the route is the dense one
    when ``d² ≤ constant · 2 · N·log2(N)``. On CUDA with and without TF32."""
    from singd_lightning.structures import toeplitz

    device = "cpu" if dry_run else "cuda"
    dims, columns, repeats = ((64, 256), 256, 2) if dry_run else ((576, 1152, 2304, 4608), 8192, 5)
    names = ("FFT_COST", "CUDA_FFT_COST", "CUDA_FFT_COST_TF32")
    saved = {name: getattr(toeplitz, name) for name in names}
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    rows = []
    try:
        for tf32 in (False, True) if device == "cuda" else (False,):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            if device == "cuda":
                assumed = saved["CUDA_FFT_COST_TF32" if tf32 else "CUDA_FFT_COST"]
            else:
                assumed = saved["FFT_COST"]
            for d in dims:
                if budget.take(10**9) <= 0:
                    break
                structure = toeplitz.TrilToeplitz(d)
                t = torch.randn(d, device=device) / d**0.5
                x = torch.randn(d, columns, device=device)
                times = {}
                for route, constant in (("fft", 0.0), ("dense", 1e30)):
                    for name in names:
                        setattr(toeplitz, name, constant)
                    samples = []
                    for _ in range(repeats + 1):  # the first one warms up
                        if device == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        structure.matmul(t, x)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        samples.append(time.perf_counter() - start)
                    times[route] = sorted(samples[1:])[len(samples[1:]) // 2]
                n_fft = toeplitz._fft_len(d)
                measured = times["fft"] / times["dense"] * d * d / (2 * n_fft * math.log2(n_fft))
                rows.append({"d": d, "columns": columns, "tf32": tf32, "fft_ms": round(1e3 * times["fft"], 3),
                             "dense_ms": round(1e3 * times["dense"], 3), "measured_constant": round(measured, 1),
                             "assumed_constant": assumed})
    finally:
        for name, value in saved.items():
            setattr(toeplitz, name, value)
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    (out / "toeplitz.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "ok": len(rows) > 0}


def run_batching(out: Path, budget: Budget, dry_run: bool) -> dict:
    """``scripts/batch_layers.py``: whether batching same-shaped layers pays on the device."""
    if dry_run:
        options = ["--device", "cpu", "--models", "tiny", "--repeats", "2", "--warmup", "0", "--columns", "16",
                   "--step", "--train-step", "--rounds", "2", "--batch-size", "2"]
    else:
        options = ["--device", "cuda", "--models", "cct", "swin", "--repeats", "20", "--step", "--train-step",
                   "--rounds", "10", "--batch-size", "128"]
    json_file = out / "batching.json"
    result = _run([sys.executable, "scripts/batch_layers.py", *options, "--json", str(json_file)],
                  out / "batching.log", budget.take(10**9))
    report = json.loads(json_file.read_text()) if json_file.exists() else {}
    return {**result, **{key: report.get(key, []) for key in ("totals", "steps", "train_steps")},
            "ok": result["returncode"] == 0 and bool(report["totals"])}


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's GPU targets, met or not, per model (T = 10 rows of ours)."""
    checks = []
    adamw = {r["model"]: r for r in rows if r["method"] == "adamw" and not r["error"]}
    for r in rows:
        base = adamw.get(r["model"])
        if r["method"] != "ours" or r["T"] != 10 or r["error"] or base is None:
            continue
        if r["structure"] in TIME_TARGETS:
            ratio = r["step_ms"] / base["step_ms"]
            checks.append({"model": r["model"], "structure": r["structure"], "what": "step time ×AdamW",
                           "value": round(ratio, 3), "target": TIME_TARGETS[r["structure"]],
                           "met": ratio <= TIME_TARGETS[r["structure"]]})
        if r["structure"] != "dense" and r["peak_bytes"] and base["peak_bytes"]:
            ratio = r["peak_bytes"] / base["peak_bytes"]
            checks.append({"model": r["model"], "structure": r["structure"], "what": "peak memory ×AdamW",
                           "value": round(ratio, 3), "target": PEAK_TARGET, "met": ratio <= PEAK_TARGET})
    return checks


def markdown(summary: dict) -> str:
    """The human-readable summary."""
    lines = [f"# GPU check · {summary['device']} · torch {summary['torch']} · {summary['started']}",
             "", f"{'Dry run (CPU, tiny sizes): no GPU numbers. ' if summary['dry_run'] else ''}"
             f"Wall time {summary['seconds']:.0f} s. Overall: {'ok' if summary['ok'] else 'FAILED'}.", ""]
    stages = {name: stage for name, stage in summary["stages"].items() if "error" not in stage}
    lines += [f"Stage {name} broke: {stage['error']}" for name, stage in summary["stages"].items() if "error" in stage]
    lines += [""] if len(stages) < len(summary["stages"]) else []
    tests = stages.get("tests")
    if tests:
        lines += ["## CUDA tests (`pytest -m cuda`)", "",
                  f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
                  f"({tests['seconds']} s, exit {tests['returncode']}); log: `{tests['log']}`", ""]
        lines += [f"- failed: `{name}`" for name in tests["failed"]] + ([""] if tests["failed"] else [])
    train = stages.get("train")
    if train:
        lines += ["## Training runs (train.py, synthetic CIFAR-shaped data, bf16, SINGD hierarchical)", "",
                  "| model | status | steps | final train loss | best val acc | step ms | optimizer step ms | peak MB | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in train["runs"].items():
            status = r["status"] or f"exit {r['returncode']}"
            lines.append(f"| {name} | {status} | {r['global_step']} | {_fmt(r['final_train_loss'])} "
                         f"| {_fmt(r['best_val_acc'])} | {_fmt(r['step_time_ms'], 1)} | {_fmt(r['optimizer_step_ms'], 1)} "
                         f"| {_fmt(r['peak_memory_mb'], 0)} | {r['seconds']} |")
        lines.append("")
    calibration = stages.get("toeplitz")
    if calibration:
        lines += ["## Toeplitz cost constant (FFT route vs dense route, `structures/toeplitz.py`)", "",
                  "| d | TF32 | FFT ms | dense ms | measured constant | assumed |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['d']} | {'on' if r['tf32'] else 'off'} | {r['fft_ms']} | {r['dense_ms']} "
                  f"| {r['measured_constant']} | {r['assumed_constant']:g} |" for r in calibration["rows"]]
        lines.append("")
    batching = stages.get("batching")
    if batching:
        lines += ["## Same-shaped layers: one call per layer against one batched call per group "
                  "(`batch_layers.py`, all groups summed; speed-up > 1: batching pays)", "",
                  "| model | structure | operation | layers | one by one ms | batched ms | prestacked ms |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['structure']} | {r['operation']} | {r['layers']} | {r['one_by_one_ms']:.3f} "
                  f"| {r['batched_ms']:.3f} ({r['batched_speedup']:.2f}×) | {r['prestacked_ms']:.3f} "
                  f"({r['prestacked_speedup']:.2f}×) |" for r in batching["totals"]]
        lines += ["", "Whole `optimizer.step()`, `batch_layers` off → on (AdamW's), and the operations (kernel "
                  "launches) it dispatches:", "",
                  "| model | structure | between updates: ms | operations | at an update: ms | operations "
                  "| backward operations |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['structure']} | {r['layer_by_layer_ms']:.2f} → {r['batched_ms']:.2f} "
                  f"({r['adamw_ms']:.2f}) | {r['layer_by_layer_operations']} → {r['batched_operations']} "
                  f"({r['adamw_operations']}) | {r['layer_by_layer_update_ms']:.1f} → {r['batched_update_ms']:.1f} "
                  f"({r['adamw_update_ms']:.1f}) | {r['layer_by_layer_update_operations']} → "
                  f"{r['batched_update_operations']} ({r['adamw_update_operations']}) "
                  f"| {r['layer_by_layer_backward_operations']} → {r['batched_backward_operations']} "
                  f"({r['adamw_backward_operations']}) |" for r in batching["steps"]]
        lines += ["", "Whole training steps over AdamW's, `batch_layers` off → on:", "",
                  "| model | structure | T | off ×AdamW | on ×AdamW | on / off |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['structure']} | {r['T']} | {r['off_x_adamw']:.3f} | {r['on_x_adamw']:.3f} "
                  f"| {r['on_over_off']:.3f} |" for r in batching["train_steps"]]
        lines.append("")
    bench = stages.get("benchmark")
    if bench:
        lines += ["## Step time and peak memory (benchmark.py, bf16 autocast, ratios in one process)", "",
                  "| model | method | structure | T | step ms | ×AdamW | peak MB | peak ×AdamW |", "|---|---|---|---|---|---|---|---|"]
        adamw = {r["model"]: r for r in bench["rows"] if r["method"] == "adamw" and not r["error"]}
        for r in bench["rows"]:
            base = adamw.get(r["model"])
            if r["error"]:
                lines.append(f"| {r['model']} | {r['method']} | {r['structure'] or '—'} | {r['T']} | failed: {r['error']} ||||")
                continue
            lines.append(
                f"| {r['model']} | {r['method']} | {r['structure'] or '—'} | {r['T']} | {r['step_ms']:.1f} "
                f"| {_ratio(r['step_ms'], base and base['step_ms'])} | {r['peak_bytes'] / 2**20:.0f} "
                f"| {_ratio(r['peak_bytes'], base and base['peak_bytes'])} |")
        missing = [m for m, v in bench["models"].items() if not v["ok"]]
        lines += [""] + ([f"Models without results: {', '.join(missing)} (see their logs)."] if missing else [])
        if bench["targets"]:
            lines += ["", "### Targets (T = 10)", "", "| model | structure | what | value | target | met |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {c['model']} | {c['structure']} | {c['what']} | {c['value']:.2f} | ≤ {c['target']} "
                      f"| {'yes' if c['met'] else 'no'} |" for c in bench["targets"]]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / f"gpu_check-{stamp}",
                        help="output folder (default: results/gpu_check-<UTC time>)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the plumbing, no numbers")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES, help="stages to run, in this order")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each training run")
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="training steps per epoch")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; on a CPU use --dry-run")
    if args.budget <= 0 or args.epochs < 1 or args.steps_per_epoch < 1:
        parser.error("--budget must be > 0, --epochs and --steps-per-epoch >= 1")
    if args.dry_run:
        args.epochs, args.steps_per_epoch = 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    start, budget = time.perf_counter(), Budget(args.budget)
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu",
        "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "out": str(args.out), "stages": {},
    }
    for stage in args.stages:
        print(f"[gpu_check] {stage} ...", flush=True)
        share = budget.stage(STAGE_CAPS[stage])
        try:
            if stage == "tests":
                summary["stages"]["tests"] = run_tests(args.out / "tests", share, args.dry_run)
            elif stage == "toeplitz":
                summary["stages"]["toeplitz"] = calibrate_toeplitz(args.out, share, args.dry_run)
            elif stage == "batching":
                summary["stages"]["batching"] = run_batching(args.out, share, args.dry_run)
            elif stage == "train":
                summary["stages"]["train"] = run_training(args.out / "train", share, args.dry_run, args.epochs,
                                                          args.steps_per_epoch)
            else:
                summary["stages"]["benchmark"] = run_benchmark(args.out / "benchmark", share, args.dry_run)
        except Exception as err:  # one broken stage must not cost the others' results
            summary["stages"][stage] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        print(f"[gpu_check] {stage}: {'ok' if summary['stages'][stage]['ok'] else 'FAILED'}", flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["ok"] = all(s["ok"] for s in summary["stages"].values())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
