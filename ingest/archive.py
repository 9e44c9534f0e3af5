"""Content-addressed raw store: the bytes exactly as the server sent them, zstd-compressed.

Objects are named by the SHA-256 of the *uncompressed* bytes, so a message archived twice is
stored once and any reader can prove what it got. Writes go to a temporary file that is
renamed into place; durability is a separate step (:meth:`RawStore.flush`) so that one
``syncfs`` covers a whole batch instead of one ``fsync`` per message (group commit). Nothing
may be acknowledged — receipt, DELE — before the flush that covers its object returned.

Encryption at rest is optional (``cipher``, see :mod:`ingest.crypto`): the zstd stream is
sealed after compression, the object keeps its name (the SHA-256 of the original bytes), and a
four-byte magic tells sealed objects from plain ones, so a store may hold both: switching
encryption on never rewrites or strands what was archived before.

The :class:`RawStore` protocol is what an object-store backend will implement later.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import zstandard

from ingest.errors import ArchiveError

if TYPE_CHECKING:
    from ingest.config import Config
    from ingest.crypto import ObjectCipher

ZSTD_LEVEL = 1
"""Fastest level: text compresses well even here, attachments hardly at any level, and the
CPU is better spent on parsing."""
READ_CHUNK_BYTES = 1024 * 1024
OBJECT_SUFFIX = ".zst"


@dataclass(frozen=True)
class StoredRaw:
    """Where a message's bytes went: their hash, size, and whether they were already there."""

    sha256: str
    size: int
    existed: bool


class RawStore(Protocol):
    def put_chunks(self, chunks: Iterable[bytes]) -> StoredRaw: ...
    def put_bytes(self, raw: bytes) -> StoredRaw: ...
    def flush(self) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def read(self, sha256: str) -> bytes: ...
    def delete(self, sha256: str) -> bool: ...
    def iter_hashes(self) -> Iterator[str]: ...


