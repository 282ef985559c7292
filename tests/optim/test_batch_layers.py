"""``batch_layers``: layers with the same factor shapes are preconditioned, guarded
and updated in batches, training follows the layer-by-layer optimizer, and a
batch costs a step a constant number of operations."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from singd_lightning import SINGD
from singd_lightning.optim import reductions
from singd_lightning.optim.curvature import KroneckerLayer
from singd_lightning.structures import STRUCTURES as REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
try:
    from batch_layers import OperationCounter  # (the script's count of a step's operations)
finally:
    sys.path.pop(0)

STRUCTURES = ["diagonal", "block_diagonal", "hierarchical", "dense", "tril_toeplitz"]


class Blocks(nn.Module):
    """Same-shaped layers of every kind the optimizer batches: three 8 → 8 linear
    layers (one without a bias but with a 9th input, so its ``d_K`` matches), two
    3×3 convolutions, two embeddings, and a head of its own shape."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(10, 8), nn.Embedding(10, 8)])
        self.convs = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)])
        self.linears = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(9, 8, bias=False)])
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings[0](tokens).mean(1) + self.embeddings[1](tokens).mean(1)
        for conv in self.convs:
            image = torch.tanh(conv(image))
        x = x + image.flatten(1)[:, :8]
        x = torch.tanh(self.linears[0](x))
        x = torch.tanh(self.linears[1](x))
        x = torch.tanh(self.linears[2](torch.cat([x, x[:, :1]], dim=1)))
        return self.head(x)


def _spec(structure: str) -> dict:
    spec = {"name": structure}
    if structure == "block_diagonal":
        spec["block_size"] = 3
    if structure == "hierarchical":
        spec.update(k1=2, k2=3)
    return spec


def _optimizer(model: nn.Module, structure: str, batch: bool | None, T: int = 1, **kwargs) -> SINGD:
    spec = _spec(structure)
    return SINGD(model, lr=0.05, T=T, structures=(spec, spec), layer_structures={"Embedding": (spec, spec)},
                 batch_layers=batch, **kwargs)


