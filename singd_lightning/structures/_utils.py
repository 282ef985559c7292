"""Small helpers shared by the structure implementations."""

from __future__ import annotations

import torch
from torch import Tensor


def unsqueeze_alpha(alpha: float | Tensor, ndim: int) -> float | Tensor:
    """Make a ``(*batch,)`` scale broadcast against ``(*batch, *rest)``.

    Args:
        alpha: A float, or a tensor of shape ``(*batch,)``.
        ndim: Number of trailing dimensions ``rest`` to broadcast over.

    Returns:
        ``alpha`` unchanged if it is a float, else a view of shape
        ``(*batch, 1, ..., 1)`` with ``ndim`` trailing ones.
    """
    if isinstance(alpha, Tensor):
        return alpha.reshape(*alpha.shape, *([1] * ndim))
    return alpha


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to run FFTs in: half types are upcast (CPU FFT lacks them)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_matmul_outer(mat: Tensor, x: Tensor) -> Tensor:
    """``M Mᵀ x`` for ``M`` of shape ``(*batch, d, d)`` and ``x`` of shape
    ``(*batch, d, n)``: through ``M Mᵀ`` (``d³ + d²n``) when ``x`` has more columns
    than rows, else as ``M (Mᵀ x)`` (``2d²n``)."""
    if x.shape[-1] > mat.shape[-1]:
        return (mat @ mat.mT) @ x
    return mat @ (mat.mT @ x)
