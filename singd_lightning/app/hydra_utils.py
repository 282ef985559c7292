"""Hydra glue: where the configs are, DDP under Hydra, W&B mode and clean-up."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable that points the app at another config directory.
CONFIG_DIR_ENV = "SINGD_CONFIG_DIR"


def config_dir() -> Path:
    """The app's config directory: ``$SINGD_CONFIG_DIR`` if set, else the configs
    shipped inside the package (``singd_lightning/conf``), so that ``singd-train``
    and ``python train.py`` use the same configs from a wheel or a checkout.

    Raises:
        FileNotFoundError: With a hint, if the directory has no ``train.yaml``.
    """
    env = os.environ.get(CONFIG_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"The app's configs were not found at '{path}' (no train.yaml). "
            f"{CONFIG_DIR_ENV} must name a directory holding train.yaml and its groups; "
            "unset it to use the configs shipped with the package."
        )
    return path


# ------------------------------------------------------------------ DDP + Hydra
#
# Lightning's DDP strategy starts ranks > 0 by re-running the script with the
# original command line plus ``hydra.run.dir=<run dir>``. Under ``--multirun`` the
# original command line holds ``-m`` and the whole sweep, so every child starts a
# sweep of its own, in new output directories (Lightning issues #11300, #16694,
# Hydra issue #2070; the linked fixes were reverted or never merged). We replace the
# command: the child runs exactly this job's overrides, in RUN mode, in rank 0's
# output directory, and writes no ``.hydra/`` files of its own.

_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _config_selection_args(argv: Sequence[str]) -> list[str]:
    """The ``--config-name``/``--config-path``/``--config-dir`` arguments of ``argv``."""
    kept: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag in _CONFIG_FLAGS:
            if "=" in arg:
                kept.append(arg)
            elif i + 1 < len(args):
                kept += [arg, args[i + 1]]
                i += 1
        i += 1
    return kept


def hydra_ddp_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Command and working directory for a DDP child process of a Hydra job.

    Used in place of Lightning's ``_hydra_subprocess_cmd`` (see
    :func:`install_ddp_hydra_fix`). Works in RUN and MULTIRUN mode.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    import __main__

    hydra_cfg = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += _config_selection_args(sys.argv[1:])
    command += list(hydra_cfg.overrides.task)
    run_dir = hydra_cfg.runtime.output_dir
    command += [
        f'hydra.run.dir="{run_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def install_ddp_hydra_fix() -> bool:
    """Make Lightning's DDP launcher start children with :func:`hydra_ddp_subprocess_cmd`.

    Returns:
        Whether the launcher was patched (False if Lightning's internals changed).
    """
    patched = False
    for module_name in (
        "lightning.pytorch.strategies.launchers.subprocess_script",
        "lightning.fabric.strategies.launchers.subprocess_script",
    ):
        try:
            module = __import__(module_name, fromlist=["_hydra_subprocess_cmd"])
        except ImportError:
            continue
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = hydra_ddp_subprocess_cmd
            patched = True
    if not patched:
        log.warning(
            "Could not install the Hydra + DDP fix (Lightning's launcher changed); "
            "DDP under --multirun may start extra sweeps."
        )
    return patched


#: Variables Lightning's DDP launcher sets in the launching (rank 0) process.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


class DistributedJobScope:
    """Leaves no distributed state behind a job, so the next ``--multirun`` job in
    this process can start DDP again.

    Lightning's launcher sets ``LOCAL_RANK`` etc. in the launching process and keeps
    the process group; in the next job it would then believe the processes were
    started externally and wait for ranks that have exited. On exit, a process that
    launched its own ranks (no ``LOCAL_RANK`` when the job started) restores those
    variables and destroys the process group. Processes started by SLURM, torchrun
    or Lightning itself (``LOCAL_RANK`` set) are left alone.
    """

    def __enter__(self) -> DistributedJobScope:
        self.launcher = "LOCAL_RANK" not in os.environ
        self.saved = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.launcher:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------ console

#: Loggers to which Lightning (and torchmetrics) attach a console handler of their own
#: on import (``lightning/__init__.py``, ``lightning/pytorch/__init__.py``, ...).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")
#: The loggers of Lightning's ``rank_zero_info``.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

#: Starts of Lightning INFO messages the app's user can do nothing about: the
#: advertisement for litlogger, and the note that the configured RichModelSummary
#: replaces Lightning's default summary (the app configures it on purpose).
QUIET_LIGHTNING_MESSAGES = (
    "💡 Tip: For seamless cloud logging",
    "Trainer already configured with model summary callbacks",
)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def configure_lightning_logging(hand_to_root: bool = True) -> None:
    """One console line per Lightning message, without the app's noise.

    Lightning adds a StreamHandler to its loggers (and stops them propagating) when
    the root logger has no handler at import time; Hydra configures the root logger
    later, so every Lightning INFO line was printed twice, once by each. With
    ``hand_to_root`` and a root logger that has handlers (Hydra's console and
    ``<job>.log`` file), Lightning's own console handlers go and its records
    propagate to the root, so they also reach the job's log file. The messages of
    :data:`QUIET_LIGHTNING_MESSAGES` are dropped either way. Idempotent (a
    ``--multirun`` calls it once per job).

    Args:
        hand_to_root: Let the root logger's handlers print Lightning's messages.
    """
    root = logging.getLogger()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if hand_to_root and root.handlers:
            for handler in list(logger.handlers):
                # only the plain console handler Lightning installs; a user's file handler stays
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in RANK_ZERO_LOGGERS:
        # a logger's filters see only the records logged on it: rank_zero_info logs here
        rank_zero = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
            rank_zero.addFilter(_DropMessages(QUIET_LIGHTNING_MESSAGES))


# ------------------------------------------------------------------ W&B


def wandb_has_credentials() -> bool:
    """Whether W&B has an API key (env, settings file or netrc), without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # no wandb, or a login error: treat as not logged in
        return False


def resolve_wandb_offline(offline: bool | str | None) -> bool:
    """``offline: auto`` -> offline unless W&B has credentials or ``WANDB_MODE`` is set."""
    if isinstance(offline, bool):
        return offline
    if offline not in (None, "auto"):
        raise ValueError(f"logger.wandb.offline must be true, false or 'auto', got {offline!r}")
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online":
        return False
    return not wandb_has_credentials()


def finish_wandb() -> str | None:
    """Finish the active W&B run (one run per Hydra job); return its directory."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return None
    run_dir = None
    try:
        run_dir = str(Path(wandb.run.dir).parent)
        offline = bool(getattr(wandb.run.settings, "_offline", False)) or wandb.run.settings.mode in (
            "offline",
            "dryrun",
        )
    except Exception:
        offline = False
    wandb.finish()
    if offline and run_dir:
        log.info(f"W&B run saved offline; upload it with: wandb sync {run_dir}")
    return run_dir


__all__ = [
    "CONFIG_DIR_ENV",
    "DISTRIBUTED_ENV",
    "DistributedJobScope",
    "config_dir",
    "configure_lightning_logging",
    "finish_wandb",
    "hydra_ddp_subprocess_cmd",
    "install_ddp_hydra_fix",
    "resolve_wandb_offline",
    "wandb_has_credentials",
]
