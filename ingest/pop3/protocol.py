"""POP3 wire format without sockets: replies, response codes, capabilities, multi-line data.

Everything here works on bytes handed in by a ``recv_into``-shaped callable, so the same code
reads a TLS socket in production and an in-memory stream in unit tests. The session
(:mod:`ingest.pop3.session`) owns the socket, the deadline and the mapping of OS errors.

Contract of :class:`ByteReader`:

* ``read_line`` returns one reply line without its line ending (CRLF or a bare LF, both seen
  in the wild). Lines longer than the caller's limit raise :class:`ProtocolError`.
* ``multiline`` returns the lines of a short multi-line reply (CAPA, LIST, UIDL), unstuffed.
* ``body_chunks`` streams a message body exactly as served: line endings kept, one leading
  "." removed from dot-stuffed lines, the terminating ".CRLF" consumed but not returned. It
  holds at most one buffer of data, whatever the line lengths: there is no line cap here,
  unlike stdlib ``poplib``'s 2,048 bytes.

Used errors: :class:`ProtocolError` (malformed replies, overlong lines) and its
response-code subclasses via :func:`error_for_reply`; :class:`ConnectError` when the stream
ends in the middle of a reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ingest.errors import (
    ConnectError,
    LoginDelay,
    MailboxInUse,
    ProtocolError,
    ServerPermFail,
    ServerTempFail,
)

READ_BUFFER_BYTES = 256 * 1024
"""Size of the receive buffer. Also the largest single reply line we can hold."""

MAX_LINE_BYTES = 64 * 1024
"""Longest status or listing line accepted. RFC 2449 allows 512 octets for a reply; XOAUTH2
error challenges and chatty servers need more, but a line this long is already abuse."""

CHUNK_BYTES = 256 * 1024
"""Message bodies are yielded in pieces of about this size (never the whole message)."""

MAX_CAPA_LINES = 100
"""Most CAPA lines read: prevents endless replies from a broken or hostile server."""

MAX_CAPA_BYTES = 64 * 1024
"""Most CAPA bytes read, for the same reason: 100 honest lines are a few KiB."""

MAX_LISTING_BYTES = 1024 * 1024 * 1024
"""Most LIST/UIDL bytes held in memory (about 10 million entries)."""

MAX_LISTING_LINES = 10_000_000
"""Most LIST/UIDL lines read; far above any real maildrop, low enough to stop a runaway."""

SPECIFIC_CODES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})
"""Response codes that name a cause more precise than the command's own failure."""

RecvInto = Callable[[memoryview], int]
"""Fills the given buffer and returns the number of bytes written; 0 means end of stream."""

_CODE_RE = re.compile(rb"^\[([A-Za-z0-9-]+(?:/[A-Za-z0-9-]+)*)\]\s*")
_TIMESTAMP_RE = re.compile(rb"<[!-~]+@[!-~]+>|<[!-;=?-~]+>")
_DOT = ord(".")
_LF = ord("\n")
_CR = ord("\r")


@dataclass(frozen=True)
class Reply:
    """One status line: ``+OK``, ``-ERR`` or a SASL ``+`` continuation.

    ``text`` is the server's words after the status and after any ``[CODE]``; it is
    untrusted and only ever shown through :func:`ingest.errors.trim_reply`.
    """

    status: str  # "+OK" | "-ERR" | "+"
    text: str
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "+OK"

    @property
    def is_continuation(self) -> bool:
        return self.status == "+"

    def shown(self) -> str:
        """The reply as a person should see it (code kept: it is useful in messages)."""
        code = f"[{self.code}] " if self.code else ""
        return f"{self.status} {code}{self.text}".strip()


def parse_reply(line: bytes) -> Reply:
    """Parse a status line; extended response codes (RFC 2449, 3206) may start any reply.

    Servers differ in whitespace ("+OK" alone, "+OK  text", "+" alone for a continuation),
    so only the status keyword is strict.
    """
    if line.startswith(b"+OK") and (len(line) == 3 or line[3:4] in (b" ", b"\t")):
        status, rest = "+OK", line[3:]
    elif line.startswith(b"-ERR") and (len(line) == 4 or line[4:5] in (b" ", b"\t")):
        status, rest = "-ERR", line[4:]
    elif line == b"+" or line.startswith(b"+ "):
        status, rest = "+", line[1:]
    else:
        raise ProtocolError("the server sent a line that is not a POP3 reply",
                            server_reply=line[:80])
    rest = rest.lstrip(b" \t")
    code = None
    match = _CODE_RE.match(rest)
    if match and status != "+":
        code = match.group(1).decode("ascii").upper()
        rest = rest[match.end():]
    return Reply(status=status, text=rest.decode("utf-8", "replace").strip(), code=code)


