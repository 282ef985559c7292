"""The paper suites of the runner: the commands a GPU user runs (dry run) for every
suite, that they compose, and the report in the paper's table layout with the authors'
draft of Fig. 1 as reference rows."""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.helpers import compose_cfg
from tests.experiments.test_runner import RUNNER, runner

SUITE_MODELS = {
    "cifar100": ("vgg", "convmixer", "cct", "swin", "gcvit", "repvit", "hdvt"),
    "imagewoof10": ("vgg", "convmixer", "cct", "swin", "gcvit", "repvit", "hdvt"),
    "cora": ("gcn",),
    "imagenet100": ("vit",),
}


def _dry_run(args: list[str], cwd: Path) -> list[list[str]]:
    proc = subprocess.run([sys.executable, str(RUNNER), *args, "--dry-run"], capture_output=True, text=True,
                          timeout=120, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def test_the_documented_dry_run_prints_the_exact_commands(tmp_path: Path) -> None:
    commands = _dry_run(["--suite", "cifar100", "--models", "vgg", "--limit", "2"], tmp_path)
    out = tmp_path / "results" / "cifar100"  # --out defaults to results/<suite>
    common = ["experiment=cifar100_vgg", "trainer=gpu", "logger=csv", "callbacks.rich_progress_bar=null",
              "trainer.enable_progress_bar=false"]  # fmt: skip
    assert commands == [
        [sys.executable, str(runner.TRAIN), "optimizer=sgd", "precision=fp32", *common,
         f"hydra.run.dir={out / 'runs' / 'sgd_vgg_fp32'}"],
        [sys.executable, str(runner.TRAIN), "optimizer=adamw", "precision=fp32", *common,
         f"hydra.run.dir={out / 'runs' / 'adamw_vgg_fp32'}"],
    ]  # fmt: skip
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize("suite", ["cora", "imagenet100"])
def test_graph_and_imagenet_suites_dry_run(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert runner.main(["--suite", suite, "--out", str(tmp_path), "--dry-run"]) == 0
    commands = [shlex.split(c) for c in capsys.readouterr().out.strip().splitlines()]
    (model,) = SUITE_MODELS[suite]
    assert len(commands) == 2 * 8  # fp32/bf16 x (SGD, AdamW, KFAC, IKFAC, INGD, SINGD x 3 structures)
    assert all(f"experiment={suite}_{model}" in c and "trainer=gpu" in c for c in commands)
    optimizers = [next(a for a in c if a.startswith("optimizer=")) for c in commands[:8]]
    expected = ("sgd", "adamw", "kfac", "ikfac", "ingd", "singd", "singd", "singd")
    assert optimizers == [f"optimizer={o}" for o in expected]
    assert [c[3] for c in (commands[0], commands[8])] == ["precision=fp32", "precision=bf16"]


@pytest.mark.parametrize("suite", list(SUITE_MODELS))
def test_every_suite_command_composes(suite: str, tmp_path: Path) -> None:
    args = runner.parse_args(["--suite", suite, "--out", str(tmp_path), "--optimizers", "singd",
                              "--structures", "hierarchical", "--precisions", "bf16"])  # fmt: skip
    jobs = runner.suite_jobs(args)
    assert [j.model for j in jobs] == list(SUITE_MODELS[suite])
    for job in jobs:
        cfg = compose_cfg(runner.job_command(job, tmp_path, [], sys.executable)[2:])
        assert cfg.data.name == {"imagewoof10": "imagewoof"}.get(suite, suite)
        assert cfg.task_name == f"{suite}_{job.model}"
        assert cfg.trainer.accelerator == "gpu" and cfg.precision.name == "bf16"


def test_models_outside_the_suite_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--suite", "cora", "--models", "vgg", "gcn", "--dry-run"])
    assert "--models: vgg not in the cora suite; choose from gcn." in capsys.readouterr().err


def test_missing_experiment_config_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "EXPERIMENT_DIR", tmp_path)
    (tmp_path / "cifar100_vgg.yaml").write_text("")
    with pytest.raises(FileNotFoundError, match=r"cifar100_swin\.yaml"):
        runner.paper_jobs("cifar100", ["vgg", "swin"], ["diagonal"], ["fp32"])


def test_job_rows_keep_the_suite_keys(tmp_path: Path) -> None:
    """The tables' keys stay the job's options (``vgg``, ``imagewoof10``), results.json's
    model name goes to ``model_name``; a job that leaves no results.json is still under
    its data set."""
    # a stand-in for the interpreter: the SGD job fails, the others write a results.json
    result = json.dumps({"status": "ok", "test_acc": 0.75, "model": "vgg16", "data": "imagewoof",
                         "precision": "bf16-mixed", "peak_memory_mb": 2000.0})  # fmt: skip
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/bin/sh\nfor a in \"$@\"; do case $a in hydra.run.dir=*) dir=${a#hydra.run.dir=};; esac; done\n"
        f"case $dir in */sgd_*) exit 1;; esac\ncat > \"$dir/results.json\" <<'EOF'\n{result}\nEOF\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    jobs = runner.paper_jobs("imagewoof10", ["vgg"], ["diagonal"], ["bf16"])
    ok, failed = jobs[-1], jobs[0]
    assert (ok.optimizer, failed.optimizer) == ("singd", "sgd")
    row = runner.run_job(ok, tmp_path / "out", [], str(fake), timeout=60)
    assert (row["status"], row["model"], row["model_name"], row["data"]) == ("ok", "vgg", "vgg16", "imagewoof10")
    assert (row["precision"], row["trainer_precision"]) == ("bf16", "bf16-mixed")
    assert row["test_err"] == pytest.approx(0.25)
    row = runner.run_job(failed, tmp_path / "out", [], str(fake), timeout=60)
    assert (row["status"], row["data"], row["model"]) == ("failed", "imagewoof10", "vgg")


def _row(label: str, optimizer: str, precision: str, acc: float | None, memory_mb: float | None,
         wall_s: float | None, model: str = "vgg", status: str = "ok") -> dict:  # fmt: skip
    return {"job": f"{label}_{model}_{precision}", "label": label, "optimizer": optimizer, "model": model,
            "precision": precision, "data": "cifar100", "status": status, "test_acc": acc,
            "test_err": None if acc is None else 1 - acc, "peak_memory_mb": memory_mb, "wall_time_s": wall_s,
            "memory_kind": "cuda_max_allocated", "run_dir": "/nonexistent"}  # fmt: skip


def test_report_in_the_paper_layout_with_the_draft_of_fig1() -> None:
    gib = 1e9 / 2**20  # MiB per GB: 1 GB shows as 1.00
    rows = [
        _row("KFAC", "kfac", "fp32", 0.70, 4.3 * gib, 75 * 60),
        _row("KFAC", "kfac", "bf16", None, 3.0 * gib, 10 * 60, status="diverged"),
        _row("SINGD-Diag", "singd", "fp32", 0.74, 3.7 * gib, 33 * 60),
        _row("SINGD-Diag", "singd", "bf16", 0.75, 2.7 * gib, 36 * 60),
        _row("SINGD-Hier", "singd", "bf16", 0.752, 2.8 * gib, 37 * 60),
        _row("AdamW", "adamw", "bf16", 0.6, 2.0 * gib, 30 * 60),
        _row("SINGD-Diag", "singd", "bf16", 0.5, 1.0 * gib, 60, model="cct"),
    ]
    report = runner.markdown_report(rows, "cifar100")
    # the paper's layout: per data set, rows optimizers, columns model x precision
    assert "## cifar100: test error (%) / peak memory (GB) / wall time (min)" in report
    assert "| optimizer | vgg fp32 | vgg bf16 | cct bf16 |" in report
    assert "| KFAC | 30.0 / 4.30 / 75.0 | diverged / 3.00 / 10.0 |  |" in report
    assert "| SINGD-Diag | 26.0 / 3.70 / 33.0 | 25.0 / 2.70 / 36.0 | 50.0 / 1.00 / 1.0 |" in report
    assert "| SINGD-Hier |  | 24.8 / 2.80 / 37.0 |  |" in report
    assert report.index("| AdamW | ") < report.index("| KFAC | ") < report.index("| SINGD-Diag | ")
    # the reference: each optimizer of the draft, labelled as such, above our runs of it
    reference = report[report.index("### Reference: the authors' draft of Fig. 1"):report.index("## All jobs")]
    assert "f-dangel/singd, `plots/cache/fig1_best_runs.npy`" in reference and "pre-publication draft" in reference
    assert "| optimizer | vgg fp32 | vgg bf16 |" in reference
    assert "| KFAC (draft of Fig. 1) | 28.8 / 4.25 / 71.3 | 48.6 / 3.18 / 61.5 |" in reference
    assert "| IKFAC (draft of Fig. 1) | 28.2 / 4.70 / 50.1 | 27.9 / 3.23 / 35.2 |" in reference
    assert "| INGD (draft of Fig. 1) | 25.3 / 5.24 / 52.7 | 24.9 / 3.50 / 37.4 |" in reference
    assert "| SINGD (draft of Fig. 1) | 25.9 / 3.75 / 32.9 | 25.0 / 2.72 / 35.6 |" in reference
    lines = reference.splitlines()
    kfac = lines.index("| KFAC (draft of Fig. 1) | 28.8 / 4.25 / 71.3 | 48.6 / 3.18 / 61.5 |")
    assert lines[kfac + 1] == "| KFAC | 30.0 / 4.30 / 75.0 | diverged / 3.00 / 10.0 |"
    singd = lines.index("| SINGD (draft of Fig. 1) | 25.9 / 3.75 / 32.9 | 25.0 / 2.72 / 35.6 |")
    assert lines[singd + 1: singd + 3] == ["| SINGD-Diag | 26.0 / 3.70 / 33.0 | 25.0 / 2.70 / 36.0 |",
                                           "| SINGD-Hier |  | 24.8 / 2.80 / 37.0 |"]  # fmt: skip
    assert "AdamW" not in reference and "cct" not in reference  # the draft has neither
    # the draft's test accuracies (%), to the digit the draft's figure shows
    assert {o: tuple(round(d[p][0], 1) for p in ("fp32", "bf16")) for o, d in runner.DRAFT_FIG1.items()} == {
        "kfac": (71.2, 51.4), "ikfac": (71.8, 72.1), "ingd": (74.7, 75.1), "singd": (74.1, 75.0)}


def test_no_reference_without_vgg_on_cifar100() -> None:
    rows = [_row("SINGD-Diag", "singd", "bf16", 0.5, 1000.0, 60, model="cct")]
    assert "draft of Fig. 1" not in runner.markdown_report(rows, "cifar100")
    rows = [{**_row("SINGD-Diag", "singd", "bf16", 0.5, 1000.0, 60), "data": "imagewoof10"}]
    assert "draft of Fig. 1" not in runner.markdown_report(rows, "imagewoof10")
