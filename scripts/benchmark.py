"""Train-step time, optimizer state and peak memory of SINGD against its baselines.

Times the full train step (forward + backward + optimizer step; median over
``--steps`` steps after ``--warmup``, the configurations of a model stepping in
turn so that background load hits them alike) in one process for AdamW, SGD, KFAC, the
published reference package ``singd`` (each structure it has) and ours (each
structure), at the given ``T`` values, on three CIFAR-size models, and prints
ratios against AdamW and against the reference run in the same process. For
``T > 1`` the step time is the mean over a cycle of ``T`` steps: one step collects
statistics and updates the factors (as every step does at ``T = 1``, whose
configuration is always run too), ``T − 1`` steps only precondition, so it is
``((T − 1)·t_plain + t_1) / T`` with ``t_plain`` the median of the steps that
collect nothing and ``t_1`` the step time at ``T = 1``. Peak
memory of each configuration is measured so that runs don't pollute each other:
on CPU in a fresh subprocess, as the resident high-water mark reached during the
run beyond the memory held after the imports (with large blocks returned to the
system as soon as they are freed); on CUDA in this process, one configuration at
a time after the timing, as ``torch.cuda.max_memory_allocated`` beyond what was
allocated before it was built (the allocator counts live tensors exactly, and a
throw-away run first allocates the cuBLAS/cuDNN workspaces that every
configuration would otherwise pay for in turn). On CUDA every timed step starts
and ends with ``torch.cuda.synchronize`` (kernels run asynchronously).

Models: ``vgg`` (a small VGG), ``vgg16``, ``convmixer`` (ConvMixer-256/8), ``vit``
(CCT-7/3x1, also ``cct``) and ``swin`` (Swin, 32 px): the paper's CIFAR-size
models are ``vgg16 convmixer cct swin``; ``vit_quick`` and ``vgg_quick`` are the
small models of ``--quick``.

``--quick`` is a CPU regression guard of about 30 s: the step time of KFAC and of
SINGD (diagonal, hierarchical; ``T = 1`` and ``10``) over AdamW's on the quick
models, on one thread, checked against ``scripts/benchmark_baseline.json``
(exit status 1 when a ratio exceeds its baseline × ``--margin``; see
:func:`quick_ratios`).

Examples::

    python scripts/benchmark.py                          # everything (long on CPU)
    python scripts/benchmark.py --models vgg --T 1 10 --json bench.json
    python scripts/benchmark.py --device cuda --dtype bf16 --models vgg16 convmixer cct swin --batch-size 128
    python scripts/benchmark.py --models vgg --methods ours --compile   # torch.compile'd models
    python scripts/benchmark.py --quick                  # the regression guard (--write-baseline)

With ``--compile`` every configuration's model is wrapped in ``torch.compile``
(``--compile-backend``, default inductor) before its optimizer is built; the
compilation happens in the ``--warmup`` steps, which must be at least 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from singd_lightning import KFAC, SINGD
from singd_lightning.models import create_model
from singd_lightning.models.vgg import VGG

# Our structure name → the reference package's name for it (if it has one).
STRUCTURES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "block_diagonal": "block30diagonal",
    "hierarchical": "hierarchical15_15",
    "tril_toeplitz": "triltoeplitz",
    "triu_toeplitz": "triutoeplitz",
    "tril": None,
    "triu": None,
    "tril_bottom_right_diagonal": None,
    "triu_top_left_diagonal": None,
}
# The reference's size options, so that both sides compare like with like.
OPTIONS = {"block_diagonal": {"block_size": 30}, "hierarchical": {"k1": 15, "k2": 15}}


#: The benchmark models by name: all for 32×32 inputs and 100 classes.
MODELS = {
    "vgg": lambda: VGG([64, "M", 128, "M", 256, 256, "M", 512, "M"], num_classes=100),  # 2.2M parameters
    "vgg16": lambda: create_model("vgg16", num_classes=100),  # VGG-16 with BatchNorm, 14.8M
    "vit": lambda: create_model("cct_7_3x1_32", num_classes=100),  # CCT-7/3x1, ViT-like, 3.8M
    "cct": lambda: create_model("cct_7_3x1_32", num_classes=100),
    "convmixer": lambda: create_model("convmixer_256_8", num_classes=100),  # ConvMixer-256/8, 0.6M
    "swin": lambda: create_model("swin_tiny_32", num_classes=100),  # Swin for 32 px, 7.1M
    "tiny": lambda: create_model("convmixer_tiny", num_classes=100),  # smoke tests and dry runs
    # --quick: a two-block CCT of width 128 on an 8×8 token grid (0.3M parameters), so
    # that the optimizer's per-layer work weighs as much against the model as in CCT.
    "vit_quick": lambda: create_model("cct_7_3x1_32", num_classes=100, depth=2, embed_dim=128, stride=2),
    "vgg_quick": lambda: VGG([32, "M", 64, "M", 128, "M", 256, "M"], num_classes=100),  # 0.4M parameters
}


def build_model(name: str) -> nn.Module:
    """The benchmark model ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"Unknown benchmark model {name!r}; valid: {', '.join(MODELS)}.")
    return MODELS[name]()


