"""Whether batching same-shaped layers pays: SINGD's per-layer work one layer at a
time against one batched call per group of layers with the same shapes.

Transformers repeat one block, so most of their layers come in groups with the
same (K structure, C structure) shapes, and every structure op takes leading
batch dimensions. For each such group of a model (two layers or more) this
times three structured operations of an SINGD step on the chosen device:

- ``precondition``: ``C Cᵀ Ĝ K Kᵀ`` from the factors' outer forms, as
  ``SINGD._precondition`` computes it (every step);
- ``statistic``: ``Π(Kᵀ X Xᵀ K)`` and ``Π(Cᵀ Y Yᵀ C)`` from ``--columns`` columns
  (``Structure.project_gram``; every ``T``-th step);
- ``factor_product``: ``K·M`` and ``C·N`` (``Structure.compose``, the product of
  each factor update).

Each is timed three ways, in turn within every round (median over ``--repeats``
rounds; on CUDA every call starts and ends with a synchronisation):

- ``one_by_one``: a call per layer (what the optimizer does layer by layer);
- ``batched``: the operands stacked (``torch.stack``, counted) and one call for
  the group; for ``precondition`` only the gradients are stacked, since the
  factors' forms would be stacked once per update;
- ``prestacked``: one call on operands stacked beforehand: the most batching
  could gain, were the group's state and gradients stored stacked.

And the whole ``optimizer.step()`` (``--step``: ``batch_layers`` off and on,
AdamW's step beside them) at a factor update and between updates (the
gradients fixed), with the number of operations each step dispatches (views
excluded; on a GPU, kernel launches), counted as on CUDA on any device (its
routes for launch-bound devices: the multi-tensor finiteness checks, batched
inner products, one-kernel sums of squares), and those of the backward pass
before an update, whose hooks collect the statistics (batched, they leave
the projections to the update step).

And whole training steps (``--train-step``: forward, backward and step of each
configuration in turn) with ``batch_layers`` off and on at ``T`` = 1 and 10, over
AdamW's.

The batched results are compared with the one-by-one results (a batched call
must compute the same thing, up to rounding): the script exits with status 1,
after writing its numbers, if any differ by more than :data:`TOLERANCE`. Example::

    python scripts/batch_layers.py --models vit --structures diagonal block_diagonal hierarchical
    python scripts/batch_layers.py --device cuda --models vit swin --json batching.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import MODELS, build_model  # noqa: E402

from singd_lightning import SINGD  # noqa: E402
from singd_lightning.optim import reductions  # noqa: E402
from singd_lightning.structures import Structure  # noqa: E402

OPERATIONS = ("precondition", "statistic", "factor_product")
WAYS = ("one_by_one", "batched", "prestacked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_groups(model: torch.nn.Module, structure: str) -> list[tuple[Structure, Structure, list[str]]]:
    """The groups of ``model``'s SINGD layers whose K and C structures have the same
    shapes: ``(layout_k, layout_c, layer names)``, largest groups first, only
    groups of two layers or more."""
    optimizer = SINGD(model, structures=(structure, structure))
    groups: dict[tuple[Structure, Structure], list[str]] = {}
    for layer in optimizer.layers:
        groups.setdefault(optimizer.layouts(layer), []).append(layer.name)
    return sorted(((k, c, names) for (k, c), names in groups.items() if len(names) > 1),
                  key=lambda group: -len(group[2]))


def precondition(layout_k: Structure, layout_c: Structure, form_k, form_c, grad: Tensor) -> Tensor:
    """``C Cᵀ Ĝ K Kᵀ`` for ``grad`` ``(*batch, d_C, d_K)`` from the factors' outer
    forms (:meth:`Structure.outer_form`, with the same leading dimensions): the
    arithmetic of ``SINGD._precondition``."""
    x = layout_k.matmul_outer_form(form_k, grad.mT)
    return layout_c.matmul_outer_form(form_c, x.mT)


def stack_forms(forms: Sequence) -> Tensor | tuple:
    """Outer forms of one structure (tensors or tuples of tensors) stacked along a
    new leading dimension."""
    if isinstance(forms[0], Tensor):
        return torch.stack(list(forms))
    return tuple(stack_forms([form[i] for form in forms]) for i in range(len(forms[0])))


def group_operands(layout_k: Structure, layout_c: Structure, count: int, columns: int, dtype: torch.dtype,
                   device: torch.device, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """Per layer: factors near the identity (``K``, ``C``), second factors for the
    products (``M``, ``N``), a gradient ``(d_C, d_K)`` and statistic columns
    ``X`` ``(d_K, n)``, ``Y`` ``(d_C, n)``."""
    def near_identity(layout: Structure) -> Tensor:
        noise = torch.randn(layout.numel, generator=generator) / layout.dim**0.5
        return layout.identity(dtype=torch.float32).add_(noise, alpha=0.1).to(device=device, dtype=dtype)

    def random(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    d_k, d_c = layout_k.dim, layout_c.dim
    return [{"K": near_identity(layout_k), "C": near_identity(layout_c), "M": near_identity(layout_k),
             "N": near_identity(layout_c), "grad": random(d_c, d_k), "X": random(d_k, columns) / columns**0.5,
             "Y": random(d_c, columns) / columns**0.5} for _ in range(count)]


def operation_calls(op: str, layout_k: Structure, layout_c: Structure,
                    layers: list[dict[str, Tensor]]) -> dict[str, Callable[[], list[Tensor]]]:
    """The three ways (:data:`WAYS`) of running ``op`` on a group's ``layers``;
    each returns one result per layer."""
    stacked = {key: torch.stack([layer[key] for layer in layers]) for key in layers[0]}
    if op == "precondition":
        forms = [(layout_k.outer_form(layer["K"]), layout_c.outer_form(layer["C"])) for layer in layers]
        form_k, form_c = stack_forms([f[0] for f in forms]), stack_forms([f[1] for f in forms])
        return {
            "one_by_one": lambda: [precondition(layout_k, layout_c, fk, fc, layer["grad"])
                                   for (fk, fc), layer in zip(forms, layers)],
            "batched": lambda: list(precondition(layout_k, layout_c, form_k, form_c,
                                                 torch.stack([layer["grad"] for layer in layers]))),
            "prestacked": lambda: list(precondition(layout_k, layout_c, form_k, form_c, stacked["grad"])),
        }
    if op == "statistic":
        def both(get: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
            return layout_k.project_gram(get("K"), get("X")), layout_c.project_gram(get("C"), get("Y"))
    else:
        def both(get: Callable[[str], Tensor]) -> tuple[Tensor, Tensor]:
            return layout_k.compose(get("K"), get("M")), layout_c.compose(get("C"), get("N"))

    def split(pair: tuple[Tensor, Tensor]) -> list[Tensor]:
        return [torch.cat([k, c]) for k, c in zip(*pair)]

    return {
        "one_by_one": lambda: [torch.cat(both(layer.__getitem__)) for layer in layers],
        "batched": lambda: split(both(lambda key: torch.stack([layer[key] for layer in layers]))),
        "prestacked": lambda: split(both(stacked.__getitem__)),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ways(calls: dict[str, Callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each call, the calls taking turns every round."""
    samples: dict[str, list[float]] = {way: [] for way in calls}
    for round_index in range(warmup + repeats):
        order = list(calls)[round_index % len(calls):] + list(calls)[:round_index % len(calls)]
        for way in order:
            _synchronize(device)
            start = time.perf_counter()
            calls[way]()
            _synchronize(device)
            if round_index >= warmup:
                samples[way].append(1e3 * (time.perf_counter() - start))
    return {way: statistics.median(values) for way, values in samples.items()}


