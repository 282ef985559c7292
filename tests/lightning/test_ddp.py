"""DDP through Lightning (two gloo processes on CPU) equals one process on the
joint batch, with the factor work split over the ranks by default (and the
same state, gathered, on every rank) or replicated, and one statistics
all-reduce per preconditioner-update step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from singd_lightning.lightning import SINGDCallback
from tests.lightning.helpers import (
    QUIET,
    InterleavedSampler,
    PlainModule,
    singd_options,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS = 6
OPTIONS = singd_options(T=2)


class CountCollectives(pl.Callback):
    """Counts Python-level ``all_reduce`` calls made inside each optimizer step and
    outside of steps (DDP's own gradient buckets are reduced in C++ and are not
    counted; Lightning skips them on non-final micro-batches with ``no_sync``)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.outside = 0
        self._inside = False

    def on_train_start(self, trainer, pl_module):
        original = dist.all_reduce

        def counting(*args, **kwargs):
            if self._inside:
                self.per_step[-1] += 1
            else:
                self.outside += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs):
        self.per_step.append(0)
        self._inside = True

    def _post(self, optimizer, args, kwargs):
        self._inside = False


class SavingModule(PlainModule):
    """Saves its parameters, factors and collective counts when training ends."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_train_end(self) -> None:
        optimizer = self.trainer.optimizers[0]
        counter = next(c for c in self.trainer.callbacks if isinstance(c, CountCollectives))
        # The full state (every rank calls it: with distributed work the owners'
        # private state is gathered).
        layers = optimizer.state_dict()["kronecker"]["layers"]
        state = {
            "params": {n: p.detach().cpu().clone() for n, p in self.named_parameters()},
            "factors": {f"{layer}.{k}": v.cpu().clone() for layer, s in layers.items() for k, v in s.items()},
            "private": {layer: sorted(s) for layer, s in optimizer.layer_state.items()},
            "distributed": optimizer._distributor is not None,
            "collectives": counter.per_step,
            "outside": counter.outside,
            "world_size": self.trainer.world_size,
        }
        torch.save(state, Path(self.out_dir) / f"rank{self.trainer.global_rank}.pt")


def _run(out_dir: Path, devices: int, batch_size: int, accumulate: int, **options) -> None:
    out_dir.mkdir()
    module = SavingModule(
        str(out_dir), batch_size=batch_size, n=48, sampler=InterleavedSampler if devices > 1 else None
    )
    trainer = pl.Trainer(
        **{**QUIET, "devices": devices},
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        use_distributed_sampler=False,
        callbacks=[SINGDCallback(**{**OPTIONS, **options}), CountCollectives()],
    )
    trainer.fit(module)


@pytest.mark.parametrize(("accumulate", "distributed_work"), [(1, None), (2, None), (1, False)])
def test_ddp_equals_one_process_on_the_joint_batch(tmp_path, accumulate, distributed_work):
    # Two ranks with micro-batches of 4 (rank r takes samples r::2) see, per
    # optimizer step, the same samples as one process with batches of 8·accumulate.
    _run(tmp_path / "ddp", devices=2, batch_size=4, accumulate=accumulate, distributed_work=distributed_work)
    _run(tmp_path / "single", devices=1, batch_size=8 * accumulate, accumulate=1)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert ranks[0]["world_size"] == 2
    # By default each rank updates the factors of its own layers (both layers
    # have an owner, each keeps the momenta of its own); off, every rank all.
    split = distributed_work is None
    assert [rank["distributed"] for rank in ranks] == [split, split] and not single["distributed"]
    holders = {layer: [r for r, rank in enumerate(ranks) if rank["private"][layer] == keys]
               for layer, keys in single["private"].items()}
    if split:  # one owner per layer, and both ranks own one
        assert sorted(r for held in holders.values() for r in held) == [0, 1], holders
    else:
        assert all(held == [0, 1] for held in holders.values()), holders

    # Every rank holds identical factors and parameters.
    for key, value in ranks[0]["factors"].items():
        assert torch.equal(value, ranks[1]["factors"][key]), key
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    # ... equal to one process on the joint batch (up to summation order).
    for key, value in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-9, atol=1e-12)
    for key, value in single["factors"].items():
        torch.testing.assert_close(ranks[0]["factors"][key], value, rtol=1e-9, atol=1e-12)
    # One flat all-reduce in each preconditioner-update step (T=2), none otherwise;
    # a single process communicates nothing.
    for rank in ranks:
        assert rank["collectives"] == [1, 0] * (STEPS // 2)
    assert single["collectives"] == [0] * STEPS
    # Nothing else is reduced from Python, in particular not on micro-batches.
    assert [rank["outside"] for rank in ranks] == [0, 0]
