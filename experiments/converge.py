"""The ``converge`` suite of ``experiments/run.py``: an equally tuned comparison of
the optimizers by steps and wall time to a fixed target per workload.

    python experiments/run.py --suite converge --out results/converge            # ~1 h, 2 CPU cores
    python experiments/run.py --suite converge --out /tmp/c --quick              # ~1 min
    python experiments/run.py --suite converge --out results/converge --write-tuned

For every workload (:data:`WORKLOADS`) and method (:data:`METHODS`):

1. a random search (``hparams_search=<optimizer>``: Optuna's RandomSampler through
   hydra-optuna-sweeper) of the same number of trials and epochs for every method,
   over the learning rate, weight decay and the method's own knobs, on the
   validation metric, all trials in one ``train.py --multirun`` process;
2. the best trial's setting re-run over several seeds in fp32 and in bf16
   (``precision=bf16``: bf16-mixed, bf16 Kronecker factors) in one multirun process
   (``precision=fp32,bf16 seed=0,1,2``; one per precision when their numbers of
   seeds differ).

Every job runs without the shipped ``conf/tuned`` values (``~tuned``), so the search
alone decides each setting. Per-epoch records come from each run's
``csv/metrics.csv`` (``perf/train_steps`` and ``perf/train_time_s`` sit in the row of
the validation metrics); the final test metric and the optimizer-state size from its
``results.json``.

``OUT`` then holds ``runs/<workload>/<method>/`` with the Hydra sweep directories
``search/`` and ``fp32_bf16/`` (or ``fp32/`` and ``bf16/``) and each process's
command and logs, ``converge.csv`` (one row per
run), ``results.md`` (per workload: steps and wall time to the target, final test
metric mean ± std, optimizer state, in fp32 and bf16, and the chosen settings),
``converge_<workload>.png`` (the validation metric against steps and against wall
time) and ``tuned/<data>_<optimizer>.yaml``: the best settings as ``conf/tuned``
files, copied into the app's configs only with ``--write-tuned``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
if str(REPO) not in sys.path:
    # the jobs' train.py imports the package of this checkout; the suite reads the same configs
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------ what is compared


@dataclass(frozen=True)
class Workload:
    """A data set, model and target of the comparison.

    Attributes:
        name: Short name (directories, tables, figures).
        overrides: Hydra overrides that select it.
        data: The ``data`` option: the tuned files are ``conf/tuned/<data>_<optimizer>.yaml``.
        metric: The per-epoch validation metric (a ``csv/metrics.csv`` column).
        mode: ``"max"`` (accuracy) or ``"min"`` (loss): the direction of ``metric``.
        target: The value of ``metric`` that counts as reached.
        search_metric: What the random search optimises (``optimized_metric``).
        test_metric: The final test metric (a ``csv/metrics.csv`` column).
        epochs: Epochs of every search trial and final run.
        epoch_s: Seconds per fp32 epoch of one run (1 thread), for the time estimate.
        bf16_factor: Time of a bf16 epoch over an fp32 one (bf16 autocast on a CPU).
        requires: Config files (relative to the config directory) it needs; without
            them it is left out with a note.
        tunes: Whether its best settings are the ``conf/tuned`` files of ``data``
            (one workload per data set: MNIST-1D's come from the MLP).
    """

    name: str
    overrides: tuple[str, ...]
    data: str
    metric: str
    mode: str
    target: float
    search_metric: str
    test_metric: str
    epochs: int
    epoch_s: float
    bf16_factor: float = 1.0
    requires: tuple[str, ...] = ()
    tunes: bool = True

    @property
    def target_text(self) -> str:
        return f"{self.metric} {'≥' if self.mode == 'max' else '≤'} {self.target:g}"


@dataclass(frozen=True)
class Method:
    """An optimizer setting of the comparison. Each ``optimizer.<key>=...`` override
    must name an option of ``conf/optimizer/<optimizer>.yaml``; a method whose option
    is missing there (a variant of a feature not in this checkout) is left out.

    Attributes:
        label: Name in the tables and figures.
        optimizer: The ``optimizer`` option; the search is ``hparams_search=<optimizer>``.
        overrides: Fixed Hydra overrides of the variant (not searched).
        tunes: Whether its best setting is the ``conf/tuned/<data>_<optimizer>.yaml``
            file (one method per optimizer: SINGD's is the default structure's).
    """

    label: str
    optimizer: str
    overrides: tuple[str, ...] = ()
    tunes: bool = False

    @property
    def slug(self) -> str:
        return self.label.lower().replace("+", "_").replace("-", "_").replace(" ", "_")


#: Epoch times (fp32, one thread, with validation; KFAC, the slowest, where measured)
#: for the estimate: the CPU time (user + sys) of ``python train.py trainer=cpu
#: num_threads=1`` runs, less that of a run of one batch, on a 2-core AMD EPYC VM
#: shared with other work (where the wall time was several times the CPU time, the
#: wall time of a quiet machine), rounded up. The text epochs are cut to 50 steps, so
#: that validations (the resolution of steps-to-target) come every 50 steps and the
#: runs fit the budget. The text target, 3.5 bits per byte, is a quarter below the
#: unigram baseline (4.71): in the budget's 200 steps no tuned method reached 3.0
#: (AdamW's best validation was 3.22).
WORKLOADS: tuple[Workload, ...] = (
    Workload("digits-vgg", ("data=digits", "model=vgg_small"), "digits", "val/acc", "max", 0.95,
             "val/acc_best", "test/acc", epochs=10, epoch_s=0.7),
    Workload("mnist1d-mlp", ("data=mnist1d", "model=mlp"), "mnist1d", "val/acc", "max", 0.60,
             "val/acc_best", "test/acc", epochs=15, epoch_s=0.5, bf16_factor=3.6),
    Workload("mnist1d-cnn1d", ("data=mnist1d", "model=cnn1d"), "mnist1d", "val/acc", "max", 0.90,
             "val/acc_best", "test/acc", epochs=6, epoch_s=1.5, bf16_factor=1.5, tunes=False),
    Workload("text-gpt", ("experiment=text_gpt", "trainer.limit_train_batches=50"), "text", "val/bpb", "min", 3.5,
             "val/loss_best", "test/bpb", epochs=4, epoch_s=6.0, bf16_factor=2.0,
             requires=("experiment/text_gpt.yaml", "data/text.yaml", "model/gpt.yaml")),
)  # fmt: skip

#: The options of the paper's update (``PAPER_UPDATE``), where the library's
#: defaults (the warm start, the KL clip) go beyond it.
PAPER = ("optimizer.factor_init=identity", "optimizer.kl_clip=null")
#: The warm start alone, without the KL clip.
WARM = ("optimizer.factor_init=warm", "optimizer.kl_clip=null")

#: The methods, in table order; variants are a label and their overrides.
METHODS: tuple[Method, ...] = (
    Method("AdamW", "adamw", tunes=True),
    Method("SGD", "sgd", tunes=True),
    Method("KFAC", "kfac", tunes=True),
    Method("IKFAC", "ikfac", PAPER, tunes=True),
    Method("INGD", "ingd", PAPER, tunes=True),
    Method("SINGD-diag", "singd", ("structure=diagonal", *PAPER)),
    Method("SINGD-hier", "singd", ("structure=hierarchical", *PAPER)),
    Method("SINGD-diag+warm", "singd", ("structure=diagonal", *WARM)),
    Method("SINGD-hier+warm", "singd", ("structure=hierarchical", *WARM)),
    # the warm start with the KL clip that keeps fixed-lr runs stable (scripts/warm_start.py);
    # SINGD's tuned files come from it: it reached every target in fewer steps than the
    # paper's start in the full suite (README, "Tuned comparison")
    Method("SINGD-hier+warm+clip", "singd",
           ("structure=hierarchical", "optimizer.factor_init=warm", "optimizer.kl_clip=0.001"), tunes=True),
)


@dataclass(frozen=True)
class Budget:
    """How much every method gets.

    Attributes:
        trials: Random-search trials per (workload, method).
        seeds: Seeds of the best setting in fp32.
        bf16_seeds: Seeds of the best setting in bf16.
        epochs: Epochs of every run; None: each workload's own.
        workloads: Names of the workloads to run; None: all available.
        methods: Labels of the methods to run; None: all available.
        overrides: Extra overrides of every job (e.g. fewer batches).
    """

    trials: int
    seeds: int
    bf16_seeds: int
    epochs: int | None = None
    workloads: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    overrides: tuple[str, ...] = ()


#: The CPU-sized suite (about an hour on 2 cores with --jobs 2).
FULL = Budget(trials=8, seeds=3, bf16_seeds=1)
#: A minutes-sized run of the whole pipeline (tested).
QUICK = Budget(trials=2, seeds=2, bf16_seeds=2, epochs=1, workloads=("mnist1d-mlp",),
               methods=("AdamW", "SINGD-diag"), overrides=("trainer.limit_train_batches=10",))  # fmt: skip

#: Overrides of every job: one CPU thread (jobs run side by side), quiet, no per-epoch
#: test pass and no SINGD diagnostics (both would bill the suite's time, the latter
#: only the second-order methods'), and no shipped tuned values (the search decides).
COMMON = (
    "trainer=cpu",
    "num_threads=1",
    "logger=csv",
    "eval_test_every_epoch=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.singd_diagnostics=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~tuned=null",
)
#: Python and Lightning start-up of one ``train.py`` process (CPU time, measured as
#: above), for the estimate.
STARTUP_S = 10.0
#: Significant digits of a tuned value: the final runs use the rounded values, the
#: same as the written tuned files.
DIGITS = 4


def config_dir() -> Path:
    """The app's config directory (``$SINGD_CONFIG_DIR`` or the package's), the jobs' configs."""
    from singd_lightning.app.hydra_utils import config_dir as app_config_dir

    return app_config_dir()


