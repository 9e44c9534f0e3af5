"""Pop3Session against the real Dovecot of the test stack (tests/harness)."""

from __future__ import annotations

import json
import logging
import poplib
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest.config import AccountConfig, config_from_dict
from ingest.errors import (
    AuthError,
    ConnectError,
    PlaintextRefused,
    PopvaultError,
    ProtocolError,
    TLSError,
)
from ingest.pop3 import PIPELINE_WINDOW, Pop3Session

pytestmark = pytest.mark.integration

SECRET = "Kx9-distinctive-Pw-7731"


def make_account(tmp_path: Path, mailbox: Any, **overrides: Any) -> AccountConfig:
    data = mailbox.account_config(**overrides)
    cfg = config_from_dict({"archive": {"path": str(tmp_path / "archive")}, "accounts": [data]})
    return cfg.accounts[0]


def crlf(raw: bytes) -> bytes:
    """What Dovecot serves for a message delivered with bare LF line ends."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def served_list(mailbox: Any) -> list[bytes]:
    served = mailbox.served()
    if isinstance(served, dict):
        return [served[k] for k in sorted(served)]
    return list(served)


def fetch_all(session: Pop3Session, window: int | None = None) -> list[bytes]:
    sizes = session.list_sizes()
    out = []
    for item in session.retrieve(sorted(sizes.items()), window=window):
        assert item.error is None, item.error
        out.append(b"".join(item.chunks()))
        assert item.octets == len(out[-1])
        assert not item.short
    return out


@pytest.fixture
def mailbox(mailbox_factory: Callable[..., Any]) -> Any:
    return mailbox_factory()


@pytest.fixture
def tls_account(tmp_path: Path, mailbox: Any) -> AccountConfig:
    return make_account(tmp_path, mailbox)


def test_implicit_tls_login_and_capabilities(tls_account: AccountConfig, mailbox: Any) -> None:
    mailbox.deliver(b"Subject: one\n\nhello\n")
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        assert s.encrypted
        assert s.capabilities.known and s.capabilities.pipelining and s.capabilities.uidl
        assert s.stat() == (1, len(crlf(b"Subject: one\n\nhello\n")))
        assert s.tls_info()["version"] in ("TLSv1.2", "TLSv1.3")
        assert "password" not in repr(s).lower()
        s.noop()
        s.quit()


def test_later_sessions_resume_tls_and_still_verify(tmp_path: Path, mailbox: Any,
                                                    stack: Any) -> None:
    """Sessions share one context per CA file and resume the last TLS session to a server.
    Dovecot runs two login processes with their own ticket keys, so a resumption lands on
    about half the connections: twenty must see at least one."""
    acc = make_account(tmp_path, mailbox)
    reused = []
    for _ in range(20):
        with Pop3Session.open(acc, password=mailbox.password, token=None) as s:
            reused.append(s.tls_info()["session_reused"])
            assert s.tls_info()["certificate"], "the peer certificate is known after resuming"
            s.quit()
    assert any(reused[1:]), reused
    # A resumable session to this server is no way past verification with another CA.
    other = make_account(tmp_path, mailbox, ca_file=str(stack.other_ca_file))
    with pytest.raises(TLSError):
        Pop3Session.open(other, password=mailbox.password, token=None)


def test_starttls_reads_capa_again(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, security="starttls", port=stack.pop3_port)
    s = Pop3Session.connect(acc)
    with s:
        s.read_greeting()
        before = s.capa()
        assert before.stls and not s.encrypted
        s.stls()
        assert s.encrypted
        # Dovecot no longer lists STLS once TLS is up: proof the list was asked for again.
        assert s.capabilities.known and not s.capabilities.stls
        s.login(password=mailbox.password, token=None)
        s.stat()


def test_starttls_open(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, security="starttls", port=stack.pop3_port)
    with Pop3Session.open(acc, password=mailbox.password, token=None) as s:
        assert s.encrypted and s.mechanism == "plain"


@pytest.mark.parametrize("auth", ["user", "plain", "auto"])
def test_plaintext_refused_unless_allowed(tmp_path: Path, mailbox: Any, stack: Any,
                                          auth: str) -> None:
    acc = make_account(tmp_path, mailbox, security="none", port=stack.pop3_port, auth=auth)
    if auth == "auto":
        # Dovecot's greeting carries an APOP timestamp: auto settles on APOP, which does not
        # send the password, rather than refusing.
        with Pop3Session.open(acc, password=mailbox.password, token=None) as s:
            assert s.mechanism == "apop" and not s.encrypted
        acc = replace(acc, auth="plain")
    with pytest.raises(PlaintextRefused):
        Pop3Session.open(acc, password=mailbox.password, token=None)
    allowed = replace(acc, allow_plaintext_auth=True)
    with Pop3Session.open(allowed, password=mailbox.password, token=None) as s:
        assert not s.encrypted
        s.stat()


def test_wrong_password(tls_account: AccountConfig) -> None:
    with pytest.raises(AuthError) as info:
        Pop3Session.open(tls_account, password=SECRET, token=None)
    exc = info.value
    assert type(exc) is AuthError
    assert "rejected the user name or password" in str(exc)
    assert exc.server_reply and "[AUTH]" in exc.server_reply
    assert SECRET not in str(exc) and SECRET not in repr(exc)


def test_untrusted_certificate(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, ca_file=str(stack.other_ca_file))
    with pytest.raises(TLSError, match="certificate is not trusted") as info:
        Pop3Session.open(acc, password=mailbox.password, token=None)
    assert "set ca_file" in str(info.value)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    unverified = replace(acc, verify=False)
    with Pop3Session.open(unverified, password=mailbox.password, token=None) as s:
        assert s.encrypted


def test_untrusted_certificate_after_stls(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, security="starttls", port=stack.pop3_port,
                       ca_file=str(stack.other_ca_file))
    with pytest.raises(TLSError, match="not trusted"):
        Pop3Session.open(acc, password=mailbox.password, token=None)


@pytest.mark.parametrize("auth", ["apop", "plain", "user"])
def test_explicit_mechanisms(tmp_path: Path, mailbox: Any, auth: str) -> None:
    acc = make_account(tmp_path, mailbox, auth=auth)
    with Pop3Session.open(acc, password=mailbox.password, token=None) as s:
        assert s.mechanism == auth
        s.stat()


def test_xoauth2_token_as_password(tmp_path: Path, mailbox: Any) -> None:
    """The harness's Dovecot takes XOAUTH2 with the password as the token (passwd-file)."""
    token_file = tmp_path / "token"
    token_file.write_text(mailbox.password)
    acc = make_account(tmp_path, mailbox, auth="xoauth2", token_file=str(token_file))
    with Pop3Session.open(acc, password=None, token=mailbox.password) as s:
        assert s.mechanism == "xoauth2"
        s.stat()
    long_token = "ya29." + "T" * 5000
    with pytest.raises(AuthError) as info:
        Pop3Session.open(acc, password=None, token=long_token)
    assert "OAuth2 token" in str(info.value) and "status 401" in str(info.value)
    assert long_token[:20] not in str(info.value)


