"""The data-parallel statistics reduction: one float32 collective (not float64),
within its stated error bound of the float64 sum, one host read for all layers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from singd_lightning import SINGD
from tests.optim.test_syncs import SyncCounter

WORLD = 2


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8), nn.Linear(8, 4))
        optimizer = SINGD(model, lr=1e-2, T=1, structures="dense")
        torch.manual_seed(1 + rank)  # each rank its own data: the sums are inexact in float32
        x, y = torch.randn(16, 3, 6, 6) * (1 + 3 * rank), torch.randint(0, 4, (16,))
        nn.functional.cross_entropy(model(x), y).backward()
        # The float64 reference: the same float32 accumulators, summed exactly.
        names = [layer.name for layer in optimizer.layers]
        reference = {}
        for name in names:
            acc_in, acc_out, n, terms = optimizer._stats[name]
            exact = [acc_in.double(), acc_out.double(), acc_in.double().abs(), acc_out.double().abs(),
                     torch.tensor([n, terms], dtype=torch.float64)]
            for t in exact:
                dist.all_reduce(t)
            reference[name] = exact
        dtypes = []
        original = dist.all_reduce

        def recording(tensor, *args, **kwargs):
            dtypes.append(tensor.dtype)
            return original(tensor, *args, **kwargs)

        dist.all_reduce = recording
        try:
            with SyncCounter(set()) as counter:
                reduced = optimizer._reduced_statistics(optimizer.layers)
        finally:
            dist.all_reduce = original
        torch.save({"reduced": reduced, "reference": reference, "dtypes": dtypes, "syncs": counter.total},
                   Path(out) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


def test_all_reduce_is_float32_within_its_bound_of_float64(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for result in ranks:
        assert result["dtypes"] == [torch.float32]  # one collective, in float32
        assert result["syncs"] == 1  # the counts of every layer, read at once
    u = 2.0**-24
    for name, (sum_in, sum_out, abs_in, abs_out, counts) in ranks[0]["reference"].items():
        n, terms = counts.tolist()
        h_in, h_out = ranks[0]["reduced"][name]
        assert h_in.dtype == h_out.dtype == torch.float32
        # Every rank holds the same statistics.
        assert torch.equal(h_in, ranks[1]["reduced"][name][0]) and torch.equal(h_out, ranks[1]["reduced"][name][1])
        # |ŝ − s| ≤ (W − 1)·u·Σ|x|, plus one rounding of the normalisation.
        exact_in, bound_in = sum_in / n, ((WORLD - 1) * u * abs_in + 2 * u * sum_in.abs()) / n
        scale = max(terms, 1) / WORLD**2
        exact_out, bound_out = sum_out * scale, ((WORLD - 1) * u * abs_out + 2 * u * sum_out.abs()) * scale
        assert ((h_in.double() - exact_in).abs() <= bound_in + 1e-45).all(), name
        assert ((h_out.double() - exact_out).abs() <= bound_out + 1e-45).all(), name
