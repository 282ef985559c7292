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


# Row-block height of :func:`symmetric_matmul`: large enough for efficient
# matrix products, small enough that the skipped upper blocks add up.
_SYMMETRIC_BLOCK = 128


def symmetric_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a product known to be symmetric (such as ``x xᵀ`` or
    ``Kᵀ U K``), ``a`` of shape ``(*batch, d, k)`` and ``b`` of shape
    ``(*batch, k, d)``: only the blocks on and below the diagonal are multiplied
    (up to ~8 row blocks, so about 55–60% of the multiply-adds for large ``d``),
    the rest are mirrored. The result is exactly symmetric: the diagonal blocks'
    lower triangles are mirrored too (matrix-product kernels need not round
    ``x xᵀ`` symmetrically)."""
    d = a.shape[-2]
    blocks = max(1, min(8, d // _SYMMETRIC_BLOCK))
    step = -(-d // blocks)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = a.new_empty(*batch, d, d)
    for start in range(0, d, step):
        stop = min(d, start + step)
        rows = a[..., start:stop, :] @ b[..., :stop]  # (*batch, stop − start, stop)
        out[..., start:stop, :start] = rows[..., :start]
        out[..., :start, start:stop] = rows[..., :start].mT
        diagonal = rows[..., start:stop].tril()
        out[..., start:stop, start:stop] = diagonal.add_(diagonal.tril(-1).mT)
    return out


def dense_matmul_outer(mat: Tensor, x: Tensor) -> Tensor:
    """``M Mᵀ x`` for ``M`` of shape ``(*batch, d, d)`` and ``x`` of shape
    ``(*batch, d, n)``: through ``M Mᵀ`` (``d³ + d²n``) when ``x`` has more columns
    than rows, else as ``M (Mᵀ x)`` (``2d²n``)."""
    if x.shape[-1] > mat.shape[-1]:
        return symmetric_matmul(mat, mat.mT) @ x
    return mat @ (mat.mT @ x)
