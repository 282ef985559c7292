"""Run a grid of training jobs (the paper's comparisons) and summarise them.

    python experiments/run.py --suite smoke --out results/smoke          # CPU, minutes
    python experiments/run.py --suite cifar100 --out results/cifar100    # GPU, paper budget
    python experiments/run.py --suite imagewoof10 --out results/woof --models vgg cct
    python experiments/run.py --suite cora                               # GCN on Cora (OUT: results/cora)
    python experiments/run.py --suite imagenet100                        # ViT on ImageNet-100
    python experiments/run.py --suite cifar100 --models vgg --limit 2 --dry-run  # print the commands
    python experiments/run.py --suite converge --out results/converge    # tuned, steps to target (converge.py)

Every job is a separate ``python train.py <overrides> hydra.run.dir=OUT/runs/<job>``
process, so a crash cannot take the suite down. Afterwards ``OUT`` holds:

- ``results.csv``: one row per job (status, test accuracy/error, memory, step time, ...);
- ``results.md``: the paper's table layout: per data set, one row per optimizer (SINGD
  per structure) and per model and precision the test error (%), the peak memory (GB)
  and the wall time (min); for VGG on CIFAR-100 also the authors' draft of the paper's
  Fig. 1 as reference rows; then every job with its status and error;
- ``test_error_<data>_<model>_<precision>.png``: test error over epochs per optimizer
  (from each job's CSV log), and ``memory.png``: the optimizer-state size and, for GPU
  jobs, the peak GPU memory per optimizer. Every figure gives an optimizer the same
  colour; a missing value is left out, never drawn as 0.

A failed or diverged job shows as such in the tables and does not stop the suite.
With ``--wandb PROJECT`` the report also goes to W&B: the table, the plots and the
files as an artifact, in a run of its own (each job's run summary holds its
``results.json`` when the jobs use ``-o logger=wandb``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import converge  # noqa: E402 - the converge suite, next to this file

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"

#: Display names of the optimizers, in table order.
OPTIMIZER_LABELS = {
    "sgd": "SGD",
    "adamw": "AdamW",
    "kfac": "KFAC",
    "ikfac": "IKFAC",
    "ingd": "INGD",
    "singd": "SINGD",
}
STRUCTURE_LABELS = {
    "dense": "Dense",
    "diagonal": "Diag",
    "block_diagonal": "BlockDiag",
    "hierarchical": "Hier",
    "tril": "Tril",
    "triu": "Triu",
    "tril_toeplitz": "TrilToeplitz",
    "triu_toeplitz": "TriuToeplitz",
    "tril_top_left_diagonal": "TrilTLDiag",
    "tril_bottom_right_diagonal": "TrilBRDiag",
    "triu_top_left_diagonal": "TriuTLDiag",
    "triu_bottom_right_diagonal": "TriuBRDiag",
}
#: Columns of results.csv.
CSV_COLUMNS = (
    "job", "label", "status", "error", "test_acc", "test_err", "best_val_acc", "final_train_loss",
    "step_time_ms", "optimizer_step_ms", "peak_memory_mb", "memory_kind", "optimizer_state_mb", "optimizer", "structure",
    "precision", "trainer_precision", "model", "model_name", "data", "epochs", "wall_time_s", "returncode", "expect",
    "run_dir",
)  # fmt: skip


@dataclass
class Job:
    """One training run of a suite.

    Attributes:
        name: Directory name under ``OUT/runs``.
        optimizer: Optimizer group option.
        model: Model group option or model name (for the tables).
        precision: Precision group option.
        structure: Structure group option (SINGD only).
        overrides: Extra Hydra overrides of this job.
        expect: What the suite expects (e.g. ``"diverges"``), shown in the tables.
        variant: A note on a non-default setting, shown in the label.
        data: Data set (for the tables when a job leaves no ``results.json``).
    """

    name: str
    optimizer: str
    model: str
    precision: str
    structure: str | None = None
    overrides: list[str] = field(default_factory=list)
    expect: str | None = None
    variant: str | None = None
    data: str | None = None

    @property
    def label(self) -> str:
        label = OPTIMIZER_LABELS.get(self.optimizer, self.optimizer)
        if self.structure is not None:
            label += f"-{STRUCTURE_LABELS.get(self.structure, self.structure)}"
        if self.variant:
            label += f" ({self.variant})"
        return label

    def hydra_overrides(self) -> list[str]:
        args = [f"optimizer={self.optimizer}", f"precision={self.precision}"]
        if self.structure is not None:
            args.append(f"structure={self.structure}")
        return args + list(self.overrides)


# ------------------------------------------------------------------ suites

#: Overrides of every CPU smoke job: digits, few epochs, quiet, one thread.
SMOKE_COMMON = [
    "data=digits",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "logger=csv",
    "num_threads=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def smoke_jobs() -> list[Job]:
    """Digits on a CPU with tiny models, 2 epochs: every optimizer, SINGD with two
    structures, fp32 and bf16, KFAC in pure bf16 (the paper's failure case for
    KFAC; here it shows whatever happens) and one run that must diverge (SGD with
    lr=1e6) to show how a diverged job is reported. The first three jobs cover
    success, divergence and KFAC in bf16-true, so ``--limit 3`` is a tiny suite."""

    def job(optimizer: str, model: str, precision: str, structure: str | None = None,
            expect: str | None = None, extra: Sequence[str] = (), variant: str | None = None) -> Job:
        name = "_".join(x for x in (optimizer, structure, model, precision, variant) if x).replace("=", "")
        return Job(name, optimizer, model, precision, structure, [f"model={model}", *SMOKE_COMMON, *extra],
                   expect, variant, data="digits")  # fmt: skip

    return [
        job("singd", "vgg_small", "fp32", "diagonal"),
        job("sgd", "vgg_small", "fp32", expect="diverges (deliberately huge lr)", extra=["optimizer.lr=1e6"],
            variant="lr=1e6"),
        job("kfac", "vgg_small", "bf16-true", expect="may fail or diverge (low-precision inverse)"),
        job("adamw", "vgg_small", "fp32"),
        job("sgd", "vgg_small", "fp32"),
        job("kfac", "vgg_small", "fp32"),
        job("ikfac", "vgg_small", "fp32"),
        job("ingd", "vgg_small", "fp32"),
        job("singd", "vgg_small", "fp32", "hierarchical"),
        job("singd", "vgg_small", "bf16", "diagonal"),
        job("adamw", "vgg_small", "bf16"),
        job("kfac", "vgg_small", "bf16"),
        job("singd", "convmixer_tiny", "fp32", "diagonal"),
        job("adamw", "convmixer_tiny", "fp32"),
    ]


#: The paper's suites: data set -> its models, each run as ``experiment=<data>_<model>``
#: (singd_lightning/conf/experiment/). The SINGD paper trains VGG, ConvMixer, Compact-ViT
#: (CCT), Swin-ViT, GC-ViT, Rep-ViT and HDVT on CIFAR-100 and ImageWoof-10, a GCN on Cora
#: and a ViT on ImageNet-100.
CNN_AND_VIT_MODELS = ("vgg", "convmixer", "cct", "swin", "gcvit", "repvit", "hdvt")
PAPER_SUITES: dict[str, tuple[str, ...]] = {
    "cifar100": CNN_AND_VIT_MODELS,
    "imagewoof10": CNN_AND_VIT_MODELS,
    "cora": ("gcn",),
    "imagenet100": ("vit",),
}
#: Every model of a paper suite (``--models`` choices).
PAPER_MODELS = tuple(dict.fromkeys(m for models in PAPER_SUITES.values() for m in models))
PAPER_STRUCTURES = ("diagonal", "block_diagonal", "hierarchical")
PAPER_PRECISIONS = ("fp32", "bf16")
EXPERIMENT_DIR = REPO / "singd_lightning" / "conf" / "experiment"
#: Overrides of every paper job after ``experiment=...``: one GPU, CSV logs (the per-epoch
#: test error of the figures), no progress bar in the job's log file.
PAPER_COMMON = ["trainer=gpu", "logger=csv", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


def paper_jobs(data: str, models: Sequence[str], structures: Sequence[str], precisions: Sequence[str]) -> list[Job]:
    """``experiment=<data>_<model>`` for every model x precision x optimizer (SGD, AdamW,
    KFAC, IKFAC, INGD, SINGD per structure), on one GPU.

    Raises:
        FileNotFoundError: A model without its ``<data>_<model>`` experiment config.
    """
    missing = [m for m in models if not (EXPERIMENT_DIR / f"{data}_{m}.yaml").exists()]
    if missing:
        raise FileNotFoundError(f"No experiment config {', '.join(f'{data}_{m}.yaml' for m in missing)} "
                                f"in {EXPERIMENT_DIR}.")  # fmt: skip
    jobs = []
    for model in models:
        for precision in precisions:
            grid = [(o, None) for o in ("sgd", "adamw", "kfac", "ikfac", "ingd")]
            grid += [("singd", s) for s in structures]
            for optimizer, structure in grid:
                name = "_".join(x for x in (optimizer, structure, model, precision) if x)
                overrides = [f"experiment={data}_{model}", *PAPER_COMMON]
                jobs.append(Job(name, optimizer, model, precision, structure, overrides, data=data))
    return jobs


SUITES = ("smoke", *PAPER_SUITES, "converge")


def suite_jobs(args: argparse.Namespace) -> list[Job]:
    """The jobs of ``args.suite`` after the ``--optimizers`` filter and ``--limit``."""
    if args.suite == "smoke":
        jobs = smoke_jobs()
    else:
        jobs = paper_jobs(args.suite, args.models or PAPER_SUITES[args.suite], args.structures or PAPER_STRUCTURES,
                          args.precisions or PAPER_PRECISIONS)  # fmt: skip
    if args.optimizers:
        jobs = [j for j in jobs if j.optimizer in args.optimizers]
    if args.limit is not None:
        jobs = jobs[: args.limit]
    return jobs


def job_command(job: Job, out: Path, extra: Sequence[str], python: str) -> list[str]:
    """The ``python train.py ...`` command of a job, its run directory under ``out/runs``."""
    return [python, str(TRAIN), *job.hydra_overrides(), *extra, f"hydra.run.dir={out / 'runs' / job.name}"]


# ------------------------------------------------------------------ running


def run_job(job: Job, out: Path, extra: Sequence[str], python: str, timeout: float | None) -> dict[str, Any]:
    """Run one job as a subprocess; return its row for results.csv."""
    run_dir = out / "runs" / job.name
    run_dir.mkdir(parents=True, exist_ok=True)
    results_file = run_dir / "results.json"
    if results_file.exists():
        results_file.unlink()  # never report a stale result
    command = job_command(job, out, extra, python)
    (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
    start = time.time()
    with open(run_dir / "stdout.log", "w") as stdout, open(run_dir / "stderr.log", "w") as stderr:
        try:
            proc = subprocess.run(command, cwd=REPO, stdout=stdout, stderr=stderr, timeout=timeout,
                                  env={**os.environ, "HYDRA_FULL_ERROR": "1"})  # fmt: skip
            returncode: int | None = proc.returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
    row: dict[str, Any] = {
        "job": job.name, "label": job.label, "optimizer": job.optimizer, "model": job.model,
        "precision": job.precision, "structure": job.structure, "returncode": returncode,
        "expect": job.expect, "run_dir": str(run_dir), "data": job.data,
    }  # fmt: skip
    if results_file.exists():
        result = json.loads(results_file.read_text())
        for key in CSV_COLUMNS:
            # "precision", "model" and "data" stay the job's options (the tables' keys, the same
            # for a job that failed early); what the trainer ran (results.json's "precision",
            # e.g. bf16-mixed, and "model", e.g. vgg16) goes to "trainer_precision" and
            # "model_name"; results.json's data name (e.g. imagewoof) only when the job has none
            if key in result and result[key] is not None and key not in ("run_dir", "precision", "model", "data"):
                row[key] = result[key]
        row["trainer_precision"] = result.get("precision")
        row["model_name"] = result.get("model")
        row["data"] = row["data"] or result.get("data")
        row["status"] = result.get("status") or "failed"
        row["error"] = result.get("error")
    else:
        row["status"] = "failed"
        tail = (run_dir / "stderr.log").read_text().strip().splitlines()[-3:]
        row["error"] = f"timed out after {timeout} s" if timed_out else (" | ".join(tail) or f"exit code {returncode}")
    if row["status"] == "ok" and returncode not in (0, None):
        row["status"] = "failed"
    if row["status"] == "failed" and not row.get("error"):
        row["error"] = f"exit code {returncode}"
    row["wall_time_s"] = time.time() - start  # the whole process, imports included
    acc = row.get("test_acc")
    row["test_err"] = None if acc is None else 1.0 - float(acc)
    return row


# ------------------------------------------------------------------ reporting


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "–"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else format(value, spec)


def _memory_gb(row: dict[str, Any]) -> float | None:
    """A job's peak memory in GB (10⁹ bytes, the draft of Fig. 1's unit); results.json has MiB."""
    mb = _number(row.get("peak_memory_mb"))
    return None if mb is None else mb * 2**20 / 1e9


def _paper_cell(row: dict[str, Any] | None) -> str:
    """``test error (%) / peak memory (GB) / wall time (min)`` of a job; a failed or
    diverged job says so instead of its error; an absent job is an empty cell."""
    if row is None:
        return ""
    err = row.get("test_err")
    if row["status"] in ("failed", "diverged"):
        first = row["status"]
    else:
        first = _fmt(None if err is None else 100 * float(err), ".1f")
    wall = _number(row.get("wall_time_s"))
    return f"{first} / {_fmt(_memory_gb(row), '.2f')} / {_fmt(None if wall is None else wall / 60, '.1f')}"


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def _label_order(rows: list[dict[str, Any]]) -> list[str]:
    order = []
    for opt in OPTIMIZER_LABELS:
        order += [r["label"] for r in rows if r["optimizer"] == opt]
    return list(dict.fromkeys(order))


#: A pre-publication draft of the paper's Fig. 1 (VGG on CIFAR-100, 120 epochs): per
#: optimizer and precision, (test accuracy (%) after the last epoch, peak GPU memory (GB),
#: run time (min)) of the best run of each of the authors' W&B sweeps (ssngd/cnn-exp).
#: INGD is the draft's "LocalCov", SINGD its "SNGD*" (structure not named); its
#: bfloat16 runs do not record the factors' dtype.
DRAFT_FIG1: dict[str, dict[str, tuple[float, float, float]]] = {
    "kfac": {"fp32": (71.20, 4.251, 71.3), "bf16": (51.41, 3.177, 61.5)},
    "ikfac": {"fp32": (71.75, 4.702, 50.1), "bf16": (72.10, 3.229, 35.2)},
    "ingd": {"fp32": (74.70, 5.241, 52.7), "bf16": (75.12, 3.504, 37.4)},
    "singd": {"fp32": (74.07, 3.745, 32.9), "bf16": (74.97, 2.722, 35.6)},
}
DRAFT_FIG1_SOURCE = "f-dangel/singd, `plots/cache/fig1_best_runs.npy` at commit 255b3e0, drawn by `plots/fig1.py`"
#: Where the draft of Fig. 1 is compared: (data, model) of the runs.
DRAFT_FIG1_RUNS = ("cifar100", "vgg")
PRECISION_ORDER = ("fp32", "bf16", "bf16-fp32-factors", "bf16-true", "fp16")


def _data(row: dict[str, Any]) -> str:
    return str(row.get("data") or "?")


def _draft_reference(rows: list[dict[str, Any]]) -> list[str]:
    """The reference table: each optimizer of the draft of Fig. 1 (labelled as such)
    above this suite's runs of it, VGG on CIFAR-100, in the paper table's cells."""
    data, model = DRAFT_FIG1_RUNS
    ours = [r for r in rows if _data(r) == data and r["model"] == model]
    precisions = _ordered(["fp32", "bf16", *(r["precision"] for r in ours)], PRECISION_ORDER)
    lines = [
        f"### Reference: the authors' draft of Fig. 1 ({model} on {data}, 120 epochs)", "",
        "Rows \"(draft of Fig. 1)\": a pre-publication draft of the paper's Fig. 1, not the published "
        f"figure; source: {DRAFT_FIG1_SOURCE}. Test error after epoch 120 of the best run of each of the "
        "authors' hyper-parameter sweeps (ours: the experiment config's settings, untuned unless "
        "overridden); peak memory there is W&B's `system.gpu.0.memoryAllocatedBytes` (the device's "
        "memory in use: PyTorch's cache and the CUDA context included), here PyTorch's max allocated "
        "memory; time there is the W&B run time. The draft's INGD is its \"LocalCov\", its SINGD "
        "\"SNGD*\" (structure not named); its bfloat16 runs do not record the factors' dtype (compare "
        "`bf16` and `bf16-fp32-factors`).", "",
        "| optimizer | " + " | ".join(f"{model} {p}" for p in precisions) + " |",
        "|---|" + "---:|" * len(precisions),
    ]  # fmt: skip
    for optimizer, draft in DRAFT_FIG1.items():
        cells = []
        for precision in precisions:
            acc, memory, minutes = draft.get(precision, (None, None, None))
            cells.append("" if acc is None else f"{100 - acc:.1f} / {memory:.2f} / {minutes:.1f}")
        lines.append(f"| {OPTIMIZER_LABELS[optimizer]} (draft of Fig. 1) | " + " | ".join(cells) + " |")
        for label in _label_order([r for r in ours if r["optimizer"] == optimizer]):
            cells = [_paper_cell(next((r for r in ours if r["label"] == label and r["precision"] == p), None))
                     for p in precisions]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_report(rows: list[dict[str, Any]], suite: str) -> str:
    """The paper's table layout: per data set, one row per optimizer (SINGD per
    structure) and for every model and precision a cell ``test error (%) / peak memory
    (GB) / wall time (min)``; for VGG on CIFAR-100 the draft of Fig. 1 as reference
    rows; then every job with its status, step times, optimizer state and error."""
    lines = [f"# Suite `{suite}`", ""]
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"{len(rows)} jobs: {n_ok} ok, {sum(r['status'] == 'diverged' for r in rows)} diverged, "
                 f"{sum(r['status'] == 'failed' for r in rows)} failed.")  # fmt: skip
    kinds = {r.get("memory_kind") for r in rows if r.get("memory_kind")}
    if kinds:
        lines.append(f"Peak memory: {', '.join(sorted(kinds))} (cuda_max_allocated: GPU memory allocated "
                     "by PyTorch; cpu_peak_rss: the process's peak resident memory), in GB = 10⁹ bytes. "
                     "Wall time: the whole job, start-up and test included.")  # fmt: skip
    lines.append("")
    for data in dict.fromkeys(_data(r) for r in rows):
        subset = [r for r in rows if _data(r) == data]
        columns = [(m, p) for m in dict.fromkeys(r["model"] for r in subset)
                   for p in _ordered((r["precision"] for r in subset if r["model"] == m), PRECISION_ORDER)]  # fmt: skip
        lines += [f"## {data}: test error (%) / peak memory (GB) / wall time (min)", "",
                  "| optimizer | " + " | ".join(f"{m} {p}" for m, p in columns) + " |",
                  "|---|" + "---:|" * len(columns)]  # fmt: skip
        for label in _label_order(subset):
            cells = [_paper_cell(next((r for r in subset if r["label"] == label and r["model"] == m
                                       and r["precision"] == p), None)) for m, p in columns]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        if data == DRAFT_FIG1_RUNS[0] and any(r["model"] == DRAFT_FIG1_RUNS[1] for r in subset):
            lines += _draft_reference(subset)
    lines += ["## All jobs", "", "| job | status | test acc | best val acc | step (ms) | optimizer step (ms) | "
              "peak mem (MB) | optimizer state (MB) | wall (s) | expected | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        error = (r.get("error") or "").replace("|", "/").replace("\n", " ")
        error = error if len(error) <= 160 else error[:157] + "..."
        lines.append(
            f"| {r['job']} | {r['status']} | {_fmt(r.get('test_acc'), '.4f')} | {_fmt(r.get('best_val_acc'), '.4f')} "
            f"| {_fmt(r.get('step_time_ms'), '.1f')} | {_fmt(r.get('optimizer_step_ms'), '.1f')} "
            f"| {_fmt(r.get('peak_memory_mb'), '.0f')} "
            f"| {_fmt(r.get('optimizer_state_mb'), '.3f')} | {_fmt(r.get('wall_time_s'), '.0f')} "
            f"| {r.get('expect') or ''} | {error} |"
        )
    return "\n".join(lines) + "\n"


def _epoch_test_error(run_dir: Path) -> tuple[list[int], list[float], str]:
    """Per-epoch test error from a job's CSV log (validation error as a fallback)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return [], [], ""
    with open(path) as f:
        records = list(csv.DictReader(f))
    for column, what in (("epoch_test/acc", "test"), ("val/acc", "validation")):
        points = {}
        for rec in records:
            if rec.get(column) not in (None, "") and rec.get("epoch") not in (None, ""):
                points[int(float(rec["epoch"]))] = 1.0 - float(rec[column])
        if points:
            epochs = sorted(points)
            return [e + 1 for e in epochs], [100 * points[e] for e in epochs], what
    return [], [], ""


