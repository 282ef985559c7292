"""SINGD against the published reference package ``singd==0.0.5`` (the oracle).

Same model, data and hyper-parameters must give the same parameters after several
steps: float64 where the reference supports it, float32 with a tight tolerance
where its structures are float32-only.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singd_lightning import SINGD
from singd_lightning.optim import PAPER_UPDATE

reference = pytest.importorskip("singd.optim.optimizer")

# Reference structures that only run in float32 (all but dense and diagonal).
FLOAT32_ONLY = {"block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"}
REFERENCE_STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 35, bias=False), nn.Tanh(), nn.Linear(35, 5))


def _cnn(**conv) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, **conv), nn.ReLU(), nn.Conv2d(8, 6, 2, bias=False), nn.Flatten(), nn.LazyLinear(5)
    )


class _SequenceModel(nn.Module):
    """Linear layers on a (batch, sequence, features) input: weight sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 12)
        self.outer = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x)))


def _run(model_fn, data, dtype, steps=4, loss="mean", **hyper):
    """Train two copies (reference, ours) from the same init; return both models."""
    torch.manual_seed(0)
    base = model_fn().to(dtype)
    x, y = data
    x = x.to(dtype)
    base(x)  # materialise lazy layers
    models = [base, _copy(base), _copy(base)]  # the third stays at the initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Ours in the paper's mode: the reference has neither the warm start nor the KL clip.
        optimizers = [reference.SINGD(models[0], **hyper), SINGD(models[1], **hyper, **PAPER_UPDATE)]
    reduction = "sum" if loss == "sum" else "mean"
    for _ in range(steps):
        for model, optimizer in zip(models[:2], optimizers):
            optimizer.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out.flatten(0, -2), y.flatten(), reduction=reduction).backward()
            optimizer.step()
    return models


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _dtype(structure: str) -> torch.dtype:
    return torch.float32 if structure in FLOAT32_ONLY else torch.float64


def _mlp_data():
    torch.manual_seed(1)
    return torch.randn(16, 20), torch.randint(0, 5, (16,))


def _cnn_data():
    torch.manual_seed(2)
    return torch.randn(6, 4, 9, 9), torch.randint(0, 5, (6,))


def _seq_data():
    torch.manual_seed(3)
    return torch.randn(4, 7, 6), torch.randint(0, 5, (4, 7))


BASE = dict(lr=0.05, lr_cov=0.05, damping=0.01, momentum=0.9, alpha1=0.5, weight_decay=1e-3, T=1)


@pytest.mark.parametrize("structure", REFERENCE_STRUCTURES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kfac_like": True, "alpha1": 0.0},
        {"normalize_lr_cov": True},
        {"T": 3},
    ],
    ids=["singd", "ikfac", "normalized", "T3"],
)
def test_mlp_matches_reference(structure, options):
    dtype = _dtype(structure)
    hyper = {**BASE, **options, "structures": (structure, structure)}
    models = _run(_mlp, _mlp_data(), dtype, steps=4, **hyper)
    _assert_close(models, dtype)


CONV_VARIANTS = {
    "plain": dict(),
    "stride-pad": dict(stride=2, padding=1),
    "same-dilation": dict(padding="same", dilation=2),
    "valid-groups": dict(padding="valid", groups=2, stride=(2, 1)),
    "asym-groups": dict(padding=(1, 2), dilation=(2, 1), groups=4),
}
# Every convolution variant with both approximations, cycling through the
# reference's structures (every structure also runs on the plain convolution).
CONV_CASES = [
    (variant, approx, REFERENCE_STRUCTURES[i % len(REFERENCE_STRUCTURES)])
    for i, (variant, approx) in enumerate(
        (v, a) for v in CONV_VARIANTS for a in ("expand", "reduce")
    )
] + [("plain", "expand", structure) for structure in REFERENCE_STRUCTURES[1:]]


@pytest.mark.parametrize("variant,approx,structure", CONV_CASES)
def test_conv_matches_reference(variant, approx, structure):
    dtype = _dtype(structure)
    hyper = {**BASE, "structures": (structure, structure), "kfac_approx": approx}
    models = _run(lambda: _cnn(**CONV_VARIANTS[variant]), _cnn_data(), dtype, steps=3, **hyper)
    _assert_close(models, dtype)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical15_15", "triltoeplitz"])
@pytest.mark.parametrize(
    "approx,loss_average,loss",
    [("expand", "batch", "mean"), ("reduce", "batch", "mean"), ("expand", "batch+sequence", "mean"), ("expand", None, "sum")],
)
def test_sequence_matches_reference(structure, approx, loss_average, loss):
    dtype = _dtype(structure)
    hyper = {**BASE, "structures": (structure, "dense"), "kfac_approx": approx, "loss_average": loss_average}
    models = _run(_SequenceModel, _seq_data(), dtype, steps=4, loss=loss, **hyper)
    _assert_close(models, dtype)


def test_scheduled_lr_cov_matches_reference():
    hyper = {**BASE, "structures": ("dense", "diagonal"), "lr_cov": lambda step: 0.01 * (step + 1)}
    models = _run(_mlp, _mlp_data(), torch.float64, steps=5, **hyper)
    _assert_close(models, torch.float64)


def test_mixed_structures_and_T_match_reference():
    hyper = {**BASE, "structures": ("triutoeplitz", "diagonal"), "T": 2, "normalize_lr_cov": True}
    models = _run(lambda: _cnn(padding=1), _cnn_data(), torch.float32, steps=5, **hyper)
    _assert_close(models, torch.float32)


def _assert_close(models, dtype):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    params = zip(models[0].named_parameters(), models[1].parameters(), models[2].parameters())
    for (name, p_ref), p_ours, p_init in params:
        torch.testing.assert_close(p_ours, p_ref, **tol, msg=lambda m: f"{name}: {m}")
        assert (p_ours - p_init).abs().max() > 1e-4, f"{name} did not move"
