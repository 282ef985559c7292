"""Block-diagonal matrices: full ``b × b`` blocks plus one smaller remainder block."""

from __future__ import annotations

import torch
from torch import Tensor

from singd_lightning.structures._utils import unsqueeze_alpha
from singd_lightning.structures.base import Structure


class BlockDiagonal(Structure):
    """``dim // b`` dense ``b × b`` diagonal blocks, then one ``r × r`` block with
    ``r = dim % b`` (possibly empty).

    Storage: the full blocks' entries (row-major, block after block), then the
    remainder block's entries (row-major); ``numel = (dim // b)·b² + r²``. Every
    operation runs as one batched product over the full blocks plus one product
    for the remainder, never on a dense ``dim × dim`` matrix.

    Args:
        dim: Matrix dimension ``d``.
        block_size: Size ``b`` of the full blocks (≥ 1).
    """

    name = "block_diagonal"

    def __init__(self, dim: int, block_size: int = 30) -> None:
        super().__init__(dim)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(
                f"block_size must be a positive integer, got {block_size!r}."
            )
        self.block_size = block_size
        self.num_blocks, self.last_size = divmod(dim, block_size)
        # Number of stored entries of (and rows covered by) the full blocks.
        self._split_numel = self.num_blocks * block_size**2
        self._split_rows = self.num_blocks * block_size

    # ------------------------------------------------------------------ layout
    @property
    def numel(self) -> int:
        return self._split_numel + self.last_size**2

    def options(self) -> dict:
        return {"block_size": self.block_size}

    def _blocks(self, data: Tensor) -> tuple[Tensor, Tensor]:
        """Views ``(*batch, N, b, b)`` of the full blocks and ``(*batch, r, r)`` of
        the remainder block."""
        b, r = self.block_size, self.last_size
        blocks = data[..., : self._split_numel].unflatten(-1, (self.num_blocks, b, b))
        last = data[..., self._split_numel :].unflatten(-1, (r, r))
        return blocks, last

    @staticmethod
    def _pack(blocks: Tensor, last: Tensor) -> Tensor:
        """Inverse of :meth:`_blocks`: flat storage ``(*batch, numel)``."""
        head, tail = blocks.flatten(-3), last.flatten(-2)
        # torch.cat does not broadcast; operands may carry different batch shapes.
        batch = torch.broadcast_shapes(head.shape[:-1], tail.shape[:-1])
        return torch.cat([head.expand(*batch, -1), tail.expand(*batch, -1)], dim=-1)

    def _split_rows_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Split ``(*batch, dim, n)`` rows into ``(*batch, N, b, n)`` and
        ``(*batch, r, n)``."""
        head = x[..., : self._split_rows, :].unflatten(
            -2, (self.num_blocks, self.block_size)
        )
        return head, x[..., self._split_rows :, :]

    # --------------------------------------------------------------------- ops
    def to_dense(self, data: Tensor) -> Tensor:
        blocks, last = self._blocks(data)
        dense = data.new_zeros(*data.shape[:-1], self.dim, self.dim)
        n, b, s = self.num_blocks, self.block_size, self._split_rows
        # View the top-left N·b × N·b part as (N, b, N, b); its (i, :, i, :) slices
        # are the diagonal blocks.
        head = dense[..., :s, :s].unflatten(-1, (n, b)).unflatten(-3, (n, b))
        head.diagonal(dim1=-4, dim2=-2).copy_(blocks.movedim(-3, -1))
        dense[..., s:, s:] = last
        return dense

    def project(self, sym: Tensor) -> Tensor:
        n, b, s = self.num_blocks, self.block_size, self._split_rows
        head = sym[..., :s, :s].unflatten(-1, (n, b)).unflatten(-3, (n, b))
        blocks = head.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        return self._pack(blocks, sym[..., s:, s:])

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        blocks, last = self._blocks(data)
        if transpose:
            blocks, last = blocks.mT, last.mT
        x_head, x_last = self._split_rows_of(x)
        out_head = (blocks @ x_head).flatten(-3, -2)
        out_last = last @ x_last
        batch = torch.broadcast_shapes(out_head.shape[:-2], out_last.shape[:-2])
        return torch.cat(
            [out_head.expand(*batch, -1, -1), out_last.expand(*batch, -1, -1)], dim=-2
        )

    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        return self.matmul_outer_form(self.outer_form(data), x)

    def outer_form(self, data: Tensor) -> Tensor:
        # S Sᵀ is block-diagonal too: its storage (b³ per block).
        blocks, last = self._blocks(data)
        return self._pack(blocks @ blocks.mT, last @ last.mT)

    def matmul_outer_form(self, form: Tensor, x: Tensor) -> Tensor:
        return self.matmul(form, x)  # one pass over x

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        blocks_a, last_a = self._blocks(a)
        blocks_b, last_b = self._blocks(b)
        return self._pack(blocks_a @ blocks_b, last_a @ last_b)

    def project_outer(self, y: Tensor) -> Tensor:
        y_head, y_last = self._split_rows_of(y)
        return self._pack(y_head @ y_head.mT, y_last @ y_last.mT)

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        # Block by block, Bᵀ (x_b x_bᵀ) B: one pass over x and no Sᵀ x the size of x
        # when x has more columns than twice the block size (else Sᵀ x first).
        blocks, last = self._blocks(data)
        x_head, x_last = self._split_rows_of(x)
        if x.shape[-1] > 2 * self.block_size:
            return self._pack(
                blocks.mT @ (x_head @ x_head.mT) @ blocks, last.mT @ (x_last @ x_last.mT) @ last
            )
        y_head, y_last = blocks.mT @ x_head, last.mT @ x_last
        return self._pack(y_head @ y_head.mT, y_last @ y_last.mT)

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        if rows.n > 2 * self.block_size:  # block Grams first, over column blocks
            blocks, last = self._blocks(data)
            gram_blocks, gram_last = self._blocks(rows.reduce(self.project_outer))
            return self._pack(blocks.mT @ gram_blocks @ blocks, last.mT @ gram_last @ last)
        return super().project_gram_rows(data, rows)

    def gram_statistic(self, rows) -> Tensor:
        # X Xᵀ's blocks, over column chunks at least as large as the result
        return rows.reduce(self.project_outer, max(rows.chunk_bytes, self.numel * rows.dtype.itemsize))

    def gram_statistic_numel(self) -> int:
        return self.numel

    def project_gram_statistic(self, data: Tensor, statistic: Tensor) -> Tensor:
        blocks, last = self._blocks(data)
        gram_blocks, gram_last = self._blocks(statistic.to(data.dtype))
        return self._pack(blocks.mT @ gram_blocks @ blocks, last.mT @ gram_last @ last)

    def project_self_gram(self, data: Tensor) -> Tensor:
        blocks, last = self._blocks(data)
        return self._pack(blocks.mT @ blocks, last.mT @ last)

    def diagonal(self, data: Tensor) -> Tensor:
        blocks, last = self._blocks(data)
        return self._pack_diag(blocks, last)

    @staticmethod
    def _pack_diag(blocks: Tensor, last: Tensor) -> Tensor:
        head = blocks.diagonal(dim1=-2, dim2=-1).flatten(-2)
        return torch.cat([head, last.diagonal(dim1=-2, dim2=-1)], dim=-1)

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        blocks, last = self._blocks(data)
        # ``_blocks`` returns views, so adding to their diagonals writes into data.
        blocks.diagonal(dim1=-2, dim2=-1).add_(unsqueeze_alpha(alpha, 2))
        last.diagonal(dim1=-2, dim2=-1).add_(unsqueeze_alpha(alpha, 1))
        return data
