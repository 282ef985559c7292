"""Checks of the composed config and of ``ckpt_path`` before a run builds anything.

Lightning checks some trainer values late (``trainer.max_epochs=abc`` fails as a
bare ``AssertionError`` inside the fit loop) or not at all (``max_epochs=-1`` trains
forever, a cosine schedule of length -1 flips between lr and 0): the app refuses
them up front with a :class:`~singd_lightning.app.errors.ConfigError` that names the
key.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from singd_lightning.app.errors import CheckpointError, ConfigError, one_line


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(key: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low:
        none = " or null" if allow_none else ""
        raise ConfigError(f"{key} must be an integer >= {low}{none}, got {value!r}.")


def validate_trainer(trainer: Mapping[str, Any]) -> None:
    """Check the ``trainer`` values the pipeline relies on.

    ``max_epochs`` is an integer >= 1, or -1 (no epoch limit) when ``max_steps`` or
    ``max_time`` ends the run; ``max_steps`` is -1 or >= 1; ``min_epochs`` is at most
    ``max_epochs``; each ``limit_*_batches`` is null, a count >= 0 or a fraction in
    [0, 1] (training needs more than 0); ``check_val_every_n_epoch``,
    ``accumulate_grad_batches`` >= 1; ``log_every_n_steps``, ``gradient_clip_val`` >= 0.

    Raises:
        ConfigError: Naming the key, e.g. ``trainer.max_epochs must be ...``.
    """
    max_steps = trainer.get("max_steps", -1)
    if not _is_int(max_steps) or (max_steps != -1 and max_steps < 1):
        raise ConfigError(f"trainer.max_steps must be -1 (no step limit) or an integer >= 1, got {max_steps!r}.")
    max_epochs = trainer.get("max_epochs")
    if max_epochs == -1 and _is_int(max_epochs):
        if max_steps == -1 and trainer.get("max_time") is None:
            raise ConfigError(
                "trainer.max_epochs=-1 (no epoch limit) would train forever: set trainer.max_steps or "
                "trainer.max_time as well, or make trainer.max_epochs an integer >= 1."
            )
    elif not _is_int(max_epochs) or max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs must be an integer >= 1 (or -1 with trainer.max_steps), got {max_epochs!r}."
        )
    min_epochs = trainer.get("min_epochs")
    _int_at_least("trainer.min_epochs", min_epochs, 0, allow_none=True)
    if min_epochs is not None and max_epochs != -1 and min_epochs > max_epochs:
        raise ConfigError(f"trainer.min_epochs ({min_epochs}) must not exceed trainer.max_epochs ({max_epochs}).")
    for split in ("train", "val", "test"):
        key = f"limit_{split}_batches"
        value = trainer.get(key)
        if value is None:
            continue
        fraction = isinstance(value, float) and _is_number(value) and 0.0 <= value <= 1.0
        count = _is_int(value) and value >= 0
        if not (fraction or count):
            raise ConfigError(
                f"trainer.{key} must be null, a number of batches >= 0 or a fraction in [0.0, 1.0], got {value!r}."
            )
        if split == "train" and value == 0:
            raise ConfigError(
                "trainer.limit_train_batches=0 trains nothing; give a number of batches >= 1 or a fraction."
            )
    _int_at_least("trainer.check_val_every_n_epoch", trainer.get("check_val_every_n_epoch", 1), 1, allow_none=True)
    _int_at_least("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), 1)
    _int_at_least("trainer.log_every_n_steps", trainer.get("log_every_n_steps"), 0, allow_none=True)
    _int_at_least("trainer.num_sanity_val_steps", trainer.get("num_sanity_val_steps"), -1, allow_none=True)
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val must be null or a number >= 0, got {clip!r}.")


def validate_scheduler(scheduler: Mapping[str, Any] | None) -> None:
    """A cosine schedule needs a length (``scheduler.T_max``, by default
    ``trainer.max_epochs``) of at least one epoch; a warm-up + cosine schedule also
    a warm-up shorter than that length.

    Raises:
        ConfigError: Naming ``scheduler.T_max``.
    """
    target = str(scheduler.get("_target_", "")) if scheduler else ""
    if target.endswith("WarmupCosineLR"):
        warmup, length = scheduler.get("warmup_epochs"), scheduler.get("max_epochs")
        if not _is_int(length) or length < 1:
            raise ConfigError(
                f"scheduler.max_epochs (the warm-up + cosine schedule's length; trainer.max_epochs by default) "
                f"must be an integer >= 1, got {length!r}."
            )
        if not _is_int(warmup) or not 0 <= warmup < length:
            raise ConfigError(
                f"scheduler.warmup_epochs must be an integer in [0, scheduler.max_epochs={length}), got {warmup!r}."
            )
        return
    if not target.endswith("CosineAnnealingLR"):
        return
    t_max = scheduler.get("T_max")
    if not _is_int(t_max) or t_max < 1:
        raise ConfigError(
            f"scheduler.T_max (the cosine schedule's length in epochs; trainer.max_epochs by default) must be an "
            f"integer >= 1, got {t_max!r}; without an epoch limit use scheduler=constant or set scheduler.T_max."
        )


def compile_backend(value: Any) -> str | None:
    """The ``torch.compile`` backend that ``compile`` asks for (None: no compile).

    Raises:
        ConfigError: ``compile`` is neither a bool nor a backend's name.
    """
    if isinstance(value, bool):
        return "inductor" if value else None
    if isinstance(value, str):
        import torch._dynamo  # only for a backend name: the compiler is a heavy import

        if value in torch._dynamo.list_backends(exclude_tags=()):
            return value
        common = ", ".join(["eager", "aot_eager", *torch._dynamo.list_backends()])
        raise ConfigError(f"compile: {value!r} is not a torch.compile backend; valid: true, false, {common}.")
    raise ConfigError(f"compile: expected true, false or a torch.compile backend name, got {value!r}.")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check the composed config of ``python train.py`` before anything is built.

    Covers the trainer (:func:`validate_trainer`), the scheduler
    (:func:`validate_scheduler`) and the top-level keys ``seed`` (integer or null),
    ``num_threads`` (>= 1 or null), ``label_smoothing`` (in [0, 1]), ``test`` and
    ``eval_test_every_epoch`` (booleans), ``compile`` (:func:`compile_backend`) and
    ``ckpt_path`` (a path or null). The
    optimizer, model and data modules check their own arguments.

    Raises:
        ConfigError: Naming the key and what it must be.
    """
    validate_trainer(cfg.get("trainer") or {})
    validate_scheduler(cfg.get("scheduler"))
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed must be an integer or null, got {seed!r}.")
    _int_at_least("num_threads", cfg.get("num_threads"), 1, allow_none=True)
    smoothing = cfg.get("label_smoothing", 0.0)
    if not (_is_number(smoothing) and 0.0 <= smoothing <= 1.0):
        raise ConfigError(f"label_smoothing must be a number in [0.0, 1.0], got {smoothing!r}.")
    for key in ("test", "eval_test_every_epoch"):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}.")
    compile_backend(cfg.get("compile", False))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, (str, os.PathLike)):
        raise ConfigError(f"ckpt_path must be the path of a checkpoint file or null, got {ckpt_path!r}.")


