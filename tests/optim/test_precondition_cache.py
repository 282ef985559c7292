"""Steps between preconditioner updates reuse what they need of the factors
(their outer forms, S Sᵀ's parts) and stay bit-identical to rebuilding them."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from singd_lightning import SINGD
from singd_lightning.optim.reductions import inner
from singd_lightning.structures import STRUCTURES as REGISTRY
from singd_lightning.structures.base import Structure

STRUCTURES = ["diagonal", "block_diagonal", "hierarchical", "dense"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))


def _optimizer(model: nn.Module, structure: str, T: int) -> SINGD:
    spec = {"name": structure, **({"block_size": 4} if structure == "block_diagonal" else {})}
    if structure == "hierarchical":
        spec.update(k1=2, k2=3)
    # The identity start: a warm start costs time and changes nothing here.
    return SINGD(model, lr=0.05, T=T, structures=(spec, spec), factor_init="identity")


def _train(model: nn.Module, optimizer: SINGD, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _rebuild_every_step(optimizer: SINGD) -> None:
    """The behaviour without the cache: every step builds the forms anew."""

    def forms(self, key, layers):
        (layer,) = layers  # (layer by layer)
        layout_k, layout_c = self.layouts(layer)
        state = self.layer_state[layer.name]
        return layout_k.outer_form(state["K"]), layout_c.outer_form(state["C"])

    optimizer._outer_forms = types.MethodType(forms, optimizer)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_forms_are_built_once_per_update(structure, monkeypatch):
    calls = []
    cls = REGISTRY[structure]
    original = cls.outer_form
    monkeypatch.setattr(cls, "outer_form", lambda self, data: calls.append(1) or original(self, data))
    model = _model()
    optimizer = _optimizer(model, structure, T=3)
    _train(model, optimizer, steps=6)  # updates at steps 0 and 3
    assert len(calls) == 2 * 2 * 2  # layers × factors × updates (24 if rebuilt every step)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_reused_forms_are_bit_identical_to_rebuilt_ones(structure):
    models = [_model(), _model()]
    optimizers = [_optimizer(m, structure, T=3) for m in models]
    _rebuild_every_step(optimizers[1])
    for model, optimizer in zip(models, optimizers):
        _train(model, optimizer, steps=7)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_a_factor_changed_in_place_is_seen():
    model = _model()
    optimizer = _optimizer(model, "hierarchical", T=5)
    _train(model, optimizer, steps=2)
    layer = optimizer.layers[0]
    grad = layer.gradient_matrix()
    before = optimizer._precondition(layer, grad)
    optimizer.layer_state[layer.name]["K"].mul_(2.0)  # S Sᵀ grows 4×
    torch.testing.assert_close(optimizer._precondition(layer, grad), 4 * before)


def test_nothing_is_kept_at_T_1():
    model = _model()
    optimizer = _optimizer(model, "hierarchical", T=1)
    _train(model, optimizer, steps=2)
    assert not getattr(optimizer, "_outer_form_cache", {})


def test_structure_default_form_is_the_storage():
    class Plain(Structure):  # dense, with only what matmul_outer needs
        name = "plain"
        numel = property(lambda self: self.dim * self.dim)
        to_dense = project = compose = project_outer = project_self_gram = diagonal = add_identity_ = None

        def matmul(self, data, x, transpose=False):
            mat = data.unflatten(-1, (self.dim, self.dim))
            return (mat.mT if transpose else mat) @ x

    layout = Plain(3)
    data, x = torch.randn(9), torch.randn(3, 2)
    assert layout.outer_form(data) is data
    torch.testing.assert_close(layout.matmul_outer_form(data, x), data.view(3, 3) @ data.view(3, 3).T @ x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_inner_product(dtype, transposed):
    a, b = torch.randn(7, 5, dtype=dtype), torch.randn(7, 5, dtype=dtype)
    if transposed:
        a, b = a.T, b.T
    expected = (a.double() * b.double()).sum()
    result = inner(a, b)
    assert result.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
