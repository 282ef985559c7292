"""User errors end a run with one line, ``Error: <message>``, a non-zero exit and a
``results.json`` with ``status: failed``; bugs keep their traceback."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from singd_lightning.app import pipeline
from singd_lightning.app import train as app_train
from singd_lightning.app.errors import (
    USER_ERROR_EXIT,
    CheckpointError,
    ConfigError,
    UserError,
    one_line,
    user_error_message,
)
from singd_lightning.app.validation import check_checkpoint, validate_config
from singd_lightning.data import DATAMODULES, create_datamodule
from singd_lightning.data._common import split_indices
from tests.app.helpers import FAST, compose_cfg, run_cli

QUIET = [*FAST, "num_threads=1", "test=false", "eval_test_every_epoch=false"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _task_error(overrides: list[str], run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the Hydra task function on ``overrides``; return its one error line."""
    cfg = compose_cfg([*QUIET, *overrides], output_dir=run_dir)
    with pytest.raises(SystemExit) as exit_info:
        app_train._task(cfg)
    assert exit_info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# (overrides, a fragment of the one line); the first ones fail before anything is built.
USER_ERRORS = [
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= 1"),
    (["trainer.max_epochs=2.5"], "trainer.max_epochs must be an integer >= 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 (no epoch limit) would train forever"),
    (["trainer.max_epochs=-1", "trainer.max_steps=4"], "scheduler.T_max (the cosine schedule's length"),
    (["scheduler=warmup_cosine", "trainer.max_epochs=3", "scheduler.warmup_epochs=3"],
     "scheduler.warmup_epochs must be an integer in [0, scheduler.max_epochs=3), got 3."),
    (["trainer.limit_train_batches=abc"], "trainer.limit_train_batches must be null, a number"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches must be null, a number"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 trains nothing"),
    (["trainer.max_steps=0"], "trainer.max_steps must be -1"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be null or a number >= 0"),
    (["trainer.min_epochs=3"], "trainer.min_epochs (3) must not exceed trainer.max_epochs (1)"),
    (["label_smoothing=2"], "label_smoothing must be a number in [0.0, 1.0]"),
    (["seed=abc"], "seed must be an integer or null"),
    (["structure.K.name=${oops}"], "Interpolation key 'oops' not found"),  # fails in describe_run
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path '/nonexistent/last.ckpt' does not exist."),
    (["model.name=foo"], "Unknown model 'foo'. Valid names:"),
    (["+model.foo=1"], "model: VGG.__init__() got an unexpected keyword argument 'foo'"),
    (["data.batch_size=0"], "batch_size must be an integer >= 1, got 0."),
    (["trainer.accelerator=foo"], "You selected an invalid accelerator name"),  # Lightning's own check
    (["+trainer.foo=1"], "Trainer.__init__() got an unexpected keyword argument 'foo' (config key: trainer)"),
    (["data.image_size=0"], "image_size must be an integer >= 1, got 0. (config key: data)"),
    (["optimizer.lr=-1"], "lr must be a number in [0.0, inf), got -1."),
    (["optimizer.T=1.5"], "T must be an integer"),
    (["structure=block_diagonal", "structure.block_size=0"], "block_size must be a positive integer, got 0."),
    (["optimizer=adamw", "optimizer.lr=-1"], "Invalid learning rate: -1"),  # torch's check
]


@pytest.mark.parametrize(("overrides", "message"), USER_ERRORS, ids=[" ".join(o) for o, _ in USER_ERRORS])
def test_user_error_is_one_line_with_results(
    overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _task_error(overrides, tmp_path, capsys)
    assert message in line
    saved = _results(tmp_path)
    assert saved["status"] == "failed" and line == f"Error: {saved['error']}"
    assert saved["run_dir"] == str(tmp_path) and "Traceback" in saved["traceback"]


def test_missing_data_dir_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["data=cifar100", f"paths.data_dir={tmp_path / 'none'}", "data.download=false"]
    assert "CIFAR-100 not found" in _task_error(overrides, tmp_path / "run", capsys)
    assert _results(tmp_path / "run")["status"] == "failed"


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg, datamodule):
        return {}["missing"]  # a bug, not a user error

    monkeypatch.setattr(pipeline, "build_model", broken)
    with pytest.raises(KeyError):
        app_train._task(compose_cfg(QUIET, output_dir=tmp_path))
    saved = _results(tmp_path)
    assert saved["status"] == "failed" and saved["error"].startswith("KeyError") and "Traceback" in saved["traceback"]


def test_full_error_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="trainer.max_epochs must be"):
        app_train._task(compose_cfg([*QUIET, "trainer.max_epochs=abc"], output_dir=tmp_path))


