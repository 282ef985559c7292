"""Callbacks of the app: training-step time, peak memory, divergence, RNG state in checkpoints."""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from singd_lightning.app.module import optimizer_state_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


class PerformanceMonitor(Callback):
    """Measures the training-step time and the peak memory; logs them each epoch.

    The step time is the wall time from ``on_train_batch_start`` to
    ``on_train_batch_end``: forward, backward and optimizer step (CUDA is
    synchronised on both ends). The optimizer step time is the part from
    ``on_before_optimizer_step`` (after the backward pass) to the end of the batch:
    gradient clipping and ``optimizer.step``'s own work. The first
    ``warmup_steps`` steps are left out of both.

    Peak memory is ``torch.cuda.max_memory_allocated`` (reset when training starts)
    on a GPU and the process's peak resident set size on a CPU; ``memory_kind``
    says which. ``optimizer_state_mb`` is the size of every tensor in the
    optimizer's state (device independent).

    Logged: ``perf/step_time_ms`` and ``perf/optimizer_step_ms`` (means over the
    epoch's measured steps), ``perf/peak_memory_mb`` and, at the end,
    ``perf/optimizer_state_mb``. With every validation, in its row of the logs:
    ``perf/train_time_s``, the training steps' cumulative wall time (every step,
    warm-up included; no evaluation or data loading), and ``perf/train_steps``, the
    optimizer steps so far, so that time- and steps-to-target read off one row.

    Args:
        warmup_steps: Leading training steps excluded from the step time.
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        super().__init__()
        self.warmup_steps = warmup_steps
        self._start: float | None = None
        self._opt_start: float | None = None
        self._seen = 0
        self._times: list[float] = []
        self._all_times: list[float] = []
        self._epoch_times: list[float] = []
        self._opt_times: list[float] = []
        self._all_opt_times: list[float] = []
        self._epoch_opt_times: list[float] = []
        self.memory_kind = "cpu_peak_rss"
        self.peak_memory_mb = float("nan")
        self.optimizer_state_mb = float("nan")

    @staticmethod
    def _mean_ms(times: list[float]) -> float:
        return 1000 * sum(times) / len(times) if times else float("nan")

    @property
    def step_time_ms(self) -> float:
        """Mean training-step time (ms) over the measured steps; all steps if too few."""
        return self._mean_ms(self._times or self._all_times)

    @property
    def optimizer_step_ms(self) -> float:
        """Mean optimizer-step time (ms) over the measured steps; all steps if too few."""
        return self._mean_ms(self._opt_times or self._all_opt_times)

    def _peak_memory_mb(self, pl_module: L.LightningModule) -> float:
        device = pl_module.device
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 1024**2
        return process_peak_rss_mb()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.memory_kind = "cuda_max_allocated"
        else:
            self.memory_kind = "cpu_peak_rss"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()
        self._opt_start = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        _sync(pl_module.device)
        self._opt_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        _sync(pl_module.device)
        now = time.perf_counter()
        elapsed = now - self._start
        opt_elapsed = None if self._opt_start is None else now - self._opt_start
        self._start = self._opt_start = None
        self._seen += 1
        self._all_times.append(elapsed)
        if opt_elapsed is not None:
            self._all_opt_times.append(opt_elapsed)
        if self._seen > self.warmup_steps:
            self._times.append(elapsed)
            self._epoch_times.append(elapsed)
            if opt_elapsed is not None:
                self._opt_times.append(opt_elapsed)
                self._epoch_opt_times.append(opt_elapsed)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Logged here, not at the training epoch's end: Lightning validates before that
        # hook, and a reader wants the time and steps in the row of the validation metrics.
        pl_module.log("perf/train_time_s", sum(self._all_times), rank_zero_only=True)
        pl_module.log("perf/train_steps", float(trainer.global_step), rank_zero_only=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        times = self._epoch_times or self._all_times
        if times:
            pl_module.log("perf/step_time_ms", self._mean_ms(times), rank_zero_only=True)
        opt_times = self._epoch_opt_times or self._all_opt_times
        if opt_times:
            pl_module.log("perf/optimizer_step_ms", self._mean_ms(opt_times), rank_zero_only=True)
        self._epoch_times = []
        self._epoch_opt_times = []
        self.peak_memory_mb = self._peak_memory_mb(pl_module)
        pl_module.log("perf/peak_memory_mb", self.peak_memory_mb, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_memory_mb = self._peak_memory_mb(pl_module)
        if trainer.optimizers:
            self.optimizer_state_mb = sum(optimizer_state_bytes(o) for o in trainer.optimizers) / 1024**2
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "perf/optimizer_state_mb": self.optimizer_state_mb,
                    "perf/peak_memory_mb": self.peak_memory_mb,
                    "perf/step_time_ms_mean": self.step_time_ms,
                    "perf/optimizer_step_ms_mean": self.optimizer_step_ms,
                },
                step=trainer.global_step,
            )


class DivergenceDetector(Callback):
    """Stops training once the training loss is NaN or infinite.

    After ``patience`` consecutive non-finite losses (on any rank) it sets
    ``trainer.should_stop`` and records the step in :attr:`diverged_step`; the app
    then skips testing and reports the run as ``"diverged"``.

    Args:
        patience: Consecutive non-finite losses that count as divergence.
    """

    def __init__(self, patience: int = 1) -> None:
        super().__init__()
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self._bad = 0
        self.diverged_step: int | None = None
        self.last_loss = float("nan")

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        value = float(loss.detach())
        self.last_loss = value
        self._bad = 0 if math.isfinite(value) else self._bad + 1
        stop = trainer.strategy.reduce_boolean_decision(self._bad >= self.patience, all=False)
        if stop and self.diverged_step is None:
            self.diverged_step = trainer.global_step
            trainer.should_stop = True
            pl_module.print(f"Training loss is {value} at step {trainer.global_step}: diverged, stopping.")


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and every initialised CUDA device), NumPy
    and Python's ``random``, as tensors and plain values (loadable with ``weights_only``)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss},
    }
    # Initialising CUDA only to read its generators would cost a CPU run a CUDA context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states for the devices present)."""
    # .cpu(): a checkpoint loaded with a GPU map_location holds these on the GPU
    torch.set_rng_state(states["torch"].cpu())
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), device)


class RNGStateCheckpoint(Callback):
    """Saves the global random states with every checkpoint and restores them when a
    run resumes, so dropout, random augmentation in the main process and anything else
    drawing from the global generators continues as in the uninterrupted run.

    The states are taken when the checkpoint is written (the end of an epoch, after
    its validation) and put back at the start of the first epoch the resumed run
    trains: restoring, setting up and the resumed run's bookkeeping draw nothing from
    them in between. Together with a loader that shuffles by seed and epoch (see
    :mod:`singd_lightning.data.sampler`) a run resumed from an epoch-end checkpoint
    is bit-identical to the uninterrupted one (same device and settings). Under DDP
    the checkpoint holds rank 0's states; every rank gets them back.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states of :meth:`state_dict` (a checkpoint's) for the next epoch start."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"RNGStateCheckpoint.load_state_dict expects the dict of state_dict(), got {type(state_dict).__name__}."
            )
        states = state_dict.get("rng")
        if not isinstance(states, Mapping) or not {"torch", "numpy", "python"} <= set(states):
            raise ValueError("the checkpoint's RNGStateCheckpoint entry lacks the torch, numpy and python RNG states.")
        self._pending = dict(states)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


__all__ = [
    "DivergenceDetector",
    "PerformanceMonitor",
    "RNGStateCheckpoint",
    "process_peak_rss_mb",
    "rng_states",
    "set_rng_states",
]
