"""Re-targeting learning-rate schedulers from one optimizer to another.

:class:`~singd_lightning.lightning.SINGDCallback` replaces the optimizer a
``LightningModule`` configured; its schedulers must then drive the new
optimizer's learning rates. :func:`retarget_scheduler` re-points a scheduler in
place and puts it in the state it would have had if it had been built on the new
optimizer (with as many steps taken as it had taken), so Lightning keeps
stepping and checkpointing the very same object.

Two kinds of schedules are told apart:

* *relative* ones (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR,
  CosineAnnealingWarmRestarts, LinearLR, ConstantLR, PolynomialLR, LambdaLR,
  MultiplicativeLR, SequentialLR, ChainedScheduler and custom ``LRScheduler``
  subclasses) scale each group's base learning rate, which becomes the new
  optimizer's own ``lr`` (``fallback_lr`` for SINGD's fallback groups);
* *absolute* ones (OneCycleLR, CyclicLR) set the learning rates they were given,
  which carry over unchanged; ReduceLROnPlateau keeps its plateau state.

Per-group settings (``lr_lambdas``, ``min_lrs``, ``max_lrs``, ...) of the old
groups are handed to the new groups derived from them (``group_map``).
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from functools import wraps
from typing import Any
from weakref import ref

from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

# Scheduler attributes holding one entry per parameter group.
_PER_GROUP_ATTRIBUTES = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
)
# Group entries that absolute schedulers (OneCycleLR) keep in the groups.
_ABSOLUTE_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
_ABSOLUTE = (lrs.OneCycleLR, lrs.CyclicLR)
_COMPOSITE = (lrs.SequentialLR, lrs.ChainedScheduler)


def _track_step_called(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` as PyTorch's schedulers do, so that they do not warn
    that ``step`` was overridden (mirrors ``LRScheduler.__init__``)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = ref(optimizer)
    func = optimizer.step.__func__

    @wraps(func)
    def wrapper(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def _children(scheduler: Any) -> list:
    return list(getattr(scheduler, "_schedulers", [])) if isinstance(scheduler, _COMPOSITE) else []


def _walk(scheduler: Any) -> list:
    """The scheduler and all schedulers nested in it."""
    out = [scheduler]
    for child in _children(scheduler):
        out += _walk(child)
    return out


def _repoint(scheduler: Any, optimizer: Optimizer, group_map: Sequence[int], old_count: int) -> None:
    for name in _PER_GROUP_ATTRIBUTES:
        value = scheduler.__dict__.get(name)
        if isinstance(value, (list, tuple)) and len(value) == old_count:
            scheduler.__dict__[name] = [value[j] for j in group_map]
    if isinstance(scheduler, lrs.OneCycleLR):
        scheduler.use_beta1 = "betas" in optimizer.defaults
    if isinstance(scheduler, lrs.CyclicLR) and getattr(scheduler, "cycle_momentum", False):
        scheduler.use_beta1 = "betas" in optimizer.defaults
    scheduler.optimizer = optimizer


def _rewind(scheduler: Any) -> None:
    """Undo the initial step, as ``SequentialLR`` does for its children."""
    for child in _children(scheduler):
        _rewind(child)
    if not _children(scheduler) and hasattr(scheduler, "last_epoch"):
        scheduler.last_epoch = -1


def _initialise(scheduler: Any) -> None:
    """Put ``scheduler`` in its just-constructed state (on its current optimizer,
    whose groups hold their initial learning rates)."""
    groups = scheduler.optimizer.param_groups
    if isinstance(scheduler, lrs.SequentialLR):
        for group in groups:
            group["lr"] = group["initial_lr"]
        for child in scheduler._schedulers:
            _rewind(child)
        index = bisect_right(scheduler._milestones, 0)
        _initialise(scheduler._schedulers[index])
        scheduler.last_epoch = 0
        scheduler._last_lr = scheduler._schedulers[index].get_last_lr()
    elif isinstance(scheduler, lrs.ChainedScheduler):
        # Its children were built one after the other on the same groups.
        for child in scheduler._schedulers:
            _initialise(child)
        scheduler._last_lr = [group["lr"] for group in groups]
    elif isinstance(scheduler, lrs.ReduceLROnPlateau):
        scheduler._last_lr = [group["lr"] for group in groups]
    elif isinstance(scheduler, lrs.LRScheduler):
        scheduler.last_epoch = -1
        if isinstance(scheduler, lrs.CosineAnnealingWarmRestarts):
            scheduler.T_i, scheduler.T_cur = scheduler.T_0, -1
        scheduler._initial_step()


def _steps_taken(scheduler: Any) -> int:
    if isinstance(scheduler, lrs.ChainedScheduler):
        return _steps_taken(scheduler._schedulers[0])
    if isinstance(scheduler, lrs.ReduceLROnPlateau):
        return 0
    return max(int(getattr(scheduler, "last_epoch", 0)), 0)


def retarget_scheduler(scheduler: Any, optimizer: Optimizer, group_map: Sequence[int] | None = None) -> None:
    """Make ``scheduler`` drive ``optimizer`` instead of its current optimizer.

    Args:
        scheduler: A PyTorch LR scheduler (also ``SequentialLR``,
            ``ChainedScheduler``, ``ReduceLROnPlateau``); changed in place.
        optimizer: The optimizer it should drive from now on.
        group_map: For each of ``optimizer``'s parameter groups, the index of the
            old optimizer's group it stands for (default: group 0 for all, or the
            same index when the counts match).

    The new groups keep their own ``lr`` as base learning rate (relative
    schedules) or receive the old groups' learning-rate settings (OneCycleLR,
    CyclicLR). A scheduler that had already taken ``k`` steps is replayed for
    ``k`` steps on the new optimizer.
    """
    old_optimizer = scheduler.optimizer
    old_groups = old_optimizer.param_groups
    new_groups = optimizer.param_groups
    if group_map is None:
        group_map = list(range(len(new_groups))) if len(new_groups) == len(old_groups) else [0] * len(new_groups)
    group_map = list(group_map)
    if len(group_map) != len(new_groups) or not all(0 <= j < len(old_groups) for j in group_map):
        raise ValueError(f"group_map {group_map} does not map {len(new_groups)} groups onto {len(old_groups)}.")
    members = _walk(scheduler)
    known = all(isinstance(s, (lrs.LRScheduler, lrs.ReduceLROnPlateau)) for s in members)
    if not known:
        warnings.warn(
            f"{type(scheduler).__name__} is not a PyTorch LR scheduler: only its `optimizer` "
            "attribute was re-pointed to the new optimizer; check that it drives it.",
            stacklevel=2,
        )
        scheduler.optimizer = optimizer
        return
    steps = _steps_taken(scheduler)
    absolute = any(isinstance(s, _ABSOLUTE) for s in members)
    for group, j in zip(new_groups, group_map):
        if absolute:
            for key in _ABSOLUTE_GROUP_KEYS:
                if key in old_groups[j]:
                    group[key] = old_groups[j][key]
        if not absolute or "initial_lr" not in group:
            group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"]
    for member in members:
        _repoint(member, optimizer, group_map, len(old_groups))
        relative = isinstance(member, lrs.LRScheduler) and not isinstance(member, (*_ABSOLUTE, lrs.ReduceLROnPlateau))
        if relative and "base_lrs" in member.__dict__:
            member.base_lrs = [group["initial_lr"] for group in new_groups]
    _track_step_called(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _initialise(scheduler)
        for _ in range(steps):
            scheduler.step()


#: Warm-up shapes of :class:`WarmupCosineLR`.
WARMUP_SHAPES = ("linear", "reciprocal")


class WarmupCosineLR(lrs.LRScheduler):
    """Warm-up for ``warmup_epochs``, then cosine decay to ``eta_min`` at ``max_epochs``.

    Stepped once per epoch. At epoch ``e`` the learning rate is ``base_lr`` times:

    * ``warmup="linear"``: ``(e + 1) / (warmup_epochs + 1)`` (a linear ramp that
      reaches ``base_lr`` when the cosine starts, the per-epoch form of
      SPT_LSA_ViT's ``utils/scheduler.py``, which ramps per step);
    * ``warmup="reciprocal"``: ``1 / (warmup_epochs − e)`` (Compact-Transformers
      v1.0 ``main.py``, ``adjust_learning_rate``: ``lr / (warmup − epoch)``);

    and from ``e = warmup_epochs`` on ``η + (1 − η)·½(1 + cos(π (e − w) / (E − w)))``
    with ``η = eta_min / base_lr`` (Compact-Transformers v1.0 decays to 0,
    SPT_LSA_ViT to 1e-6).
    A relative schedule: :func:`retarget_scheduler` moves it to another optimizer.

    Args:
        optimizer: The optimizer.
        warmup_epochs: Epochs of warm-up (``w`` ≥ 0).
        max_epochs: Total epochs (``E`` > ``w``).
        warmup: ``"linear"`` or ``"reciprocal"``.
        eta_min: Learning rate at the end of the cosine (≥ 0, the same for every group).
        last_epoch: As in PyTorch's schedulers.

    Raises:
        ValueError: For a value outside the ranges above.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: int,
        max_epochs: int,
        warmup: str = "linear",
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        for name, value, low in (("warmup_epochs", warmup_epochs, 0), ("max_epochs", max_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if warmup_epochs >= max_epochs:
            raise ValueError(f"warmup_epochs ({warmup_epochs}) must be less than max_epochs ({max_epochs}).")
        if warmup not in WARMUP_SHAPES:
            raise ValueError(f"warmup must be one of {list(WARMUP_SHAPES)}, got {warmup!r}.")
        if isinstance(eta_min, bool) or not isinstance(eta_min, (int, float)) or not eta_min >= 0:
            raise ValueError(f"eta_min must be a number >= 0, got {eta_min!r}.")
        self.warmup_epochs = warmup_epochs
        self.max_epochs = max_epochs
        self.warmup = warmup
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int, base_lr: float) -> float:
        """The multiple of ``base_lr`` at ``epoch``."""
        w, total = self.warmup_epochs, self.max_epochs
        if epoch < w:
            return (epoch + 1) / (w + 1) if self.warmup == "linear" else 1.0 / (w - epoch)
        progress = min(epoch - w, total - w) / (total - w)
        floor = self.eta_min / base_lr if base_lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        # Closed form (not chained from the current lr): exact after a resume.
        return [base_lr * self.factor(self.last_epoch, base_lr) for base_lr in self.base_lrs]


__all__ = ["WarmupCosineLR", "retarget_scheduler"]