def _train(model: nn.Module, optimizer: SINGD, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    weight = next(model.parameters())
    for _ in range(steps):
        tokens, image = torch.randint(0, 10, (16, 5), generator=g), torch.randn(16, 2, 4, 4, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        tokens, image, y = tokens.to(weight.device), image.to(weight.device, weight.dtype), y.to(weight.device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens, image).float(), y).backward()
        optimizer.step()


def _backward(model: nn.Module, samples: int = 16, seed: int = 0) -> None:
    """One backward pass on a fresh batch (no step)."""
    g = torch.Generator().manual_seed(seed)
    tokens, image = torch.randint(0, 10, (samples, 5), generator=g), torch.randn(samples, 2, 4, 4, generator=g)
    nn.functional.cross_entropy(model(tokens, image), torch.randint(0, 3, (samples,), generator=g)).backward()


def _pair(structure: str, T: int = 1, **kwargs) -> tuple[list[nn.Module], list[SINGD]]:
    """Two equal models, trained layer by layer and batched."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Blocks())
    return models, [_optimizer(model, structure, batch, T, **kwargs) for model, batch in zip(models, (False, True))]


def _assert_follows(models: list[nn.Module], optimizers: list[SINGD], states: bool = True) -> None:
    """The batched run's parameters (and factors) equal the layer-by-layer run's up to rounding."""
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if states:
        for name, state in optimizers[0].layer_state.items():
            for key, value in state.items():
                torch.testing.assert_close(optimizers[1].layer_state[name][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T, launch_bound", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_batched_training_follows_layer_by_layer(monkeypatch, structure, T, launch_bound):
    if launch_bound:  # the CUDA routes (multi-tensor checks, batched inner products) on the CPU
        monkeypatch.setattr(reductions, "LAUNCH_BOUND_DEVICES", frozenset({"cuda", "cpu"}))
    models, optimizers = _pair(structure, T)
    for model, optimizer in zip(models, optimizers):
        _train(model, optimizer, steps=7)
    _assert_follows(models, optimizers)


def test_same_shaped_layers_are_preconditioned_together(monkeypatch):
    calls = []
    cls = REGISTRY["hierarchical"]
    original = cls.matmul_outer_form
    monkeypatch.setattr(cls, "matmul_outer_form",
                        lambda self, form, x: calls.append(x.shape) or original(self, form, x))
    model = Blocks()
    optimizer = _optimizer(model, "hierarchical", True)
    _train(model, optimizer, steps=1)
    # Groups: the two embeddings, the two convolutions, the three 8 → 8 linear
    # layers (with and without a bias, d_K = 9), the head alone: two calls each.
    batches = sorted(shape[0] if len(shape) == 3 else 1 for shape in calls)
    assert batches == [1, 1, 2, 2, 2, 2, 3, 3]


def test_default_batches_on_cuda_only(monkeypatch):
    model = Blocks()
    optimizer = _optimizer(model, "diagonal", None)
    layers = optimizer.layers
    assert optimizer.batch_layers is None and not optimizer._batching(layers)
    assert _optimizer(model, "diagonal", True)._batching(layers)
    monkeypatch.setattr(type(layers[0].weight), "device", property(lambda self: torch.device("cuda", 0)))
    assert optimizer._batching(layers)


def test_stacked_forms_are_kept_between_updates_and_see_in_place_changes(monkeypatch):
    calls = []
    cls = REGISTRY["hierarchical"]
    original = cls.outer_form
    monkeypatch.setattr(cls, "outer_form", lambda self, data: calls.append(data.shape) or original(self, data))
    model = Blocks()
    optimizer = _optimizer(model, "hierarchical", True, T=3)
    _train(model, optimizer, steps=6)  # updates at steps 0 and 3
    stacked = [shape for shape in calls if len(shape) == 2]
    # Three groups of two factors, rebuilt at each of the two updates only.
    assert len(stacked) == 3 * 2 * 2
    layer = optimizer.layers[-2]  # the third 8 → 8 linear layer, in the group of three
    group = [other for other in optimizer.layers if optimizer.layouts(other) == optimizer.layouts(layer)]
    for other in group:
        other.weight.grad = torch.randn_like(other.weight)
        if other.has_bias:
            other.module.bias.grad = torch.zeros_like(other.module.bias)
    before = next(n for ls, _, n in optimizer._preconditioned(group) for lay, n in zip(ls, n) if lay is layer)
    optimizer.layer_state[layer.name]["K"].mul_(2.0)  # S Sᵀ grows 4×
    after = next(n for ls, _, n in optimizer._preconditioned(group) for lay, n in zip(ls, n) if lay is layer)
    torch.testing.assert_close(after, 4 * before)


def test_a_non_finite_gradient_in_a_group_skips_the_step_unchanged():
    model = Blocks()
    optimizer = _optimizer(model, "block_diagonal", True)
    _train(model, optimizer, steps=2)
    params = [p.detach().clone() for p in model.parameters()]
    state = {name: {k: v.clone() for k, v in s.items()} for name, s in optimizer.layer_state.items()}
    optimizer.zero_grad()
    _backward(model, seed=5)
    model.linears[1].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert optimizer.skipped_steps == 1 and any("skipped" in str(w.message) for w in caught)
    for before, after in zip(params, model.parameters()):
        assert torch.equal(before, after)
    for name, saved in state.items():
        for key, value in saved.items():
            assert torch.equal(optimizer.layer_state[name][key], value)


def test_mixed_factor_dtypes_form_separate_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    groups = [{"params": list(model[0].parameters()), "preconditioner_dtype": (torch.float64, torch.float64)},
              {"params": list(model[2].parameters()) + list(model[4].parameters())}]
    reference = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    reference.load_state_dict(model.state_dict())
    ref_groups = [{"params": list(reference[0].parameters()), "preconditioner_dtype": (torch.float64, torch.float64)},
                  {"params": list(reference[2].parameters()) + list(reference[4].parameters())}]
    optimizers = [SINGD(model, groups, lr=0.05, T=1, structures="hierarchical", batch_layers=True),
                  SINGD(reference, ref_groups, lr=0.05, T=1, structures="hierarchical", batch_layers=False)]
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 8, (16,), generator=g)
        for net, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert optimizers[0].layer_state["0"]["K"].dtype == torch.float64
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["yes", 1, "auto"])
def test_invalid_batch_layers_is_refused(value):
    with pytest.raises(ValueError, match="batch_layers must be None, True or False"):
        _optimizer(Blocks(), "diagonal", value)


def test_a_spike_in_one_layer_of_a_batch_is_clipped_as_layer_by_layer():
    models, optimizers = _pair("hierarchical", 1)
    for model, optimizer in zip(models, optimizers):
        _train(model, optimizer, steps=3)
        optimizer.zero_grad()
        _backward(model, seed=9)
        model.linears[1].weight.grad.mul_(1e4)  # one layer of the batch of three spikes
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
        assert optimizer.clipped_updates == 1 and any("update_clip" in str(w.message) for w in caught)
    _assert_follows(models, optimizers, states=False)
    for name, norm in optimizers[0].update_norm_avg.items():
        torch.testing.assert_close(optimizers[1].update_norm_avg[name], norm, rtol=1e-5, atol=0)


def test_checkpoint_of_batched_running_norms_holds_own_tensors():
    model = Blocks()
    optimizer = _optimizer(model, "diagonal", True)
    _train(model, optimizer, steps=3)
    norms = optimizer.state_dict()["kronecker"]["update_norm_avg"]
    assert all(value.untyped_storage().nbytes() == value.element_size() for value in norms.values())
    for name, value in norms.items():
        assert torch.equal(value, optimizer.update_norm_avg[name])


def _ops_per_plain_step(depth: int, batch: bool) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(depth)])
    optimizer = SINGD(model, lr=0.05, T=2, structures="hierarchical", batch_layers=batch)
    x = torch.randn(16, 8)
    for _ in range(3):  # an update, a plain step, an update: every layer has a running norm
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with OperationCounter() as counter:  # step 3: preconditioning only
        optimizer.step()
    return counter.count


def test_a_batch_costs_a_constant_number_of_operations_per_step(monkeypatch):
    # With the multi-tensor finiteness check (CUDA's) on the CPU too.
    monkeypatch.setattr(reductions, "LAUNCH_BOUND_DEVICES", frozenset({"cuda", "cpu"}))
    batched = {depth: _ops_per_plain_step(depth, True) for depth in (4, 8)}
    by_layer = {depth: _ops_per_plain_step(depth, False) for depth in (4, 8)}
    # Four more layers: their gradient matrices (one cat each, with the bias) in
    # a batch, against a dozen operations each for the guard and the preconditioning.
    assert batched[8] - batched[4] <= 4
    assert by_layer[8] - by_layer[4] >= 4 * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batched_inner_products_match_one_by_one(dtype):
    a, b = torch.randn(3, 5, 4).to(dtype), torch.randn(3, 5, 4).to(dtype)
    a_t = a.mT.contiguous().mT  # a transposed layout, as a preconditioned gradient may have
    expected = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)])
    for rows in (reductions.inner_rows(a_t, b), reductions.batched_inner(a_t, b)):  # CPU's route and the GPU's
        assert rows.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structure", ["diagonal", "hierarchical", "tril_toeplitz"])
def test_cuda_batches_by_default_and_follows_layer_by_layer(structure, dtype):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Blocks().to("cuda", dtype))
    optimizers = [_optimizer(models[0], structure, False), _optimizer(models[1], structure, None)]
    assert optimizers[1]._batching(optimizers[1].layers)  # the default, on CUDA
    for model, optimizer in zip(models, optimizers):
        _train(model, optimizer, steps=5)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
    assert optimizers[1].skipped_steps == optimizers[0].skipped_steps == 0


@pytest.mark.parametrize("bound", [1e-6, 0.008])  # every factor step bounded; some
@pytest.mark.parametrize("structure", ["diagonal", "hierarchical"])
def test_bounded_factor_steps_in_a_batch_follow_layer_by_layer(structure, bound):
    # α₁ > 0: a bounded step keeps the old Riemannian momentum, which is the same
    # tensor as the step until then.
    models, optimizers = _pair(structure, max_factor_step=bound, alpha1=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bound's warning, every step
        for model, optimizer in zip(models, optimizers):
            _train(model, optimizer, steps=4)
    assert optimizers[1].clipped_factor_updates == optimizers[0].clipped_factor_updates > 0
    if bound == 0.008:
        assert optimizers[0].clipped_factor_updates < 4 * 2 * len(optimizers[0].layers)  # not all
    _assert_follows(models, optimizers)


def test_checkpoint_of_batched_factors_holds_own_tensors():
    model = Blocks()
    optimizer = _optimizer(model, "hierarchical", True)
    _train(model, optimizer, steps=2)
    assert any(state["K"]._base is not None for state in optimizer.layer_state.values())  # rows of a batch
    saved = optimizer.state_dict()["kronecker"]["layers"]
    for name, state in saved.items():
        for key, value in state.items():
            assert value._base is None and value.untyped_storage().nbytes() == value.numel() * value.element_size()
            assert torch.equal(value, optimizer.layer_state[name][key])


def test_stacked_gradient_matrices_are_the_layers_own():
    model = Blocks()
    optimizer = _optimizer(model, "diagonal", True)
    _train(model, optimizer, steps=1)
    _backward(model, samples=4)
    by_name = {layer.name: layer for layer in optimizer.layers}
    batches = [["convs.0", "convs.1"], ["linears.0", "linears.1"], ["linears.0", "linears.1", "linears.2"],
               ["embeddings.0", "embeddings.1"]]  # with biases (stacked); mixed, embeddings (layer by layer)
    for names in batches:
        layers = [by_name[name] for name in names]
        expected = torch.stack([layer.gradient_matrix() for layer in layers])
        assert torch.equal(KroneckerLayer.stacked_gradient_matrices(layers), expected)
    model.linears[1].bias.grad = None  # a missing bias gradient counts as zero
    layers = [by_name["linears.0"], by_name["linears.1"]]
    stacked = KroneckerLayer.stacked_gradient_matrices(layers)
    assert torch.equal(stacked, torch.stack([layer.gradient_matrix() for layer in layers]))
    assert torch.equal(stacked[1, :, -1], torch.zeros(8))


def test_batch_layers_changes_only_between_steps():
    model = Blocks()
    optimizer = _optimizer(model, "hierarchical", False)
    _train(model, optimizer, steps=1)
    _backward(model, samples=4)
    with pytest.raises(ValueError, match="batch_layers cannot change between a backward pass and its step"):
        optimizer.batch_layers = True
    assert optimizer.batch_layers is False
    optimizer.step()  # (projected per pass, as collected)
    optimizer.batch_layers = True
    _train(model, optimizer, steps=2)  # now deferred and batched
    assert optimizer.skipped_steps == 0
    with pytest.raises(ValueError, match="batch_layers must be None, True or False"):
        optimizer.batch_layers = "yes"


def test_batched_statistics_are_projected_at_the_update(monkeypatch):
    """With batch_layers the hooks collect gram statistics and each batch's
    projection is one call; without, every pass projects."""
    calls = []
    cls = REGISTRY["hierarchical"]
    original = cls._project_gram_from
    monkeypatch.setattr(cls, "_project_gram_from", lambda self, data, px, sq: calls.append(data.ndim) or original(
        self, data, px, sq))
    for batch, expected in ((False, [1] * 2 * 8), (True, sorted([2] * 2 * 3 + [1] * 2))):
        calls.clear()
        model = Blocks()
        _train(model, _optimizer(model, "hierarchical", batch), steps=1)
        # 8 layers × 2 factors one by one; or the 3 batches (embeddings, convolutions,
        # 8 → 8 linear layers) stacked and the head alone
        assert sorted(calls) == expected


def test_warm_start_with_batches_follows_layer_by_layer():
    """The starting layers take their first statistics one by one (projected at
    the identity), then join their batches."""
    models, optimizers = _pair("hierarchical", T=2, factor_init="warm")
    for model, optimizer in zip(models, optimizers):
        _train(model, optimizer, steps=5)
    _assert_follows(models, optimizers)
    assert optimizers[1].skipped_steps == optimizers[1].rejected_preconditioner_updates == 0
