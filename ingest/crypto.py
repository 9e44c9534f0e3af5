"""Encryption at rest for raw objects: AES-256-GCM over the zstd stream, with rotating key ids.

Why compress-then-encrypt: ciphertext does not compress, and the archive's 3-5x saving comes
from zstd. The content address stays the SHA-256 of the *original* bytes, so deduplication,
receipts and documents are the same with or without encryption; after decryption the bytes
are re-hashed, so a wrong key, a flipped bit or a swapped object all fail loudly.

Object layout (everything before the first chunk is the *header*, bound to every chunk as
GCM associated data, so the key id and the nonce prefix cannot be altered either)::

    magic    4 bytes  b"PVE\\x00"   (a zstd frame starts 28 b5 2f fd: the two never collide)
    version  1 byte   1
    id_len   1 byte   length of the key id (1..64)
    key_id   id_len bytes, ASCII
    prefix   7 bytes  random nonce prefix, fresh per object
    chunks   AESGCM(plaintext chunk), CHUNK_BYTES of plaintext + 16-byte tag each

Chunking follows the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): chunk
``i`` uses nonce ``prefix || i (4 bytes, big-endian) || last (1 byte)``. Large messages stream
in constant memory; reordering chunks breaks the counter, and cutting the object short at a
chunk boundary leaves a last chunk that was sealed with ``last = 0`` and so fails to open. A
fresh random prefix per object keeps nonces unique under one key up to ~2^28 objects per key
before the birthday bound on 56 bits matters (rotate keys well before that: ``key_id``).

Mixed stores: objects written before encryption was switched on keep their plain zstd form and
stay readable; :func:`is_encrypted` tells the two apart from the first four bytes.

Configuration (top-level ``[encryption]`` table)::

    [encryption]
    key_id = "k1"                 # the key new objects are sealed with
    key_file = "/etc/popvault/k1.key"   # or key_env = "POPVAULT_KEY_K1"
    old_keys = { k0 = "/etc/popvault/k0.key" }   # still readable, never used to write

A key is 32 bytes: a file of exactly 32 raw bytes, or 64 hex digits, or base64 of 32 bytes
(``openssl rand -hex 32 > k1.key``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ingest.errors import ArchiveError, ConfigError

MAGIC = b"PVE\x00"
"""First bytes of an encrypted object; a plain object starts with the zstd frame magic."""
FORMAT_VERSION = 1
KEY_BYTES = 32
"""AES-256."""
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
CHUNK_BYTES = 64 * 1024
"""Plaintext per sealed chunk: small enough to bound memory, large enough that the 16-byte tag
costs 0.02%."""
MAX_CHUNKS = 2**32 - 1
"""The 4-byte counter: 256 TiB per object, far above any mail."""
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_HEADER_BYTES = len(MAGIC) + 2 + 64 + NONCE_PREFIX_BYTES


def is_encrypted(head: bytes) -> bool:
    """Whether an object starting with ``head`` (at least 4 bytes) is one of ours, encrypted."""
    return head[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class Keyring:
    """The write key and every key id that may still be read. ``repr`` never shows a key."""

    current_id: str
    keys: dict[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.current_id not in self.keys:
            raise ConfigError(f"[encryption] key_id {self.current_id!r} has no key")
        for key_id, key in self.keys.items():
            if not KEY_ID_RE.match(key_id):
                raise ConfigError(f"[encryption] key id {key_id!r}: use 1-64 letters, digits, "
                                  "'_', '.', '-'")
            if len(key) != KEY_BYTES:
                raise ConfigError(f"[encryption] key {key_id!r} is not {KEY_BYTES} bytes")

    def key(self, key_id: str, *, sha256: str | None = None) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            what = f"raw object {sha256}" if sha256 else "an object"
            known = ", ".join(sorted(self.keys))
            raise ArchiveError(
                f"{what} is encrypted with key id {key_id!r}, which is not configured "
                f"(configured: {known}); add it to [encryption] old_keys") from None


class ObjectCipher:
    """Seals and opens raw objects with a :class:`Keyring`. Thread-safe (no mutable state)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aead = {key_id: AESGCM(key) for key_id, key in keyring.keys.items()}

    def __repr__(self) -> str:
        return f"ObjectCipher(key_id={self.keyring.current_id!r})"

    @property
    def key_id(self) -> str:
        return self.keyring.current_id

    def writer(self, fh: IO[bytes]) -> EncryptingWriter:
        """A file-like that seals what is written into ``fh``; call ``close`` to seal the end."""
        return EncryptingWriter(fh, self.keyring.current_id,
                                self._aead[self.keyring.current_id])

    def reader(self, fh: IO[bytes], *, sha256: str | None = None) -> DecryptingReader:
        """A file-like over the plaintext (the zstd stream) of an encrypted object in ``fh``.

        Raises ArchiveError naming the key id when it is unknown; a wrong key or altered
        bytes raise ArchiveError on the first ``read`` that reaches the bad chunk.
        """
        header, key_id, prefix = read_header(fh, sha256=sha256)
        self.keyring.key(key_id, sha256=sha256)  # unknown id: a clear error now
        return DecryptingReader(fh, self._aead[key_id], header, key_id, prefix, sha256=sha256)


