"""Safe extraction of the data sets' tar archives.

``tarfile.extractall`` writes wherever a member's name points: an absolute path,
a name with ``..`` components, a member written through a symbolic link or a
hard link to a file outside can all land outside the target directory. A
hand-placed or downloaded archive whose MD5 is not checked (ImageWoof with
``md5=None``) must not be able to do that, so :func:`extract_tar_safely` checks
every member first and extracts nothing unless all of them are safe.
"""

from __future__ import annotations

import copy
import gzip
import lzma
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath


class ArchiveRefusedError(ValueError):
    """An archive is not a tar file, or one of its members could escape the target."""


def _member_path(name: str, archive: Path, what: str) -> PurePosixPath:
    """The member's path relative to the target, ``PurePosixPath("")`` for the target itself.

    Raises:
        ArchiveRefusedError: If ``name`` is absolute or has a ``..`` component.
    """
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ArchiveRefusedError(
            f"'{archive}' was not extracted: {what} '{name}' is an absolute path"
        )
    if ".." in path.parts:
        raise ArchiveRefusedError(
            f"'{archive}' was not extracted: {what} '{name}' has a '..' component"
        )
    return PurePosixPath(*[part for part in path.parts if part != "."])


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_tar_members(archive: Path, tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    """Check every member of ``tar``; return those to extract, each with sanitised attributes.

    Allowed: regular files and directories whose names stay inside ``target`` (also
    after resolving symbolic links already on disk), and hard links to an earlier
    regular file of the archive. Refused: absolute names, ``..`` components, symbolic
    links (neither data set's archive has any, and one could redirect later writes or
    reads outside ``target``), device files, FIFOs and unknown member types. The copies
    returned belong to the current user and carry no setuid/setgid/sticky or
    group/other write bits.

    Raises:
        ArchiveRefusedError: Naming the archive and the first refused member.
    """
    root = os.path.realpath(target)
    files: set[PurePosixPath] = set()
    checked = []
    for member in tar.getmembers():
        path = _member_path(member.name, archive, "member")
        if not _inside(os.path.realpath(os.path.join(root, *path.parts)), root):
            raise ArchiveRefusedError(
                f"'{archive}' was not extracted: member '{member.name}' would be written "
                f"outside '{target}' (through a symbolic link on disk)"
            )
        if member.issym():
            raise ArchiveRefusedError(
                f"'{archive}' was not extracted: member '{member.name}' is a symbolic link "
                f"(to '{member.linkname}'); the data set archives hold only files and folders"
            )
        if member.islnk():
            link = _member_path(member.linkname, archive, f"hard link '{member.name}' ->")
            if link not in files:
                raise ArchiveRefusedError(
                    f"'{archive}' was not extracted: hard link '{member.name}' points to "
                    f"'{member.linkname}', which is not an earlier file of the archive"
                )
        elif member.isreg():
            if not path.parts:
                raise ArchiveRefusedError(
                    f"'{archive}' was not extracted: file member '{member.name}' has no name"
                )
            files.add(path)
        elif member.isdir():
            if not path.parts:
                continue  # the target itself ("./"): leave its owner and mode alone
        else:
            raise ArchiveRefusedError(
                f"'{archive}' was not extracted: member '{member.name}' is a device file, "
                "FIFO or other special file; only files, folders and hard links are allowed"
            )
        safe = copy.copy(member)
        # chown (done when extracting as root) then keeps the current owner
        safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
        safe.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
        checked.append(safe)
    return checked


def extract_tar_safely(archive: Path, target: Path) -> None:
    """Extract the tar archive ``archive`` (any compression tarfile reads) into ``target``.

    Every member is checked before anything is written (see
    :func:`check_tar_members`), so a refused archive leaves ``target`` as it was.

    Raises:
        ArchiveRefusedError: If ``archive`` is not a readable tar archive or a member
            is refused; the message names the member.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.ReadError as err:
        raise ArchiveRefusedError(
            f"'{archive}' was not extracted: it is not a readable tar archive"
        ) from err
    with tar:
        try:
            members = check_tar_members(archive, tar, target)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as err:
            raise ArchiveRefusedError(
                f"'{archive}' was not extracted: it is truncated or corrupted ({err})"
            ) from err
        # Python versions with extraction filters (3.10.12+, 3.11.4+, 3.12+) re-check
        # every member while writing; older ones rely on the check above.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        os.makedirs(target, exist_ok=True)
        tar.extractall(target, members=members, **kwargs)
