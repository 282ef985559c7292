"""Cora (Sen et al., 2008) in the Planetoid split (Yang et al., 2016): 2708
publications, 1433 bag-of-words features, 7 classes, 5278 citation links.

The raw files are Planetoid's (``ind.cora.{x,tx,allx,y,ty,ally,graph,test.index}``
from https://github.com/kimiyoung/planetoid), the ones every GCN paper and
torch_geometric's ``Planetoid`` read. The standard public split: the 140 nodes of
``x`` train, the next 500 validate, the 1000 of ``test.index`` test.

**Reading the files safely.** Seven of them are Python pickles, and unpickling can
run arbitrary code. So (1) every file's SHA-256 must match the pinned value before
it is read (a download is checked before it is kept), and (2) even then it is read
by a restricted unpickler that resolves only the names these files use — NumPy's
array reconstruction, ``collections.defaultdict``, ``list`` and the latin-1 encoding of
strings to bytes — and maps SciPy's
``csr_matrix`` to a plain record of its arrays instead of importing SciPy: any other
name, or an array of Python objects, is refused. The checksums make the files the
known ones; the unpickler keeps a substituted file (or one given with other
checksums, as the tests do) from doing more than build arrays.

Training is full-batch and transductive: each loader yields one batch, the whole
graph ``((features, adjacency), targets)``, whose targets are the split's labels and
-100 (ignored by the loss and accuracy) for every other node. Features are
row-normalised and the adjacency is ``D^-1/2 (A + I) D^-1/2`` as a sparse tensor,
as in Kipf & Welling (2017).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from singd_lightning.data._common import DatasetNotFoundError, ImageClassificationDataModule

PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
#: Planetoid's raw files of Cora.
CORA_FILES: tuple[str, ...] = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
#: SHA-256 of each raw file at kimiyoung/planetoid's master (commit af6abf4).
CORA_SHA256: dict[str, str] = {
    "x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
    "ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
}
IGNORE_INDEX = -100


class PlanetoidFormatError(ValueError):
    """A Planetoid file holds something other than the arrays it should."""


class _SparseRows:
    """What SciPy's ``csr_matrix`` pickles into: its CSR arrays, nothing executed."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PlanetoidFormatError("a csr_matrix's state is not a dict")
        self.state = state

    def to_dense(self) -> np.ndarray:
        """The matrix as a dense float32 array."""
        try:
            data, indices, indptr = (np.asarray(self.state[k]) for k in ("data", "indices", "indptr"))
            shape = tuple(int(s) for s in self.state.get("_shape", self.state.get("shape")))
        except (KeyError, TypeError) as err:
            raise PlanetoidFormatError(f"a csr_matrix lacks its arrays ({err})") from err
        rows, cols = shape
        if len(indptr) != rows + 1 or indptr[-1] != len(indices) or len(indices) != len(data):
            raise PlanetoidFormatError("a csr_matrix's arrays do not fit together")
        if len(indices) and (indices.min() < 0 or indices.max() >= cols):
            raise PlanetoidFormatError("a csr_matrix has a column index out of range")
        dense = np.zeros(shape, dtype=np.float32)
        row_of = np.repeat(np.arange(rows), np.diff(indptr))
        np.add.at(dense, (row_of, indices), data.astype(np.float32))
        return dense


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes (latin-1),
    and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than of a str to latin-1")
    return text.encode("latin1")


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # NumPy 2; np.core before
    return (core if core is not None else np.core).multiarray._reconstruct


class _PlanetoidUnpickler(pickle.Unpickler):
    """Resolves only the names Planetoid's pickles use (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            ("scipy.sparse.csr", "csr_matrix"): lambda: _SparseRows,
            ("scipy.sparse._csr", "csr_matrix"): lambda: _SparseRows,
            ("collections", "defaultdict"): lambda: defaultdict,
            ("__builtin__", "list"): lambda: list,
            ("builtins", "list"): lambda: list,
            ("_codecs", "encode"): lambda: _latin1_bytes,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a Planetoid file")
        return allowed[module, name]()


def load_planetoid_pickle(data: bytes) -> Any:
    """Unpickle one Planetoid file with the restricted unpickler (Python 2 pickles:
    latin-1 strings). Arrays of Python objects are refused."""
    value = _PlanetoidUnpickler(io.BytesIO(data), encoding="latin1").load()
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise PlanetoidFormatError("an array of Python objects")
    if isinstance(value, _SparseRows):
        return value.to_dense()
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalized_adjacency(edges: np.ndarray, num_nodes: int) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of the undirected graph with ``edges`` ``(2, E)``, as a
    coalesced sparse COO tensor (a duplicate or reversed edge counts once; self-loops
    in ``edges`` are replaced by the one of ``I``)."""
    edges = edges[:, edges[0] != edges[1]]
    loops = np.arange(num_nodes)[None].repeat(2, axis=0)
    index = torch.from_numpy(np.concatenate([edges, edges[::-1], loops], axis=1).astype(np.int64))
    # coalescing sums duplicates; the entries of A + I are 1 whatever the multiplicity
    ones = torch.ones(index.shape[1])
    index = torch.sparse_coo_tensor(index, ones, (num_nodes, num_nodes), check_invariants=True).coalesce().indices()
    row, col = index
    scale = torch.bincount(row, minlength=num_nodes).double().rsqrt().float()
    return torch.sparse_coo_tensor(
        index, scale[row] * scale[col], (num_nodes, num_nodes), is_coalesced=True, check_invariants=True
    )