DOT_BODY = (b"Subject: dots\n\n.\n..\n...\n.leading dot\nmiddle . dot\n.\r\n"
            b"..two\nend\n")


def test_byte_exact_retr(tmp_path: Path, tls_account: AccountConfig, mailbox: Any) -> None:
    raws = [
        DOT_BODY,
        b"Subject: long line\n\n" + b"L" * 100_000 + b"\n",
        b"Subject: crlf\r\n\r\nalready crlf\r\n.\r\n",
        b"Subject: no final newline\n\nlast line",
        b"Subject: 8bit\nContent-Type: text/plain; charset=latin-1\n\ncaf\xe9 \x00\x01\n",
    ]
    mailbox.deliver_many(raws)
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        got = fetch_all(s)
        s.quit()
    served = served_list(mailbox)
    assert got == served
    for raw, body in zip(raws[:3], got[:3], strict=True):
        assert body == crlf(raw)


def test_20mb_message_streams_in_chunks(tls_account: AccountConfig, mailbox: Any) -> None:
    line = b"0123456789" * 7 + b"\n"
    raw = b"Subject: big\n\n" + line * (20 * 1024 * 1024 // len(line))
    mailbox.deliver(raw)
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        sizes = s.list_sizes()
        (item,) = list_retrieve(s, sizes)
        assert item[0] == crlf(raw)
        assert max(item[1]) <= 512 * 1024 and len(item[1]) > 40


def list_retrieve(s: Pop3Session, sizes: dict[int, int]) -> list[tuple[bytes, list[int]]]:
    out = []
    for r in s.retrieve(sorted(sizes.items())):
        lens: list[int] = []
        parts = []
        for chunk in r.chunks():
            lens.append(len(chunk))
            parts.append(chunk)
        out.append((b"".join(parts), lens))
    return out


def test_pipelined_equals_serial(tmp_path: Path, mailbox: Any) -> None:
    raws = [b"Subject: m%d\nX-Pad: %s\n\nbody %d\n.\n..dot %d\n" % (i, b"p" * (i * 37), i, i)
            for i in range(200)]
    mailbox.deliver_many(raws)
    piped_acc = make_account(tmp_path, mailbox)
    serial_acc = replace(piped_acc, pipelining=False)
    with Pop3Session.open(piped_acc, password=mailbox.password, token=None) as s:
        assert s._window(None) == PIPELINE_WINDOW
        piped = fetch_all(s)
    with Pop3Session.open(serial_acc, password=mailbox.password, token=None) as s:
        assert s._window(None) == 1
        serial = fetch_all(s)
    assert piped == serial == [crlf(r) for r in raws]


def test_retr_error_in_pipeline_does_not_break_it(tls_account: AccountConfig,
                                                  mailbox: Any) -> None:
    mailbox.deliver_many([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"])
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        items = [(1, 14), (99, 10), (2, 14)]
        seen = []
        for r in s.retrieve(items):
            seen.append((r.number, r.error is not None, r.read()))
        assert seen[1][:2] == (99, True) and seen[1][2] == b""
        assert seen[0][2].endswith(b"a\r\n") and seen[2][2].endswith(b"b\r\n")
        s.noop()  # still in step


def test_short_body_against_list_size(tls_account: AccountConfig, mailbox: Any) -> None:
    mailbox.deliver(b"Subject: s\n\n" + b"x" * 1000 + b"\n")
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        for r in s.retrieve([(1, 5000)]):
            r.read()
        assert r.short and isinstance(r.error, ProtocolError)
        assert f"received {r.octets} of 5000 octets" in str(r.error)
        for ok in s.retrieve([(1, r.octets + 3)]):  # a small counting difference: tolerated
            ok.read()
        assert not ok.short and ok.error is None


def test_consumer_discipline(tls_account: AccountConfig, mailbox: Any) -> None:
    mailbox.deliver_many([b"Subject: %d\n\n%s\n" % (i, b"z" * 300_000) for i in range(4)])
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        sizes = sorted(s.list_sizes().items())
        # Untouched bodies are drained when advancing; the last one is read normally.
        items = list(s.retrieve(sizes[:3]))
        assert all(i.done and i.octets > 300_000 for i in items)
        with pytest.raises(RuntimeError):
            items[0].read()
        # Stopping early reads off the RETRs already sent: the session stays usable.
        for r in s.retrieve(sizes):
            r.read()
            break
        assert s.stat()[0] == 4
        # A half-read body cannot be skipped: the connection is dropped.
        with pytest.raises(ProtocolError, match="partly read"):
            for r in s.retrieve(sizes):
                next(iter(r.chunks()))
        with pytest.raises(ConnectError):
            s.noop()


def test_dele_quit_removes_and_close_keeps(tmp_path: Path, tls_account: AccountConfig,
                                           mailbox: Any) -> None:
    mailbox.deliver_many([b"Subject: %d\n\nx\n" % i for i in range(5)])
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        assert s.dele([1, 2, 3]) == {}
        # no QUIT: leaving the block only closes the socket
    assert mailbox.count() == 5
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        failed = s.dele([1, 2, 77])
        assert list(failed) == [77]
        s.quit()
    assert mailbox.count() == 3
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        s.dele([1])
        s.rset()
        s.quit()
    assert mailbox.count() == 3


def test_uidl_and_top(tls_account: AccountConfig, mailbox: Any) -> None:
    mailbox.deliver_many([b"Subject: t%d\n\nline1\nline2\n" % i for i in range(3)])
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        uids = s.uidl()
        assert uids is not None and sorted(uids) == [1, 2, 3]
        expected = mailbox.uidls()
        if isinstance(expected, dict):
            assert uids == expected
        else:
            assert [uids[k] for k in sorted(uids)] == list(expected)
        assert s.top(2, 1) == b"Subject: t1\r\n\r\nline1\r\n"
        with pytest.raises(ProtocolError):
            s.top(9, 0)
        s.noop()


def test_deadline(tls_account: AccountConfig, mailbox: Any) -> None:
    s = Pop3Session.open(tls_account, password=mailbox.password, token=None, deadline_s=1.0)
    time.sleep(1.1)
    with pytest.raises(ConnectError, match="deadline"):
        s.stat()


def test_connect_errors(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    with pytest.raises(ConnectError, match="cannot resolve host"):
        Pop3Session.open(make_account(tmp_path, mailbox, host="no-such-host.invalid"),
                         password=mailbox.password, token=None)
    closed = _closed_port(stack.host)
    with pytest.raises(ConnectError, match="refused"):
        Pop3Session.open(make_account(tmp_path, mailbox, port=closed),
                         password=mailbox.password, token=None)
    # TLS spoken to the plain port: the handshake fails, reported as a TLS/connect problem.
    wrong = make_account(tmp_path, mailbox, port=stack.pop3_port, connect_timeout_s=5.0)
    with pytest.raises((TLSError, ConnectError)):
        Pop3Session.open(wrong, password=mailbox.password, token=None)


def _closed_port(host: str) -> int:
    import socket
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def test_password_never_leaks(tmp_path: Path, mailbox_factory: Callable[..., Any],
                              stack: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A distinctive password through every failure we can provoke on a real server."""
    caplog.set_level(logging.DEBUG, logger="popvault")
    box = mailbox_factory(password=SECRET)
    wrong = SECRET[::-1]
    attempts: list[tuple[dict[str, Any], str | None, str | None]] = [
        ({}, wrong, None),
        ({"auth": "user"}, wrong, None),
        ({"auth": "apop"}, wrong, None),
        ({"auth": "plain"}, wrong, None),
        ({"auth": "xoauth2", "token_env": "POPVAULT_UNUSED"}, None, wrong),
        ({"security": "none", "port": stack.pop3_port, "auth": "user"}, SECRET, None),
        ({"security": "starttls", "port": stack.pop3_port,
          "ca_file": str(stack.other_ca_file)}, SECRET, None),
        ({"ca_file": str(stack.other_ca_file)}, SECRET, SECRET),
    ]
    errors: list[PopvaultError] = []
    for overrides, password, token in attempts:
        acc = make_account(tmp_path, box, **overrides)
        with pytest.raises(PopvaultError) as info:
            Pop3Session.open(acc, password=password, token=token)
        errors.append(info.value)
    # and a successful session at DEBUG level, so every command is logged
    with Pop3Session.open(make_account(tmp_path, box), password=SECRET, token=None) as s:
        s.stat()
    for exc in errors:
        for text in (str(exc), repr(exc), json.dumps(exc.to_dict())):
            assert SECRET not in text and wrong not in text
    assert "C: PASS" not in caplog.text or "PASS ***" in caplog.text
    assert SECRET not in caplog.text and wrong not in caplog.text


def test_poplib_reference_agrees(tls_account: AccountConfig, mailbox: Any, stack: Any) -> None:
    """stdlib poplib as an independent client (lines < 2,048 bytes only)."""
    raws = [DOT_BODY, b"Subject: two\n\nplain\n"]
    mailbox.deliver_many(raws)
    with Pop3Session.open(tls_account, password=mailbox.password, token=None) as s:
        ours = fetch_all(s)
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))
    ref = poplib.POP3_SSL(tls_account.host, tls_account.port, context=ctx)
    try:
        ref.user(tls_account.username)
        ref.pass_(mailbox.password)
        theirs = [b"\r\n".join(ref.retr(i + 1)[1]) + b"\r\n" for i in range(len(raws))]
    finally:
        ref.quit()
    assert ours == theirs
