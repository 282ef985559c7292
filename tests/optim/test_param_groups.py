"""Parameter groups: a bias stays preconditioned with its weight whichever group it
is in, and each group's own settings apply to its parameters (fallback included)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from singd_lightning.optim import IKFAC, INGD, KFAC, SINGD, KroneckerOptimizer
from singd_lightning.optim.factory import create_optimizer

LR, WD = 0.1, 0.05


class _Net(nn.Module):
    """A conv, a norm, a free 3-D parameter (decayed by timm's rule) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.pos = nn.Parameter(0.1 * torch.randn(3, 4, 4))
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.norm(self.conv(x)) + self.pos).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().double()


def _no_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's rule: 1-D parameters and biases are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _deltas(model: nn.Module, params, **kwargs) -> dict[str, torch.Tensor]:
    """The change of every parameter after one SINGD step on a fixed batch."""
    options = dict(lr=LR, momentum=0.9, T=1, structures=("dense", "diagonal"), update_clip=None)
    optimizer = SINGD(model, params, **{**options, **kwargs})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 4, 4, dtype=torch.float64), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.remove_hooks()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def _layers(optimizer: SINGD) -> dict[str, bool]:
    return {layer.name: layer.has_bias for layer in optimizer.layers}


def test_biases_in_a_no_decay_group_stay_preconditioned() -> None:
    model = _net()
    optimizer = SINGD(model, _no_decay_groups(model, WD), weight_decay=WD)
    assert _layers(optimizer) == {"conv": True, "fc": True}
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = by_param[id(p)]
        expected_role = "fallback" if name.startswith(("norm.", "pos")) else "kronecker"
        expected_wd = WD if name in ("conv.weight", "fc.weight", "pos") else 0.0
        assert (group["role"], group["weight_decay"]) == (expected_role, expected_wd), name


def test_each_parameter_steps_with_its_own_groups_weight_decay() -> None:
    """One step with timm's groups equals one step without decay plus each
    parameter's own decay term: L2 ``lr·γ·θ`` on the preconditioned weights (none on
    biases), decoupled ``lr·γ·θ`` on the decayed fallback parameter, none on norms."""
    reference = _deltas(_net(), None)  # one group, no weight decay anywhere
    model = _net()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltas = _deltas(model, _no_decay_groups(model, WD), weight_decay=WD)
    for name, delta in deltas.items():
        decay = WD if name in ("conv.weight", "fc.weight", "pos") else 0.0
        expected = reference[name] - LR * decay * initial[name]
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12, msg=name)
        assert delta.abs().max() > 0, name


def test_a_bias_uses_its_own_groups_lr_and_momentum() -> None:
    reference = _deltas(_net(), None)
    model = _net()
    biases = [model.conv.bias, model.fc.bias]
    rest = [p for p in model.parameters() if all(p is not b for b in biases)]
    deltas = _deltas(model, [{"params": rest}, {"params": biases, "lr": 3 * LR, "momentum": 0.0}])
    for name, delta in deltas.items():
        scale = 3.0 if name in ("conv.bias", "fc.bias") else 1.0
        torch.testing.assert_close(delta, scale * reference[name], rtol=1e-9, atol=1e-12, msg=name)


