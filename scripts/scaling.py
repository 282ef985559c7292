"""How each structure's cost and state grow with the layer width ``d``.

For every structure and ``d`` in ``--dims`` (default 256 … 4096) it times one
preconditioner update of a ``d × d`` factor as SINGD performs it — the statistic
``Π(Kᵀ X Xᵀ K)`` for ``n`` rows, ``Π(Kᵀ K)``, the step ``K − β K m`` — and the
application ``K Kᵀ Gᵀ`` to a ``d × d`` gradient, and records the storage. It
prints a table and saves a log-log plot (``--out``, PNG) of time and storage
against ``d``, with the expected slopes: O(d) storage for diagonal and Toeplitz,
O(b·d) block-diagonal, O((k1+k2)·d) hierarchical, O(d²) dense storage with an
O(d³) update.

    python scripts/scaling.py --out scaling.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from singd_lightning.structures import resolve_structure

DEFAULT_STRUCTURES = [
    "dense",
    "diagonal",
    "block_diagonal",
    "hierarchical",
    "tril_toeplitz",
    "tril",
    "tril_bottom_right_diagonal",
]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, dim: int, rows: int, repeats: int) -> dict:
    """Seconds of one factor update and one preconditioning, and the storage."""
    layout = resolve_structure(name)(dim)
    torch.manual_seed(0)
    k = layout.identity()
    k.add_(0.01 * torch.randn_like(k))
    x = torch.randn(dim, rows)
    grad = torch.randn(dim, dim)

    def update() -> None:
        h = layout.project_gram(k, x)
        m = h + layout.project_self_gram(k) * 1e-3
        layout.add_identity_(m, -1.0)
        _ = k - layout.compose(k, m) * 1e-2

    def precondition() -> None:
        layout.matmul(k, layout.matmul(k, grad, transpose=True))

    return {
        "structure": name,
        "dim": dim,
        "update_s": _median_time(update, repeats),
        "precondition_s": _median_time(precondition, repeats),
        "storage": layout.numel,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in dict.fromkeys(r["structure"] for r in results):
        rows = [r for r in results if r["structure"] == name]
        dims = [r["dim"] for r in rows]
        for ax, key in zip(axes, ("update_s", "precondition_s", "storage")):
            ax.loglog(dims, [r[key] for r in rows], "o-", label=name, base=2)
    dims = sorted({r["dim"] for r in results})
    for ax, (key, title) in zip(axes, [("update_s", "factor update [s]"), ("precondition_s", "K Kᵀ Gᵀ [s]"), ("storage", "stored entries")]):
        ax.set_xlabel("d")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if key == "storage":  # reference slopes d and d²
            ax.loglog(dims, dims, "k:", label="∝ d", base=2)
            ax.loglog(dims, [d * d for d in dims], "k--", label="∝ d²", base=2)
    axes[-1].legend(fontsize=8)
    fig.suptitle("Cost and state of each structure against the layer width d")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", nargs="+", default=DEFAULT_STRUCTURES)
    parser.add_argument("--dims", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=256, help="rows n of the statistic X")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="scaling.png")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    print(f"{'structure':28s} {'d':>5s} {'update ms':>10s} {'precond ms':>11s} {'storage':>10s}")
    for name in args.structures:
        for dim in args.dims:
            r = measure(name, dim, args.rows, args.repeats)
            results.append(r)
            print(f"{name:28s} {dim:5d} {1e3 * r['update_s']:10.2f} {1e3 * r['precondition_s']:11.2f} {r['storage']:10d}", flush=True)
    plot(results, args.out)
    print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