#: One colour per optimizer in every figure (matplotlib's "tab" colours).
OPTIMIZER_COLORS = {
    "sgd": "tab:gray",
    "adamw": "tab:orange",
    "kfac": "tab:green",
    "ikfac": "tab:red",
    "ingd": "tab:purple",
    "singd": "tab:blue",
}
#: Line styles and bar hatches that tell apart the variants (structures, ...) of one optimizer.
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx")
#: ``memory_kind`` of a GPU run (``torch.cuda.max_memory_allocated``).
GPU_MEMORY = "cuda_max_allocated"


def label_styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Colour (the optimizer's), line style and hatch (the variant's rank within its
    optimizer) of every label, the same in every figure of a report."""
    styles: dict[str, dict[str, str]] = {}
    variants: dict[str, int] = {}
    for label in _label_order(rows):
        optimizer = next(r["optimizer"] for r in rows if r["label"] == label)
        i = variants.get(optimizer, 0)
        variants[optimizer] = i + 1
        styles[label] = {"color": OPTIMIZER_COLORS.get(optimizer, "black"),
                         "linestyle": LINESTYLES[i % len(LINESTYLES)], "hatch": HATCHES[i % len(HATCHES)]}  # fmt: skip
    return styles


_number = converge.finite_float
_legend_outside = converge.legend_outside


def make_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures by file name: test error over epochs per (data, model,
    precision) and ``memory.png``: the optimizer state and, for GPU runs, the peak GPU
    memory per optimizer. The process's peak RSS of a CPU run is left out (it is the
    Python process, about the same for every optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = label_styles(rows)
    figures: dict[str, Any] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r.get("data") or "data"), r["model"], r["precision"]), []).append(r)
    for (data, model, precision), subset in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        what = "test"
        for label in _label_order(subset):
            r = next(x for x in subset if x["label"] == label)
            epochs, errors, kind = _epoch_test_error(Path(r["run_dir"]))
            what = kind or what
            suffix = "" if r["status"] == "ok" else f" ({r['status']})"
            style = styles[label]
            ax.plot(epochs, errors, marker="o", markersize=3, color=style["color"], linestyle=style["linestyle"],
                    label=label + suffix)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{what} error (%)")
        ax.set_title(f"{data} / {model} / {precision}")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        figures[f"test_error_{data}_{model}_{precision}.png"] = fig

    # Bars per optimizer, one group per model/precision; a missing value gets no bar.
    panels = [("optimizer_state_mb", "optimizer state (MB)", rows)]
    gpu_rows = [r for r in rows if r.get("memory_kind") == GPU_MEMORY]
    if gpu_rows:
        panels.append(("peak_memory_mb", "peak GPU memory (MB)", gpu_rows))
    keys = list(dict.fromkeys((r["model"], r["precision"]) for r in rows))
    labels = _label_order(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 1.5 * len(keys) + 5) * len(panels), 4.5), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, (column, title, panel_rows) in zip(axes[0], panels):
        for i, label in enumerate(labels):
            xs, heights = [], []
            for k, (model, precision) in enumerate(keys):
                match = next((r for r in panel_rows if r["label"] == label and r["model"] == model
                              and r["precision"] == precision), None)  # fmt: skip
                value = None if match is None else _number(match.get(column))
                if value is not None:
                    xs.append(k + (i - (len(labels) - 1) / 2) * width)
                    heights.append(value)
            style = styles[label]
            ax.bar(xs, heights, width=width, color=style["color"], hatch=style["hatch"], edgecolor="white",
                   label=label)  # fmt: skip
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{m}/{p}" for m, p in keys], fontsize=8)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    _legend_outside(axes[0][-1])
    figures["memory.png"] = fig
    return figures


def make_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write :func:`make_figures` into ``out``; return the paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in make_figures(rows).items():
        path = out / name
        fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legend outside stays in
        plt.close(fig)
        written.append(path)
    return written


def report(rows: list[dict[str, Any]], out: Path, suite: str) -> list[Path]:
    """Write results.csv, results.md and the plots; return the plots' paths."""
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_report(rows, suite))
    return make_plots(rows, out)


