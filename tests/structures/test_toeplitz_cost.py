"""The Toeplitz FFT-versus-dense choice and block size follow the device: the CPU
constants were measured with MKL, a GPU's balance of matrix products to memory
bandwidth (and its kernel launches) differs."""

from __future__ import annotations

import pytest
import torch

from singd_lightning.structures import toeplitz
from singd_lightning.structures.toeplitz import TrilToeplitz, TriuToeplitz


@pytest.fixture
def tf32():
    """Set ``allow_tf32`` for a test, restoring it after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield lambda on: setattr(torch.backends.cuda.matmul, "allow_tf32", on)
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_fft_cost_uses_the_devices_constant(tf32):
    d, cpu, cuda = 1500, torch.device("cpu"), torch.device("cuda")
    unit = 2 * toeplitz._fft_len(d) * torch.log2(torch.tensor(float(toeplitz._fft_len(d)))).item()
    assert toeplitz._fft_cost(d, 1, 2, cpu) == pytest.approx(toeplitz.FFT_COST * unit)
    tf32(False)
    assert toeplitz._fft_cost(d, 1, 2, cuda) == pytest.approx(toeplitz.CUDA_FFT_COST * unit)
    tf32(True)  # tensor-core matrix products: dense wins for longer rows
    assert toeplitz._fft_cost(d, 1, 2, cuda) == pytest.approx(toeplitz.CUDA_FFT_COST_TF32 * unit)


def test_the_same_size_can_take_another_route_on_cuda(tf32):
    tf32(False)
    d = 1500
    # Dense on the CPU (MKL's FFTs are dear), FFT on a GPU in full float32.
    assert d * d <= toeplitz._fft_cost(d, 1, 2, torch.device("cpu"))
    assert d * d > toeplitz._fft_cost(d, 1, 2, torch.device("cuda"))
    structure = TrilToeplitz(d)
    n = 10**5  # many columns: the Gram matrix first on both
    assert structure._gram_first(n, torch.device("cpu")) and structure._gram_first(n, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [TrilToeplitz, TriuToeplitz])
@pytest.mark.parametrize("tf32_on", [False, True])
def test_cuda_routes_agree_with_dense(cls, tf32_on, tf32):
    tf32(tf32_on)  # with TF32 the dense route is taken at this size, without it the FFTs
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if tf32_on else {"rtol": 1e-3, "atol": 1e-3}
    d, n = 2304, 3000
    structure = cls(d)
    generator = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(d, device="cuda", generator=generator) / d**0.5
    x = torch.randn(d, n, device="cuda", generator=generator)
    dense = structure.to_dense(t).double()  # the reference in float64
    for transpose in (False, True):
        expected = (dense.mT if transpose else dense) @ x.double()
        torch.testing.assert_close(structure.matmul(t, x, transpose=transpose).double(), expected, **tolerance)
    y = dense.mT @ x.double()
    expected = structure.project(y @ y.mT) / n
    torch.testing.assert_close(structure.project_gram(t, x).double() / n, expected, **tolerance)
    # Few large blocks: one per 128 MiB of float64 rows.
    blocks = list(toeplitz._padded_row_blocks(x.unsqueeze(0), toeplitz._fft_len(d)))
    per_block = toeplitz._CUDA_BLOCK_ELEMENTS // toeplitz._fft_len(d)
    assert len(blocks) == -(-n // per_block)
