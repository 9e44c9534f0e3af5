"""Proves the harness services are real and behave as the other integration tests assume."""

from __future__ import annotations

import base64
import os
import poplib
import re
import ssl
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.mailbox import Mailbox
from tests.harness.stack import Stack

UIDL_RE = re.compile(r"^[0-9a-f]{16}$")


def _command(pop: poplib.POP3, line: str) -> bytes:
    """poplib has no public AUTH: send one raw command line, return the one-line reply."""
    pop.sock.sendall(line.encode("ascii") + b"\r\n")
    return pop.file.readline().rstrip(b"\r\n")


def _tls(stack: Stack, ca: Path | None = None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca or stack.ca_file))


def test_implicit_tls_login_verifies_ca(stack: Stack,
                                        mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    pop = poplib.POP3_SSL(stack.host, stack.pop3s_port, context=_tls(stack), timeout=10)
    try:
        assert isinstance(pop.sock, ssl.SSLSocket)
        assert pop.sock.getpeercert()  # only filled in for a verified peer
        assert pop.user(mb.username).startswith(b"+OK")
        assert pop.pass_(mb.password).startswith(b"+OK")
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()


def test_untrusted_ca_is_rejected(stack: Stack) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(stack.host, stack.pop3s_port,
                        context=_tls(stack, stack.other_ca_file), timeout=10)


def test_stls_on_plain_port(stack: Stack, mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    pop = poplib.POP3(stack.host, stack.pop3_port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        pop.stls(_tls(stack))
        assert "STLS" not in pop.capa()
        pop.user(mb.username)
        assert pop.pass_(mb.password).startswith(b"+OK")
    finally:
        pop.quit()


def test_capa_advertises_what_popvault_uses(stack: Stack) -> None:
    for pop in (poplib.POP3(stack.host, stack.pop3_port, timeout=10),
                poplib.POP3_SSL(stack.host, stack.pop3s_port, context=_tls(stack), timeout=10)):
        try:
            capa = pop.capa()
        finally:
            pop.quit()
        for cap in ("PIPELINING", "UIDL", "TOP", "USER", "RESP-CODES", "AUTH-RESP-CODE"):
            assert cap in capa, (cap, capa)
        assert {"PLAIN", "LOGIN", "XOAUTH2"} <= set(capa["SASL"])


def test_deliver_served_count_roundtrip(mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    raws = [
        b"From: a@example.org\r\nSubject: one\r\n\r\nhello\r\n",
        b"From: b@example.org\nSubject: two (LF input)\n\n.leading dot\n..two dots\n.\nend\n",
        b"Subject: three\r\n\r\n" + b"x" * 5000 + b"\r\nlast line without newline",
    ]
    mb.deliver_many(raws[:2])
    mb.deliver(raws[2])
    assert mb.count() == 3
    expected = [r.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for r in raws]
    expected[2] += b"\r\n"  # the server ends every message with CRLF before the final "."
    assert mb.served() == expected


def test_uidls_are_stable_across_sessions(mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    mb.deliver_many(b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(5))
    first = mb.uidls()
    assert len(first) == 5 and len(set(first)) == 5
    assert all(UIDL_RE.match(u) for u in first), first
    assert mb.uidls() == first


def test_apop_login(stack: Stack, mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory(password="apop:secret ü")  # ':' and non-ASCII survive PLAIN.B64
    pop = poplib.POP3(stack.host, stack.pop3_port, timeout=10)
    try:
        assert re.search(rb"<[^>]+>", pop.getwelcome())
        assert pop.apop(mb.username, mb.password).startswith(b"+OK")
    finally:
        pop.quit()


def test_auth_plain(stack: Stack, mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    blob = base64.b64encode(f"\0{mb.username}\0{mb.password}".encode()).decode()
    pop = poplib.POP3_SSL(stack.host, stack.pop3s_port, context=_tls(stack), timeout=10)
    try:
        assert _command(pop, f"AUTH PLAIN {blob}").startswith(b"+OK")
    finally:
        pop.quit()


def test_xoauth2_token_is_checked_as_password(stack: Stack,
                                              mailbox_factory: Callable[..., Mailbox]) -> None:
    """Dovecot 2.3's XOAUTH2 passes the bearer token to the passdb as the password."""
    mb = mailbox_factory()

    def xoauth2(token: str) -> bytes:
        blob = base64.b64encode(f"user={mb.username}\x01auth=Bearer {token}\x01\x01".encode())
        pop = poplib.POP3_SSL(stack.host, stack.pop3s_port, context=_tls(stack), timeout=10)
        try:
            resp = _command(pop, "AUTH XOAUTH2 " + blob.decode())
            if resp.startswith(b"+ "):  # failure details (JSON) come as a SASL challenge
                resp = _command(pop, "")
            return resp
        finally:
            pop.close()

    assert xoauth2(mb.password).startswith(b"+OK")
    assert xoauth2("wrong-token").startswith(b"-ERR")


def test_set_password_takes_effect(stack: Stack,
                                   mailbox_factory: Callable[..., Mailbox]) -> None:
    mb = mailbox_factory()
    old = mb.password
    mb.set_password("changed-pw")
    pop = poplib.POP3(stack.host, stack.pop3_port, timeout=10)
    try:
        pop.user(mb.username)
        with pytest.raises(poplib.error_proto):
            pop.pass_(old)
    finally:
        pop.close()
    assert mb.uidls() == []


def test_account_config_and_write_config(mailbox_factory: Callable[..., Mailbox],
                                         write_config: Callable[..., Path],
                                         es_prefix: str, tmp_archive: Path) -> None:
    mb = mailbox_factory()
    acc = mb.account_config(tags=["smoke"], verify=True)
    assert os.environ[acc["password_env"]] == mb.password
    path = write_config(accounts=[acc], es_prefix=es_prefix,
                        extra={"archive": {"note": 'quote " and \\ and ü'}})
    data = tomllib.loads(path.read_text())
    assert data["accounts"] == [acc]
    assert data["archive"]["path"] == str(tmp_archive)
    assert data["elasticsearch"]["index_prefix"] == es_prefix


def test_redis_ping_set_get(redis_client: object) -> None:
    import redis

    assert isinstance(redis_client, redis.Redis)
    assert redis_client.ping()
    redis_client.set("k", b"v")
    assert redis_client.get("k") == b"v"


def test_es_index_and_count(es_client: object, es_prefix: str) -> None:
    from elasticsearch import Elasticsearch

    assert isinstance(es_client, Elasticsearch)
    health = es_client.cluster.health(wait_for_status="yellow", timeout="30s")
    assert health["status"] in ("green", "yellow")
    index = f"{es_prefix}-smoke"
    es_client.index(index=index, id="1", document={"subject": "hello"}, refresh=True)
    es_client.index(index=index, id="2", document={"subject": "world"}, refresh=True)
    assert es_client.count(index=f"{es_prefix}-*")["count"] == 2
