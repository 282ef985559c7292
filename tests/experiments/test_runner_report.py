"""The runner's figures and W&B report: one colour per optimizer, no missing value drawn
as 0, legends outside the data, a memory figure that tells optimizers apart, the real
defaults in ``--help``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

from tests.experiments.test_runner import runner

matplotlib.use("Agg")


def _metrics(run_dir: Path, errors: list[float]) -> None:
    (run_dir / "csv").mkdir(parents=True)
    lines = ["epoch,epoch_test/acc"] + [f"{e},{1 - err}" for e, err in enumerate(errors)]
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def _rows(tmp_path: Path, gpu: bool) -> list[dict]:
    kind = "cuda_max_allocated" if gpu else "cpu_peak_rss"
    rows = []
    for job, (label, optimizer, model, status, state) in enumerate([
        ("SINGD-Diag", "singd", "vgg", "ok", 1.5), ("SINGD-Hier", "singd", "vgg", "ok", 2.5),
        ("AdamW", "adamw", "vgg", "ok", 3.0), ("KFAC", "kfac", "vgg", "failed", None),
        ("SINGD-Diag", "singd", "cct", "ok", 0.5), ("AdamW", "adamw", "cct", "ok", 1.0),
    ]):  # fmt: skip
        run_dir = tmp_path / str(job)
        if status == "ok":
            _metrics(run_dir, [0.5, 0.4])
        rows.append({"job": str(job), "label": label, "optimizer": optimizer, "model": model, "precision": "bf16",
                     "data": "cifar100", "status": status, "optimizer_state_mb": state,
                     "peak_memory_mb": None if state is None else 900.0 + job, "memory_kind": kind,
                     "run_dir": str(run_dir)})  # fmt: skip
    return rows


def _legend_is_outside(fig, ax) -> None:
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend is not None
    box = legend.get_window_extent().transformed(ax.transAxes.inverted())
    assert box.x0 >= 1.0  # right of the axes: it hides no data


def test_one_colour_per_optimizer_in_every_figure(tmp_path: Path) -> None:
    rows = _rows(tmp_path, gpu=True)
    figures = runner.make_figures(rows)
    assert set(figures) == {"test_error_cifar100_vgg_bf16.png", "test_error_cifar100_cct_bf16.png", "memory.png"}
    seen: dict[str, set] = {}
    for name, fig in figures.items():
        ax = fig.axes[0]
        if name.startswith("test_error"):
            drawn = [(line.get_label(), line.get_color()) for line in ax.get_lines()]
        else:  # one bar container per label
            drawn = [(c.get_label(), c.patches[0].get_facecolor()) for c in ax.containers if c.patches]
        for label, color in drawn:
            seen.setdefault(label.split(" (")[0], set()).add(matplotlib.colors.to_hex(color))
        _legend_is_outside(fig, fig.axes[-1])
    assert all(len(colours) == 1 for colours in seen.values()), seen
    singd = {matplotlib.colors.to_hex(runner.OPTIMIZER_COLORS["singd"])}
    assert seen["SINGD-Diag"] == seen["SINGD-Hier"] == singd  # same optimizer, same colour
    styles = runner.label_styles(rows)
    assert styles["SINGD-Diag"]["linestyle"] != styles["SINGD-Hier"]["linestyle"]  # told apart by style
    assert styles == runner.label_styles(list(reversed(rows)))  # independent of the job order
    assert seen["AdamW"] != seen["SINGD-Diag"]


def test_memory_figure_shows_optimizer_state_and_gpu_memory(tmp_path: Path) -> None:
    fig = runner.make_figures(_rows(tmp_path, gpu=True))["memory.png"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["optimizer state (MB)", "peak GPU memory (MB)"]
    state = fig.axes[0]
    heights = {c.get_label(): sorted(p.get_height() for p in c.patches) for c in state.containers}
    assert heights["SINGD-Diag"] == [0.5, 1.5] and heights["AdamW"] == [1.0, 3.0]
    assert heights["KFAC"] == []  # failed, no value: no bar, not a bar of height 0
    assert all(h > 0 for hs in heights.values() for h in hs)


def test_memory_figure_of_cpu_jobs_leaves_out_the_process_memory(tmp_path: Path) -> None:
    fig = runner.make_figures(_rows(tmp_path, gpu=False))["memory.png"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["optimizer state (MB)"]


def test_missing_test_error_is_not_drawn(tmp_path: Path) -> None:
    rows = _rows(tmp_path, gpu=False)
    fig = runner.make_figures(rows)["test_error_cifar100_vgg_bf16.png"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert len(lines["KFAC (failed)"].get_xdata()) == 0  # no log: in the legend, no point at 0
    assert list(lines["AdamW"].get_ydata()) == pytest.approx([50.0, 40.0])
    assert runner._number("") is None and runner._number("nan") is None and runner._number("2") == 2.0


def test_help_shows_the_real_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: diagonal block_diagonal hierarchical)" in text
    assert "(default: fp32 bf16)" in text and "(default: results/<suite>)" in text
    assert ("(default: the suite's: cifar100: vgg convmixer cct swin gcvit repvit hdvt; imagewoof10: vgg convmixer "
            "cct swin gcvit repvit hdvt; cora: gcn; imagenet100: vit)") in text
    assert "default: None" not in text


def test_report_goes_to_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    rows = _rows(tmp_path, gpu=True)
    out = tmp_path / "out"
    out.mkdir()
    plots = runner.report(rows, out, "cifar100")
    logged: dict = {}
    artifacts: list = []
    real_init = wandb.init

    def init(**kwargs):
        run = real_init(**kwargs)
        log, log_artifact = run.log, run.log_artifact
        monkeypatch.setattr(run, "log", lambda data, *a, **k: (logged.update(data), log(data, *a, **k))[1])
        monkeypatch.setattr(run, "log_artifact", lambda art, *a, **k: (artifacts.append(art), log_artifact(art, *a, **k))[1])
        return run

    monkeypatch.setattr(wandb, "init", init)
    run = runner.log_report_to_wandb(rows, out, "cifar100", plots, project="test")
    assert run.settings.mode == "offline"
    table = logged["results"]
    assert isinstance(table, wandb.Table) and table.columns == list(runner.CSV_COLUMNS) and len(table.data) == len(rows)
    assert {f"plots/{p.stem}" for p in plots} <= set(logged)
    report = next(a for a in artifacts if a.type == "report")
    names = {os.path.basename(name) for name in report.manifest.entries}
    assert {"results.csv", "results.md", "memory.png"} <= names
    assert list((out / "wandb").glob("offline-run-*"))