@dataclass
class Config:
    model: str
    method: str  # adamw | sgd | kfac | reference | ours
    structure: str = ""
    T: int = 1
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    compile: str = ""  # torch.compile backend; "": eager


@dataclass
class Result:
    config: Config
    step_ms: float = float("nan")
    state_bytes: int = 0
    kronecker_state_bytes: int = 0
    peak_bytes: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)


def build_optimizer(config: Config, model: nn.Module):
    lr = 1e-3
    if config.method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if config.method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if config.method == "kfac":
        return KFAC(model, lr=lr, T=config.T)
    spec = {"name": config.structure, **OPTIONS.get(config.structure, {})}
    if config.method == "ours":
        return SINGD(model, lr=lr, T=config.T, structures=(spec, spec))
    if config.method == "reference":
        from singd.optim.optimizer import SINGD as ReferenceSINGD

        ref_name = STRUCTURES[config.structure]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ReferenceSINGD(model, lr=lr, T=config.T, structures=(ref_name, ref_name), warn_unsupported=False)
    raise ValueError(config.method)


def optimizer_state_bytes(optimizer, kronecker_only: bool = False) -> int:
    """Bytes of every tensor the optimizer keeps between steps (``kronecker_only``:
    without our first-order fallback's state for norm layers and the like, which
    the reference does not train at all)."""
    fallback = {
        id(p) for g in optimizer.param_groups if kronecker_only and g.get("role") == "fallback" for p in g["params"]
    }
    tensors = [
        t for p, st in optimizer.state.items() if id(p) not in fallback
        for t in st.values() if isinstance(t, torch.Tensor)
    ]
    if isinstance(optimizer, (SINGD, KFAC)):
        tensors += [t for st in optimizer.layer_state.values() for t in st.values()]
    for attribute in ("Ks", "Cs", "m_Ks", "m_Cs"):  # the reference package
        for matrix in getattr(optimizer, attribute, {}).values():
            tensors += [t for _, t in matrix.named_tensors()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Trainee:
    """One configuration's model, data and optimizer, stepping on demand."""

    def __init__(self, config: Config) -> None:
        torch.manual_seed(0)
        device = torch.device(config.device)
        self.config = config
        self.model = build_model(config.model).to(device)
        if config.compile:
            self.model = torch.compile(self.model, backend=config.compile)
        self.x = torch.randn(config.batch_size, 3, 32, 32, device=device)
        self.y = torch.randint(0, 100, (config.batch_size,), device=device)
        self.optimizer = build_optimizer(config, self.model)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")
        self.times: list[float] = []
        self.count = 0  # steps taken; those with count % T == 0 collect statistics

    def step(self, record: bool) -> None:
        _synchronize(self.config.device)
        start = time.perf_counter()
        self.optimizer.zero_grad()
        with self.autocast:
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        _synchronize(self.config.device)
        collects = self.count % self.config.T == 0
        self.count += 1
        # At T > 1 only the steps that collect nothing are timed here (see amortize).
        if record and (self.config.T == 1 or not collects):
            self.times.append(time.perf_counter() - start)


def run(configs: list[Config], steps: int, warmup: int) -> list[Result]:
    """Train every configuration ``warmup + steps`` steps, interleaved round by
    round so that background load affects all of them alike; the median of the
    last ``steps`` step times is reported (at ``T > 1``, of those among them that
    collect no statistics: see :func:`amortize`)."""
    trainees, results = [], {}
    for config in configs:
        try:
            trainees.append(_Trainee(config))
        except Exception as err:  # a failing baseline must not stop the benchmark
            results[id(config)] = Result(config, error=f"{type(err).__name__}: {err}"[:120])
    for step in range(warmup + steps):
        for trainee in list(trainees):
            try:
                trainee.step(record=step >= warmup)
            except Exception as err:
                results[id(trainee.config)] = Result(trainee.config, error=f"{type(err).__name__}: {err}"[:120])
                trainees.remove(trainee)
    for trainee in trainees:
        if not trainee.times:
            results[id(trainee.config)] = Result(trainee.config, error="every timed step collected: raise --steps")
            continue
        results[id(trainee.config)] = Result(
            trainee.config,
            step_ms=1e3 * statistics.median(trainee.times),
            state_bytes=optimizer_state_bytes(trainee.optimizer),
            kronecker_state_bytes=optimizer_state_bytes(trainee.optimizer, kronecker_only=True),
        )
    return [results[id(config)] for config in configs]


def amortize(results: list[Result]) -> None:
    """Turn the step time of each ``T > 1`` result (measured on steps that collect
    nothing) into the mean over a cycle of ``T`` steps, with the same method's
    ``T = 1`` step as the collecting one; both raw times go to ``extra``."""
    by_key = {(r.config.model, r.config.method, r.config.structure, r.config.T): r for r in results}
    for r in results:
        c = r.config
        one = by_key.get((c.model, c.method, c.structure, 1))
        if c.T == 1 or r.error:
            continue
        if one is None or one.error:
            r.error = "no T = 1 step to amortize with"
            continue
        r.extra.update(plain_step_ms=r.step_ms, collecting_step_ms=one.step_ms)
        r.step_ms = ((c.T - 1) * r.step_ms + one.step_ms) / c.T


def measure_peak(config: Config, steps: int) -> int:
    """Peak memory of a short run of ``config`` (bytes): on CUDA in this process
    (see :func:`cuda_peak`), on CPU in a fresh one."""
    if config.device == "cuda":
        return cuda_peak(config, steps)
    command = [sys.executable, __file__, "--peak-of", json.dumps(asdict(config)), "--steps", str(steps)]
    # A fixed mmap threshold makes glibc return every freed block of 128 KiB or more
    # at once, so the resident high-water mark tracks the memory the run holds
    # rather than what the allocator caches (which varies from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "peak run failed")
    return int(out.stdout.strip().splitlines()[-1])


_CUDA_WORKSPACES: set[str] = set()


def cuda_peak(config: Config, steps: int) -> int:
    """``torch.cuda.max_memory_allocated`` of a short run of ``config`` beyond what
    was allocated before it started (bytes). Nothing of an earlier configuration
    is alive by then; the library workspaces (cuBLAS, cuDNN) that stay allocated
    after a first run are made by a throw-away run of the same model first."""
    if config.model not in _CUDA_WORKSPACES:
        run([config], steps=1, warmup=0)
        _CUDA_WORKSPACES.add(config.model)
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run([config], steps=steps, warmup=1)[0]
    if result.error:
        raise RuntimeError(result.error)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _peak_main(config_json: str, steps: int) -> None:
    """Print the peak memory a short run allocates beyond what the process held
    before it (imports excluded), in bytes."""
    config = Config(**json.loads(config_json))
    if config.device == "cuda":
        print(cuda_peak(config, steps))
        return
    # Reset the resident high-water mark after the imports (Linux: clear_refs 5),
    # so the peak is the run's own: model, activations, optimizer state, temporaries.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _proc_status_kib("VmRSS")
    run([config], steps=steps, warmup=1)
    print((_proc_status_kib("VmHWM") - baseline) * 1024)


def configurations(args) -> list[Config]:
    configs = []
    common = dict(
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        compile=args.compile_backend if args.compile else "",
    )
    for model in args.models:
        configs += [Config(model, "adamw", **common), Config(model, "sgd", **common)]
        # T > 1 is amortized with the collecting step, timed as the T = 1 step.
        for T in sorted(set(args.T) | {1}):
            if "kfac" in args.methods:
                configs.append(Config(model, "kfac", T=T, **common))
            for structure in args.structures:
                if "reference" in args.methods and STRUCTURES[structure] is not None:
                    configs.append(Config(model, "reference", structure, T, **common))
                if "ours" in args.methods:
                    configs.append(Config(model, "ours", structure, T, **common))
    return configs


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "—"


def report(results: list[Result]) -> str:
    """A Markdown table of absolute numbers and ratios."""
    by_key = {(r.config.model, r.config.method, r.config.structure, r.config.T): r for r in results}
    lines = [
        "| model | method | structure | T | step ms | ×AdamW | ×reference | state MB | state ×AdamW "
        "| state ×reference (w/o fallback) | peak MB | peak ×AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.config
        if r.error:
            lines.append(f"| {c.model} | {c.method} | {c.structure} | {c.T} | failed: {r.error} ||||||||")
            continue
        adamw = by_key.get((c.model, "adamw", "", 1))
        ref = by_key.get((c.model, "reference", c.structure, c.T)) if c.method == "ours" else None
        lines.append(
            f"| {c.model} | {c.method} | {c.structure or '—'} | {c.T if c.method not in ('adamw', 'sgd') else '—'} "
            f"| {r.step_ms:.0f} | {_ratio(r.step_ms, adamw and adamw.step_ms)} "
            f"| {_ratio(r.step_ms, ref and not ref.error and ref.step_ms)} "
            f"| {r.state_bytes / 2**20:.2f} | {_ratio(r.state_bytes, adamw and adamw.state_bytes)} "
            f"| {_ratio(r.kronecker_state_bytes, ref and not ref.error and ref.state_bytes)} "
            f"| {r.peak_bytes / 2**20:.0f} | {_ratio(r.peak_bytes, adamw and adamw.peak_bytes)} |"
        )
    return "\n".join(lines)


#: What ``--quick`` measures against AdamW: (method, structure) at each of :data:`QUICK_T`.
QUICK_METHODS = (("kfac", ""), ("ours", "diagonal"), ("ours", "hierarchical"))
QUICK_T = (1, 10)
QUICK_MODELS = ("vit_quick", "vgg_quick")
#: ``--quick`` fails when a ratio exceeds its baseline by this factor: wide enough
#: that a busy shared 2-core machine never trips it (see the README).
QUICK_MARGIN = 1.5
#: The baselines ``--quick`` checks against (``--baseline``, ``--write-baseline``).
QUICK_BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_baseline.json")


def quick_key(config: Config) -> str:
    """The name of a ``--quick`` ratio, e.g. ``"vgg ours hierarchical T=10"``."""
    return " ".join(x for x in (config.model, config.method, config.structure, f"T={config.T}") if x)


def quick_ratios(models: list[str], batch_size: int, rounds: int, warmup: int) -> dict[str, float]:
    """Step time of KFAC and of SINGD (diagonal, hierarchical; ``T = 1`` and ``10``)
    over AdamW's, measured in this process.

    All configurations of a model step in turn, ``warmup + rounds`` rounds, the
    order rotating every round so that none always follows the same neighbour.
    Each round gives a ratio to AdamW's step of the same round (background load
    changes slowly, so near steps see the same); the result is the median over
    the rounds. At ``T = 10`` it is the mean over a cycle, ``(9·plain + collecting)
    / 10``, with the median ratio of the steps that collect nothing and that of
    the same method's ``T = 1`` step (which collects every time), as in :func:`amortize`.
    """
    ratios: dict[str, float] = {}
    for model in models:
        configs = [Config(model, "adamw", batch_size=batch_size)] + [
            Config(model, method, structure, T, batch_size=batch_size)
            for method, structure in QUICK_METHODS for T in QUICK_T
        ]
        trainees = [_Trainee(config) for config in configs]
        per_round: dict[str, list[float]] = {quick_key(c): [] for c in configs[1:]}
        for r in range(warmup + rounds):
            shift = r % len(trainees)
            times = {}
            for trainee in trainees[shift:] + trainees[:shift]:
                collects = trainee.count % trainee.config.T == 0
                trainee.step(record=True)
                if trainee.config.T == 1 or not collects:
                    times[id(trainee)] = trainee.times[-1]
            if r < warmup:
                continue
            adamw = times[id(trainees[0])]
            for trainee in trainees[1:]:
                if id(trainee) in times:
                    per_round[quick_key(trainee.config)].append(times[id(trainee)] / adamw)
        for config in configs[1:]:
            key = quick_key(config)
            if not per_round[key]:
                raise RuntimeError(f"--quick: no step of {key} collected nothing; raise --steps")
            ratios[key] = statistics.median(per_round[key])
        for config in configs[1:]:
            if config.T > 1:  # the cycle's mean, with the T = 1 step as its collecting step
                one = ratios[quick_key(Config(model, config.method, config.structure, 1))]
                key = quick_key(config)
                ratios[key] = ((config.T - 1) * ratios[key] + one) / config.T
    return ratios


def quick_regressions(ratios: dict[str, float], baseline: dict[str, float], margin: float) -> list[str]:
    """One line per ratio above its baseline × ``margin`` (ratios without a
    baseline are not checked)."""
    return [
        f"REGRESSION {key}: {ratio:.2f}× AdamW's step, baseline {baseline[key]:.2f}× "
        f"(limit {baseline[key] * margin:.2f}× with --margin {margin})"
        for key, ratio in ratios.items()
        if key in baseline and ratio > baseline[key] * margin
    ]


def quick_main(args) -> int:
    """``--quick``: measure :func:`quick_ratios`, then write them as the baseline
    (``--write-baseline``) or check them against it; the exit status (1: a ratio
    regressed, or nothing could be checked)."""
    models = args.models or list(QUICK_MODELS)
    baseline: dict[str, float] = {}
    if not args.write_baseline:
        if not os.path.exists(args.baseline):
            print(f"--baseline {args.baseline} does not exist; write it with --quick --write-baseline.", file=sys.stderr)
            return 1
        with open(args.baseline) as f:
            baseline = json.load(f)["ratios"]
    start = time.perf_counter()
    batch_size = 16 if args.batch_size is None else args.batch_size
    ratios = quick_ratios(models, batch_size, 15 if args.steps is None else args.steps, args.warmup)
    print(f"# --quick: {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s), "
          f"batch {batch_size}; step time ×AdamW (median over rounds)")
    for key, ratio in ratios.items():
        print(f"{key:40s} {ratio:6.2f}" + (f"   baseline {baseline[key]:.2f}" if key in baseline else ""))
    if args.write_baseline:
        record = {
            "note": "scripts/benchmark.py --quick: train-step time over AdamW's, measured in one process "
                    "(rewrite with --quick --write-baseline)",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "batch_size": batch_size,
            "ratios": {key: round(ratio, 3) for key, ratio in ratios.items()},
        }
        with open(args.baseline, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"wrote {args.baseline}")
        return 0
    if not set(ratios) & set(baseline):
        print(f"--baseline {args.baseline} has none of the measured ratios; write it with --write-baseline.",
              file=sys.stderr)
        return 1
    regressions = quick_regressions(ratios, baseline, args.margin)
    for line in regressions:
        print(line)
    print("quick check: " + (f"{len(regressions)} ratio(s) regressed" if regressions else "no regression"))
    return 1 if regressions else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="default: vgg vit convmixer (--quick: %s)" % " ".join(QUICK_MODELS))
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=list(STRUCTURES))
    parser.add_argument("--methods", nargs="+", default=["kfac", "reference", "ours"], choices=["kfac", "reference", "ours"])
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--batch-size", type=int, help="default: 64 (--quick: 16)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default: 5; --quick: 15 rounds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (timed after --warmup)")
    parser.add_argument("--compile-backend", default="inductor", help="the torch.compile backend of --compile")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU regression guard: a minute's ratios to AdamW checked against --baseline")
    parser.add_argument("--baseline", default=QUICK_BASELINE, help="the --quick baselines (JSON)")
    parser.add_argument("--write-baseline", action="store_true", help="--quick: write the ratios to --baseline")
    parser.add_argument("--margin", type=float, default=QUICK_MARGIN,
                        help="--quick fails when a ratio exceeds its baseline times this")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.margin <= 1:
        parser.error(f"--margin must be above 1, got {args.margin}")
    if (args.write_baseline or args.baseline != QUICK_BASELINE) and not args.quick:
        parser.error("--baseline and --write-baseline belong to --quick")
    if args.threads or args.quick:
        # One thread: two threads on a busy 2-core machine wait for each other and
        # slow steps down by up to 8× at random, which no margin could absorb.
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        if args.device != "cpu" or args.compile or args.dtype != "fp32":
            parser.error("--quick runs on the CPU in float32, eager: drop --device, --dtype and --compile")
        sys.exit(quick_main(args))
    args.models = args.models or ["vgg", "vit", "convmixer"]
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    args.steps = 5 if args.steps is None else args.steps
    if args.compile and args.warmup < 1:
        parser.error("--warmup must be at least 1 with --compile (the first steps compile the model)")
    if args.peak_of:
        _peak_main(args.peak_of, args.steps)
        return
    print(f"# {platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"torch {torch.__version__} · {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "") + f" · {args.dtype}"
          + (f" · torch.compile ({args.compile_backend})" if args.compile else " · eager"), flush=True)
    results = []
    configs = configurations(args)
    for model in args.models:  # one interleaved group per model
        group = run([c for c in configs if c.model == model], args.steps, args.warmup)
        amortize(group)
        # Written before the peaks too: a run stopped during them keeps its times.
        _write_json(args.json, results + group)
        peaks = {}
        for result in group:
            c = result.config
            if not args.no_peak and not result.error:
                # The first step collects at every T: a T > 1 run peaks as T = 1 does.
                key = (c.method, c.structure)
                try:
                    result.peak_bytes = peaks.get(key) or measure_peak(result.config, steps=2)
                    peaks[key] = result.peak_bytes
                except RuntimeError as err:
                    result.error = f"peak: {err}"[:120]
            print(f"{c.model:10s} {c.method:9s} {c.structure:28s} T={c.T:<3d} "
                  f"{result.step_ms:9.1f} ms  state {result.state_bytes / 2**20:8.2f} MB  "
                  f"peak {result.peak_bytes / 2**20:8.0f} MB {result.error}", flush=True)
        results += group
        _write_json(args.json, results)
    print()
    print(report(results))


def _write_json(path: str | None, results: list[Result]) -> None:
    """All results so far, one flat record each (nothing without ``--json``)."""
    if path:
        with open(path, "w") as f:
            json.dump([{**asdict(r.config), **{k: v for k, v in asdict(r).items() if k != "config"}} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
