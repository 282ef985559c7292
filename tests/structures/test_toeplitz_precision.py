"""Float32 accuracy of the Toeplitz structures' statistics and products, up to
d = 3000, against a float64 dense reference built with ``to_dense``.

The metric is the componentwise relative error: for every output entry, the error
against the float64 reference divided by the same computation on absolute values
(``|S|``, ``|X|``, ``|t|``), in float64. That denominator is what rounding in a
dense float32 product is proportional to, entry by entry, whatever the cancellation
(a Toeplitz projection averages a diagonal, and the average of the absolute values
bounds the rounding of the average), so a dense float32 computation keeps this
metric within a small multiple of float32's ``eps`` for every entry. Relative to the entry itself would
punish any method for cancellation in the data; relative to the largest entry
would hide what FFTs get wrong: a transform's rounding is ``eps·log N`` times the
*norms* of its signals for every entry, so entries much smaller than those norms
(long lags, rows that start with small values) lose their digits.

The yardstick is the same quantity computed densely in float32 (matrix products,
then the projection of the dense result in float32; a matrix-vector product for
``Π(SᵀS)`` and ``A B``); each Toeplitz result must be within 10× the yardstick's
error and within 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.structures.test_structures import column_rows
from singd_lightning.structures import toeplitz
from singd_lightning.structures.toeplitz import TrilToeplitz, TriuToeplitz

F32, F64 = torch.float32, torch.float64
# (d, columns of X): few columns for large d; many more columns than rows for small
# d (the Gram-matrix route of the statistic).
SIZES = [(10, 80), (100, 800), (1000, 48), (3000, 12)]
NAMES = ["tril_toeplitz", "triu_toeplitz"]
# "auto": the cost model's choice; "fft": FFTs everywhere (free in the model), which
# the model already picks at d = 3000.
CASES = [
    pytest.param(route, name, dim, n, id=f"{route}-{name}-d{dim}")
    for route in ("auto", "fft")
    for name in NAMES
    for dim, n in SIZES
    if route == "auto" or dim < 3000
]


def layout(name: str, dim: int) -> toeplitz._TriangularToeplitz:
    return (TrilToeplitz if name == "tril_toeplitz" else TriuToeplitz)(dim)


@functools.lru_cache(maxsize=2)
def _problem(name: str, dim: int, columns: int) -> dict[str, torch.Tensor]:
    """Random storages ``t``, ``b``, a matrix ``X`` and the dense matrix of ``t``, in
    float64; moderately decaying ``t`` and ``b`` (as factors near the identity have)."""
    gen = torch.Generator().manual_seed(dim + columns)
    decay = (1.0 + torch.arange(dim, dtype=F64)).rsqrt()
    t = torch.randn(dim, generator=gen, dtype=F64) * decay
    b = torch.randn(dim, generator=gen, dtype=F64) * decay
    x = torch.randn(dim, columns, generator=gen, dtype=F64)
    # Float32 values: the float64 references are exact for the float32 inputs.
    t, b, x = (v.to(F32).to(F64) for v in (t, b, x))
    return {"t": t, "b": b, "x": x, "mat": layout(name, dim).to_dense(t)}


def diagonal_means(sums: torch.Tensor) -> torch.Tensor:
    """Π's storage from a symmetric matrix's lower-diagonal sums (SPEC §2)."""
    d = sums.shape[-1]
    means = sums / torch.arange(d, 0, -1, dtype=sums.dtype)
    means[1:] *= 2
    return means


def projection(sym: torch.Tensor) -> torch.Tensor:
    """Π(sym) of a Toeplitz structure, in ``sym``'s dtype: twice the mean of each
    lower off-diagonal, the mean of the main diagonal (SPEC §2)."""
    return diagonal_means(torch.stack([sym.diagonal(-k).sum() for k in range(sym.shape[-1])]))


def error(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest componentwise relative error of ``out`` (see the module docstring)."""
    return ((out.to(F64) - ref).abs() / scale).max().item()


def check(op: str, out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, yardstick: torch.Tensor) -> None:
    """``out`` within 1e-5 and 10× the dense float32 yardstick's error."""
    assert out.dtype == F32 and yardstick.dtype == F32
    assert (scale > 0).all()
    err, yard = error(out, ref, scale), error(yardstick, ref, scale)
    assert err <= 1e-5 and err <= 10 * yard, f"{op}: error {err:.1e}, dense float32 {yard:.1e}"


