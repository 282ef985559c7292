"""Small modules, data and trainer settings shared by the Lightning tests.

Everything lives at module level so that ``ddp_spawn`` can pickle it.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


LOW_PRECISION = (torch.float16, torch.bfloat16)


def dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return TensorDataset(x, y)


class PlainModule(pl.LightningModule):
    """Conv2d, LayerNorm, Linear and a bare parameter; AdamW with a StepLR.

    It knows nothing about SINGD.
    """

    def __init__(
        self,
        batch_size: int = 8,
        n: int = 48,
        scheduler: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        sampler: type | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(3 * 6 * 6)
        self.linear = nn.Linear(3 * 6 * 6, 3)
        self.offset = nn.Parameter(torch.zeros(3))
        self.batch_size = batch_size
        self.n = n
        self.scheduler = scheduler if scheduler is not None else {"interval": "epoch", "step_size": 1, "gamma": 0.5}
        self.optimizer_kind = optimizer
        self.sampler = sampler
        self.poison_steps: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.linear(self.norm(h)) + self.offset

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits.float() if logits.dtype in LOW_PRECISION else logits, y)
        if self.global_step in self.poison_steps:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        if self.optimizer_kind == "none":
            return None
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        config = dict(self.scheduler)
        interval = config.pop("interval")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, **config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def train_dataloader(self):
        data = dataset(self.n)
        if self.sampler is not None:
            sampler = self.sampler(len(data), self.trainer.global_rank, self.trainer.world_size)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


class InterleavedSampler(Sampler):
    """Rank ``r`` of ``W`` gets samples ``r, r + W, r + 2W, ...`` in order."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def singd_options(**overrides: Any) -> dict[str, Any]:
    options = {"lr": 0.05, "fallback_lr": 0.01, "T": 2, "damping": 1e-3, "lr_cov": 0.05, "momentum": 0.9}
    options.update(overrides)
    return options



# ------------------------------------------------ two gloo processes (sharded strategies)
#: Optimizer steps of the sharded-strategy runs.
SHARDED_STEPS = 4


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_two_ranks(rank: int, port: int) -> None:
    """Environment of rank ``rank`` of 2 processes that exist already (``mp.spawn``),
    from which Lightning's environment reads them; warnings off in the worker."""
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")


def leave_two_ranks() -> None:
    """Tear the process group of :func:`join_two_ranks` down once both ranks are
    done: a rank that destroyed gloo's group while its peer still used it could
    abort the peer ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Offset(nn.Module):
    """A bare parameter added to the output: trained by the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class ShardableModule(pl.LightningModule):
    """Conv2d, LayerNorm, Linear and a bare parameter on :func:`dataset`, each rank
    its interleaved share; AdamW, which the callback replaces. Subclasses save
    the full parameters at the end of training (:meth:`save_run`)."""

    def __init__(self, batch_size: int, out_dir: str, samples: int = 48) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(2, 3, kernel_size=3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.LayerNorm(3 * 6 * 6), nn.Linear(3 * 6 * 6, 3), Offset(),
        )
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.samples = samples

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        data = dataset(self.samples)
        sampler = InterleavedSampler(len(data), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def save_run(self, params: dict[str, torch.Tensor], **extra: Any) -> None:
        """``rank<r>.pt`` in ``out_dir``: the full ``params``, the optimizer's steps,
        the world size and ``extra``."""
        record = {"params": params, "steps": self.trainer.optimizers[0].steps,
                  "world_size": self.trainer.world_size, **extra}
        torch.save(record, Path(self.out_dir) / f"rank{self.trainer.global_rank}.pt")


def assert_ranks_match(ranks: list[dict], reference: dict, tolerance: float, initial: dict | None = None) -> None:
    """Every rank's saved parameters within relative ``tolerance`` of the one-process
    ``reference`` (and, given ``initial``, the reference moved from it)."""
    for name, value in reference["params"].items():
        if initial is not None:
            assert not torch.equal(value, initial[name]), name
        for rank in ranks:
            error = (rank["params"][name] - value).norm() / value.norm()
            assert error < tolerance, (name, error.item())


def assert_resumed_exactly(run_dir: Path, label: str) -> None:
    """The runs saved in ``run_dir/through`` and ``run_dir/resumed`` (resumed from
    the first epoch's checkpoint) took the same steps to bitwise equal parameters."""
    for rank in range(2):
        through = torch.load(run_dir / "through" / f"rank{rank}.pt")
        resumed = torch.load(run_dir / "resumed" / f"rank{rank}.pt")
        assert through["steps"] == resumed["steps"] == SHARDED_STEPS
        for name, value in through["params"].items():
            assert torch.equal(resumed["params"][name], value), (label, name)
