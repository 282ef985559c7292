"""WarmupCosineLR: the transformer recipes' warm-up + cosine, per epoch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from singd_lightning import SINGD
from singd_lightning.lightning.schedulers import WarmupCosineLR, retarget_scheduler


def _sgd(lr: float = 0.5) -> torch.optim.SGD:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)


def _lrs(scheduler: WarmupCosineLR, epochs: int) -> list[float]:
    lrs = []
    for _ in range(epochs):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def _cct_v1(epoch: int, lr: float, warmup: int, epochs: int) -> float:
    """Compact-Transformers v1.0 ``adjust_learning_rate``, written out."""
    if epoch < warmup:
        return lr / (warmup - epoch)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_reciprocal_warmup_is_compact_transformers_schedule():
    got = _lrs(WarmupCosineLR(_sgd(), warmup_epochs=5, max_epochs=20, warmup="reciprocal"), 20)
    assert got == pytest.approx([_cct_v1(e, 0.5, 5, 20) for e in range(20)], rel=1e-12)


def test_linear_warmup_then_cosine_to_eta_min():
    got = _lrs(WarmupCosineLR(_sgd(), warmup_epochs=3, max_epochs=8, eta_min=0.1), 9)
    assert got[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert got[4] < got[3] and got[8] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(got[3:], got[4:]))


def test_resume_from_state_dict_continues_exactly():
    first = WarmupCosineLR(_sgd(), warmup_epochs=2, max_epochs=10)
    _lrs(first, 4)
    second = WarmupCosineLR(_sgd(), warmup_epochs=2, max_epochs=10)
    second.optimizer.load_state_dict(first.optimizer.state_dict())  # as a checkpoint restores both
    second.load_state_dict(first.state_dict())
    assert _lrs(second, 6) == _lrs(first, 6)


def test_retargeted_to_singd_drives_its_groups_relatively():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    scheduler = WarmupCosineLR(torch.optim.SGD(model.parameters(), lr=0.1), warmup_epochs=2, max_epochs=6)
    _lrs(scheduler, 1)
    singd = SINGD(model, lr=0.2, fallback_lr=0.02)
    retarget_scheduler(scheduler, singd)
    assert [g["lr"] for g in singd.param_groups] == pytest.approx([0.2 * 2 / 3, 0.02 * 2 / 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_epochs=5, max_epochs=5), r"warmup_epochs \(5\) must be less than max_epochs \(5\)"),
        (dict(warmup_epochs=-1, max_epochs=5), "warmup_epochs must be an integer >= 0"),
        (dict(warmup_epochs=1, max_epochs=None), "max_epochs must be an integer >= 1"),
        (dict(warmup_epochs=1, max_epochs=5, warmup="cosine"), r"warmup must be one of \['linear', 'reciprocal'\]"),
        (dict(warmup_epochs=1, max_epochs=5, eta_min=-1.0), "eta_min must be a number >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosineLR(_sgd(), **kwargs)
