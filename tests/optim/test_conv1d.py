"""``nn.Conv1d`` preconditioning: a ``Conv1d`` is the ``Conv2d`` of unit height
(kernel ``(1, k)``), so its statistics and updates must equal that ``Conv2d``'s
exactly, and the reference package's (which only knows ``Conv2d``) through it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from singd_lightning import KFAC, SINGD
from singd_lightning.optim import PAPER_UPDATE
from singd_lightning.optim.curvature import KroneckerLayer, input_matrix, output_gradient_matrix

VARIANTS = {
    "plain": dict(),
    "stride-pad-nobias": dict(stride=2, padding=1, bias=False),
    "same-dilation": dict(padding="same", dilation=2),
    "same-even-kernel": dict(kernel_size=4, padding="same"),  # the odd pad goes right
    "valid-groups": dict(padding="valid", groups=2, stride=3),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "circular-stride": dict(padding=2, padding_mode="circular", stride=2),
    "replicate-same-groups": dict(padding="same", padding_mode="replicate", groups=4, dilation=2),
}


def _conv1d(variant: str, c_in: int = 4, c_out: int = 8) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, **{"kernel_size": 3, **VARIANTS[variant]})


def _as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The unit-height ``Conv2d`` computing what ``conv`` computes on ``(N, C, 1, L)``."""
    padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), stride=(1, conv.stride[0]),
        padding=padding, dilation=(1, conv.dilation[0]), groups=conv.groups, bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(conv.weight.unsqueeze(2))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


class _Net(nn.Module):
    """Conv1d → ReLU → Conv1d → flatten → Linear; with ``two_d`` the same network
    built from unit-height ``Conv2d`` layers on ``(N, C, 1, L)``."""

    def __init__(self, variant: str, two_d: bool = False) -> None:
        super().__init__()
        self.two_d = two_d
        self.conv = _conv1d(variant)
        self.conv2 = nn.Conv1d(8, 6, 2, bias=False)
        self.head = nn.LazyLinear(5)

    def to_2d(self) -> _Net:
        other = copy.deepcopy(self)
        other.two_d = True
        other.conv, other.conv2 = _as_conv2d(self.conv), _as_conv2d(self.conv2)
        return other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.two_d:
            x = x.unsqueeze(2)
        h = self.conv2(torch.relu(self.conv(x)))
        return self.head(h.flatten(1))


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 4, 17, generator=g, dtype=dtype), torch.randint(0, 5, (6,), generator=g)


