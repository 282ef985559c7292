"""A timm-style optimizer factory: ``create_optimizer(model, "singd", lr=..., weight_decay=...)``.

Like timm's ``create_optimizer_v2`` with ``filter_bias_and_bn=True``, weight decay
skips biases, 1-D parameters (norms) and the names of ``model.no_weight_decay()``.
With the Kronecker methods a bias in the no-decay group is still preconditioned
with its weight: weight decay is per parameter. torch only (no timm import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from singd_lightning.optim.base import KroneckerOptimizer, unwrap_model
from singd_lightning.optim.kfac import KFAC
from singd_lightning.optim.singd import IKFAC, INGD, SINGD

#: The Kronecker methods, by name (built from the model).
KRONECKER_OPTIMIZERS: dict[str, type[KroneckerOptimizer]] = {
    "singd": SINGD,
    "ingd": INGD,
    "ikfac": IKFAC,
    "kfac": KFAC,
}
#: The first-order baselines, by name (built from parameters).
FIRST_ORDER_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
OPTIMIZERS: dict[str, type[Optimizer]] = {**KRONECKER_OPTIMIZERS, **FIRST_ORDER_OPTIMIZERS}


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_weight_decay: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """timm's two groups: no decay for biases, 1-D parameters and the names in
    ``no_weight_decay``; ``weight_decay`` for the rest (trainable parameters only;
    an empty group is left out)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    name: str = "singd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    filter_bias_and_bn: bool = True,
    **kwargs: Any,
) -> Optimizer:
    """Build optimizer ``name`` for ``model``, with timm's no-decay groups.

    Args:
        model: The model (a DataParallel/DistributedDataParallel wrapper is unwrapped
            for the group names).
        name: One of ``singd``, ``ingd``, ``ikfac``, ``kfac``, ``adamw``, ``sgd``
            (any case).
        lr: Learning rate; None keeps the optimizer's default.
        weight_decay: Weight decay of the decayed group (of every parameter when
            ``filter_bias_and_bn`` is False), the fallback's parameters included.
        filter_bias_and_bn: Exempt biases, 1-D parameters and
            ``model.no_weight_decay()`` from weight decay (only when
            ``weight_decay`` is non-zero, as in timm).
        **kwargs: Further arguments of the optimizer (``structures``, ``T``,
            ``momentum``, ...).

    Raises:
        ValueError: ``name`` is not one of the above, or ``weight_decay`` is negative.

    Example:
        >>> optimizer = create_optimizer(model, "singd", lr=0.01, weight_decay=0.05, structures="diagonal")
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"name must be one of {list(OPTIMIZERS)}, got {name!r}.")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
    cls = OPTIMIZERS[key]
    inner = unwrap_model(model)
    if weight_decay and filter_bias_and_bn:
        skip = getattr(inner, "no_weight_decay", None)
        groups = param_groups_weight_decay(inner, weight_decay, set(skip()) if callable(skip) else set())
    else:
        groups = [{"params": [p for p in inner.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if issubclass(cls, KroneckerOptimizer) and "fallback_weight_decay" in kwargs:
        # A group's own weight_decay would beat the optimizer-wide fallback value.
        for group in groups:
            group["fallback_weight_decay"] = kwargs["fallback_weight_decay"]
    options = dict(kwargs)
    if lr is not None:
        options["lr"] = lr
    if issubclass(cls, KroneckerOptimizer):
        return cls(model, groups, **options)
    return cls(groups, **options)


__all__ = ["FIRST_ORDER_OPTIMIZERS", "KRONECKER_OPTIMIZERS", "OPTIMIZERS", "create_optimizer", "param_groups_weight_decay"]
