"""The Hydra experiment app: ``python train.py`` (or ``singd-train``).

Modules:

- :mod:`singd_lightning.app.train` -- the Hydra entry point (light: imports the rest
  only when a job runs).
- :mod:`singd_lightning.app.pipeline` -- builds data, model, optimizer, trainer,
  loggers and callbacks from the config; :func:`~singd_lightning.app.pipeline.train`.
- :mod:`singd_lightning.app.module` -- the image-classification ``LightningModule``.
- :mod:`singd_lightning.app.callbacks` -- step time / memory / divergence callbacks.
- :mod:`singd_lightning.app.results` -- ``results.json`` of a run.
- :mod:`singd_lightning.app.hydra_utils` -- config directory, DDP + Hydra, W&B.
"""