def check_rounded_once(op: str, out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """``out`` is the exact value rounded once to float32 (half an ulp), up to 1e-9
    of the entry's scale: what float64 transforms of short vectors deliver."""
    excess = (out.to(F64) - ref).abs() - 2.0**-24 * ref.abs()
    assert (excess <= 1e-9 * scale).all(), f"{op}: {(excess / scale).max().item():.1e} of the scale"


@pytest.fixture
def route(request, monkeypatch):
    """Forces the FFT routes for the "fft" cases (the ``route`` parameter)."""
    if request.param == "fft":
        monkeypatch.setattr(toeplitz, "FFT_COST", 0.0)
    return request.param


def self_gram_sums(t: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The lower-diagonal sums of ``SᵀS`` (= those of ``S Sᵀ``) for either
    triangular Toeplitz ``S`` of ``t``: ``Σ_{u ≥ k} (d − u) t[u] t[u − k]`` (each
    pair of entries of ``S`` that meets in diagonal ``k``), as the dense product of
    ``upper`` (the upper triangular Toeplitz matrix of ``t``) with the weighted
    ``t``, in their dtype: ``d²`` operations where ``SᵀS`` takes ``d³``."""
    d = t.shape[-1]
    return upper @ (torch.arange(d, 0, -1, dtype=t.dtype) * t)


def test_self_gram_reference():
    """The reference below equals Π(SᵀS) and Π(S Sᵀ) of the dense matrices."""
    p = _problem("tril_toeplitz", 300, 1)
    mat, upper = p["mat"], p["mat"].T
    expected = diagonal_means(self_gram_sums(p["t"], upper))
    atol = 1e-12 * expected.abs().max().item()
    torch.testing.assert_close(projection(mat.T @ mat), expected, rtol=1e-12, atol=atol)
    torch.testing.assert_close(projection(mat @ mat.T), expected, rtol=1e-12, atol=atol)


@pytest.mark.parametrize("route,name,dim,columns", CASES, indirect=["route"])
def test_project_self_gram(route, name, dim, columns):
    """Against the sums of pairs of entries (:func:`self_gram_sums`), in float64,
    of absolute values, and in dense float32 (a matrix-vector product: the same
    accuracy class as the dense ``SᵀS``, in ``d²`` operations instead of ``d³``);
    and rounded once, being computed from transforms of two length-``d`` vectors."""
    p = _problem(name, dim, columns)
    t = p["t"]
    upper = p["mat"] if name == "triu_toeplitz" else p["mat"].T
    out = layout(name, dim).project_self_gram(t.to(F32))
    ref = diagonal_means(self_gram_sums(t, upper))
    scale = diagonal_means(self_gram_sums(t.abs(), upper.abs()))
    yardstick = diagonal_means(self_gram_sums(t.to(F32), upper.to(F32)))
    check("project_self_gram", out, ref, scale, yardstick)
    check_rounded_once("project_self_gram", out, ref, scale)


@pytest.mark.parametrize("route,name,dim,columns", CASES, indirect=["route"])
def test_compose(route, name, dim, columns):
    """The stored column (row) of ``A B`` is ``A`` times that of ``B``: a dense
    matrix-vector product. Rounded once, being computed from transforms of two
    length-``d`` vectors."""
    p = _problem(name, dim, columns)
    out = layout(name, dim).compose(p["t"].to(F32), p["b"].to(F32))
    mat, b = p["mat"], p["b"]
    lower = mat if name == "tril_toeplitz" else mat.T  # both store the lower one's column
    ref, scale = lower @ b, lower.abs() @ b.abs()
    check("compose", out, ref, scale, lower.to(F32) @ b.to(F32))
    check_rounded_once("compose", out, ref, scale)


@pytest.mark.parametrize("route,name,dim,columns", CASES, indirect=["route"])
def test_products(route, name, dim, columns):
    """``S X``, ``Sᵀ X`` and ``S Sᵀ X``."""
    p = _problem(name, dim, columns)
    lay, x, t, mat = layout(name, dim), p["x"], p["t"], p["mat"]
    x32, t32 = x.to(F32), t.to(F32)
    m32, m_abs, x_abs = mat.to(F32), mat.abs(), x.abs()
    check("matmul", lay.matmul(t32, x32), mat @ x, m_abs @ x_abs, m32 @ x32)
    check("matmul transpose", lay.matmul(t32, x32, transpose=True), mat.T @ x, m_abs.T @ x_abs, m32.T @ x32)
    check(
        "matmul_outer", lay.matmul_outer(t32, x32), mat @ (mat.T @ x), m_abs @ (m_abs.T @ x_abs), m32 @ (m32.T @ x32)
    )


@pytest.mark.parametrize("route,name,dim,columns", CASES, indirect=["route"])
def test_statistics(route, name, dim, columns):
    """Π(X Xᵀ), and Π(Sᵀ X Xᵀ S) from ``X`` and from :class:`Rows` in chunks."""
    p = _problem(name, dim, columns)
    lay, x, t, mat = layout(name, dim), p["x"], p["t"], p["mat"]
    x32, t32 = x.to(F32), t.to(F32)
    x_abs = x.abs()
    check("project_outer", lay.project_outer(x32), projection(x @ x.T), projection(x_abs @ x_abs.T),
          projection(x32 @ x32.T))
    y, y_abs, y32 = mat.T @ x, mat.abs().T @ x_abs, mat.to(F32).T @ x32
    ref, scale, yardstick = projection(y @ y.T), projection(y_abs @ y_abs.T), projection(y32 @ y32.T)
    check("project_gram", lay.project_gram(t32, x32), ref, scale, yardstick)
    rows = column_rows(x32, max(1, columns // 3))  # several chunks of columns
    check("project_gram_rows", lay.project_gram_rows(t32, rows), ref, scale, yardstick)


@pytest.mark.parametrize("route", ["auto", "fft"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F32, F64], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_results_in_callers_dtype(route, name, dtype):
    """Every product and statistic returns the inputs' dtype (half types are
    computed in float32 or better), close to the float64 result."""
    dim, columns = 40, 6
    p = _problem(name, dim, columns)
    lay = layout(name, dim)
    t, b, x = (p[key].to(dtype) for key in ("t", "b", "x"))
    outs = {
        "matmul": lay.matmul(t, x),
        "matmul_transpose": lay.matmul(t, x, transpose=True),
        "matmul_outer": lay.matmul_outer(t, x),
        "compose": lay.compose(t, b),
        "project_outer": lay.project_outer(x),
        "project_gram": lay.project_gram(t, x),
        "project_gram_rows": lay.project_gram_rows(t, column_rows(x, 2)),
        "project_self_gram": lay.project_self_gram(t),
    }
    t64, b64, x64 = (v.to(F64) for v in (t, b, x))  # the rounded inputs, exactly
    mat = lay.to_dense(t64)
    y = mat.T @ x64
    expected = {
        "matmul": mat @ x64,
        "matmul_transpose": mat.T @ x64,
        "matmul_outer": mat @ (mat.T @ x64),
        "compose": (mat if name == "tril_toeplitz" else mat.T) @ b64,
        "project_outer": projection(x64 @ x64.T),
        "project_gram": projection(y @ y.T),
        "project_gram_rows": projection(y @ y.T),
        "project_self_gram": projection(mat.T @ mat),
    }
    rtol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, F32: 1e-5, F64: 1e-12}[dtype]
    for key, out in outs.items():
        assert out.dtype == dtype, key
        torch.testing.assert_close(out.to(F64), expected[key], rtol=rtol, atol=rtol * expected[key].abs().max().item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim,columns", SIZES, ids=[f"d{d}" for d, _ in SIZES])
def test_sandwich_by_transforms_of_the_gram_rows(name, dim, columns):
    """Π(Sᵀ G S) for ``G = X Xᵀ`` (the Gram-first route's second half) from the
    cross-correlations of ``G``'s rows with those of ``S Sᵀ``, against the dense
    float32 yardstick; and ``S Sᵀ`` itself, built by running sums along its diagonals."""
    p = _problem(name, dim, columns)
    lay, x, t, mat = layout(name, dim), p["x"], p["t"], p["mat"]
    x32, t32 = x.to(F32), t.to(F32)
    y, y_abs, y32 = mat.T @ x, mat.abs().T @ x.abs(), mat.to(F32).T @ x32
    ref, scale, yardstick = projection(y @ y.T), projection(y_abs @ y_abs.T), projection(y32 @ y32.T)
    check("sandwich", lay._project_sandwich_fft(t32, x32 @ x32.T).to(F32), ref, scale, yardstick)
    if dim > 1000:  # the float64 reference S Sᵀ alone would take seconds
        return
    outer = lay._outer_dense(t32)
    m_abs = mat.abs()
    check("outer", outer, mat @ mat.T, m_abs @ m_abs.T, mat.to(F32) @ mat.to(F32).T)
    assert torch.equal(outer, outer.mT)
