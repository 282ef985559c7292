"""How SINGD's factor start, β₁ warm-up and KL clip change the first epochs and a
long fixed-lr run (plain PyTorch, CPU, offline).

Workloads: MNIST-1D (``mnist1d``'s procedural generator, 4000/1000 sequences of
length 40) with the MLP 40-256-256-10, batch 100; scikit-learn digits (8×8,
1437/360 split) with an MLP 64-128-10, batch 64. Constant learning rates, T = 10.

For each workload and configuration: test accuracy after every epoch, the steps to
the workload's target accuracy (the first epoch end at or above it), the final and
the best test accuracy, and the training loss per epoch. The configurations:
AdamW and KFAC (baselines), INGD (dense SINGD) and hierarchical SINGD with
``factor_init`` identity (the paper), scaled_identity and warm, INGD warm with
``kl_clip=1e-3``, INGD with the authors' β₁ warm-up, INGD with α₁ = 0 (no
Riemannian momentum) and IKFAC (no trace terms), and the identity and warm starts
of INGD, IKFAC and hierarchical SINGD with ``kl_clip=1e-3``. Then the long run: INGD dense at lr 0.03 for ``--long-epochs`` epochs on
MNIST-1D, without and with ``kl_clip``; its training loss curves go to ``--png``.

    python scripts/warm_start.py --json docs/warm-start-cpu.json --png docs/warm-start-cpu.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from singd_lightning.optim.kfac import KFAC  # noqa: E402
from singd_lightning.optim.schedules import lr_cov_warmup  # noqa: E402
from singd_lightning.optim.singd import IKFAC, INGD, SINGD  # noqa: E402

#: Target test accuracy per workload (steps to it are reported).
TARGETS = {"mnist1d": 0.60, "digits": 0.95}
HIER = {"name": "hierarchical", "k1": 15, "k2": 15}


def _configs() -> dict[str, callable]:
    """Name -> ``(model, lr) -> optimizer``. Every option the library's defaults
    set is given explicitly, so the names keep their meaning if defaults change."""
    common = dict(damping=1e-3, T=10)
    paper = dict(common, factor_init="identity", kl_clip=None)
    clipped = dict(common, kl_clip=1e-3)
    return {
        "adamw": lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr),
        "kfac": lambda m, lr: KFAC(m, lr=lr, damping=1e-2, T=10, kl_clip=None),
        "ingd_identity": lambda m, lr: INGD(m, lr=lr, **paper),
        "ingd_identity_kl_clip": lambda m, lr: INGD(m, lr=lr, factor_init="identity", **clipped),
        "ingd_scaled_identity": lambda m, lr: INGD(m, lr=lr, **dict(paper, factor_init="scaled_identity")),
        "ingd_warm": lambda m, lr: INGD(m, lr=lr, **dict(paper, factor_init="warm")),
        "ingd_warm_kl_clip": lambda m, lr: INGD(m, lr=lr, factor_init="warm", **clipped),
        "ingd_authors_warmup": lambda m, lr: INGD(m, lr=lr, lr_cov=lr_cov_warmup(1e-2), **paper),
        "ingd_alpha1_0": lambda m, lr: INGD(m, lr=lr, alpha1=0.0, **paper),
        "ikfac_identity": lambda m, lr: IKFAC(m, lr=lr, **paper),
        "ikfac_identity_kl_clip": lambda m, lr: IKFAC(m, lr=lr, factor_init="identity", **clipped),
        "ikfac_warm": lambda m, lr: IKFAC(m, lr=lr, **dict(paper, factor_init="warm")),
        "ikfac_warm_kl_clip": lambda m, lr: IKFAC(m, lr=lr, factor_init="warm", **clipped),
        "singd_hier_identity": lambda m, lr: SINGD(m, lr=lr, structures=(HIER, HIER), **paper),
        "singd_hier_warm": lambda m, lr: SINGD(m, lr=lr, structures=(HIER, HIER), **dict(paper, factor_init="warm")),
        "singd_hier_warm_kl_clip": lambda m, lr: SINGD(
            m, lr=lr, structures=(HIER, HIER), factor_init="warm", **clipped
        ),
    }


def _data(workload: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    if workload == "mnist1d":
        from singd_lightning.data.mnist1d import load_mnist1d_tensors

        x, y, x_test, y_test = load_mnist1d_tensors()
        return x.flatten(1), y, x_test.flatten(1), y_test, 100
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:], 64


def _model(workload: str, in_dim: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if workload == "mnist1d":
        return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return nn.Sequential(nn.Linear(in_dim, width // 2), nn.ReLU(), nn.Linear(width // 2, 10))


def _max_factor(optimizer) -> float:
    """The largest |entry| of any SINGD factor (NaN for other optimizers)."""
    if not isinstance(optimizer, SINGD):
        return float("nan")
    return max(float(s[k].abs().max()) for s in optimizer.layer_state.values() for k in ("K", "C"))


def run(workload: str, name: str, build, lr: float, epochs: int, seed: int, width: int, limit: int | None) -> dict:
    """Train one configuration; return its curves and summary numbers."""
    x, y, x_test, y_test, batch = _data(workload)
    if limit:
        x, y, x_test, y_test = x[:limit], y[:limit], x_test[:limit], y_test[:limit]
    model = _model(workload, x.shape[1], width, seed)
    optimizer = build(model, lr)
    generator = torch.Generator().manual_seed(seed)
    losses, accs, factors = [], [], []
    steps, start = 0, time.perf_counter()
    steps_per_epoch = math.ceil(len(y) / batch)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total, count = 0.0, 0
        for i in range(0, len(y), batch):
            index = order[i : i + batch]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            total, count, steps = total + float(loss) * len(index), count + len(index), steps + 1
        losses.append(total / count)
        with torch.no_grad():
            accs.append(float((model(x_test).argmax(-1) == y_test).float().mean()))
        factors.append(_max_factor(optimizer))
    target = TARGETS[workload]
    first = next((i for i, a in enumerate(accs) if a >= target), None)
    return {
        "workload": workload,
        "config": name,
        "lr": lr,
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "target": target,
        "steps_to_target": None if first is None else (first + 1) * steps_per_epoch,
        "final_acc": accs[-1],
        "best_acc": max(accs),
        "train_loss": losses,
        "test_acc": accs,
        "max_factor": factors,
        "seconds": time.perf_counter() - start,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| workload | config | lr | seed | steps to target | final acc | best acc | final train loss | max factor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = "-" if r["steps_to_target"] is None else str(r["steps_to_target"])
        lines.append(
            f"| {r['workload']} | {r['config']} | {r['lr']:g} | {r['seed']} | {steps} | {r['final_acc']:.3f} | "
            f"{r['best_acc']:.3f} | {r['train_loss'][-1]:.3f} | {r['max_factor'][-1]:.2f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        epochs = range(1, len(r["train_loss"]) + 1)
        axes[0].plot(epochs, r["train_loss"], label=r["config"])
        axes[1].plot(epochs, r["max_factor"], label=r["config"])
    axes[0].set(xlabel="epoch", ylabel="training loss", title=f"MNIST-1D MLP, INGD dense, lr {rows[0]['lr']:g}")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="epoch", ylabel="max |K|, |C|", title="largest factor entry")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def small_batches(batches: list[int], steps: int = 60, width: int = 108) -> list[dict]:
    """The identity and the warm start on a batch smaller or larger than a layer's
    input: an MLP ``width``-64-3 on Gaussian inputs labelled by a fixed linear map
    (lr 0.05, β₁ 0.05, T = 2, SINGD's other defaults). Returns per start and
    batch size the spike guards' counters and the final training loss."""
    torch.manual_seed(0)
    teacher = torch.randn(3, width)
    rows = []
    for batch in batches:
        for start in ("identity", "warm"):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 3))
            optimizer = SINGD(model, lr=0.05, lr_cov=0.05, T=2, factor_init=start)
            generator = torch.Generator().manual_seed(0)
            for _ in range(steps):
                x = torch.randn(batch, width, generator=generator)
                y = (x @ teacher.T).argmax(1)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            with torch.no_grad():
                loss = nn.functional.cross_entropy(model(x), y).item()
            rows.append({"start": start, "batch": batch, "width": width, "clipped_updates": optimizer.clipped_updates,
                         "clipped_factor_updates": optimizer.clipped_factor_updates, "final_loss": loss})
            print(f"small batches: {start} batch {batch} (width {width}): clipped updates "
                  f"{optimizer.clipped_updates}, clipped factor steps {optimizer.clipped_factor_updates}, "
                  f"loss {loss:.3f}", flush=True)
    return rows


