"""Refused calls change nothing: checkpoints are checked whole before loading,
and bad constructor arguments and API misuse get one clear error."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from singd_lightning import KFAC, SINGD
from singd_lightning.lightning import configure_singd


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))


def _trained(make, steps: int = 3):
    model = _model()
    optimizer = make(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def _snapshot(optimizer):
    """Everything a load could change, as deep copies."""
    return (
        copy.deepcopy(optimizer.param_groups),
        {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()} for k, v in optimizer.state.items()},
        copy.deepcopy(optimizer.layer_state),
        optimizer.steps,
        copy.deepcopy(optimizer.update_norm_avg),
    )


def _assert_unchanged(optimizer, before):
    groups, state, layers, steps, avg = before
    now = _snapshot(optimizer)
    for g, h in zip(groups, now[0]):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    assert set(state) == set(now[1])
    for p in state:
        assert set(state[p]) == set(now[1][p])
        for key in state[p]:
            assert torch.equal(torch.as_tensor(state[p][key]), torch.as_tensor(now[1][p][key]))
    for name in layers:
        assert set(layers[name]) == set(now[2][name])
        for key in layers[name]:
            assert torch.equal(layers[name][key], now[2][name][key])
    assert steps == now[3]
    assert set(avg) == set(now[4]) and all(torch.equal(avg[k], now[4][k]) for k in avg)


def _singd(structure="diagonal", **kwargs):
    return lambda m: SINGD(m, T=1, structures=(structure, structure), **kwargs)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize(
    "saved,loading,match",
    [
        (_singd("diagonal"), _singd("tril_toeplitz"), "was saved as .*diagonal.*expects .*tril_toeplitz"),
        (_singd("dense"), _singd("diagonal"), "was saved as .*dense.*expects .*diagonal"),
        (_singd("diagonal"), _singd("dense"), "was saved as .*diagonal.*expects .*dense"),
        (_singd("block_diagonal"), lambda m: SINGD(m, T=1, structures={"name": "block_diagonal", "block_size": 4}),
         "block_size"),
        (lambda m: KFAC(m, T=1), _singd("dense"), "was saved as .*kfac.*expects .*singd"),
        (_singd("dense"), lambda m: KFAC(m, T=1), "was saved as .*singd.*expects .*kfac"),
    ],
    ids=["diagonal-into-toeplitz", "dense-into-diagonal", "diagonal-into-dense", "block-size", "kfac-into-singd",
         "singd-into-kfac"],
)
def test_load_of_another_layout_raises_naming_the_layer_and_changes_nothing(saved, loading, match):
    _, source = _trained(saved)
    _, target = _trained(loading, steps=2)
    before = _snapshot(target)
    state = source.state_dict()
    with pytest.raises(ValueError, match=match) as info:
        target.load_state_dict(state)
    assert "layer '0'" in str(info.value)
    _assert_unchanged(target, before)


def test_wrong_width_is_refused():
    _, source = _trained(_singd())
    wide = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.LayerNorm(9), nn.Linear(9, 3))
    target = SINGD(wide, T=1, structures=("diagonal", "diagonal"))
    with pytest.raises(ValueError, match="layer '0'"):
        target.load_state_dict(source.state_dict())


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda s: s["kronecker"]["layers"]["0"].__setitem__("K", torch.full_like(s["kronecker"]["layers"]["0"]["K"], float("nan"))), "K of layer '0' holds"),
        (lambda s: s["kronecker"]["layers"]["0"].__setitem__("K", torch.ones(3)), "K of layer '0' has shape"),
        (lambda s: s["kronecker"]["layers"]["0"].pop("C"), "layer '0' has the state entries"),
        (lambda s: s["kronecker"]["layers"].pop("3"), "lacks the factors of \\['3'\\]"),
        (lambda s: s["kronecker"]["layers"].__setitem__("extra", {}), "unknown layers \\['extra'\\]"),
        (lambda s: s["param_groups"][0].__setitem__("lr", -1.0), "lr must be"),
        (lambda s: s["param_groups"][0].__setitem__("T", 1.5), "T must be"),
        (lambda s: s["param_groups"][0].__setitem__("bogus", 1), "unknown options \\['bogus'\\]"),
        (lambda s: s["param_groups"].pop(), "parameter groups"),
        (lambda s: s["kronecker"].__setitem__("steps", -3), "steps"),
        (lambda s: s["kronecker"].__setitem__("clipped_updates", "x"), "clipped_updates"),
        (lambda s: s["kronecker"].__setitem__("grad_scale_hint", 0.0), "grad_scale_hint"),
        (lambda s: s.pop("kronecker"), "lacks \\['kronecker'\\]"),
        (lambda s: next(iter(s["state"].values())).__setitem__("momentum_buffer", torch.ones(2)), "momentum_buffer of parameter"),
        (lambda s: next(iter(s["state"].values())).__setitem__("momentum_buffer", torch.full((8, 6), float("inf"))), "holds"),
    ],
    ids=["nan-factor", "factor-shape", "missing-factor", "missing-layer", "unknown-layer", "bad-lr", "bad-T",
         "unknown-option", "group-count", "bad-steps", "bad-guard-counter", "bad-scale", "no-kronecker", "momentum-shape", "inf-momentum"],
)
def test_malformed_state_is_refused_before_anything_changes(corrupt, match):
    _, source = _trained(_singd(lr=0.5))
    state = copy.deepcopy(source.state_dict())
    corrupt(state)
    _, target = _trained(_singd(lr=0.1), steps=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("value", [None, "checkpoint.pt", 3])
def test_load_of_a_non_dict_is_a_type_error(value):
    _, target = _trained(_singd())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        target.load_state_dict(value)


def test_valid_state_still_round_trips_through_weights_only_load():
    model, source = _trained(_singd("hierarchical"))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target = SINGD(copy.deepcopy(model), T=1, structures=("hierarchical", "hierarchical"))
    target.load_state_dict(state)
    assert target.state_dict()["kronecker"]["layouts"] == source.state_dict()["kronecker"]["layouts"]
    for name in source.layer_state:
        for key in source.layer_state[name]:
            assert torch.equal(target.layer_state[name][key], source.layer_state[name][key])
    assert set(target.update_norm_avg) == set(source.update_norm_avg)


def test_state_without_layouts_loads_with_a_warning():
    _, source = _trained(_singd())
    state = source.state_dict()
    del state["kronecker"]["layouts"]
    _, target = _trained(_singd(), steps=1)
    with pytest.warns(UserWarning, match="no layer layouts"):
        target.load_state_dict(state)
    assert target.steps == source.steps


# ------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kfac_like="no"), TypeError, "kfac_like must be True or False"),
        (dict(normalize_lr_cov="yes"), TypeError, "normalize_lr_cov must be True or False"),
        (dict(init_grad_scale=0.0), ValueError, "init_grad_scale"),
        (dict(init_grad_scale=float("nan")), ValueError, "init_grad_scale"),
        (dict(grad_scaler=object()), TypeError, "grad_scaler must be None or a torch.amp.GradScaler"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SINGD(_model(), **kwargs)


def test_params_of_another_model_are_refused():
    with pytest.raises(ValueError, match="not parameters of model"):
        SINGD(_model(), params=nn.Linear(3, 3).parameters())


def test_group_without_params_and_unknown_group_options_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="has no 'params' entry"):
        SINGD(model, params=[{"lr": 0.1}])
    with pytest.raises(ValueError, match="unknown options \\['lr_covv'\\]"):
        SINGD(model, params=[{"params": model.parameters(), "lr_covv": 0.1}])


def test_step_before_any_backward_changes_nothing():
    model = _model()
    optimizer = SINGD(model, T=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no gradients"):
        optimizer.step()
    assert optimizer.steps == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bias_with_gradient_whose_weight_has_none_is_updated():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    optimizer = SINGD(layer, lr=0.1, T=1)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.bias.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(layer.bias, bias)
    assert torch.equal(layer.weight, weight)  # no gradient: not updated, as in torch.optim


def test_configure_singd_scheduler_dict_without_scheduler_is_a_value_error():
    with pytest.raises(ValueError, match="scheduler: .*'scheduler' entry"):
        configure_singd(_model(), scheduler={"interval": "step"})


def test_non_finite_update_skips_the_whole_step_including_factor_updates():
    """Finite gradients whose preconditioned update overflows (bf16 factors
    blown up by hand) skip the step: factors, momenta and weights as before."""
    model, optimizer = _trained(_singd("diagonal"))
    with torch.no_grad():
        optimizer.layer_state["0"]["K"].fill_(1e30)
    before = _snapshot(optimizer)
    weights = copy.deepcopy(model.state_dict())
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert any("step skipped" in str(w.message) for w in caught)
    _assert_unchanged(optimizer, before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert optimizer.skipped_steps == 1
