"""Hydra entry point: ``python train.py [overrides]`` or ``singd-train [overrides]``.

Composes ``conf/train.yaml`` with the command-line overrides and runs
:func:`singd_lightning.app.pipeline.train` per job, which trains, tests and writes
``results.json`` into the Hydra run directory::

    python train.py                                   # digits, small VGG, SINGD, CPU
    python train.py structure=diagonal precision=bf16
    python train.py -m optimizer=singd,adamw
    python train.py experiment=cifar100_vgg trainer=gpu

The configs are found in ``conf/`` of the source checkout (editable install) or in
``$SINGD_CONFIG_DIR``; a wheel does not include them.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from singd_lightning.app.hydra_utils import DistributedJobScope, config_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: see :func:`singd_lightning.app.pipeline.train`."""
    from singd_lightning.app.pipeline import train as run_pipeline

    return run_pipeline(cfg)


def _task(cfg: DictConfig) -> float:
    from singd_lightning.app.pipeline import objective

    with DistributedJobScope():
        results = train(cfg)
    return objective(cfg, results)


def main() -> Any:
    """Console-script entry point (``singd-train``): the Hydra app on ``conf/``."""
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)
    return app()


if __name__ == "__main__":
    main()