def optimizer_options(optimizer: str, conf: Path | None = None) -> set[str]:
    """The option names of ``conf/optimizer/<optimizer>.yaml``."""
    from omegaconf import OmegaConf

    path = (conf or config_dir()) / "optimizer" / f"{optimizer}.yaml"
    return set(OmegaConf.load(path)) if path.is_file() else set()


def missing_requirements(workload: Workload | None = None, method: Method | None = None,
                         conf: Path | None = None) -> list[str]:  # fmt: skip
    """What the checkout lacks for ``workload`` (config files) or ``method`` (optimizer
    options its overrides set); empty if it can run."""
    conf = conf or config_dir()
    missing = []
    if workload is not None:
        missing += [f"conf/{r}" for r in workload.requires if not (conf / r).is_file()]
    if method is not None:
        options = optimizer_options(method.optimizer, conf)
        for override in method.overrides:
            key = override.split("=", 1)[0]
            if key.startswith("optimizer.") and key.split(".")[1] not in options:
                missing.append(f"optimizer option {key.split('.')[1]!r} of optimizer={method.optimizer}")
    return missing


def select(budget: Budget, conf: Path | None = None) -> tuple[list[Workload], list[Method], list[str]]:
    """The workloads and methods of ``budget`` this checkout can run, and a note for
    each one left out.

    Raises:
        ValueError: ``budget`` names a workload or method that does not exist.
    """
    names = [w.name for w in WORKLOADS]
    labels = [m.label for m in METHODS]
    for name in budget.workloads or ():
        if name not in names:
            raise ValueError(f"workload {name!r} does not exist; choose from {', '.join(names)}.")
    for label in budget.methods or ():
        if label not in labels:
            raise ValueError(f"method {label!r} does not exist; choose from {', '.join(labels)}.")
    notes, workloads, methods = [], [], []
    for w in WORKLOADS:
        if budget.workloads is None or w.name in budget.workloads:
            missing = missing_requirements(workload=w, conf=conf)
            (notes.append(f"workload {w.name} left out: no {', '.join(missing)}") if missing else workloads.append(w))
    for m in METHODS:
        if budget.methods is None or m.label in budget.methods:
            missing = missing_requirements(method=m, conf=conf)
            (notes.append(f"method {m.label} left out: no {', '.join(missing)}") if missing else methods.append(m))
    return workloads, methods, notes


