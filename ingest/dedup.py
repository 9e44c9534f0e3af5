"""Message keys: the document ``_id`` that makes one message one document, across accounts.

The rule, in plain words:

    Two copies are the same message when they carry the same Message-ID (if any) *and* the
    same content. Content means the originator headers (From, Sender, Reply-To, To, Cc,
    Subject, Date, Message-ID, In-Reply-To, References, MIME-Version, Content-Type,
    Content-Transfer-Encoding) and the body bytes. Trace headers that every mailbox adds
    differently (Received, Return-Path, Delivered-To, X-Original-To, Authentication-Results,
    ARC-*, X-Spam-*, Status, X-UID, Bcc, ...) and line endings (CRLF or LF) do not count.
    A shared Message-ID alone never merges two messages whose content differs.
    A message with none of those originator headers (garbage, a bare body) is identified by
    all of its bytes instead, line endings aside.

So the same message delivered to two accounts gets one key, while a forger reusing a
Message-ID, or a mailing list that rewrote the body, gets a new key. The key is versioned
(``v1``): changing the rule means a new prefix, never silently different keys for old mail.

Everything here works on raw bytes and never raises on garbage: it runs on every message
before parsing, so it must be cheap and total.
"""

from __future__ import annotations

import hashlib
import re

KEY_VERSION = b"v1"
"""Prefix of the key hash; bump it (and re-key) if the rule below ever changes."""

FINGERPRINT_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
"""Originator headers, identical in every mailbox copy; hashed in this order."""

_FINGERPRINT_SET = frozenset(FINGERPRINT_HEADERS)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_WHITESPACE = re.compile(rb"[ \t\r\n]+")
_FOLDED_LINE = re.compile(rb"\r?\n(?=[ \t])")
_LINE_SPLIT = re.compile(rb"\r?\n")
_COMMENT = re.compile(r"\([^()]*\)")
_ANGLE_TOKEN = re.compile(r"<([^<>]*)>")
_ASCII_SPACE = re.compile(r"\s+")


def raw_sha256(raw: bytes) -> str:
    """SHA-256 hex of the exact bytes: the raw archive's content address."""
    return hashlib.sha256(raw).hexdigest()


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first blank line (CRLF or LF); no blank line means all headers, no body."""
    header_end, body_start = _split_offsets(raw)
    return raw[:header_end], raw[body_start:]


def _split_offsets(raw: bytes) -> tuple[int, int]:
    """Where :func:`split_message` cuts: (end of the header block, start of the body)."""
    if raw.startswith(b"\n"):
        return 0, 1
    if raw.startswith(b"\r\n"):
        return 0, 2
    match = _BLANK_LINE.search(raw)
    if match is None:
        return len(raw), len(raw)
    return match.start(), match.end()


def header_fields(header_block: bytes) -> list[tuple[bytes, bytes]]:
    """Unfolded ``(lowercase name, value)`` pairs in order; lines without a colon are skipped."""
    fields: list[tuple[bytes, bytes]] = []
    for line in _LINE_SPLIT.split(_FOLDED_LINE.sub(b"", header_block)):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name:
            fields.append((name, value))
    return fields


def content_fingerprint(raw: bytes) -> str:
    """SHA-256 hex over what every mailbox copy of a message shares (see the module rule)."""
    return _fingerprint(raw)[0]


def _fingerprint(raw: bytes) -> tuple[str, bytes | None]:
    """The fingerprint and the first raw Message-ID value, from one scan of the headers."""
    header_end, body_start = _split_offsets(raw)
    header_block = raw[:header_end]
    wanted: dict[bytes, list[bytes]] = {}
    for name, value in header_fields(header_block):
        if name in _FINGERPRINT_SET:
            wanted.setdefault(name, []).append(_WHITESPACE.sub(b" ", value).strip())
    digest = hashlib.sha256()
    if not wanted:
        # Nothing identifies the message (garbage, or no originator header at all): hash all
        # of it, so two such messages can never share a key only because both lack headers.
        whole = header_block + b"\n\n" + raw[body_start:]
        digest.update(b"whole\n" + lf_line_ends(whole).rstrip(b" \t\r\n"))
        return digest.hexdigest(), None
    for name in FINGERPRINT_HEADERS:
        for value in wanted.get(name, ()):
            digest.update(name + b":" + value + b"\n")
    digest.update(b"\n")
    _update_with_body(digest, raw, body_start)
    message_ids = wanted.get(b"message-id")
    return digest.hexdigest(), (message_ids[0] if message_ids else None)


_TRAILING_SPACE = b" \t\r\n"


def _update_with_body(digest: hashlib._Hash, raw: bytes, body_start: int) -> None:
    """Hash ``raw[body_start:]`` with LF line ends and no trailing white space, as
    ``lf_line_ends(body).rstrip()`` would, without copying the body three times.

    The whole message is converted once; the body's part of it starts where the header
    block's CRLFs, each now one byte shorter, leave it (the body begins after a blank line,
    so no CRLF straddles that point). Trailing white space is found from the end.
    """
    converted = lf_line_ends(raw)
    start = body_start - raw.count(b"\r\n", 0, body_start)
    end = len(converted)
    while end > start:
        piece = max(start, end - 4096)
        kept = converted[piece:end].rstrip(_TRAILING_SPACE)
        end = piece + len(kept)
        if kept:
            break
    digest.update(memoryview(converted)[start:end])


def lf_line_ends(data: bytes) -> bytes:
    """``data`` with every CRLF turned into LF (bare CRs stay), as ``replace`` would do.

    When every CR is part of a CRLF (as in all mail served over POP3), deleting the CRs is the
    same thing, and ``translate`` plus a count does it faster than ``replace`` (the CPython
    3.11 ``replace`` restarts its search at every line).
    """
    stripped = data.translate(None, b"\r")
    if len(data) - len(stripped) == data.count(b"\r\n"):
        return stripped
    return data.replace(b"\r\n", b"\n")


def normalize_message_id(value: str | None) -> str | None:
    """The comparable form of a Message-ID: ``<local@domain>`` with only the domain lowercased.

    The local part is case-sensitive (RFC 5322), the domain is not. Comments and folding
    whitespace are dropped. Returns None when nothing usable is there.
    """
    if not value:
        return None
    match = _ANGLE_TOKEN.search(value)
    if match is not None:
        token = _ASCII_SPACE.sub("", match.group(1))
    else:
        # Lenient: some senders omit the brackets; accept a bare token only if it has an '@'.
        bare = _COMMENT.sub(" ", value).split()
        token = bare[0] if bare else ""
        if "@" not in token:
            return None
    token = token.strip("<>")
    if not token or not token.isprintable():
        return None
    local, at, domain = token.rpartition("@")
    if at and local and domain:
        token = f"{local}@{domain.lower()}"
    return f"<{token}>"


def header_text(value: bytes) -> str:
    """Header bytes as text: UTF-8 when valid, else Latin-1 (never raises)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def message_key(raw: bytes) -> str:
    """The document ``_id``: ``sha256("v1\\0" + normalized Message-ID + "\\0" + fingerprint)``."""
    fingerprint, message_id = _fingerprint(raw)
    normalized = normalize_message_id(header_text(message_id)) if message_id is not None else None
    digest = hashlib.sha256()
    digest.update(KEY_VERSION + b"\0")
    digest.update((normalized or "").encode("utf-8", "replace"))
    digest.update(b"\0")
    digest.update(fingerprint.encode("ascii"))
    return digest.hexdigest()
