"""The shared product helpers of the structures."""

from __future__ import annotations

import pytest
import torch

from singd_lightning.structures._utils import dense_matmul_outer, symmetric_matmul


@pytest.mark.parametrize("dim", [1, 5, 255, 256, 301, 1031])  # 1, 2, 2 and 8 row blocks
@pytest.mark.parametrize("batch", [(), (2,)])
def test_symmetric_matmul_equals_full_product(dim, batch):
    x = torch.randn(*batch, dim, 7, dtype=torch.float64)
    expected = x @ x.mT
    actual = symmetric_matmul(x, x.mT)
    torch.testing.assert_close(actual, expected)
    assert torch.equal(actual, actual.mT)  # exactly symmetric
    # A sandwich Kᵀ U K with a non-symmetric K; K broadcast over the batch.
    k = torch.randn(dim, dim, dtype=torch.float64)
    u = expected + torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(symmetric_matmul(k.mT @ u, k), k.mT @ u @ k)


@pytest.mark.parametrize("columns", [3, 700])  # M (Mᵀ x), and (M Mᵀ) x
def test_dense_matmul_outer(columns):
    m = torch.randn(300, 300, dtype=torch.float64)
    x = torch.randn(300, columns, dtype=torch.float64)
    torch.testing.assert_close(dense_matmul_outer(m, x), m @ m.T @ x)
