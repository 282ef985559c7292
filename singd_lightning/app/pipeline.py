"""The training pipeline behind ``python train.py``: build everything from the
composed config, train, test, write ``results.json``.

:mod:`singd_lightning.app.train` is the (light) Hydra entry point; it imports this
module only when a job runs, so ``--help``, ``--cfg job`` and mistyped options
answer without importing Lightning.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from singd_lightning.app.callbacks import DivergenceDetector, PerformanceMonitor
from singd_lightning.app.errors import (
    CheckpointError,
    ConfigError,
    one_line,
    restoring_checkpoint,
    user_error_message,
)
from singd_lightning.app.hydra_utils import (
    configure_lightning_logging,
    finish_wandb,
    install_ddp_hydra_fix,
    resolve_wandb_offline,
)
from singd_lightning.app.module import ImageClassifier
from singd_lightning.app.results import empty_results, summary_values, write_results
from singd_lightning.app.validation import check_checkpoint, compile_backend, validate_config

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ builders


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of ``cfg.data``; with ``eval_test_every_epoch`` the test set
    becomes a second validation loader, so the test error is logged every epoch."""
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.get("eval_test_every_epoch", False):
        val_loader = datamodule.val_dataloader

        def val_and_test_loaders() -> list:
            return [val_loader(), datamodule.test_dataloader()]

        datamodule.val_dataloader = val_and_test_loaders
    return datamodule


def build_model(cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    """The network of ``cfg.model``, sized for the data module's classes and channels
    (and, for sequence data, its ``seq_len``).

    Raises:
        ConfigError: ``cfg.model`` has a key the model does not take, or the model
            takes images and the data are sequences or token ids (or the reverse).
    """
    from singd_lightning.models import MODELS, SEQUENCE_MODELS, TOKEN_MODELS

    backend = compile_backend(cfg.get("compile", False))
    name, seq_len = str(cfg.model.get("name")), getattr(datamodule, "seq_len", None)
    # An unknown name is left to create_model, whose error lists the valid ones.
    known = name in MODELS or cfg.model.get("_target_") != "singd_lightning.models.create_model"
    # Checked here: a mismatch would otherwise fail deep inside the first forward pass.
    from singd_lightning.models import GRAPH_MODELS

    graph = getattr(datamodule, "num_nodes", None) is not None  # a whole graph per batch (data=cora)
    if graph and known and name not in GRAPH_MODELS:
        raise ConfigError(
            f"model: {name} does not take a graph, but data={cfg.data.get('name')} gives one (node features "
            f"and adjacency); use one of model={', model='.join(sorted(GRAPH_MODELS))}."
        )
    if not graph and name in GRAPH_MODELS:
        raise ConfigError(f"model: {name} takes a graph, but data={cfg.data.get('name')} gives none; use data=cora.")
    tokens = getattr(datamodule, "vocab_size", None) is not None  # language modelling data
    if tokens and known and name not in TOKEN_MODELS:
        raise ConfigError(
            f"model: {name} does not take token ids, but data={cfg.data.get('name')} gives token ids; "
            f"use one of model={', model='.join(sorted(TOKEN_MODELS))}."
        )
    if not tokens and name in TOKEN_MODELS:
        raise ConfigError(
            f"model: {name} takes token ids, but data={cfg.data.get('name')} gives none; use data=text."
        )
    if not tokens and seq_len is not None and known and name not in SEQUENCE_MODELS:
        raise ConfigError(
            f"model: {name} takes 2-D images, but data={cfg.data.get('name')} gives 1-D sequences "
            f"of length {seq_len}; use one of model={', model='.join(sorted(SEQUENCE_MODELS))}."
        )
    if seq_len is None and name in SEQUENCE_MODELS:
        raise ConfigError(
            f"model: {name} takes 1-D sequences, but data={cfg.data.get('name')} gives 2-D images; "
            "use data=mnist1d."
        )
    sizes = {} if seq_len is None else {"seq_len": seq_len}
    factory = hydra.utils.instantiate(cfg.model)
    try:
        net = factory(num_classes=datamodule.num_classes, in_chans=datamodule.in_chans, **sizes)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):  # a key of cfg.model the network lacks
            raise ConfigError(f"model: {err}.") from err
        raise
    if backend is not None:
        # In place (nn.Module.compile): parameter names, and so checkpoints, stay
        # those of the plain network.
        net.compile(backend=backend)
    return net


