"""Tests of every structure against independent dense references (SPEC §2).

The references below are written from the projection rules as masks / formulas on
the dense matrix, not by calling the implementation, so each op of each structure
is checked in float64 against plain dense linear algebra.
"""

from __future__ import annotations

import random

import pytest
import torch

from singd_lightning.optim.curvature import Rows
from singd_lightning.structures import STRUCTURES, Structure

# ---------------------------------------------------------------- test cases
OPTIONS: dict[str, list[dict]] = {
    "block_diagonal": [{"block_size": 1}, {"block_size": 4}, {"block_size": 30}],
    "hierarchical": [{"k1": 2, "k2": 3}, {"k1": 3, "k2": 2}, {"k1": 15, "k2": 15}],
}
# 20 lies between k1 and k1 + k2 for hierarchical(15, 15); 7 lies below k1.
DIMS = [1, 2, 3, 7, 20, 33, *random.Random(0).sample(range(4, 64), 2)]

CONFIGS = [(name, opts) for name in STRUCTURES for opts in OPTIONS.get(name, [{}])]
CASES = [
    pytest.param(
        name, opts, dim, id="-".join([name, *map(str, opts.values()), f"d{dim}"])
    )
    for name, opts in CONFIGS
    for dim in DIMS
]
# Fewer dims for the slower tests; these still hit every edge case: a lone remainder
# block (1), dim < k1 (1, 3), k1 < dim < k1 + k2 (3, 20), all blocks used (20, 33).
FEW_CASES = [case for case in CASES if case.values[2] in (1, 3, 20, 33)]
TOEPLITZ = {"tril_toeplitz", "triu_toeplitz"}
F64 = torch.float64


def make(name: str, opts: dict, dim: int) -> Structure:
    return STRUCTURES[name](dim, **opts)


def rand_sym(dim: int, *batch: int) -> torch.Tensor:
    a = torch.randn(*batch, dim, dim, dtype=F64)
    return (a + a.mT) / 2