def start_cost(shapes: list[str], structures: tuple[str, ...] = ("dense", "hierarchical", "diagonal")) -> list[dict]:
    """Seconds of a layer's first ``step()`` (its factors' start) with the identity
    and the warm start, for ``nn.Linear`` layers of ``"<in>x<out>"`` ``shapes`` on
    256 random rows, T = 1, on every core of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for shape in shapes:
        d_in, d_out = (int(n) for n in shape.split("x"))
        for structure in structures:
            seconds = {}
            for start in ("identity", "warm"):
                torch.manual_seed(0)
                layer = nn.Linear(d_in, d_out)
                optimizer = SINGD(layer, structures=(structure, structure), factor_init=start, T=1)
                layer(torch.randn(256, d_in)).pow(2).mean().backward()
                begin = time.perf_counter()
                optimizer.step()
                seconds[start] = time.perf_counter() - begin
            rows.append({"shape": shape, "structure": structure, **{f"{k}_s": v for k, v in seconds.items()}})
            print(f"start cost: {shape} {structure}: identity {seconds['identity']:.2f} s, "
                  f"warm {seconds['warm']:.2f} s", flush=True)
    torch.set_num_threads(threads)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mnist1d", "digits"], choices=sorted(TARGETS))
    parser.add_argument("--configs", nargs="+", default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the comparison runs")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2],
                        help="learning rates tried for every configuration of the comparison")
    parser.add_argument("--long-epochs", type=int, default=50, help="epochs of the fixed-lr run (0: skip)")
    parser.add_argument("--long-lr", type=float, default=0.03)
    parser.add_argument("--kl-clip", type=float, nargs="+", default=[1e-3, 1e-2], help="kl_clip values of the long run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--width", type=int, default=256, help="hidden width (MNIST-1D; digits uses half)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many samples (smoke tests)")
    parser.add_argument("--small-batches", type=int, nargs="*", default=[8, 32, 256],
                        help="batch sizes of the small-batch check of the warm start (none: skip)")
    parser.add_argument("--start-cost", nargs="*", default=[], metavar="INxOUT",
                        help="Linear layer shapes whose first-step cost of each start is timed (e.g. 768x3072)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # comparable timings on a shared machine
    configs = _configs()
    names = args.configs or list(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {sorted(configs)}")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for workload in args.workloads:
            for name in names:
                for lr in args.lrs:
                    for seed in args.seeds:
                        rows.append(run(workload, name, configs[name], lr, args.epochs, seed, args.width, args.limit))
                        r = rows[-1]
                        print(f"{workload} {name} lr {lr:g} seed {seed}: final {r['final_acc']:.3f} "
                              f"steps {r['steps_to_target']} ({r['seconds']:.0f} s)", flush=True)
        long_rows = []
        if args.long_epochs:
            # The paper's start in each: the long run isolates the clip.
            common = dict(damping=1e-3, T=10, factor_init="identity")
            variants = {"ingd": lambda m, lr: INGD(m, lr=lr, kl_clip=None, **common)}
            for kappa in args.kl_clip:
                variants[f"ingd_kl_clip{kappa:g}"] = lambda m, lr, k=kappa: INGD(m, lr=lr, kl_clip=k, **common)
            for name, build in variants.items():
                long_rows.append(
                    run("mnist1d", name, build, args.long_lr, args.long_epochs, args.seeds[0], args.width, args.limit)
                )
                print(f"long {name}: final {long_rows[-1]['final_acc']:.3f}", flush=True)
        small = small_batches(args.small_batches) if args.small_batches else []
    cost = start_cost(args.start_cost) if args.start_cost else []
    print(_table(rows + long_rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "long": long_rows,
                                              "small_batches": small, "start_cost": cost}, indent=1))
    if args.png and long_rows:
        _plot(long_rows, args.png)


if __name__ == "__main__":
    main()