def largest_difference(calls: dict[str, Callable]) -> float:
    """The largest difference of the batched results from the one-by-one ones,
    relative to each result's largest entry."""
    expected = calls["one_by_one"]()
    worst = 0.0
    for way in WAYS[1:]:
        for got, want in zip(calls[way](), expected):
            scale = want.abs().max().clamp_min(1e-30)
            worst = max(worst, float((got.float() - want.float()).abs().max() / scale))
    return worst


#: The most a batched result may differ (relative): rounding in another order of summation.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def measure(model_name: str, structures: Sequence[str], columns: int, repeats: int, warmup: int,
            device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One row per (structure, group, operation) of ``model_name``."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for structure in structures:
        for layout_k, layout_c, names in layer_groups(build_model(model_name), structure):
            layers = group_operands(layout_k, layout_c, len(names), columns, dtype, device, generator)
            for op in OPERATIONS:
                calls = operation_calls(op, layout_k, layout_c, layers)
                difference = largest_difference(calls)
                ms = time_ways(calls, repeats, warmup, device)
                rows.append({
                    "model": model_name, "structure": structure, "operation": op, "layers": len(names),
                    "d_K": layout_k.dim, "d_C": layout_c.dim, "shape": f"{layout_c.dim} × {layout_k.dim}",
                    "names": names,
                    **{f"{way}_ms": round(value, 4) for way, value in ms.items()},
                    "batched_speedup": round(ms["one_by_one"] / ms["batched"], 3),
                    "prestacked_speedup": round(ms["one_by_one"] / ms["prestacked"], 3),
                    "max_relative_difference": difference, "same": difference <= TOLERANCE[dtype],
                })
    return rows


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations that compute (views and dtype queries excluded):
    on a GPU each is a kernel launch, the cost of a step of many small operations."""

    VIEWS = frozenset({"view", "_unsafe_view", "slice", "select", "transpose", "t", "expand", "unsqueeze", "squeeze",
                       "permute", "alias", "as_strided", "split", "split_with_sizes", "unbind", "detach",
                       "lift_fresh", "promote_types", "result_type"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in self.VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_times(model_name: str, structure: str, batch_size: int, repeats: int, warmup: int,
               device: torch.device, seed: int = 0, update_repeats: int = 5) -> dict:
    """Median milliseconds of ``optimizer.step()`` with ``batch_layers`` off and on,
    and of AdamW's step, the three taking turns: at a factor update (each after a
    forward and backward pass, untimed, that collects the statistics;
    ``update_repeats`` rounds) and between updates (the gradients fixed;
    ``repeats`` rounds). With the operations each step dispatches
    (:class:`OperationCounter`), counted as on CUDA, and those of the backward
    pass before an update (with the hooks that collect the statistics)."""
    optimizers, batches = {}, {}
    for way in ("layer_by_layer", "batched", "adamw"):
        torch.manual_seed(seed)
        model = build_model(model_name).to(device)
        if way == "adamw":
            # foreach: what AdamW does on CUDA by default (a few multi-tensor kernels)
            optimizers[way] = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        else:
            optimizers[way] = SINGD(model, lr=1e-3, T=1, structures=(structure, structure),
                                    batch_layers=way == "batched")
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
        y = torch.randint(0, 100, (batch_size,), generator=generator).to(device)
        batches[way] = (model, x, y)

    def backward(way: str) -> None:
        model, x, y = batches[way]
        optimizers[way].zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    saved = reductions.LAUNCH_BOUND_DEVICES

    def count(call: Callable[[], None]) -> int:
        reductions.LAUNCH_BOUND_DEVICES = saved | {device.type}  # counted as on CUDA, on any device
        try:
            with OperationCounter() as counter:
                call()
        finally:
            reductions.LAUNCH_BOUND_DEVICES = saved
        return counter.count

    # At factor updates (T = 1): every step collects, updates and preconditions.
    update_ms: dict[str, list[float]] = {way: [] for way in optimizers}
    for round_index in range(1 + update_repeats):  # the first one moves the factors off the identity
        for way in optimizers:
            backward(way)
            _synchronize(device)
            start = time.perf_counter()
            optimizers[way].step()
            _synchronize(device)
            if round_index:
                update_ms[way].append(1e3 * (time.perf_counter() - start))
    counts = {}
    for way in optimizers:
        # with the statistics' hooks (AdamW: none)
        counts[f"{way}_backward_operations"] = count(lambda way=way: backward(way))
        counts[f"{way}_update_operations"] = count(optimizers[way].step)
    # Between updates: the steps only precondition, the gradients fixed.
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["T"] = 10**9
    ms = time_ways({way: optimizer.step for way, optimizer in optimizers.items()}, repeats, warmup, device)
    counts.update({f"{way}_operations": count(optimizer.step) for way, optimizer in optimizers.items()})
    return {"model": model_name, "structure": structure, "batch_size": batch_size,
            **{f"{way}_ms": round(value, 3) for way, value in ms.items()},
            **{f"{way}_update_ms": round(statistics.median(values), 3) for way, values in update_ms.items()},
            **counts,
            "batched_speedup": round(ms["layer_by_layer"] / ms["batched"], 3),
            "batched_update_speedup": round(statistics.median(update_ms["layer_by_layer"])
                                            / statistics.median(update_ms["batched"]), 3)}


def train_step_times(model_name: str, structures: Sequence[str], batch_size: int, rounds: int, warmup: int,
                     device: torch.device, seed: int = 0) -> list[dict]:
    """Whole training steps (forward, backward, ``optimizer.step()``) with
    ``batch_layers`` off and on at ``T`` = 1 and 10, over AdamW's step of the same
    (all configurations stepping in turn, the order rotating every round; ratios
    of the medians over ``rounds``): one row per (structure, T)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 100, (batch_size,), generator=generator).to(device)
    configs: dict[tuple, tuple] = {}
    for key in [("adamw", 0, None)] + [(s, T, batch) for s in structures for T in (1, 10) for batch in (False, True)]:
        torch.manual_seed(seed)
        model = build_model(model_name).to(device)
        structure, T, batch = key
        optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-3) if structure == "adamw" else
                     SINGD(model, lr=1e-3, T=T, structures=(structure, structure), batch_layers=batch))
        configs[key] = (model, optimizer)

    def train_step(key: tuple) -> None:
        model, optimizer = configs[key]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    # (T = 10: every configuration steps the same number of times, so a round's
    # steps are spread over the cycle of ten alike.)
    ms = time_ways({key: (lambda key=key: train_step(key)) for key in configs}, rounds, warmup, device)
    adamw = ms[("adamw", 0, None)]
    return [{"model": model_name, "structure": s, "T": T, "batch_size": batch_size,
             "off_x_adamw": round(ms[(s, T, False)] / adamw, 3), "on_x_adamw": round(ms[(s, T, True)] / adamw, 3),
             "on_over_off": round(ms[(s, T, True)] / ms[(s, T, False)], 3)} for s in structures for T in (1, 10)]


