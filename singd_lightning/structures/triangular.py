"""Lower- and upper-triangular matrices in packed storage."""

from __future__ import annotations

import torch
from torch import Tensor

from singd_lightning.structures._utils import symmetric_matmul, unsqueeze_alpha
from singd_lightning.structures.base import Structure


class _Triangular(Structure):
    """Shared implementation of :class:`Tril` and :class:`Triu`.

    Storage: the ``d(d+1)/2`` entries of the triangle, row by row. The storage is
    already ``O(d²)``, so the products go through one dense temporary per operand.
    """

    lower: bool

    @property
    def numel(self) -> int:
        return self.dim * (self.dim + 1) // 2

    def _indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row and column index of every stored entry, each ``(numel,)``."""
        fn = torch.tril_indices if self.lower else torch.triu_indices
        rows, cols = fn(self.dim, self.dim, device=device)
        return rows, cols

    def _gather(self, mat: Tensor) -> Tensor:
        """Storage of the triangle of ``mat`` (``(*batch, dim, dim)``)."""
        rows, cols = self._indices(mat.device)
        return mat[..., rows, cols]

    def _diag_positions(self, device: torch.device) -> Tensor:
        """Storage positions of the main diagonal, ``(dim,)``."""
        i = torch.arange(self.dim, device=device)
        if self.lower:
            # Row i starts at i(i+1)/2 and its diagonal entry is its last one.
            return i * (i + 3) // 2
        # Row i starts at i·d − i(i−1)/2 and its diagonal entry is its first one.
        return i * self.dim - i * (i - 1) // 2

    def to_dense(self, data: Tensor) -> Tensor:
        rows, cols = self._indices(data.device)
        dense = data.new_zeros(*data.shape[:-1], self.dim, self.dim)
        dense[..., rows, cols] = data
        return dense

    def project(self, sym: Tensor) -> Tensor:
        rows, cols = self._indices(sym.device)
        # Off-diagonal entries: the sum of the two mirrored entries (2·S_ij for a
        # symmetric S); diagonal entries kept.
        out = sym[..., rows, cols] + sym[..., cols, rows]
        out[..., self._diag_positions(sym.device)] *= 0.5
        return out

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        mat = self.to_dense(data)
        return (mat.mT if transpose else mat) @ x

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return self._gather(self.to_dense(a) @ self.to_dense(b))

    def _project_sym(self, sym: Tensor) -> Tensor:
        """Π of an exactly symmetric ``sym``: its triangle, off-diagonals doubled."""
        out = self._gather(sym).mul_(2)
        out[..., self._diag_positions(sym.device)] *= 0.5
        return out

    def project_outer(self, y: Tensor) -> Tensor:
        return self._project_sym(symmetric_matmul(y, y.mT))

    def project_self_gram(self, data: Tensor) -> Tensor:
        mat = self.to_dense(data)
        return self._project_sym(symmetric_matmul(mat.mT, mat))

    def diagonal(self, data: Tensor) -> Tensor:
        return data[..., self._diag_positions(data.device)]

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        data[..., self._diag_positions(data.device)] += unsqueeze_alpha(alpha, 1)
        return data


class Tril(_Triangular):
    """Lower-triangular matrices; Π keeps the lower triangle, off-diagonals doubled."""

    name = "tril"
    lower = True


class Triu(_Triangular):
    """Upper-triangular matrices; Π keeps the upper triangle, off-diagonals doubled."""

    name = "triu"
    lower = False
