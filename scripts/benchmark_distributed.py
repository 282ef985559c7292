"""Optimizer time per step and per-rank optimizer state of SINGD across ranks.

Compares, on CPU processes with gloo, for world sizes 1 and 2:

* ``replicated``: DDP with ``distributed_work=False``, every rank does all the
  factor work;
* ``distributed``: DDP with ``distributed_work=True``, each rank updates the
  factors of the layers it owns and the factors are shared in one collective;
* ``fsdp``: the model sharded with FSDP2's ``fully_shard``, the owners
  precondition their layers' gathered gradients.

The model is an MLP with a ``width``-wide hidden layer (1024 by default), the
structures dense and one sparse one; T = 1 (a factor update every step). The
optimizer time is the median over the timed steps of the slowest rank's
``step()``; the state is :func:`~singd_lightning.optim.distributed.optimizer_state_bytes`
of each rank (factors, momenta, per-parameter state; a shard counts locally).

    python scripts/benchmark_distributed.py --out docs/benchmark-distributed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MODES = ("replicated", "distributed", "fsdp")


def _model(width: int, inputs: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )


def _run(mode: str, structure: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from singd_lightning import SINGD
    from singd_lightning.optim.distributed import optimizer_state_bytes

    model = _model(args.width, args.inputs, args.classes)
    if mode == "fsdp":
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = SINGD(
        wrapped, lr=1e-3, T=1, structures=structure, distributed_work={"replicated": False, "distributed": True}.get(mode)
    )
    generator = torch.Generator().manual_seed(1 + rank)
    times = []
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch, args.inputs, generator=generator)
        y = torch.randint(0, args.classes, (args.batch,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step
        if step >= args.warmup:
            times.append(float(elapsed))
    state = torch.tensor([optimizer_state_bytes(optimizer)], dtype=torch.float64)
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return {
        "world": world,
        "mode": mode,
        "structure": structure,
        "optimizer_ms": 1e3 * statistics.median(times),
        "state_bytes_per_rank": [int(s) for s in states],
    }


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        records = []
        for structure in args.structures:
            for mode in MODES:
                if world == 1 and mode == "distributed":
                    continue  # the same as replicated on one rank
                records.append(_run(mode, structure, args, rank, world))
        if rank == 0:
            Path(out).write_text(json.dumps(records))
        # Every rank done before any tears gloo down: a rank that destroys the
        # group while its peer still talks to it can abort that peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024, help="hidden width (at least 1024 for the README)")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--structures", nargs="+", default=["dense", "hierarchical"])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_worker, args=(world, os.path.join(tmp, f"store{world}"), args, out), nprocs=world, join=True)
            records += json.loads(Path(out).read_text())
    unsharded = {r["structure"]: r["state_bytes_per_rank"][0] for r in records if r["world"] == 1 and r["mode"] == "replicated"}
    replicated = {(r["world"], r["structure"]): r["optimizer_ms"] for r in records if r["mode"] == "replicated"}
    for r in records:
        r["state_ratio"] = max(r["state_bytes_per_rank"]) / unsharded[r["structure"]] if r["structure"] in unsharded else None
        base = replicated.get((r["world"], r["structure"]))
        r["time_ratio"] = r["optimizer_ms"] / base if base else None
    print(f"{'W':>2} {'structure':<13} {'mode':<12} {'opt ms':>8} {'× repl.':>8} {'state MiB/rank':>15} {'× unsharded':>12}")
    for r in records:
        print(
            f"{r['world']:>2} {r['structure']:<13} {r['mode']:<12} {r['optimizer_ms']:>8.1f} "
            f"{r['time_ratio']:>8.2f} {max(r['state_bytes_per_rank']) / 2**20:>15.2f} {r['state_ratio'] or float('nan'):>12.2f}"
        )
    if args.out is not None:
        meta = {"width": args.width, "inputs": args.inputs, "batch_per_rank": args.batch, "steps": args.steps,
                "threads_per_process": args.threads, "T": 1, "torch": torch.__version__, "cpus": os.cpu_count()}
        args.out.write_text(json.dumps({"settings": meta, "results": records}, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
