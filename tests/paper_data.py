"""Small on-disk data sets in the formats of the paper's data: Planetoid's Cora files
and an ImageFolder tree (ImageNet-100's layout)."""

from __future__ import annotations

import hashlib
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np

#: Sizes of the fake Planetoid graph: 6 training nodes, 4 more rows of allx (the
#: validation nodes), 5 test nodes; 8 features, 3 classes.
PLANETOID_SIZES = {"train": 6, "allx": 10, "test": 5, "features": 8, "classes": 3}


def write_planetoid(folder: Path, seed: int = 0) -> dict[str, str]:
    """Write ``ind.cora.*`` for a 15-node graph as Planetoid stores Cora (protocol-2
    pickles of SciPy CSR matrices, one-hot label arrays, a ``defaultdict`` of
    neighbour lists; ``test.index`` shuffled, row i of ``tx`` its node i).

    Returns:
        The SHA-256 of each file, by its Planetoid name.
    """
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    s = PLANETOID_SIZES
    n = s["allx"] + s["test"]
    features = (rng.random((n, s["features"])) < 0.4).astype(np.float32)
    features[:, 0] = 1.0  # no empty row
    labels = np.arange(n) % s["classes"]
    onehot = np.eye(s["classes"], dtype=np.int64)[labels]
    test_index = rng.permutation(np.arange(s["allx"], n))
    graph: defaultdict[int, list[int]] = defaultdict(list)
    for a in range(n):
        graph[a].append((a + 1) % n)  # a ring, plus a duplicate and a self-loop
    graph[0].append(1)
    graph[2].append(2)
    files = {
        "x": csr_matrix(features[: s["train"]]),
        "y": onehot[: s["train"]],
        "allx": csr_matrix(features[: s["allx"]]),
        "ally": onehot[: s["allx"]],
        # row i of tx/ty is node test.index[i]
        "tx": csr_matrix(features[test_index]),
        "ty": onehot[test_index],
        "graph": graph,
    }
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, value in files.items():
        data = pickle.dumps(value, protocol=2)
        (folder / f"ind.cora.{name}").write_bytes(data)
        checksums[name] = hashlib.sha256(data).hexdigest()
    text = "".join(f"{i}\n" for i in test_index).encode()
    (folder / "ind.cora.test.index").write_bytes(text)
    checksums["test.index"] = hashlib.sha256(text).hexdigest()
    return checksums


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int], size: int = 40) -> None:
    """Write ``root/<split>/<class>/<i>.png`` (and a JPEG per class) with coloured
    noise, ``per_class[split]`` images per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((size, size + 4, 3)) * 80 + 40 * c).clip(0, 255).astype(np.uint8)
                suffix = "JPEG" if i == 0 else "png"
                Image.fromarray(pixels).save(folder / f"{i}.{suffix}", format="JPEG" if i == 0 else "PNG")