def _load_failure(err: Exception) -> str:
    """The first sentence of why ``torch.load`` failed (for a weights-only refusal, the
    unpickler's own reason rather than the advice around it)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    sentence = one_line(text, 200).split(". ", 1)[0].rstrip(". ")
    return sentence or type(err).__name__


def check_checkpoint(ckpt_path: str | os.PathLike) -> Path:
    """Make sure ``ckpt_path`` is a readable Lightning checkpoint before training starts.

    Zip checkpoints (``torch.save``'s format) are memory-mapped, so the tensor data is
    not read twice; PyTorch's default ``torch.load`` (weights only) is used, as
    Lightning's resume does.

    Returns:
        The path (``~`` expanded).

    Raises:
        CheckpointError: One sentence naming ``ckpt_path``: it does not exist, is a
            directory, is empty, cannot be loaded (corrupt or truncated), or holds no
            model ``state_dict``.
    """
    import torch

    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"ckpt_path '{path}' does not exist.")
    if not path.is_file():
        raise CheckpointError(f"ckpt_path '{path}' is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"ckpt_path '{path}' is an empty file (0 bytes), not a checkpoint.")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except Exception as err:  # a truncated zip, a pickle error, a refused global, ...
        raise CheckpointError(
            f"ckpt_path '{path}' is not a loadable checkpoint (corrupt, truncated or another format): "
            f"{_load_failure(err)}."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path '{path}' is not a Lightning checkpoint: it holds no 'state_dict'.")
    return path


__all__ = ["check_checkpoint", "validate_config", "validate_scheduler", "validate_trainer"]
