"""Validation of optimizer hyper-parameters: clear errors that name the parameter."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from singd_lightning.optim.curvature import KFAC_APPROXIMATIONS, LOSS_AVERAGES

FALLBACKS = ("adamw", "sgd", "none")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16",
                  "half": "float16", "float": "float32", "double": "float64"}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_range(name: str, value: Any, low: float, high: float = float("inf"),
                low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in the given interval."""
    ok = _is_real(value) and value == value  # rejects NaN
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (
            value <= high if high_inclusive else value < high
        )
    if not ok:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool (a string such as ``"no"``
    would otherwise count as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def check_grad_scaler(value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is None or a ``torch.amp.GradScaler``."""
    if value is not None and not isinstance(value, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be None or a torch.amp.GradScaler, got {type(value).__name__}."
        )


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def dtype_name(value: Any, name: str = "preconditioner_dtype") -> str | None:
    """Normalise a dtype (``torch.bfloat16``, ``"bf16"``, None) to its name."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for key, dtype in _DTYPES.items():
            if dtype == value:
                return key
    elif isinstance(value, str):
        key = value.replace("torch.", "").lower()
        key = _DTYPE_ALIASES.get(key, key)
        if key in _DTYPES:
            return key
    raise ValueError(
        f"{name} entries must be None or one of {list(_DTYPES)}, got {value!r}."
    )


def dtype_from_name(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else _DTYPES[name]


def resolve_lr_cov(lr_cov: float | Callable[[int], float], step: int) -> float:
    """The factor learning rate β₁ at ``step``, validating a schedule's output."""
    value = lr_cov(step) if callable(lr_cov) else lr_cov
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    check_range("lr_cov" + (f" (schedule at step {step})" if callable(lr_cov) else ""),
                value, 0.0)
    return float(value)


def validate_kronecker_group(group: dict) -> None:
    """Check the hyper-parameters shared by the Kronecker methods and the fallback."""
    check_range("lr", group["lr"], 0.0)
    check_range("momentum", group["momentum"], 0.0, 1.0)
    check_range("damping", group["damping"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    T = group["T"]
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 1):
        raise ValueError(f"T must be an integer ≥ 1, got {T!r}.")
    check_choice("loss_average", group["loss_average"], LOSS_AVERAGES)
    check_choice("kfac_approx", group["kfac_approx"], KFAC_APPROXIMATIONS)
    dtypes = group["preconditioner_dtype"]
    if isinstance(dtypes, (str, torch.dtype)) or dtypes is None:
        dtypes = (dtypes, dtypes)
    if len(dtypes) != 2:
        raise ValueError(
            f"preconditioner_dtype must be a pair (K's dtype, C's dtype), got {dtypes!r}."
        )
    group["preconditioner_dtype"] = tuple(dtype_name(d) for d in dtypes)
    check_choice("fallback", group["fallback"], FALLBACKS)
    if group["fallback_lr"] is not None:
        check_range("fallback_lr", group["fallback_lr"], 0.0)
    betas = group["fallback_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"fallback_betas must be a pair of numbers in [0, 1), got {betas!r}.")
    for i, beta in enumerate(betas):
        check_range(f"fallback_betas[{i}]", beta, 0.0, 1.0)
    group["fallback_betas"] = tuple(betas)
    check_range("fallback_eps", group["fallback_eps"], 0.0, low_inclusive=False)
    if group["fallback_weight_decay"] is not None:
        check_range("fallback_weight_decay", group["fallback_weight_decay"], 0.0)
    start = group["weight_decay_start"]
    if start != "auto" and not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
        raise ValueError(f"weight_decay_start must be an integer ≥ 0 or 'auto' (20·T), got {start!r}.")
    if group["update_clip"] is not None:
        check_range("update_clip", group["update_clip"], 1.0, low_inclusive=False)
    if group.get("kl_clip") is not None:
        check_range("kl_clip", group["kl_clip"], 0.0, low_inclusive=False)
