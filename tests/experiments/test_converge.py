"""The converge suite (experiments/converge.py through experiments/run.py): the quick
run end to end, the report on fabricated runs (steps to target, mean ± std, missing,
diverged and failed runs), the tuned-file writer and the choice of what can run."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.experiments.test_runner import PNG, REPO, RUNNER, runner

converge = runner.converge
CONF = REPO / "singd_lightning" / "conf"
MLP = next(w for w in converge.WORKLOADS if w.name == "mnist1d-mlp")
METHOD = {m.label: m for m in converge.METHODS}


def _tree(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.yaml"))}


def test_quick_suite_end_to_end(tmp_path: Path) -> None:
    shipped = _tree(CONF / "tuned")
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(RUNNER), "--suite", "converge", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "estimated" in proc.stdout.splitlines()[0]
    with open(out / "converge.csv") as f:
        rows = list(csv.DictReader(f))
    for method in ("AdamW", "SINGD-diag"):
        mine = [r for r in rows if r["method"] == method]
        assert sorted(r["phase"] for r in mine) == ["bf16", "bf16", "fp32", "fp32", "search", "search"], mine
        assert all(r["status"] == "ok" and r["workload"] == "mnist1d-mlp" for r in mine), mine
        assert sorted(r["seed"] for r in mine if r["phase"] == "fp32") == ["0", "1"]
        assert sorted(r["seed"] for r in mine if r["phase"] == "bf16") == ["0", "1"]
        assert {r["precision"] for r in mine if r["phase"] != "search"} == {"fp32", "bf16"}
        searched = {json.dumps(sorted(json.loads(r["params"]))) for r in mine if r["phase"] == "search"}
        assert '"optimizer.lr"' in searched.pop()  # the trials' sampled values are recorded
        for r in mine:
            assert 0 < float(r["test_metric"]) <= 1 and float(r["optimizer_state_mb"]) > 0
            assert float(r["global_step"]) == 10  # quick: 1 epoch of 10 batches
    # one process for the search (2 trials), one for the final runs (2 precisions x 2 seeds)
    for slug in ("adamw", "singd_diag"):
        for phase, jobs in (("search", 2), ("fp32_bf16", 4)):
            assert len(converge.job_dirs(out / "runs" / "mnist1d-mlp" / slug / phase)) == jobs
    report = (out / "results.md").read_text()
    assert "## mnist1d-mlp (`data=mnist1d model=mlp`): target val/acc ≥ 0.6" in report
    assert "| AdamW | " in report and "| SINGD-diag | " in report
    assert (out / "converge_mnist1d-mlp.png").read_bytes().startswith(PNG)
    # the best settings go to OUT/tuned (AdamW tunes, a SINGD-diag variant does not); the shipped ones stay
    assert [p.name for p in (out / "tuned").iterdir()] == ["mnist1d_adamw.yaml"]
    assert "optimizer" in OmegaConf.load(out / "tuned" / "mnist1d_adamw.yaml")
    assert _tree(CONF / "tuned") == shipped
    # --report-only rebuilds the same report from the runs on disk
    before = (out / "converge.csv").read_text()
    for name in ("converge.csv", "results.md", "converge_mnist1d-mlp.png"):
        (out / name).unlink()
    assert runner.main(["--suite", "converge", "--quick", "--out", str(out), "--report-only"]) == 0
    assert (out / "results.md").read_text() == report
    assert sorted((out / "converge.csv").read_text().splitlines()) == sorted(before.splitlines())
    assert (out / "converge_mnist1d-mlp.png").read_bytes().startswith(PNG)


def test_report_only_needs_a_finished_suite(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--report-only needs a finished converge suite"):
        runner.main(["--suite", "converge", "--out", str(tmp_path), "--report-only"])


def test_dry_run_prints_one_search_process_per_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert runner.main(["--suite", "converge", "--out", str(tmp_path), "--dry-run", "--workloads", "digits-vgg",
                        "--methods", "AdamW", "SINGD-hier", "--trials", "3"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("converge: 1 workloads x 2 methods, 3 trials") and "estimated" in lines[0]
    commands = [line for line in lines if "train.py" in line]
    assert len(commands) == 2
    assert "hparams_search=singd" in commands[1] and "structure=hierarchical" in commands[1]
    for command in commands:
        assert " -m " in command and "hydra.sweeper.n_trials=3" in command and "~tuned=null" in command
        assert "data=digits model=vgg_small" in command and "trainer.max_epochs=10" in command
    assert not (tmp_path / "runs").exists()


def test_bad_trials_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--trials must be >= 1, got 0"):
        runner.main(["--suite", "converge", "--out", str(tmp_path), "--dry-run", "--trials", "0"])


# ------------------------------------------------------------------ records and report


def test_steps_to_target_is_the_first_validation_that_reaches_it() -> None:
    curve = [(20, 1.0, 0.5), (40, 2.1, 0.96), (60, 3.0, 0.94), (80, 4.2, 0.97)]
    assert converge.to_target(curve, 0.95, "max") == (40, 2.1)
    assert converge.to_target(curve, 0.99, "max") is None
    losses = [(10, 0.5, 4.0), (20, 1.0, 3.1), (30, 1.5, 2.9)]
    assert converge.to_target(losses, 3.0, "min") == (30, 1.5)
    assert converge.to_target([], 3.0, "min") is None
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'up'"):
        converge.to_target(curve, 0.9, "up")


def test_curve_reads_steps_and_time_from_the_row_of_the_metric(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/acc,perf/train_steps,perf/train_time_s\n"
        "0,9,2.3,,,\n"
        "0,19,,0.5,20,1.5\n"
        "1,39,,0.9,40,3.0\n"
        "2,59,,nan,60,4.5\n"  # a non-finite value is no point
    )
    assert converge.read_curve(tmp_path, "val/acc") == [(20, 1.5, 0.5), (40, 3.0, 0.9)]
    assert converge.read_curve(tmp_path / "missing", "val/acc") == []


def test_mean_std() -> None:
    assert converge.mean_std([]) is None
    assert converge.mean_std([3.0]) == (3.0, 0.0)
    mean, std = converge.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)


def _run(method: str, phase: str, status: str = "ok", steps: int | None = None, seconds: float | None = None,
         test: float | None = None, trial: str = "0", best: float | None = None, params: dict | None = None,
         seed: int | None = 0) -> dict:  # fmt: skip
    return {"workload": "mnist1d-mlp", "method": method, "optimizer": METHOD[method].optimizer, "phase": phase,
            "precision": "fp32" if phase == "search" else phase, "seed": seed, "trial": trial, "status": status,
            "error": None, "params": params or {}, "best_metric": best, "steps_to_target": steps,
            "time_to_target_s": seconds, "test_metric": test, "optimizer_state_mb": 0.25, "global_step": 550.0,
            "curve": [] if steps is None else [(steps, seconds, 0.65)], "run_dir": "x"}  # fmt: skip


def _fabricated() -> list[dict]:
    return [
        # AdamW: 3/3 reach the target in fp32; bf16: one diverges, two finish without reaching it
        _run("AdamW", "search", trial="0", best=0.55, params={"optimizer.lr": 0.001}),
        _run("AdamW", "search", trial="1", best=0.70, params={"optimizer.lr": 0.003}),
        _run("AdamW", "search", "diverged", trial="2", params={"optimizer.lr": 0.5}),
        _run("AdamW", "fp32", steps=100, seconds=1.0, test=0.70, seed=0),
        _run("AdamW", "fp32", steps=200, seconds=2.0, test=0.72, seed=1),
        _run("AdamW", "fp32", steps=300, seconds=3.0, test=0.74, seed=2),
        _run("AdamW", "bf16", "diverged", seed=0),
        _run("AdamW", "bf16", test=0.5, seed=1),
        _run("AdamW", "bf16", test=0.6, seed=2),
        # KFAC: 2 of 3 reach it; bf16 fails entirely
        _run("KFAC", "search", trial="0", best=0.8, params={"optimizer.lr": 0.01}),
        _run("KFAC", "fp32", steps=50, seconds=0.5, test=0.8, seed=0),
        _run("KFAC", "fp32", steps=70, seconds=0.9, test=0.8, seed=1),
        _run("KFAC", "fp32", test=0.5, seed=2),
        _run("KFAC", "bf16", "failed", seed=0),
        # SGD: every search trial diverged, so no final runs
        _run("SGD", "search", "diverged", trial="0"),
    ]


def test_report_cells_on_fabricated_runs() -> None:
    rows = _fabricated()
    adamw = converge.summarize([r for r in rows if r["method"] == "AdamW" and r["phase"] == "fp32"])
    assert converge.to_target_cell(adamw, "steps", ".0f") == "200 ± 100"
    assert converge.test_cell(adamw, ".2f") == "0.72 ± 0.02"
    adamw_bf16 = converge.summarize([r for r in rows if r["method"] == "AdamW" and r["phase"] == "bf16"])
    assert converge.to_target_cell(adamw_bf16, "steps", ".0f") == "not reached (1 diverged)"
    assert converge.test_cell(adamw_bf16, ".2f") == "0.55 ± 0.07 (1 diverged)"
    kfac = converge.summarize([r for r in rows if r["method"] == "KFAC" and r["phase"] == "fp32"])
    assert converge.to_target_cell(kfac, "steps", ".0f") == "60 ± 14 (2/3)"
    assert converge.to_target_cell(kfac, "seconds", ".1f") == "0.7 ± 0.3 (2/3)"
    kfac_bf16 = converge.summarize([r for r in rows if r["method"] == "KFAC" and r["phase"] == "bf16"])
    assert converge.to_target_cell(kfac_bf16, "steps", ".0f") == "1 failed"
    assert converge.test_cell(kfac_bf16, ".2f") == "1 failed"
    assert converge.to_target_cell(converge.summarize([]), "steps", ".0f") == "–"


def test_markdown_shows_every_outcome(tmp_path: Path) -> None:
    rows = _fabricated()
    methods = [METHOD[m] for m in ("AdamW", "SGD", "KFAC", "SINGD-diag")]
    budget = converge.Budget(trials=3, seeds=3, bf16_seeds=3)
    report = converge.markdown(rows, [MLP], methods, budget, notes=["method X left out: no Y"])
    assert "target val/acc ≥ 0.6" in report and "- method X left out: no Y" in report
    assert "3 trials" in report and "3 seed(s) in fp32 and 3 in bf16" in report
    lines = {line.split(" | ")[0]: line for line in report.splitlines() if line.startswith("| ")}
    assert lines["| AdamW"] == ("| AdamW | 200 ± 100 | 2.0 ± 1.0 | 0.7200 ± 0.0200 | not reached (1 diverged) "
                                "| not reached (1 diverged) | 0.5500 ± 0.0707 (1 diverged) | 0.250 | lr=0.003 "
                                "| 0.7000 (3 trials) |")
    assert lines["| KFAC"].startswith("| KFAC | 60 ± 14 (2/3) | 0.7 ± 0.3 (2/3) | 0.7000 ± 0.1732 | 1 failed |")
    assert lines["| SGD"] == "| SGD | – | – | – | – | – | – | – | – | no usable trial (1 trials) |"
    assert "| SINGD-diag" not in lines  # not run: no row
    converge.write_report(rows, tmp_path, [MLP], methods, budget)
    assert (tmp_path / "converge_mnist1d-mlp.png").read_bytes().startswith(PNG)
    with open(tmp_path / "converge.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows) and json.loads(saved[1]["params"]) == {"optimizer.lr": 0.003}


def test_best_trial_skips_diverged_and_breaks_ties_by_order() -> None:
    rows = [_run("AdamW", "search", "diverged", trial="0", best=0.99), _run("AdamW", "search", trial="1", best=0.7),
            _run("AdamW", "search", trial="2", best=0.7), _run("AdamW", "search", trial="3", best=0.2)]  # fmt: skip
    assert converge.best_trial(rows, "max")["trial"] == "1"
    assert converge.best_trial(rows, "min")["trial"] == "3"
    assert converge.best_trial(rows[:1], "max") is None


# ------------------------------------------------------------------ tuned files
def test_one_tuning_method_per_optimizer_and_singd_tunes_with_its_fixed_options() -> None:
    tuning = [m for m in converge.METHODS if m.tunes]
    assert len({m.optimizer for m in tuning}) == len(tuning)
    singd = next(m for m in tuning if m.optimizer == "singd")
    params = converge.tuned_params(singd, {"params": {"optimizer.lr": 0.01}})
    assert params == {"optimizer.lr": 0.01, "optimizer.factor_init": "warm", "optimizer.kl_clip": 0.001}
    comment = converge.tuned_comment(MLP, singd, converge.FULL, {"best_metric": 0.7})
    assert comment[-1] == "The variant's fixed options are part of the setting: optimizer.factor_init=warm optimizer.kl_clip=0.001."
    # INGD is tuned in the paper's mode, and its file says so (null is YAML's None).
    ingd = next(m for m in tuning if m.optimizer == "ingd")
    params = converge.tuned_params(ingd, {"params": {"optimizer.lr": 0.01}})
    assert params == {"optimizer.lr": 0.01, "optimizer.factor_init": "identity", "optimizer.kl_clip": None}
    text = converge.tuned_file_text(params, [])
    assert OmegaConf.to_container(OmegaConf.create(text))["optimizer"]["kl_clip"] is None




def test_tuned_file_writer(tmp_path: Path) -> None:
    best = {"params": {"optimizer.lr": 0.01234, "optimizer.damping": 0.001}, "best_metric": 0.71}
    method = converge.Method("SINGD-hier+warm", "singd", ("structure=hierarchical", "optimizer.factor_init=warm",
                                                          "optimizer.T=5"))  # fmt: skip
    params = converge.tuned_params(method, best)
    # the fixed optimizer options of the variant go in, its group choice cannot
    assert params == {"optimizer.lr": 0.01234, "optimizer.damping": 0.001, "optimizer.factor_init": "warm",
                      "optimizer.T": 5}  # fmt: skip
    budget = converge.Budget(trials=8, seeds=3, bf16_seeds=1)
    path = converge.write_tuned(tmp_path / "tuned", "mnist1d", "singd", params,
                                converge.tuned_comment(MLP, method, budget, best))  # fmt: skip
    assert path == tmp_path / "tuned" / "mnist1d_singd.yaml"
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    assert "python experiments/run.py --suite converge --out DIR --write-tuned" in text
    assert f"8 trials of {MLP.epochs} epoch(s)" in text and "default structure (hierarchical)" in text
    assert OmegaConf.to_container(OmegaConf.load(path)) == {
        "optimizer": {"lr": 0.01234, "damping": 0.001, "factor_init": "warm", "T": 5}}
    with pytest.raises(ValueError, match="params key 'lr' must be dotted"):
        converge.write_tuned(tmp_path / "bad", "mnist1d", "adamw", {"lr": 0.1}, [])
    with pytest.raises(ValueError, match="params must set at least one value"):
        converge.write_tuned(tmp_path / "bad", "mnist1d", "adamw", {}, [])
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_tuned_files_come_from_the_tuning_workload_and_method(tmp_path: Path) -> None:
    cnn = next(w for w in converge.WORKLOADS if w.name == "mnist1d-cnn1d")
    rows = [_run("AdamW", "search", best=0.7, params={"optimizer.lr": 0.003}),
            _run("SINGD-diag", "search", best=0.8, params={"optimizer.lr": 0.03})]  # fmt: skip
    rows += [dict(r, workload=cnn.name) for r in rows]
    methods = [METHOD["AdamW"], METHOD["SINGD-diag"]]
    budget = converge.Budget(trials=1, seeds=1, bf16_seeds=1)
    written = converge.write_tuned_files(rows, [MLP, cnn], methods, budget, tmp_path)
    # MNIST-1D's files come from the MLP; SINGD's from the default structure, not diagonal
    assert written == [tmp_path / "mnist1d_adamw.yaml"]
    assert "on `data=mnist1d model=mlp`" in written[0].read_text()


# ------------------------------------------------------------------ what runs


def test_missing_configs_and_options_leave_workloads_and_methods_out(tmp_path: Path) -> None:
    (tmp_path / "optimizer").mkdir()
    # a SINGD config from before the KL clip: every SINGD variant pins kl_clip
    (tmp_path / "optimizer" / "singd.yaml").write_text("name: singd\nlr: 0.001\nfactor_init: identity\n")
    (tmp_path / "optimizer" / "adamw.yaml").write_text("name: adamw\nlr: 0.001\n")
    budget = converge.Budget(trials=1, seeds=1, bf16_seeds=1, workloads=("mnist1d-mlp", "text-gpt"),
                             methods=("AdamW", "SINGD-hier", "SINGD-hier+warm"))  # fmt: skip
    workloads, methods, notes = converge.select(budget, conf=tmp_path)
    assert [w.name for w in workloads] == ["mnist1d-mlp"]
    assert [m.label for m in methods] == ["AdamW"]
    assert "workload text-gpt left out: no conf/experiment/text_gpt.yaml" in notes[0]
    assert notes[1:] == [f"method {label} left out: no optimizer option 'kl_clip' of optimizer=singd"
                         for label in ("SINGD-hier", "SINGD-hier+warm")]  # fmt: skip
    with pytest.raises(ValueError, match="workload 'cifar' does not exist; choose from digits-vgg, "):
        converge.select(converge.Budget(1, 1, 1, workloads=("cifar",)), conf=tmp_path)
    with pytest.raises(ValueError, match="method 'Adam' does not exist; choose from AdamW, "):
        converge.select(converge.Budget(1, 1, 1, methods=("Adam",)), conf=tmp_path)


def test_every_method_searches_an_existing_space_and_every_workload_fits_the_budget() -> None:
    for method in converge.METHODS:
        keys = converge.search_space(method.optimizer, CONF)
        assert "optimizer.lr" in keys and "optimizer.weight_decay" in keys, method.label
    # about an hour on 2 cores, 2 jobs side by side, with every workload and variant
    seconds = converge.estimate_seconds(converge.WORKLOADS, converge.METHODS, converge.FULL, jobs=2)
    assert 40 * 60 <= seconds <= 65 * 60


def test_final_runs_share_a_process_when_their_seeds_match() -> None:
    assert converge.final_groups(converge.Budget(1, seeds=3, bf16_seeds=3)) == [(("fp32", "bf16"), 3)]
    assert converge.final_groups(converge.Budget(1, seeds=3, bf16_seeds=1)) == [(("fp32",), 3), (("bf16",), 1)]
    assert converge.final_groups(converge.Budget(1, seeds=2, bf16_seeds=0)) == [(("fp32",), 2)]
    command = converge.final_command(MLP, METHOD["SINGD-diag"], converge.QUICK, {"optimizer.lr": 0.01},
                                     ("fp32", "bf16"), 3, Path("d"))  # fmt: skip
    assert "precision=fp32,bf16" in command and "seed=0,1,2" in command and "optimizer.lr=0.01" in command


def test_a_crashed_process_leaves_failed_rows_for_its_missing_runs() -> None:
    done = [_run("AdamW", "fp32", seed=0)]
    missing = converge._missing_runs(Path("d"), MLP, METHOD["AdamW"], ("fp32", "bf16"), 2, done, "boom")
    assert [(r["precision"], r["seed"], r["status"], r["error"]) for r in missing] == [
        ("fp32", 1, "failed", "boom"), ("bf16", 0, "failed", "boom"), ("bf16", 1, "failed", "boom")]
