"""Structured matrices for the Kronecker factors (SPEC §2).

Use :func:`resolve_structure` to turn a user-facing name (or a mapping with a
``name`` key and options) into a :class:`StructureFactory`, which builds a
:class:`Structure` for a given dimension::

    factory = resolve_structure({"name": "block_diagonal", "block_size": 16})
    layout = factory(100)            # BlockDiagonal(dim=100, block_size=16)
    data = layout.identity()         # flat storage of the identity
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Union

from singd_lightning.structures.base import Structure
from singd_lightning.structures.block_diagonal import BlockDiagonal
from singd_lightning.structures.dense import Dense
from singd_lightning.structures.diagonal import Diagonal
from singd_lightning.structures.hierarchical import Hierarchical
from singd_lightning.structures.rank_one import (
    TrilBottomRightDiagonal,
    TrilTopLeftDiagonal,
    TriuBottomRightDiagonal,
    TriuTopLeftDiagonal,
)
from singd_lightning.structures.toeplitz import TrilToeplitz, TriuToeplitz
from singd_lightning.structures.triangular import Tril, Triu

STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls
    for cls in (
        Dense,
        Diagonal,
        BlockDiagonal,
        Hierarchical,
        Tril,
        Triu,
        TrilToeplitz,
        TriuToeplitz,
        TrilTopLeftDiagonal,
        TrilBottomRightDiagonal,
        TriuTopLeftDiagonal,
        TriuBottomRightDiagonal,
    )
}

# Names used by the published reference package ``singd`` (and obvious spellings).
_PLAIN_ALIASES = {
    "triltoeplitz": "tril_toeplitz",
    "triutoeplitz": "triu_toeplitz",
    "triltopleftdiag": "tril_top_left_diagonal",
    "trilbottomrightdiag": "tril_bottom_right_diagonal",
    "triutopleftdiag": "triu_top_left_diagonal",
    "triubottomrightdiag": "triu_bottom_right_diagonal",
    "blockdiagonal": "block_diagonal",
}
_SIZED_ALIASES: list[tuple[re.Pattern, str, tuple[str, ...]]] = [
    (re.compile(r"block(\d+)diagonal"), "block_diagonal", ("block_size",)),
    (re.compile(r"hierarchical(\d+)_(\d+)"), "hierarchical", ("k1", "k2")),
]

StructureSpec = Union[str, Mapping[str, Any], "StructureFactory"]


class StructureFactory:
    """A structure name with its options; call it with a dimension to get a layout.

    Args:
        name: Canonical structure name (a key of :data:`STRUCTURES`).
        **options: Size options of the structure (``block_size``; ``k1``, ``k2``).
    """

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.options = dict(options)
        cls = STRUCTURES[name]
        # Fail now, not at the first layer, on options the structure does not take.
        cls(1, **self.options)

    def __call__(self, dim: int) -> Structure:
        return STRUCTURES[self.name](dim, **self.options)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"StructureFactory({self.name!r}{opts})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StructureFactory)
            and self.name == other.name
            and self.options == other.options
        )

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.options.items()))))


def structure_names() -> list[str]:
    """Canonical structure names followed by the accepted aliases."""
    return [*STRUCTURES, *_PLAIN_ALIASES, "block{N}diagonal", "hierarchical{K1}_{K2}"]


def resolve_structure(spec: StructureSpec) -> StructureFactory:
    """Turn a structure specification into a :class:`StructureFactory`.

    Args:
        spec: A name (``"diagonal"``, ``"block_diagonal"``, or a reference-package
            alias such as ``"block30diagonal"``), a mapping with a ``name`` key and
            options (``{"name": "hierarchical", "k1": 8, "k2": 8}``), or a factory.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones) or an
            invalid option.
    """
    if isinstance(spec, StructureFactory):
        return spec
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(
                f"A structure given as a mapping needs a 'name' key, got {dict(spec)}."
            )
        spec = options.pop("name")
    if not isinstance(spec, str):
        raise ValueError(
            f"structure must be a name or a mapping with a 'name' key, got {spec!r}. "
            f"Valid names: {', '.join(structure_names())}."
        )
    key = spec.strip().lower().replace("-", "_")
    key = _PLAIN_ALIASES.get(key, key)
    if key not in STRUCTURES:
        for pattern, name, option_names in _SIZED_ALIASES:
            match = pattern.fullmatch(key)
            if match:
                sized = dict(zip(option_names, map(int, match.groups())))
                return StructureFactory(name, **{**sized, **options})
        raise ValueError(
            f"Unknown structure {spec!r}. Valid names: {', '.join(structure_names())}."
        )
    try:
        return StructureFactory(key, **options)
    except TypeError as err:
        raise ValueError(f"Invalid options {options} for structure {key!r}: {err}")


__all__ = [
    "STRUCTURES",
    "Structure",
    "StructureFactory",
    "StructureSpec",
    "resolve_structure",
    "structure_names",
    "Dense",
    "Diagonal",
    "BlockDiagonal",
    "Hierarchical",
    "Tril",
    "Triu",
    "TrilToeplitz",
    "TriuToeplitz",
    "TrilTopLeftDiagonal",
    "TrilBottomRightDiagonal",
    "TriuTopLeftDiagonal",
    "TriuBottomRightDiagonal",
]