def build_module(
    cfg: DictConfig, net: torch.nn.Module, num_classes: int | None = None, datamodule: Any = None
) -> ImageClassifier:
    """The LightningModule with the optimizer options and LR scheduler of ``cfg``
    (``num_classes``: the data's; None: ``net.num_classes``).

    A ``datamodule`` whose loss averages over positions too (its ``loss_average``
    is ``"batch+sequence"``, as for ``data=text``) sets the Kronecker optimizers'
    ``loss_average`` where the config leaves it at the default ``"batch"``, which
    would scale their output-side statistics by the wrong number of loss terms;
    one with ``byte_level`` adds the bits-per-byte metrics.
    """
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    data_average = getattr(datamodule, "loss_average", None)
    if data_average is not None and optimizer.get("loss_average") == "batch":
        optimizer["loss_average"] = data_average
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return ImageClassifier(
        net,
        optimizer=optimizer,
        scheduler=scheduler,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        num_classes=num_classes,
        bits_per_byte=bool(getattr(datamodule, "byte_level", False)),
    )


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every entry of the ``callbacks`` group that has a ``_target_``."""
    callbacks: list[Callback] = []
    if not callbacks_cfg:
        return callbacks
    for name, conf in callbacks_cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.debug(f"Instantiating callback {name} <{conf._target_}>")
            callbacks.append(hydra.utils.instantiate(conf))
    return callbacks


def build_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every entry of the ``logger`` group that has a ``_target_``.

    For W&B, ``offline: auto`` becomes offline unless an API key is configured, and
    the run name and group default to the job's overrides and the sweep.
    """
    loggers: list[Logger] = []
    if not logger_cfg:
        return loggers
    for name, conf in logger_cfg.items():
        if not (isinstance(conf, DictConfig) and "_target_" in conf):
            continue
        kwargs: dict[str, Any] = {}
        if conf._target_.endswith("WandbLogger"):
            # Lightning's own ``offline=True`` sets WANDB_MODE=dryrun, which current
            # wandb ignores (it then asks for a key); wandb.init's ``mode`` works.
            offline = resolve_wandb_offline(conf.get("offline", "auto"))
            kwargs["offline"] = False
            kwargs["mode"] = "offline" if offline else "online"
            job = _hydra_job_info()
            if conf.get("name") is None and job.get("name"):
                kwargs["name"] = job["name"]
            if conf.get("group") is None and job.get("group"):
                kwargs["group"] = job["group"]
            Path(conf.save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(hydra.utils.instantiate(conf, **kwargs))
    return loggers


def _hydra_job_info() -> dict[str, str]:
    """Run name (the job's overrides) and group (the sweep) for W&B, if under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    info = {"name": hc.job.override_dirname or hc.job.name}
    if str(hc.mode) == "RunMode.MULTIRUN":
        info["group"] = f"{Path(hc.sweep.dir).name}"
    return info


# ------------------------------------------------------------------ description


def _structure_name(spec: Any) -> str:
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = str(spec.pop("name"))
        options = ",".join(str(v) for v in spec.values())
        return f"{name}({options})" if options else name
    return str(spec)


def describe_run(cfg: DictConfig) -> dict[str, Any]:
    """Optimizer, structure, precision, model and data names of ``cfg``.

    ``precision`` is the trainer's (``cfg.trainer.precision``, e.g. ``"bf16-mixed"``),
    what runs even when given directly as ``trainer.precision=...``;
    ``precision_config`` is the ``precision`` group's option (e.g. ``"bf16"``), which
    also sets the optimizer's preconditioner dtype.
    """
    optimizer = cfg.optimizer
    name = str(optimizer.name)
    if "structures" in optimizer:
        k_spec, c_spec = (OmegaConf.to_container(s, resolve=True) if OmegaConf.is_config(s) else s
                          for s in optimizer.structures)
        k_name, c_name = _structure_name(k_spec), _structure_name(c_spec)
        structure = k_name if k_name == c_name else f"K={k_name},C={c_name}"
    elif name == "kfac":
        structure = "dense"
    else:
        structure = None
    return {
        "optimizer": name,
        "structure": structure,
        "precision": str(cfg.trainer.precision),
        "precision_config": str(cfg.precision.name),
        "model": str(cfg.model.name),
        "data": str(cfg.data.name),
    }


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------ training


def _run_dir(cfg: DictConfig) -> Path:
    """``cfg.paths.output_dir``; Hydra's output directory if that key does not resolve,
    so that even a run whose config is broken gets its ``results.json``."""
    try:
        return Path(cfg.paths.output_dir)
    except Exception:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
        raise


def _fit(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, ckpt_path: str | None) -> None:
    """``trainer.fit``; an error while Lightning restores ``ckpt_path`` (another model,
    optimizer structure or format) becomes a :class:`CheckpointError` naming it."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as err:
        if ckpt_path is not None and restoring_checkpoint(err):
            detail = one_line(str(err), 300) or type(err).__name__  # a state dict's key lists are long
            raise CheckpointError(f"ckpt_path '{ckpt_path}' does not fit this run: {detail}") from err
        raise


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and write ``results.json`` into ``cfg.paths.output_dir``.

    The config is checked first (:func:`~singd_lightning.app.validation.validate_config`,
    and ``ckpt_path`` with :func:`~singd_lightning.app.validation.check_checkpoint`).
    The result's ``status`` is ``"ok"``, ``"diverged"`` (the training loss became
    NaN/inf; training stopped there and testing was skipped) or ``"failed"`` (an
    exception, from the config checks on; it is re-raised after ``results.json`` is
    written, with ``error``: a user error's one line (see
    :func:`~singd_lightning.app.errors.user_error_message`), else type and message).

    Returns:
        The result dict, plus ``metrics``: every logged metric as a float.

    Raises:
        ConfigError: A config value the run cannot use (the message names the key).
        CheckpointError: ``ckpt_path`` is missing, empty, unreadable or does not fit
            the run's model or optimizer.
    """
    start = time.time()
    run_dir = _run_dir(cfg)
    results = empty_results()
    results["run_dir"] = str(run_dir)
    metrics: dict[str, float] = {}
    trainer: L.Trainer | None = None
    try:
        from hydra.core.hydra_config import HydraConfig

        configure_lightning_logging(hand_to_root=HydraConfig.initialized())
        results["overrides"] = _task_overrides()
        results.update(describe_run(cfg))
        results.update(seed=cfg.get("seed"), max_epochs=cfg.trainer.get("max_epochs"))
        validate_config(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path is not None:
            ckpt_path = str(check_checkpoint(ckpt_path))
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        if cfg.get("float32_matmul_precision"):
            torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
        if HydraConfig.initialized():
            install_ddp_hydra_fix()

        datamodule = build_datamodule(cfg)
        net = build_model(cfg, datamodule)
        results["num_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        module = build_module(cfg, net, num_classes=datamodule.num_classes, datamodule=datamodule)
        callbacks = build_callbacks(cfg.get("callbacks"))
        loggers = build_loggers(cfg.get("logger"))
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        # Lightning falls back (e.g. 16-mixed -> bf16-mixed on a CPU): record what runs
        results["precision"] = str(trainer.precision)
        # The composed config is the run's record, logged once and nested. Lightning
        # would also log the module's and data module's saved hyperparameters, merged
        # flat over it (the data module's ``seed`` replaced the run's).
        datamodule._log_hyperparams = False
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved)

        _fit(trainer, module, datamodule, ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
        divergence = _find(trainer.callbacks, DivergenceDetector)
        diverged = divergence is not None and divergence.diverged
        if diverged:
            results["diverged_step"] = divergence.diverged_step
        results["final_train_loss"] = _metric(metrics, "train/loss_epoch")
        if results["final_train_loss"] is None and divergence is not None:
            results["final_train_loss"] = divergence.last_loss
        results["final_val_acc"] = _metric(metrics, "val/acc")
        best = module.best_val_acc
        results["best_val_acc"] = best if math.isfinite(best) else None
        results["epochs"] = trainer.current_epoch
        results["global_step"] = trainer.global_step
        if cfg.get("test", True) and not diverged:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
            results["test_acc"] = _metric(metrics, "test/acc")
            results["test_loss"] = _metric(metrics, "test/loss")
        perf = _find(trainer.callbacks, PerformanceMonitor)
        if perf is not None:
            results.update(
                step_time_ms=perf.step_time_ms,
                optimizer_step_ms=perf.optimizer_step_ms,
                peak_memory_mb=perf.peak_memory_mb,
                memory_kind=perf.memory_kind,
                optimizer_state_mb=perf.optimizer_state_mb,
            )
        results["status"] = "diverged" if diverged else "ok"
    except BaseException as err:
        results["status"] = "failed"
        # a user error as the one line the command line prints; a bug as type and message
        results["error"] = user_error_message(err) or f"{type(err).__name__}: {err}"
        results["traceback"] = traceback.format_exc()
        raise
    finally:
        results["wall_time_s"] = time.time() - start
        if rank_zero_only.rank == 0 and (trainer is None or trainer.is_global_zero):
            path = write_results(run_dir, results)
            log.info(f"status={results['status']} test_acc={results['test_acc']} -> {path}")
            if trainer is not None:
                summarize_in_wandb(trainer.loggers, results)
        finish_wandb()
    results["metrics"] = metrics
    return results


def summarize_in_wandb(loggers: list[Logger], results: dict[str, Any]) -> None:
    """Put ``results.json``'s values into the summary of every W&B logger's run, so a
    sweep's runs compare on one dashboard (status, test accuracy, memory, ...).

    A W&B error is logged as a warning: the run itself has finished and is recorded.
    """
    from lightning.pytorch.loggers import WandbLogger

    values = summary_values(results)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            try:
                logger.experiment.summary.update(values)
            except Exception as err:  # noqa: BLE001 - see the docstring
                log.warning(f"Could not write the W&B run summary: {type(err).__name__}: {err}")


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _find(callbacks: list[Callback], cls: type) -> Any:
    return next((c for c in callbacks if isinstance(c, cls)), None)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def objective(cfg: DictConfig, results: Mapping[str, Any]) -> float:
    """The value a sweeper optimises: ``cfg.optimized_metric``.

    A diverged run, or a missing or non-finite value, gives ``cfg.objective_if_missing``,
    or NaN if that is null (Optuna then counts the trial as failed).
    """
    key = cfg.get("optimized_metric")
    if not key:
        return float("nan")
    aliases = {"val/acc_best": "best_val_acc", "test/acc": "test_acc"}
    value = results.get("metrics", {}).get(key)
    if results.get("status") == "diverged":
        value = None  # whatever it reached before diverging, the setting is unusable
    elif value is None and key in aliases:
        value = results.get(aliases[key])
    if value is None or not math.isfinite(float(value)):
        fallback = cfg.get("objective_if_missing")
        return float("nan") if fallback is None else float(fallback)
    return float(value)
