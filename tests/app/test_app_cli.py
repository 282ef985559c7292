"""The app as a user types it: ``python train.py ...`` in a subprocess."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.app.helpers import FAST, GROUP_OPTIONS, run_cli

QUIET = [*FAST, "num_threads=1"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _job_dirs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())


def test_structure_and_precision_from_the_command_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["structure=hierarchical", "precision=bf16", *QUIET, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(run_dir)
    assert results["status"] == "ok"
    assert (results["optimizer"], results["structure"], results["precision_config"]) == ("singd", "hierarchical(15,15)", "bf16")
    assert results["precision"] == "bf16-mixed"  # what the trainer ran
    assert "structure=hierarchical" in results["overrides"]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "csv" / "metrics.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing else in the cwd


def test_multirun_over_optimizers(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", "optimizer=singd,adamw", *QUIET, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_dirs(sweep_dir) == ["0", "1"]  # Hydra's numbered job directories
    assert [_results(sweep_dir / job)["optimizer"] for job in ("0", "1")] == ["singd", "adamw"]
    assert all(_results(sweep_dir / job)["status"] == "ok" for job in ("0", "1"))


@pytest.mark.parametrize("entry", ["train.py", "singd-train"])
def test_unknown_option_prints_the_valid_ones(entry: str, tmp_path: Path) -> None:
    command = None
    if entry == "singd-train":  # the console script finds conf/ too (editable install)
        script = shutil.which("singd-train")
        if script is None:
            pytest.skip("singd-train is not installed (pip install -e .)")
        command = [script]
    proc = run_cli(["optimizer=adam"], cwd=tmp_path, command=command)
    assert proc.returncode != 0
    assert "Could not find 'optimizer/adam'" in proc.stderr
    assert "Available options in 'optimizer':" in proc.stderr
    for option in GROUP_OPTIONS["optimizer"]:
        assert f"\t{option}\n" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_run_exits_nonzero_with_results(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["data=cifar100", f"paths.data_dir={tmp_path / 'none'}", "data.download=false", *QUIET,
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    results = _results(run_dir)
    assert results["status"] == "failed" and "CIFAR-100 not found" in results["error"]


def test_wandb_offline_without_an_account_one_run_per_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {"HOME": str(tmp_path / "home"), "WANDB_DIR": str(tmp_path / "wandb_dir"), "NETRC": str(tmp_path / "no_netrc"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_API_KEY": "", "WANDB_MODE": ""}  # fmt: skip
    proc = run_cli(["-m", "logger=wandb", "optimizer=singd,adamw", *QUIET, f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [list((sweep_dir / job / "wandb").glob("offline-run-*")) for job in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1]  # offline (no API key), one W&B run per job
    assert runs[0][0].name.split("-")[-1] != runs[1][0].name.split("-")[-1]
    assert "wandb sync" in (sweep_dir / "0" / "train.log").read_text()


def test_ddp_multirun_keeps_one_directory_per_job(tmp_path: Path) -> None:
    """DDP child processes must reuse their job's directory, in every job of a sweep."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "optimizer=adamw,sgd", *[a for a in QUIET if a != "trainer=cpu"], "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.sync_batchnorm=false", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_dirs(sweep_dir) == ["0", "1"]
    for job in ("0", "1"):
        assert _results(sweep_dir / job)["status"] == "ok"
        assert (sweep_dir / job / "train_ddp_process_1.log").exists()  # rank 1 ran here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray outputs/ or multirun/


def test_optuna_random_search(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["hparams_search=adamw", "hydra.sweeper.n_trials=2", *QUIET, f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_dirs(sweep_dir) == ["0", "1"]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "optimizer.eps"}
    assert 0.0 <= best["best_value"] <= 1.0
    lrs = {_results(sweep_dir / job)["overrides"][0] for job in ("0", "1")}
    assert len(lrs) == 2  # two different random samples
