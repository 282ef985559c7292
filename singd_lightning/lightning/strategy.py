"""Which Lightning strategies the Kronecker optimizers support (single device,
DDP, and ``ModelParallelStrategy`` with FSDP2), and a clear error for the others."""

from __future__ import annotations

from pathlib import Path
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

    sharded = isinstance(strategy, _sharded_strategy_types())
    fsdp1 = type(strategy).__name__ == "FSDPStrategy"
    supported = (SingleDeviceStrategy, DDPStrategy, *_model_parallel_type())
    if sharded or not isinstance(strategy, supported):
        raise ValueError(
            f"SINGD does not support the {type(strategy).__name__} strategy"
            + (" (it shards the weights in flat buffers" + (", also with use_orig_params=True" if fsdp1 else "")
               + ", but SINGD needs whole layers)" if sharded else "")
            + ". Supported strategies: single device ('auto') and data-parallel DDP ("
            + ", ".join(repr(name) for name in SUPPORTED_STRATEGIES[2:])
            + "; multi-node through torchrun/SLURM works with 'ddp'), and for sharded models "
            "ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) with FSDP2's fully_shard "
            "applied in configure_model"
            + (
                ": use it instead of FSDPStrategy (the app: trainer=fsdp; shard_for_strategy applies "
                "fully_shard layer by layer)."
                if fsdp1 else "."
            )
        )
    route_optimizer_checkpoints(strategy)


def route_optimizer_checkpoints(strategy: Any) -> None:
    """Under ``ModelParallelStrategy``, checkpoint the Kronecker optimizers with
    their own ``state_dict``/``load_state_dict``; a no-op under other strategies
    and when already done.

    The strategy saves and loads optimizer state through
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``/
    ``set_optimizer_state_dict``, which keep only ``torch.optim``'s per-parameter
    layout: the factors and momenta would be lost, and loading fails because the
    Kronecker parameters have no per-parameter state. So, for a Kronecker
    optimizer: with ``save_distributed_checkpoint=True`` each rank writes its
    part (:func:`~singd_lightning.optim.distributed.sharded_state_dict`: the
    layers it owns, its shards of the moments) as the folder's ``optimizer_<i>``
    entry, read back whole by
    :func:`~singd_lightning.optim.distributed.load_distributed_checkpoint`;
    otherwise the one file's ``optimizer_states`` holds its full state dict.
    Other optimizers keep the strategy's own path. Called by
    :func:`check_strategy`, so ``SINGDCallback`` and ``configure_singd`` route
    them.
    """
    if not isinstance(strategy, _model_parallel_type()) or getattr(strategy, "_kronecker_checkpoints", False):
        return
    from singd_lightning.optim import KroneckerOptimizer
    from singd_lightning.optim.distributed import load_distributed_checkpoint, sharded_state_dict

    strategy_optimizer_state = strategy.optimizer_state
    strategy_load_checkpoint = strategy.load_checkpoint

    def optimizer_state(optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's optimizer
        if isinstance(optimizer, KroneckerOptimizer):
            # (every rank calls this: the full state dict is collective)
            return sharded_state_dict(optimizer) if strategy._save_distributed_checkpoint else optimizer.state_dict()
        return strategy_optimizer_state(optimizer)

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        optimizers = list(strategy.optimizers)
        ours = [isinstance(o, KroneckerOptimizer) for o in optimizers]
        if not any(ours):
            return strategy_load_checkpoint(checkpoint_path, weights_only)
        if not all(ours):
            raise ValueError(
                "ckpt_path: a Kronecker optimizer next to other optimizers cannot resume under "
                "ModelParallelStrategy; use one optimizer (SINGDCallback or configure_singd)."
            )
        path = Path(strategy.broadcast(checkpoint_path))
        # The strategy loads the model and the metadata; the optimizers load here.
        strategy._optimizers = []
        try:
            checkpoint = strategy_load_checkpoint(path, weights_only)
        finally:
            strategy._optimizers = optimizers
        for index, optimizer in enumerate(optimizers):
            if path.is_dir():
                load_distributed_checkpoint(optimizer, path, key=f"optimizer_{index}")
            else:
                optimizer.load_state_dict(checkpoint["optimizer_states"][index])
        return checkpoint

    strategy.optimizer_state = optimizer_state
    strategy.load_checkpoint = load_checkpoint
    strategy._kronecker_checkpoints = True


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


__all__ = ["SUPPORTED_STRATEGIES", "check_strategy", "route_optimizer_checkpoints", "shard_for_strategy"]
