"""ArtifactStore: adapter files on disk, content-addressed, written all-or-nothing.

Layout under the data directory (every path chosen by the server, never by a request):

    adapters/<sha256>/adapter_config.json
    adapters/<sha256>/adapter_model.safetensors
    tmp/<upload_id>/...            an upload in progress (upload_id: 32 hex digits)
    tmp/<random>.trash             a directory being removed

An upload streams into tmp/<upload_id>/ with size caps and sha256 computed as the bytes arrive,
each file is fsynced, and a validated upload is renamed into adapters/<sha256>/ (then the parent is
fsynced). A kill at any moment leaves either no adapter or a whole one, plus temp files that the
startup sweep removes. The sha256 of an adapter is `content_digest` of its two files' digests, so
the same files uploaded as two parts or inside an archive get the same address (deduplicated).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .adapter_config import ADAPTER_CONFIG, MAX_CONFIG_BYTES
from .archive import CHUNK, archive_kind, unpack
from .errors import AdapterCorrupt, AdapterTooLarge, UnsupportedFormat
from .validate import ADAPTER_WEIGHTS, CONVERT_HINT

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")
DIGEST = re.compile(r"[0-9a-f]{64}")
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class UploadLimits:
    """Size caps, all enforced while the bytes stream in."""

    max_upload_bytes: int = 1 << 30  # everything read from the client
    max_weights_bytes: int = 1 << 30  # adapter_model.safetensors, unpacked
    max_config_bytes: int = MAX_CONFIG_BYTES  # adapter_config.json, unpacked


@dataclass(frozen=True)
class UploadPart:
    """One file of an upload. `filename` is the client's: compared, never used as a path."""

    filename: str
    stream: BinaryIO


@dataclass(frozen=True)
class StagedUpload:
    """An upload fully received into its temp directory, not yet validated."""

    upload_id: str
    directory: Path
    file_digests: dict[str, str]  # file name → sha256 hex
    received_bytes: int  # bytes read from the client
    size_bytes: int  # bytes of the two files

    @property
    def digest(self) -> str:
        return content_digest(self.file_digests)


