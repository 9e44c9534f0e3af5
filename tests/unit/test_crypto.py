"""Encryption at rest: sealed objects, key rotation, mixed stores, clear errors on a wrong key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ingest.archive import FilesystemStore, open_store
from ingest.config import config_from_dict
from ingest.crypto import (
    CHUNK_BYTES,
    MAGIC,
    Keyring,
    ObjectCipher,
    cipher_from_config,
    is_encrypted,
)
from ingest.errors import ArchiveError, ConfigError

pytestmark = pytest.mark.unit


def cipher(key_id: str = "k1", key: bytes | None = None, **old: bytes) -> ObjectCipher:
    return ObjectCipher(Keyring(key_id, {key_id: key or os.urandom(32), **old}))


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1,
                                  3 * CHUNK_BYTES, 5 * CHUNK_BYTES + 17])
def test_round_trip_at_chunk_boundaries(tmp_path: Path, size: int) -> None:
    store = FilesystemStore(tmp_path, cipher=cipher())
    raw = os.urandom(size)  # incompressible: the sealed stream spans several chunks
    stored = store.put_bytes(raw)
    assert stored.sha256 == hashlib.sha256(raw).hexdigest()  # address of the ORIGINAL bytes
    assert store.read(stored.sha256) == raw
    assert store.verify(stored.sha256) == size
    assert is_encrypted(store.path_for(stored.sha256).read_bytes()[:4])


def test_plaintext_does_not_appear_on_disk(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, cipher=cipher())
    raw = b"Subject: quarterly secret\r\n\r\n" + b"the secret word is swordfish\r\n" * 100
    stored = store.put_bytes(raw)
    on_disk = store.path_for(stored.sha256).read_bytes()
    assert on_disk.startswith(MAGIC + b"\x01\x02k1")
    assert b"swordfish" not in on_disk and b"quarterly" not in on_disk


def test_mixed_store_plain_objects_stay_readable(tmp_path: Path) -> None:
    plain = FilesystemStore(tmp_path).put_bytes(b"Subject: old\r\n\r\nbefore encryption\r\n")
    sealed_store = FilesystemStore(tmp_path, cipher=cipher())
    new = sealed_store.put_bytes(b"Subject: new\r\n\r\nafter encryption\r\n")
    assert sealed_store.read(plain.sha256).endswith(b"before encryption\r\n")
    assert not sealed_store.is_encrypted(plain.sha256)
    assert sealed_store.is_encrypted(new.sha256)
    # an unencrypted store says what is missing instead of failing in zstd
    with pytest.raises(ArchiveError, match="encrypted but no \\[encryption\\] key"):
        FilesystemStore(tmp_path).read(new.sha256)


def test_rotation_old_key_ids_stay_readable(tmp_path: Path) -> None:
    k0 = os.urandom(32)
    old = FilesystemStore(tmp_path, cipher=cipher("k0", k0)).put_bytes(b"Subject: a\r\n\r\nx\r\n")
    rotated = FilesystemStore(tmp_path, cipher=cipher("k1", k0=k0))
    new = rotated.put_bytes(b"Subject: b\r\n\r\ny\r\n")
    assert rotated.read(old.sha256) == b"Subject: a\r\n\r\nx\r\n"
    assert b"k1" in rotated.path_for(new.sha256).read_bytes()[:8]
    without_k0 = FilesystemStore(tmp_path, cipher=cipher("k1"))
    with pytest.raises(ArchiveError, match="key id 'k0', which is not configured"):
        without_k0.read(old.sha256)


def test_wrong_key_names_the_key_id(tmp_path: Path) -> None:
    stored = FilesystemStore(tmp_path, cipher=cipher("k1")).put_bytes(b"Subject: a\r\n\r\nx\r\n")
    wrong = FilesystemStore(tmp_path, cipher=cipher("k1"))
    with pytest.raises(ArchiveError, match="cannot be decrypted with key id 'k1'"):
        wrong.read(stored.sha256)
    with pytest.raises(ArchiveError, match="key id 'k1'"):
        wrong.verify(stored.sha256)


@pytest.mark.parametrize("damage", ["flip", "truncate_chunk", "drop_last_chunk", "header"])
def test_tampering_is_detected(tmp_path: Path, damage: str) -> None:
    store = FilesystemStore(tmp_path, cipher=cipher())
    stored = store.put_bytes(os.urandom(3 * CHUNK_BYTES + 5))
    path = store.path_for(stored.sha256)
    data = bytearray(path.read_bytes())
    header = len(MAGIC) + 2 + 2 + 7
    if damage == "flip":
        data[header + 100] ^= 0x01
    elif damage == "truncate_chunk":
        del data[-3:]
    elif damage == "drop_last_chunk":  # cut at a chunk boundary: the new last one is not final
        del data[header + 3 * (CHUNK_BYTES + 16):]
    else:
        data[len(MAGIC) + 3] = ord("x")  # key id "k1" -> "x1": unknown id
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        store.verify(stored.sha256)


def test_config_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k1.key").write_text(os.urandom(32).hex() + "\n")
    (tmp_path / "k0.key").write_bytes(os.urandom(32))
    monkeypatch.setenv("PV_TEST_KEY", os.urandom(32).hex())
    cfg = config_from_dict({"archive": {"path": str(tmp_path / "a")}, "encryption": {
        "key_id": "k1", "key_file": "k1.key", "old_keys": {"k0": "k0.key"}}},
        path=tmp_path / "popvault.toml")
    store = open_store(cfg)
    assert store.cipher is not None and store.cipher.key_id == "k1"
    assert sorted(store.cipher.keyring.keys) == ["k0", "k1"]
    assert "k1.key" not in repr(store.cipher.keyring) and "keys" not in repr(store.cipher.keyring)
    env = cipher_from_config({"encryption": {"key_id": "k2", "key_env": "PV_TEST_KEY"}},
                             path=None)
    assert env is not None and env.key_id == "k2"
    assert open_store(config_from_dict({"archive": {"path": str(tmp_path / "b")}})).cipher is None


@pytest.mark.parametrize(("table", "message"), [
    ({"key_file": "k.key"}, "key 'key_id': required"),
    ({"key_id": "k1"}, "key 'key_file': give exactly one"),
    ({"key_id": "k1", "key_file": "missing.key"}, "cannot read key file"),
    ({"key_id": "k1", "key_file": "short.key"}, "not a 32-byte key"),
    ({"key_id": "k1", "key_env": "PV_UNSET_KEY"}, "PV_UNSET_KEY is not set"),
    ({"key_id": "k1", "key_file": "short.key", "colour": 1}, "key 'colour': unknown"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, table: dict[str, object],
                                         message: str) -> None:
    (tmp_path / "short.key").write_text("abcd")
    with pytest.raises(ConfigError, match=message) as info:
        cipher_from_config({"encryption": table}, path=tmp_path / "popvault.toml")
    assert "popvault.toml: [encryption]" in str(info.value)
