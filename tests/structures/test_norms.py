"""The spectral-norm bound and estimate that SINGD's factor-step guard uses,
against dense float64 singular values, for every structure."""

from __future__ import annotations

import pytest
import torch

from singd_lightning.structures import STRUCTURES
from tests.structures.test_structures import FEW_CASES

F64 = torch.float64


def _random(layout, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.numel, generator=g, dtype=F64)


@pytest.mark.parametrize("name,opts,dim", FEW_CASES)
def test_bound_is_above_and_estimate_below_and_close_to_the_spectral_norm(name, opts, dim):
    layout = STRUCTURES[name](dim, **opts)
    for seed in range(3):
        data = _random(layout, seed)
        exact = torch.linalg.matrix_norm(layout.to_dense(data), 2)
        assert layout.spectral_norm_bound(data) >= exact * (1 - 1e-12)
        estimate = layout.spectral_norm(data)
        assert estimate <= exact * (1 + 1e-9)
        assert estimate >= 0.8 * exact  # a random matrix: the hardest case for power iteration


@pytest.mark.parametrize("name,opts,dim", FEW_CASES)
def test_estimate_is_exact_for_a_spike_and_immune_to_overflow(name, opts, dim):
    """A spike's direction (a projected rank-one matrix, scaled far up) is found
    in float32, even with entries near float32's largest value: within 1 % (several
    blocks of one block-diagonal spike have close norms, the slowest case)."""
    layout = STRUCTURES[name](dim, **opts)
    v = torch.linspace(1.0, 2.0, dim, dtype=F64)
    spike = layout.project(torch.outer(v, v)) * 1e30 + _random(layout, 0)
    exact = torch.linalg.matrix_norm(layout.to_dense(spike), 2)
    estimate = layout.spectral_norm(spike.float())
    assert torch.isfinite(estimate)
    assert estimate.double() <= exact * (1 + 1e-5)
    assert estimate.double() >= 0.99 * exact


@pytest.mark.parametrize("name", ["dense", "diagonal", "tril_toeplitz"])
def test_batched_storage_and_non_finite_entries(name):
    layout = STRUCTURES[name](6)
    data = torch.stack([_random(layout, 0), _random(layout, 1)])
    exact = torch.linalg.matrix_norm(layout.to_dense(data), 2)
    assert layout.spectral_norm(data).shape == (2,)
    assert (layout.spectral_norm_bound(data) >= exact * (1 - 1e-12)).all()
    bad = data[0].clone()
    bad[0] = float("nan")
    assert torch.isnan(layout.spectral_norm(bad))
    assert not torch.isfinite(layout.spectral_norm_bound(bad))
    assert layout.spectral_norm(torch.zeros(layout.numel)) == 0