def content_digest(file_digests: dict[str, str]) -> str:
    """The adapter's sha256: a digest over its two files' digests, in a fixed order."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(f"{name}\0{file_digests[name]}\n".encode())
    return h.hexdigest()


def refuse_file_name(name: str) -> None:
    """Raise the error for a file an adapter upload may not contain."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise UnsupportedFormat(
            f"{name!r} is a pickle-based format, which loraplex never loads; "
            f"{CONVERT_HINT}, then upload {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    raise UnsupportedFormat(
        f"{name!r} is not allowed: an adapter upload is exactly {ADAPTER_CONFIG} and "
        f"{ADAPTER_WEIGHTS} (or one .zip or .tar.gz holding them at its root)"
    )


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """The adapters/ and tmp/ folders of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.adapters_dir = self.root / "adapters"
        self.tmp_dir = self.root / "tmp"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._commit_lock = threading.Lock()

    def staging_dir(self, upload_id: str) -> Path:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.tmp_dir / upload_id

    def path_of(self, digest: str) -> Path:
        """The directory of a stored adapter (digest: 64 lowercase hex digits)."""
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"bad adapter digest {digest!r}")
        return self.adapters_dir / digest

    def receive(
        self, upload_id: str, parts: Sequence[UploadPart], limits: UploadLimits
    ) -> StagedUpload:
        """Stream an upload into tmp/<upload_id>/, hashing and counting as it goes.

        :raises AdapterTooLarge: a cap was passed (reading stops there).
        :raises UnsupportedFormat: other files, pickles, a bad or unsafe archive.
        The caller discards the staging directory on any error.
        """
        directory = self.staging_dir(upload_id)
        directory.mkdir()
        caps = {
            ADAPTER_CONFIG: limits.max_config_bytes,
            ADAPTER_WEIGHTS: limits.max_weights_bytes,
        }
        digests: dict[str, str] = {}
        sizes: dict[str, int] = {}
        received = 0

        def sink(name: str, stream: BinaryIO, cap: int) -> None:
            digests[name], sizes[name] = _write_file(
                directory / name, stream, cap, name
            )

        kind = archive_kind(parts[0].filename) if len(parts) == 1 else None
        if kind is not None:
            archive = directory / "upload.archive"
            _, received = _write_file(
                archive, parts[0].stream, limits.max_upload_bytes, "the upload"
            )
            unpack(
                archive, kind, caps, sink, refuse_file_name, sum(caps.values()) + CHUNK
            )
            archive.unlink()
        else:
            for part in parts:
                name = part.filename
                if name not in caps:
                    if archive_kind(name):
                        raise UnsupportedFormat(
                            "an archive must be the only file of its upload"
                        )
                    refuse_file_name(name)
                if name in digests:
                    raise UnsupportedFormat(f"{name} was sent twice")
                remaining = limits.max_upload_bytes - received
                if remaining <= 0:
                    raise AdapterTooLarge(
                        f"the upload is over its {limits.max_upload_bytes}-byte cap"
                    )
                sink(name, part.stream, min(caps[name], remaining))
                received += sizes[name]
        for name in ADAPTER_FILES:
            if name not in digests:
                raise UnsupportedFormat(
                    f"{name} is missing: an adapter is {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
                )
        fsync_dir(directory)
        return StagedUpload(
            upload_id, directory, digests, received, sum(sizes.values())
        )

    def commit(self, staged: StagedUpload) -> str:
        """Move a validated upload to adapters/<sha256>/ (or drop it: already stored)."""
        digest = staged.digest
        final = self.path_of(digest)
        with self._commit_lock:
            if final.exists():
                if self.problem(digest) is None:
                    shutil.rmtree(staged.directory)
                    return digest
                self._trash(final)  # a damaged copy: the new upload replaces it
            os.replace(staged.directory, final)
            fsync_dir(self.adapters_dir)
            fsync_dir(self.tmp_dir)
        return digest

    def discard(self, upload_id: str) -> None:
        """Remove an upload's temp directory, if any."""
        shutil.rmtree(self.staging_dir(upload_id), ignore_errors=True)

    def remove(self, digest: str) -> None:
        """Delete a stored adapter (renamed into tmp/ first, so a kill leaves no half)."""
        path = self.path_of(digest)
        if path.exists():
            with self._commit_lock:
                self._trash(path)

    def _trash(self, path: Path) -> None:
        trash = self.tmp_dir / f"{uuid.uuid4().hex}.trash"
        os.replace(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def read(self, digest: str) -> tuple[bytes, bytes]:
        """Both files of a stored adapter, checked against their digest.

        :raises AdapterCorrupt: a file is missing or its bytes changed.
        """
        path = self.path_of(digest)
        try:
            data = {name: (path / name).read_bytes() for name in ADAPTER_FILES}
        except OSError as exc:
            raise AdapterCorrupt(
                f"adapter files {digest[:12]}… are unreadable: {exc.strerror}"
            ) from None
        found = content_digest(
            {n: hashlib.sha256(b).hexdigest() for n, b in data.items()}
        )
        if found != digest:
            raise AdapterCorrupt(
                f"adapter files {digest[:12]}… changed on disk (sha256 now {found[:12]}…)"
            )
        return data[ADAPTER_CONFIG], data[ADAPTER_WEIGHTS]

    def problem(self, digest: str) -> str | None:
        """None if the stored adapter is whole and unchanged, else what is wrong with it."""
        path = self.path_of(digest)
        if not path.is_dir():
            return "its files are missing"
        names = sorted(p.name for p in path.iterdir())
        if names != sorted(ADAPTER_FILES):
            return f"its folder holds {names}, not exactly {list(ADAPTER_FILES)}"
        digests = {}
        for name in ADAPTER_FILES:
            h = hashlib.sha256()
            with open(path / name, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            digests[name] = h.hexdigest()
        if content_digest(digests) != digest:
            return "its bytes no longer match their sha256"
        return None

    def stored(self) -> list[str]:
        """Every entry of adapters/ (digests, and anything else that does not belong)."""
        return sorted(p.name for p in self.adapters_dir.iterdir())

    def temp_entries(self) -> list[Path]:
        """Everything under tmp/."""
        return sorted(self.tmp_dir.iterdir())


def _write_file(path: Path, stream: BinaryIO, cap: int, what: str) -> tuple[str, int]:
    """Copy a stream into a new file, at most `cap` bytes; (sha256 hex, size)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "xb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > cap:
                raise AdapterTooLarge(f"{what} is over its {cap}-byte cap")
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size
