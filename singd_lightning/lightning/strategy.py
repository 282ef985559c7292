"""Which Lightning strategies the Kronecker optimizers support, and a clear error
for the others."""

from __future__ import annotations

from typing import Any

SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _sharded_strategy_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    return tuple(getattr(strategies, name) for name in names if hasattr(strategies, name))


def check_strategy(strategy: Any) -> None:
    """Raise unless ``strategy`` replicates the whole model on every rank.

    SINGD hooks the ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers of the model and keeps full
    Kronecker factors of each layer; a sharded strategy (FSDP, DeepSpeed, model
    parallel) splits the weights across ranks, so neither the hooks nor the
    factors would see whole layers.

    Args:
        strategy: A Lightning ``Strategy`` instance (e.g. ``trainer.strategy``).

    Raises:
        ValueError: For FSDP, DeepSpeed, model-parallel and any other strategy that
            is neither single-device nor DDP, naming the supported strategies.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    sharded = isinstance(strategy, _sharded_strategy_types())
    if sharded or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"SINGD does not support the {type(strategy).__name__} strategy"
            + (" (it shards the model's weights across ranks, but SINGD needs whole layers)" if sharded else "")
            + ". Supported strategies: single device ('auto') and data-parallel DDP ("
            + ", ".join(repr(name) for name in SUPPORTED_STRATEGIES[2:])
            + "; multi-node through torchrun/SLURM works with 'ddp')."
        )


__all__ = ["SUPPORTED_STRATEGIES", "check_strategy"]
