"""Shared helpers of the app tests: config composition, fast overrides, fake data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "singd_lightning" / "conf"
TRAIN_PY = REPO / "train.py"

#: Options of every config group: the app's command-line interface.
GROUP_OPTIONS: dict[str, set[str]] = {
    "optimizer": {"singd", "ingd", "ikfac", "kfac", "adamw", "sgd"},
    "structure": {
        "dense", "diagonal", "block_diagonal", "hierarchical", "tril", "triu", "tril_toeplitz",
        "triu_toeplitz", "tril_top_left_diagonal", "tril_bottom_right_diagonal",
        "triu_top_left_diagonal", "triu_bottom_right_diagonal",
    },
    "precision": {"fp32", "bf16", "bf16-fp32-factors", "bf16-true", "fp16"},
    "model": {"vgg", "convmixer", "cct", "swin", "vgg_small", "convmixer_tiny", "cct_tiny", "swin_nano", "timm",
              "mlp", "cnn1d", "gcvit", "repvit", "hdvt", "gcn", "vit", "gpt"},
    "data": {"cifar100", "imagewoof10", "digits", "mnist1d", "cora", "imagenet100", "text", "synthetic_cifar"},
    "trainer": {"default", "cpu", "gpu", "ddp", "fsdp"},
    "logger": {"csv", "wandb", "many_loggers"},
    "experiment": {
        f"{data}_{model}" for data in ("cifar100", "imagewoof10") for model in ("vgg", "convmixer", "cct", "swin", "gcvit", "repvit", "hdvt")
    } | {"cora_gcn", "imagenet100_vit", "text_gpt"},
    "hparams_search": {"singd", "ingd", "ikfac", "kfac", "adamw", "sgd"},
    "launcher": {"local", "slurm"},
    "scheduler": {"cosine", "constant", "multistep", "warmup_cosine"},
    "recipe": {"none", "paper"},
    "callbacks": {"default", "with_checkpoint"},
}  # fmt: skip

#: Overrides for a run of a few batches on a CPU, quiet.
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=16",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def group_options(group: str) -> set[str]:
    """Option names of a config group, from the files in conf/<group>/."""
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


def compose_cfg(overrides: Sequence[str] = (), output_dir: Path | None = None, hydra: bool = False) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``python train.py <overrides>`` would.

    Args:
        overrides: Command-line overrides.
        output_dir: Becomes ``paths.output_dir`` (normally Hydra's run directory).
        hydra: Also return the ``hydra`` node (launcher, sweeper, ...).
    """
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_app"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def run_cli(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
            command: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` (or ``command + args``) as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    cmd = list(command) if command is not None else [sys.executable, str(TRAIN_PY)]
    return subprocess.run([*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