def rand_data(layout: Structure, *batch: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*batch, layout.numel, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------- independent dense references
def hierarchical_sizes(dim: int, k1: int, k2: int) -> tuple[int, int, int]:
    """(k1', m, k2') of the reference package's edge-case rules."""
    if dim <= k1:
        return dim, 0, 0
    if dim <= k1 + k2:
        return k1, 0, dim - k1
    return k1, dim - k1 - k2, k2


def weight_matrix(layout: Structure) -> torch.Tensor:
    """W with Π(S) = W ⊙ S for symmetric S (not Toeplitz); W ≠ 0 on the pattern."""
    d, name, opts = layout.dim, layout.name, layout.options()
    i = torch.arange(d).unsqueeze(-1)
    j = torch.arange(d).unsqueeze(0)
    eye = (i == j).to(F64)
    if name == "dense":
        return torch.ones(d, d, dtype=F64)
    if name == "diagonal":
        return eye
    if name == "block_diagonal":
        b = opts["block_size"]
        return (i // b == j // b).to(F64)
    if name == "hierarchical":
        n1, m, _ = hierarchical_sizes(d, opts["k1"], opts["k2"])
        top, bottom = i < n1, i >= n1 + m
        middle = ~top & ~bottom
        col_a, col_last = j < n1, j >= n1 + m
        col_mid = ~col_a & ~col_last
        w = (top & col_a) * 1.0 + (top & ~col_a) * 2.0
        w = w + (middle & (i == j)) * 1.0 + (bottom & col_mid) * 2.0
        return (w + (bottom & col_last) * 1.0).to(F64)
    if name == "tril":
        return ((i >= j) * (1.0 + (i > j))).to(F64)
    if name == "triu":
        return ((i <= j) * (1.0 + (i < j))).to(F64)
    line = {  # the dense row/column of the rank-one kinds (off-diagonal part)
        "tril_bottom_right_diagonal": (j == 0) & (i > 0),
        "tril_top_left_diagonal": (i == d - 1) & (j < d - 1),
        "triu_top_left_diagonal": (j == d - 1) & (i < d - 1),
        "triu_bottom_right_diagonal": (i == 0) & (j > 0),
    }[name]
    return eye + 2.0 * line


def toeplitz_dense(t: torch.Tensor, lower: bool) -> torch.Tensor:
    d = t.shape[-1]
    mat = torch.zeros(d, d, dtype=t.dtype)
    for i in range(d):
        for j in range(i + 1):
            mat[i, j] = t[i - j]
    return mat if lower else mat.T


def ref_project(layout: Structure, sym: torch.Tensor) -> torch.Tensor:
    """Dense Π(sym) for one symmetric ``(d, d)`` matrix."""
    if layout.name in TOEPLITZ:
        d = layout.dim
        t = torch.stack([sym.diagonal(-k).mean() * (2 if k else 1) for k in range(d)])
        return toeplitz_dense(t, lower=layout.name == "tril_toeplitz")
    return weight_matrix(layout) * sym


def in_structure(layout: Structure, mat: torch.Tensor) -> bool:
    """Whether the dense ``(d, d)`` matrix lies in the structure's subspace."""
    if layout.name in TOEPLITZ:
        lower = layout.name == "tril_toeplitz"
        t = mat[:, 0] if lower else mat[0, :]
        return torch.allclose(mat, toeplitz_dense(t, lower), atol=1e-10)
    outside = weight_matrix(layout) == 0
    return bool((mat[outside].abs() <= 1e-10).all())


def expected_numel(layout: Structure) -> int:
    if layout.name in TOEPLITZ:
        return layout.dim
    return int((weight_matrix(layout) != 0).sum())


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, **kw)


# --------------------------------------------------------------------- tests
def test_every_structure_is_tested():
    assert {name for name, _ in CONFIGS} == set(STRUCTURES)
    assert all(STRUCTURES[name].name == name for name in STRUCTURES)


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_layout_and_constructors(name, opts, dim):
    layout = make(name, opts, dim)
    assert layout.numel == expected_numel(layout)
    assert layout.options() == opts
    twin = make(name, opts, dim)
    assert layout == twin and hash(layout) == hash(twin)
    assert layout.project(rand_sym(dim)).shape == (layout.numel,)
    assert layout.zeros(2, 3, dtype=F64).shape == (2, 3, layout.numel)
    assert not layout.zeros(dtype=F64).any()
    eye = torch.eye(dim, dtype=F64)
    close(layout.to_dense(layout.identity(dtype=F64)), eye)
    close(layout.to_dense(layout.identity(2, dtype=F64)), eye.expand(2, dim, dim))


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_project(name, opts, dim):
    layout, sym = make(name, opts, dim), rand_sym(dim)
    dense = layout.to_dense(layout.project(sym))
    close(dense, ref_project(layout, sym))
    assert in_structure(layout, dense)


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_to_dense_and_entry_queries(name, opts, dim):
    layout = make(name, opts, dim)
    data = rand_data(layout)
    mat = layout.to_dense(data)
    assert mat.shape == (dim, dim) and in_structure(layout, mat)
    close(layout.diagonal(data), mat.diagonal())
    close(layout.average_trace(data), mat.trace() / dim)
    # Every stored value is an entry of the matrix.
    close(layout.max_abs(data), mat.abs().max())


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_matmul(name, opts, dim):
    layout = make(name, opts, dim)
    data, x = rand_data(layout), torch.randn(dim, 5, dtype=F64)
    mat = layout.to_dense(data)
    close(layout.matmul(data, x), mat @ x)
    close(layout.matmul(data, x, transpose=True), mat.T @ x)


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_compose(name, opts, dim):
    layout = make(name, opts, dim)
    a, b = rand_data(layout), rand_data(layout)
    product = layout.to_dense(a) @ layout.to_dense(b)
    assert in_structure(layout, product)  # the structure is closed under products
    close(layout.to_dense(layout.compose(a, b)), product)


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_project_outer_and_grams(name, opts, dim):
    layout = make(name, opts, dim)
    data, x = rand_data(layout), torch.randn(dim, 4, dtype=F64)
    mat = layout.to_dense(data)
    close(layout.to_dense(layout.project_outer(x)), ref_project(layout, x @ x.T))
    close(
        layout.to_dense(layout.project_gram(data, x)),
        ref_project(layout, mat.T @ x @ x.T @ mat),
    )
    close(
        layout.to_dense(layout.project_self_gram(data)),
        ref_project(layout, mat.T @ mat),
    )


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_matmul_outer(name, opts, dim):
    layout = make(name, opts, dim)
    data = rand_data(layout)
    mat = layout.to_dense(data)
    for columns in (3, 2 * dim + 1):  # both orders of the dense products
        x = torch.randn(dim, columns, dtype=F64)
        close(layout.matmul_outer(data, x), mat @ mat.T @ x)
        # A transposed view (as the optimizer passes a gradient's transpose).
        x_t = torch.randn(columns, dim, dtype=F64).T
        close(layout.matmul_outer(data, x_t), mat @ mat.T @ x_t)


@pytest.mark.parametrize("name,opts,dim", FEW_CASES)
def test_matmul_outer_form_is_matmul_outer(name, opts, dim):
    """What steps between preconditioner updates keep of a factor (its outer
    form) gives S Sᵀ x bit for bit, for plain, transposed and batched x."""
    layout = make(name, opts, dim)
    for batch in ((), (2,)):
        data = rand_data(layout, *batch, dtype=torch.float32)
        form = layout.outer_form(data)
        x = torch.randn(*batch, dim, 5)
        for operand in (x, x.mT.contiguous().mT):
            assert torch.equal(layout.matmul_outer_form(form, operand), layout.matmul_outer(data, operand))


def column_rows(x: torch.Tensor, chunk_columns: int) -> Rows:
    """``x`` as lazily built :class:`Rows`, handed out ``chunk_columns`` at a time."""
    rows = Rows(
        lambda start, stop, row_major: x[:, start:stop].T.contiguous().T if row_major else x[:, start:stop].clone(),
        x.shape[0], x.shape[1], 1, x.dtype,
    )
    rows.chunk_bytes = chunk_columns * x.shape[0] * x.element_size()
    return rows


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_project_gram_rows_over_column_chunks(name, opts, dim):
    """The statistic summed over column chunks (each route: few columns, and more
    than twice the dimension) equals the dense reference."""
    layout = make(name, opts, dim)
    data = rand_data(layout)
    mat = layout.to_dense(data)
    for columns in (3, 2 * dim + 5):
        x = torch.randn(dim, columns, dtype=F64)
        expected = ref_project(layout, mat.T @ x @ x.T @ mat)
        close(layout.to_dense(layout.project_gram_rows(data, column_rows(x, 2))), expected)


@pytest.mark.parametrize("name,opts,dim", FEW_CASES)
def test_gram_statistic_projects_sums_and_batches(name, opts, dim):
    """Where a structure has a gram statistic: its size is as stated, the sum of
    two batches' statistics projects to the sum of their projections (the dense
    reference), and stacked factors and statistics project row by row."""
    layout = make(name, opts, dim)
    x1, x2 = torch.randn(dim, 5, dtype=F64), torch.randn(dim, 2 * dim + 3, dtype=F64)
    statistic = layout.gram_statistic(column_rows(x1, 2))
    if statistic is None:
        assert layout.gram_statistic_numel() is None
        with pytest.raises(NotImplementedError):
            layout.project_gram_statistic(rand_data(layout), torch.zeros(1, dtype=F64))
        return
    assert statistic.shape == (layout.gram_statistic_numel(),)
    total = statistic + layout.gram_statistic(column_rows(x2, 3))
    data = torch.stack([rand_data(layout), rand_data(layout)])
    projected = layout.project_gram_statistic(data, torch.stack([total, 2 * total]))
    for row, factor in ((0, 1.0), (1, 2.0)):
        mat = layout.to_dense(data[row])
        expected = factor * ref_project(layout, mat.T @ (x1 @ x1.T + x2 @ x2.T) @ mat)
        close(layout.to_dense(projected[row]), expected)


@pytest.mark.parametrize("fft_cost", [0.0, 1e12], ids=["fft", "dense"])
@pytest.mark.parametrize("name", sorted(TOEPLITZ))
@pytest.mark.parametrize("dim", [1, 2, 7, 33])
def test_toeplitz_fft_and_dense_routes(monkeypatch, fft_cost, name, dim):
    """The Toeplitz ops pick FFTs or dense products by a cost model; both routes
    are exact (forced here by making FFTs free or prohibitive)."""
    from singd_lightning.structures import toeplitz

    monkeypatch.setattr(toeplitz, "FFT_COST", fft_cost)
    monkeypatch.setattr(toeplitz, "_BLOCK_ELEMENTS", 4 * toeplitz._fft_len(dim))  # several blocks
    layout = make(name, {}, dim)
    data, x = rand_data(layout), torch.randn(dim, 9, dtype=F64)
    mat = layout.to_dense(data)
    close(layout.matmul(data, x), mat @ x)
    close(layout.matmul(data, x, transpose=True), mat.T @ x)
    close(layout.matmul_outer(data, x), mat @ mat.T @ x)
    assert layout.matmul_outer(data, x[:, :0]).shape == (dim, 0)  # no columns
    close(layout.to_dense(layout.project_outer(x)), ref_project(layout, x @ x.T))
    expected = ref_project(layout, mat.T @ x @ x.T @ mat)
    close(layout.to_dense(layout.project_gram(data, x)), expected)
    close(layout.to_dense(layout.project_gram_rows(data, column_rows(x, 4))), expected)


@pytest.mark.parametrize("name,opts,dim", CASES)
def test_add_identity(name, opts, dim):
    layout = make(name, opts, dim)
    data = rand_data(layout, 2, 3)
    expected = layout.to_dense(data) + 0.7 * torch.eye(dim, dtype=F64)
    out = layout.add_identity_(data, 0.7)
    assert out is data
    close(layout.to_dense(data), expected)
    alpha = torch.randn(2, 3, dtype=F64)
    eye = torch.eye(dim, dtype=F64)
    expected = layout.to_dense(data) + alpha[..., None, None] * eye
    layout.add_identity_(data, alpha)
    close(layout.to_dense(data), expected)


@pytest.mark.parametrize("name,opts,dim", FEW_CASES)
def test_batch_dims(name, opts, dim):
    """A (2, 3) batch of storages gives the same as a loop over its elements."""
    layout = make(name, opts, dim)
    a, b = rand_data(layout, 2, 3), rand_data(layout, 2, 3)
    x, sym = torch.randn(2, 3, dim, 4, dtype=F64), rand_sym(dim, 2, 3)
    batched = {
        "to_dense": layout.to_dense(a),
        "project": layout.project(sym),
        "matmul": layout.matmul(a, x),
        "matmul_t": layout.matmul(a, x, transpose=True),
        "matmul_outer": layout.matmul_outer(a, x),
        "matmul_outer_t": layout.matmul_outer(a, x.mT.contiguous().mT),
        "compose": layout.compose(a, b),
        "project_outer": layout.project_outer(x),
        "project_gram": layout.project_gram(a, x),
        "project_self_gram": layout.project_self_gram(a),
        "diagonal": layout.diagonal(a),
        "average_trace": layout.average_trace(a),
        "max_abs": layout.max_abs(a),
    }
    for i in range(2):
        for j in range(3):
            ai, bi, xi = a[i, j], b[i, j], x[i, j]
            single = {
                "to_dense": layout.to_dense(ai),
                "project": layout.project(sym[i, j]),
                "matmul": layout.matmul(ai, xi),
                "matmul_t": layout.matmul(ai, xi, transpose=True),
                "matmul_outer": layout.matmul_outer(ai, xi),
                "matmul_outer_t": layout.matmul_outer(ai, xi),
                "compose": layout.compose(ai, bi),
                "project_outer": layout.project_outer(xi),
                "project_gram": layout.project_gram(ai, xi),
                "project_self_gram": layout.project_self_gram(ai),
                "diagonal": layout.diagonal(ai),
                "average_trace": layout.average_trace(ai),
                "max_abs": layout.max_abs(ai),
            }
            for key, value in single.items():
                close(batched[key][i, j], value, msg=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,opts,dim", [c for c in CASES if c.values[2] == 33])
def test_low_precision(name, opts, dim, dtype):
    """Half-precision results are close to float64 on the same (rounded) inputs."""
    layout = make(name, opts, dim)
    # Round the inputs first, so only the computation's error is measured.
    a, b = rand_data(layout, dtype=dtype), rand_data(layout, dtype=dtype)
    x, sym = torch.randn(dim, 4, dtype=dtype), rand_sym(dim).to(dtype)
    ops = {
        "to_dense": lambda a, b, x, s: layout.to_dense(a),
        "project": lambda a, b, x, s: layout.project(s),
        "matmul": lambda a, b, x, s: layout.matmul(a, x),
        "matmul_t": lambda a, b, x, s: layout.matmul(a, x, transpose=True),
        "matmul_outer": lambda a, b, x, s: layout.matmul_outer(a, x),
        "compose": lambda a, b, x, s: layout.compose(a, b),
        "project_outer": lambda a, b, x, s: layout.project_outer(x),
        "project_gram": lambda a, b, x, s: layout.project_gram(a, x),
        "project_self_gram": lambda a, b, x, s: layout.project_self_gram(a),
        "diagonal": lambda a, b, x, s: layout.diagonal(a),
        "average_trace": lambda a, b, x, s: layout.average_trace(a),
    }
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for key, op in ops.items():
        low = op(a, b, x, sym)
        ref = op(a.double(), b.double(), x.double(), sym.double())
        assert low.dtype == dtype, key
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(low.double(), ref, rtol=0, atol=tol * scale, msg=key)
    data = layout.identity(dtype=dtype)
    layout.add_identity_(data, 0.5)
    assert data.dtype == dtype
    close(layout.to_dense(data).double(), 1.5 * torch.eye(dim, dtype=F64))


# ------------------------------------------------------- layout specifics
def test_block_diagonal_storage_order():
    layout = make("block_diagonal", {"block_size": 3}, 8)  # two 3×3 blocks + 2×2
    assert layout.numel == 2 * 9 + 4
    dense = layout.to_dense(torch.arange(layout.numel, dtype=F64))
    close(dense[:3, :3], torch.arange(9, dtype=F64).reshape(3, 3))
    close(dense[3:6, 3:6], torch.arange(9, 18, dtype=F64).reshape(3, 3))
    close(dense[6:, 6:], torch.arange(18, 22, dtype=F64).reshape(2, 2))


@pytest.mark.parametrize("name,kw", [("block_diagonal", {"block_size": 0}),
                                     ("block_diagonal", {"block_size": 2.5}),
                                     ("hierarchical", {"k1": -1}),
                                     ("hierarchical", {"k2": -2})])
def test_invalid_options(name, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        STRUCTURES[name](10, **kw)


@pytest.mark.parametrize(
    "dim,sizes", [(5, (5, 0, 0)), (9, (6, 0, 3)), (20, (6, 10, 4))]
)
def test_hierarchical_edge_case_sizes(dim, sizes):
    layout = make("hierarchical", {"k1": 6, "k2": 4}, dim)
    k1, m, k2 = sizes
    assert layout.numel == k1 * k1 + k1 * m + k1 * k2 + m + k2 * m + k2 * k2


# ------------------------------------------------------ memory / complexity
SPARSE = [
    pytest.param(name, opts, id=name)
    for name, opts in CONFIGS
    if name not in ("dense", "tril", "triu") and opts.get("block_size", 30) == 30
    and opts.get("k1", 15) == 15
]


@pytest.mark.parametrize("name,opts", SPARSE)
def test_huge_dim_runs_without_dense_intermediate(name, opts):
    """At d = 2**16 a dense d×d float64 would take 32 GiB; every op must still run."""
    dim = 2**16
    layout = make(name, opts, dim)
    a, b = rand_data(layout), rand_data(layout)
    x = torch.randn(dim, 8, dtype=F64)
    assert layout.project_outer(x).shape == (layout.numel,)
    assert layout.project_gram(a, x).shape == (layout.numel,)
    assert layout.project_self_gram(a).shape == (layout.numel,)
    assert layout.compose(a, b).shape == (layout.numel,)
    assert layout.matmul(a, x, transpose=True).shape == (dim, 8)
    assert layout.average_trace(layout.add_identity_(a, 1.0)).shape == ()


@pytest.mark.parametrize("name", ["diagonal", "tril_toeplitz", "triu_toeplitz"])
def test_no_large_allocation(name):
    """No single allocation is anywhere near d×d (profiled at d = 4096)."""
    from torch.profiler import ProfilerActivity, profile

    dim = 4096
    layout = make(name, {}, dim)
    a, x = rand_data(layout, dtype=torch.float32), torch.randn(dim, 8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layout.project_outer(x)
        layout.project_gram(a, x)
        layout.project_self_gram(a)
        layout.matmul(a, x)
        layout.compose(a, a)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < dim * dim * 4 / 64