def log_report_to_wandb(rows: list[dict[str, Any]], out: Path, suite: str, plots: Sequence[Path],
                        project: str, offline: bool | str = "auto") -> Any:  # fmt: skip
    """One W&B run (``job_type="report"``) holding the suite's report: ``results.csv``
    as the table ``results``, every plot as an image, and results.csv/.md and the plots
    as the artifact ``<suite>-report``. ``offline: auto`` as in the app's W&B logger
    (offline unless W&B has credentials); the run is saved under ``out/wandb``.

    Returns:
        The finished W&B run.
    """
    import wandb

    from singd_lightning.app.hydra_utils import resolve_wandb_offline

    mode = "offline" if resolve_wandb_offline(offline) else "online"
    run = wandb.init(project=project, job_type="report", name=f"{suite}-report", dir=str(out), mode=mode,
                     config={"suite": suite, "jobs": len(rows)})  # fmt: skip
    table = wandb.Table(columns=list(CSV_COLUMNS), data=[[row.get(c) for c in CSV_COLUMNS] for row in rows])
    run.log({"results": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    artifact = wandb.Artifact(f"{suite}-report", type="report")
    for path in (out / "results.csv", out / "results.md", *plots):
        artifact.add_file(str(path))
    run.log_artifact(artifact)
    run.finish()
    return run


# ------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, required=True, help="which grid to run")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: results/<suite>)")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N jobs (default: all)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZER_LABELS),
                        help=f"only these optimizers (default: all: {' '.join(OPTIMIZER_LABELS)})")
    suite_models = "; ".join(f"{suite}: {' '.join(models)}" for suite, models in PAPER_SUITES.items())
    parser.add_argument("--models", nargs="+", choices=PAPER_MODELS,
                        help=f"paper suites: only these models (default: the suite's: {suite_models})")
    parser.add_argument("--structures", nargs="+",
                        help=f"paper suites: SINGD structures (default: {' '.join(PAPER_STRUCTURES)})")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "bf16-fp32-factors", "bf16-true", "fp16"),
                        help=f"paper suites: precisions (default: {' '.join(PAPER_PRECISIONS)})")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every job (repeatable), e.g. -o trainer.max_epochs=1")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per job before it is killed (default: none)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the jobs (default: %(default)s)")
    parser.add_argument("--wandb", metavar="PROJECT", default=None,
                        help="also log the report (table, plots, files) to this W&B project; offline without "
                             "W&B credentials (default: no W&B)")  # fmt: skip
    converge_args = parser.add_argument_group("converge suite (see experiments/converge.py)")
    converge_args.add_argument("--quick", action="store_true",
                               help=f"a minutes-sized run: {', '.join(converge.QUICK.workloads)}, "
                                    f"{' and '.join(converge.QUICK.methods)}, {converge.QUICK.trials} trials of "
                                    f"{converge.QUICK.epochs} epoch, {converge.QUICK.seeds} seeds")
    converge_args.add_argument("--workloads", nargs="+", choices=[w.name for w in converge.WORKLOADS],
                               help="only these workloads (default: all whose configs exist)")
    converge_args.add_argument("--methods", nargs="+", choices=[m.label for m in converge.METHODS],
                               help="only these methods (default: all whose options exist)")
    converge_args.add_argument("--trials", type=int, default=None,
                               help=f"search trials per method (default: {converge.FULL.trials}, --quick "
                                    f"{converge.QUICK.trials})")
    converge_args.add_argument("--jobs", type=int, default=2,
                               help="(workload, method) pairs run side by side, one thread each (default: %(default)s)")
    converge_args.add_argument("--write-tuned", action="store_true",
                               help="also write the best settings into the app's conf/tuned (default: only OUT/tuned)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/results.csv (converge: from the runs in OUT/runs, with the current targets)")
    args = parser.parse_args(argv)
    if args.models and args.suite in PAPER_SUITES:
        others = [m for m in args.models if m not in PAPER_SUITES[args.suite]]
        if others:
            parser.error(f"--models: {' '.join(others)} not in the {args.suite} suite; choose from "
                         f"{' '.join(PAPER_SUITES[args.suite])}.")  # fmt: skip
    if args.out is None:
        args.out = Path("results") / args.suite
    return args


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            row[key] = None if value == "" else value
    return rows


