"""Safe unpacking of an uploaded .zip, .tar.gz or .tar that must hold exactly the two files.

Nothing in an archive becomes a path: member names are only compared with the two allowed names,
and each allowed member is copied into a file the caller opened. Links, devices, folders other than
the root, names that climb out ("../x", "/etc/x"), duplicates, encryption and unknown compression
are refused; sizes are capped from the member headers *and* while decompressing (a header can
lie), so a zip or gzip bomb stops at the cap instead of filling memory or disk.
"""

from __future__ import annotations

import gzip
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import AdapterTooLarge, UnsupportedFormat

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
MAX_MEMBERS = 16
CHUNK = 1 << 20
# sink(allowed member name, its data stream, its size cap): copies one member out
MemberSink = Callable[[str, BinaryIO, int], None]


def archive_kind(filename: str) -> str | None:
    """ "zip", "tar.gz", "tar" or None, from an upload's (untrusted) file name."""
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    return None


class CappedReader:
    """A read-only stream that raises AdapterTooLarge once more than `cap` bytes came out."""

    def __init__(self, inner: BinaryIO, cap: int, what: str) -> None:
        self.inner, self.cap, self.what, self.count = inner, cap, what, 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(self.cap + 1 - self.count if n < 0 else n)
        self.count += len(data)
        if self.count > self.cap:
            raise AdapterTooLarge(f"{self.what} is over its {self.cap}-byte cap")
        return data


def member_name(raw: str, allowed: tuple[str, ...]) -> str | None:
    """The allowed name a member stands for, None for the root folder entry.

    :raises UnsupportedFormat: the name climbs out of the archive or is not at its root.
    """
    name = raw.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    if name in ("", ".", "./"):
        return None
    parts = name.rstrip("/").split("/")
    if name.startswith("/") or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise UnsupportedFormat(
            f"archive member {raw!r} points outside the archive; nothing was extracted"
        )
    if len(parts) > 1:
        raise UnsupportedFormat(
            f"archive member {raw!r} is inside a folder: put "
            f"{' and '.join(allowed)} at the archive's root"
        )
    return parts[0]


def unpack(
    path: Path,
    kind: str,
    caps: dict[str, int],
    sink: MemberSink,
    refuse_name: Callable[[str], None],
    max_unpacked: int,
) -> None:
    """Copy each allowed member of the archive at `path` into `sink(name, stream, cap)`.

    :param caps: allowed member name → its size cap in bytes.
    :param refuse_name: raises the right error for a member name that is not allowed.
    :param max_unpacked: cap on all decompressed bytes, headers included.
    """
    allowed = tuple(caps)
    try:
        if kind == "zip":
            _unpack_zip(path, caps, sink, refuse_name, allowed)
        else:
            _unpack_tar(path, kind, caps, sink, refuse_name, allowed, max_unpacked)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise UnsupportedFormat(f"the {kind} archive is damaged: {exc}") from None
    except gzip.BadGzipFile as exc:
        raise UnsupportedFormat(f"the {kind} archive is damaged: {exc}") from None


def _check_member(
    raw: str, seen: set[str], allowed: tuple[str, ...], refuse: Callable[[str], None]
) -> str | None:
    name = member_name(raw, allowed)
    if name is None:
        return None
    if name not in allowed:
        refuse(name)
    if name in seen:
        raise UnsupportedFormat(f"archive member {name!r} appears twice")
    seen.add(name)
    return name


def _unpack_zip(
    path: Path,
    caps: dict[str, int],
    sink: MemberSink,
    refuse: Callable[[str], None],
    allowed: tuple[str, ...],
) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise UnsupportedFormat(f"the zip archive holds {len(infos)} entries")
        seen: set[str] = set()
        for info in infos:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsupportedFormat(
                    f"archive member {info.filename!r} is a symbolic link"
                )
            if info.is_dir():
                if member_name(info.filename, allowed) is not None:
                    raise UnsupportedFormat(
                        f"archive member {info.filename!r} is a folder: put "
                        f"{' and '.join(allowed)} at the archive's root"
                    )
                continue
            name = _check_member(info.filename, seen, allowed, refuse)
            if name is None:
                continue
            if info.flag_bits & 0x1:
                raise UnsupportedFormat(f"archive member {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UnsupportedFormat(
                    f"archive member {name!r} uses an unsupported compression; "
                    "use stored or deflate"
                )
            if info.file_size > caps[name]:
                raise AdapterTooLarge(
                    f"{name} is {info.file_size} bytes, over its {caps[name]}-byte cap"
                )
            with zf.open(info) as member:
                sink(name, member, caps[name])


def _unpack_tar(
    path: Path,
    kind: str,
    caps: dict[str, int],
    sink: MemberSink,
    refuse: Callable[[str], None],
    allowed: tuple[str, ...],
    max_unpacked: int,
) -> None:
    with open(path, "rb") as raw:
        inner: BinaryIO = gzip.GzipFile(fileobj=raw) if kind == "tar.gz" else raw
        stream = CappedReader(inner, max_unpacked, f"the unpacked {kind} archive")
        seen: set[str] = set()
        with tarfile.open(fileobj=stream, mode="r|") as tf:  # type: ignore[arg-type]
            for count, member in enumerate(tf, start=1):
                if count > MAX_MEMBERS:
                    raise UnsupportedFormat(
                        f"the {kind} archive holds too many entries"
                    )
                if member.issym() or member.islnk():
                    raise UnsupportedFormat(f"archive member {member.name!r} is a link")
                if member.isdir():
                    if member_name(member.name, allowed) is not None:
                        raise UnsupportedFormat(
                            f"archive member {member.name!r} is a folder: put "
                            f"{' and '.join(allowed)} at the archive's root"
                        )
                    continue
                if not member.isfile():
                    raise UnsupportedFormat(
                        f"archive member {member.name!r} is not a regular file"
                    )
                name = _check_member(member.name, seen, allowed, refuse)
                if name is None:
                    continue
                if member.size > caps[name]:
                    raise AdapterTooLarge(
                        f"{name} is {member.size} bytes, over its {caps[name]}-byte cap"
                    )
                extracted = tf.extractfile(member)
                assert extracted is not None  # a regular file always has data
                sink(name, extracted, caps[name])
