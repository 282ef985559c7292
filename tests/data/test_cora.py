"""Cora through Planetoid's raw files: checksums before reading, a restricted
unpickler, the standard split, the normalised adjacency, full-batch loaders.

The graph is a 15-node one the tests write in Planetoid's file format."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from singd_lightning.data import DATAMODULES, DatasetNotFoundError
from singd_lightning.data.cora import (
    CORA_FILES,
    CORA_SHA256,
    CoraDataModule,
    PlanetoidFormatError,
    load_planetoid_pickle,
)
from tests.paper_data import PLANETOID_SIZES, write_planetoid


@pytest.fixture
def cora(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``(data_dir, checksums)`` of the small graph."""
    return tmp_path, write_planetoid(tmp_path / "planetoid")


def test_registered_and_the_real_files_pinned() -> None:
    assert DATAMODULES["cora"] is CoraDataModule
    assert set(CORA_SHA256) == set(CORA_FILES) and all(len(v) == 64 for v in CORA_SHA256.values())


def test_split_labels_and_features(cora: tuple[Path, dict[str, str]]) -> None:
    root, checksums = cora
    dm = CoraDataModule(root, checksums=checksums, normalize_features=False)
    s = PLANETOID_SIZES
    assert (dm.num_classes, dm.in_chans, dm.num_nodes) == (s["classes"], s["features"], s["allx"] + s["test"])
    graph = dm.graph()
    assert graph["train"].tolist() == list(range(6))
    assert graph["val"].tolist() == list(range(6, 10))  # the 500 after the training nodes, here all of allx's rest
    assert graph["test"].tolist() == list(range(10, 15))
    # test.index puts every row of tx at its node: node i has label i % 3
    assert graph["labels"].tolist() == [i % 3 for i in range(15)]
    assert set(graph["features"].unique().tolist()) <= {0.0, 1.0}
    rows = CoraDataModule(root, checksums=checksums).graph()["features"].sum(dim=1)
    torch.testing.assert_close(rows, torch.ones(15))  # row-normalised by default


def test_adjacency_is_the_symmetrically_normalised_graph_with_self_loops(cora: tuple[Path, dict[str, str]]) -> None:
    root, checksums = cora
    adjacency = CoraDataModule(root, checksums=checksums).graph()["adjacency"]
    assert adjacency.is_sparse and adjacency.is_coalesced()
    # the ring (its duplicate edge and self-loop count once) plus the identity
    ring = torch.zeros(15, 15)
    for a in range(15):
        ring[a, (a + 1) % 15] = ring[(a + 1) % 15, a] = 1.0
    dense = ring + torch.eye(15)
    scale = dense.sum(1).rsqrt()
    torch.testing.assert_close(adjacency.to_dense(), scale[:, None] * dense * scale[None])


def test_loaders_yield_the_whole_graph_with_the_other_nodes_masked(cora: tuple[Path, dict[str, str]]) -> None:
    root, checksums = cora
    dm = CoraDataModule(root, checksums=checksums)
    dm.prepare_data()
    dm.setup("fit")
    for loader, nodes in ((dm.train_dataloader(), range(6)), (dm.val_dataloader(), range(6, 10)),
                          (dm.test_dataloader(), range(10, 15))):  # fmt: skip
        batches = list(loader)
        assert len(batches) == 1
        (features, adjacency), targets = batches[0]
        assert features.shape == (15, 8) and adjacency.shape == (15, 15) and targets.shape == (15,)
        labelled = (targets != -100).nonzero().flatten().tolist()
        assert labelled == list(nodes)
        assert targets[labelled].tolist() == [i % 3 for i in nodes]


def test_a_file_with_the_wrong_checksum_is_never_unpickled(cora: tuple[Path, dict[str, str]], monkeypatch) -> None:
    root, _ = cora
    loads = []
    monkeypatch.setattr("singd_lightning.data.cora.load_planetoid_pickle", lambda data: loads.append(data))
    # the pinned checksums are those of the real Cora: these files fail them
    with pytest.raises(DatasetNotFoundError, match=r"ind\.cora\.x' is corrupted or another file: its SHA-256"):
        CoraDataModule(root).graph()
    assert loads == []


class _Payload:
    """Pickles into a call of ``os.system``."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_other_names_even_with_matching_checksums(
    cora: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, checksums = cora
    monkeypatch.chdir(root)
    evil = pickle.dumps(_Payload(), protocol=2)
    (root / "planetoid" / "ind.cora.graph").write_bytes(evil)
    checksums["graph"] = hashlib.sha256(evil).hexdigest()
    with pytest.raises(PlanetoidFormatError, match=r"refused to load posix\.system|refused to load os\.system"):
        CoraDataModule(root, checksums=checksums).graph()
    assert not (root / "pwned").exists()
    with pytest.raises(PlanetoidFormatError, match="array of Python objects"):
        load_planetoid_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))


def test_missing_files_and_downloads(cora: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, checksums = cora
    stored = {name: (root / "planetoid" / f"ind.cora.{name}").read_bytes() for name in CORA_FILES}
    target = root / "fresh"
    with pytest.raises(DatasetNotFoundError, match="ind.cora.x is missing and download=False"):
        CoraDataModule(target, checksums=checksums).graph()
    fetched = []

    def fetch(self: CoraDataModule, name: str) -> bytes:
        fetched.append(name)
        return b"tampered" if name == "ty" else stored[name]

    monkeypatch.setattr(CoraDataModule, "_fetch", fetch)
    dm = CoraDataModule(target, download=True, checksums=checksums)
    with pytest.raises(DatasetNotFoundError, match="the download of ind.cora.ty has the wrong SHA-256"):
        dm.prepare_data()
    assert not (target / "planetoid" / "ind.cora.ty").exists()  # a bad download is not kept
    assert (target / "planetoid" / "ind.cora.x").read_bytes() == stored["x"]  # verified ones are
    monkeypatch.setattr(CoraDataModule, "_fetch", lambda self, name: stored[name])
    assert CoraDataModule(target, download=True, checksums=checksums).num_classes == 3
    assert fetched[:3] == ["x", "tx", "allx"]


@pytest.mark.parametrize(
    "checksums", [{"x": "0" * 64}, {name: "abc" for name in CORA_FILES}, ["x"]], ids=["missing", "short", "list"]
)
def test_bad_checksums_argument(checksums: object) -> None:
    with pytest.raises(ValueError, match="checksums"):
        CoraDataModule(checksums=checksums)  # type: ignore[arg-type]