def epochs_of(workload: Workload, budget: Budget) -> int:
    return budget.epochs if budget.epochs is not None else workload.epochs


def estimate_seconds(workloads: Sequence[Workload], methods: Sequence[Method], budget: Budget, jobs: int) -> float:
    """Wall time of the suite from the measured epoch times: every (workload, method)
    runs its processes (the search, the final runs) one after the other, ``jobs`` of
    them side by side."""
    total = 0.0
    processes = 1 + len(final_groups(budget))
    for w in workloads:
        epoch_s = w.epoch_s * epochs_of(w, budget)
        runs = budget.trials + budget.seeds + budget.bf16_seeds * w.bf16_factor
        per_method = processes * STARTUP_S + runs * epoch_s
        total += per_method * len(methods)
    return total / max(1, jobs)


# ------------------------------------------------------------------ commands


def search_space(optimizer: str, conf: Path | None = None) -> list[str]:
    """The searched keys of ``conf/hparams_search/<optimizer>.yaml``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load((conf or config_dir()) / "hparams_search" / f"{optimizer}.yaml")
    return list(cfg.hydra.sweeper.params)


def search_command(workload: Workload, method: Method, budget: Budget, sweep_dir: Path,
                   python: str = sys.executable, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The one ``train.py --multirun`` process of a (workload, method) search."""
    maximize = workload.mode == "max"
    return [
        python, str(TRAIN), "-m", f"hparams_search={method.optimizer}", *workload.overrides, *method.overrides,
        *COMMON, f"trainer.max_epochs={epochs_of(workload, budget)}", "seed=0",
        f"hydra.sweeper.n_trials={budget.trials}",
        # with one trial per batch, any failed trial would end the sweep: keep going
        "hydra.sweeper.max_failure_rate=1.0",
        f"optimized_metric={workload.search_metric}",
        f"hydra.sweeper.direction={'maximize' if maximize else 'minimize'}",
        # a diverged trial is the worst possible value
        f"objective_if_missing={0.0 if maximize else 1e9}",
        *budget.overrides, *extra, f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def final_groups(budget: Budget) -> list[tuple[tuple[str, ...], int]]:
    """The final runs' processes: ``(precisions, seeds)`` each; precisions with the same
    number of seeds share one process (one start-up), e.g. ``[(("fp32", "bf16"), 3)]``
    or ``[(("fp32",), 3), (("bf16",), 1)]``."""
    groups: dict[int, list[str]] = {}
    for precision, seeds in (("fp32", budget.seeds), ("bf16", budget.bf16_seeds)):
        if seeds > 0:
            groups.setdefault(seeds, []).append(precision)
    return [(tuple(precisions), seeds) for seeds, precisions in groups.items()]


def final_command(workload: Workload, method: Method, budget: Budget, params: Mapping[str, Any],
                  precisions: Sequence[str], seeds: int, sweep_dir: Path, python: str = sys.executable,
                  extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The one ``train.py --multirun`` process of the best setting's seeds in ``precisions``."""
    return [
        python, str(TRAIN), "-m", f"optimizer={method.optimizer}", *workload.overrides, *method.overrides, *COMMON,
        f"trainer.max_epochs={epochs_of(workload, budget)}", *(f"{k}={v}" for k, v in params.items()),
        f"precision={','.join(precisions)}", "seed=" + ",".join(str(s) for s in range(seeds)),
        *budget.overrides, *extra, f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


# ------------------------------------------------------------------ records


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """``(steps, train time (s), value)`` at every validation of a run, from its
    ``csv/metrics.csv``; empty without a log. The steps and time are the app's
    ``perf/train_steps`` and ``perf/train_time_s`` in the row of the metric."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    curve = []
    with open(path) as f:
        for rec in csv.DictReader(f):
            value = finite_float(rec.get(metric))
            steps = finite_float(rec.get("perf/train_steps"))
            seconds = finite_float(rec.get("perf/train_time_s"))
            if value is not None and steps is not None and seconds is not None:
                curve.append((int(steps), seconds, value))
    return curve


def to_target(curve: Sequence[tuple[int, float, float]], target: float, mode: str) -> tuple[int, float] | None:
    """``(steps, seconds)`` of the first point of ``curve`` that reaches ``target``
    (``mode`` ``"max"``: value ≥ target, ``"min"``: value ≤ target); None if none does."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    for steps, seconds, value in curve:
        if (value >= target) if mode == "max" else (value <= target):
            return steps, seconds
    return None


def last_value(run_dir: Path, column: str) -> float | None:
    """The last finite value of ``column`` in a run's ``csv/metrics.csv`` (e.g. the
    test metric, logged once at the end); None without one."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        values = [finite_float(rec.get(column)) for rec in csv.DictReader(f)]
    return next((v for v in reversed(values) if v is not None), None)


def best_value(curve: Sequence[tuple[int, float, float]], mode: str) -> float | None:
    values = [v for _, _, v in curve]
    return (max(values) if mode == "max" else min(values)) if values else None


def legend_outside(ax: Any) -> None:
    """The legend right of the axes, so that it hides no data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def finite_float(value: Any) -> float | None:
    """``value`` (a number or its text, as in a CSV) as a finite float; None if missing
    or not finite, so that it is never drawn or averaged as 0."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _round(value: Any) -> Any:
    """A number (or its text, as in an override) to :data:`DIGITS` significant digits;
    an integer stays one; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("+-").isdigit()):
        return int(value)
    number = finite_float(value)
    return value if number is None else float(f"{number:.{DIGITS}g}")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered job directories of a Hydra sweep, in job order."""
    if not sweep_dir.is_dir():
        return []
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def run_row(run_dir: Path, workload: Workload, method: Method, phase: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """One run's row: its status, curve, steps and time to the target, test metric,
    optimizer state and, for a search trial, the values of ``keys``. ``phase`` is
    ``"search"`` or ``"final"``; a final run's row gets its precision as its phase
    (None if the run left no ``results.json``)."""
    row: dict[str, Any] = {"workload": workload.name, "method": method.label, "optimizer": method.optimizer,
                           "phase": phase, "run_dir": str(run_dir), "trial": run_dir.name}  # fmt: skip
    path = run_dir / "results.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    row["status"] = result.get("status") or "failed"
    row["error"] = result.get("error") or (None if result else "no results.json")
    row["seed"] = result.get("seed")
    row["precision"] = "fp32" if phase == "search" else result.get("precision_config")
    if phase == "final":
        row["phase"] = row["precision"]
    overrides = dict(o.split("=", 1) for o in result.get("overrides") or [] if "=" in o)
    row["params"] = {k: _round(overrides[k]) for k in keys if k in overrides}
    curve = read_curve(run_dir, workload.metric)
    row["curve"] = curve
    row["best_metric"] = best_value(curve, workload.mode)
    reached = to_target(curve, workload.target, workload.mode) if row["status"] == "ok" else None
    row["steps_to_target"], row["time_to_target_s"] = reached if reached else (None, None)
    row["test_metric"] = last_value(run_dir, workload.test_metric)
    for key in ("optimizer_state_mb", "step_time_ms", "global_step", "wall_time_s"):
        row[key] = finite_float(result.get(key))
    return row


def best_trial(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The usable search trial (status ok, with a metric) with the best validation
    value; the earliest on a tie. None if no trial is usable."""
    usable = [r for r in rows if r["status"] == "ok" and r.get("best_metric") is not None]
    if not usable:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(usable, key=lambda r: (sign * r["best_metric"], -int(r["trial"]) if str(r["trial"]).isdigit() else 0))


# ------------------------------------------------------------------ aggregation


def mean_std(values: Iterable[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value); None for no values."""
    values = [float(v) for v in values]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(stats: tuple[float, float] | None, spec: str) -> str:
    if stats is None:
        return "–"
    mean, std = stats
    return f"{mean:{spec}} ± {std:{spec}}"


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the final runs of one (workload, method, precision): counts by status,
    steps and seconds to the target over the runs that reached it, test metric over
    the runs that finished, optimizer state."""
    ok = [r for r in rows if r["status"] == "ok"]
    reached = [r for r in ok if r.get("steps_to_target") is not None]
    return {
        "runs": len(rows),
        "ok": len(ok),
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "reached": len(reached),
        "steps": mean_std(r["steps_to_target"] for r in reached),
        "seconds": mean_std(r["time_to_target_s"] for r in reached),
        "test": mean_std(r["test_metric"] for r in ok if r.get("test_metric") is not None),
        "state_mb": mean_std(r["optimizer_state_mb"] for r in rows if r.get("optimizer_state_mb") is not None),
    }


def _problems(summary: Mapping[str, Any]) -> str:
    parts = [f"{summary[k]} {k}" for k in ("diverged", "failed") if summary[k]]
    return ", ".join(parts)


def to_target_cell(summary: Mapping[str, Any] | None, key: str, spec: str) -> str:
    """``mean ± std`` to the target, with ``(k/n)`` when not every run reached it;
    ``not reached``, ``diverged`` or ``failed`` when none did; ``–`` without runs."""
    if summary is None or summary["runs"] == 0:
        return "–"
    if summary["reached"] == 0:
        if summary["ok"] == 0:
            return _problems(summary) or "failed"
        problems = _problems(summary)
        return "not reached" + (f" ({problems})" if problems else "")
    cell = _pm(summary[key], spec)
    if summary["reached"] < summary["runs"]:
        cell += f" ({summary['reached']}/{summary['runs']})"
    return cell


def test_cell(summary: Mapping[str, Any] | None, spec: str) -> str:
    """The test metric's ``mean ± std`` over the finished runs; their count and the
    diverged/failed ones when not all finished."""
    if summary is None or summary["runs"] == 0:
        return "–"
    if summary["test"] is None:
        return _problems(summary) or "–"
    cell = _pm(summary["test"], spec)
    problems = _problems(summary)
    return cell + (f" ({problems})" if problems else "")


def _setting(params: Mapping[str, Any] | None) -> str:
    if not params:
        return "–"
    return ", ".join(f"{k.removeprefix('optimizer.')}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())  # fmt: skip


def markdown(rows: Sequence[dict[str, Any]], workloads: Sequence[Workload], methods: Sequence[Method],
             budget: Budget, notes: Sequence[str] = ()) -> str:  # fmt: skip
    """``results.md``: per workload, steps and wall time to the target and the final
    test metric (mean ± std over seeds) in fp32 and bf16, optimizer state, the tuned
    setting and its best validation value in the search."""
    lines = ["# Suite `converge`", ""]
    lines.append(
        f"Every method: a random search of {budget.trials} trials (Optuna RandomSampler, seed 1234, the "
        "search space of `conf/hparams_search/<optimizer>.yaml`) on the validation metric, the same epochs "
        f"for all; then the best setting over {budget.seeds} seed(s) in fp32 and {budget.bf16_seeds} in bf16 "
        "(bf16-mixed autocast, bf16 Kronecker factors). Steps and time to target: the first validation (at "
        "an epoch's end) that reaches the target; time is the training steps' cumulative wall time "
        "(forward, backward, optimizer step; no evaluation), one CPU thread per run. mean ± std over the "
        "runs that reached it, (k/n) when not all did. Optimizer state: the bytes of every tensor in "
        "`optimizer.state_dict()`."
    )
    if budget.overrides:
        lines.append(f"Every job also: `{' '.join(budget.overrides)}`.")
    lines += [f"- {n}" for n in notes]
    lines.append("")
    for w in workloads:
        wrows = [r for r in rows if r["workload"] == w.name]
        steps = next((r["global_step"] for r in wrows if r.get("global_step")), None)
        lines += [f"## {w.name} (`{' '.join(w.overrides)}`): target {w.target_text}", ""]
        lines.append(f"{epochs_of(w, budget)} epoch(s)" + (f", {steps:.0f} steps" if steps else "")
                     + f"; test metric: {w.test_metric} (final weights).")  # fmt: skip
        lines.append("")
        lines.append("| method | fp32 steps to target | fp32 time to target (s) | fp32 test | bf16 steps to target | "
                     "bf16 time to target (s) | bf16 test | optimizer state (MB) | setting | best val (search) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        spec = ".4f" if w.mode == "max" else ".3f"
        for m in methods:
            mrows = [r for r in wrows if r["method"] == m.label]
            if not mrows:
                continue
            trials = [r for r in mrows if r["phase"] == "search"]
            best = best_trial(trials, w.mode)
            sums = {p: summarize([r for r in mrows if r["phase"] == p]) for p in ("fp32", "bf16")}
            state = sums["fp32"]["state_mb"] or sums["bf16"]["state_mb"]
            search = (f"{best['best_metric']:{spec}}" if best else "no usable trial") + f" ({len(trials)} trials)"
            lines.append(
                f"| {m.label} | {to_target_cell(sums['fp32'], 'steps', '.0f')} "
                f"| {to_target_cell(sums['fp32'], 'seconds', '.1f')} | {test_cell(sums['fp32'], spec)} "
                f"| {to_target_cell(sums['bf16'], 'steps', '.0f')} | {to_target_cell(sums['bf16'], 'seconds', '.1f')} "
                f"| {test_cell(sums['bf16'], spec)} | {'–' if state is None else f'{state[0]:.3f}'} "
                f"| {_setting(best['params'] if best else None)} | {search} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


#: Columns of ``converge.csv`` (one row per run).
CSV_COLUMNS = (
    "workload", "method", "optimizer", "phase", "precision", "seed", "trial", "status", "error", "params",
    "best_metric", "steps_to_target", "time_to_target_s", "test_metric", "optimizer_state_mb", "step_time_ms",
    "global_step", "wall_time_s", "run_dir",
)  # fmt: skip


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            values = {k: row.get(k) for k in CSV_COLUMNS}
            values["params"] = json.dumps(row.get("params") or {})
            writer.writerow({k: "" if v is None else v for k, v in values.items()})


# ------------------------------------------------------------------ figures

LINESTYLES = ("-", "--", ":", "-.")
#: Markers of an optimizer's variants, so that more variants than line styles stay apart.
MARKERS = ("o", "s", "^", "v", "D", "x")


def make_figures(rows: Sequence[dict[str, Any]], workloads: Sequence[Workload], methods: Sequence[Method],
                 colors: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``converge_<workload>.png``: the validation metric of every method's final runs
    (mean over seeds at each validation) against steps and against training time, fp32
    and bf16, with the target as a dashed line. A method's colour is its optimizer's
    (``colors``), its variants differ by line style and marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles, rank = {}, {}
    for m in methods:
        i = rank.get(m.optimizer, 0)
        rank[m.optimizer] = i + 1
        styles[m.label] = {"color": (colors or {}).get(m.optimizer), "linestyle": LINESTYLES[i % len(LINESTYLES)],
                           "marker": MARKERS[i % len(MARKERS)]}
    figures = {}
    for w in workloads:
        fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
        for i, precision in enumerate(("fp32", "bf16")):
            for m in methods:
                runs = [r for r in rows if r["workload"] == w.name and r["method"] == m.label
                        and r["phase"] == precision and r.get("curve")]  # fmt: skip
                if not runs:
                    continue
                n = min(len(r["curve"]) for r in runs)  # a diverged run stops early
                mean = [[statistics.fmean(r["curve"][k][j] for r in runs) for k in range(n)] for j in range(3)]
                for ax, x in zip(axes[i], (mean[0], mean[1])):
                    ax.plot(x, mean[2], markersize=3, label=m.label, **styles[m.label])
            for ax, xlabel in zip(axes[i], ("optimizer steps", "training time (s)")):
                ax.axhline(w.target, color="black", linestyle="--", linewidth=0.8)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{w.metric} ({precision})")
                ax.grid(alpha=0.3)
        legend_outside(axes[0][1])
        fig.suptitle(f"{w.name}: {' '.join(w.overrides)} (target {w.target_text})")
        figures[f"converge_{w.name}.png"] = fig
    return figures


def write_report(rows: Sequence[dict[str, Any]], out: Path, workloads: Sequence[Workload],
                 methods: Sequence[Method], budget: Budget, notes: Sequence[str] = (),
                 colors: Mapping[str, str] | None = None) -> list[Path]:  # fmt: skip
    """Write ``converge.csv``, ``results.md`` and the figures into ``out``; return the figures' paths."""
    import matplotlib.pyplot as plt

    write_csv(rows, out / "converge.csv")
    (out / "results.md").write_text(markdown(rows, workloads, methods, budget, notes))
    paths = []
    for name, fig in make_figures(rows, workloads, methods, colors).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths


# ------------------------------------------------------------------ tuned files


def tuned_file_text(params: Mapping[str, Any], comment: Sequence[str]) -> str:
    """A ``conf/tuned`` file (``@package _global_``) that sets ``params`` (dotted keys,
    e.g. ``optimizer.lr``), with ``comment`` as its header.

    Raises:
        ValueError: ``params`` is empty or a key is not dotted below a config group.
    """
    from omegaconf import OmegaConf

    if not params:
        raise ValueError("params must set at least one value, got none.")
    nested: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"params key {key!r} must be dotted below a group, e.g. 'optimizer.lr'.")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    header = ["@package _global_", *comment]
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header) + OmegaConf.to_yaml(nested)


def write_tuned(directory: Path, data: str, optimizer: str, params: Mapping[str, Any], comment: Sequence[str]) -> Path:
    """Write ``<directory>/<data>_<optimizer>.yaml`` (see :func:`tuned_file_text`); return its path."""
    text = tuned_file_text(params, comment)  # checked before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{data}_{optimizer}.yaml"
    path.write_text(text)
    return path


def tuned_comment(workload: Workload, method: Method, budget: Budget, best: Mapping[str, Any]) -> list[str]:
    variant = " ".join((*workload.overrides, *method.overrides))
    lines = [
        f"{method.label} on {workload.data} (optimizer={method.optimizer} data={workload.data}): the best of a random "
        f"search by the converge suite,",
        "  python experiments/run.py --suite converge --out DIR --write-tuned",
        f"{budget.trials} trials of {epochs_of(workload, budget)} epoch(s) on `{variant}` (Optuna RandomSampler, "
        f"seed 1234, search space conf/hparams_search/{method.optimizer}.yaml),",
        f"best {workload.metric} {best['best_metric']:.4g} in the search. Command-line overrides still win.",
    ]
    if method.optimizer == "singd":
        lines.append("SINGD's values are those of the default structure (hierarchical); other structures use them too.")
    fixed = [o for o in method.overrides if o.startswith("optimizer.")]
    if fixed:
        lines.append(f"The variant's fixed options are part of the setting: {' '.join(fixed)}.")
    return lines


def tuned_params(method: Method, best: Mapping[str, Any]) -> dict[str, Any]:
    """The searched values plus the method's fixed ``optimizer.*`` overrides (not its
    group choices such as ``structure``, which the tuned file cannot select)."""
    params = dict(best["params"])
    for override in method.overrides:
        key, value = override.split("=", 1)
        if key.startswith("optimizer."):
            params[key] = None if value == "null" else _round(value)
    return params


# ------------------------------------------------------------------ running


def run_process(command: Sequence[str], log_dir: Path, name: str, timeout: float | None) -> int | None:
    """Run ``command`` from the repository with its output in ``log_dir/<name>.{stdout,stderr}.log``
    and the command in ``<name>.command.txt``; return its exit code (None: timed out)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.command.txt").write_text(" ".join(command) + "\n")
    with open(log_dir / f"{name}.stdout.log", "w") as out, open(log_dir / f"{name}.stderr.log", "w") as err:
        try:
            return subprocess.run(command, cwd=REPO, stdout=out, stderr=err, timeout=timeout,
                                  env={**os.environ, "HYDRA_FULL_ERROR": "1"}).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return None


def _missing_runs(sweep_dir: Path, workload: Workload, method: Method, precisions: Sequence[str], seeds: int,
                  rows: Sequence[dict[str, Any]], error: str) -> list[dict[str, Any]]:  # fmt: skip
    """Failed rows for the (precision, seed) runs a crashed or killed process left
    without a ``results.json``."""
    seen = {(r["precision"], r["seed"]) for r in rows}
    return [{"workload": workload.name, "method": method.label, "optimizer": method.optimizer, "phase": p,
             "precision": p, "seed": s, "status": "failed", "error": error, "run_dir": str(sweep_dir)}
            for p in precisions for s in range(seeds) if (p, s) not in seen]  # fmt: skip


def _process_error(log_dir: Path, name: str, code: int | None, timeout: float | None) -> str:
    if code is None:
        return f"timed out after {timeout} s"
    tail = (log_dir / f"{name}.stderr.log").read_text().strip().splitlines()[-2:]
    return " | ".join(tail) or f"exit code {code}"


def run_pair(workload: Workload, method: Method, budget: Budget, out: Path, python: str, timeout: float | None,
             extra: Sequence[str], log: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """Search, then the best setting's seeds in fp32 and bf16; every run's row."""
    base = out / "runs" / workload.name / method.slug
    keys = search_space(method.optimizer)
    command = search_command(workload, method, budget, base / "search", python, extra)
    code = run_process(command, base, "search", timeout)
    rows = [run_row(d, workload, method, "search", keys) for d in job_dirs(base / "search")]
    best = best_trial(rows, workload.mode)
    if best is None:
        error = _process_error(base, "search", code, timeout) if code else "no usable search trial"
        log(f"{workload.name} / {method.label}: no usable search trial ({error[:200]})")
        return rows
    log(f"{workload.name} / {method.label}: best {workload.metric} {best['best_metric']:.4g} "
        f"at {_setting(best['params'])}")
    for precisions, seeds in final_groups(budget):
        name = "_".join(precisions)
        command = final_command(workload, method, budget, best["params"], precisions, seeds, base / name, python, extra)
        code = run_process(command, base, name, timeout)
        runs = [r for r in (run_row(d, workload, method, "final") for d in job_dirs(base / name)) if r["phase"]]
        error = _process_error(base, name, code, timeout) if code != 0 else "no results.json"
        runs += _missing_runs(base / name, workload, method, precisions, seeds, runs, error)
        rows += runs
        log(f"{workload.name} / {method.label} / {name}: " + ", ".join(f"{r['phase']} {r['status']}" for r in runs))
    return rows


def write_tuned_files(rows: Sequence[dict[str, Any]], workloads: Sequence[Workload], methods: Sequence[Method],
                      budget: Budget, directory: Path) -> list[Path]:  # fmt: skip
    """The tuned files of the workloads and methods that tune (one per data set and
    optimizer), from their best search trials."""
    written = []
    for w in workloads:
        for m in methods:
            if not (w.tunes and m.tunes):
                continue
            trials = [r for r in rows if r["workload"] == w.name and r["method"] == m.label and r["phase"] == "search"]
            best = best_trial(trials, w.mode)
            if best is not None and best["params"]:
                written.append(write_tuned(directory, w.data, m.optimizer, tuned_params(m, best),
                                           tuned_comment(w, m, budget, best)))  # fmt: skip
    return written


def rebuild_report(budget: Budget, out: Path, *, write_tuned_into: Path | None = None,
                   colors: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Rebuild the report and tuned files of a finished suite in ``out`` from its
    runs on disk (``out/runs``), with today's workload table (targets) and methods.

    Raises:
        FileNotFoundError: ``out`` holds no runs.
    """
    if not (out / "runs").is_dir():
        raise FileNotFoundError(f"{out / 'runs'} does not exist: there is no converge suite to report in {out}.")
    workloads, methods, notes = select(budget)
    rows: list[dict[str, Any]] = []
    for w in workloads:
        for m in methods:
            base = out / "runs" / w.name / m.slug
            rows += [run_row(d, w, m, "search", search_space(m.optimizer)) for d in job_dirs(base / "search")]
            for precisions, _ in final_groups(budget):
                final = (run_row(d, w, m, "final") for d in job_dirs(base / "_".join(precisions)))
                rows += [r for r in final if r["phase"]]
    write_report(rows, out, workloads, methods, budget, notes, colors)
    write_tuned_files(rows, workloads, methods, budget, out / "tuned")
    if write_tuned_into is not None:
        write_tuned_files(rows, workloads, methods, budget, write_tuned_into)
    print(f"converge: report rebuilt from {len(rows)} runs: {out / 'results.md'}", flush=True)
    return 0


def run_suite(budget: Budget, out: Path, *, jobs: int = 2, python: str = sys.executable, timeout: float | None = None,
              extra: Sequence[str] = (), write_tuned_into: Path | None = None, dry_run: bool = False,
              colors: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Run the suite of ``budget`` into ``out`` (see the module docstring); 0 when done.

    Args:
        budget: What every method gets, and which workloads and methods run.
        out: Output directory.
        jobs: (workload, method) pairs run side by side (each one thread).
        python: Interpreter of the jobs.
        timeout: Seconds after which one process (a search or a precision's seeds) is killed.
        extra: Overrides of every job (after the suite's own).
        write_tuned_into: Also write the tuned files here (the app's ``conf/tuned``).
        dry_run: Print the search commands and the estimate only.
        colors: Colour per optimizer in the figures.

    Raises:
        ValueError: ``jobs`` < 1, or ``budget`` names an unknown workload or method.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    workloads, methods, notes = select(budget)
    estimate = estimate_seconds(workloads, methods, budget, jobs)
    duration = f"{estimate / 60:.0f} min" if estimate >= 120 else f"{estimate:.0f} s"
    print(f"converge: {len(workloads)} workloads x {len(methods)} methods, {budget.trials} trials, "
          f"{budget.seeds} fp32 + {budget.bf16_seeds} bf16 seeds, {jobs} jobs side by side; "
          f"estimated {duration}", flush=True)  # fmt: skip
    for note in notes:
        print(f"converge: {note}", flush=True)
    pairs = [(w, m) for w in workloads for m in methods]
    if dry_run:
        for w, m in pairs:
            print(" ".join(search_command(w, m, budget, out / "runs" / w.name / m.slug / "search", python, extra)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = time.time()

    def log(message: str) -> None:
        with lock:
            print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    def task(pair: tuple[Workload, Method]) -> None:
        pair_rows = run_pair(*pair, budget, out, python, timeout, extra, log)
        with lock:
            rows.extend(pair_rows)
            order = {(w.name, m.label): i for i, (w, m) in enumerate(pairs)}
            rows.sort(key=lambda r: order[(r["workload"], r["method"])])
            write_report(rows, out, workloads, methods, budget, notes, colors)  # current while the suite runs

    # the longest workloads first, so that the last pairs to finish are short ones
    by_cost = sorted(pairs, key=lambda pair: -pair[0].epoch_s * epochs_of(pair[0], budget))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(task, pair) for pair in by_cost]:
            future.result()
    write_report(rows, out, workloads, methods, budget, notes, colors)
    written = write_tuned_files(rows, workloads, methods, budget, out / "tuned")
    if write_tuned_into is not None:
        written += write_tuned_files(rows, workloads, methods, budget, write_tuned_into)
    log(f"done: {out / 'results.md'}, {out / 'converge.csv'}, figures; tuned files: "
        + (", ".join(str(p) for p in written) or "none"))
    return 0
