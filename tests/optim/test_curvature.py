"""The input and output-gradient matrices of SPEC §1 against autograd: for a
summed loss and the expand approximation, ``Gᵀ A`` is exactly the weight gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd_lightning.optim.curvature import KroneckerLayer, input_matrix, output_gradient_matrix


def _check(module: nn.Module, x: torch.Tensor) -> None:
    layer = KroneckerLayer("layer", module, group={}, has_bias=module.bias is not None)
    out = module(x)
    out.retain_grad()
    out.square().sum().backward()
    a_t, n = input_matrix(layer, x.detach(), "expand")
    g_t, _ = output_gradient_matrix(layer, out.grad, "expand", None)
    expected = layer.gradient_matrix()
    torch.testing.assert_close(g_t @ a_t.T, expected)
    assert n == a_t.shape[1] == g_t.shape[1]


@pytest.mark.parametrize(
    "conv",
    [
        dict(),
        dict(stride=2, padding=1, bias=False),
        dict(padding="same", dilation=2),
        dict(kernel_size=(2, 4), padding="same"),  # asymmetric "same" padding
        dict(padding="valid", stride=(2, 3)),
        dict(padding=(1, 2), dilation=(2, 1)),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=2, padding_mode="circular", stride=2),
    ],
)
def test_conv2d_patches_reproduce_weight_gradient(conv):
    torch.manual_seed(0)
    conv = {"kernel_size": 3, **conv}
    module = nn.Conv2d(3, 5, **conv).double()
    _check(module, torch.randn(2, 3, 9, 8, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(7, 4), (3, 5, 4), (2, 3, 2, 4), (4,)])
def test_linear_rows_reproduce_weight_gradient(shape):
    torch.manual_seed(0)
    module = nn.Linear(4, 3).double()
    _check(module, torch.randn(*shape, dtype=torch.float64))


def test_reduce_averages_inputs_and_sums_gradients():
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    layer = KroneckerLayer("layer", module, group={}, has_bias=True)
    x, g = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    a_t, n = input_matrix(layer, x, "reduce")
    g_t, terms = output_gradient_matrix(layer, g, "reduce", "batch+sequence")
    torch.testing.assert_close(a_t[:4], x.mean(1).T)
    torch.testing.assert_close(g_t, g.sum(1).T)
    assert (n, terms) == (2, 10)


def test_grouped_conv_averages_channel_groups():
    module = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    layer = KroneckerLayer("layer", module, group={}, has_bias=False)
    x = torch.randn(1, 4, 2, 2)
    a_t, _ = input_matrix(layer, x, "expand")
    torch.testing.assert_close(a_t, ((x[:, :2] + x[:, 2:]) / 2).flatten(2)[0])


@pytest.mark.parametrize(
    "conv",
    [dict(padding=1), dict(dilation=2, padding="same"), dict(stride=2, groups=3, padding=(0, 2), bias=False)],
)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_square_sums_without_matrix_equal_matrix_path(conv, approx):
    """The im2col-free row sums of squares (used by diagonal factors) equal the
    sums over the materialised matrix, for inputs and output gradients."""
    from singd_lightning.optim.curvature import input_rows, output_gradient_rows

    torch.manual_seed(0)
    module = nn.Conv2d(6, 3, 3, **conv).double()
    layer = KroneckerLayer("layer", module, group={}, has_bias=module.bias is not None)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    g = torch.randn_like(module(x))
    fast = input_rows(layer, x, approx).square_sums()
    slow = input_rows(layer, x, approx).matrix().square().sum(dim=-1)
    torch.testing.assert_close(fast, slow)
    fast_g = output_gradient_rows(layer, g, approx, "batch")[0].square_sums()
    slow_g = output_gradient_rows(layer, g, approx, "batch")[0].matrix().square().sum(dim=-1)
    torch.testing.assert_close(fast_g, slow_g)


ROW_SOURCES = [
    pytest.param(nn.Conv2d(32, 5, 3, padding=1), (3, 32, 5, 4), id="conv-wide"),  # shifted products
    pytest.param(nn.Conv2d(32, 4, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False), (2, 32, 7, 8), id="conv-strided"),
    pytest.param(nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode="reflect"), (3, 6, 5, 5), id="conv-narrow"),
    pytest.param(nn.Conv2d(6, 4, 1), (3, 6, 5, 4), id="conv-pointwise"),
    pytest.param(nn.Conv2d(3, 4, 5, padding=2), (2, 3, 6, 6), id="conv-large-kernel"),  # patch-view copies
    pytest.param(nn.Linear(7, 5), (3, 4, 7), id="linear-bias"),
    pytest.param(nn.Linear(7, 5, bias=False), (3, 4, 7), id="linear"),
]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("module,shape", ROW_SOURCES)
def test_rows_chunks_reduce_and_cross_equal_the_matrix(module, shape, approx):
    """Chunks (in either memory layout) tile the matrix, and the chunked statistics
    (sums, and products of some rows with all rows) equal those of the matrix."""
    from singd_lightning.optim.curvature import input_rows, output_gradient_rows

    torch.manual_seed(0)
    module = module.double()
    layer = KroneckerLayer("layer", module, group={}, has_bias=module.bias is not None)
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn_like(module(x))
    for make_rows in (lambda: input_rows(layer, x, approx), lambda: output_gradient_rows(layer, g, approx, "batch")[0]):
        full = make_rows().matrix()
        for row_major in (False, True):
            rows = make_rows()
            rows.chunk_bytes = full.shape[0] * full.element_size()  # one unit per chunk
            chunks = list(rows.chunks(row_major=row_major))
            torch.testing.assert_close(torch.cat(chunks, dim=1), full)
            if row_major and rows._copies:  # built in the layout asked for
                assert all(chunk.mT.is_contiguous() for chunk in chunks)
        rows = make_rows()
        rows.chunk_bytes = 1
        torch.testing.assert_close(rows.reduce(lambda m: m @ m.T), full @ full.T)
        torch.testing.assert_close(rows.gram(), full @ full.T)
        index = torch.tensor([0, full.shape[0] - 1, full.shape[0] // 2])
        torch.testing.assert_close(make_rows().cross(index), full[index] @ full.T)
        torch.testing.assert_close(make_rows().square_sums(), full.square().sum(dim=1))


@pytest.mark.parametrize("module,shape", ROW_SOURCES)
def test_scaled_float16_rows_stay_in_range(module, shape):
    """In float16 the rows are scaled before any product (the collector's 1/√n),
    so sums of squares far beyond float16's range come out finite and right."""
    from singd_lightning.optim.curvature import input_rows

    torch.manual_seed(0)
    layer = KroneckerLayer("layer", module, group={}, has_bias=module.bias is not None)
    x = 100 * torch.randn(*shape)  # squares summed over the rows overflow float16
    reference = input_rows(layer, x.double(), "expand").matrix()
    scale = reference.shape[1] ** -0.5
    reference = reference * scale
    index = torch.tensor([0, reference.shape[0] - 1])

    def rows():
        half = input_rows(layer, x.half(), "expand")
        half.scale = scale
        return half

    assert reference.square().sum(dim=1).max() / scale**2 > torch.finfo(torch.float16).max
    for actual, expected in [
        (rows().square_sums(), reference.square().sum(dim=1)),
        (rows().gram(), reference @ reference.T),
        (rows().cross(index), reference[index] @ reference.T),
    ]:
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_empty_batch_gives_zero_statistics():
    """A pass with no samples contributes zero to every structure's statistic."""
    from singd_lightning.optim.curvature import input_rows
    from singd_lightning.structures import STRUCTURES

    module = nn.Conv2d(4, 3, 3, padding=1)
    layer = KroneckerLayer("layer", module, group={}, has_bias=True)
    x = torch.randn(0, 4, 5, 5)
    for name, structure in STRUCTURES.items():
        layout = structure(layer.dim_in)
        stat = layout.project_gram_rows(layout.identity(), input_rows(layer, x, "expand"))
        assert stat.shape == (layout.numel,) and not stat.any(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim, keepdim", [(0, False), (0, True), ((0, 2, 3), False)])
def test_square_sums_by_the_launch_bound_route_equal_the_chunked_one(monkeypatch, dtype, dim, keepdim):
    from singd_lightning.optim import curvature, reductions

    x = torch.randn(300, 5, 30, 40).to(dtype)  # (more than one chunk of 2^18 elements)
    chunked = curvature._square_sums(x, dim, keepdim)
    monkeypatch.setattr(reductions, "LAUNCH_BOUND_DEVICES", frozenset({"cuda", "cpu"}))
    one_kernel = curvature._square_sums(x, dim, keepdim)
    assert one_kernel.dtype == chunked.dtype == dtype and one_kernel.shape == chunked.shape
    expected = x.double().square().sum(dim=dim, keepdim=keepdim)
    # (sums of 360,000 squares: float32 accumulation orders differ by up to 1e-4)
    rtol = {torch.float64: 1e-10, torch.float32: 3e-4, torch.bfloat16: 2e-2}[dtype]
    for result in (chunked, one_kernel):
        torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=0)
