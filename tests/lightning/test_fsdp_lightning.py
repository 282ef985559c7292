"""SINGDCallback under Lightning's ModelParallelStrategy with FSDP2 (``fully_shard``
in ``configure_model``), two gloo processes on CPU: with gradient accumulation
and clipping by the global norm, the full parameters equal one process on the
joint batch (32-true; bf16-mixed up to its rounding); DeepSpeed and FSDP1 with
flat parameters stay refused with an error naming what works."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from singd_lightning.lightning import SINGDCallback, check_strategy
from singd_lightning.lightning.sharded import shard_for_strategy
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

CLIP = 0.05  # below the gradients' norm: clipping acts at every step


class ShardedModule(ShardableModule):
    """:class:`ShardableModule` sharded with ``fully_shard`` under ModelParallelStrategy."""

    def configure_model(self) -> None:
        self.sharded_now = shard_for_strategy(self.model, self.trainer.strategy)

    def on_train_end(self) -> None:
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in self.named_parameters()}
        self.save_run(
            params, sharded=self.trainer.optimizers[0]._distributor is not None, sharded_now=self.sharded_now,
            # a second configure_model (a test after the fit) leaves the model as it is
            sharded_again=shard_for_strategy(self.model, self.trainer.strategy),
        )


def _fit(out_dir: str, devices: int, batch_size: int, accumulate: int, precision: str = "32-true") -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = pl.Trainer(
        **{**QUIET, "devices": devices},
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP,
        gradient_clip_algorithm="norm",
        use_distributed_sampler=False,
        callbacks=[SINGDCallback(**singd_options(T=2))],
    )
    trainer.fit(ShardedModule(batch_size, out_dir))


def _worker(rank: int, port: int, out_dir: str) -> None:
    join_two_ranks(rank, port)
    _fit(out_dir, devices=2, batch_size=4, accumulate=2)
    bf16 = Path(out_dir) / "bf16"
    bf16.mkdir(exist_ok=True)
    _fit(str(bf16), devices=2, batch_size=4, accumulate=2, precision="bf16-mixed")
    leave_two_ranks()


def test_model_parallel_fsdp2_equals_one_process_on_the_joint_batch(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    mp.spawn(_worker, args=(free_port(), str(sharded)), nprocs=2, join=True)
    # Two ranks with micro-batches of 4, accumulating 2: one process with 16.
    _fit(str(single), devices=1, batch_size=16, accumulate=1)
    ranks = [torch.load(sharded / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(single / "rank0.pt")
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["sharded"] and r["sharded_now"] for r in ranks)
    assert not any(r["sharded_again"] for r in ranks) and not reference["sharded_now"]
    assert ranks[0]["steps"] == reference["steps"] == STEPS
    assert_ranks_match(ranks, reference, 1e-4, initial=ShardedModule(4, "").state_dict())
    # bf16-mixed (autocast; float32 weights and factors): the same run up to
    # bfloat16 rounding of the activations.
    bf16 = [torch.load(sharded / "bf16" / f"rank{r}.pt") for r in range(2)]
    assert bf16[0]["steps"] == STEPS and bf16[0]["sharded"]
    assert_ranks_match(bf16, reference, 0.05)


def _fit_checkpointed(out_dir: str, distributed_checkpoint: bool, ckpt_path: str | None = None) -> None:
    """Four steps (two epochs) of SINGD with momentum (dense factors: private
    state on the owners, KFAC-like off) under ModelParallelStrategy, saving a
    checkpoint after each epoch; resumed from ``ckpt_path`` if given."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed_checkpoint)
    trainer = pl.Trainer(
        **{**QUIET, "devices": 2, "enable_checkpointing": True},
        strategy=strategy, max_epochs=STEPS // 2, use_distributed_sampler=False,
        callbacks=[SINGDCallback(**singd_options(T=1, structures=("dense", "dense"), alpha1=0.5)),
                   ModelCheckpoint(dirpath=out_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)],
    )
    # Two optimizer steps per epoch (16 samples, micro-batches of 4 on 2 ranks): a
    # checkpoint at an epoch's end resumes with the next epoch's batches.
    trainer.fit(ShardedModule(4, out_dir, samples=16), ckpt_path=ckpt_path)


def _resume_worker(rank: int, port: int, out_dir: str) -> None:
    join_two_ranks(rank, port)
    for distributed in (True, False):
        run = Path(out_dir) / ("folder" if distributed else "file")
        _fit_checkpointed(str(run / "through"), distributed)
        _fit_checkpointed(str(run / "resumed"), distributed, ckpt_path=str(run / "through" / "epoch=0.ckpt"))
    leave_two_ranks()


def test_model_parallel_checkpoints_resume_exactly(tmp_path):
    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for kind in ("folder", "file"):
        # save_distributed_checkpoint=True writes a folder, False one file.
        assert (tmp_path / kind / "through" / "epoch=0.ckpt").is_dir() == (kind == "folder")
        # (factors, momenta and AdamW moments restored: the same computation)
        assert_resumed_exactly(tmp_path / kind, kind)


def test_checkpoint_routing_happens_once_and_refuses_mixed_optimizers():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from singd_lightning import SINGD

    strategy = ModelParallelStrategy()
    check_strategy(strategy)
    routed = strategy.optimizer_state
    check_strategy(strategy)  # (a second fit) wraps nothing twice
    assert "optimizer_state" in vars(strategy) and strategy.optimizer_state is routed
    ddp = DDPStrategy()
    check_strategy(ddp)  # other strategies keep their own path
    assert "optimizer_state" not in vars(ddp)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    strategy._optimizers = [SINGD(model), torch.optim.AdamW(model.parameters())]
    with pytest.raises(ValueError, match="next to other optimizers cannot resume under ModelParallelStrategy"):
        strategy.load_checkpoint("unused.ckpt")


def test_deepspeed_and_fsdp1_are_refused_naming_what_works():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for strategy in (FSDPStrategy(use_orig_params=False), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        with pytest.raises(ValueError, match=r"flat buffers.*'ddp'.*ModelParallelStrategy.*fully_shard"):
            check_strategy(strategy)
    # FSDP1 works with original parameters (tests/lightning/test_fsdp1_lightning.py):
    # the error names both ways.
    with pytest.raises(ValueError, match=r"use_orig_params=False.*trainer=fsdp.*FSDPStrategy\(use_orig_params=True\)"):
        check_strategy(FSDPStrategy(use_orig_params=False))


def test_callback_passes_distributed_work_on_and_checks_it():
    assert SINGDCallback(distributed_work=True).options["distributed_work"] is True
    assert "distributed_work" not in SINGDCallback().options
    with pytest.raises(ValueError, match="distributed_work must be None, True or False"):
        SINGDCallback(distributed_work="yes")
