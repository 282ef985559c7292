"""Re-targeted schedulers drive the new optimizer exactly as schedulers built on it."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from singd_lightning import SINGD
from singd_lightning.lightning.schedulers import retarget_scheduler


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _singd(model: nn.Module) -> SINGD:
    return SINGD(model, lr=0.1, fallback_lr=0.01, momentum=0.9)


SCHEDULERS = {
    "step": partial(lrs.StepLR, step_size=2, gamma=0.5),
    "multistep": partial(lrs.MultiStepLR, milestones=[1, 3], gamma=0.3),
    "exponential": partial(lrs.ExponentialLR, gamma=0.9),
    "cosine": partial(lrs.CosineAnnealingLR, T_max=5),
    "warm_restarts": partial(lrs.CosineAnnealingWarmRestarts, T_0=3),
    "linear": partial(lrs.LinearLR, start_factor=0.25, total_iters=4),
    "constant": partial(lrs.ConstantLR, factor=0.5, total_iters=2),
    "polynomial": partial(lrs.PolynomialLR, total_iters=5, power=2.0),
    "lambda": partial(lrs.LambdaLR, lr_lambda=lambda step: 1.0 / (1 + step)),
    "multiplicative": partial(lrs.MultiplicativeLR, lr_lambda=lambda step: 0.8),
    "sequential": lambda opt: lrs.SequentialLR(
        opt, [lrs.LinearLR(opt, start_factor=0.1, total_iters=2), lrs.CosineAnnealingLR(opt, T_max=4)], milestones=[2]
    ),
    "chained": lambda opt: lrs.ChainedScheduler(
        [lrs.ConstantLR(opt, factor=0.5, total_iters=3), lrs.ExponentialLR(opt, gamma=0.9)]
    ),
    "onecycle": partial(lrs.OneCycleLR, max_lr=0.05, total_steps=8),
    "cyclic": partial(lrs.CyclicLR, base_lr=0.001, max_lr=0.02, step_size_up=2, cycle_momentum=False),
}


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The flat history of every group's lr and momentum over ``steps`` scheduler steps."""
    history = [g.get(k) for g in optimizer.param_groups for k in ("lr", "momentum")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            history += [g.get(k) for g in optimizer.param_groups for k in ("lr", "momentum")]
    return history


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_retargeted_scheduler_matches_one_built_on_singd(name):
    factory = SCHEDULERS[name]
    model = _model()
    reference_optimizer = _singd(model)
    reference = factory(reference_optimizer)
    expected = _lrs(reference, reference_optimizer, 7)

    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = factory(adamw)
    optimizer = _singd(model)
    retarget_scheduler(scheduler, optimizer)
    assert scheduler.optimizer is optimizer
    got = _lrs(scheduler, optimizer, 7)
    assert got == pytest.approx(expected, rel=1e-12)
    # The schedule moved the fallback group's lr as well (not for constant ones).
    assert got[-2] != got[2]  # the fallback group's lr moved too
    assert adamw.param_groups[0]["lr"] != optimizer.param_groups[0]["lr"] or name in ("constant",)


def test_stepped_scheduler_is_replayed():
    model = _model()
    reference_optimizer = _singd(model)
    reference = lrs.StepLR(reference_optimizer, step_size=1, gamma=0.5)
    expected = _lrs(reference, reference_optimizer, 5)

    adamw = torch.optim.AdamW(_model().parameters(), lr=1.0)
    scheduler = lrs.StepLR(adamw, step_size=1, gamma=0.5)
    _lrs(scheduler, adamw, 2)
    optimizer = _singd(_model())
    retarget_scheduler(scheduler, optimizer)
    got = _lrs(scheduler, optimizer, 3)
    assert got == pytest.approx(expected[8:], rel=1e-12)


def test_reduce_on_plateau_is_retargeted():
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = lrs.ReduceLROnPlateau(adamw, patience=0, factor=0.5)
    optimizer = _singd(model)
    retarget_scheduler(scheduler, optimizer)
    assert scheduler.min_lrs == [0, 0]
    scheduler.step(1.0)
    scheduler.step(2.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.005]


def test_per_group_lambdas_follow_their_groups():
    model = _model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim == 2)]
    adamw = torch.optim.AdamW([{"params": decay}, {"params": rest}], lr=1.0)
    scheduler = lrs.LambdaLR(adamw, [lambda s: 0.5**s, lambda s: 0.1**s])
    optimizer = SINGD(model, [{"params": decay}, {"params": rest}], lr=1.0)
    roles = [g["role"] for g in optimizer.param_groups]
    # group 0 of SINGD comes from AdamW group 0; the rest from group 1.
    retarget_scheduler(scheduler, optimizer, group_map=[0] + [1] * (len(roles) - 1))
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5] + [0.1] * (len(roles) - 1))
