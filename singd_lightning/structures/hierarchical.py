"""Hierarchical matrices: dense top rows, a diagonal middle, dense bottom corner."""

from __future__ import annotations

import torch
from torch import Tensor

from singd_lightning.structures._utils import unsqueeze_alpha
from singd_lightning.structures.base import Structure


class Hierarchical(Structure):
    """Matrices of the block form (row/column blocks of sizes ``k1, m, k2``)::

        [[A, B, C],
         [0, D, 0],
         [0, E, F]]

    with ``A`` (``k1×k1``), ``B`` (``k1×m``), ``C`` (``k1×k2``), ``E`` (``k2×m``),
    ``F`` (``k2×k2``) dense and ``D`` diagonal (``m = dim − k1 − k2``). Small
    dimensions fill ``A`` first, then ``C`` and ``F``: ``dim ≤ k1`` gives a dense
    ``A`` only; ``dim ≤ k1 + k2`` gives ``k2 = dim − k1`` and ``m = 0``.

    Storage: ``A, B, C, D, E, F`` flattened row-major, in this order.

    Args:
        dim: Matrix dimension ``d``.
        k1: Size of the dense top-left block (≥ 0).
        k2: Size of the dense bottom-right block (≥ 0).
    """

    name = "hierarchical"

    def __init__(self, dim: int, k1: int = 15, k2: int = 15) -> None:
        super().__init__(dim)
        for key, value in (("k1", k1), ("k2", k2)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{key} must be a non-negative integer, got {value!r}."
                )
        self.k1, self.k2 = k1, k2
        # Effective block sizes for this dimension.
        if dim <= k1:
            self.n1, self.m, self.n2 = dim, 0, 0
        elif dim <= k1 + k2:
            self.n1, self.m, self.n2 = k1, 0, dim - k1
        else:
            self.n1, self.m, self.n2 = k1, dim - k1 - k2, k2
        n1, m, n2 = self.n1, self.m, self.n2
        self._shapes = ((n1, n1), (n1, m), (n1, n2), (m,), (n2, m), (n2, n2))
        self._sizes = [n1 * n1, n1 * m, n1 * n2, m, n2 * m, n2 * n2]

    # ------------------------------------------------------------------ layout
    @property
    def numel(self) -> int:
        return sum(self._sizes)

    def options(self) -> dict:
        return {"k1": self.k1, "k2": self.k2}

    def _parts(self, data: Tensor) -> tuple[Tensor, ...]:
        """Views ``A, B, C, D, E, F`` of the storage (``D`` is ``(*batch, m)``)."""
        chunks = data.split(self._sizes, dim=-1)
        return tuple(c.unflatten(-1, s) for c, s in zip(chunks, self._shapes))

    @staticmethod
    def _pack(*parts: Tensor) -> Tensor:
        """Inverse of :meth:`_parts`; broadcasts differing batch shapes."""
        A, B, C, D, E, F = parts
        flat = [A, B, C, D.unsqueeze(-1), E, F]
        flat = [f.flatten(-2) for f in flat]
        batch = torch.broadcast_shapes(*(f.shape[:-1] for f in flat))
        return torch.cat([f.expand(*batch, -1) for f in flat], dim=-1)

    def _rows(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``(*batch, dim, n)`` into the three row blocks."""
        return x.split([self.n1, self.m, self.n2], dim=-2)

    # --------------------------------------------------------------------- ops
    def to_dense(self, data: Tensor) -> Tensor:
        A, B, C, D, E, F = self._parts(data)
        n1, m = self.n1, self.m
        mid = n1 + m
        dense = data.new_zeros(*data.shape[:-1], self.dim, self.dim)
        dense[..., :n1, :n1] = A
        dense[..., :n1, n1:mid] = B
        dense[..., :n1, mid:] = C
        dense[..., n1:mid, n1:mid].diagonal(dim1=-2, dim2=-1).copy_(D)
        dense[..., mid:, n1:mid] = E
        dense[..., mid:, mid:] = F
        return dense

    def project(self, sym: Tensor) -> Tensor:
        n1, mid = self.n1, self.n1 + self.m
        return self._pack(
            sym[..., :n1, :n1],
            2 * sym[..., :n1, n1:mid],
            2 * sym[..., :n1, mid:],
            sym[..., n1:mid, n1:mid].diagonal(dim1=-2, dim2=-1),
            2 * sym[..., mid:, n1:mid],
            sym[..., mid:, mid:],
        )

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        A, B, C, D, E, F = self._parts(data)
        x1, x2, x3 = self._rows(x)
        D = D.unsqueeze(-1)
        if transpose:
            top = A.mT @ x1
            mid = B.mT @ x1 + D * x2 + E.mT @ x3
            bottom = C.mT @ x1 + F.mT @ x3
        else:
            top = A @ x1 + B @ x2 + C @ x3
            mid = D * x2
            bottom = E @ x2 + F @ x3
        blocks = (top, mid, bottom)
        batch = torch.broadcast_shapes(*(t.shape[:-2] for t in blocks))
        return torch.cat([t.expand(*batch, -1, -1) for t in blocks], dim=-2)

    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        """``S Sᵀ x`` in one pass over the middle rows of ``x``: ``S Sᵀ`` is an
        arrow matrix, dense in its border rows and columns with the diagonal ``D²``
        in the middle::

            [[A Aᵀ + B Bᵀ + C Cᵀ, B D, B Eᵀ + C Fᵀ],
             [D Bᵀ,               D²,  D Eᵀ       ],
             [E Bᵀ + F Cᵀ,        E D, E Eᵀ + F Fᵀ]]
        """
        return self.matmul_outer_form(self.outer_form(data), x)

    def outer_form(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``S Sᵀ``'s parts (see :meth:`matmul_outer`): ``[B D; E D]`` (``(k, m)``),
        the symmetric border block (``(k, k)``) and ``D²``."""
        A, B, C, D, E, F = self._parts(data)
        scaled = torch.cat([B * D.unsqueeze(-2), E * D.unsqueeze(-2)], dim=-2)  # [B D; E D], (k, m)
        corner = torch.cat([
            torch.cat([A @ A.mT + B @ B.mT + C @ C.mT, B @ E.mT + C @ F.mT], dim=-1),
            torch.cat([E @ B.mT + F @ C.mT, E @ E.mT + F @ F.mT], dim=-1),
        ], dim=-2)  # the border block, (k, k), symmetric
        return scaled, corner, D.square()

    def matmul_outer_form(self, form: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
        scaled, corner, d_square = form
        n1, m = self.n1, self.m
        batch = torch.broadcast_shapes(d_square.shape[:-1], x.shape[:-2])
        # Each block is written once into the result, in x's memory layout: the
        # middle rows are read elementwise, and a transposed x (a gradient's
        # transpose) would otherwise be read with large strides.
        if x.mT.is_contiguous() and not x.is_contiguous():
            xt = x.mT  # (*batch, n, d), contiguous: the same products, transposed
            xt1, xt2, xt3 = xt.split([n1, m, self.n2], dim=-1)
            border = torch.cat([xt1, xt3], dim=-1)  # (n, k)
            out = x.new_empty(*batch, x.shape[-1], self.dim)
            mid = out[..., n1 : n1 + m]
            torch.matmul(border, scaled, out=mid)
            mid.addcmul_(d_square.unsqueeze(-2), xt2)
            ends = torch.matmul(border, corner).add_(xt2 @ scaled.mT)
            out[..., :n1] = ends[..., :n1]
            out[..., n1 + m :] = ends[..., n1:]
            return out.mT
        x1, x2, x3 = self._rows(x)
        border = torch.cat([x1, x3], dim=-2)  # (k, n)
        out = x.new_empty(*batch, self.dim, x.shape[-1])
        mid = out[..., n1 : n1 + m, :]
        torch.matmul(scaled.mT, border, out=mid)
        mid.addcmul_(d_square.unsqueeze(-1), x2)
        ends = torch.matmul(corner, border).add_(scaled @ x2)
        out[..., :n1, :] = ends[..., :n1, :]
        out[..., n1 + m :, :] = ends[..., n1:, :]
        return out

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        A, B, C, D, E, F = self._parts(a)
        A2, B2, C2, D2, E2, F2 = self._parts(b)
        return self._pack(
            A @ A2,
            A @ B2 + B * D2.unsqueeze(-2) + C @ E2,
            A @ C2 + C @ F2,
            D * D2,
            E * D2.unsqueeze(-2) + F @ E2,
            F @ F2,
        )

    def project_outer(self, y: Tensor) -> Tensor:
        return self._project_outer_parts(*self._rows(y))

    def _project_outer_parts(self, y1: Tensor, y2: Tensor, y3: Tensor) -> Tensor:
        """Π(y yᵀ) from the row blocks ``y1`` (k1), ``y2`` (middle), ``y3`` (k2)."""
        return self._pack(
            y1 @ y1.mT,
            2 * (y1 @ y2.mT),
            2 * (y1 @ y3.mT),
            y2.square().sum(dim=-1),
            2 * (y3 @ y2.mT),
            y3 @ y3.mT,
        )

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        x1, x2, x3 = self._rows(x)
        border = torch.cat([x1, x3], dim=-2)  # P, (k, n)
        return self._project_gram_from(data, border @ x.mT, x2.square().sum(dim=-1))

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        px, mid_square_sums = self._gram_parts(rows)
        return self._project_gram_from(data, px.to(data.dtype), mid_square_sums.to(data.dtype))

    def _gram_parts(self, rows) -> tuple[Tensor, Tensor]:
        """``P Xᵀ`` (``k × d``, ``P`` the border rows of ``X``) and the middle rows'
        sums of squares (``m``): all :meth:`_project_gram_from` reads of ``X``."""
        mid = self.n1 + self.m
        border = torch.cat([torch.arange(self.n1), torch.arange(mid, self.dim)])
        return rows.cross(border), rows.square_sums()[..., self.n1 : mid]

    def gram_statistic(self, rows) -> Tensor:
        px, mid_square_sums = self._gram_parts(rows)  # (see _gram_parts), flat
        return torch.cat([px.flatten(-2), mid_square_sums.to(px.dtype)], dim=-1)

    def gram_statistic_numel(self) -> int:
        return (self.n1 + self.n2) * self.dim + self.m

    def project_gram_statistic(self, data: Tensor, statistic: Tensor) -> Tensor:
        k = self.n1 + self.n2
        statistic = statistic.to(data.dtype)
        px = statistic[..., : k * self.dim].unflatten(-1, (k, self.dim))
        return self._project_gram_from(data, px, statistic[..., k * self.dim :])

    def _project_gram_from(self, data: Tensor, px: Tensor, mid_square_sums: Tensor) -> Tensor:
        """Π(Sᵀ x xᵀ S) from two small statistics of ``x``, never forming ``Sᵀ x``.

        With ``P = [x1; x3]`` the border rows of ``x`` (``k = n1 + n2`` of them) and
        ``Kb = [[A, B, C], [0, E, F]]`` the border rows of ``S``, ``Sᵀ x`` is
        ``Kbᵀ P`` plus ``D x2`` in the middle rows. Every entry of the projection
        then follows from ``px = P xᵀ`` (``k × d``, one product over the ``n``
        columns) and the middle rows' sums of squares ``(m,)``; the rest is
        ``O(k² d)``.
        """
        A, B, C, D, E, F = self._parts(data)
        n1, m = self.n1, self.m
        gram = torch.cat([px[..., :n1], px[..., n1 + m :]], dim=-1)  # P Pᵀ, (k, k)
        cross = px[..., n1 : n1 + m]  # P x2ᵀ, (k, m)
        top = torch.cat([A, B, C], dim=-1)
        bottom = torch.cat([E.new_zeros(*E.shape[:-1], n1), E, F], dim=-1)
        kb = torch.cat([top, bottom], dim=-2)  # Kb, (k, d)
        kb_border = torch.cat([kb[..., :n1], kb[..., n1 + m :]], dim=-1)  # (k, k)
        kb_mid = kb[..., n1 : n1 + m]  # (k, m)
        # P yᵀ for y = Sᵀ x: P Pᵀ Kb plus P x2ᵀ D in the middle columns.
        p_y = gram @ kb
        diag_mid = (kb_mid * p_y[..., n1 : n1 + m]).sum(dim=-2)
        diag_mid = diag_mid + 2 * D * (kb_mid * cross).sum(dim=-2)
        diag_mid = diag_mid + D.square() * mid_square_sums
        p_y = torch.cat([p_y[..., :n1], p_y[..., n1 : n1 + m] + cross * D.unsqueeze(-2), p_y[..., n1 + m :]], dim=-1)
        # Border rows of y yᵀ: (Kb's border columns)ᵀ P yᵀ, (k, d).
        rows = kb_border.mT @ p_y
        r1, r3 = rows[..., :n1, :], rows[..., n1:, :]
        return self._pack(
            r1[..., :n1],
            2 * r1[..., n1 : n1 + m],
            2 * r1[..., n1 + m :],
            diag_mid,
            2 * r3[..., n1 : n1 + m],
            r3[..., n1 + m :],
        )

    def project_self_gram(self, data: Tensor) -> Tensor:
        # Columns of S are [A; 0; 0], [B; D; E], [C; 0; F]; Sᵀ S block-wise.
        A, B, C, D, E, F = self._parts(data)
        return self._pack(
            A.mT @ A,
            2 * (A.mT @ B),
            2 * (A.mT @ C),
            B.square().sum(dim=-2) + D.square() + E.square().sum(dim=-2),
            2 * (C.mT @ B + F.mT @ E),
            C.mT @ C + F.mT @ F,
        )

    def diagonal(self, data: Tensor) -> Tensor:
        A, _, _, D, _, F = self._parts(data)
        return torch.cat(
            [A.diagonal(dim1=-2, dim2=-1), D, F.diagonal(dim1=-2, dim2=-1)], dim=-1
        )

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        A, _, _, D, _, F = self._parts(data)
        # The parts are views of ``data``, so these writes land in the storage.
        scale = unsqueeze_alpha(alpha, 1)
        A.diagonal(dim1=-2, dim2=-1).add_(scale)
        D.add_(scale)
        F.diagonal(dim1=-2, dim2=-1).add_(scale)
        return data
