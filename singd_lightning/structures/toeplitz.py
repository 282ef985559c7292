"""Triangular Toeplitz matrices: ``d`` stored entries, FFT-based products.

A lower-triangular Toeplitz matrix ``L`` has ``L[i, j] = t[i − j]`` for ``i ≥ j``;
the upper one is ``U = Lᵀ`` for the same ``t``. Products with ``L`` are truncated
causal convolutions, so every operation here runs in ``O(d log d)`` per column
through real FFTs of length ``≥ 2d − 1`` (no circular wrap-around), and nothing of
size ``d × d`` is ever formed except where the input already is (:meth:`project`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fft import irfft, rfft

from singd_lightning.structures._utils import compute_dtype
from singd_lightning.structures.base import Structure


def _fft_len(dim: int) -> int:
    """Smallest 5-smooth length (2^a·3^b·5^c, fast for FFTs) ``≥ 2·dim − 1``: long
    enough that linear convolutions and correlations of length-``dim`` signals do
    not wrap around, and up to ~40% shorter than the next power of two."""
    target = max(1, 2 * dim - 1)
    best = 1 << (target - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            n = power35
            while n < target:
                n *= 2
            best = min(best, n)
            power35 *= 3
        power5 *= 5
    return best


class _TriangularToeplitz(Structure):
    """Shared implementation; subclasses set ``lower``."""

    lower: bool

    @property
    def numel(self) -> int:
        return self.dim

    def to_dense(self, data: Tensor) -> Tensor:
        i = torch.arange(self.dim, device=data.device)
        diff = i.unsqueeze(-1) - i  # diff[i, j] = i − j
        if not self.lower:
            diff = diff.T
        dense = data[..., diff.clamp(min=0)]
        return dense.masked_fill_(diff < 0, 0)

    def project(self, sym: Tensor) -> Tensor:
        d = self.dim
        # Skew trick: pad each row of the column-flipped matrix with d zeros and
        # re-read the flat buffer with row length 2d − 1; then row i is shifted
        # right by i, and column c holds the diagonal with offset j − i = d − 1 − c.
        skew = torch.nn.functional.pad(sym.flip(-1), (0, d))
        skew = skew.flatten(-2)[..., : d * (2 * d - 1)].unflatten(-1, (d, 2 * d - 1))
        sums = skew.sum(dim=-2)  # (*batch, 2d − 1), offsets d − 1, …, −(d − 1)
        upper, lower = sums[..., :d].flip(-1), sums[..., d - 1 :]
        # Off-diagonals: the two mirrored diagonals' sums (twice the mean for a
        # symmetric matrix) over their length; the main diagonal counted once.
        lengths = torch.arange(d, 0, -1, device=sym.device, dtype=sym.dtype)
        out = (upper + lower) / lengths
        out[..., 0] *= 0.5
        return out

    # The products below use: L @ x = causal convolution of t with x (along rows);
    # Lᵀ @ x = correlation, i.e. the same with the conjugate spectrum of t.
    def _apply_to_rows(self, data: Tensor, rows: Tensor, transpose: bool) -> Tensor:
        """``(S @ rowsᵀ)ᵀ`` for ``rows`` of shape ``(*batch, n, d)``: the FFTs run
        along the contiguous last dimension (much faster than along the rows)."""
        n_fft = _fft_len(self.dim)
        spec_t = rfft(data, n=n_fft, dim=-1).unsqueeze(-2)
        if transpose == self.lower:  # Lᵀ @ x, or U @ x = Lᵀ @ x
            spec_t = spec_t.conj()
        return irfft(rfft(rows, n=n_fft, dim=-1) * spec_t, n=n_fft, dim=-1)[..., : self.dim]

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        out_dtype = torch.promote_types(data.dtype, x.dtype)
        dtype = compute_dtype(out_dtype)
        out = self._apply_to_rows(data.to(dtype), x.to(dtype).mT, transpose).mT
        return out.to(out_dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        # L_a L_b is lower Toeplitz with the truncated convolution a * b; U_a U_b =
        # (L_b L_a)ᵀ and convolution commutes, so the same formula holds.
        d, n_fft = self.dim, _fft_len(self.dim)
        dtype = compute_dtype(a.dtype)
        prod = rfft(a.to(dtype), n=n_fft) * rfft(b.to(dtype), n=n_fft)
        return irfft(prod, n=n_fft)[..., :d].to(a.dtype)

    def _normalize(self, diag_sums: Tensor) -> Tensor:
        """Turn the sums of a symmetric matrix's lower diagonals ``k = 0..d−1`` into
        Π's storage: ``sum_k / (d − k)``, doubled for ``k > 0``."""
        d = self.dim
        denom = torch.arange(d, 0, -1, device=diag_sums.device, dtype=diag_sums.dtype)
        out = diag_sums.mul(2).div_(denom)
        out[..., 0] *= 0.5
        return out

    def project_outer(self, y: Tensor) -> Tensor:
        return self._project_outer_rows(y.to(compute_dtype(y.dtype)).mT).to(y.dtype)

    def _project_outer_rows(self, rows: Tensor) -> Tensor:
        # Sum of the k-th lower diagonal of y yᵀ = Σ_cols Σ_i y[i+k] y[i]: the
        # autocorrelation of each column at lag k, summed over columns — one power
        # spectrum summed over columns, then a single inverse FFT.
        d, n_fft = self.dim, _fft_len(self.dim)
        spec = rfft(rows, n=n_fft, dim=-1)
        power = (spec.real.square() + spec.imag.square()).sum(dim=-2)
        return self._normalize(irfft(power, n=n_fft)[..., :d])

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        # Sᵀ x and its autocorrelation with x laid out as rows (n, d): every FFT
        # runs along the contiguous dimension.
        out_dtype = torch.promote_types(data.dtype, x.dtype)
        dtype = compute_dtype(out_dtype)
        rows = self._apply_to_rows(data.to(dtype), x.to(dtype).mT.contiguous(), transpose=True)
        return self._project_outer_rows(rows).to(out_dtype)

    def project_self_gram(self, data: Tensor) -> Tensor:
        # Both LᵀL and LLᵀ have k-th lower-diagonal sum Σ_{u ≥ k} (d − u) t[u] t[u − k]
        # (count the pairs of entries of L that meet in that diagonal): the
        # correlation of w = (d − u) t[u] with t at lag k.
        d, n_fft = self.dim, _fft_len(self.dim)
        t = data.to(compute_dtype(data.dtype))
        weight = torch.arange(d, 0, -1, device=t.device, dtype=t.dtype)
        corr = rfft(weight * t, n=n_fft) * rfft(t, n=n_fft).conj()
        sums = irfft(corr, n=n_fft)[..., :d]
        return self._normalize(sums).to(data.dtype)

    def diagonal(self, data: Tensor) -> Tensor:
        return data[..., :1].expand(*data.shape[:-1], self.dim).clone()

    def average_trace(self, data: Tensor) -> Tensor:
        return data[..., 0].clone()

    def add_identity_(self, data: Tensor, alpha: float | Tensor) -> Tensor:
        data[..., 0] += alpha
        return data


class TrilToeplitz(_TriangularToeplitz):
    """Lower-triangular Toeplitz matrices: ``S[i, j] = t[i − j]`` for ``i ≥ j``."""

    name = "tril_toeplitz"
    lower = True


class TriuToeplitz(_TriangularToeplitz):
    """Upper-triangular Toeplitz matrices: ``S[i, j] = t[j − i]`` for ``j ≥ i``."""

    name = "triu_toeplitz"
    lower = False