def converge_budget(args: argparse.Namespace) -> converge.Budget:
    """The converge suite's budget from the command line.

    Raises:
        ValueError: ``--trials`` below 1.
    """
    budget = converge.QUICK if args.quick else converge.FULL
    if args.trials is not None:
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}.")
        budget = dataclasses.replace(budget, trials=args.trials)
    if args.workloads:
        budget = dataclasses.replace(budget, workloads=tuple(args.workloads))
    if args.methods:
        budget = dataclasses.replace(budget, methods=tuple(args.methods))
    return budget


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    if args.suite == "converge":
        tuned = converge.config_dir() / "tuned" if args.write_tuned else None
        if args.report_only:
            if not (out / "runs").is_dir():
                raise SystemExit(f"Error: --report-only needs a finished converge suite in --out; {out / 'runs'} "
                                 "does not exist.")  # fmt: skip
            return converge.rebuild_report(converge_budget(args), out, write_tuned_into=tuned, colors=OPTIMIZER_COLORS)
        return converge.run_suite(converge_budget(args), out, jobs=args.jobs, python=args.python,
                                  timeout=args.timeout, extra=args.override, write_tuned_into=tuned,
                                  dry_run=args.dry_run, colors=OPTIMIZER_COLORS)  # fmt: skip
    if args.dry_run and not args.report_only:
        for job in suite_jobs(args):
            print(shlex.join(job_command(job, out, args.override, args.python)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = _read_rows(out / "results.csv")
        plots = report(rows, out, args.suite)
        if args.wandb:
            log_report_to_wandb(rows, out, args.suite, plots, args.wandb)
        return 0
    jobs = suite_jobs(args)
    rows = []
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.name} ...", flush=True)
        row = run_job(job, out, args.override, args.python, args.timeout)
        rows.append(row)
        summary = f"test_acc={_fmt(row.get('test_acc'), '.4f')}" if row["status"] == "ok" else (row.get("error") or "")
        print(f"[{i}/{len(jobs)}] {job.name}: {row['status']} {summary[:200]} ({_fmt(row.get('wall_time_s'), '.0f')} s)",
              flush=True)  # fmt: skip
        plots = report(rows, out, args.suite)  # keep the report current while the suite runs
    print(f"Wrote {out / 'results.csv'}, {out / 'results.md'} and plots in {out}")
    if args.wandb and rows:
        log_report_to_wandb(rows, out, args.suite, plots, args.wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
