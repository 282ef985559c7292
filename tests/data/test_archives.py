"""Safe tar extraction: every member is checked before anything is written, and
nothing can land outside the target directory."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from singd_lightning.data._archives import ArchiveRefusedError, extract_tar_safely


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a gzip-compressed tar archive with exactly ``members`` (no normalisation)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_extracts_files_folders_and_internal_hard_links(tmp_path: Path) -> None:
    archive = write_tar(
        tmp_path / "good.tar.gz",
        [
            _special("./", tarfile.DIRTYPE),
            _special("./set/", tarfile.DIRTYPE),
            _file("./set/./a.txt", b"alpha", mode=0o4777),  # setuid, world-writable
            _file("set/locked.txt", b"beta", mode=0o000),
            _special("set/a_again.txt", tarfile.LNKTYPE, linkname="set/a.txt"),
        ],
    )
    target = tmp_path / "out"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    extract_tar_safely(archive, target)
    assert _all_files(target) == ["set", "set/a.txt", "set/a_again.txt", "set/locked.txt"]
    assert (target / "set" / "a_again.txt").read_bytes() == b"alpha"
    mode = stat.S_IMODE((target / "set" / "a.txt").stat().st_mode)
    assert not mode & (stat.S_ISUID | stat.S_IWGRP | stat.S_IWOTH)
    assert stat.S_IMODE((target / "set" / "locked.txt").stat().st_mode) & 0o600 == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # "./" leaves the target alone


REFUSED = {
    "parent": ([_file("../evil")], "'../evil' has a '..' component"),
    "nested parent": ([_file("set/../../evil")], "'set/../../evil' has a '..' component"),
    "absolute": ([_file("{outside}/evil")], "is an absolute path"),
    "symlink out": (
        [_special("set/link", tarfile.SYMTYPE, "../.."), _file("set/link/evil")],
        "'set/link' is a symbolic link",
    ),
    "absolute symlink": ([_special("set/link", tarfile.SYMTYPE, "{outside}")], "symbolic link"),
    "hard link out": (
        [_special("set/evil", tarfile.LNKTYPE, "../../secret")],
        "has a '..' component",
    ),
    "absolute hard link": (
        [_special("set/evil", tarfile.LNKTYPE, "{outside}/secret")],
        "is an absolute path",
    ),
    "hard link to non-member": (
        [_special("set/evil", tarfile.LNKTYPE, "set/missing")],
        "not an earlier file of the archive",
    ),
    "char device": ([_special("set/dev", tarfile.CHRTYPE)], "device file"),
    "block device": ([_special("set/dev", tarfile.BLKTYPE)], "device file"),
    "fifo": ([_special("set/fifo", tarfile.FIFOTYPE)], "FIFO"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_unsafe_member_and_writes_nothing(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    bad, message = REFUSED[case]
    for info, _ in bad:
        info.name = info.name.format(outside=outside)
        info.linkname = info.linkname.format(outside=outside)
    good = [_special("set/", tarfile.DIRTYPE), _file("set/fine.txt")]
    archive = write_tar(tmp_path / "bad.tar.gz", [*good, *bad])
    target = tmp_path / "data" / "target"
    target.mkdir(parents=True)
    with pytest.raises(ArchiveRefusedError, match=message) as info:
        extract_tar_safely(archive, target)
    assert str(archive) in str(info.value)
    assert _all_files(target) == []  # not even the good members before the bad one
    assert _all_files(outside) == ["secret"] and (outside / "secret").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "data", "outside"]


def test_refuses_writing_through_a_symlink_already_on_disk(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "set").symlink_to(outside)
    archive = write_tar(tmp_path / "a.tar.gz", [_file("set/evil")])
    with pytest.raises(ArchiveRefusedError, match="'set/evil' would be written outside"):
        extract_tar_safely(archive, target)
    assert _all_files(outside) == []


@pytest.mark.parametrize("content", [b"not an archive", b""])
def test_refuses_what_is_not_a_tar_archive(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "junk.tgz"
    archive.write_bytes(content)
    with pytest.raises(ArchiveRefusedError, match="not a readable tar archive"):
        extract_tar_safely(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_truncated_archive(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar.gz", [_file("a", os.urandom(100_000)), _file("b")])
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ArchiveRefusedError, match="truncated or corrupted"):
        extract_tar_safely(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
