"""Raw archive: content addressing, exact bytes, atomic writes, verified reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingest.archive import FilesystemStore
from ingest.errors import ArchiveError


def test_round_trip_is_byte_exact_and_deduplicated(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    raw = b"From: a@example.com\r\nSubject: x\r\n\r\n..dot\r\n\x00\xff binary\r\n"
    first = store.put_chunks([raw[:7], raw[7:]])
    store.flush()
    assert first.sha256 == hashlib.sha256(raw).hexdigest()
    assert first.size == len(raw) and not first.existed
    again = store.put_bytes(raw)
    assert again.existed and again.sha256 == first.sha256
    assert store.read(first.sha256) == raw
    assert store.verify(first.sha256) == len(raw)
    assert list(store.iter_hashes()) == [first.sha256]
    assert not list((tmp_path / "tmp").iterdir()), "no temporary files left behind"


def test_objects_are_compressed(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    raw = b"Subject: repetitive\r\n\r\n" + b"the same line again\r\n" * 10_000
    stored = store.put_bytes(raw)
    assert store.path_for(stored.sha256).stat().st_size < len(raw) / 10


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    stored = store.put_bytes(b"Subject: tamper\r\n\r\nbody\r\n")
    path = store.path_for(stored.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt"):
        store.read(stored.sha256)


def test_missing_object_and_bad_hash_are_clear(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    with pytest.raises(ArchiveError, match="missing"):
        store.read("0" * 64)
    with pytest.raises(ArchiveError, match="not a SHA-256"):
        store.read("../../etc/passwd")


def test_failed_stream_leaves_nothing(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)

    def broken() -> object:
        yield b"partial"
        raise ConnectionResetError("server went away")

    with pytest.raises(ConnectionResetError):
        store.put_chunks(broken())  # type: ignore[arg-type]
    assert not list(store.iter_hashes())
    assert not list((tmp_path / "tmp").iterdir())


def test_an_existing_object_is_covered_by_this_stores_flush(tmp_path: Path) -> None:
    """Two pollers (accounts) share the archive: if B finds an object A wrote but has not
    flushed yet, B's flush must still make it durable before B acknowledges anything."""
    a, b = FilesystemStore(tmp_path), FilesystemStore(tmp_path)
    raw = b"Subject: same message, two accounts\r\n\r\nbody\r\n"
    a.put_bytes(raw)
    stored = b.put_bytes(raw)
    assert stored.existed
    assert b._unflushed == [b.path_for(stored.sha256)]  # what b.flush() will sync
    b.flush()
    assert b._unflushed == []
