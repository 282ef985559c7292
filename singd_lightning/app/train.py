"""Hydra entry point: ``python train.py [overrides]`` or ``singd-train [overrides]``.

Composes ``singd_lightning/conf/train.yaml`` with the command-line overrides and runs
:func:`singd_lightning.app.pipeline.train` per job, which trains, tests and writes
``results.json`` into the Hydra run directory::

    python train.py                                   # digits, small VGG, SINGD, CPU
    python train.py structure=diagonal precision=bf16
    python train.py -m optimizer=singd,adamw
    python train.py experiment=cifar100_vgg trainer=gpu

The configs ship inside the package (``singd_lightning/conf``), so a wheel runs the
app too; ``$SINGD_CONFIG_DIR`` points at another config directory, and
``hydra.searchpath`` adds your own config groups.

A user error (a bad config value, a missing data set or checkpoint) prints one line,
``Error: <message>``, and exits with status 1 (see :mod:`singd_lightning.app.errors`);
``HYDRA_FULL_ERROR=1`` shows its traceback. Every job writes ``results.json``.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from singd_lightning.app.errors import USER_ERROR_EXIT, full_error_requested, report_user_error
from singd_lightning.app.hydra_utils import DistributedJobScope, config_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: see :func:`singd_lightning.app.pipeline.train`."""
    from singd_lightning.app.pipeline import train as run_pipeline

    return run_pipeline(cfg)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def _task(cfg: DictConfig) -> float:
    from singd_lightning.app.pipeline import objective

    try:
        with DistributedJobScope():
            results = train(cfg)
    except Exception as err:
        report_user_error(err, multirun=_multirun())  # one line for a user error
        raise  # a bug: Hydra prints the traceback
    return objective(cfg, results)


def main() -> Any:
    """Console-script entry point (``singd-train``): the Hydra app on the packaged configs."""
    try:
        configs = config_dir()
    except FileNotFoundError as err:
        if full_error_requested():
            raise
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    app = hydra.main(version_base="1.3", config_path=str(configs), config_name="train")(_task)
    return app()


if __name__ == "__main__":
    main()
