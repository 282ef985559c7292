"""SINGDCallback under Lightning's ModelParallelStrategy with FSDP2 (``fully_shard``
in ``configure_model``), two gloo processes on CPU: with gradient accumulation
and clipping by the global norm, the full parameters equal one process on the
joint batch (32-true; bf16-mixed up to its rounding); DeepSpeed and FSDP1 with
flat parameters stay refused with an error naming what works."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from singd_lightning.lightning import SINGDCallback, check_strategy
from singd_lightning.lightning.sharded import shard_for_strategy
from tests.lightning.helpers import QUIET, InterleavedSampler, dataset, singd_options

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS = 4
CLIP = 0.05  # below the gradients' norm: clipping acts at every step


class Offset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class ShardedModule(pl.LightningModule):
    """Conv2d, LayerNorm, Linear and a bare parameter, sharded with ``fully_shard``
    under ModelParallelStrategy."""

    def __init__(self, batch_size: int, out_dir: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(2, 3, kernel_size=3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.LayerNorm(3 * 6 * 6), nn.Linear(3 * 6 * 6, 3), Offset(),
        )
        self.batch_size = batch_size
        self.out_dir = out_dir

    def configure_model(self) -> None:
        self.sharded_now = shard_for_strategy(self.model, self.trainer.strategy)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        data = dataset(48)
        sampler = InterleavedSampler(len(data), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def on_train_end(self) -> None:
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in self.named_parameters()}
        optimizer = self.trainer.optimizers[0]
        torch.save({"params": params, "steps": optimizer.steps, "world_size": self.trainer.world_size,
                    "sharded": optimizer._distributor is not None, "sharded_now": self.sharded_now,
                    # a second configure_model (a test after the fit) leaves the model as it is
                    "sharded_again": shard_for_strategy(self.model, self.trainer.strategy)},
                   Path(self.out_dir) / f"rank{self.trainer.global_rank}.pt")


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
    warnings.simplefilter("ignore")
    # The processes exist already: Lightning's environment reads them from here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    _fit(out_dir, devices=2, batch_size=4, accumulate=2)
    bf16 = Path(out_dir) / "bf16"
    bf16.mkdir(exist_ok=True)
    _fit(str(bf16), devices=2, batch_size=4, accumulate=2, precision="bf16-mixed")
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_parallel_fsdp2_equals_one_process_on_the_joint_batch(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(sharded)), nprocs=2, join=True)
    # Two ranks with micro-batches of 4, accumulating 2: one process with 16.
    _fit(str(single), devices=1, batch_size=16, accumulate=1)
    ranks = [torch.load(sharded / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(single / "rank0.pt")
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["sharded"] and r["sharded_now"] for r in ranks)
    assert not any(r["sharded_again"] for r in ranks) and not reference["sharded_now"]
    assert ranks[0]["steps"] == reference["steps"] == STEPS
    initial = ShardedModule(4, "").state_dict()
    for name, value in reference["params"].items():
        assert not torch.equal(value, initial[name]), name
        for rank in ranks:
            error = (rank["params"][name] - value).norm() / value.norm()
            assert error < 1e-4, (name, error.item())
    # bf16-mixed (autocast; float32 weights and factors): the same run up to
    # bfloat16 rounding of the activations.
    bf16 = [torch.load(sharded / "bf16" / f"rank{r}.pt") for r in range(2)]
    assert bf16[0]["steps"] == STEPS and bf16[0]["sharded"]
    for name, value in reference["params"].items():
        for rank in bf16:
            error = (rank["params"][name] - value).norm() / value.norm()
            assert error < 0.05, (name, error.item())


class ResumedModule(ShardedModule):
    """Two optimizer steps per epoch (16 samples, micro-batches of 4 on 2 ranks):
    a checkpoint at an epoch's end resumes with the next epoch's batches."""

    def train_dataloader(self):
        data = dataset(16)
        sampler = InterleavedSampler(len(data), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


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
    trainer.fit(ResumedModule(4, out_dir), ckpt_path=ckpt_path)


def _resume_worker(rank: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    for distributed in (True, False):
        run = Path(out_dir) / ("folder" if distributed else "file")
        _fit_checkpointed(str(run / "through"), distributed)
        _fit_checkpointed(str(run / "resumed"), distributed, ckpt_path=str(run / "through" / "epoch=0.ckpt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def test_model_parallel_checkpoints_resume_exactly(tmp_path):
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for kind in ("folder", "file"):
        # save_distributed_checkpoint=True writes a folder, False one file.
        assert (tmp_path / kind / "through" / "epoch=0.ckpt").is_dir() == (kind == "folder")
        for rank in range(2):
            through = torch.load(tmp_path / kind / "through" / f"rank{rank}.pt")
            resumed = torch.load(tmp_path / kind / "resumed" / f"rank{rank}.pt")
            assert through["steps"] == resumed["steps"] == STEPS
            # (factors, momenta and AdamW moments restored: the same computation)
            for name, value in through["params"].items():
                assert torch.equal(resumed["params"][name], value), (kind, name)


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
