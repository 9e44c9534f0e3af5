"""One POP3 connection: connect, TLS or STLS, CAPA, login, and the TRANSACTION commands.

The session owns the socket, the read timeout and the overall deadline; wire parsing lives
in :mod:`ingest.pop3.protocol`, logins in :mod:`ingest.pop3.auth`. Foreign exceptions
(``socket.gaierror``, ``TimeoutError``, ``ssl.SSLError``...) become popvault errors at this
boundary, most specific first, always ``raise ... from exc``.

Deletion rule: DELE only marks; the server expunges at QUIT. :meth:`Pop3Session.close` and
leaving the ``with`` block close the socket *without* QUIT, so a session that fails part way
deletes nothing. Call :meth:`Pop3Session.quit` only after every wanted DELE.

Staged use (``check.py`` walks these one by one; :meth:`Pop3Session.open` does them all)::

    s = Pop3Session.connect(account)         # DNS + TCP
    s.start_tls()                            # security = "tls" only
    s.read_greeting(); s.capa()
    s.stls()                                 # security = "starttls" only; CAPA again
    s.login(password=..., token=...)
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import NoReturn

from ingest.config import AccountConfig
from ingest.errors import (
    ConnectError,
    PopvaultError,
    ProtocolError,
    TLSError,
    UidlUnsupported,
)
from ingest.pop3 import auth
from ingest.pop3.protocol import (
    CHUNK_BYTES,
    MAX_CAPA_BYTES,
    MAX_CAPA_LINES,
    MAX_LISTING_BYTES,
    MAX_LISTING_LINES,
    SPECIFIC_CODES,
    ByteReader,
    Capabilities,
    Greeting,
    Reply,
    error_for_reply,
    parse_capabilities,
    parse_greeting,
    parse_reply,
)
from ingest.pop3.tls import TLS_SESSIONS, describe_verify_error, shared_ssl_context

log = logging.getLogger("popvault.pop3")

PIPELINE_WINDOW = 32
"""Most RETR/DELE commands outstanding at once when the server advertises PIPELINING.