def test_multirun_job_raises_a_compact_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep job's user error fails that job with Hydra's short report, no traceback."""
    monkeypatch.setattr(app_train, "_multirun", lambda: True)
    with pytest.raises(UserError, match="^Error: trainer.max_epochs must be") as info:
        app_train._task(compose_cfg([*QUIET, "trainer.max_epochs=abc"], output_dir=tmp_path))
    assert isinstance(info.value, CompactHydraException)


def test_cli_prints_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*QUIET, "trainer.max_epochs=abc", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == USER_ERROR_EXIT
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("INFO")]
    assert lines == ["Error: trainer.max_epochs must be an integer >= 1 (or -1 with trainer.max_steps), got 'abc'."]
    assert _results(run_dir)["status"] == "failed"


# ------------------------------------------------------------------ classification


def test_user_error_message_tells_validation_from_bugs() -> None:
    with pytest.raises(ValueError) as refused:
        create_datamodule("nope")  # a raise statement of the package: the user's
    names = ", ".join(sorted(DATAMODULES))
    assert user_error_message(refused.value) == f"Unknown data module 'nope'. Valid names: {names}"
    with pytest.raises(TypeError) as bug:
        split_indices("ten", 0.5, 0)  # type: ignore[arg-type]  # Python's own TypeError in our code
    assert user_error_message(bug.value) is None
    with pytest.raises(RuntimeError) as torch_error:
        torch.zeros(2) + torch.zeros(3)
    assert user_error_message(torch_error.value) is None
    assert user_error_message(KeyError("x")) is None
    with pytest.raises(Exception) as interpolation:
        OmegaConf.create({"a": "${b}"}).a
    assert user_error_message(interpolation.value) == "Interpolation key 'b' not found (config key: a)"


def test_one_line() -> None:
    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line("x" * 50, limit=20) == "x" * 16 + " ..."


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of one short run: vgg_small, SINGD with diagonal factors."""
    run_dir = tmp_path_factory.mktemp("ckpt")
    cfg = compose_cfg([*QUIET, "callbacks=with_checkpoint", "structure=diagonal"], output_dir=run_dir)
    assert pipeline.train(cfg)["status"] == "ok"
    return run_dir / "checkpoints" / "last.ckpt"


def test_check_checkpoint_names_ckpt_path(tmp_path: Path, checkpoint: Path) -> None:
    assert check_checkpoint(checkpoint) == checkpoint
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    corrupt = tmp_path / "corrupt.ckpt"
    with zipfile.ZipFile(checkpoint) as source, zipfile.ZipFile(corrupt, "w") as target:
        for item in source.infolist():  # the pickle replaced by junk, the tensors kept
            data = source.read(item)
            target.writestr(item, b"\x80\x02junk" if item.filename.endswith("data.pkl") else data)
    cases = {
        tmp_path / "missing.ckpt": "does not exist.",
        tmp_path: "is not a file.",
        empty: "is an empty file (0 bytes), not a checkpoint.",
        truncated: "is not a loadable checkpoint (corrupt, truncated or another format): PytorchStreamReader",
        garbage: "is not a loadable checkpoint (corrupt, truncated or another format):",
        corrupt: "is not a loadable checkpoint (corrupt, truncated or another format):",
        foreign: "is not a Lightning checkpoint: it holds no 'state_dict'.",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            check_checkpoint(path)
        text = str(info.value)
        assert text.startswith(f"ckpt_path '{path}' ") and message in text and "\n" not in text, text


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        (["model=convmixer_tiny", "structure=diagonal"], "Error(s) in loading state_dict for ImageClassifier"),
        (["optimizer=adamw"], "does not fit this run:"),
        (["structure=tril_toeplitz"], "does not fit this run:"),  # the optimizer refuses another layout
    ],
    ids=["other-model", "other-optimizer", "other-structure"],
)
def test_checkpoint_of_another_run_is_a_user_error(
    overrides: list[str], detail: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _task_error([*overrides, "trainer.max_epochs=2", f"ckpt_path={checkpoint}"], tmp_path, capsys)
    assert line.startswith(f"Error: ckpt_path '{checkpoint}' does not fit this run: ") and detail in line
    assert f"Error: {_results(tmp_path)['error']}" == line


def test_validate_config_accepts_the_defaults() -> None:
    validate_config(compose_cfg([]))
    validate_config(compose_cfg(["trainer.max_epochs=-1", "trainer.max_steps=10", "scheduler=constant"]))
