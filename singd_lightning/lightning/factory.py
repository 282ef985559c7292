"""Optimizer factories for ``LightningModule.configure_optimizers``.

:func:`configure_singd` builds SINGD (or any of its relatives) on a module and
returns what Lightning expects, optionally with an LR scheduler;
:func:`build_optimizer` is the general form used by the experiment app, which
also builds the first-order baselines by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from singd_lightning.lightning.strategy import check_strategy
from singd_lightning.optim import KroneckerOptimizer
from singd_lightning.optim.factory import FIRST_ORDER_OPTIMIZERS, KRONECKER_OPTIMIZERS
from singd_lightning.optim.schedules import apply_lr_cov_schedule

OPTIMIZER_NAMES = (*KRONECKER_OPTIMIZERS, *FIRST_ORDER_OPTIMIZERS)

#: A callable that builds the optimizer from the module: LightningCLI's pattern
#: for modules that build their own optimizer, for SINGD (which takes the model,
#: not its parameters). Type a module's ``optimizer`` argument with it, call
#: ``configure_singd(self, self.optimizer)`` in ``configure_optimizers``, and pick
#: it with ``--model.optimizer=singd_lightning.SINGD --model.optimizer.lr=...``.
ModelOptimizerCallable = Callable[[nn.Module], Optimizer]

SchedulerSpec = Union[
    Callable[[Optimizer], LRScheduler],  # e.g. functools.partial(StepLR, step_size=10)
    Mapping[str, Any],  # Lightning's lr_scheduler config with a callable "scheduler"
    None,
]


def build_optimizer(
    module: nn.Module, name: str | type | ModelOptimizerCallable = "singd", **options: Any
) -> Optimizer:
    """Build an optimizer by name for ``module``.

    Args:
        module: The model (a ``LightningModule`` or any ``nn.Module``).
        name: One of ``singd``, ``ingd``, ``ikfac``, ``kfac``, ``adamw``, ``sgd``, an
            optimizer class (a Kronecker class receives ``module``, any other
            class the trainable parameters), or a :data:`ModelOptimizerCallable`
            (called with ``module``, e.g. what LightningCLI parses for
            ``--model.optimizer=singd_lightning.SINGD``).
        **options: The optimizer's keyword arguments; for a Kronecker optimizer
            also ``lr_cov_schedule`` (None or ``"authors_warmup"``, see
            :func:`~singd_lightning.optim.schedules.apply_lr_cov_schedule`).

    When ``module`` is a ``LightningModule`` attached to a ``Trainer`` (i.e. this is
    called from ``configure_optimizers``), a Kronecker optimizer gets the
    trainer's loss scaler under ``precision="16-mixed"`` (unless ``grad_scaler``
    is given), and a sharded strategy (FSDP, DeepSpeed) is refused.

    Raises:
        ValueError: For an unknown name, listing the valid ones, or an unsupported
            strategy.
    """
    if isinstance(name, str):
        key = name.lower()
        if key in KRONECKER_OPTIMIZERS:
            cls: type = KRONECKER_OPTIMIZERS[key]
        elif key in FIRST_ORDER_OPTIMIZERS:
            cls = FIRST_ORDER_OPTIMIZERS[key]
        else:
            raise ValueError(f"Unknown optimizer {name!r}. Valid names: {', '.join(OPTIMIZER_NAMES)}.")
    elif not isinstance(name, type) and callable(name):
        return _build_from_callable(module, name, **options)
    else:
        cls = name
    if isinstance(cls, type) and issubclass(cls, KroneckerOptimizer):
        trainer = attached_trainer(module)
        if trainer is not None:
            check_strategy(trainer.strategy)
        # ``lr_cov_schedule`` (the app's config) becomes a picklable lr_cov schedule.
        lr_cov = inspect.signature(cls.__init__).parameters.get("lr_cov")
        default_lr_cov = lr_cov.default if lr_cov is not None and isinstance(lr_cov.default, float) else 1e-2
        options = apply_lr_cov_schedule(options, default_lr_cov)
        optimizer = cls(module, **options)
        if trainer is not None:
            if options.get("grad_scaler") is None:
                attach_trainer_grad_scaler(optimizer, trainer)
        return optimizer
    return cls([p for p in module.parameters() if p.requires_grad], **options)


def _build_from_callable(module: nn.Module, factory: ModelOptimizerCallable, **options: Any) -> Optimizer:
    optimizer = factory(module, **options)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"name: the optimizer callable {factory!r} must return a torch Optimizer when called "
            f"with the module, got {type(optimizer).__name__}."
        )
    trainer = attached_trainer(module)
    if trainer is not None and isinstance(optimizer, KroneckerOptimizer):
        # Whether the callable builds a Kronecker optimizer is known only now.
        try:
            check_strategy(trainer.strategy)
        except ValueError:
            optimizer.remove_hooks()
            raise
        if optimizer.grad_scaler is None:
            attach_trainer_grad_scaler(optimizer, trainer)
    return optimizer


def attached_trainer(module: nn.Module) -> Any:
    """The Lightning ``Trainer`` that ``module`` is attached to, or None."""
    return getattr(module, "_trainer", None)


def trainer_grad_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The loss scaler of the trainer's precision plugin ("16-mixed"), or None."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def attach_trainer_grad_scaler(optimizer: Optimizer, trainer: Any) -> None:
    """Attach the trainer's loss scaler to a Kronecker optimizer (see
    :meth:`~singd_lightning.optim.base.KroneckerOptimizer.attach_grad_scaler`), so
    that its curvature statistics are un-scaled under ``precision="16-mixed"``."""
    scaler = trainer_grad_scaler(trainer)
    if scaler is not None and isinstance(optimizer, KroneckerOptimizer):
        optimizer.attach_grad_scaler(scaler)



def _scheduler_config(optimizer: Optimizer, scheduler: SchedulerSpec) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        if "scheduler" not in config:
            raise ValueError(
                "scheduler: a Lightning lr_scheduler dict needs a 'scheduler' entry (a callable "
                f"optimizer -> LRScheduler), got the keys {sorted(config)}."
            )
        factory = config["scheduler"]
        config["scheduler"] = factory(optimizer) if callable(factory) and not isinstance(factory, LRScheduler) else factory
        return config
    if not callable(scheduler):
        raise ValueError(
            "scheduler must be a callable optimizer -> LRScheduler (e.g. functools.partial("
            f"StepLR, step_size=10)) or a Lightning lr_scheduler dict, got {scheduler!r}."
        )
    return {"scheduler": scheduler(optimizer), "interval": "epoch"}


def configure_singd(
    module: nn.Module,
    optimizer: str | type | ModelOptimizerCallable = "singd",
    scheduler: SchedulerSpec = None,
    **options: Any,
) -> dict[str, Any]:
    """Build SINGD (or ``optimizer``) on ``module``, in the format Lightning expects.

    Call it from ``configure_optimizers``::

        def configure_optimizers(self):
            return configure_singd(
                self, structures=("diagonal", "diagonal"), lr=1e-3,
                scheduler=functools.partial(CosineAnnealingLR, T_max=100),
            )

    It works with manual optimisation too (``self.optimizers()`` returns it).
    Under ``precision="16-mixed"`` the trainer's GradScaler is attached to the
    optimizer, so the curvature statistics are un-scaled exactly. Lightning's
    gradient clipping (``gradient_clip_val``, by norm or by value) clips the raw
    gradient before it is preconditioned; the statistics are not clipped.

    Args:
        module: The LightningModule.
        optimizer: Name, class or callable, see :func:`build_optimizer`.
        scheduler: A callable that builds an LR scheduler from the optimizer, or a
            Lightning ``lr_scheduler`` dict whose ``"scheduler"`` is such a callable.
        **options: The optimizer's keyword arguments.

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {...}}`` (no scheduler key without one).
    """
    built = build_optimizer(module, optimizer, **options)
    config: dict[str, Any] = {"optimizer": built}
    lr_scheduler = _scheduler_config(built, scheduler)
    if lr_scheduler is not None:
        config["lr_scheduler"] = lr_scheduler
    return config
