"""Which Lightning strategies the Kronecker optimizers support (single device,
DDP, and ``ModelParallelStrategy`` with FSDP2), and a clear error for the others."""

from __future__ import annotations

from typing import Any

SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _sharded_strategy_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy")
    return tuple(getattr(strategies, name) for name in names if hasattr(strategies, name))


def _model_parallel_type() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    return (strategies.ModelParallelStrategy,) if hasattr(strategies, "ModelParallelStrategy") else ()


def check_strategy(strategy: Any) -> None:
    """Raise unless ``strategy`` is one SINGD works with.

    Supported: single device, DDP (the model replicated on every rank) and
    ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` applied in the module's
    ``configure_model`` on the ``"data_parallel"`` mesh): its parameters are
    ``DTensor`` s sharded on dim 0, whose layers the optimizer preconditions on
    their owner ranks (see :mod:`singd_lightning.optim.distributed`). FSDP
    (``FSDPStrategy``, FSDP1's flat parameters) and DeepSpeed shard the weights
    in flat buffers, which neither the hooks nor the owners can map to layers.

    Args:
        strategy: A Lightning ``Strategy`` instance (e.g. ``trainer.strategy``).

    Raises:
        ValueError: For FSDP, DeepSpeed and any other strategy that is neither
            single-device, DDP nor ``ModelParallelStrategy``, naming the
            supported strategies.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    sharded = isinstance(strategy, _sharded_strategy_types())
    supported = (SingleDeviceStrategy, DDPStrategy, *_model_parallel_type())
    if sharded or not isinstance(strategy, supported):
        raise ValueError(
            f"SINGD does not support the {type(strategy).__name__} strategy"
            + (" (it shards the weights in flat buffers, but SINGD needs whole layers)" if sharded else "")
            + ". Supported strategies: single device ('auto') and data-parallel DDP ("
            + ", ".join(repr(name) for name in SUPPORTED_STRATEGIES[2:])
            + "; multi-node through torchrun/SLURM works with 'ddp'), and for sharded models "
            "ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) with FSDP2's fully_shard "
            "applied in configure_model."
        )


def shard_for_strategy(net: Any, strategy: Any) -> bool:
    """Under ``ModelParallelStrategy``, shard ``net`` with FSDP2 on the strategy's
    ``"data_parallel"`` mesh: each ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/
    ``nn.Embedding`` its own unit (its weights gathered only around its own
    forward and backward), then the rest of ``net``. For a module's
    ``configure_model``; a no-op under other strategies and for a ``net`` that
    is already sharded (``configure_model`` runs again for a test after a fit).

    Returns:
        Whether ``net`` was sharded now.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from singd_lightning.optim.curvature import SUPPORTED_MODULES

    if not isinstance(strategy, _model_parallel_type()) or isinstance(net, FSDPModule):
        return False
    mesh = strategy.device_mesh["data_parallel"]
    for module in net.modules():
        if isinstance(module, SUPPORTED_MODULES) and module is not net:
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return True


__all__ = ["SUPPORTED_STRATEGIES", "check_strategy", "shard_for_strategy"]