@dataclass(frozen=True)
class Greeting:
    """The server's first line; ``apop_timestamp`` is the ``<...>`` APOP needs, if offered."""

    text: str
    apop_timestamp: bytes | None


def parse_greeting(line: bytes) -> Greeting:
    """A greeting must be ``+OK``; anything else (``-ERR``, a banner of another protocol)
    means we reached the wrong service or the server refuses us."""
    try:
        reply = parse_reply(line)
    except ProtocolError:
        raise ProtocolError("the server did not greet with +OK: is this a POP3 port?",
                            server_reply=line[:80]) from None
    if not reply.ok:
        raise error_for_reply(reply, "greeting", default=ProtocolError(
            "the server refused the connection in its greeting", server_reply=reply.shown()))
    match = _TIMESTAMP_RE.search(line)
    return Greeting(text=reply.text, apop_timestamp=match.group(0) if match else None)


@dataclass(frozen=True)
class Capabilities:
    """What CAPA (RFC 2449) said. ``known`` is False when the server has no CAPA; then the
    tri-state fields (``user``, ``uidl``, ``top``) are ``None``: unknown, worth trying."""

    known: bool = False
    pipelining: bool = False
    uidl: bool | None = None
    top: bool | None = None
    user: bool | None = None
    sasl: frozenset[str] = frozenset()
    stls: bool = False
    resp_codes: bool = False
    auth_resp_code: bool = False
    login_delay_s: int | None = None
    expire: str | None = None  # "NEVER", a number of days, possibly followed by "USER"
    implementation: str | None = None
    lines: tuple[str, ...] = field(default=())

    @classmethod
    def unknown(cls) -> Capabilities:
        return cls()


def parse_capabilities(lines: list[bytes]) -> Capabilities:
    """Build :class:`Capabilities` from CAPA lines; unknown capabilities are kept in ``lines``.

    Names are case-insensitive (RFC 2449 section 6); arguments we do not understand are
    ignored rather than fatal, because a bad LOGIN-DELAY must not stop the archive.
    """
    flags: dict[str, list[str]] = {}
    shown: list[str] = []
    for raw in lines:
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            continue
        shown.append(text)
        name, *args = text.split()
        flags[name.upper()] = args
    login_delay = None
    if flags.get("LOGIN-DELAY"):
        value = flags["LOGIN-DELAY"][0]
        login_delay = int(value) if value.isdigit() else None
    impl = flags.get("IMPLEMENTATION")
    return Capabilities(
        known=True,
        pipelining="PIPELINING" in flags,
        uidl="UIDL" in flags,
        top="TOP" in flags,
        user="USER" in flags,
        sasl=frozenset(m.upper() for m in flags.get("SASL", [])),
        stls="STLS" in flags,
        resp_codes="RESP-CODES" in flags,
        auth_resp_code="AUTH-RESP-CODE" in flags,
        login_delay_s=login_delay,
        expire=" ".join(flags["EXPIRE"]) if flags.get("EXPIRE") else None,
        implementation=" ".join(impl) if impl else None,
        lines=tuple(shown),
    )


def error_for_reply(
    reply: Reply,
    command: str,
    *,
    default: ProtocolError | None = None,
    login_delay_s: int | None = None,
    account_id: str | None = None,
) -> ProtocolError:
    """Turn a ``-ERR`` into the most specific error its response code allows.

    Codes may appear on any ``-ERR`` (RFC 2449 section 8), so this is used for every
    command, not only logins. ``[AUTH]`` is not handled here: :mod:`ingest.pop3.auth` turns
    it into :class:`AuthError` because only there does it mean "wrong credentials".
    """
    shown = reply.shown()
    code = (reply.code or "").upper()
    if code == "IN-USE":
        return MailboxInUse(f"{command} failed: the mailbox is in use by another session",
                            account_id=account_id, server_reply=shown)
    if code == "LOGIN-DELAY":
        wait = f" (the server allows one login every {login_delay_s} s)" if login_delay_s else ""
        return LoginDelay(f"{command} failed: logged in again too soon{wait}",
                          delay_s=login_delay_s, account_id=account_id, server_reply=shown)
    if code == "SYS/TEMP":
        return ServerTempFail(f"{command} failed: temporary problem on the server",
                              account_id=account_id, server_reply=shown)
    if code == "SYS/PERM":
        return ServerPermFail(f"{command} failed: lasting problem on the server",
                              account_id=account_id, server_reply=shown)
    if default is not None:
        if account_id and default.account_id is None:
            default.account_id = account_id
        return default
    return ProtocolError(f"{command} failed", account_id=account_id, server_reply=shown)


