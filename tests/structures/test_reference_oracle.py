"""Agreement with the published reference package ``singd`` 0.0.5 (float64).

For the same random symmetric matrices: the reference's ``from_dense`` equals our
``project``, its ``from_inner(X)`` our ``project_gram``, its ``from_inner()`` our
``project_self_gram``, and its ``@`` our ``compose``/``matmul``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from singd_lightning.structures import STRUCTURES

ref = pytest.importorskip("singd.structures")
from singd.structures.blockdiagonal import (  # noqa: E402
    Block3DiagonalMatrix,
    Block30DiagonalMatrix,
)
from singd.structures.dense import DenseMatrix  # noqa: E402
from singd.structures.diagonal import DiagonalMatrix  # noqa: E402
from singd.structures.hierarchical import (  # noqa: E402
    Hierarchical3_2Matrix,
    Hierarchical15_15Matrix,
)
from singd.structures.trilbottomrightdiag import (  # noqa: E402
    TrilBottomRightDiagonalMatrix,
)
from singd.structures.triltoeplitz import TrilToeplitzMatrix  # noqa: E402
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix  # noqa: E402
from singd.structures.triubottomrightdiag import (  # noqa: E402
    TriuBottomRightDiagonalMatrix,
)
from singd.structures.triutoeplitz import TriuToeplitzMatrix  # noqa: E402
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix  # noqa: E402

F64 = torch.float64
PAIRS = [
    ("dense", {}, DenseMatrix),
    ("diagonal", {}, DiagonalMatrix),
    ("block_diagonal", {"block_size": 30}, Block30DiagonalMatrix),
    ("block_diagonal", {"block_size": 3}, Block3DiagonalMatrix),
    ("hierarchical", {"k1": 15, "k2": 15}, Hierarchical15_15Matrix),
    ("hierarchical", {"k1": 3, "k2": 2}, Hierarchical3_2Matrix),
    ("tril_toeplitz", {}, TrilToeplitzMatrix),
    ("triu_toeplitz", {}, TriuToeplitzMatrix),
    ("tril_bottom_right_diagonal", {}, TrilBottomRightDiagonalMatrix),
    ("tril_top_left_diagonal", {}, TrilTopLeftDiagonalMatrix),
    ("triu_bottom_right_diagonal", {}, TriuBottomRightDiagonalMatrix),
    ("triu_top_left_diagonal", {}, TriuTopLeftDiagonalMatrix),
]
CASES = [
    pytest.param(name, opts, cls, dim, id=f"{cls.__name__}-d{dim}")
    for name, opts, cls in PAIRS
    for dim in (1, 2, 7, 20, 37)
]


@pytest.fixture(autouse=True)
def _reference_accepts_float64(monkeypatch):
    """The reference gates some products on a dtype list without float64; widen
    that list (a dtype check only, the math is untouched) to compare in float64."""
    order = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

    def lowest_precision(*dtypes):
        return order[min(order.index(d) for d in dtypes)]

    for module in ("blockdiagonal", "hierarchical", "triltoeplitz", "triutoeplitz"):
        target = f"singd.structures.{module}.lowest_precision"
        monkeypatch.setattr(target, lowest_precision)


def rand_sym(dim: int) -> torch.Tensor:
    a = torch.randn(dim, dim, dtype=F64)
    return (a + a.T) / 2


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,opts,cls,dim", CASES)
def test_matches_reference(name, opts, cls, dim):
    torch.manual_seed(dim)
    layout = STRUCTURES[name](dim, **opts)
    sym1, sym2, x = rand_sym(dim), rand_sym(dim), torch.randn(dim, 6, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns on naive fallbacks
        ref1, ref2 = cls.from_dense(sym1), cls.from_dense(sym2)
        a, b = layout.project(sym1), layout.project(sym2)
        close(layout.to_dense(a), ref1.to_dense())
        gram = layout.project_gram(a, x)
        close(layout.to_dense(gram), ref1.from_inner(x).to_dense())
        self_gram = layout.project_self_gram(a)
        close(layout.to_dense(self_gram), ref1.from_inner().to_dense())
        close(layout.to_dense(layout.compose(a, b)), (ref1 @ ref2).to_dense())
        close(layout.matmul(a, x), ref1 @ x)
        close(layout.matmul(a, x, transpose=True), ref1.rmatmat(x))
        close(layout.average_trace(a), ref1.average_trace())
