"""SINGDCallback under Lightning's FSDPStrategy (FSDP1, ``use_orig_params=True``),
two gloo processes on CPU: with gradient accumulation and clipping by value, the
full parameters equal one process on the joint batch; configure_singd works
inside ``full_parameters``; checkpoints (one file or a folder) hold the
optimizer's own state and resume exactly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from singd_lightning.lightning import SINGDCallback, check_strategy
from tests.lightning.helpers import (
    QUIET,
    SHARDED_STEPS as STEPS,
    ShardableModule,
    assert_ranks_match,
    assert_resumed_exactly,
    free_port,
    join_two_ranks,
    leave_two_ranks,
    singd_options,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CLIP = 0.01  # below the largest gradient entries: clipping acts


def _cpu_fsdp_strategy(**kwargs):
    """``FSDPStrategy`` made to run on the CPU, for these tests only: Lightning
    refuses ``type(strategy) is FSDPStrategy`` without a GPU accelerator, and
    FSDP1 needs ``device_id=torch.device("cpu")`` to place the shards on the CPU
    (Lightning passes the device index, None on the CPU). The wrapping below is
    the one Lightning applies, so the strategy then takes its own path
    (an already wrapped model)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), **self.kwargs)
            return super()._setup_model(model)

    return CPUFSDPStrategy(**kwargs)


class Module(ShardableModule):
    """:class:`ShardableModule`; FSDPStrategy wraps each Conv2d and Linear as its own unit."""

    def on_train_end(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        wrapped = isinstance(model, FullyShardedDataParallel)
        if wrapped:
            with FullyShardedDataParallel.summon_full_params(model):
                params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                          for n, p in self.named_parameters()}
            # the shards, outside: a rank holds only part of each parameter
            shard_sizes = sum(p.numel() for p in self.parameters())
        else:
            params = {n: p.detach().clone() for n, p in self.named_parameters()}
            shard_sizes = None
        self.save_run(params, wrapped=wrapped, shard_sizes=shard_sizes)


def _fit(out_dir: str, devices: int, batch_size: int, accumulate: int, precision: str = "32-true") -> None:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = (_cpu_fsdp_strategy(auto_wrap_policy=ModuleWrapPolicy({nn.Conv2d, nn.Linear}))
                if devices > 1 else "auto")
    trainer = pl.Trainer(
        **{**QUIET, "devices": devices},
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP,
        gradient_clip_algorithm="value",
        use_distributed_sampler=False,
        callbacks=[SINGDCallback(**singd_options(T=2))],
    )
    trainer.fit(Module(batch_size, out_dir))