class ByteReader:
    """Buffered reader over a ``recv_into`` callable; see the module docstring for the
    contract. The buffer is a fixed ``bytearray`` filled in place: no per-read allocation."""

    def __init__(self, recv_into: RecvInto, *, buffer_bytes: int = READ_BUFFER_BYTES) -> None:
        self._recv_into = recv_into
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        self._start = 0  # first unread byte
        self._end = 0  # one past the last received byte

    def set_source(self, recv_into: RecvInto) -> None:
        """Switch the byte source (after STLS); only allowed with an empty buffer."""
        if self.pending():
            raise ProtocolError("the server sent data before the TLS handshake (after STLS); "
                                "refusing it as a possible injection")
        self._recv_into = recv_into

    def pending(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._start

    def _fill(self) -> None:
        """Receive more bytes, compacting first when the free tail is small."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < len(self._buf) // 4:
            size = self._end - self._start
            self._buf[0:size] = self._buf[self._start:self._end]
            self._start, self._end = 0, size
        if self._end == len(self._buf):
            raise ProtocolError("reply line longer than the receive buffer")
        got = self._recv_into(self._view[self._end:])
        if got <= 0:
            raise ConnectError("the server closed the connection in the middle of a reply")
        self._end += got

    def read_line(self, max_bytes: int = MAX_LINE_BYTES) -> bytes:
        """Return one line without CRLF/LF; raise ProtocolError past ``max_bytes``."""
        scanned = self._start
        while True:
            nl = self._buf.find(b"\n", scanned, self._end)
            if nl >= 0:
                if nl - self._start > max_bytes:
                    raise ProtocolError(f"reply line longer than {max_bytes} bytes")
                line_end = nl - 1 if nl > self._start and self._buf[nl - 1] == _CR else nl
                line = bytes(self._buf[self._start:line_end])
                self._start = nl + 1
                return line
            if self._end - self._start > max_bytes:
                raise ProtocolError(f"reply line longer than {max_bytes} bytes")
            scanned = self._end
            before = self._start
            self._fill()
            scanned -= before - self._start  # compaction moved the data

    def multiline(self, *, max_lines: int, what: str,
                  max_bytes: int = MAX_LISTING_BYTES) -> list[bytes]:
        """Return the unstuffed lines of a multi-line reply (CAPA, LIST, UIDL).

        The reply is read as one block with the body scanner and split in C: a UIDL of
        100,000 messages costs one ``splitlines``, not 100,000 Python-level line reads.
        Past ``max_bytes`` or ``max_lines`` it raises ProtocolError; the stream is then
        out of step and the caller must drop the connection.
        """
        parts: list[bytes] = []
        size = 0
        for chunk in self.body_chunks():
            size += len(chunk)
            if size > max_bytes:
                raise ProtocolError(f"{what}: reply larger than {max_bytes} bytes; giving up")
            parts.append(chunk)
        lines = b"".join(parts).splitlines()
        if len(lines) > max_lines:
            raise ProtocolError(f"{what}: more than {max_lines} lines; giving up")
        return lines

    def body_chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """Stream a multi-line body as served, undoing dot-stuffing (RFC 1939 section 3).

        Only lines that start with "." need attention, so the scan looks for ``b"\\n."``
        and copies everything in between in one slice. A terminator or a stuffed dot split
        across two receives is handled by the ``at_line_start`` state: we wait for the two
        or three bytes needed to decide. Bare-LF servers are tolerated: ``".\\n"`` ends the
        body too, and all bytes are kept exactly as served.
        """
        buf = self._buf
        out = bytearray()
        at_line_start = True
        while True:
            if self._start == self._end:
                self._fill()
            if at_line_start and buf[self._start] == _DOT:
                avail = self._end - self._start
                if avail < 2:
                    self._fill()
                    continue
                nxt = buf[self._start + 1]
                if nxt == _LF:  # ".\n": bare-LF terminator
                    self._start += 2
                    break
                if nxt == _CR:
                    if avail < 3:
                        self._fill()
                        continue
                    if buf[self._start + 2] == _LF:  # ".\r\n": the terminator
                        self._start += 3
                        break
                elif nxt == _DOT:  # ".." starts a stuffed line: drop exactly one dot
                    self._start += 1
                # any other "."-line is a server bug; keep it as served
            at_line_start = False
            hit = buf.find(b"\n.", self._start, self._end)
            if hit < 0:
                stop = self._end
                at_line_start = buf[stop - 1] == _LF
            else:
                stop = hit + 1
                at_line_start = True
            out += self._view[self._start:stop]
            self._start = stop
            if len(out) >= chunk_bytes:
                yield bytes(out)
                out.clear()
        if out:
            yield bytes(out)
