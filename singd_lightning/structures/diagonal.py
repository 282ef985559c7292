"""Diagonal matrices: ``d`` stored entries."""

from __future__ import annotations

from torch import Tensor

from singd_lightning.structures.base import Structure


class Diagonal(Structure):
    """Only the main diagonal is free; storage is the diagonal itself."""

    name = "diagonal"

    @property
    def numel(self) -> int:
        return self.dim

    def to_dense(self, data: Tensor) -> Tensor:
        return data.diag_embed()

    def project(self, sym: Tensor) -> Tensor:
        return sym.diagonal(dim1=-2, dim2=-1).clone()

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        return data.unsqueeze(-1) * x

    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        return self.matmul_outer_form(self.outer_form(data), x)

    def outer_form(self, data: Tensor) -> Tensor:
        return data.square()  # the diagonal of S Sᵀ

    def matmul_outer_form(self, form: Tensor, x: Tensor) -> Tensor:
        return form.unsqueeze(-1) * x

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b

    def project_outer(self, y: Tensor) -> Tensor:
        return y.square().sum(dim=-1)

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        # Π(Sᵀ x xᵀ S) = s² ⊙ rowsum(x²): one pass over x, no scaled copy of it.
        return x.square().sum(dim=-1).mul_(data.square())

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        # Only diag(X Xᵀ) is needed: for a convolution that skips im2col entirely.
        return rows.square_sums().to(data.dtype).mul_(data.square())

    def gram_statistic(self, rows) -> Tensor:
        return rows.square_sums()  # diag(X Xᵀ)

    def gram_statistic_numel(self) -> int:
        return self.dim

    def project_gram_statistic(self, data: Tensor, statistic: Tensor) -> Tensor:
        return statistic.to(data.dtype).mul_(data.square())

    def project_self_gram(self, data: Tensor) -> Tensor:
        return data.square()

    def diagonal(self, data: Tensor) -> Tensor:
        return data

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        return data.add_(alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha)