def test_fallback_weight_decay_of_a_group() -> None:
    """A group's ``fallback_weight_decay`` beats its ``weight_decay``, which beats the
    optimizer's ``fallback_weight_decay``."""
    model = _net()
    norms = list(model.norm.parameters())
    groups = [
        {"params": [model.pos], "weight_decay": 0.2},
        {"params": norms[:1], "weight_decay": 0.2, "fallback_weight_decay": 0.3},
        {"params": norms[1:]},
    ]
    optimizer = SINGD(model, groups, weight_decay=0.1, fallback_weight_decay=0.4)
    assert [(g["role"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("fallback", 0.2), ("fallback", 0.3), ("fallback", 0.4)
    ]


def test_a_bias_without_its_weight_uses_the_fallback() -> None:
    model = _net()
    optimizer = SINGD(model, [model.fc.bias, model.conv.weight])
    assert _layers(optimizer) == {"conv": False}
    roles = {id(p): g["role"] for g in optimizer.param_groups for p in g["params"]}
    assert roles[id(model.fc.bias)] == "fallback"


def test_split_groups_checkpoint_round_trip() -> None:
    model = _net()
    optimizer = SINGD(model, _no_decay_groups(model, WD), T=1)
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 5, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    other = _net()
    fresh = SINGD(other, _no_decay_groups(other, WD), T=1)
    fresh.load_state_dict(state)
    for name in ("conv", "fc"):
        for key, value in optimizer.layer_state[name].items():
            torch.testing.assert_close(fresh.layer_state[name][key], value)


def test_timm_param_groups() -> None:
    timm_optim = pytest.importorskip("timm.optim")
    model = _net()
    groups = timm_optim.param_groups_weight_decay(model, WD)
    optimizer = SINGD(model, groups)
    assert _layers(optimizer) == {"conv": True, "fc": True}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.fc.bias)] == decay[id(model.norm.weight)] == 0.0
    assert decay[id(model.fc.weight)] == decay[id(model.pos)] == WD


# ------------------------------------------------------------------ the factory
@pytest.mark.parametrize(
    ("name", "cls"),
    [("singd", SINGD), ("INGD", INGD), ("ikfac", IKFAC), ("kfac", KFAC),
     ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],  # fmt: skip
)
def test_create_optimizer_uses_no_decay_groups(name: str, cls: type) -> None:
    model = _net()
    optimizer = create_optimizer(model, name, lr=LR, weight_decay=WD)
    assert type(optimizer) is cls
    decay = {id(p): (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    for param_name, p in model.named_parameters():
        expected = WD if param_name in ("conv.weight", "fc.weight", "pos") else 0.0
        assert decay[id(p)] == (expected, LR), param_name
    if isinstance(optimizer, KroneckerOptimizer):
        assert _layers(optimizer) == {"conv": True, "fc": True}
        optimizer.remove_hooks()


def test_create_optimizer_steps_like_the_groups() -> None:
    expected = _deltas(_net(), None)  # reference: no decay; add each parameter's own
    model = _net()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = dict(momentum=0.9, T=1, structures=("dense", "diagonal"), update_clip=None)
    optimizer = create_optimizer(model, "singd", lr=LR, weight_decay=WD, **options)
    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 4, 4, dtype=torch.float64), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        decay = WD if name in ("conv.weight", "fc.weight", "pos") else 0.0
        torch.testing.assert_close(p.detach() - initial[name], expected[name] - LR * decay * initial[name], msg=name)


def test_create_optimizer_options() -> None:
    model = _net()
    model.no_weight_decay = lambda: {"pos"}  # timm's hook for embeddings
    optimizer = create_optimizer(model, "singd", weight_decay=WD, fallback_weight_decay=0.3)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(model.pos)]["weight_decay"] == 0.3  # a fallback parameter, no-decay group
    assert by_param[id(model.fc.weight)]["weight_decay"] == WD
    assert by_param[id(model.fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.fc.weight)]["lr"] == 1e-3  # SINGD's default
    optimizer.remove_hooks()
    plain = create_optimizer(model, "adamw", weight_decay=WD, filter_bias_and_bn=False)
    assert [g["weight_decay"] for g in plain.param_groups] == [WD]


@pytest.mark.parametrize(
    ("name", "weight_decay", "message"),
    [("adam", 0.0, r"name must be one of \['singd', 'ingd', 'ikfac', 'kfac', 'adamw', 'sgd'\], got 'adam'"),
     ("singd", -1.0, "weight_decay must be a number >= 0, got -1.0")],  # fmt: skip
)
def test_create_optimizer_rejects(name: str, weight_decay: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_optimizer(_net(), name, weight_decay=weight_decay)
