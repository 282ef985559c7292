"""Semantics of SINGD beyond the reference: fixed points, accumulation, skipped
steps, checkpoints, the fallback, wrappers, low precision and bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from singd_lightning import IKFAC, INGD, KFAC, SINGD
from singd_lightning.structures import STRUCTURES


def _mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 4, bias=bias))


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _train(model, optimizer, batches, steps):
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()


def _batches(n=3, size=12, dim=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, dim, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


# ------------------------------------------------------------------ fixed point
def test_ikfac_fixed_point_is_damped_kfac_inverse():
    """On a fixed batch with lr=0, IKFAC drives K Kᵀ → (AᵀA + λI)⁻¹, C Cᵀ → (GᵀG + λI)⁻¹."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    damping = 0.1
    optimizer = IKFAC(layer, lr=0.0, momentum=0.0, damping=damping, lr_cov=0.5, T=1)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(layer(x), y).backward()
        optimizer.step()
    a = torch.cat([x, torch.ones(40, 1, dtype=x.dtype)], dim=1) / 40**0.5
    out = layer(x)
    g = torch.autograd.grad(nn.functional.cross_entropy(out, y), out)[0] * 40**0.5
    K = optimizer.layer_state[""]["K"].view(6, 6)
    C = optimizer.layer_state[""]["C"].view(3, 3)
    expected_k = torch.linalg.inv(a.T @ a + damping * torch.eye(6, dtype=x.dtype))
    expected_c = torch.linalg.inv(g.T @ g + damping * torch.eye(3, dtype=x.dtype))
    torch.testing.assert_close(K @ K.T, expected_k, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(C @ C.T, expected_c, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- accumulation
@pytest.mark.parametrize("loss_average", ["batch", "batch+sequence", None])
@pytest.mark.parametrize("structures", [("dense", "dense"), ("hierarchical", "tril_toeplitz")])
def test_accumulation_equals_joint_batch(loss_average, structures):
    """Three backward passes (micro-batches of unequal size) then one step equal
    one backward pass on the concatenated batch."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    models = [seq, copy.deepcopy(seq)]
    hyper = dict(lr=0.1, lr_cov=0.1, T=1, structures=structures, loss_average=loss_average)
    optimizers = [SINGD(m, **hyper) for m in models]
    g = torch.Generator().manual_seed(1)
    sizes = [4, 4, 4]
    x = torch.randn(sum(sizes), 3, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes), 3), generator=g)
    reduction = "sum" if loss_average is None else "mean"

    def loss_of(model, xb, yb):
        return nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction=reduction)

    for _ in range(3):
        optimizers[0].zero_grad()
        loss_of(models[0], x, y).backward()
        optimizers[0].step()
        optimizers[1].zero_grad()
        for xb, yb in zip(x.split(sizes), y.split(sizes)):
            part = loss_of(models[1], xb, yb)
            (part if loss_average is None else part * len(xb) / len(x)).backward()
        optimizers[1].step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    for key in optimizers[0].layer_state["0"]:
        torch.testing.assert_close(optimizers[1].layer_state["0"][key], optimizers[0].layer_state["0"][key])


# --------------------------------------------------------------- invalid steps
def test_inf_gradient_step_changes_nothing():
    model = _mlp()
    optimizer = SINGD(model, T=1, lr=0.1, structures=("diagonal", "dense"))
    batches = _batches()
    _train(model, optimizer, batches, 2)
    before = copy.deepcopy(optimizer.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    x, y = batches[0]
    (_loss(model, x, y) * float("inf")).backward()
    with pytest.warns(UserWarning, match="skipped"):
        optimizer.step()
    after = optimizer.state_dict()
    for p, q in zip(params_before, model.parameters()):
        assert torch.equal(p, q)
    assert after["kronecker"]["steps"] == before["kronecker"]["steps"]
    for name, tensors in before["kronecker"]["layers"].items():
        for key, value in tensors.items():
            assert torch.equal(value, after["kronecker"]["layers"][name][key])
    for index, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after["state"][index][key])
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_non_finite_factor_update_is_rejected_for_that_layer_only(structure):
    model = _mlp()
    optimizer = SINGD(model, T=1, lr=0.1, structures=(structure, structure))
    batches = _batches()
    _train(model, optimizer, batches, 2)
    layer = next(layer for layer in optimizer.layers if layer.name == "0")
    layout_k = optimizer.layouts(layer)[0]
    layout_k.compose = lambda a, b: torch.full_like(a, float("nan"))  # overflowing update
    before = {name: {k: v.clone() for k, v in st.items()} for name, st in optimizer.layer_state.items()}
    params_before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, batches[2:], 1)
    assert optimizer.rejected_preconditioner_updates == 1
    for key, value in before["0"].items():
        assert torch.equal(optimizer.layer_state["0"][key], value), key
    assert not torch.equal(optimizer.layer_state["2"]["K"], before["2"]["K"])
    assert all(not torch.equal(p, q) for p, q in zip(params_before, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_finds_one_bad_entry_anywhere(dtype, value):
    from singd_lightning.optim.reductions import non_finite

    for size in (1, 33, 4099):
        for position in (0, size // 2, size - 1):
            bad = torch.randn(size).to(dtype)
            bad[position] = value
            assert non_finite([torch.randn(5).to(dtype), torch.empty(0, dtype=dtype), bad])
    # The largest finite values are finite; empty lists and tensors are not bad.
    largest = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)
    assert not non_finite([largest, torch.empty(0, dtype=dtype)])
    assert not non_finite([torch.empty(0, dtype=dtype)])
    assert not non_finite([])


def test_grad_scaler_unscales_statistics_exactly():
    """With a (CPU) GradScaler, factors equal those of an unscaled run."""
    torch.manual_seed(0)
    models = [_mlp(), _mlp()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    optimizers = [
        SINGD(models[0], T=1, lr=0.1, lr_cov=0.1, structures=("dense", "diagonal")),
        SINGD(models[1], T=1, lr=0.1, lr_cov=0.1, structures=("dense", "diagonal"), grad_scaler=scaler),
    ]
    for x, y in _batches(4):
        optimizers[0].zero_grad()
        _loss(models[0], x, y).backward()
        optimizers[0].step()
        optimizers[1].zero_grad()
        scaler.scale(_loss(models[1], x, y)).backward()
        scaler.step(optimizers[1])
        scaler.update()
    assert scaler.get_scale() != 2.0**10  # the scale changed during the run
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cls,kwargs", [
    (SINGD, dict(structures=("hierarchical", "block_diagonal"), T=2, lr_cov=lambda t: 1e-2)),
    (KFAC, dict(T=2)),
])
def test_checkpoint_round_trip_is_bit_identical(cls, kwargs):
    batches = _batches(4)
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 4))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    reference_model = copy.deepcopy(model)
    reference_opt = cls(reference_model, **kwargs)
    _train(reference_model, reference_opt, batches, 8)

    first = copy.deepcopy(model)
    first_opt = cls(first, **kwargs)
    _train(first, first_opt, batches, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = cls(resumed, **kwargs)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for step in range(5, 8):
        x, y = batches[step % len(batches)]
        resumed_opt.zero_grad()
        _loss(resumed, x, y).backward()
        resumed_opt.step()
    for p, q in zip(reference_model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert callable(resumed_opt.param_groups[0].get("lr_cov", 0.0)) == ("lr_cov" in kwargs)


def test_state_dict_is_keyed_by_module_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = SINGD(model).state_dict()
    assert set(state["kronecker"]["layers"]) == {"0", "2"}


# ------------------------------------------------------------ nothing untrained
class _Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)  # a bias before BN gets no gradient
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(8 + 2 * 16, 3)

    def forward(self, tokens, image):
        h = self.embed(tokens) + self.pos
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)
        h = self.norm(h).mean(dim=1)
        c = self.bn(self.conv(image)).flatten(1)
        return self.head(torch.cat([h, c], dim=1))


@pytest.mark.parametrize("fallback", ["adamw", "sgd"])
def test_every_parameter_moves(fallback):
    torch.manual_seed(0)
    model = _Everything()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = SINGD(model, lr=0.01, T=1, fallback=fallback, structures=("diagonal", "diagonal"))
    assert {layer.name for layer in optimizer.layers} == {"embed", "conv", "head"}
    tokens = torch.randint(0, 10, (6, 4))
    image = torch.randn(6, 1, 4, 4)
    y = torch.randint(0, 3, (6,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens, image), y).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name]), f"{name} did not move"


def test_fallback_none_freezes_and_warns_with_names():
    model = _Everything()
    with pytest.warns(UserWarning, match="cls_token"):
        optimizer = SINGD(model, fallback="none")
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.pos) not in trained and id(model.head.weight) in trained


def test_fallback_adamw_matches_torch_adamw():
    """The fallback group is exactly AdamW with the fallback hyper-parameters."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(5)
    nn.init.normal_(norm.weight)
    twin = copy.deepcopy(norm)
    ours = SINGD(norm, lr=0.02, fallback_weight_decay=0.1, fallback_betas=(0.8, 0.99), fallback_eps=1e-6)
    theirs = torch.optim.AdamW(twin.parameters(), lr=0.02, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    x = torch.randn(7, 5)
    for _ in range(4):
        for module, opt in ((norm, ours), (twin, theirs)):
            opt.zero_grad()
            module(x).square().sum().backward()
            opt.step()
    for p, q in zip(norm.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


# ------------------------------------------------------------ wrappers, layers
def test_data_parallel_wrapper_is_unwrapped():
    model = _mlp()
    optimizer = SINGD(nn.DataParallel(model), T=1)
    assert [layer.name for layer in optimizer.layers] == ["0", "2"]
    x, y = _batches(1)[0]
    optimizer.zero_grad()
    _loss(nn.DataParallel(model), x, y).backward()
    optimizer.step()
    assert optimizer.steps == 1


def test_layer_without_gradient_keeps_factors():
    torch.manual_seed(0)
    used, unused = nn.Linear(4, 3), nn.Linear(4, 3)
    model = nn.ModuleDict({"used": used, "unused": unused})
    optimizer = SINGD(model, T=1, structures=("dense", "dense"))
    start = copy.deepcopy(optimizer.layer_state["unused"])
    for _ in range(2):
        optimizer.zero_grad()
        used(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    for key, value in start.items():
        assert torch.equal(optimizer.layer_state["unused"][key], value)
    assert not torch.equal(optimizer.layer_state["used"]["K"], start["K"])


def test_closure_is_evaluated_with_grad_and_returned():
    model = _mlp()
    optimizer = SINGD(model, T=1)
    x, y = _batches(1)[0]

    def plain_closure():
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(plain_closure)
    assert loss is not None and loss.ndim == 0


def test_parameter_groups_with_own_structures():
    model = _mlp()
    optimizer = SINGD(
        params=[
            {"params": model[0].parameters(), "structures": ("diagonal", "tril_toeplitz"), "lr": 0.5},
            {"params": model[2].parameters()},
        ],
        model=model,
        structures=("dense", "dense"),
    )
    layouts = {layer.name: optimizer.layouts(layer) for layer in optimizer.layers}
    assert [type(s).__name__ for s in layouts["0"]] == ["Diagonal", "TrilToeplitz"]
    assert [type(s).__name__ for s in layouts["2"]] == ["Dense", "Dense"]
    assert optimizer.param_groups[0]["lr"] == 0.5


# -------------------------------------------------------------- low precision
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_bfloat16_preconditioner_runs_every_structure(name):
    model = _mlp()
    optimizer = SINGD(model, T=1, lr=0.05, structures=(name, name), preconditioner_dtype=(torch.bfloat16, "bf16"))
    _train(model, optimizer, _batches(2), 3)
    assert optimizer.layer_state["0"]["K"].dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model[0].weight.dtype == torch.float32


def test_bfloat16_model():
    model = _mlp().to(torch.bfloat16)
    optimizer = SINGD(model, T=1, lr=0.05, structures=("hierarchical", "diagonal"))
    x, y = _batches(1)[0]
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, x.bfloat16(), y).backward()
        optimizer.step()
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


# ------------------------------------------------------------------ baselines
def test_ingd_ikfac_are_singd_special_cases():
    model = _mlp()
    ingd = INGD(model)
    assert ingd.param_groups[0]["structures"] == ("dense", "dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ikfac = IKFAC(_mlp())
    assert ikfac.param_groups[0]["kfac_like"] and ikfac.param_groups[0]["alpha1"] == 0.0


def test_kfac_matches_dense_formula():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    twin = copy.deepcopy(layer)
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    optimizer = KFAC(layer, lr=0.1, momentum=0.0, damping=0.04, T=1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(layer(x), y).backward()
    optimizer.step()
    out = twin(x)
    loss = nn.functional.cross_entropy(out, y)
    grad_w, grad_out = torch.autograd.grad(loss, [twin.weight, out])
    a = x.T @ x / 10
    g = (grad_out * 10**0.5).T @ (grad_out * 10**0.5)
    update = torch.linalg.inv(g + 0.2 * torch.eye(3, dtype=x.dtype)) @ grad_w @ torch.linalg.inv(a + 0.2 * torch.eye(4, dtype=x.dtype))
    torch.testing.assert_close(layer.weight, twin.weight - 0.1 * update)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(structures=("diagonal", "sparse")), "Unknown structure 'sparse'.*diagonal"),
        (dict(lr=-1.0), "lr must be"),
        (dict(damping=-1e-3), "damping must be"),
        (dict(momentum=1.0), "momentum must be"),
        (dict(momentum=-0.1), "momentum must be"),
        (dict(alpha1=1.5), "alpha1 must be"),
        (dict(T=0), "T must be"),
        (dict(T=2.5), "T must be"),
        (dict(loss_average="mean"), r"loss_average must be one of \['batch', 'batch\+sequence', None\]"),
        (dict(kfac_approx="full"), r"kfac_approx must be one of \['expand', 'reduce'\]"),
        (dict(lr_cov=-0.1), "lr_cov must be"),
        (dict(fallback="lamb"), r"fallback must be one of \['adamw', 'sgd', 'none'\]"),
        (dict(preconditioner_dtype=("int8", None)), "preconditioner_dtype"),
        (dict(structures=({"name": "block_diagonal", "block_size": 0}, "dense")), "block_size"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SINGD(_mlp(), **kwargs)


def test_schedule_returning_non_number_raises():
    model = _mlp()
    optimizer = SINGD(model, T=1, lr_cov=lambda step: "fast")
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    with pytest.raises(ValueError, match="lr_cov"):
        optimizer.step()


@pytest.mark.parametrize("alias,expected", [
    ("block30diagonal", ("BlockDiagonal", {"block_size": 30})),
    ("hierarchical15_15", ("Hierarchical", {"k1": 15, "k2": 15})),
    ("triltoeplitz", ("TrilToeplitz", {})),
    ("triutoeplitz", ("TriuToeplitz", {})),
])
def test_reference_aliases(alias, expected):
    model = _mlp()
    optimizer = SINGD(model, structures=(alias, alias))
    layout = optimizer.layouts(optimizer.layers[0])[0]
    assert (type(layout).__name__, layout.options()) == expected


def test_fallback_moments_of_half_parameters_stay_float32_through_checkpoints():
    """AdamW moments of float16 parameters are kept in float32 (in float16 the
    squared gradients underflow) and survive a state_dict round trip exactly."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(4).half()
    optimizer = SINGD(norm, lr=1e-3)
    x = torch.randn(3, 4).half()
    for _ in range(2):
        optimizer.zero_grad()
        (norm(x).float() * 1e-4).sum().backward()  # tiny gradients: their squares underflow in fp16
        optimizer.step()
    moments = optimizer.state[norm.weight]
    assert moments["exp_avg_sq"].dtype == torch.float32 and moments["exp_avg_sq"].abs().max() > 0
    assert torch.isfinite(norm.weight).all()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SINGD(norm, lr=1e-3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.state[norm.weight]["exp_avg_sq"], moments["exp_avg_sq"])