class GraphDataset(Dataset):
    """One item: the whole graph ``((features, adjacency), targets)``."""

    def __init__(self, features: Tensor, adjacency: Tensor, targets: Tensor) -> None:
        self.item = ((features, adjacency), targets)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        if i != 0:
            raise IndexError(i)
        return self.item


class CoraDataModule(ImageClassificationDataModule):
    """Cora in Planetoid's public split, full-batch (one batch = the whole graph).

    ``num_classes`` and ``in_chans`` (features per node) are read from the files, so
    asking for them makes the files available first.

    Args:
        data_dir: Directory holding (or receiving) the folder ``planetoid``, with the
            files ``ind.cora.*``.
        download: Download missing files from Planetoid's GitHub repository.
        normalize_features: Divide each node's features by their sum (Kipf & Welling).
        checksums: SHA-256 per file name (``x``, ``tx``, ...); None: the pinned
            :data:`CORA_SHA256` of the real files. Every file is checked before it
            is read.
        num_workers: Loader worker processes (0: the graph is one tensor batch).
        pin_memory: Pin host memory in the loaders.

    Raises:
        ValueError: ``checksums`` is not a mapping with a SHA-256 for every file.
    """

    image_size = 0  # not an image data set: the app sizes the model by in_chans

    def __init__(
        self,
        data_dir: str | Path = "data",
        download: bool = False,
        normalize_features: bool = True,
        checksums: Mapping[str, str] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if checksums is not None:
            if not isinstance(checksums, Mapping) or set(checksums) != set(CORA_FILES):
                raise ValueError(
                    f"checksums must map every Planetoid file ({', '.join(CORA_FILES)}) to its SHA-256, "
                    f"got {checksums!r}."
                )
            if not all(isinstance(v, str) and len(v) == 64 for v in checksums.values()):
                raise ValueError("checksums: every value must be a SHA-256 as 64 hex digits.")
        super().__init__(batch_size=1, num_workers=num_workers, pin_memory=pin_memory)
        self.save_hyperparameters(ignore=["checksums"])
        self.data_dir = Path(data_dir)
        self.download = download
        self.normalize_features = normalize_features
        self.checksums = dict(checksums) if checksums is not None else dict(CORA_SHA256)
        self._graph: dict[str, Any] | None = None

    @property
    def folder(self) -> Path:
        """The folder of the raw files, ``data_dir/planetoid``."""
        return self.data_dir / "planetoid"

    def _path(self, name: str) -> Path:
        return self.folder / f"ind.cora.{name}"

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"Cora not found in '{self.folder.resolve()}' ({reason}). Put Planetoid's files "
            f"ind.cora.{{{','.join(CORA_FILES)}}} (from {PLANETOID_URL}) there, or set download=True "
            "on a machine with internet access."
        )

    def _read_verified(self, name: str) -> bytes:
        """The bytes of one raw file, downloaded if allowed, after its SHA-256 matched."""
        path = self._path(name)
        if not path.is_file():
            if not self.download:
                raise self._not_found(f"ind.cora.{name} is missing and download=False")
            data = self._fetch(name)
            if _sha256(data) != self.checksums[name]:
                raise self._not_found(f"the download of ind.cora.{name} has the wrong SHA-256")
            os.makedirs(self.folder, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)
            return data
        data = path.read_bytes()
        if _sha256(data) != self.checksums[name]:
            raise self._not_found(
                f"'{path}' is corrupted or another file: its SHA-256 differs from {self.checksums[name]}"
            )
        return data

    def _fetch(self, name: str) -> bytes:
        """Download one raw file (into memory; it is written only once verified)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{PLANETOID_URL}/ind.cora.{name}", timeout=60) as response:
                return response.read()
        except OSError as err:
            raise self._not_found(f"download failed: {err}") from err

    def prepare_data(self) -> None:
        for name in CORA_FILES:
            self._read_verified(name)

    def graph(self) -> dict[str, Any]:
        """The parsed graph: ``features``, ``adjacency``, ``labels`` and the three splits'
        node indices (``train``, ``val``, ``test``), read once.

        Raises:
            DatasetNotFoundError: A file is missing (and may not be downloaded) or has
                the wrong checksum.
            PlanetoidFormatError: A verified file does not hold what Planetoid's do.
        """
        if self._graph is None:
            raw = {name: self._read_verified(name) for name in CORA_FILES}
            self._graph = _parse_planetoid(raw, self.normalize_features)
        return self._graph

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return int(self.graph()["num_classes"])

    @property
    def in_chans(self) -> int:  # type: ignore[override]
        return int(self.graph()["features"].shape[1])

    @property
    def num_nodes(self) -> int:
        """Number of nodes of the graph (what marks this data module as a graph)."""
        return int(self.graph()["features"].shape[0])

    def _split(self, nodes: Tensor) -> GraphDataset:
        g = self.graph()
        targets = torch.full_like(g["labels"], IGNORE_INDEX)
        targets[nodes] = g["labels"][nodes]
        return GraphDataset(g["features"], g["adjacency"], targets)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = self.graph()
        self.train_set = self._split(g["train"])
        self.val_set = self._split(g["val"])
        self.test_set = self._split(g["test"])

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        # batch_size=None: the item is the batch (the whole graph), not stacked
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)


def _parse_planetoid(raw: Mapping[str, bytes], normalize_features: bool) -> dict[str, Any]:
    """Planetoid's files to tensors, as the GCN reference code assembles them."""
    try:
        x, tx, allx = (np.asarray(load_planetoid_pickle(raw[k]), dtype=np.float32) for k in ("x", "tx", "allx"))
        y, ty, ally = (np.asarray(load_planetoid_pickle(raw[k])) for k in ("y", "ty", "ally"))
        graph = load_planetoid_pickle(raw["graph"])
        test_index = np.array([int(line) for line in raw["test.index"].decode("ascii").split()], dtype=np.int64)
    except (pickle.UnpicklingError, UnicodeDecodeError, ValueError, EOFError, TypeError) as err:
        raise PlanetoidFormatError(f"Planetoid files unreadable: {err}") from err
    if not isinstance(graph, dict):
        raise PlanetoidFormatError("ind.cora.graph is not a dict of neighbour lists")
    for name, a in (("x", x), ("tx", tx), ("allx", allx), ("y", y), ("ty", ty), ("ally", ally)):
        if a.ndim != 2:
            raise PlanetoidFormatError(f"ind.cora.{name} is not a matrix")
    num_train, num_features, num_classes = x.shape[0], x.shape[1], y.shape[1]
    if not (allx.shape[0] == ally.shape[0] and tx.shape[0] == ty.shape[0] == len(test_index)
            and allx.shape[1] == tx.shape[1] == num_features and ally.shape[1] == ty.shape[1] == num_classes
            and num_train <= allx.shape[0]):  # fmt: skip
        raise PlanetoidFormatError("the shapes of the Planetoid files do not fit together")
    num_nodes = allx.shape[0] + tx.shape[0]
    if len(test_index) and (test_index.min() < allx.shape[0] or test_index.max() >= num_nodes):
        raise PlanetoidFormatError("ind.cora.test.index has a node outside the test rows")
    # Row i of tx/ty is node test.index[i]; stacked under allx it sits at the i-th
    # smallest test node, so move it to its node (as Kipf's and PyG's loaders do).
    features, labels = np.concatenate([allx, tx]), np.concatenate([ally, ty]).argmax(axis=1)
    order = np.sort(test_index)
    features[test_index], labels[test_index] = features[order], labels[order]
    if normalize_features:
        sums = features.sum(axis=1, keepdims=True)
        features = features / np.where(sums == 0, 1.0, sums)
    edges = [(int(a), int(b)) for a, neighbours in graph.items() for b in neighbours]
    edge_array = np.array(edges, dtype=np.int64).T.reshape(2, -1)
    if edge_array.size and (edge_array.min() < 0 or edge_array.max() >= num_nodes):
        raise PlanetoidFormatError("ind.cora.graph links a node that does not exist")
    val_end = min(num_train + 500, allx.shape[0])
    return {
        "features": torch.from_numpy(features),
        "adjacency": normalized_adjacency(edge_array, num_nodes),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "num_classes": num_classes,
        "train": torch.arange(num_train),
        "val": torch.arange(num_train, val_end),
        "test": torch.from_numpy(order),
    }


__all__ = ["CORA_FILES", "CORA_SHA256", "CoraDataModule", "PlanetoidFormatError", "load_planetoid_pickle"]
