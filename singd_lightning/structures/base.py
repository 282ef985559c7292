"""The interface of a structured matrix layout.

A :class:`Structure` describes a subspace of ``dim × dim`` matrices that is closed
under products (a matrix group near the identity), stored by its free entries only.
It holds no values: the values live in a flat *storage* tensor of shape
``(*batch, numel)`` that the structure's methods read and write. Keeping the values
in plain tensors makes optimizer state, checkpoints and collective communication
trivial (they are just tensors), and the optional leading ``batch`` dimensions let
several same-shaped layers share one batched operation.

Shapes used throughout:
    * ``data``: storage, ``(*batch, numel)``.
    * ``x``: dense matrix that a structured matrix acts on, ``(*batch, dim, n)``.
    * ``sym``: dense symmetric matrix, ``(*batch, dim, dim)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor


class Structure(ABC):
    """A structured subspace of ``dim × dim`` matrices, closed under products.

    Subclasses implement the operations that depend on the sparsity pattern; the
    linear ones (add, scale, max-abs entry) act on the storage directly because
    every stored value is an entry of the matrix.

    Args:
        dim: Matrix dimension ``d`` (≥ 1).
    """

    name: ClassVar[str]

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}.")
        self.dim = dim

    # ------------------------------------------------------------------ layout
    @property
    @abstractmethod
    def numel(self) -> int:
        """Number of stored entries."""

    def options(self) -> dict:
        """Structure options besides ``dim`` (e.g. the block size)."""
        return {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}(dim={self.dim}{opts})"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.dim == other.dim  # type: ignore[attr-defined]
            and self.options() == other.options()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self), self.dim, tuple(sorted(self.options().items()))))

    # ------------------------------------------------------------ constructors
    def zeros(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Storage of the zero matrix, shape ``(*batch, numel)``."""
        return torch.zeros(*batch, self.numel, dtype=dtype, device=device)

    def identity(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Storage of the identity matrix, shape ``(*batch, numel)``."""
        data = self.zeros(*batch, dtype=dtype, device=device)
        self.add_identity_(data, 1.0)
        return data

    # ------------------------------------------------- structure-specific ops
    @abstractmethod
    def to_dense(self, data: Tensor) -> Tensor:
        """The represented matrix, ``(*batch, dim, dim)`` (for tests and debugging)."""

    @abstractmethod
    def project(self, sym: Tensor) -> Tensor:
        """Π(sym): the storage of the projection of a dense symmetric matrix."""

    @abstractmethod
    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        """``S @ x`` (or ``Sᵀ @ x`` with ``transpose``) for dense ``x`` of shape
        ``(*batch, dim, n)``; returns ``(*batch, dim, n)``."""

    @abstractmethod
    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        """Storage of the product ``A @ B`` of two matrices of this structure."""

    @abstractmethod
    def project_outer(self, y: Tensor) -> Tensor:
        """Π(y yᵀ) for dense ``y`` of shape ``(*batch, dim, n)``, never forming
        ``y yᵀ`` where the structure is sparse."""

    @abstractmethod
    def project_self_gram(self, data: Tensor) -> Tensor:
        """Π(Sᵀ S) without a dense intermediate where the structure is sparse."""

    @abstractmethod
    def diagonal(self, data: Tensor) -> Tensor:
        """The main diagonal of the matrix, ``(*batch, dim)``."""

    @abstractmethod
    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        """In place: ``S ← S + alpha · I``. ``alpha`` may be a ``(*batch,)`` tensor."""

    # ----------------------------------------------------------- derived ops
    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        """``S Sᵀ x`` for dense ``x`` of shape ``(*batch, dim, n)`` (the factor's
        share of a preconditioned gradient)."""
        return self.matmul(data, self.matmul(data, x, transpose=True))

    def outer_form(self, data: Tensor) -> Tensor | tuple[Tensor, ...]:
        """What :meth:`matmul_outer_form` needs of ``S`` to compute ``S Sᵀ x``:
        worth keeping while ``S`` does not change (steps that only precondition).
        By default the storage itself; structures whose :meth:`matmul_outer` first
        builds parts of ``S Sᵀ`` from the storage return those parts (about the
        storage's size). ``matmul_outer_form(outer_form(data), x)`` equals
        ``matmul_outer(data, x)`` bit for bit."""
        return data

    def matmul_outer_form(self, form: Tensor | tuple[Tensor, ...], x: Tensor) -> Tensor:
        """``S Sᵀ x`` from ``form = outer_form(data)`` (see :meth:`outer_form`)."""
        return self.matmul_outer(form, x)

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        """Π(Sᵀ x xᵀ S) for dense ``x`` of shape ``(*batch, dim, n)``."""
        return self.project_outer(self.matmul(data, x, transpose=True))

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        """Π(Sᵀ X Xᵀ S) for a lazily built ``X`` of shape ``(dim, n)``, such as
        :class:`~singd_lightning.optim.curvature.Rows`: an object with ``n``,
        ``dtype``, ``chunk_bytes``, ``reduce(statistic, max_bytes, row_major)``
        (the sum of ``statistic`` over blocks of ``X``'s columns, built one at a time),
        ``gram()`` (``X Xᵀ``), ``cross(index)`` (``X[index] Xᵀ``), ``square_sums()``
        (the row sums of squares) and ``matrix()`` (all of ``X``). Structures that
        need less than ``X`` itself read less."""
        # Chunks at least as large as the result, so that writing each chunk's
        # statistic costs no more than reading the chunk.
        max_bytes = max(rows.chunk_bytes, self.numel * rows.dtype.itemsize)
        return rows.reduce(lambda x: self.project_gram(data, x), max_bytes)

    def gram_statistic(self, rows) -> Tensor | None:
        """A flat statistic of ``X`` (:class:`Rows`, as for :meth:`project_gram_rows`),
        linear in ``X Xᵀ`` and independent of any factor, from which
        :meth:`project_gram_statistic` gives ``Π(Sᵀ X Xᵀ S)`` for any ``S``: sums
        of it over passes and ranks project as the sum of the projections, so
        the projection can wait for the factor update and run there for a batch
        of layers at once. None (the default) where the structure has no such
        statistic smaller than its route through ``S`` (Toeplitz, triangular)."""
        return None

    def gram_statistic_numel(self) -> int | None:
        """The size of :meth:`gram_statistic`, or None where there is none."""
        return None

    def project_gram_statistic(self, data: Tensor, statistic: Tensor) -> Tensor:
        """``Π(Sᵀ X Xᵀ S)`` from ``statistic = gram_statistic(X)`` (both may have
        the same leading batch dimensions)."""
        raise NotImplementedError(f"{type(self).__name__} has no gram statistic.")

    def average_trace(self, data: Tensor) -> Tensor:
        """``trace(S) / dim``, shape ``(*batch,)``."""
        return self.diagonal(data).mean(dim=-1)

    @staticmethod
    def max_abs(data: Tensor) -> Tensor:
        """Largest absolute entry, shape ``(*batch,)``."""
        return data.abs().amax(dim=-1)

    def spectral_norm_bound(self, data: Tensor) -> Tensor:
        """``sqrt(‖S‖₁ ‖S‖_∞) ≥ ‖S‖₂``, a guaranteed upper bound of the largest
        singular value, shape ``(*batch,)``, in float32 or better: the largest
        column and row sums of ``|S|``, from two structured products of ``|S|``
        with a vector of ones (every stored value is an entry of the matrix, so
        ``|storage|`` stores ``|S|``). Non-finite entries give NaN or inf."""
        work = data.abs().to(torch.promote_types(data.dtype, torch.float32))
        ones = torch.ones(*work.shape[:-1], self.dim, 1, dtype=work.dtype, device=work.device)
        rows = self.matmul(work, ones).amax(dim=(-2, -1))
        columns = self.matmul(work, ones, transpose=True).amax(dim=(-2, -1))
        return (rows * columns).sqrt()

    def spectral_norm(self, data: Tensor, iterations: int = 8) -> Tensor:
        """``‖S‖₂``, the largest singular value, estimated by ``iterations`` power
        iterations on ``Sᵀ S``; shape ``(*batch,)``, in float32 or better.

        Only structured products with one vector: ``O(numel)`` work per iteration
        for the sparse structures. The estimate approaches ``‖S‖₂`` from below
        (it is at least the largest entry), fast when one direction dominates
        ``S``, as a loss spike makes it, and exactly for diagonal ``S``.
        The start vector is fixed, so every rank computes the same value.
        Non-finite entries give NaN."""
        work = data.to(torch.promote_types(data.dtype, torch.float32))
        # Scale-free (no overflow of Sᵀ S x for entries near the dtype's limit).
        scale = work.abs().amax(dim=-1)
        work = work / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        index = torch.arange(self.dim, dtype=work.dtype, device=work.device)
        x = (1.5 + torch.cos(2.399963 * index)).expand(*work.shape[:-1], self.dim).unsqueeze(-1)
        for _ in range(iterations):
            x = self.matmul(work, self.matmul(work, x), transpose=True)
            norm = x.norm(dim=(-2, -1), keepdim=True)
            x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        estimate = self.matmul(work, x).norm(dim=(-2, -1)) * scale
        # The largest entry is a lower bound too (|S_ij| ≤ ‖S‖₂): exact for diagonal S.
        return torch.maximum(estimate, scale)
