"""The authors' training recipe as options: KFAC's damping modes, its EMA tied to
``lr_cov`` and its identity start (against a float64 dense reference), the
weight-decay delay and the fallback weight decay that follows the group."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from singd_lightning import IKFAC, INGD, KFAC, SINGD
from singd_lightning.optim.factory import create_optimizer


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()


def _batches(n: int = 3, size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, steps: int) -> None:
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _reference_kfac(model: nn.Module, batches: list, steps: int, *, lr: float, momentum: float, damping: float,
                    T: int, decay, damping_mode: str, factor_init: str, weight_decay: float = 0.0,
                    weight_decay_start: int = 0) -> None:
    """Dense KFAC written out in float64 on the MLP ``Linear-Tanh-Linear``:
    ``A = EMA(x̃ᵀx̃/n)``, ``G = EMA(n·gᵀg)`` (``decay(step)``), inverses of
    ``A + δI`` and ``G + δI`` with ``δ = √λ`` or ``λ``, heavy-ball momentum."""
    layers = [model[0], model[2]]
    delta = math.sqrt(damping) if damping_mode == "split" else damping
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    factors = [[eye(l.in_features + 1), eye(l.out_features)] if factor_init == "identity" else [None, None]
               for l in layers]
    inverses = [[eye(l.in_features + 1), eye(l.out_features)] for l in layers]
    buffers = [None, None]
    for step in range(steps):
        x, y = batches[step % len(batches)]
        n = x.shape[0]
        o1 = layers[0](x)
        h1 = torch.tanh(o1)
        o2 = layers[1](h1)
        loss = nn.functional.cross_entropy(o2, y)
        params = [p for l in layers for p in (l.weight, l.bias)]
        g1, g2, *grads = torch.autograd.grad(loss, [o1, o2, *params])
        with torch.no_grad():
            if step % T == 0:
                beta = 1.0 - decay(step)
                for i, (inp, gout) in enumerate(((x, g1), (h1, g2))):
                    x_aug = torch.cat([inp, torch.ones(n, 1, dtype=inp.dtype)], dim=1)
                    stats = [x_aug.T @ x_aug / n, n * gout.T @ gout]
                    for j, stat in enumerate(stats):
                        old = factors[i][j]
                        factors[i][j] = stat if old is None else (1 - beta) * old + beta * stat
                        inverses[i][j] = torch.linalg.inv(factors[i][j] + delta * eye(stat.shape[0]))
            wd = weight_decay if step >= weight_decay_start else 0.0
            for i, layer in enumerate(layers):
                grad = torch.cat([grads[2 * i], grads[2 * i + 1][:, None]], dim=1)
                theta = torch.cat([layer.weight, layer.bias[:, None]], dim=1)
                d = inverses[i][1] @ grad @ inverses[i][0] + wd * theta
                buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
                theta = theta - lr * buffers[i]
                layer.weight.copy_(theta[:, :-1])
                layer.bias.copy_(theta[:, -1])


def _schedule(step: int) -> float:
    return 0.3 if step < 2 else 0.1


@pytest.mark.parametrize(
    "options, decay",
    [
        (dict(damping_mode="split", stat_decay=0.8), lambda step: 0.8),
        (dict(damping_mode="per_factor", stat_decay=0.8), lambda step: 0.8),
        (dict(damping_mode="per_factor", stat_decay=None, lr_cov=0.25), lambda step: 0.75),
        (dict(damping_mode="per_factor", stat_decay=None, lr_cov=_schedule), lambda step: 1 - _schedule(step)),
        (dict(damping_mode="per_factor", stat_decay=None, lr_cov=0.25, factor_init="identity"), lambda step: 0.75),
        (dict(damping_mode="split", stat_decay=0.9, factor_init="identity", T=2), lambda step: 0.9),
    ],
    ids=["split", "per-factor", "tied", "tied-schedule", "authors", "identity-T2"],
)
def test_kfac_variants_match_the_dense_reference(options, decay):
    options = {"T": 1, **options}
    model, batches = _mlp(), _batches()
    twin = copy.deepcopy(model)
    optimizer = KFAC(model, lr=0.1, momentum=0.5, damping=0.04, update_clip=None, **options)
    _train(model, optimizer, batches, 5)
    _reference_kfac(twin, batches, 5, lr=0.1, momentum=0.5, damping=0.04, T=options["T"], decay=decay,
                    damping_mode=options["damping_mode"], factor_init=options.get("factor_init", "statistics"))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_damping_modes_differ():
    """Guard of the reference test: the two modes give different updates."""
    model, batches = _mlp(), _batches()
    twin = copy.deepcopy(model)
    _train(model, KFAC(model, lr=0.1, damping=0.04, T=1, damping_mode="split"), batches, 1)
    _train(twin, KFAC(twin, lr=0.1, damping=0.04, T=1, damping_mode="per_factor"), batches, 1)
    assert not torch.allclose(model[0].weight, twin[0].weight)


def test_stat_decay_wins_over_lr_cov():
    """lr_cov only matters when stat_decay is None."""
    model, batches = _mlp(), _batches()
    twin = copy.deepcopy(model)
    _train(model, KFAC(model, T=1, stat_decay=0.9, lr_cov=0.5), batches, 3)
    _train(twin, KFAC(twin, T=1, stat_decay=0.9), batches, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_kfac_checkpoint_resumes_the_authors_variant_exactly():
    options = dict(T=2, damping_mode="per_factor", stat_decay=None, lr_cov=_schedule, factor_init="identity",
                   weight_decay=0.01, weight_decay_start=3)
    model, batches = _mlp(), _batches()
    twin = copy.deepcopy(model)
    optimizer = KFAC(model, **options)
    _train(model, optimizer, batches, 3)
    state = copy.deepcopy(optimizer.state_dict())
    twin.load_state_dict(model.state_dict())
    resumed = KFAC(twin, **{**options, "lr_cov": _schedule})
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["lr_cov"] is _schedule
    _train(model, optimizer, batches, 4)
    _train(twin, resumed, batches, 4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_kfac_state_without_the_new_options_loads_with_this_optimizers_values():
    model = _mlp()
    old = KFAC(model, T=1)
    _train(model, old, _batches(), 1)
    state = old.state_dict()
    for group in state["param_groups"]:
        for key in ("lr_cov", "damping_mode", "factor_init", "weight_decay_start"):
            del group[key]
    new = KFAC(_mlp(), T=1, damping_mode="per_factor")
    new.load_state_dict(state)
    assert new.param_groups[0]["damping_mode"] == "per_factor"


def test_kfac_state_with_a_bad_damping_mode_is_refused():
    model = _mlp()
    optimizer = KFAC(model, T=1)
    state = optimizer.state_dict()
    state["param_groups"][0]["damping_mode"] = "sqrt"
    with pytest.raises(ValueError, match=r"parameter group 0: damping_mode must be one of \['split', 'per_factor'\]"):
        KFAC(_mlp(), T=1).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping_mode="sqrt"), r"damping_mode must be one of \['split', 'per_factor'\], got 'sqrt'"),
        (dict(factor_init="zeros"), r"factor_init must be one of \['statistics', 'identity'\], got 'zeros'"),
        (dict(stat_decay=1.0), r"stat_decay must be a number in \[0.0, 1.0\)"),
        (dict(stat_decay=None, lr_cov=1.5), r"lr_cov must be a number in \[0.0, 1.0\]"),
        (dict(weight_decay_start=-1), "weight_decay_start must be an integer ≥ 0 or 'auto'"),
        (dict(weight_decay_start="soon"), "weight_decay_start must be an integer ≥ 0 or 'auto'"),
        (dict(weight_decay_start=True), "weight_decay_start must be an integer ≥ 0 or 'auto'"),
        (dict(fallback_weight_decay=-0.1), r"fallback_weight_decay must be a number in \[0.0, inf\)"),
    ],
)
def test_bad_recipe_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(_mlp(), **kwargs)


def test_kfac_lr_cov_schedule_out_of_range_raises_at_the_update():
    model = _mlp()
    optimizer = KFAC(model, T=1, stat_decay=None, lr_cov=lambda step: 2.0)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"lr_cov \(schedule at step 0\) must be a number in \[0.0, 1.0\]"):
        optimizer.step()


# ------------------------------------------------------------ weight decay delay
@pytest.mark.parametrize("start", [0, 3])
def test_kfac_weight_decay_starts_at_the_given_step(start):
    model, batches = _mlp(), _batches()
    twin = copy.deepcopy(model)
    optimizer = KFAC(model, lr=0.1, momentum=0.5, damping=0.04, T=1, stat_decay=0.8, weight_decay=0.1,
                     weight_decay_start=start, update_clip=None)
    _train(model, optimizer, batches, 5)
    _reference_kfac(twin, batches, 5, lr=0.1, momentum=0.5, damping=0.04, T=1, decay=lambda step: 0.8,
                    damping_mode="split", factor_init="statistics", weight_decay=0.1, weight_decay_start=start)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cls", [SINGD, INGD, IKFAC, KFAC])
def test_weight_decay_delay_is_exact(cls):
    """Before the start the steps are those without weight decay, bit for bit."""
    model, batches = _mlp(), _batches()
    delayed, plain = model, copy.deepcopy(model)
    opt_delayed = cls(delayed, T=2, weight_decay=0.5, weight_decay_start=3)
    opt_plain = cls(plain, T=2, weight_decay=0.0)
    _train(delayed, opt_delayed, batches, 3)
    _train(plain, opt_plain, batches, 3)
    for p, q in zip(delayed.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    _train(delayed, opt_delayed, batches, 1)
    _train(plain, opt_plain, batches, 1)
    assert not torch.equal(delayed[0].weight, plain[0].weight)


def test_weight_decay_start_auto_is_20_T():
    optimizer = SINGD(_mlp(), T=3, weight_decay=0.5, weight_decay_start="auto")
    group = optimizer.param_groups[0]
    optimizer.steps = 59
    assert optimizer._weight_decay(group) == 0.0
    optimizer.steps = 60
    assert optimizer._weight_decay(group) == 0.5


# ------------------------------------------------------- fallback weight decay
def _normed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4))


def _fallback_groups(optimizer) -> list[dict]:
    return [g for g in optimizer.param_groups if g["role"] == "fallback"]


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_fallback_weight_decay_none_follows_the_group(cls):
    assert _fallback_groups(cls(_normed(), weight_decay=0.1))[0]["weight_decay"] == 0.0  # the library default
    assert _fallback_groups(cls(_normed(), weight_decay=0.1, fallback_weight_decay=None))[0]["weight_decay"] == 0.1
    model = _normed()
    groups = [{"params": [model[1].weight], "weight_decay": 0.2}, {"params": [model[1].bias]},
              {"params": [*model[0].parameters(), *model[2].parameters()]}]
    optimizer = cls(model, groups, weight_decay=0.05, fallback_weight_decay=None)
    assert [g["weight_decay"] for g in _fallback_groups(optimizer)] == [0.2, 0.05]


def test_fallback_weight_decay_none_steps_as_adamw_with_the_groups_decay():
    model = _normed()
    twin = copy.deepcopy(model)
    optimizer = SINGD(model, lr=0.01, weight_decay=0.3, fallback_weight_decay=None, weight_decay_start="auto")
    reference = torch.optim.AdamW(twin[1].parameters(), lr=0.01, weight_decay=0.3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    for net, opt in ((model, optimizer), (twin, reference)):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    # The fallback is not delayed (as in the authors' wrappers).
    torch.testing.assert_close(model[1].weight, twin[1].weight)
    torch.testing.assert_close(model[1].bias, twin[1].bias)


def test_create_optimizer_fallback_follows_timms_groups():
    optimizer = create_optimizer(_normed(), "kfac", weight_decay=0.05, fallback_weight_decay=None)
    # LayerNorm parameters are 1-D: timm's no-decay group, and so no decay.
    assert [g["weight_decay"] for g in _fallback_groups(optimizer)] == [0.0]
