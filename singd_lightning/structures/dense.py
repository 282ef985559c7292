"""Dense matrices: the unstructured case (INGD)."""

from __future__ import annotations

from torch import Tensor

from singd_lightning.structures._utils import dense_matmul_outer, symmetric_matmul
from singd_lightning.structures.base import Structure


class Dense(Structure):
    """All ``d²`` entries are free; storage is the row-major flattened matrix."""

    name = "dense"

    @property
    def numel(self) -> int:
        return self.dim * self.dim

    def _mat(self, data: Tensor) -> Tensor:
        return data.unflatten(-1, (self.dim, self.dim))

    def to_dense(self, data: Tensor) -> Tensor:
        return self._mat(data).clone()

    def project(self, sym: Tensor) -> Tensor:
        return sym.flatten(-2).clone()

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        mat = self._mat(data)
        return (mat.mT if transpose else mat) @ x

    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        return dense_matmul_outer(self._mat(data), x)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return (self._mat(a) @ self._mat(b)).flatten(-2)

    def project_outer(self, y: Tensor) -> Tensor:
        return symmetric_matmul(y, y.mT).flatten(-2)

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        # Kᵀ (x xᵀ) K costs d²n + 2d³, (Kᵀ x)(Kᵀ x)ᵀ costs 2d²n (each symmetric
        # product a little over half of that): pick the cheaper.
        mat = self._mat(data)
        if x.shape[-1] > 2 * self.dim:
            return symmetric_matmul(mat.mT @ symmetric_matmul(x, x.mT), mat).flatten(-2)
        return self.project_outer(mat.mT @ x)

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        if rows.n > 2 * self.dim:  # Gram first, accumulated over column blocks
            mat = self._mat(data)
            return symmetric_matmul(mat.mT @ rows.gram(), mat).flatten(-2)
        return super().project_gram_rows(data, rows)

    def gram_statistic(self, rows) -> Tensor:
        return rows.gram().flatten(-2)  # X Xᵀ

    def gram_statistic_numel(self) -> int:
        return self.numel

    def project_gram_statistic(self, data: Tensor, statistic: Tensor) -> Tensor:
        mat = self._mat(data)
        return symmetric_matmul(mat.mT @ statistic.to(mat.dtype).unflatten(-1, (self.dim, self.dim)), mat).flatten(-2)

    def project_self_gram(self, data: Tensor) -> Tensor:
        mat = self._mat(data)
        return symmetric_matmul(mat.mT, mat).flatten(-2)

    def diagonal(self, data: Tensor) -> Tensor:
        return data[..., :: self.dim + 1]

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        diag = data[..., :: self.dim + 1]
        diag.add_(alpha.unsqueeze(-1) if isinstance(alpha, Tensor) else alpha)
        return data
