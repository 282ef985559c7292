"""What the spike guards cost and buy, on real data (scikit-learn digits, small VGG).

Two measurements, all in one process:

1. **Ordinary training**: for each structure, a run with the guards (the
   default) and one with the paper's unguarded update. It records the largest
   ratio of a layer's update norm to its running RMS and the largest factor step
   ``‖β₁ m‖₂`` seen, how often each guard acted, and whether the two runs ended
   with bit-identical weights (they must when no guard acted).
2. **Loss spikes**: the loss of one step is multiplied by ``--spikes`` (at a
   step that updates the factors and at one that does not); final test accuracy
   of guarded SINGD, unguarded SINGD, AdamW and SGD, next to each one's run
   without a spike.

    python scripts/spike_guard.py --json spike_guard.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from singd_lightning import SINGD
from singd_lightning.data.digits import DigitsDataModule
from singd_lightning.models import create_model
from singd_lightning.optim.base import KroneckerOptimizer
from singd_lightning.structures.base import Structure

#: Learning rates of the digits data (the 3-epoch learning-rate sweep the measurement in
#: docs/spike-guard-cpu.json used; conf/tuned holds the converge suite's settings).
LEARNING_RATES = {"singd": 0.03, "adamw": 0.01, "sgd": 0.1}


@dataclass
class Run:
    method: str
    structure: str
    spike: float
    spike_step: int
    test_acc: float
    final_train_loss: float
    skipped_steps: int = 0
    clipped_updates: int = 0
    clipped_factor_updates: int = 0
    max_update_ratio: float = 0.0
    max_factor_step: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class _Recorder:
    """Largest update ratio and factor step seen (only for reporting: reads
    values back from the device every step)."""

    def __init__(self) -> None:
        self.max_ratio = 0.0
        self.max_step = 0.0
        self.lr_cov = 0.0
        self._bound = Structure.spectral_norm_bound
        self._clip = KroneckerOptimizer._clip_update

    def __enter__(self) -> _Recorder:
        recorder = self

        def spectral_norm_bound(layout, data):
            # Called on every factor step the guard checks: record its estimated ‖m‖₂.
            estimate = layout.spectral_norm(data)
            recorder.max_step = max(recorder.max_step, float(estimate.max()) * recorder.lr_cov)
            return recorder._bound(layout, data)

        def clip_update(optimizer, layer, natural, clip, pending, flags):
            avg = optimizer.update_norm_avg.get(layer.name)
            if avg is not None and float(avg) > 0:
                ratio = (float(natural.float().square().sum()) / float(avg)) ** 0.5
                recorder.max_ratio = max(recorder.max_ratio, ratio)
            return recorder._clip(optimizer, layer, natural, clip, pending, flags)

        Structure.spectral_norm_bound = spectral_norm_bound
        KroneckerOptimizer._clip_update = clip_update
        return self

    def __exit__(self, *exc) -> None:
        Structure.spectral_norm_bound = self._bound
        KroneckerOptimizer._clip_update = self._clip


def _optimizer(method: str, structure: str, model: nn.Module, guards: bool, T: int):
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATES["adamw"])
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LEARNING_RATES["sgd"], momentum=0.9)
    # The spike guards measured here are max_factor_step and update_clip; the KL
    # clip (SINGD's default) stays off so that they are measured alone.
    options = {"kl_clip": None} if guards else {"max_factor_step": None, "update_clip": None, "kl_clip": None}
    return SINGD(model, lr=LEARNING_RATES["singd"], T=T, structures=(structure, structure), **options)


def run(data: DigitsDataModule, method: str, structure: str, epochs: int, spike: float, spike_step: int,
        guards: bool = True, T: int = 10, seed: int = 0, limit_batches: int | None = None
        ) -> tuple[Run, dict[str, torch.Tensor]]:
    """Train ``epochs`` epochs with the loss of step ``spike_step`` multiplied by ``spike``."""
    torch.manual_seed(seed)
    model = create_model("vgg_small", num_classes=10, in_chans=3)
    optimizer = _optimizer(method, structure, model, guards, T)
    loader_gen = torch.Generator().manual_seed(seed)
    start, step, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    with _Recorder() as recorder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorder.lr_cov = 1e-2
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(data.train_set), generator=loader_gen)
            for batch in perm.split(data.batch_size)[:limit_batches]:
                x, y = data.train_set[batch]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                (loss * (spike if step == spike_step else 1.0)).backward()
                optimizer.step()
                step += 1
    model.eval()
    with torch.no_grad():
        x, y = data.test_set.tensors
        logits = model(x)
        acc = float((logits.argmax(-1) == y).float().mean()) if torch.isfinite(logits).all() else 0.0
    result = Run(method if guards or method != "singd" else "singd-unguarded", structure, spike, spike_step, acc,
                 float(loss.detach()), seconds=time.perf_counter() - start)
    if isinstance(optimizer, KroneckerOptimizer):
        result.skipped_steps = optimizer.skipped_steps
        result.clipped_updates = optimizer.clipped_updates
        result.clipped_factor_updates = optimizer.clipped_factor_updates
        result.max_update_ratio = recorder.max_ratio
        result.max_factor_step = recorder.max_step
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--structures", nargs="+", default=["diagonal", "hierarchical", "tril_toeplitz", "dense"])
    parser.add_argument("--spikes", nargs="+", type=float, default=[1e2, 1e6, 1e18])
    parser.add_argument("--spike-structure", default="hierarchical")
    parser.add_argument("--spike-steps", nargs="+", type=int, default=[30, 35],
                        help="steps whose loss is spiked (with T = 10, 30 updates the factors, 35 does not)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (smoke runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    data = DigitsDataModule(batch_size=args.batch_size)
    data.setup()
    runs: list[Run] = []

    print("## Ordinary training (no spike)\n")
    print("| structure | max update / running RMS | max ‖β₁ m‖₂ | guards acted | test acc | unguarded acc | same weights |")
    print("|---|---|---|---|---|---|---|")
    for structure in args.structures:
        guarded, weights = run(data, "singd", structure, args.epochs, 1.0, -1, limit_batches=args.limit_batches)
        paper, paper_weights = run(data, "singd", structure, args.epochs, 1.0, -1, guards=False,
                                     limit_batches=args.limit_batches)
        same = all(torch.equal(weights[k], paper_weights[k]) for k in weights)
        guarded.extra["bit_identical_to_unguarded"] = same
        runs += [guarded, paper]
        print(f"| {structure} | {guarded.max_update_ratio:.1f} | {guarded.max_factor_step:.3f} | "
              f"{guarded.clipped_updates} / {guarded.clipped_factor_updates} | {guarded.test_acc:.3f} | "
              f"{paper.test_acc:.3f} | {same} |", flush=True)

    print(f"\n## Loss spikes ({args.spike_structure} SINGD; test accuracy after {args.epochs} epochs)\n")
    methods = [("singd", True), ("singd", False), ("adamw", True), ("sgd", True)]
    names = ["SINGD", "SINGD unguarded", "AdamW", "SGD"]
    baseline = {name: run(data, m, args.spike_structure, args.epochs, 1.0, -1, guards=g,
                            limit_batches=args.limit_batches)[0]
                for name, (m, g) in zip(names, methods)}
    runs += list(baseline.values())
    print("| spike | step | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print("| none | | " + " | ".join(f"{baseline[n].test_acc:.3f}" for n in names) + " |")
    for spike in args.spikes:
        for spike_step in args.spike_steps:
            cells = []
            for (method, guards) in methods:
                result, _ = run(data, method, args.spike_structure, args.epochs, spike, spike_step, guards=guards,
                                limit_batches=args.limit_batches)
                runs.append(result)
                cells.append(f"{result.test_acc:.3f}")
            print(f"| ×{spike:g} | {spike_step} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)
    return runs


if __name__ == "__main__":
    main()