def _load_syncfs() -> object | None:
    """Linux ``syncfs(2)``: flush one filesystem in a single call (not in the os module)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return getattr(libc, "syncfs", None)
    except OSError:
        return None


_SYNCFS = _load_syncfs()


class FilesystemStore:
    """Raw objects under ``<root>/raw/ab/cd/<sha256>.zst``; see the module docstring.

    ``cipher``: seal new objects with it (and open sealed ones). Without it, sealed objects
    cannot be read (ArchiveError saying so) but plain ones still can.
    """

    def __init__(self, root: Path, *, cipher: ObjectCipher | None = None) -> None:
        self.root = Path(root)
        self.cipher = cipher
        self.raw_dir = self.root / "raw"
        self.tmp_dir = self.root / "tmp"
        try:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create archive directory {self.root}: {exc.strerror}") \
                from None
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._unflushed: list[Path] = []
        self._unflushed_lock = threading.Lock()  # writes and flushes may run on two threads

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArchiveError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
        return self.raw_dir / sha256[:2] / sha256[2:4] / (sha256 + OBJECT_SUFFIX)

    def put_bytes(self, raw: bytes) -> StoredRaw:
        return self.put_chunks((raw,))

    def put_chunks(self, chunks: Iterable[bytes]) -> StoredRaw:
        """Stream bytes into the store, hashing and compressing as they arrive."""
        digest = hashlib.sha256()
        size = 0
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="in-", suffix=".part")
        except OSError as exc:
            raise ArchiveError(f"cannot create a file in {self.tmp_dir}: {exc.strerror}") \
                from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                sealer = self.cipher.writer(fh) if self.cipher is not None else None
                target: IO[bytes] = sealer if sealer is not None else fh  # type: ignore[assignment]
                writer = self._compressor.stream_writer(target, closefd=False)
                for chunk in _source(chunks):
                    digest.update(chunk)
                    size += len(chunk)
                    writer.write(chunk)
                writer.flush(zstandard.FLUSH_FRAME)
                if sealer is not None:
                    sealer.close()
            sha = digest.hexdigest()
            final = self.path_for(sha)
            if final.exists():
                tmp.unlink()
                # Another writer (account, process) may not have flushed it yet: this batch's
                # flush must cover it too before anything referring to it is acknowledged.
                with self._unflushed_lock:
                    self._unflushed.append(final)
                return StoredRaw(sha, size, existed=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except _SourceFailed as failed:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise failed.cause from failed.cause.__cause__
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ArchiveError(f"cannot write raw object into {self.raw_dir}: {exc.strerror}") \
                from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._unflushed_lock:
            self._unflushed.append(final)
        return StoredRaw(sha, size, existed=False)

    def flush(self) -> None:
        """Make every object written since the last flush durable (data and directory entries)."""
        with self._unflushed_lock:
            if not self._unflushed:
                return
            pending, self._unflushed = self._unflushed, []
        try:
            if _SYNCFS is not None:
                fd = os.open(self.raw_dir, os.O_RDONLY)
                try:
                    if _SYNCFS(fd) != 0:  # type: ignore[operator]
                        raise OSError(ctypes.get_errno(), "syncfs failed")
                finally:
                    os.close(fd)
                return
            dirs = set()
            for path in pending:
                _fsync_path(path)
                dirs.add(path.parent)
                dirs.add(path.parent.parent)
            for d in dirs:
                _fsync_path(d)
        except OSError as exc:
            with self._unflushed_lock:
                self._unflushed = pending + self._unflushed
            raise ArchiveError(f"cannot make archive writes durable in {self.raw_dir}: "
                               f"{exc.strerror}") from None

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def open_compressed(self, sha256: str) -> IO[bytes]:
        try:
            return self.path_for(sha256).open("rb")
        except FileNotFoundError:
            raise ArchiveError(f"raw object {sha256} is missing from {self.raw_dir}") from None

    def _zstd_source(self, fh: IO[bytes], sha256: str) -> IO[bytes]:
        """The zstd stream of an open object: the file itself, or its decrypting reader."""
        from ingest.crypto import is_encrypted

        head = fh.read(4)
        fh.seek(0)
        if not is_encrypted(head):
            return fh
        if self.cipher is None:
            raise ArchiveError(f"raw object {sha256} is encrypted but no [encryption] key is "
                               "configured")
        return self.cipher.reader(fh, sha256=sha256)  # type: ignore[return-value]

    def is_encrypted(self, sha256: str) -> bool:
        """Whether the stored object is sealed (for reports; reading handles both)."""
        from ingest.crypto import is_encrypted

        with self.open_compressed(sha256) as fh:
            return is_encrypted(fh.read(4))

    def read(self, sha256: str) -> bytes:
        """Return the original bytes, decrypted if sealed, verified against their hash."""
        with self.open_compressed(sha256) as fh:
            try:
                source = self._zstd_source(fh, sha256)
                data = zstandard.ZstdDecompressor().stream_reader(source).read()
            except zstandard.ZstdError as exc:
                raise ArchiveError(f"raw object {sha256} is corrupt: {exc}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArchiveError(f"raw object {sha256} is corrupt: its bytes no longer match "
                               "their SHA-256")
        return data

    def verify(self, sha256: str) -> int:
        """Re-hash an object while streaming it; return its size or raise ArchiveError."""
        digest = hashlib.sha256()
        size = 0
        with self.open_compressed(sha256) as fh:
            try:
                source = self._zstd_source(fh, sha256)
                reader = zstandard.ZstdDecompressor().stream_reader(source)
                while chunk := reader.read(READ_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
            except zstandard.ZstdError as exc:
                raise ArchiveError(f"raw object {sha256} is corrupt: {exc}") from None
        if digest.hexdigest() != sha256:
            raise ArchiveError(f"raw object {sha256} is corrupt: its bytes no longer match "
                               "their SHA-256")
        return size

    def delete(self, sha256: str) -> bool:
        try:
            self.path_for(sha256).unlink()
            return True
        except FileNotFoundError:
            return False

    def iter_hashes(self) -> Iterator[str]:
        for path in sorted(self.raw_dir.glob("*/*/*" + OBJECT_SUFFIX)):
            yield path.name[: -len(OBJECT_SUFFIX)]


def open_store(config: Config) -> FilesystemStore:
    """The raw store a configuration describes: ``[archive] path``, sealed with the
    ``[encryption]`` key when that table is present. Use this instead of constructing
    :class:`FilesystemStore` directly, so no code path writes plaintext by accident."""
    from ingest.crypto import cipher_from_config

    return FilesystemStore(config.archive_path,
                           cipher=cipher_from_config(config.raw, path=config.path))


class _SourceFailed(Exception):
    """Carries an exception raised by the chunk source, so it is not taken for a disk error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _source(chunks: Iterable[bytes]) -> Iterator[bytes]:
    iterator = iter(chunks)
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise _SourceFailed(exc) from exc
        yield chunk


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
