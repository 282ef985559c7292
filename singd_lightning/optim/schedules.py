"""Schedules of the factor learning rate β₁ (``lr_cov``).

``SINGD(lr_cov=...)`` takes a float or a callable ``step -> β₁``. The schedules
here are small picklable objects (module-level classes, plain attributes), so an
optimizer that holds one can be pickled, copied and checkpointed (a checkpoint
stores a placeholder for it and keeps the loading optimizer's schedule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from singd_lightning.optim.hyperparameters import check_range

#: The authors' β₁ warm-ups, as ``(milestones, factors)`` of :class:`LrCovWarmup`. Their
#: wrappers (f-dangel/singd before b5db71a, ``sparse_ngd/experimental/my_sngd_helpers.py``
#: and ``kfac_helpers.py``, ``warmup_factor=10``) set β₁ before each step from the number
#: ``s`` of steps taken: SINGD β₁/10⁴ while ``s ≤ 500``, β₁/100 while ``s ≤ 1000``, β₁/10
#: while ``s ≤ 2000``; KFAC (through ``stat_decay = 1 − β₁``) β₁/10⁴, /10³, /100, /10 while
#: ``s ≤ 500, 1000, 1500, 2000``. ``s ≤ n`` is ``s < n + 1`` here.
AUTHORS_WARMUPS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "authors_warmup": ((501, 1001, 2001), (1e-4, 1e-2, 1e-1)),
    "authors_kfac_warmup": ((501, 1001, 1501, 2001), (1e-4, 1e-3, 1e-2, 1e-1)),
}

#: Names accepted by the ``lr_cov_schedule`` option of the app and the Lightning factory.
LR_COV_SCHEDULES = tuple(AUTHORS_WARMUPS)


class LrCovWarmup:
    """β₁ scaled down at the start: ``lr_cov · factors[i]`` before ``milestones[i]``.

    With the defaults this is the warm-up of the SINGD authors' training wrappers
    (``AUTHORS_WARMUPS["authors_warmup"]``): β₁/10⁴ for steps 0 to 500, β₁/100 up to
    step 1000, β₁/10 up to step 2000, then β₁.

    Args:
        lr_cov: β₁ after the last milestone.
        milestones: Strictly increasing step counts where the next factor starts.
        factors: One factor in [0, ∞) per milestone, applied before it.

    Raises:
        ValueError: ``lr_cov`` is negative, or ``milestones`` and ``factors`` are not
            sequences of equal length with increasing integer milestones ≥ 0 and
            factors ≥ 0.
    """

    def __init__(
        self,
        lr_cov: float,
        milestones: Sequence[int] = AUTHORS_WARMUPS["authors_warmup"][0],
        factors: Sequence[float] = AUTHORS_WARMUPS["authors_warmup"][1],
    ) -> None:
        check_range("lr_cov", lr_cov, 0.0)
        milestones, factors = tuple(milestones), tuple(factors)
        if len(milestones) != len(factors):
            raise ValueError(
                f"milestones and factors must have the same length, got {len(milestones)} and {len(factors)}."
            )
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones) or any(
            a >= b for a, b in zip(milestones, milestones[1:])
        ):
            raise ValueError(f"milestones must be strictly increasing integers ≥ 0, got {milestones!r}.")
        for index, factor in enumerate(factors):
            check_range(f"factors[{index}]", factor, 0.0)
        self.lr_cov = float(lr_cov)
        self.milestones = milestones
        self.factors = tuple(float(f) for f in factors)

    def __call__(self, step: int) -> float:
        for milestone, factor in zip(self.milestones, self.factors):
            if step < milestone:
                return self.lr_cov * factor
        return self.lr_cov

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LrCovWarmup) and (self.lr_cov, self.milestones, self.factors) == (
            other.lr_cov,
            other.milestones,
            other.factors,
        )

    def __repr__(self) -> str:
        return f"LrCovWarmup(lr_cov={self.lr_cov}, milestones={self.milestones}, factors={self.factors})"


def lr_cov_warmup(
    lr_cov: float,
    milestones: Sequence[int] = AUTHORS_WARMUPS["authors_warmup"][0],
    factors: Sequence[float] = AUTHORS_WARMUPS["authors_warmup"][1],
) -> LrCovWarmup:
    """The authors' β₁ warm-up (see :class:`LrCovWarmup`), a picklable ``step -> β₁``."""
    return LrCovWarmup(lr_cov, milestones, factors)


def apply_lr_cov_schedule(options: Mapping[str, Any], default_lr_cov: float = 1e-2) -> dict[str, Any]:
    """Optimizer options with ``lr_cov_schedule`` turned into an ``lr_cov`` schedule.

    ``lr_cov_schedule`` is None (``lr_cov`` as given) or a name of
    :data:`AUTHORS_WARMUPS` (that warm-up of ``lr_cov``, or of ``default_lr_cov`` if
    unset). The key is removed; the other options are returned unchanged.

    Raises:
        ValueError: An unknown schedule name, or ``lr_cov`` is already a callable.
    """
    options = dict(options)
    name = options.pop("lr_cov_schedule", None)
    if name is None:
        return options
    if name not in LR_COV_SCHEDULES:
        raise ValueError(f"lr_cov_schedule must be null or one of {list(LR_COV_SCHEDULES)}, got {name!r}.")
    lr_cov = options.get("lr_cov", default_lr_cov)
    if callable(lr_cov):
        raise ValueError("lr_cov_schedule needs a number as lr_cov, got a callable (give one schedule).")
    options["lr_cov"] = lr_cov_warmup(lr_cov, *AUTHORS_WARMUPS[name])
    return options


__all__ = ["AUTHORS_WARMUPS", "LR_COV_SCHEDULES", "LrCovWarmup", "apply_lr_cov_schedule", "lr_cov_warmup"]
