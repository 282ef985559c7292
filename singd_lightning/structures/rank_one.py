"""Rank-one triangular matrices: a diagonal plus one dense first/last row or column.

The four kinds (lower/upper triangular × where the diagonal block sits)::

    tril_bottom_right_diagonal  [[a, 0 ], [b, D]]   first column dense
    tril_top_left_diagonal      [[D, 0 ], [bᵀ, c]]  last row dense
    triu_top_left_diagonal      [[D, b ], [0, c]]   last column dense
    triu_bottom_right_diagonal  [[a, bᵀ], [0, D]]   first row dense

One implementation covers all four: the matrix is ``diag(δ)`` plus an off-diagonal
vector ``v`` (length ``d − 1``) placed in row or column ``p`` (``p`` = 0 or d − 1),
at every position except ``p`` itself. Storage: ``[δ (d entries), v (d − 1)]``.
Every operation is ``O(d·n)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd_lightning.structures._utils import unsqueeze_alpha
from singd_lightning.structures.base import Structure


class _RankOneTriangular(Structure):
    """Diagonal plus one dense row (``in_row``) or column at index ``p``.

    Subclasses set ``in_row`` (the off-diagonal vector is a row rather than a
    column) and ``first`` (it sits in the first rather than the last row/column).
    """

    in_row: bool
    first: bool

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.p = 0 if self.first else dim - 1
        # The positions other than p along the dense line, as a slice (a view).
        self._rest = slice(1, None) if self.first else slice(0, dim - 1)

    @property
    def numel(self) -> int:
        return 2 * self.dim - 1

    def _split(self, data: Tensor) -> tuple[Tensor, Tensor]:
        """Views ``δ`` ``(*batch, d)`` and ``v`` ``(*batch, d − 1)``."""
        return data[..., : self.dim], data[..., self.dim :]

    @staticmethod
    def _pack(diag: Tensor, off: Tensor) -> Tensor:
        batch = torch.broadcast_shapes(diag.shape[:-1], off.shape[:-1])
        return torch.cat([diag.expand(*batch, -1), off.expand(*batch, -1)], dim=-1)

    def to_dense(self, data: Tensor) -> Tensor:
        diag, off = self._split(data)
        dense = diag.diag_embed()
        if self.in_row:
            dense[..., self.p, self._rest] = off
        else:
            dense[..., self._rest, self.p] = off
        return dense

    def project(self, sym: Tensor) -> Tensor:
        p, rest = self.p, self._rest
        # Sum of both mirrored entries (2·S_ip for a symmetric S).
        off = sym[..., rest, p] + sym[..., p, rest]
        return self._pack(sym.diagonal(dim1=-2, dim2=-1), off)

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        diag, off = self._split(data)
        p, rest = self.p, self._rest
        out = diag.unsqueeze(-1) * x
        if transpose != self.in_row:
            # The off-diagonal vector sits in row p: out[p] += v · x[rest].
            out[..., p, :] += (off.unsqueeze(-1) * x[..., rest, :]).sum(dim=-2)
        else:
            # It sits in column p: out[rest] += v ⊗ x[p].
            out[..., rest, :] += off.unsqueeze(-1) * x[..., p : p + 1, :]
        return out

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        diag_a, off_a = self._split(a)
        diag_b, off_b = self._split(b)
        p, rest = self.p, self._rest
        if self.in_row:  # (D + e_p vᵀ)(D' + e_p v'ᵀ) = DD' + e_p (δ_p v' + D' v)ᵀ
            off = diag_a[..., p : p + 1] * off_b + diag_b[..., rest] * off_a
        else:  # (D + v e_pᵀ)(D' + v' e_pᵀ) = DD' + (D v' + δ'_p v) e_pᵀ
            off = diag_a[..., rest] * off_b + diag_b[..., p : p + 1] * off_a
        return self._pack(diag_a * diag_b, off)

    def project_outer(self, y: Tensor) -> Tensor:
        p, rest = self.p, self._rest
        off = 2 * (y[..., rest, :] * y[..., p : p + 1, :]).sum(dim=-1)
        return self._pack(y.square().sum(dim=-1), off)

    def project_self_gram(self, data: Tensor) -> Tensor:
        diag, off = self._split(data)
        p, rest = self.p, self._rest
        new_diag = diag.square()
        if self.in_row:
            # SᵀS = D² + D e_p vᵀ + v e_pᵀ D + v vᵀ; Π keeps diag(v vᵀ) = v² (v is
            # zero at p, so v vᵀ has nothing else on the structure's pattern).
            new_diag[..., rest] += off.square()
            new_off = 2 * diag[..., p : p + 1] * off
        else:
            # SᵀS = D² + D v e_pᵀ + e_p vᵀ D + e_p |v|² e_pᵀ.
            new_diag[..., p] += off.square().sum(dim=-1)
            new_off = 2 * diag[..., rest] * off
        return self._pack(new_diag, new_off)

    def diagonal(self, data: Tensor) -> Tensor:
        return data[..., : self.dim]

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        data[..., : self.dim] += unsqueeze_alpha(alpha, 1)
        return data


class TrilBottomRightDiagonal(_RankOneTriangular):
    """``[[a, 0], [b, D]]``: lower triangular, first column dense."""

    name = "tril_bottom_right_diagonal"
    in_row, first = False, True


class TrilTopLeftDiagonal(_RankOneTriangular):
    """``[[D, 0], [bᵀ, c]]``: lower triangular, last row dense."""

    name = "tril_top_left_diagonal"
    in_row, first = True, False


class TriuTopLeftDiagonal(_RankOneTriangular):
    """``[[D, b], [0, c]]``: upper triangular, last column dense."""

    name = "triu_top_left_diagonal"
    in_row, first = False, False


class TriuBottomRightDiagonal(_RankOneTriangular):
    """``[[a, bᵀ], [0, D]]``: upper triangular, first row dense."""

    name = "triu_bottom_right_diagonal"
    in_row, first = True, True
