"""Wire parsing without a server: replies, codes, CAPA, and the streaming body reader."""

from __future__ import annotations

import io
import logging
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.errors import (
    ConnectError,
    LoginDelay,
    MailboxInUse,
    ProtocolError,
    ServerPermFail,
    ServerTempFail,
    TLSError,
    UidlUnsupported,
)
from ingest.pop3.protocol import (
    MAX_CAPA_LINES,
    ByteReader,
    error_for_reply,
    parse_capabilities,
    parse_greeting,
    parse_reply,
)
from ingest.pop3.session import Pop3Session

pytestmark = pytest.mark.unit


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF/LF body the way a server does and add the terminator."""
    lines = [line + b"\n" for line in body.split(b"\n")]
    lines[-1] = lines[-1][:-1]  # split() leaves the text after the last LF (often empty)
    out = b"".join(b"." + line if line.startswith(b".") else line for line in lines)
    return out + b".\r\n"


def reader_over(data: bytes, sizes: Iterator[int] | None = None) -> ByteReader:
    """A ByteReader whose receives return at most ``next(sizes)`` bytes each."""
    stream = io.BytesIO(data)

    def recv_into(view: memoryview) -> int:
        limit = len(view) if sizes is None else max(1, min(len(view), next(sizes)))
        return stream.readinto(view[:limit])

    return ByteReader(recv_into)


def const(n: int) -> Iterator[int]:
    while True:
        yield n


def rand_sizes(seed: int, top: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, top)


# ---- replies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "status", "text", "code"),
    [
        (b"+OK", "+OK", "", None),
        (b"+OK 2 320", "+OK", "2 320", None),
        (b"-ERR no such message", "-ERR", "no such message", None),
        (b"-ERR [IN-USE] locked", "-ERR", "locked", "IN-USE"),
        (b"-ERR [sys/temp] try later", "-ERR", "try later", "SYS/TEMP"),
        (b"-ERR [AUTH] Authentication failed.", "-ERR", "Authentication failed.", "AUTH"),
        (b"+ ", "+", "", None),
        (b"+", "+", "", None),
        (b"+ eyJzdGF0dXMiOiI0MDEifQ==", "+", "eyJzdGF0dXMiOiI0MDEifQ==", None),
        (b"-ERR", "-ERR", "", None),
    ],
)
def test_parse_reply(line: bytes, status: str, text: str, code: str | None) -> None:
    reply = parse_reply(line)
    assert (reply.status, reply.text, reply.code) == (status, text, code)


@pytest.mark.parametrize("line", [b"* OK IMAP4 ready", b"220 smtp ready", b"+OKAY", b""])
def test_parse_reply_rejects_other_protocols(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(line)


def test_greeting_apop_timestamp() -> None:
    g = parse_greeting(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>")
    assert g.apop_timestamp == b"<1896.697170952@dbc.mtview.ca.us>"
    assert parse_greeting(b"+OK Dovecot ready.").apop_timestamp is None


def test_greeting_errors() -> None:
    with pytest.raises(ProtocolError, match="greet"):
        parse_greeting(b"* OK [CAPABILITY IMAP4rev1] ready")
    with pytest.raises(ServerTempFail):
        parse_greeting(b"-ERR [SYS/TEMP] overloaded")
    with pytest.raises(ProtocolError, match="refused the connection"):
        parse_greeting(b"-ERR go away")


def test_capabilities() -> None:
    caps = parse_capabilities([
        b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"USER",
        b"SASL PLAIN xoauth2", b"STLS", b"LOGIN-DELAY 900", b"EXPIRE NEVER",
        b"IMPLEMENTATION Shlemazle-Plotz-v302", b"X-FUTURE thing",
    ])
    assert caps.known and caps.pipelining and caps.uidl and caps.top and caps.user
    assert caps.stls and caps.resp_codes and caps.auth_resp_code
    assert caps.sasl == frozenset({"PLAIN", "XOAUTH2"})
    assert caps.login_delay_s == 900
    assert caps.expire == "NEVER"
    assert caps.implementation == "Shlemazle-Plotz-v302"
    assert "X-FUTURE thing" in caps.lines


def test_capabilities_lenient_and_unknown() -> None:
    caps = parse_capabilities([b"login-delay soon", b"user"])
    assert caps.login_delay_s is None and caps.user is True and caps.uidl is False
    unknown = type(caps).unknown()
    assert not unknown.known and unknown.user is None and unknown.uidl is None


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"-ERR [IN-USE] Mailbox locked", MailboxInUse),
        (b"-ERR [LOGIN-DELAY] wait", LoginDelay),
        (b"-ERR [SYS/TEMP] disk", ServerTempFail),
        (b"-ERR [SYS/PERM] gone", ServerPermFail),
        (b"-ERR no such message", ProtocolError),
    ],
)
def test_error_for_reply(line: bytes, kind: type[ProtocolError]) -> None:
    err = error_for_reply(parse_reply(line), "RETR 3", login_delay_s=60, account_id="a")
    assert type(err) is kind
    assert err.server_reply and err.server_reply.startswith("-ERR")
    assert "RETR 3" in err.message
    if isinstance(err, LoginDelay):
        assert err.delay_s == 60
    assert err.transient == (kind in (MailboxInUse, LoginDelay, ServerTempFail))


# ---- lines ----------------------------------------------------------------------------------


def test_read_line_crlf_lf_and_split() -> None:
    r = reader_over(b"+OK one\r\n+OK two\n+OK three\r\n", const(1))
    assert [r.read_line(), r.read_line(), r.read_line()] == [b"+OK one", b"+OK two",
                                                             b"+OK three"]
    with pytest.raises(ConnectError):
        r.read_line()


def test_read_line_cap() -> None:
    r = reader_over(b"+OK " + b"x" * 5000 + b"\r\n")
    with pytest.raises(ProtocolError, match="longer than 1000"):
        r.read_line(1000)


def test_multiline_unstuffs_and_caps() -> None:
    r = reader_over(b"1 abc\r\n..weird\r\n.\r\n+OK next\r\n", const(3))
    assert r.multiline(max_lines=10, what="UIDL") == [b"1 abc", b".weird"]
    assert r.read_line() == b"+OK next"
    endless = reader_over(b"X\r\n" * (MAX_CAPA_LINES + 5) + b".\r\n")
    with pytest.raises(ProtocolError, match="more than 100 lines"):
        endless.multiline(max_lines=MAX_CAPA_LINES, what="CAPA")
    huge = reader_over(b"X" * 100_000 + b"\r\n.\r\n")
    with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
        huge.multiline(max_lines=MAX_CAPA_LINES, what="CAPA", max_bytes=1000)


# ---- message bodies -------------------------------------------------------------------------

BODIES = {
    "plain": b"Subject: hi\r\n\r\nhello\r\n",
    "dots": b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n.x\r\nend.\r\n.\r\n",
    "starts_with_dot": b".leading\r\n\r\nbody\r\n",
    "empty": b"",
    "no_final_newline": b"Subject: x\r\n\r\nno newline at end",
    "long_line": b"Subject: long\r\n\r\n" + b"A" * 300_000 + b"\r\n.\r\n",
    "crlf.crlf_inside": b"a\r\n.\r\n\r\n.\r\nb\r\n",
}


def _body_roundtrip(body: bytes, sizes: Iterator[int] | None) -> tuple[bytes, list[bytes]]:
    wire = stuff(body) if body.endswith(b"\n") or not body else stuff(body + b"\r\n")
    expect = body if body.endswith(b"\n") or not body else body + b"\r\n"
    r = reader_over(wire + b"+OK after\r\n", sizes)
    chunks = list(r.body_chunks(chunk_bytes=64 * 1024))
    assert r.read_line() == b"+OK after"  # the terminator and nothing more was consumed
    assert b"".join(chunks) == expect
    return expect, chunks


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1500, None])
def test_body_exact_over_any_receive_split(name: str, step: int | None) -> None:
    if name == "long_line" and step is not None and step < 7:
        step = 4096  # byte-at-a-time over 300 KB is just slow, not more thorough
    _body_roundtrip(BODIES[name], const(step) if step else None)


@pytest.mark.parametrize("seed", range(20))
def test_body_random_dot_lines_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(rng.randint(0, 200)):
        head = rng.choice([b"", b".", b"..", b"...", b"x", b". ", b".\r"])
        tail = bytes(rng.choice(b"ab.\r ") for _ in range(rng.randint(0, 30)))
        end = rng.choice([b"\r\n", b"\r\n", b"\n"])
        line = head + tail.replace(b"\r", b"") + end
        lines.append(line)
    body = b"".join(lines)
    _body_roundtrip(body, rand_sizes(seed, 50))


def test_body_bare_lf_server() -> None:
    r = reader_over(b"line one\n..dot\n.\n+OK\n", const(2))
    assert b"".join(r.body_chunks()) == b"line one\n.dot\n"
    assert r.read_line() == b"+OK"


def test_body_chunks_are_bounded() -> None:
    body = (b"x" * 999 + b"\r\n") * 3000  # ~3 MB
    r = reader_over(stuff(body))
    chunks = list(r.body_chunks(chunk_bytes=256 * 1024))
    assert b"".join(chunks) == body
    assert len(chunks) > 5
    assert max(len(c) for c in chunks) <= 256 * 1024 + 256 * 1024  # one buffer over at most


def test_body_truncated_stream_is_connect_error() -> None:
    r = reader_over(b"Subject: x\r\n\r\npartial")
    with pytest.raises(ConnectError, match="closed"):
        list(r.body_chunks())


def test_body_over_socketpair_with_terminator_split() -> None:
    """Real recv_into on a socket, the terminator sent in three separate writes."""
    a, b = socket.socketpair()
    body = b"Subject: s\r\n\r\n" + b"..\r\n" * 10 + b"z" * 100_000 + b"\r\n"
    wire = stuff(body)
    parts = [wire[:-3], wire[-3:-2], wire[-2:-1], wire[-1:] + b"+OK\r\n"]

    def writer() -> None:
        import time
        for part in parts:
            a.sendall(part)
            time.sleep(0.02)

    t = threading.Thread(target=writer)
    t.start()
    try:
        r = ByteReader(b.recv_into)
        assert b"".join(r.body_chunks()) == body
        assert r.read_line() == b"+OK"
    finally:
        t.join()
        a.close()
        b.close()


def test_pending_and_set_source_refuses_injected_bytes() -> None:
    r = reader_over(b"+OK Begin TLS\r\nCAPA injected\r\n")
    assert r.read_line() == b"+OK Begin TLS"
    assert r.pending() > 0
    with pytest.raises(ProtocolError, match="injection"):
        r.set_source(lambda view: 0)


# ---- a session over canned server bytes (no server logic: the bytes are fixed up front) ----


def canned_session(server_bytes: bytes, tmp_path: Path, **over: object) -> Pop3Session:
    from ingest.config import config_from_dict

    acc = config_from_dict({"archive": {"path": str(tmp_path)}, "accounts": [
        {"id": "c", "host": "pop.example.net", "username": "u", "security": "starttls",
         "password_env": "POPVAULT_TEST_UNUSED", **over}]}).accounts[0]
    ours, theirs = socket.socketpair()
    theirs.sendall(server_bytes)
    theirs.shutdown(socket.SHUT_WR)
    session = Pop3Session(acc, ours)
    session._peer = theirs  # type: ignore[attr-defined]  # keep it open for the test
    return session


def test_stls_not_advertised(tmp_path: Path) -> None:
    s = canned_session(b"+OK hi\r\n+OK\r\nUSER\r\nUIDL\r\n.\r\n", tmp_path)
    s.read_greeting()
    assert s.capa().user
    with pytest.raises(TLSError, match="does not offer STLS"):
        s.stls()


def test_stls_injection_refused(tmp_path: Path) -> None:
    s = canned_session(b"+OK hi\r\n+OK\r\nSTLS\r\n.\r\n+OK go\r\nCAPA\r\n", tmp_path)
    s.read_greeting()
    s.capa()
    with pytest.raises(TLSError, match="injection"):
        s.stls()


def test_capa_unsupported_and_bare_lf_server(tmp_path: Path) -> None:
    server = (b"+OK RFC 1939 only\n-ERR unknown command\n"
              b"+OK 2 messages\n1 20\n2 11\n.\n"
              b"+OK\nline\n..dot\n.\n-ERR no such message\n")
    s = canned_session(server, tmp_path, security="none")
    s.read_greeting()
    caps = s.capa()
    assert not caps.known and caps.uidl is None and caps.user is None
    assert s.list_sizes() == {1: 20, 2: 11}
    got = [(r.number, r.read(), r.error is not None) for r in s.retrieve([(1, 12), (2, 11)])]
    # served bare LF and counted 12 octets for 11: within one octet per line, not short
    assert got == [(1, b"line\n.dot\n", False), (2, b"", True)]


def test_uidl_odd_ids_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_id = "x" * 90
    server = (b"+OK\r\n+OK\r\n1 abc\r\n2 " + long_id.encode() + b"\r\n3 caf\xc3\xa9\r\n.\r\n"
              b"-ERR [SYS/TEMP] index busy\r\n-ERR not supported\r\n-ERR nope\r\n")
    s = canned_session(server, tmp_path, security="none")
    s.read_greeting()
    s.capabilities = parse_capabilities([b"UIDL"])
    with caplog.at_level(logging.INFO, logger="popvault.pop3"):
        assert s.uidl() == {1: "abc", 2: long_id, 3: "café"}
    assert "outside RFC 1939" in caplog.text
    with pytest.raises(ServerTempFail):
        s.uidl()
    assert s.uidl(tolerate_missing=True) is None
    with pytest.raises(UidlUnsupported):
        s.uidl()


def test_uidl_control_characters_rejected(tmp_path: Path) -> None:
    s = canned_session(b"+OK\r\n+OK\r\n1 a\x01b\r\n.\r\n", tmp_path, security="none")
    s.read_greeting()
    with pytest.raises(ProtocolError, match="malformed"):
        s.uidl()
