"""SINGD under Lightning's sharded strategies: ``ModelParallelStrategy`` with
FSDP2 (sharding a module layer by layer, and checkpointing the Kronecker
optimizers' own state) and ``FSDPStrategy`` (FSDP1) with ``use_orig_params=True``
(stepping on the gathered full parameters).
:func:`~singd_lightning.lightning.strategy.check_strategy` installs what a
strategy needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsdp1_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    return (strategies.FSDPStrategy,) if hasattr(strategies, "FSDPStrategy") else ()


def model_parallel_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    return (strategies.ModelParallelStrategy,) if hasattr(strategies, "ModelParallelStrategy") else ()


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
    if not isinstance(strategy, model_parallel_types()) or getattr(strategy, "_kronecker_checkpoints", False):
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


#: Where checkpoints under FSDPStrategy keep the Kronecker optimizers' states.
_KRONECKER_STATES = "kronecker_optimizer_states"


def sharded_now(strategy: Any) -> bool:
    """Whether the strategy's model is FSDP1-wrapped and its parameters are shards now."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    model = strategy.model
    return isinstance(model, FullyShardedDataParallel) and model.training_state != TrainingState.SUMMON_FULL_PARAMS


@contextmanager
def full_parameters(strategy: Any) -> Iterator[None]:
    """Under ``FSDPStrategy`` with a wrapped model, the full parameters (gathered
    on every rank, changes discarded) for the ``with`` block, e.g. to build a
    Kronecker optimizer in ``configure_optimizers``; a no-op otherwise."""
    if not sharded_now(strategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
        yield


def step_on_full_parameters(strategy: Any) -> None:
    """Under ``FSDPStrategy`` (``use_orig_params=True``), run each Kronecker
    optimizer's step on the full parameters and gradients, and checkpoint its
    own state. A no-op when already done.

    The hooks see whole layers (FSDP1 runs each module on its unsharded
    weights) and the statistics are summed over ranks as under DDP, so every
    rank holds the same factors. The step itself needs whole weights and
    gradients: it runs inside ``FullyShardedDataParallel.summon_full_params(
    writeback=True, with_grads=True)`` (every rank, no ``rank0_only``; FSDP's
    CPU offload is refused there with gradients), after the closure
    (forward, backward, clipping), which must run outside it. Every rank
    computes the same full update and FSDP keeps its shard of it. Cost: full
    parameters and gradients on every rank during the step, factors and
    first-order moments replicated; ``ModelParallelStrategy`` (FSDP2) is the
    path whose memory falls with the ranks.

    Checkpoints hold the optimizer's own full ``state_dict`` (FSDP's
    ``optim_state_dict`` keeps only per-parameter state and would drop the
    factors), under a key of their own (FSDP1 would load the
    ``optimizer_states`` through that per-parameter path), in the one file
    (``state_dict_type="full"``) or the folder's metadata (``"sharded"``);
    ``ckpt_path`` loads it back with the optimizer's ``load_state_dict``.
    """
    if getattr(strategy, "_kronecker_full_steps", False):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    from singd_lightning.optim import KroneckerOptimizer

    strategy_optimizer_step = strategy.optimizer_step
    strategy_optimizer_state = strategy.optimizer_state
    strategy_save_checkpoint = strategy.save_checkpoint
    strategy_load_checkpoint = strategy.load_checkpoint

    def optimizer_step(optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not isinstance(optimizer, KroneckerOptimizer):
            return strategy_optimizer_step(optimizer, closure, model, **kwargs)
        step = optimizer.step

        def full_step(closure: Any = None, **step_kwargs: Any) -> Any:
            # The closure's forward and backward cannot run inside summon_full_params.
            loss = closure() if closure is not None else None
            with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=True, with_grads=True):
                step(**step_kwargs)
            return loss

        own_step = optimizer.__dict__.get("step")
        optimizer.step = full_step  # the precision plugin calls optimizer.step(closure=...)
        try:
            return strategy_optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            if own_step is None:
                del optimizer.step
            else:
                optimizer.step = own_step

    def optimizer_state(optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if isinstance(optimizer, KroneckerOptimizer):
            return optimizer.state_dict()  # (every rank calls this: collective under distributed work)
        return strategy_optimizer_state(optimizer)

    def ours(optimizers: list[Any]) -> bool:
        kronecker = [isinstance(getattr(o, "_optimizer", o), KroneckerOptimizer) for o in optimizers]
        if any(kronecker) and not all(kronecker):
            raise ValueError(
                "A Kronecker optimizer next to other optimizers cannot be checkpointed under "
                "FSDPStrategy; use one optimizer (SINGDCallback or configure_singd)."
            )
        return any(kronecker)

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if "optimizer_states" in checkpoint and ours(strategy.optimizers):
            # Under its own key, which FSDP1's loading (per-parameter state only) leaves alone.
            checkpoint = dict(checkpoint)
            checkpoint[_KRONECKER_STATES] = checkpoint.pop("optimizer_states")
        strategy_save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        optimizers = list(strategy.optimizers)
        if not ours(optimizers):
            return strategy_load_checkpoint(checkpoint_path, weights_only)
        # The strategy loads the model and the metadata; the optimizers load here.
        strategy._optimizers = []
        try:
            checkpoint = strategy_load_checkpoint(checkpoint_path, weights_only)
        finally:
            strategy._optimizers = optimizers
        states = checkpoint.pop(_KRONECKER_STATES, None)
        if states is None or len(states) != len(optimizers):
            raise ValueError(
                f"ckpt_path: {checkpoint_path} holds no state of {len(optimizers)} Kronecker optimizer(s) "
                "saved under FSDPStrategy; resume from a checkpoint of the same setup."
            )
        with full_parameters(strategy):  # (the layers' shapes are checked against the weights)
            for optimizer, state in zip(optimizers, states):
                optimizer.load_state_dict(state)
        checkpoint["optimizer_states"] = states  # (the strategy's load_optimizer_state_dict does nothing)
        return checkpoint

    strategy.optimizer_step = optimizer_step
    strategy.optimizer_state = optimizer_state
    strategy.save_checkpoint = save_checkpoint
    strategy.load_checkpoint = load_checkpoint
    strategy._kronecker_full_steps = True


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

    if not isinstance(strategy, model_parallel_types()) or isinstance(net, FSDPModule):
        return False
    mesh = strategy.device_mesh["data_parallel"]
    for module in net.modules():
        if isinstance(module, SUPPORTED_MODULES) and module is not net:
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return True


__all__ = [
    "fsdp1_types", "full_parameters", "model_parallel_types", "route_optimizer_checkpoints", "shard_for_strategy",
    "sharded_now", "step_on_full_parameters",
]
