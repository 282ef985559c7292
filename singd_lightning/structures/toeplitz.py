"""Triangular Toeplitz matrices: ``d`` stored entries, FFT-based products.

A lower-triangular Toeplitz matrix ``L`` has ``L[i, j] = t[i − j]`` for ``i ≥ j``;
the upper one is ``U = Lᵀ`` for the same ``t``. Products with ``L`` are truncated
causal convolutions, so every operation here runs in ``O(d log d)`` per column
through real FFTs of length ``≥ 2d − 1`` (no circular wrap-around). Where a dense
product is cheaper (small ``d``, or a statistic over many more columns than ``d``),
a rough cost model picks it instead: FFTs beat matrix products only for long rows.

Precision: the FFTs run in float64 whatever the input dtype. A transform's rounding
error is about eps·log N times the *norms* of its signals, the same for every output
entry, so in float32 the entries that are small next to those norms (long lags of a
correlation, products with a decaying ``t``) lose most of their digits: 1e-2 relative
at d = 1000, where a dense float32 product keeps every entry to ~1e-7 of the sum of
its terms' magnitudes. In float64 that error drops below float32 rounding. The
inputs are copied into zero-padded buffers anyway, so the upcast costs no extra pass,
only wider transforms; the dense routes stay in the input's (at least float32) dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.fft import irfft, rfft

from singd_lightning.structures._utils import compute_dtype, dense_matmul_outer, symmetric_matmul
from singd_lightning.structures.base import Structure


# Cost of one length-N real FFT (forward or inverse) of a row in float64, in
# multiply-adds of a float32 matrix product, per N·log2(N), on CPU (MKL): 23 was
# measured for the float32 pipelines, and the float64 ones take 1.4–1.7× as long
# (d = 576–2304). The FFT routes are memory-bound, matrix products are not, hence
# the large constant.
FFT_COST = 37.0
# The same on CUDA: not measured yet (scripts/gpu_check.sh times the Toeplitz
# routes), estimated from an H100's figures. A float64 row transform of length N
# moves ~16·N bytes (cuFFT does N ≤ 4096 in one pass), and the buffer copies and
# spectrum products of a pass about as much again: ~1e-11·N s at 3.35 TB/s. A
# float32 matrix product runs 3.3e13 multiply-adds/s on CUDA cores (67 TFLOP/s),
# 2.5e14 on tensor cores in TF32 (495 TFLOP/s): ~320·N or ~2500·N multiply-adds,
# i.e. ~25 or ~200 per N·log2(N) at N ≈ 4096. TF32 is on when PyTorch's float32
# matmul precision is not "highest".
CUDA_FFT_COST = 25.0
CUDA_FFT_COST_TF32 = 200.0
# The dtype of every transform (see the module docstring).
_FFT_DTYPE = torch.float64
# Elements per block of the FFT pipelines (4 MiB of float64), so that their
# buffers stay in cache: the transforms are memory-bound on large blocks.
_BLOCK_ELEMENTS = 1 << 19
# Rows per strip when :meth:`_TriangularToeplitz._outer_dense` mirrors its triangle.
_MIRROR_TILE = 256
# On CUDA a block's kernels cost ~5 µs each to launch whatever their size, and
# there is no cache to fit: blocks of 128 MiB of float64 keep the launches few
# (a statistic over 128 × 1024 columns at d = 2048: 32 blocks instead of 1024).
_CUDA_BLOCK_ELEMENTS = 1 << 24


def _fft_cost(dim: int, rows: int, passes: int, device: torch.device) -> float:
    """Cost of ``passes`` transforms of ``rows`` rows on ``device``, in float32
    matrix-product multiply-adds (see the constants above)."""
    n_fft = _fft_len(dim)
    if device.type == "cuda":
        constant = CUDA_FFT_COST_TF32 if torch.backends.cuda.matmul.allow_tf32 else CUDA_FFT_COST
    else:
        constant = FFT_COST
    return constant * passes * rows * n_fft * math.log2(n_fft)


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


def _flat_batch(t: Tensor, x: Tensor) -> tuple[tuple[int, ...], Tensor, Tensor]:
    """``t`` (``(*batch_t, d)``) and ``x`` (``(*batch_x, d, n)``) broadcast to one
    batch and flattened: returns ``(batch, t of shape (B, d), x of shape (B, d, n))``."""
    batch = torch.broadcast_shapes(t.shape[:-1], x.shape[:-2])
    d, n = x.shape[-2:]
    size = math.prod(batch)  # not -1: x may have no columns
    return batch, t.expand(*batch, d).reshape(size, d), x.expand(*batch, d, n).reshape(size, d, n)


def _padded_row_blocks(x: Tensor, n_fft: int) -> Iterator[tuple[int, Tensor]]:
    """The columns of ``x`` (``(B, d, n)``) as rows of zero-padded float64 blocks:
    yields ``(start, buffer)`` with ``buffer`` of shape ``(B, m, n_fft)`` holding
    columns ``start … start + m − 1`` of ``x`` followed by zeros, a cache-sized block
    at a time. The buffer is reused between blocks (its tail stays zero): padding by
    the transforms' ``n=`` would copy and fill on every call, and the copy into it is
    the upcast. Callers must not write to it."""
    d, n = x.shape[-2:]
    elements = _CUDA_BLOCK_ELEMENTS if x.device.type == "cuda" else _BLOCK_ELEMENTS
    block = max(1, min(n, elements // n_fft))
    buffer = None
    for start in range(0, n, block):
        m = min(block, n - start)
        if buffer is None or buffer.shape[1] != m:
            buffer = x.new_zeros(x.shape[0], m, n_fft, dtype=_FFT_DTYPE)
        buffer[..., :d].copy_(x[..., start : start + m].mT)
        yield start, buffer


class _TriangularToeplitz(Structure):
    """Shared implementation; subclasses set ``lower``."""

    lower: bool

    @property
    def numel(self) -> int:
        return self.dim

    def to_dense(self, data: Tensor) -> Tensor:
        # A Hankel view H[i, j] = w[i + j] of w = (t reversed, then d − 1 zeros) has
        # H[d − 1 − i, j] = t[i − j] below the diagonal and 0 above: L is H flipped.
        d = self.dim
        w = torch.cat([data.flip(-1), data.new_zeros(*data.shape[:-1], d - 1)], dim=-1).contiguous()
        hankel = w.as_strided((*w.shape[:-1], d, d), (*w.stride()[:-1], 1, 1))
        lower = hankel.flip(-2)
        return lower if self.lower else lower.mT.contiguous()

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
    # Lᵀ @ x = correlation, i.e. the same with the conjugate spectrum of t. The FFTs
    # run along the rows of xᵀ, the contiguous last dimension of the block buffers
    # (much faster than along x's rows).
    def _spectrum(self, t: Tensor, transpose: bool) -> Tensor:
        """The float64 spectrum of ``t`` (``(B, d)``), ``(B, 1, n_fft // 2 + 1)``: a
        row's spectrum times it is that of ``Sᵀ`` (``transpose``) or ``S`` times the
        row."""
        spec = rfft(t.to(_FFT_DTYPE), n=_fft_len(self.dim)).unsqueeze(-2)
        return spec.conj() if transpose == self.lower else spec  # Lᵀ, or U = Lᵀ

    def matmul(self, data: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
        out_dtype = torch.promote_types(data.dtype, x.dtype)
        dtype = compute_dtype(out_dtype)
        d, n_fft = self.dim, _fft_len(self.dim)
        if d**2 <= _fft_cost(d, 1, passes=2, device=x.device):  # short rows: dense product
            mat = self.to_dense(data.to(dtype))
            return ((mat.mT if transpose else mat) @ x.to(dtype)).to(out_dtype)
        batch, t, x = _flat_batch(data, x)
        spec = self._spectrum(t, transpose)
        out = x.new_empty(x.shape[0], x.shape[-1], d, dtype=dtype)  # the result's transpose
        for start, rows in _padded_row_blocks(x, n_fft):
            out[:, start : start + rows.shape[1]] = irfft(rfft(rows, dim=-1).mul_(spec), n=n_fft, dim=-1)[..., :d]
        return out.mT.reshape(*batch, d, x.shape[-1]).to(out_dtype)

    def _outer_dense(self, data: Tensor) -> Tensor:
        """``S Sᵀ`` as a dense ``(*batch, d, d)`` matrix in ``data``'s compute dtype,
        in ``O(d²)``: ``(L Lᵀ)[j + k, j] = Σ_{m ≤ j} t[m] t[m + k]``, a running sum
        along each diagonal, taken in float64 (one rounding per entry, as good as a
        dense float32 product); ``U Uᵀ = J (L Lᵀ) J`` with ``J`` the flip."""
        d, batch = self.dim, data.shape[:-1]
        size = math.prod(batch)
        t = data.to(_FFT_DTYPE).reshape(size, d)
        padded = torch.cat([t, t.new_zeros(size, d)], dim=-1)  # t[m + k] = 0 past the end
        # Running sum ``j`` at lag ``k`` goes to flat position j·(d + 1) + k of a
        # row-major d × d matrix, i.e. to [j, j + k]: the upper triangle. Sums whose
        # diagonal ran past the end (j + k ≥ d) land strictly below it (or past
        # d², in the spare tail) and are cleared by ``triu``; no two positions meet.
        # A block of lags at a time, lags along the contiguous dimension (the
        # running sums run down the rows, the writes are contiguous runs).
        out = data.new_empty(size, d * (d + 1), dtype=compute_dtype(data.dtype))
        lags = max(1, _BLOCK_ELEMENTS // d)
        for k0 in range(0, d, lags):
            k1 = min(d, k0 + lags)
            # shifted[:, m, k] = t[m + k0 + k]
            shifted = padded.as_strided((size, d, k1 - k0), (2 * d, 1, 1), padded.storage_offset() + k0)
            target = out.as_strided((size, d, k1 - k0), (d * (d + 1), d + 1, 1), out.storage_offset() + k0)
            target.copy_((shifted * t.unsqueeze(-1)).cumsum_(-2))
        mat = out[:, : d * d].unflatten(-1, (d, d))
        # Mirror the upper triangle into the lower one (overwriting the cleared
        # sums), a strip of rows at a time so that the transposed reads stay in cache.
        for r0 in range(0, d, _MIRROR_TILE):
            r1 = min(d, r0 + _MIRROR_TILE)
            mat[:, r0:r1, :r0] = mat[:, :r0, r0:r1].mT
            tile = mat[:, r0:r1, r0:r1]
            tile.copy_(tile.triu() + tile.triu(1).mT)
        if not self.lower:
            mat = mat.flip(-2, -1)
        return mat.reshape(*batch, d, d)

    def matmul_outer(self, data: Tensor, x: Tensor) -> Tensor:
        out_dtype = torch.promote_types(data.dtype, x.dtype)
        dtype = compute_dtype(out_dtype)
        d, n_fft = self.dim, _fft_len(self.dim)
        if d**2 <= _fft_cost(d, 1, passes=2, device=x.device):
            return dense_matmul_outer(self.to_dense(data.to(dtype)), x.to(dtype)).to(out_dtype)
        # Row by row (the columns of x): Sᵀ then S in the frequency domain, with
        # the tail of Sᵀ x zeroed between the two (its truncation to d entries),
        # over blocks of columns whose buffers stay in cache.
        batch, t, x = _flat_batch(data, x)
        first, second = self._spectrum(t, transpose=True), self._spectrum(t, transpose=False)
        out = x.new_empty(x.shape[0], x.shape[-1], d, dtype=dtype)  # the result's transpose
        # Transforms write fresh, block-sized outputs, which the allocator reuses
        # (``out=`` transforms copy once more).
        for start, rows in _padded_row_blocks(x, n_fft):
            middle = irfft(rfft(rows, dim=-1).mul_(first), n=n_fft, dim=-1)
            middle[..., d:].zero_()
            out[:, start : start + rows.shape[1]] = irfft(rfft(middle, dim=-1).mul_(second), n=n_fft, dim=-1)[..., :d]
        return out.mT.reshape(*batch, d, x.shape[-1]).to(out_dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        # L_a L_b is lower Toeplitz with the truncated convolution a * b; U_a U_b =
        # (L_b L_a)ᵀ and convolution commutes, so the same formula holds.
        # Transforms of two length-d vectors: float64 costs nothing here.
        d, n_fft = self.dim, _fft_len(self.dim)
        prod = rfft(a.to(_FFT_DTYPE), n=n_fft) * rfft(b.to(_FFT_DTYPE), n=n_fft)
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
        y_work = y.to(compute_dtype(y.dtype))
        if self.dim**2 <= _fft_cost(self.dim, 1, passes=1, device=y.device):  # short rows: dense Gram
            return self.project(symmetric_matmul(y_work, y_work.mT)).to(y.dtype)
        return self._project_outer_fft(y).to(y.dtype)

    def project_gram(self, data: Tensor, x: Tensor) -> Tensor:
        out_dtype = torch.promote_types(data.dtype, x.dtype)
        dtype = compute_dtype(out_dtype)
        if self._gram_first(x.shape[-1], x.device):
            t, x = data.to(dtype), x.to(dtype)
            return self._project_sandwich(t, symmetric_matmul(x, x.mT)).to(out_dtype)
        return self._project_outer_fft(x, data).to(out_dtype)

    def project_gram_rows(self, data: Tensor, rows) -> Tensor:
        out_dtype = torch.promote_types(data.dtype, rows.dtype)
        dtype = compute_dtype(out_dtype)
        if self._gram_first(rows.n, data.device):
            gram = rows.gram().to(dtype)
            return self._project_sandwich(data.to(dtype), gram).to(out_dtype)
        # The chunks' float64 statistics are summed in float64 (one rounding at the end).
        return rows.reduce(lambda x: self._project_outer_fft(x, data), row_major=True).to(out_dtype)

    def _gram_first(self, n: int, device: torch.device) -> bool:
        """Whether Π(Sᵀ X Xᵀ S) for ``n`` columns is cheaper through the Gram matrix
        ``X Xᵀ`` (``n·d²``, then :meth:`_project_sandwich`) than by three FFT passes
        over all ``n`` columns, on ``device``."""
        d = self.dim
        return n * d * d + self._sandwich_cost(device) < _fft_cost(d, n, passes=3, device=device)

    def _sandwich_cost(self, device: torch.device) -> float:
        """Cost of :meth:`_project_sandwich`: two dense products with ``S`` (``2d³``)
        or two transforms of ``d`` rows, whichever is cheaper."""
        return min(2 * self.dim**3, _fft_cost(self.dim, self.dim, passes=2, device=device))

    def _project_sandwich(self, t: Tensor, gram: Tensor) -> Tensor:
        """Π(Sᵀ G S) for a dense symmetric ``G``, in ``G``'s dtype: ``Sᵀ (Sᵀ G)ᵀ``
        by two products with ``S`` for short rows, else from the cross-correlations of
        ``G``'s rows with those of ``S Sᵀ`` (:meth:`_project_sandwich_fft`)."""
        d = self.dim
        if 2 * d**3 <= _fft_cost(d, d, passes=2, device=gram.device):
            left = self.matmul(t, gram, transpose=True)  # Sᵀ G
            return self.project(self.matmul(t, left.mT, transpose=True))
        return self._project_sandwich_fft(t, gram).to(gram.dtype)

    def _project_sandwich_fft(self, t: Tensor, gram: Tensor) -> Tensor:
        """Π(Sᵀ G S) for a dense symmetric ``G``, in float64. With ``M = L Lᵀ``
        (:meth:`_outer_dense`) the ``k``-th lower-diagonal sum of ``Lᵀ G L`` is
        ``Σ_{i,j} G[j, i] M[j, i − k]``: the cross-correlations of ``G``'s rows with
        ``M``'s at lag ``k``, summed over rows, i.e. one float64 transform of each
        row of both, their products summed in the frequency domain and one inverse
        transform (half the transforms of two FFT products with ``S``). For
        ``U = J L J`` (``J`` the flip), ``Uᵀ G U = J Lᵀ (J G J) L J`` has the same
        diagonal sums as ``Lᵀ (J G J) L``."""
        d, n_fft = self.dim, _fft_len(self.dim)
        lower = TrilToeplitz(d)
        if not self.lower:
            gram = gram.flip(-2, -1)
        batch, t, gram = _flat_batch(t, gram)
        outer = lower._outer_dense(t.to(gram.dtype))
        total = None
        # G and M are symmetric: their columns (the blocks' rows) are their rows.
        for (_, rows_g), (_, rows_m) in zip(_padded_row_blocks(gram, n_fft), _padded_row_blocks(outer, n_fft)):
            part = rfft(rows_g, dim=-1).mul_(rfft(rows_m, dim=-1).conj()).sum(dim=-2)
            total = part if total is None else total.add_(part)
        return self._normalize(irfft(total, n=n_fft)[..., :d]).reshape(*batch, d)

    def _project_outer_fft(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Π(y yᵀ) for ``y = Sᵀ x`` (``y = x`` without ``t``), ``x`` of shape
        ``(*batch, d, n)``, by float64 FFTs, returned in float64: per column, ``Sᵀ x``
        as a correlation truncated to ``d`` entries, then its power spectrum, summed
        over columns. (The sum of the ``k``-th lower diagonal of ``y yᵀ`` is the
        columns' autocorrelation at lag ``k``.) Runs over blocks of columns: no
        spectrum of all columns at once."""
        d, n_fft = self.dim, _fft_len(self.dim)
        if t is None:
            batch, x = x.shape[:-2], x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])
            spec_t = None
        else:
            batch, t, x = _flat_batch(t, x)
            spec_t = self._spectrum(t, transpose=True)
        power = None
        for _, rows in _padded_row_blocks(x, n_fft):
            spectrum = rfft(rows, dim=-1)
            if spec_t is not None:
                corr = irfft(spectrum.mul_(spec_t), n=n_fft, dim=-1)
                corr[..., d:].zero_()  # truncate Sᵀ x to its d entries
                spectrum = rfft(corr, dim=-1)
            part = torch.view_as_real(spectrum).flatten(-2).square_().sum(dim=-2)
            power = part if power is None else power.add_(part)
        if power is None:  # no columns
            return x.new_zeros(*batch, d, dtype=_FFT_DTYPE)
        power = power.unflatten(-1, (-1, 2)).sum(dim=-1)
        return self._normalize(irfft(power, n=n_fft)[..., :d]).reshape(*batch, d)

    def project_self_gram(self, data: Tensor) -> Tensor:
        # Both LᵀL and LLᵀ have k-th lower-diagonal sum Σ_{u ≥ k} (d − u) t[u] t[u − k]
        # (count the pairs of entries of L that meet in that diagonal): the
        # correlation of w = (d − u) t[u] with t at lag k.
        # Transforms of two length-d vectors: float64 costs nothing here.
        d, n_fft = self.dim, _fft_len(self.dim)
        t = data.to(_FFT_DTYPE)
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