def _header(key_id: str, prefix: bytes) -> bytes:
    raw_id = key_id.encode("ascii")
    return MAGIC + bytes([FORMAT_VERSION, len(raw_id)]) + raw_id + prefix


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def read_header(fh: IO[bytes], *, sha256: str | None = None) -> tuple[bytes, str, bytes]:
    """Read and check the header; return (header bytes, key id, nonce prefix)."""
    what = f"raw object {sha256}" if sha256 else "encrypted object"
    fixed = fh.read(len(MAGIC) + 2)
    if len(fixed) < len(MAGIC) + 2 or not is_encrypted(fixed):
        raise ArchiveError(f"{what} is corrupt: encryption header missing or truncated")
    version, id_len = fixed[len(MAGIC)], fixed[len(MAGIC) + 1]
    if version != FORMAT_VERSION:
        raise ArchiveError(f"{what} uses encryption format {version}; this popvault reads "
                           f"format {FORMAT_VERSION}")
    rest = fh.read(id_len + NONCE_PREFIX_BYTES)
    if id_len == 0 or len(rest) != id_len + NONCE_PREFIX_BYTES:
        raise ArchiveError(f"{what} is corrupt: encryption header truncated")
    try:
        key_id = rest[:id_len].decode("ascii")
    except UnicodeDecodeError:
        raise ArchiveError(f"{what} is corrupt: key id in the header is not ASCII") from None
    return fixed + rest, key_id, rest[id_len:]


