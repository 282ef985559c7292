"""Lightning callbacks: attach SINGD to any ``LightningModule``, and log its
diagnostics.

:class:`SINGDCallback` swaps the optimizer a module configured for SINGD (or
INGD, IKFAC, KFAC) when fitting starts, and points the module's LR schedulers at
it; :class:`SINGDDiagnostics` (which ``SINGDCallback`` includes) logs how the
optimizer is doing through the trainer's loggers.

Gradient clipping (``Trainer(gradient_clip_val=..., gradient_clip_algorithm=
"norm"|"value")``) acts on the raw, un-scaled gradient before it is
preconditioned: Lightning clips after the backward pass(es) and the loss
scaler's un-scaling, right before it calls the optimizer's ``step``, which then
preconditions the clipped gradient. The curvature statistics are not clipped.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.core.optimizer import _MockOptimizer
from torch import nn
from torch.optim import Optimizer

from singd_lightning.lightning.factory import (
    KRONECKER_OPTIMIZERS,
    build_optimizer,
    trainer_grad_scaler,
)
from singd_lightning.lightning.schedulers import retarget_scheduler
from singd_lightning.lightning.sharded import full_parameters
from singd_lightning.lightning.strategy import check_strategy
from singd_lightning.optim import KroneckerOptimizer
from singd_lightning.optim.base import UPDATE_CLIP
from singd_lightning.optim.hyperparameters import check_grad_scaler
from singd_lightning.optim.singd import MAX_FACTOR_STEP

_BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")

#: One factor's structure: a name (``"diagonal"``) or a mapping with a ``name``
#: key and the structure's options (``{"name": "block_diagonal", "block_size": 32}``).
StructureOption = Union[str, dict[str, Any]]


class SINGDDiagnostics(Callback):
    """Log the diagnostics of the trainer's Kronecker optimizers every
    ``Trainer(log_every_n_steps=...)`` optimizer steps, through its loggers.

    Use it on its own with an optimizer from
    :func:`~singd_lightning.lightning.configure_singd`; :class:`SINGDCallback`
    already includes it. Logged (prefix ``singd/``, on global rank 0 only):

    * ``optimizer_time_share``: time of the optimizer step (including gradient
      clipping) divided by the time of the whole training batch (all its
      accumulated micro-batches), plus ``optimizer_step_ms`` and ``batch_ms``;
    * ``update_norm_K``/``update_norm_C`` (KFAC: ``_A``/``_G``/...): Frobenius norm
      of the latest preconditioner update, over all layers;
    * ``tau_KKt_min``/``_max`` and ``tau_CCt_min``/``_max``: the range over layers
      of τ(K Kᵀ) = trace/dim after the latest preconditioner update;
    * ``skipped_steps``: steps skipped for non-finite values, by the optimizer or
      by the loss scaler (under ``"16-mixed"``), and
      ``rejected_preconditioner_updates``; ``clipped_updates`` and
      ``clipped_factor_updates`` (the spike guards acted); ``grad_scale`` under a
      loss scaler;
    * ``peak_memory_mib``: the device's peak allocated memory since the last log
      (on CUDA only).

    Only logged steps synchronise with the device; the optimizer's
    ``track_diagnostics`` is switched on only when something is logged.

    Args:
        log_diagnostics: False turns all of it off.
    """

    def __init__(self, log_diagnostics: bool = True) -> None:
        self.log_diagnostics = bool(log_diagnostics)
        self.scaler_skipped_steps = 0
        self._optimizers: list[KroneckerOptimizer] = []
        self._handles: list = []
        self._active = False
        self._reset_batch()
        self._measure = False
        self._t_window: float | None = None

    # ----------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        return {"scaler_skipped_steps": self.scaler_skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler_skipped_steps = int(state_dict.get("scaler_skipped_steps", 0))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_step_hooks()
        self._optimizers = [o for o in trainer.optimizers if isinstance(o, KroneckerOptimizer)]
        self._active = (
            self.log_diagnostics
            and bool(self._optimizers)
            and bool(trainer.loggers)
            and trainer.log_every_n_steps > 0
        )
        for optimizer in self._optimizers:
            optimizer.track_diagnostics = self._active
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_step_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_step_hooks()

    def _remove_step_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -------------------------------------------------------------- timing
    def _reset_batch(self) -> None:
        self._attempted = False
        self._stepped = False
        self._t_step: tuple[float, float] | None = None
        self._t_before_step: float | None = None

    def _now(self, trainer: Trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._reset_batch()
        if batch_idx % max(trainer.accumulate_grad_batches, 1) == 0:  # a new optimizer step begins
            self._measure = (
                self._active
                and trainer.is_global_zero
                and (trainer.global_step + 1) % trainer.log_every_n_steps == 0
            )
            self._t_window = self._now(trainer) if self._measure else None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if any(optimizer is o for o in self._optimizers):
            self._attempted = True
            if self._measure:
                self._t_before_step = self._now(trainer)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True
        if self._measure and self._t_before_step is not None:
            trainer = getattr(self, "_trainer", None)
            end = self._now(trainer) if trainer is not None else time.perf_counter()
            self._t_step = (self._t_before_step, end)

    # ------------------------------------------------------------- logging
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._attempted:  # a non-final micro-batch of an accumulated step
            return
        if not self._stepped:  # the loss scaler skipped the step (inf/NaN gradients)
            self.scaler_skipped_steps += 1
        if not self._active or not trainer.is_global_zero or trainer.global_step % trainer.log_every_n_steps != 0:
            return
        metrics = self._timing(trainer)
        metrics.update(self._optimizer_metrics(trainer))
        prefixed = {f"singd/{key}": value for key, value in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(prefixed, step=max(trainer.global_step - 1, 0))

    def _timing(self, trainer: Trainer) -> dict[str, float]:
        if not (self._measure and self._t_step is not None and self._t_window is not None):
            return {}
        end = self._now(trainer)
        step_time = self._t_step[1] - self._t_step[0]
        batch_time = end - self._t_window
        return {
            "optimizer_time_share": step_time / batch_time if batch_time > 0 else float("nan"),
            "optimizer_step_ms": 1e3 * step_time,
            "batch_ms": 1e3 * batch_time,
        }

    def _optimizer_metrics(self, trainer: Trainer) -> dict[str, float]:
        metrics: dict[str, float] = {}
        norms: dict[str, list[torch.Tensor]] = {}
        taus: dict[str, list[torch.Tensor]] = {}
        for optimizer in self._optimizers:
            for layer_values in optimizer.last_diagnostics.values():
                for key, value in layer_values.items():
                    if key.startswith("update_norm_"):
                        norms.setdefault(key, []).append(value.detach().float().reshape(()))
                    elif key.startswith("tau_"):
                        taus.setdefault(key, []).append(value.detach().float().reshape(()))
        names, values = [], []
        for key, tensors in norms.items():
            names.append(key)
            values.append(torch.stack([t.to(tensors[0].device) for t in tensors]).square().sum().sqrt())
        for key, tensors in taus.items():
            stacked = torch.stack([t.to(tensors[0].device) for t in tensors])
            names += [f"{key}_min", f"{key}_max"]
            values += [stacked.min(), stacked.max()]
        if values:  # one device-to-host copy for all of them
            host = torch.stack([v.to(values[0].device) for v in values]).cpu().tolist()
            metrics.update(zip(names, host))
        metrics["skipped_steps"] = float(sum(o.skipped_steps for o in self._optimizers) + self.scaler_skipped_steps)
        metrics["rejected_preconditioner_updates"] = float(
            sum(o.rejected_preconditioner_updates for o in self._optimizers)
        )
        metrics["clipped_updates"] = float(sum(o.clipped_updates for o in self._optimizers))
        metrics["clipped_factor_updates"] = float(sum(o.clipped_factor_updates for o in self._optimizers))
        scaler = trainer_grad_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            metrics["grad_scale"] = float(scaler.get_scale())
        device = trainer.strategy.root_device
        if device.type == "cuda":
            metrics["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        return metrics

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer


class SINGDCallback(SINGDDiagnostics):
    """Train any ``LightningModule`` with SINGD, without changing its code.

    ::

        trainer = Trainer(callbacks=[SINGDCallback(lr=1e-3, structures=("diagonal", "diagonal"))])
        trainer.fit(model)

    With ``LightningCLI`` (or a YAML config) the options are parsed from the
    signature::

        --trainer.callbacks+=singd_lightning.SINGDCallback \\
        --trainer.callbacks.init_args.lr=0.01 \\
        '--trainer.callbacks.init_args.structures=[diagonal, hierarchical]'

    When fitting starts (``on_fit_start``, after Lightning has called
    ``configure_optimizers`` and before it restores a checkpoint's optimizer
    state), the optimizer the module configured is replaced by a new SINGD built
    on the (unwrapped) module, with the parameter groups of the replaced optimizer
    (its partition only, not its hyper-parameters; all trainable parameters if
    ``configure_optimizers`` returned None, in which case Lightning's "no
    optimizer" warning is not raised). Its LR schedulers are re-targeted to
    the new optimizer (see
    :func:`~singd_lightning.lightning.schedulers.retarget_scheduler`) and keep
    driving its learning rates, the fallback group's included; they keep their
    Lightning settings (interval, frequency, monitor). Resuming with
    ``trainer.fit(..., ckpt_path=...)`` loads the checkpoint's optimizer state into
    the new optimizer. The module must still define ``configure_optimizers``
    (Lightning requires it); it may return None.

    Under ``precision="16-mixed"`` the trainer's GradScaler is attached, so the
    curvature statistics are un-scaled exactly and inf steps leave the optimizer
    untouched. Gradient clipping clips the raw gradient before preconditioning.
    Supported strategies: single device, DDP (``"ddp"``, ``"ddp_spawn"``, ...) and
    ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` applied in
    ``configure_model``; the layers' factor work is split over the ranks, see
    :mod:`singd_lightning.optim.distributed`), and FSDP1 (``FSDPStrategy``) with
    ``use_orig_params=True``, stepping on the gathered full parameters (see
    :func:`~singd_lightning.lightning.sharded.step_on_full_parameters`); FSDP1
    with flat parameters and DeepSpeed fail in ``setup`` with an error.

    The optimizer options default to the optimizer's own defaults (None, or the
    same value); only options that differ from their default are passed on. The
    options are checked when the callback is created.

    Args:
        optimizer: ``"singd"`` (default), ``"ingd"``, ``"ikfac"`` or ``"kfac"``.
        log_diagnostics: Log diagnostics (see :class:`SINGDDiagnostics`).
        lr: β₂, the parameter learning rate (default 1e-3).
        momentum: α₂, momentum on the parameter updates, in [0, 1) (default 0.9).
        damping: λ, damping of the factor updates (default 1e-3).
        weight_decay: γ, L2 weight decay (default 0).
        T: Update the preconditioner every ``T`` steps (default 10).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``.
        loss_average: ``"batch"`` (default), ``"batch+sequence"`` or None (summed loss).
        preconditioner_dtype: The factors' dtype, one name for both or a
            ``(K's, C's)`` pair (None: the parameter dtype, the default);
            ``"auto"`` picks bfloat16 factors under the ``"bf16-mixed"`` and
            ``"bf16-true"`` precisions and the default otherwise.
        alpha1: SINGD only: α₁, Riemannian momentum of the factor updates
            (default 0.5; 0 for IKFAC).
        lr_cov: β₁, the factor learning rate, a float or a callable
            ``step -> float`` (default 1e-2); KFAC uses it only with
            ``stat_decay=None``.
        structures: SINGD only: the ``(K's, C's)`` structure, or one for both:
            names such as ``"diagonal"``, ``"hierarchical"``, or mappings such as
            ``{"name": "block_diagonal", "block_size": 32}`` (default dense).
        layer_structures: SINGD only: structures per layer kind (``"Linear"``,
            ``"Conv1d"``, ``"Conv2d"``, ``"Embedding"``) over ``structures``, e.g.
            ``{"Embedding": ["diagonal", "dense"]}`` (default: an embedding's K
            diagonal).
        kfac_like: SINGD only: drop the trace scaling and Riemannian momentum
            (default False; IKFAC is always KFAC-like).
        normalize_lr_cov: SINGD only: normalised factor steps (default False).
        max_factor_step: SINGD only: bound of a factor update's step, in (0, 1),
            or None for the paper's unbounded update (default 0.5).
        stat_decay: KFAC only: decay of the running curvature averages, or None
            for ``1 − lr_cov`` (default 0.95).
        damping_mode: KFAC only: ``"split"`` (√λ per factor, default) or
            ``"per_factor"`` (λ per factor).
        factor_init: The factors before their first update. KFAC:
            ``"statistics"`` (default) or ``"identity"``; SINGD: ``"identity"``
            (default, the paper), ``"scaled_identity"`` or ``"warm"``.
        fallback: First-order method for parameters outside ``nn.Linear``/
            ``nn.Conv1d``/``nn.Conv2d``: ``"adamw"`` (default), ``"sgd"`` or ``"none"``.
        fallback_lr: The fallback's learning rate (default: ``lr``).
        fallback_betas: AdamW's ``(β1, β2)`` (default (0.9, 0.999)).
        fallback_eps: AdamW's ε (default 1e-8).
        fallback_weight_decay: The fallback's weight decay, or None for each
            group's ``weight_decay`` (default 0).
        weight_decay_start: No weight decay of the Kronecker parameters before
            this step, or before ``20·T`` with ``"auto"`` (default 0).
        update_clip: Spike guard of the layer updates: the largest update norm
            relative to its running RMS, or None for never (default 30).
        kl_clip: KL clip κ of the preconditioned updates, None for off, or
            ``"default"``: the optimizer's own (1e-3 for SINGD, INGD and IKFAC;
            off for KFAC).
        init_grad_scale: The loss scale expected in the first backward pass
            (default 1).
        distributed_work: Split the factor work over the ranks, each layer
            updated by one owner (default None: for sharded parameters, which
            need it, and under DDP with two or more Kronecker layers; True:
            always on several ranks; False: off under DDP; see
            :mod:`singd_lightning.optim.distributed`).
        batch_layers: SINGD only: precondition layers of the same factor shapes
            in one batched call per group (default None: on CUDA only).
        grad_scaler: A ``torch.amp.GradScaler`` to un-scale the statistics with
            (default: the trainer's, under ``precision="16-mixed"``).
        params: Parameter groups (default: the replaced optimizer's partition).

    Raises:
        ValueError: For an unknown optimizer, an option the chosen optimizer does
            not take, or an invalid option value.
        TypeError: For a flag that is not a bool, or a ``grad_scaler`` that is not
            a ``torch.amp.GradScaler``.
    """

    def __init__(
        self,
        optimizer: str = "singd",
        log_diagnostics: bool = True,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        damping: float | None = None,
        weight_decay: float | None = None,
        T: int | None = None,
        kfac_approx: str | None = None,
        loss_average: str | None = "batch",
        preconditioner_dtype: str | tuple[str | None, str | None] | None = None,
        alpha1: float | None = None,
        lr_cov: float | Callable[[int], float] | None = None,
        structures: StructureOption | tuple[StructureOption, StructureOption] | None = None,
        layer_structures: dict[str, StructureOption | tuple[StructureOption | None, StructureOption | None] | None]
        | None = None,
        kfac_like: bool | None = None,
        normalize_lr_cov: bool | None = None,
        max_factor_step: float | None = MAX_FACTOR_STEP,
        stat_decay: float | None = 0.95,
        damping_mode: str | None = None,
        factor_init: str | None = None,
        fallback: str | None = None,
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] | None = None,
        fallback_eps: float | None = None,
        fallback_weight_decay: float | None = 0.0,
        weight_decay_start: int | str | None = None,
        update_clip: float | None = UPDATE_CLIP,
        kl_clip: float | Literal["default"] | None = "default",
        init_grad_scale: float | None = None,
        distributed_work: bool | None = None,
        batch_layers: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
    ) -> None:
        # The optimizer options as given (every keyword-only parameter above).
        given = {name: value for name, value in locals().items() if name in _DEFAULTS}
        key = optimizer.lower() if isinstance(optimizer, str) else optimizer
        if key not in KRONECKER_OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {optimizer!r} for SINGDCallback. Valid names: {', '.join(KRONECKER_OPTIMIZERS)}."
            )
        if params is not None:  # a generator would be used up by the first fit
            given["params"] = list(params)
        # A default means "the optimizer's default": pass on only what differs
        # from it, so that each optimizer keeps its own defaults (IKFAC's α₁ = 0).
        options = {name: value for name, value in given.items() if not _is_default(value, _DEFAULTS[name])}
        accepted = _optimizer_options(KRONECKER_OPTIMIZERS[key])
        foreign = [name for name in options if name not in accepted]
        if foreign:
            raise ValueError(
                f"SINGDCallback: optimizer={key!r} does not take {', '.join(foreign)}; "
                f"its options are {', '.join(sorted(accepted))}."
            )
        _check_options(KRONECKER_OPTIMIZERS[key], options)
        super().__init__(log_diagnostics=log_diagnostics)
        self.optimizer_name = key
        self.options = options
        self.optimizer: KroneckerOptimizer | None = None
        self._stand_in: tuple[LightningModule, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_strategy(trainer.strategy)
            self._install_stand_in(pl_module)

    def _install_stand_in(self, pl_module: LightningModule) -> None:
        """Make the module's ``configure_optimizers`` return a placeholder instead
        of None for this fit: the optimizer comes from ``on_fit_start``, so
        Lightning's "returned None, no optimizer" warning would be wrong.

        Lightning calls ``configure_optimizers`` (looked up on the instance) after
        the callbacks' ``setup``; the placeholder is the ``_MockOptimizer`` Lightning
        itself uses for None, which ``on_fit_start`` discards. The instance
        attribute is removed on the first call, in ``on_fit_start`` and in
        ``teardown``.
        """
        self._remove_stand_in()
        original = pl_module.configure_optimizers

        def configure_optimizers() -> Any:
            self._remove_stand_in()
            configured = original()
            return _MockOptimizer() if configured is None else configured

        self._stand_in = (pl_module, pl_module.__dict__.get("configure_optimizers", _MISSING))
        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def _remove_stand_in(self) -> None:
        if self._stand_in is None:
            return
        pl_module, previous = self._stand_in
        self._stand_in = None
        if previous is _MISSING:
            pl_module.__dict__.pop("configure_optimizers", None)
        else:
            pl_module.__dict__["configure_optimizers"] = previous

    def _options(self, trainer: Trainer) -> dict[str, Any]:
        options = dict(self.options)
        if options.get("preconditioner_dtype") == "auto":
            bf16 = str(trainer.precision) in _BF16_PRECISIONS
            options["preconditioner_dtype"] = ("bfloat16", "bfloat16") if bf16 else (None, None)
        return options

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_stand_in()
        strategy = trainer.strategy
        configured = [o for o in strategy.optimizers if not isinstance(o, _MockOptimizer)]
        if len(configured) > 1:
            raise ValueError(
                f"SINGDCallback replaces one optimizer, but configure_optimizers returned {len(configured)}. "
                "Build SINGD yourself with singd_lightning.lightning.configure_singd instead."
            )
        old = configured[0] if configured else None
        options = self._options(trainer)
        module_params = {id(p) for p in pl_module.parameters()}
        if "params" not in options and old is not None:
            old_params = [p for g in old.param_groups for p in g["params"]]
            if all(id(p) in module_params for p in old_params):
                options["params"] = [{"params": list(g["params"])} for g in old.param_groups if g["params"]]
        if isinstance(old, KroneckerOptimizer):
            old.remove_hooks()
        if self.optimizer is not None:  # from an earlier fit with this callback
            self.optimizer.remove_hooks()
        with full_parameters(strategy):  # (FSDPStrategy: the layers' shapes, not the shards')
            optimizer = build_optimizer(pl_module, self.optimizer_name, **options)
        if old is not None:
            index_of = {id(p): j for j, g in enumerate(old.param_groups) for p in g["params"]}
            group_map = [index_of.get(id(g["params"][0]), 0) for g in optimizer.param_groups]
            for config in strategy.lr_scheduler_configs:
                retarget_scheduler(config.scheduler, optimizer, group_map)
        strategy.optimizers = [optimizer]
        self.optimizer = optimizer

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_stand_in()
        if stage == "fit" and self.optimizer is not None:
            # The module may be fitted again (Lightning calls configure_optimizers
            # anew): leave no curvature hooks behind.
            self.optimizer.remove_hooks()


_MISSING = object()

#: The defaults of SINGDCallback's optimizer options, by name.
_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(SINGDCallback.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None
    return value is not None and not callable(value) and value == default


def _optimizer_options(cls: type[KroneckerOptimizer]) -> set[str]:
    """The keyword options of a Kronecker optimizer class: the named parameters of
    its ``__init__`` and of those it forwards ``**kwargs`` to (its bases')."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, KroneckerOptimizer)):
            break
        if "__init__" not in vars(klass):
            continue
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            if name not in ("self", "model", "defaults"):
                names.add(name)
    return names


def _check_options(cls: type[KroneckerOptimizer], options: dict[str, Any]) -> None:
    """Raise the optimizer's own ``ValueError``/``TypeError`` for a bad option now,
    not when fitting starts.

    The optimizer is built on a throwaway ``nn.Linear(1, 1)`` (a few scalars):
    the checks are then exactly the optimizer's, structures included. Its
    warnings (such as IKFAC's ignored ``alpha1``) are left to the real build.
    """
    probe_options = {name: value for name, value in options.items() if name not in ("params", "grad_scaler")}
    if probe_options.get("preconditioner_dtype") == "auto":
        probe_options["preconditioner_dtype"] = None
    check_grad_scaler(options.get("grad_scaler"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = cls(nn.Linear(1, 1), **probe_options)
    probe.remove_hooks()


__all__ = ["SINGDCallback", "SINGDDiagnostics", "StructureOption"]
