"""Data files are data, not code: CIFAR-100's pickles are unpickled only after
their MD5 matches, and the CIFAR-100 and ImageWoof archives (hand-placed or
downloaded, MD5-checked or not) never write outside ``data_dir``."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import calculate_md5

from singd_lightning.data import CIFAR100DataModule, DatasetNotFoundError, ImageWoofDataModule
from singd_lightning.data import cifar100 as cifar_module
from singd_lightning.data import imagewoof as woof_module
from singd_lightning.data.cifar100 import CheckedCIFAR100
from tests.data.test_data import write_fake_cifar100, write_fake_imagewoof


class _Touch:
    """Unpickling this object creates the file ``path`` (it stands for any code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def touching_pickle(marker: Path) -> bytes:
    """A pickle in the shape of a CIFAR-100 file whose loading creates ``marker``."""
    entry = {"data": _Touch(marker), "fine_labels": [0], "fine_label_names": []}
    return pickle.dumps(entry, protocol=2)


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    pickle.loads(touching_pickle(tmp_path / "proof"))
    assert (tmp_path / "proof").is_file()  # so the marker tests below are not vacuous


def test_default_checksums_are_the_official_ones() -> None:
    official = {name: md5 for name, md5 in CIFAR100.train_list + CIFAR100.test_list}
    official["meta"] = CIFAR100.meta["md5"]
    assert cifar_module.CIFAR100_FILE_MD5S == official
    assert cifar_module.CIFAR100_MD5 == CIFAR100.tgz_md5


def test_unregistered_files_are_refused_by_default(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path, None)  # right format, but not the official files
    for call in (CIFAR100DataModule(tmp_path).prepare_data, CIFAR100DataModule(tmp_path).setup):
        with pytest.raises(DatasetNotFoundError, match="is not the official one") as info:
            call()
        message = str(info.value)
        assert str((tmp_path / "cifar-100-python" / "train").resolve()) in message
        assert cifar_module.CIFAR100_FILE_MD5S["train"] in message
        assert "Delete the folder" in message and "download=True" in message


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_hand_placed_malicious_pickle_is_not_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    write_fake_cifar100(tmp_path, monkeypatch)  # the other files pass their check
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-100-python" / name).write_bytes(touching_pickle(marker))
    dm = CIFAR100DataModule(tmp_path, num_workers=0, val_size=4)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError, match=f"python/{name}' is not the official"):
            call()
    assert not marker.exists()
    assert dm.train_set is None


def test_loader_itself_checks_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar100(tmp_path, monkeypatch)
    md5s = dict(cifar_module.CIFAR100_FILE_MD5S)
    loaded = CheckedCIFAR100(tmp_path, train=True, md5s=md5s)
    assert len(loaded) == 20 and loaded.classes[:2] == ["fine_0", "fine_1"]
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-100-python" / "meta").write_bytes(touching_pickle(marker))
    for train in (True, False):
        with pytest.raises(RuntimeError, match="not found or corrupted"):
            CheckedCIFAR100(tmp_path, train=train, md5s=md5s)
    assert not marker.exists()


def _cifar100_archive(
    path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[tarfile.TarInfo, ...] = ()
) -> Path:
    """A tiny ``cifar-100-python.tar.gz`` (official layout) whose sums are registered."""
    source = path.parent.parent / "cifar_src"  # beside, not inside, the archive's folder
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fake_cifar100(source, monkeypatch, n_train=12, n_test=4)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    monkeypatch.setattr(cifar_module, "CIFAR100_MD5", calculate_md5(path))
    return path


def test_cifar100_download_is_checked_and_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = _cifar100_archive(tmp_path / "server" / "cifar-100-python.tar.gz", monkeypatch)
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, md5))
        (Path(root) / filename).write_bytes(served.read_bytes())

    monkeypatch.setattr(cifar_module, "download_url", fake_download)
    data_dir = tmp_path / "data"
    dm = CIFAR100DataModule(data_dir, download=True, num_workers=0, val_size=2)
    dm.prepare_data()
    dm.setup()
    assert calls == [(CIFAR100.url, cifar_module.CIFAR100_MD5)]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 4)


def test_cifar100_download_that_leaves_no_archive_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar_module, "download_url", lambda *args, **kwargs: None)
    with pytest.raises(DatasetNotFoundError, match="the download did not produce"):
        CIFAR100DataModule(tmp_path, download=True).prepare_data()


def test_cifar100_archive_escaping_data_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = tarfile.TarInfo("cifar-100-python/../../evil")
    evil.size = 1
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _cifar100_archive(data_dir / "cifar-100-python.tar.gz", monkeypatch, (evil,))  # MD5 matches
    refused = r"'cifar-100-python/\.\./\.\./evil' has a '\.\.' component"
    with pytest.raises(DatasetNotFoundError, match=refused):
        CIFAR100DataModule(data_dir).prepare_data()
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-100-python.tar.gz"]


def _imagewoof_archive(path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    source = path.parent.parent / "woof_src"  # beside, not inside, the archive's folder
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fake_imagewoof(source, n_train=1, n_val=1)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "imagewoof2-160", arcname="imagewoof2-160")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _evil_members(outside: Path) -> dict[str, tuple[list, str]]:
    parent = tarfile.TarInfo("../evil")
    parent.size = 4
    absolute = tarfile.TarInfo(str(outside / "evil"))
    absolute.size = 4
    link = tarfile.TarInfo("imagewoof2-160/train/escape")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    through = tarfile.TarInfo("imagewoof2-160/train/escape/evil")
    through.size = 4
    return {
        "parent": ([(parent, b"evil")], "'../evil' has a '..' component"),
        "absolute": ([(absolute, b"evil")], "is an absolute path"),
        "symlink": ([(link, None), (through, b"evil")], "is a symbolic link"),
    }


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink"])
def test_imagewoof_unchecked_archive_cannot_escape(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members, message = _evil_members(outside)[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _imagewoof_archive(data_dir / "imagewoof2-160.tgz", members)
    dm = ImageWoofDataModule(data_dir, md5=None)  # no MD5 check: the extraction must hold
    with pytest.raises(DatasetNotFoundError, match=message):
        dm.prepare_data()
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["imagewoof2-160.tgz"]  # nothing extracted


@pytest.mark.parametrize("evil", [False, True])
def test_imagewoof_download_is_extracted_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil: bool
) -> None:
    extra = _evil_members(tmp_path)["parent"][0] if evil else []
    served = _imagewoof_archive(tmp_path / "server" / "imagewoof2-160.tgz", extra)

    def fake_download(url: str, root: str, filename: str, md5: str | None) -> None:
        assert url == woof_module.IMAGEWOOF_URL and md5 is None
        (Path(root) / filename).write_bytes(served.read_bytes())

    monkeypatch.setattr(woof_module, "download_url", fake_download)
    dm = ImageWoofDataModule(tmp_path / "data", download=True, md5=None, image_size=32, val_size=2)
    if evil:
        with pytest.raises(DatasetNotFoundError, match="'../evil' has a '..' component"):
            dm.prepare_data()
        assert not (tmp_path / "evil").exists()
        assert not (tmp_path / "data" / "imagewoof2-160").exists()
    else:
        dm.setup()
        assert len(dm.test_set) == 10 and dm.classes == sorted(woof_module.IMAGEWOOF_CLASSES)