def totals(rows: list[dict]) -> list[dict]:
    """Per (model, structure, operation): the milliseconds of all groups summed."""
    out: dict[tuple, dict] = {}
    for row in rows:
        key = (row["model"], row["structure"], row["operation"])
        total = out.setdefault(key, {"model": key[0], "structure": key[1], "operation": key[2], "layers": 0,
                                     "shape": "all groups",
                                     **{f"{way}_ms": 0.0 for way in WAYS}})
        total["layers"] += row["layers"]
        for way in WAYS:
            total[f"{way}_ms"] += row[f"{way}_ms"]
    for total in out.values():
        total["batched_speedup"] = round(total["one_by_one_ms"] / total["batched_ms"], 3)
        total["prestacked_speedup"] = round(total["one_by_one_ms"] / total["prestacked_ms"], 3)
    return list(out.values())


def table(rows: list[dict]) -> str:
    """Markdown: milliseconds per way and the speed-ups over one by one (> 1: batching pays)."""
    lines = ["| model | structure | operation | layers | d_C × d_K | one by one ms | batched ms | prestacked ms "
             "| batched speed-up | prestacked speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['structure']} | {r['operation']} | {r['layers']} | {r['shape']} "
              f"| {r['one_by_one_ms']:.3f} "
              f"| {r['batched_ms']:.3f} | {r['prestacked_ms']:.3f} | {r['batched_speedup']:.2f} "
              f"| {r['prestacked_speedup']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit"], choices=sorted(MODELS))
    parser.add_argument("--structures", nargs="+", default=["diagonal", "block_diagonal", "hierarchical"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="of the factors and gradients (fp32: what bf16-mixed training preconditions in)")
    parser.add_argument("--columns", type=int, default=4096, help="columns of each statistic (samples × tokens)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a busy 2-core machine)")
    parser.add_argument("--step", action="store_true",
                        help="also time the whole optimizer.step() between updates, batch_layers off and on")
    parser.add_argument("--train-step", action="store_true",
                        help="also time whole training steps with batch_layers off and on, over AdamW's")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of --train-step")
    parser.add_argument("--no-operations", action="store_true",
                        help="skip the per-operation timings (with --step: only the whole step)")
    parser.add_argument("--batch-size", type=int, default=64, help="of the one training step before --step")
    parser.add_argument("--json", type=Path, help="write {environment, groups, totals, steps, train_steps} here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if min(args.columns, args.repeats, args.threads, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--columns, --repeats, --threads and --batch-size must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.no_operations and not (args.step or args.train_step):
        parser.error("--no-operations leaves nothing to measure without --step or --train-step")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rows = []
    for model in args.models if not args.no_operations else []:
        rows += measure(model, args.structures, args.columns, args.repeats, args.warmup, device, DTYPES[args.dtype])
    summed = totals(rows)
    if rows:
        print(table(rows))
        print("\nPer model, structure and operation (all groups):\n")
        print(table(summed))
    steps = [step_times(model, structure, args.batch_size, args.repeats, args.warmup, device)
             for model in args.models for structure in args.structures] if args.step else []
    if steps:
        print("\nWhole optimizer.step(), layer by layer → batched (AdamW's), and the operations it dispatches:\n")
        print("| model | structure | between updates: ms | operations | at an update: ms | operations "
              "| backward operations |")
        print("|---|---|---|---|---|---|---|")
        for r in steps:
            print(f"| {r['model']} | {r['structure']} | {r['layer_by_layer_ms']:.2f} → {r['batched_ms']:.2f} "
                  f"({r['adamw_ms']:.2f}) | {r['layer_by_layer_operations']} → {r['batched_operations']} "
                  f"({r['adamw_operations']}) | {r['layer_by_layer_update_ms']:.1f} → {r['batched_update_ms']:.1f} "
                  f"({r['adamw_update_ms']:.1f}) | {r['layer_by_layer_update_operations']} → "
                  f"{r['batched_update_operations']} ({r['adamw_update_operations']}) "
                  f"| {r['layer_by_layer_backward_operations']} → {r['batched_backward_operations']} "
                  f"({r['adamw_backward_operations']}) |")
    train_steps = [row for model in args.models for row in train_step_times(
        model, args.structures, args.batch_size, args.rounds, args.warmup, device)] if args.train_step else []
    if train_steps:
        print("\nWhole training steps over AdamW's, batch_layers off → on (ratios of medians):\n")
        print("| model | structure | T | off ×AdamW | on ×AdamW | on / off |")
        print("|---|---|---|---|---|---|")
        for r in train_steps:
            print(f"| {r['model']} | {r['structure']} | {r['T']} | {r['off_x_adamw']:.3f} | {r['on_x_adamw']:.3f} "
                  f"| {r['on_over_off']:.3f} |")
    if args.json:
        environment = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                       "torch": torch.__version__, "dtype": args.dtype, "threads": args.threads,
                       "columns": args.columns, "repeats": args.repeats}
        args.json.write_text(json.dumps({"environment": environment, "groups": rows, "totals": summed,
                                          "steps": steps, "train_steps": train_steps}, indent=1))
    differing = [r for r in rows if not r["same"]]
    for r in differing:
        print(f"DIFFERENT {r['model']} {r['structure']} {r['operation']} {r['d_C']}x{r['d_K']}: batched results "
              f"differ from one by one by {r['max_relative_difference']:.2e} (> {TOLERANCE[DTYPES[args.dtype]]:g})")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
