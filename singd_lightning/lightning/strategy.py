"""Which Lightning strategies the Kronecker optimizers support (single device,
DDP, ``ModelParallelStrategy`` with FSDP2, and ``FSDPStrategy`` with
``use_orig_params=True``), and a clear error for the others."""

from __future__ import annotations

from typing import Any

from singd_lightning.lightning.sharded import (
    fsdp1_types,
    model_parallel_types,
    sharded_now,
    route_optimizer_checkpoints,
    step_on_full_parameters,
)

SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _sharded_strategy_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy")
    return tuple(getattr(strategies, name) for name in names if hasattr(strategies, name))


def check_strategy(strategy: Any) -> None:
    """Raise unless ``strategy`` is one SINGD works with.

    Supported: single device, DDP (the model replicated on every rank),
    ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` applied in the module's
    ``configure_model`` on the ``"data_parallel"`` mesh): its parameters are
    ``DTensor`` s sharded on dim 0, whose layers the optimizer preconditions on
    their owner ranks (see :mod:`singd_lightning.optim.distributed`), and
    ``FSDPStrategy`` (FSDP1) with ``use_orig_params=True`` (Lightning's
    default), whose optimizer steps run on the gathered full parameters
    (:func:`step_on_full_parameters`). DeepSpeed, and FSDP1 with flat
    parameters, shard the weights in flat buffers, which neither the hooks nor
    the optimizer can map to layers.

    Under ``ModelParallelStrategy`` it routes the Kronecker optimizers'
    checkpoints (:func:`route_optimizer_checkpoints`).

    Args:
        strategy: A Lightning ``Strategy`` instance (e.g. ``trainer.strategy``).

    Raises:
        ValueError: For FSDP, DeepSpeed and any other strategy that is neither
            single-device, DDP nor ``ModelParallelStrategy``, naming the
            supported strategies.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    fsdp1 = isinstance(strategy, fsdp1_types())
    if fsdp1 and strategy.kwargs.get("use_orig_params"):
        if sharded_now(strategy):
            # The optimizer reads the layers' shapes from their weights: not from the flat shards.
            raise ValueError(
                "Under FSDPStrategy a Kronecker optimizer must be built on the full parameters: use "
                "SINGDCallback, or build it inside `with full_parameters(self.trainer.strategy):` "
                "(singd_lightning.lightning.sharded) in configure_optimizers."
            )
        step_on_full_parameters(strategy)
        return
    sharded = isinstance(strategy, _sharded_strategy_types())
    supported = (SingleDeviceStrategy, DDPStrategy, *model_parallel_types())
    if sharded or not isinstance(strategy, supported):
        raise ValueError(
            f"SINGD does not support the {type(strategy).__name__} strategy"
            + (" (it shards the weights in flat buffers" + (" when use_orig_params=False" if fsdp1 else "")
               + ", but SINGD needs whole layers)" if sharded else "")
            + ". Supported strategies: single device ('auto') and data-parallel DDP ("
            + ", ".join(repr(name) for name in SUPPORTED_STRATEGIES[2:])
            + "; multi-node through torchrun/SLURM works with 'ddp'), and for sharded models "
            "ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) with FSDP2's fully_shard "
            "applied in configure_model"
            + (
                " (the app: trainer=fsdp; shard_for_strategy applies fully_shard layer by layer), or "
                "FSDPStrategy(use_orig_params=True)."
                if fsdp1 else "."
            )
        )
    route_optimizer_checkpoints(strategy)


__all__ = ["SUPPORTED_STRATEGIES", "check_strategy"]