def _fit_checkpointed(out_dir: str, state_dict_type: str, ckpt_path: str | None = None) -> None:
    """Four steps (two epochs) of SINGD with momentum and dense factors,
    checkpointed after each epoch; resumed from ``ckpt_path`` if given."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = pl.Trainer(
        **{**QUIET, "devices": 2, "enable_checkpointing": True},
        strategy=_cpu_fsdp_strategy(state_dict_type=state_dict_type), max_epochs=STEPS // 2,
        use_distributed_sampler=False,
        callbacks=[SINGDCallback(**singd_options(T=1, structures=("dense", "dense"), alpha1=0.5)),
                   ModelCheckpoint(dirpath=out_dir, filename="{epoch}", save_top_k=-1)],
    )
    trainer.fit(Module(4, out_dir, samples=16), ckpt_path=ckpt_path)


class ConfiguredModule(Module):
    """SINGD from configure_singd, built on the full parameters or (refused) on the shards."""

    def __init__(self, out_dir: str, full: bool) -> None:
        super().__init__(4, out_dir, samples=16)
        self.full = full

    def configure_optimizers(self):
        from contextlib import nullcontext

        from singd_lightning.lightning import configure_singd
        from singd_lightning.lightning.sharded import full_parameters

        with full_parameters(self.trainer.strategy) if self.full else nullcontext():
            return configure_singd(self, **singd_options(T=1))


def _fit_configured(out_dir: str, full: bool) -> None:
    trainer = pl.Trainer(**{**QUIET, "devices": 2}, strategy=_cpu_fsdp_strategy(), max_steps=2,
                         use_distributed_sampler=False)
    trainer.fit(ConfiguredModule(out_dir, full))


def _worker(rank: int, port: int, out_dir: str) -> None:
    join_two_ranks(rank, port)
    _fit(out_dir, devices=2, batch_size=4, accumulate=2)
    bf16 = Path(out_dir) / "bf16"
    bf16.mkdir(exist_ok=True)
    _fit(str(bf16), devices=2, batch_size=4, accumulate=2, precision="bf16-mixed")
    for kind in ("full", "sharded"):
        run = Path(out_dir) / kind
        _fit_checkpointed(str(run / "through"), kind)
        _fit_checkpointed(str(run / "resumed"), kind, ckpt_path=str(run / "through" / "epoch=0.ckpt"))
    configured = Path(out_dir) / "configured"
    configured.mkdir(exist_ok=True)
    _fit_configured(str(configured), full=True)
    try:
        _fit_configured(str(configured / "shards"), full=False)
    except ValueError as error:
        (Path(out_dir) / f"configure_error{rank}.txt").write_text(str(error))
    leave_two_ranks()


def test_fsdp1_equals_one_process_on_the_joint_batch_and_resumes_exactly(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    mp.spawn(_worker, args=(free_port(), str(sharded)), nprocs=2, join=True)
    # Two ranks with micro-batches of 4, accumulating 2: one process with 16.
    _fit(str(single), devices=1, batch_size=16, accumulate=1)
    ranks = [torch.load(sharded / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(single / "rank0.pt")
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["wrapped"] for r in ranks)
    total = sum(p.numel() for p in reference["params"].values())
    assert all(r["shard_sizes"] < total for r in ranks)  # really sharded
    assert ranks[0]["steps"] == reference["steps"] == STEPS
    assert_ranks_match(ranks, reference, 1e-4, initial=Module(4, "").state_dict())
    # bf16-mixed (autocast; float32 weights and factors): the same run up to
    # bfloat16 rounding of the activations.
    bf16 = [torch.load(sharded / "bf16" / f"rank{r}.pt") for r in range(2)]
    assert bf16[0]["steps"] == STEPS
    assert_ranks_match(bf16, reference, 0.05)
    # Resumed from the first epoch's checkpoint (one file, or a folder), the
    # run continues exactly: factors, momenta and AdamW moments restored.
    for kind in ("full", "sharded"):
        assert (sharded / kind / "through" / "epoch=0.ckpt").is_dir() == (kind == "sharded")
        assert_resumed_exactly(sharded / kind, kind)
    # configure_singd: on the full parameters it trains; on the shards it is refused.
    configured = [torch.load(sharded / "configured" / f"rank{r}.pt") for r in range(2)]
    assert all(r["steps"] == 2 and r["wrapped"] for r in configured)
    for rank in range(2):
        message = (sharded / f"configure_error{rank}.txt").read_text()
        assert "must be built on the full parameters" in message and "full_parameters" in message


def test_fsdp1_without_orig_params_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="use_orig_params=False.*FSDPStrategy\\(use_orig_params=True\\)"):
        check_strategy(FSDPStrategy(use_orig_params=False))
    strategy = FSDPStrategy()  # Lightning's default: use_orig_params=True
    check_strategy(strategy)
    check_strategy(strategy)  # installed once
    assert strategy._kronecker_full_steps


def test_fsdp1_checkpoints_refuse_mixed_optimizers_and_missing_states():
    from lightning.pytorch.strategies import FSDPStrategy

    from singd_lightning.optim import SINGD

    strategy = FSDPStrategy()
    strategy.load_checkpoint = lambda path, weights_only=None: {"epoch": 0}  # a checkpoint without them
    check_strategy(strategy)
    net = nn.Linear(3, 2)
    singd = SINGD(net)
    strategy._optimizers = [singd, torch.optim.AdamW(net.parameters())]
    with pytest.raises(ValueError, match="next to other optimizers cannot be checkpointed under FSDPStrategy"):
        strategy.save_checkpoint({"optimizer_states": [{}, {}]}, "unused.ckpt")
    strategy._optimizers = [singd]
    with pytest.raises(ValueError, match="holds no state of 1 Kronecker optimizer"):
        strategy.load_checkpoint("unused.ckpt")
    singd.remove_hooks()