Refill rule: send a full window, then whenever the unanswered count falls below
:data:`PIPELINE_REFILL_AT` send enough commands (in one write) to bring it back to the
window. Batched writes keep syscalls and TLS records few; refilling before the pipe runs dry
keeps the server streaming. Without PIPELINING the window is 1 on the same code path."""

PIPELINE_REFILL_AT = 8
"""Outstanding count below which the window is topped up (see :data:`PIPELINE_WINDOW`)."""

MAX_TOP_BYTES = 64 * 1024 * 1024
"""Largest TOP answer kept in memory; beyond it TOP fails (the reply is still read off)."""

UIDL_MAX_CHARS = 70
"""RFC 1939: a unique-id is 1 to 70 characters in 0x21-0x7E. Checked but only logged."""

_UIDL_LINE_RE = re.compile(rb"(\d+) ([\x21-\x7e]{1,%d})" % UIDL_MAX_CHARS)
_CONTROL_RE = re.compile(rb"[\x00-\x1f\x7f]")


class Retrieval:
    """One message of a :meth:`Pop3Session.retrieve` run.

    Either ``error`` is set from the start (the server said -ERR to this RETR; no chunks),
    or :meth:`chunks` streams the body; afterwards ``octets`` holds the bytes yielded and
    ``short``/``error`` say whether the body was too short for its LIST size.
    """

    def __init__(self, session: Pop3Session, number: int, expected_size: int,
                 error: ProtocolError | None = None) -> None:
        self.number = number
        self.expected_size = expected_size
        self.error = error
        self.octets = 0
        self.lines = 0
        self.short = False
        self.done = error is not None
        self._session = session
        self._started = False

    def __repr__(self) -> str:
        state = "error" if self.error else ("done" if self.done else "pending")
        return (f"Retrieval(number={self.number}, expected_size={self.expected_size}, "
                f"octets={self.octets}, {state})")

    def chunks(self) -> Iterator[bytes]:
        """Yield the body (CRLF kept, dot-stuffing undone) in pieces of <= ~256 KiB.

        Can be called once. The size check runs when the body has been read to its end.
        """
        if self._started:
            raise RuntimeError(f"RETR {self.number}: chunks() can only be consumed once")
        self._started = True
        if self.error is not None:
            return
        for chunk in self._session._body_chunks():
            self.octets += len(chunk)
            self.lines += chunk.count(b"\n")
            yield chunk
        self._finish()

    def read(self) -> bytes:
        """The whole body at once: convenient for small messages and tests."""
        return b"".join(self.chunks())

    def drain(self) -> None:
        """Read and drop what is left of the body, keeping the pipeline in step."""
        if self.done:
            return
        it = self.chunks() if not self._started else None
        if it is None:  # a partially consumed chunks() generator: cannot resume it
            self._session._abort()
            raise ProtocolError(f"RETR {self.number}: body only partly read and abandoned; "
                                "the connection is out of step")
        for _ in it:
            pass

    def _finish(self) -> None:
        """Compare what came with LIST's size.

        RFC 1939 makes the LIST size exact, but servers compute it differently (some count
        LF line ends while serving CRLF, some count CRLF while serving bare LF). So: a body
        that is larger than or equal to LIST is fine; a body shorter by no more than one
        octet per line is a counting difference; shorter than that means the transfer lost
        data (a truncated spool file, a broken proxy), and the fetch fails.
        """
        self.done = True
        if self.octets + self.lines < self.expected_size:
            self.short = True
            self.error = ProtocolError(
                f"RETR {self.number}: received {self.octets} of {self.expected_size} octets",
                account_id=self._session.account.id)
            log.warning("short message", extra={"account_id": self._session.account.id,
                                                "number": self.number, "octets": self.octets,
                                                "expected": self.expected_size})


class Pop3Session:
    """A POP3 connection in AUTHORIZATION or TRANSACTION state. Use as a context manager."""

    def __init__(self, account: AccountConfig, sock: socket.socket, *,
                 deadline_s: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.account = account
        self._sock: socket.socket | ssl.SSLSocket = sock
        self._ssl_context = ssl_context
        total = account.session_deadline_s if deadline_s is None else deadline_s
        self._deadline = time.monotonic() + total
        self._deadline_s = total
        self._read_timeout_s = account.read_timeout_s
        self._timeout_now: float | None = account.read_timeout_s
        self._reader = ByteReader(self._recv_into)
        self._broken = False
        self._closed = False
        self.greeting: Greeting | None = None
        self.capabilities = Capabilities.unknown()
        self.mechanism: str | None = None
        self._open_pipeline: Generator[Retrieval, None, None] | None = None

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def connect(cls, account: AccountConfig, *, deadline_s: float | None = None,
                ssl_context: ssl.SSLContext | None = None) -> Pop3Session:
        """Resolve and TCP-connect within ``account.connect_timeout_s``; nothing is read."""
        host, port = account.host, account.port
        try:
            sock = socket.create_connection((host, port), timeout=account.connect_timeout_s)
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve host {host!r}: {exc.strerror}",
                               account_id=account.id) from exc
        except TimeoutError as exc:
            raise ConnectError(f"connecting to {host}:{port} timed out after "
                               f"{account.connect_timeout_s:g} s", account_id=account.id) from exc
        except ConnectionRefusedError as exc:
            raise ConnectError(f"connection to {host}:{port} refused",
                               account_id=account.id) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                               account_id=account.id) from exc
        # Commands are tiny and pipelined; do not let Nagle hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(account.read_timeout_s)
        return cls(account, sock, deadline_s=deadline_s, ssl_context=ssl_context)

    @classmethod
    def open(cls, account: AccountConfig, *, password: str | None, token: str | None,
             deadline_s: float | None = None,
             ssl_context: ssl.SSLContext | None = None) -> Pop3Session:
        """Connect, secure the link as ``account.security`` says, read CAPA and log in.

        Returns a session in TRANSACTION state; on any failure the socket is closed
        (without QUIT) and the popvault error propagates.
        """
        session = cls.connect(account, deadline_s=deadline_s, ssl_context=ssl_context)
        try:
            if account.security == "tls":
                session.start_tls()
            session.read_greeting()
            session.capa()
            if account.security == "starttls":
                session.stls()
            session.login(password=password, token=token)
        except BaseException:
            session.close()
            raise
        return session

    def __enter__(self) -> Pop3Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Pop3Session(account_id={self.account.id!r}, host={self.account.host!r}, "
                f"port={self.account.port}, encrypted={self.encrypted})")

    # ---- link ---------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    def tls_info(self) -> dict[str, object]:
        """Protocol, cipher and (when verified) certificate fields, for diagnosis."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return {}
        cipher = self._sock.cipher()
        return {"version": self._sock.version(), "cipher": cipher[0] if cipher else None,
                "certificate": self._sock.getpeercert() or {},
                "session_reused": self._sock.session_reused}

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = shared_ssl_context(self.account.ca_file, self.account.verify)
        return self._ssl_context

    def start_tls(self) -> None:
        """TLS handshake on the current socket (implicit TLS now, or after STLS)."""
        host = self.account.host
        raw = self._sock
        if self._remaining() <= 0:
            self._deadline_error()
        raw.settimeout(min(self.account.connect_timeout_s, self._remaining()))
        context = self._context()
        try:
            self._sock = context.wrap_socket(
                raw, server_hostname=host,
                session=TLS_SESSIONS.get(host, self.account.port, context))
        except ssl.SSLCertVerificationError as exc:
            self._abort()
            raise TLSError(describe_verify_error(exc, host), account_id=self.account.id) from exc
        except ssl.SSLError as exc:
            self._abort()
            raise TLSError(f"TLS handshake with {host}:{self.account.port} failed: "
                           f"{exc.reason or exc}", account_id=self.account.id) from exc
        except TimeoutError as exc:
            self._abort()
            raise ConnectError(f"TLS handshake with {host}:{self.account.port} timed out",
                               account_id=self.account.id) from exc
        except OSError as exc:
            self._abort()
            raise ConnectError(f"connection lost during the TLS handshake: "
                               f"{exc.strerror or exc}", account_id=self.account.id) from exc
        self._sock.settimeout(self._read_timeout_s)
        self._timeout_now = self._read_timeout_s
        self._reader.set_source(self._recv_into)

    def _remaining(self) -> float:
        return self._deadline - time.monotonic()

    def _deadline_error(self) -> NoReturn:
        self._abort()
        raise ConnectError(f"session deadline of {self._deadline_s:g} s exceeded",
                           account_id=self.account.id)

    def _recv_into(self, view: memoryview) -> int:
        """The reader's byte source: the deadline is checked on every read."""
        remaining = self._remaining()
        if remaining <= 0:
            self._deadline_error()
        want = self._read_timeout_s if remaining > self._read_timeout_s else remaining
        if want != self._timeout_now:
            self._sock.settimeout(want)
            self._timeout_now = want
        try:
            return self._sock.recv_into(view)
        except TimeoutError as exc:
            if self._remaining() <= 0:
                self._abort()
                raise ConnectError(f"session deadline of {self._deadline_s:g} s exceeded",
                                   account_id=self.account.id) from exc
            self._abort()
            raise ConnectError(f"no answer from the server for {want:g} s (read timeout)",
                               account_id=self.account.id) from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            self._abort()
            raise ConnectError("the server closed the TLS connection",
                               account_id=self.account.id) from exc
        except ssl.SSLError as exc:
            self._abort()
            raise TLSError(f"TLS error while reading: {exc.reason or exc}",
                           account_id=self.account.id) from exc
        except OSError as exc:
            self._abort()
            raise ConnectError(f"connection lost: {exc.strerror or exc}",
                               account_id=self.account.id) from exc

    def _send(self, data: bytes, shown: str) -> None:
        if self._broken or self._closed:
            raise ConnectError("the session is closed after an earlier error",
                               account_id=self.account.id)
        if self._remaining() <= 0:
            self._deadline_error()
        log.debug("C: %s", shown, extra={"account_id": self.account.id})
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            self._abort()
            raise ConnectError("sending to the server timed out",
                               account_id=self.account.id) from exc
        except ssl.SSLError as exc:
            self._abort()
            raise TLSError(f"TLS error while sending: {exc.reason or exc}",
                           account_id=self.account.id) from exc
        except OSError as exc:
            self._abort()
            raise ConnectError(f"connection lost while sending {shown.split()[0]}: "
                               f"{exc.strerror or exc}", account_id=self.account.id) from exc

    def _read_reply(self) -> Reply:
        try:
            reply = parse_reply(self._reader.read_line())
        except PopvaultError as exc:
            self._abort()
            if exc.account_id is None:
                exc.account_id = self.account.id
            raise
        log.debug("S: %s", reply.shown()[:200], extra={"account_id": self.account.id})
        return reply

    # AuthChannel for ingest.pop3.auth
    def send_line(self, line: bytes, *, redacted: str | None = None) -> None:
        shown = redacted if redacted is not None else line.decode("utf-8", "replace")
        self._send(line + b"\r\n", shown)

    def read_reply(self) -> Reply:
        return self._read_reply()

    def _command(self, command: str) -> Reply:
        self._finish_pipeline()
        self._send(command.encode("utf-8") + b"\r\n", command)
        return self._read_reply()

    def _expect_ok(self, command: str) -> Reply:
        reply = self._command(command)
        if not reply.ok:
            raise error_for_reply(reply, command, account_id=self.account.id,
                                  login_delay_s=self.capabilities.login_delay_s)
        return reply

    def _lines(self, what: str, max_lines: int, max_bytes: int = MAX_LISTING_BYTES,
               ) -> list[bytes]:
        try:
            return self._reader.multiline(max_lines=max_lines, what=what, max_bytes=max_bytes)
        except PopvaultError:
            self._abort()
            raise

    def _body_chunks(self) -> Iterator[bytes]:
        try:
            yield from self._reader.body_chunks(CHUNK_BYTES)
        except PopvaultError:
            self._abort()
            raise

    # ---- AUTHORIZATION ------------------------------------------------------------------

    def read_greeting(self) -> Greeting:
        """Read the ``+OK`` greeting; keeps the APOP timestamp if there is one."""
        try:
            self.greeting = parse_greeting(self._reader.read_line())
        except PopvaultError as exc:
            self._abort()
            exc.account_id = exc.account_id or self.account.id
            raise
        return self.greeting

    def capa(self) -> Capabilities:
        """Ask CAPA; a server without it (-ERR) leaves every capability unknown."""
        reply = self._command("CAPA")
        if not reply.ok:
            self.capabilities = Capabilities.unknown()
        else:
            self.capabilities = parse_capabilities(
                self._lines("CAPA", MAX_CAPA_LINES, MAX_CAPA_BYTES))
        return self.capabilities

    def stls(self) -> None:
        """STLS (RFC 2595): require it advertised, upgrade, then CAPA again.

        Capabilities seen before TLS came over an unprotected link (an attacker could strip
        SASL PLAIN or PIPELINING), so they are discarded and asked for again.
        """
        if not self.capabilities.stls:
            self._abort()
            raise TLSError(f"security = 'starttls' but the server at {self.account.host}:"
                           f"{self.account.port} does not offer STLS in CAPA; use port 995 "
                           "with security = 'tls' if it has one", account_id=self.account.id)
        reply = self._command("STLS")
        if not reply.ok:
            self._abort()
            raise TLSError("the server refused STLS", account_id=self.account.id,
                           server_reply=reply.shown())
        if self._reader.pending():
            self._abort()
            raise TLSError("the server sent data right after accepting STLS; refusing it "
                           "as a possible command injection", account_id=self.account.id)
        self.capabilities = Capabilities.unknown()
        self.start_tls()
        self.capa()

    def login(self, *, password: str | None, token: str | None) -> str:
        """Authenticate (see :mod:`ingest.pop3.auth`); returns the mechanism used."""
        if self.greeting is None:
            raise ProtocolError("login before the greeting was read")
        try:
            self.mechanism = auth.authenticate(
                self, self.account, caps=self.capabilities,
                apop_timestamp=self.greeting.apop_timestamp, password=password, token=token)
        except PopvaultError:
            self._abort()
            raise
        if isinstance(self._sock, ssl.SSLSocket) and self._ssl_context is not None:
            # Read by now: the ticket a TLS 1.3 server sends after the handshake.
            TLS_SESSIONS.put(self.account.host, self.account.port, self._ssl_context,
                             self._sock.session)
        return self.mechanism

    # ---- TRANSACTION --------------------------------------------------------------------

    def stat(self) -> tuple[int, int]:
        """Message count and total octets (maildrop as of login)."""
        reply = self._expect_ok("STAT")
        parts = reply.text.split()
        try:
            return int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            self._abort()
            raise ProtocolError("STAT: reply is not '+OK count octets'",
                                account_id=self.account.id, server_reply=reply.shown()) from None

    def list_sizes(self) -> dict[int, int]:
        """Message number -> octets, from multi-line LIST."""
        self._expect_ok("LIST")
        sizes: dict[int, int] = {}
        for line in self._lines("LIST", MAX_LISTING_LINES):
            parts = line.split()
            try:
                sizes[int(parts[0])] = int(parts[1])
            except (IndexError, ValueError):
                self._abort()
                raise ProtocolError("LIST: malformed line", account_id=self.account.id,
                                    server_reply=line[:80]) from None
        return sizes

    def uidl(self, *, tolerate_missing: bool = False) -> dict[int, str] | None:
        """Message number -> unique id. Without UIDL: UidlUnsupported, or None if tolerated.

        RFC 1939 says a unique-id is 1-70 characters in 0x21-0x7E. Real servers break it
        (longer ids, 8-bit bytes from odd encodings); since the id is only compared with
        itself on the next poll, we keep any non-empty id as served and log the oddity.
        What we cannot use is an empty id or one with control characters (it could not
        round-trip a log line or a key); those lines are a protocol error.
        """
        reply = self._command("UIDL")
        if not reply.ok:
            if reply.code in SPECIFIC_CODES:
                raise error_for_reply(reply, "UIDL", account_id=self.account.id)
            if tolerate_missing:
                return None
            raise UidlUnsupported("the server does not support UIDL, so popvault cannot tell "
                                  "new messages from old ones; set uidl_fallback = 'content'",
                                  account_id=self.account.id, server_reply=reply.shown())
        uids: dict[int, str] = {}
        for line in self._lines("UIDL", MAX_LISTING_LINES):
            match = _UIDL_LINE_RE.fullmatch(line)  # fast path: the RFC-conforming line
            if match:
                uids[int(match.group(1))] = match.group(2).decode("ascii")
                continue
            number, _, uid_bytes = line.strip().partition(b" ")
            uid = uid_bytes.strip().decode("utf-8", "surrogateescape")
            if not number.isdigit() or not uid or _CONTROL_RE.search(uid_bytes.strip()):
                self._abort()
                raise ProtocolError("UIDL: malformed line", account_id=self.account.id,
                                    server_reply=line[:80])
            log.info("unique id outside RFC 1939 rules kept as served",
                     extra={"account_id": self.account.id, "number": int(number)})
            uids[int(number)] = uid
        return uids

    def top(self, number: int, lines: int) -> bytes:
        """Headers plus ``lines`` body lines of one message (TOP, optional in RFC 1939)."""
        self._expect_ok(f"TOP {number} {lines}")
        parts: list[bytes] = []
        size = 0
        for chunk in self._body_chunks():
            size += len(chunk)
            if size <= MAX_TOP_BYTES:
                parts.append(chunk)
        if size > MAX_TOP_BYTES:
            raise ProtocolError(f"TOP {number}: answer larger than {MAX_TOP_BYTES} bytes",
                                account_id=self.account.id)
        return b"".join(parts)

    def noop(self) -> None:
        self._expect_ok("NOOP")

    def rset(self) -> None:
        """Unmark every message marked by DELE in this session."""
        self._expect_ok("RSET")

    def _window(self, window: int | None) -> int:
        """Pipelining only when the server advertised it *and* the account allows it."""
        if not (self.capabilities.pipelining and self.account.pipelining):
            return 1
        return PIPELINE_WINDOW if window is None else max(1, window)

    def _pipelined(self, commands: Sequence[str], window: int,
                   on_abandon: Callable[[Reply], None] | None = None,
                   ) -> Generator[tuple[int, Reply], None, None]:
        """Send ``commands`` keeping up to ``window`` outstanding; yield (index, reply).

        The caller must read any multi-line data of reply ``i`` before asking for the next.
        If the caller stops early, the replies already requested are still read (and passed
        to ``on_abandon`` so it can drop their data): the session stays usable for DELE and
        QUIT instead of being out of step.
        """
        refill_at = min(PIPELINE_REFILL_AT, window)
        sent = 0
        index = 0
        try:
            while index < len(commands):
                if sent - index < refill_at and sent < len(commands):
                    batch = commands[sent:min(len(commands), index + window)]
                    shown = batch[0] if len(batch) == 1 else (
                        f"{batch[0]} .. {batch[-1]} ({len(batch)} pipelined)")
                    self._send("".join(f"{c}\r\n" for c in batch).encode("ascii"), shown)
                    sent += len(batch)
                reply = self._read_reply()
                index += 1
                yield index - 1, reply
        finally:
            if index < sent and not self._broken:
                log.debug("reading %d abandoned pipelined replies", sent - index,
                          extra={"account_id": self.account.id})
                for _ in range(sent - index):
                    reply = self._read_reply()
                    if on_abandon is not None:
                        on_abandon(reply)

    def _drop_body(self, reply: Reply) -> None:
        if reply.ok:
            for _ in self._body_chunks():
                pass

    def retrieve(self, items: Sequence[tuple[int, int]], *,
                 window: int | None = None) -> Iterator[Retrieval]:
        """RETR each (number, LIST size), pipelined, yielding one :class:`Retrieval` each.

        Consume each Retrieval's :meth:`Retrieval.chunks` fully before advancing: an
        untouched body is drained (read and dropped) when you advance, a half-read one
        raises ProtocolError and drops the connection. Stopping early (``break``, or any
        other command on the session) reads off the RETRs already sent, so DELE and QUIT
        still work. ``window=None`` means :data:`PIPELINE_WINDOW` when the server and the
        account allow pipelining, else 1.
        """
        self._finish_pipeline()
        run = self._retrieve(items, self._window(window))
        self._open_pipeline = run
        return run

    def _retrieve(self, items: Sequence[tuple[int, int]], window: int,
                  ) -> Generator[Retrieval, None, None]:
        commands = [f"RETR {number}" for number, _ in items]
        replies = self._pipelined(commands, window, self._drop_body)
        try:
            for index, reply in replies:
                number, size = items[index]
                if reply.ok:
                    item = Retrieval(self, number, size)
                else:
                    err = error_for_reply(reply, f"RETR {number}", account_id=self.account.id)
                    item = Retrieval(self, number, size, error=err)
                try:
                    yield item
                finally:
                    if not item.done and not self._broken:
                        item.drain()
        finally:
            replies.close()  # reads off replies already requested (see _pipelined)

    def _finish_pipeline(self) -> None:
        """Before any other command: end an unfinished retrieve() so replies stay in step."""
        run, self._open_pipeline = self._open_pipeline, None
        if run is not None:
            run.close()

    def dele(self, numbers: Iterable[int], *,
             window: int | None = None) -> dict[int, ProtocolError]:
        """Mark messages deleted, pipelined; returns the refusals (empty: all marked).

        Marks take effect only at :meth:`quit`.
        """
        self._finish_pipeline()
        nums = list(numbers)
        failed: dict[int, ProtocolError] = {}
        for index, reply in self._pipelined([f"DELE {n}" for n in nums], self._window(window)):
            if not reply.ok:
                failed[nums[index]] = error_for_reply(reply, f"DELE {nums[index]}",
                                                      account_id=self.account.id)
        return failed

    def quit(self) -> None:
        """QUIT: the server enters UPDATE and removes the marked messages, then closes.

        ``-ERR`` here (RFC 1939: "some deleted messages not removed") raises ProtocolError.
        """
        try:
            reply = self._command("QUIT")
        finally:
            self.close()
        if not reply.ok:
            raise error_for_reply(reply, "QUIT", account_id=self.account.id,
                                  default=ProtocolError(
                                      "QUIT failed: the server may not have removed the "
                                      "deleted messages", account_id=self.account.id,
                                      server_reply=reply.shown()))

    # ---- teardown -----------------------------------------------------------------------

    def _abort(self) -> None:
        """After an error the stream is out of step: drop it, never QUIT."""
        self._broken = True
        self.close()

    def close(self) -> None:
        """Close the socket without QUIT: DELE marks are discarded by the server."""
        if self._closed:
            return
        self._closed = True
        self._broken = True  # an open retrieve() must not try to drain a closed socket
        with contextlib.suppress(OSError):  # closing a dead socket
            self._sock.close()


def open_session(account: AccountConfig, *, password: str | None, token: str | None,
                 deadline_s: float | None = None) -> Pop3Session:
    """Function form of :meth:`Pop3Session.open`."""
    return Pop3Session.open(account, password=password, token=token, deadline_s=deadline_s)
