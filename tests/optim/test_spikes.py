"""Loss spikes never poison the weights or the factors (the spike guards).

A spike multiplies the loss (so every gradient and output-gradient statistic)
by ``scale`` for one step, at a step that updates the factors (T = 1) or one
that does not (T = 10). Afterwards weights and factors must be finite, and
training must go on making progress.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singd_lightning import KFAC, SINGD
from singd_lightning.optim import PAPER_UPDATE

STRUCTURES = ["dense", "diagonal", "hierarchical", "tril_toeplitz"]
SPIKES = [1e2, 1e6, 1e18]


def _problem(dtype: torch.dtype):
    """A small regression problem that training visibly solves."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    teacher = torch.randn(8, 3, generator=g)
    y = torch.tanh(x @ teacher)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    return model, x.to(dtype), y.to(dtype)


def _loss(model, x, y, scale: float = 1.0, input_scale: float = 1.0):
    return nn.functional.mse_loss(model(x * input_scale), y) * scale


def _train(optimizer, model, x, y, steps: int, **spike) -> torch.Tensor:
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, x, y, **spike).backward()
        optimizer.step()
    with torch.no_grad():
        return _loss(model, x, y).float()


def _all_finite(optimizer, model) -> bool:
    tensors = [p for p in model.parameters()]
    tensors += [t for state in optimizer.layer_state.values() for t in state.values() if t.is_floating_point()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def _spiked_run(make_optimizer, dtype, T, **spike):
    model, x, y = _problem(dtype)
    optimizer = make_optimizer(model, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _train(optimizer, model, x, y, 11)  # factors updated at steps 0 and 10 (T = 10)
        steps_before = optimizer.steps
        # T = 1: the spike step updates the factors; T = 10: step 11 does not.
        _train(optimizer, model, x, y, 1, **spike)
        after_spike_finite = _all_finite(optimizer, model)
        after = _train(optimizer, model, x, y, 40)
    return optimizer, model, before, after, steps_before, after_spike_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 10], ids=["collecting", "non-collecting"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("scale", SPIKES)
def test_loss_spike_leaves_weights_finite_and_training_goes_on(structure, T, dtype, scale):
    optimizer, model, before, after, steps_before, spike_finite = _spiked_run(
        lambda m, T: SINGD(m, lr=0.05, lr_cov=0.01, T=T, structures=(structure, structure)), dtype, T, scale=scale
    )
    assert spike_finite, "a weight, factor or momentum became non-finite at the spike"
    assert _all_finite(optimizer, model)
    assert optimizer.steps >= steps_before + 40, "training stopped: later steps were skipped"
    assert torch.isfinite(after) and after < before, f"no progress after the spike: {before} -> {after}"


@pytest.mark.parametrize("scale", [1e6, 1e18])
def test_kfac_loss_spike_is_guarded(scale):
    optimizer, model, before, after, steps_before, spike_finite = _spiked_run(
        lambda m, T: KFAC(m, lr=0.05, T=T, damping=1e-2), torch.float32, 10, scale=scale
    )
    assert spike_finite and _all_finite(optimizer, model)
    assert torch.isfinite(after) and after < before
    assert optimizer.clipped_updates >= 1


@pytest.mark.parametrize("T", [1, 10], ids=["collecting", "non-collecting"])
def test_bf16_input_spike_is_guarded(T):
    optimizer, model, before, after, steps_before, spike_finite = _spiked_run(
        lambda m, T: SINGD(m, lr=0.05, lr_cov=0.01, T=T, structures=("diagonal", "dense")),
        torch.bfloat16, T, input_scale=1e15,
    )
    assert spike_finite and _all_finite(optimizer, model)
    assert torch.isfinite(after) and after < before


@pytest.mark.parametrize("T,scale", [(1, 1e2), (10, 1e6)], ids=["collecting-1e2", "non-collecting-1e6"])
def test_without_guards_the_same_spike_ruins_training(T, scale):
    """The paper's unguarded update (both guards None, no KL clip, the identity
    start) under spikes that the guarded runs above survive: training does not
    recover (so the guards, not the problem, are what the tests above measure)."""
    optimizer, model, before, after, _, _ = _spiked_run(
        lambda m, T: SINGD(
            m, lr=0.05, lr_cov=0.01, T=T, structures=("dense", "dense"), max_factor_step=None, update_clip=None,
            **PAPER_UPDATE,
        ),
        torch.float32, T, scale=scale,
    )
    assert not (torch.isfinite(after) and after < 10 * before)


def test_spike_guards_count_and_warn():
    model, x, y = _problem(torch.float32)
    optimizer = SINGD(model, lr=0.05, lr_cov=0.01, T=1, structures=("diagonal", "diagonal"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(optimizer, model, x, y, 5)
    assert optimizer.clipped_updates == optimizer.clipped_factor_updates == 0
    with pytest.warns(UserWarning, match="update_clip"):
        _train(optimizer, model, x, y, 1, scale=1e6)
    assert optimizer.clipped_updates == 2  # both layers
    assert optimizer.clipped_factor_updates >= 2  # at least C of both layers


def test_factor_step_is_bounded_in_spectral_norm():
    """After one spiked factor update, ``K_new = K (I − β m)`` with
    ``‖β m‖₂ ≤ max_factor_step`` (up to the power iteration's estimate): the new
    factor is invertible and at most 1.5 times larger."""
    model, x, y = _problem(torch.float64)
    optimizer = SINGD(model, lr=0.05, lr_cov=0.01, T=1, structures=("dense", "dense"), alpha1=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(optimizer, model, x, y, 3)
        old = {name: dict(state) for name, state in optimizer.layer_state.items()}
        _train(optimizer, model, x, y, 1, scale=1e9)
    for name, state in optimizer.layer_state.items():
        for key, layout in (("K", optimizer.layouts(optimizer.layers[int(name) // 2])[0]), ("C", None)):
            if layout is None:
                layout = optimizer.layouts(optimizer.layers[int(name) // 2])[1]
            k_old, k_new = layout.to_dense(old[name][key]), layout.to_dense(state[key])
            step = -torch.linalg.solve(k_old, k_new - k_old)  # β m
            # ‖β m‖₂ is estimated by power iteration, from below.
            assert torch.linalg.matrix_norm(step, 2) <= 0.5 * 1.05
        assert torch.linalg.matrix_norm(step, 2) >= 0.45  # the spiked factor did hit the bound


def test_guards_do_not_change_an_ordinary_run():
    """Without a spike the guarded and the paper's update agree bit for bit."""
    runs = []
    for guards in ({}, {"max_factor_step": None, "update_clip": None}):
        model, x, y = _problem(torch.float32)
        optimizer = SINGD(model, lr=0.05, lr_cov=0.01, T=2, structures=("hierarchical", "dense"), **guards)
        _train(optimizer, model, x, y, 30)
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)


def test_guard_hyperparameters_are_validated():
    model, _, _ = _problem(torch.float32)
    with pytest.raises(ValueError, match="max_factor_step"):
        SINGD(model, max_factor_step=1.0)
    with pytest.raises(ValueError, match="update_clip"):
        SINGD(model, update_clip=1.0)


def test_running_norm_stays_finite_when_a_norm_overflows():
    """Finite updates whose squared norm overflows float32 never put inf into the
    running norm (which would switch the guard off and fail checkpoint loading)."""
    layer = nn.Linear(4, 3)
    optimizer = SINGD(layer, lr=1e-40, T=1, structures=("diagonal", "diagonal"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scale in (1e30, 1.0, 1e30, 1.0):
            optimizer.zero_grad()
            layer.weight.grad = torch.full_like(layer.weight, scale)
            layer.bias.grad = torch.full_like(layer.bias, scale)
            optimizer.step()
    assert torch.isfinite(optimizer.update_norm_avg[""])
    assert optimizer.clipped_updates == 1  # the second 1e30 step