class EncryptingWriter:
    """Buffers plaintext and writes sealed chunks; the last one is sealed on :meth:`close`.

    A chunk is only written once more data follows it, so the final chunk (0 to CHUNK_BYTES of
    plaintext) is always the one sealed with ``last = 1``.
    """

    def __init__(self, fh: IO[bytes], key_id: str, aead: AESGCM) -> None:
        self._fh = fh
        self._aead = aead
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._header = _header(key_id, self._prefix)
        self._buf = bytearray()
        self._counter = 0
        self._closed = False
        fh.write(self._header)

    def _seal(self, chunk: bytes, last: bool) -> None:
        if self._counter > MAX_CHUNKS:
            raise ArchiveError("object too large to encrypt (chunk counter exhausted)")
        self._fh.write(self._aead.encrypt(_nonce(self._prefix, self._counter, last), chunk,
                                          self._header))
        self._counter += 1

    def write(self, data: bytes) -> int:
        if self._closed:
            raise ValueError("write to a closed EncryptingWriter")
        self._buf += data
        while len(self._buf) > CHUNK_BYTES:
            self._seal(bytes(self._buf[:CHUNK_BYTES]), last=False)
            del self._buf[:CHUNK_BYTES]
        return len(data)

    def flush(self) -> None:
        """Nothing to do: chunks are only complete once sealed (zstd calls this)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seal(bytes(self._buf), last=True)
        self._buf.clear()


class DecryptingReader:
    """File-like ``read(n)`` over the opened chunks of one object (what zstd reads from)."""

    def __init__(self, fh: IO[bytes], aead: AESGCM, header: bytes, key_id: str, prefix: bytes,
                 *, sha256: str | None = None) -> None:
        self._fh = fh
        self._aead = aead
        self._header = header
        self._key_id = key_id
        self._prefix = prefix
        self._sha256 = sha256
        self._counter = 0
        self._buf = bytearray()
        self._next = fh.read(CHUNK_BYTES + TAG_BYTES)  # one chunk of look-ahead
        self._done = False

    def _open_next(self) -> None:
        sealed = self._next
        self._next = self._fh.read(CHUNK_BYTES + TAG_BYTES)
        last = not self._next
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, self._counter, last), sealed,
                                       self._header)
        except InvalidTag:
            what = f"raw object {self._sha256}" if self._sha256 else "encrypted object"
            raise ArchiveError(
                f"{what} cannot be decrypted with key id {self._key_id!r}: either the "
                f"configured key for {self._key_id!r} is wrong, or the object was altered or "
                f"truncated (chunk {self._counter})") from None
        self._counter += 1
        self._buf += plain
        self._done = last

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buf) < size):
            self._open_next()
        if size < 0 or size >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
            return data
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def readable(self) -> bool:
        return True


# -- configuration ----------------------------------------------------------------------------


def _decode_key(data: bytes, where: str) -> bytes:
    """32 raw bytes, or 64 hex digits, or base64 of 32 bytes (surrounding whitespace ignored)."""
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    try:
        if len(text) == 2 * KEY_BYTES:
            return binascii.unhexlify(text)
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == KEY_BYTES:
            return decoded
    except (binascii.Error, ValueError):
        pass
    raise ConfigError(f"{where}: not a {KEY_BYTES}-byte key (give 32 raw bytes, 64 hex digits "
                      "or base64 of 32 bytes)")


def _read_key_file(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read key file {path}: {exc.strerror}") from None
    return _decode_key(data, where)


def _resolve(value: str, base: Path | None) -> Path:
    p = Path(value).expanduser()
    return base / p if not p.is_absolute() and base is not None else p


def keyring_from_table(table: Any, *, where: str, base: Path | None) -> Keyring:
    """Parse an ``[encryption]`` table (see the module docstring); errors name file and key."""
    prefix = f"{where}: [encryption]"
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix} must be a table")
    known = {"key_id", "key_file", "key_env", "old_keys"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}: key {key!r}: unknown key (check the spelling)")
    key_id = table.get("key_id")
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        raise ConfigError(f"{prefix}: key 'key_id': required, 1-64 letters, digits, '_', '.', "
                          f"'-', got {key_id!r}")
    key_file, key_env = table.get("key_file"), table.get("key_env")
    if (key_file is None) == (key_env is None):
        raise ConfigError(f"{prefix}: key 'key_file': give exactly one of key_file, key_env")
    keys: dict[str, bytes] = {}
    if key_file is not None:
        if not isinstance(key_file, str):
            raise ConfigError(f"{prefix}: key 'key_file': expected a string")
        keys[key_id] = _read_key_file(_resolve(key_file, base), f"{prefix}: key 'key_file'")
    else:
        if not isinstance(key_env, str):
            raise ConfigError(f"{prefix}: key 'key_env': expected a string")
        value = os.environ.get(key_env)
        if not value:
            raise ConfigError(f"{prefix}: key 'key_env': environment variable {key_env} is "
                              "not set")
        keys[key_id] = _decode_key(value.encode("ascii", "replace"),
                                   f"{prefix}: key 'key_env' ({key_env})")
    old = table.get("old_keys", {})
    if not isinstance(old, dict):
        raise ConfigError(f"{prefix}: key 'old_keys': expected a table of key id = key file")
    for old_id, path in old.items():
        where_old = f"{prefix}: key 'old_keys.{old_id}'"
        if not KEY_ID_RE.match(old_id):
            raise ConfigError(f"{where_old}: key ids are 1-64 letters, digits, '_', '.', '-'")
        if old_id == key_id:
            raise ConfigError(f"{where_old}: {old_id!r} is the current key_id")
        if not isinstance(path, str):
            raise ConfigError(f"{where_old}: expected the path of a key file")
        keys[old_id] = _read_key_file(_resolve(path, base), where_old)
    return Keyring(current_id=key_id, keys=keys)


def cipher_from_config(raw: dict[str, Any], *, path: Path | None) -> ObjectCipher | None:
    """The cipher a configuration asks for, or None when it has no ``[encryption]`` table."""
    if "encryption" not in raw:
        return None
    base = path.parent.resolve() if path else None
    return ObjectCipher(keyring_from_table(raw["encryption"], where=str(path or "configuration"),
                                           base=base))