def _train(model, optimizer, x, y, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _pair(variant: str, dtype=torch.float64):
    torch.manual_seed(0)
    net = _Net(variant).to(dtype)
    x, _ = _data(dtype)
    net(x)  # materialise the lazy head
    return net, net.to_2d()


# ------------------------------------------------------------------ statistics
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("variant", [v for v, options in VARIANTS.items() if "groups" not in options])
def test_conv1d_patches_reproduce_weight_gradient(variant):
    """For a summed loss, ``Gᵀ A`` of the expand rows is the weight gradient
    (without groups, whose inputs the rows average over the channel groups)."""
    torch.manual_seed(0)
    module = _conv1d(variant).double()
    layer = KroneckerLayer("layer", module, group={}, has_bias=module.bias is not None)
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    out = module(x)
    out.retain_grad()
    out.square().sum().backward()
    a_t, n = input_matrix(layer, x, "expand")
    g_t, _ = output_gradient_matrix(layer, out.grad, "expand", None)
    torch.testing.assert_close(g_t @ a_t.T, layer.gradient_matrix())
    assert n == a_t.shape[1] == g_t.shape[1] == 3 * out.shape[-1]
    assert a_t.shape[0] == layer.dim_in == module.weight[0].numel() + int(module.bias is not None)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("variant", ["plain", "valid-groups", "circular-stride"])
def test_conv1d_rows_equal_unit_height_conv2d_rows(variant, approx):
    """Un-batched and batched inputs alike give the rows of the unit-height Conv2d."""
    torch.manual_seed(0)
    conv1d = _conv1d(variant).double()
    conv2d = _as_conv2d(conv1d)
    has_bias = conv1d.bias is not None
    layers = [KroneckerLayer("layer", m, group={}, has_bias=has_bias) for m in (conv1d, conv2d)]
    for x in (torch.randn(2, 4, 13, dtype=torch.float64), torch.randn(4, 13, dtype=torch.float64)):
        g = torch.randn_like(conv1d(x))
        rows_1d = input_matrix(layers[0], x, approx)
        rows_2d = input_matrix(layers[1], x.unsqueeze(-2), approx)
        torch.testing.assert_close(rows_1d[0], rows_2d[0])
        assert rows_1d[1] == rows_2d[1]
        out_1d = output_gradient_matrix(layers[0], g, approx, "batch+sequence")
        out_2d = output_gradient_matrix(layers[1], g.unsqueeze(-2), approx, "batch+sequence")
        torch.testing.assert_close(out_1d[0], out_2d[0])
        assert out_1d[1] == out_2d[1]


# --------------------------------------------------------------------- updates
STRUCTURES = ["dense", "diagonal", "hierarchical", "tril_toeplitz", "triu_toeplitz", "block_diagonal"]
HYPER = dict(lr=0.05, lr_cov=0.05, damping=0.01, momentum=0.9, alpha1=0.5, weight_decay=1e-3, T=1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "variant,structure",
    [(v, STRUCTURES[i % len(STRUCTURES)]) for i, v in enumerate(VARIANTS)],
)
def test_singd_on_conv1d_equals_unit_height_conv2d(variant, structure, approx):
    """Parameters and factors after a few float64 steps equal those of the Conv2d
    network (whose updates test_reference checks against the reference package)."""
    net_1d, net_2d = _pair(variant)
    x, y = _data()
    hyper = {**HYPER, "structures": (structure, structure), "kfac_approx": approx}
    optimizers = [SINGD(net_1d, **hyper), SINGD(net_2d, **hyper)]
    assert [layer.name for layer in optimizers[0].layers] == ["conv", "conv2", "head"]
    _train(net_1d, optimizers[0], x, y)
    _train(net_2d, optimizers[1], x, y)
    for (name, p), q in zip(net_1d.named_parameters(), net_2d.parameters()):
        torch.testing.assert_close(p, q.reshape_as(p), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for name, state in optimizers[0].layer_state.items():
        for key, value in state.items():
            torch.testing.assert_close(value, optimizers[1].layer_state[name][key], rtol=1e-10, atol=1e-12)


def test_kfac_on_conv1d_equals_unit_height_conv2d():
    net_1d, net_2d = _pair("same-dilation")
    x, y = _data()
    optimizers = [KFAC(net_1d, lr=0.05, damping=0.01, T=1), KFAC(net_2d, lr=0.05, damping=0.01, T=1)]
    _train(net_1d, optimizers[0], x, y)
    _train(net_2d, optimizers[1], x, y)
    for p, q in zip(net_1d.parameters(), net_2d.parameters()):
        torch.testing.assert_close(p, q.reshape_as(p), rtol=1e-10, atol=1e-12)


REFERENCE_CASES = [
    ("plain", "expand", "dense"),
    ("stride-pad-nobias", "reduce", "dense"),
    ("same-dilation", "expand", "diagonal"),
    ("valid-groups", "reduce", "diagonal"),
    ("same-dilation", "reduce", "dense"),  # (the reference ignores padding modes)
    ("stride-pad-nobias", "expand", "hierarchical15_15"),  # (nor asymmetric "same" pads)
    ("valid-groups", "expand", "triltoeplitz"),
]


@pytest.mark.parametrize("variant,approx,structure", REFERENCE_CASES)
def test_conv1d_matches_reference_through_unit_height_conv2d(variant, approx, structure):
    """The reference package preconditions no Conv1d: it runs on the unit-height
    Conv2d network (float64 where its structure allows), ours on the Conv1d one."""
    reference = pytest.importorskip("singd.optim.optimizer")
    dtype = torch.float64 if structure in ("dense", "diagonal") else torch.float32
    net_1d, net_2d = _pair(variant, dtype)
    start = [p.detach().clone() for p in net_1d.parameters()]
    x, y = _data(dtype)
    hyper = {**HYPER, "structures": (structure, structure), "kfac_approx": approx}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_optimizer = reference.SINGD(net_2d, **hyper)
    _train(net_2d, ref_optimizer, x, y)
    _train(net_1d, SINGD(net_1d, **hyper, **PAPER_UPDATE), x, y)  # the reference's update
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    for (name, p), q, p0 in zip(net_1d.named_parameters(), net_2d.parameters(), start):
        torch.testing.assert_close(p, q.reshape_as(p), **tol, msg=lambda m: f"{name}: {m}")
        assert (p - p0).abs().max() > 1e-4, f"{name} did not move"


# ------------------------------------------------------------------ integration
class _Mixed(nn.Module):
    """A Conv1d over a sequence, a Conv2d over an image and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Conv1d(3, 5, 3, padding="same")
        self.image = nn.Conv2d(2, 4, 3, stride=2)
        self.head = nn.Linear(5 + 4, 3)

    def forward(self, seq: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.tanh(self.seq(seq)).mean(-1), torch.tanh(self.image(image)).mean((-2, -1))], dim=1)
        return self.head(h)


def test_mixed_conv1d_conv2d_linear_model_trains_without_fallback():
    """Every parameter is in a Kronecker layer (fallback='none' warns about none;
    Conv1d parameters used to need the fallback), and the loss goes down."""
    torch.manual_seed(0)
    model = _Mixed()
    g = torch.Generator().manual_seed(3)
    seq, image = torch.randn(16, 3, 10, generator=g), torch.randn(16, 2, 7, 7, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = SINGD(model, lr=0.1, T=1, fallback="none", structures=("dense", "diagonal"))
    assert sorted(layer.name for layer in optimizer.layers) == ["head", "image", "seq"]
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(seq, image), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_checkpoint_layout_names_conv1d_dims():
    """``d_K = C_in/groups · k + 1`` (bias) and ``d_C = C_out`` are in the layout,
    and the state round-trips."""
    model = _Mixed()
    optimizer = SINGD(model, T=1, structures=("hierarchical", "dense"))
    optimizer.zero_grad()
    model(torch.randn(2, 3, 10), torch.randn(2, 2, 7, 7)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    layout = state["kronecker"]["layouts"]["seq"]
    assert (layout["K"]["dim"], layout["C"]["dim"]) == (3 * 3 + 1, 5)
    assert state["kronecker"]["layers"]["seq"]["C"].shape == (25,)
    SINGD(_Mixed(), T=1, structures=("hierarchical", "dense")).load_state_dict(state)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_conv1d_model_trains_like_eager_in_one_graph():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = _Mixed()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="eager")
    hyper = dict(lr=0.05, T=1, structures=("dense", "diagonal"))
    optimizers = [SINGD(eager, **hyper), SINGD(compiled, **hyper)]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        seq, image, y = torch.randn(4, 3, 10, generator=g), torch.randn(4, 2, 7, 7, generator=g), torch.arange(4) % 3
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(seq, image), y).backward()
            optimizer.step()
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for key, value in optimizers[0].layer_state["seq"].items():
        torch.testing.assert_close(optimizers[1].layer_state["seq"][key], value, rtol=1e-5, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
