"""parser_input: a faster parser input that must never change what is
parsed."""

from __future__ import annotations

import base64
import email
import json
from email import policy

import pytest

from ingest import document
from ingest.document import build_document
from ingest.mimefast import MIN_JOIN_BYTES, ParserInput, parser_input
from tests import corpus


def join_base64_bodies(raw: bytes) -> bytes:
    """Only the joining, no part spared."""
    return parser_input(raw, spare_files=False).data


def _doc(raw: bytes) -> str:
    doc = build_document(raw, raw_sha256="0" * 64, message_key="k",
                         first_archived="2026-01-01T00:00:00Z")
    return json.dumps(doc, sort_keys=True)


def _doc_without_join(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> str:
    """The document as mail-parser builds it from the bytes untouched (the reference)."""
    with monkeypatch.context() as m:
        m.setattr(document, "parser_input", ParserInput)
        return _doc(raw)


def _with_attachment(payload: bytes, *, newline: bytes = b"\r\n") -> bytes:
    b64 = base64.encodebytes(payload).replace(b"\n", newline)
    return newline.join([
        b"From: a@example.com", b"To: b@example.com", b"Subject: att",
        b"Message-ID: <att@example.com>", b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="BB"', b"", b"--BB",
        b"Content-Type: text/plain", b"", b"hello", b"--BB",
        b'Content-Type: application/octet-stream; name="x.bin"',
        b"Content-Transfer-Encoding: BASE64", b"", b64 + b"--BB--", b""])


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_large_base64_part_is_joined_and_decodes_to_the_same_bytes(
        newline: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = bytes(range(256)) * 400
    raw = _with_attachment(payload, newline=newline)
    joined = join_base64_bodies(raw)
    assert len(joined.splitlines()) < len(raw.splitlines()) - 100
    parts = [p for p in email.message_from_bytes(joined, policy=policy.compat32).walk()
             if p.get_filename() == "x.bin"]
    assert parts[0].get_payload(decode=True) == payload
    assert _doc(raw) == _doc_without_join(raw, monkeypatch)


def test_file_bodies_are_spared_from_the_parser_and_restored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    payload = bytes(range(256)) * 400
    raw = _with_attachment(payload)
    prepared = parser_input(raw)
    assert len(prepared.data) < 1000 < len(raw)  # the parser never sees the 100 KB body
    assert len(prepared.lifted) == 1
    message = email.message_from_bytes(prepared.data, policy=policy.compat32)
    prepared.restore(message)
    parts = [p for p in message.walk() if p.get_filename() == "x.bin"]
    assert parts[0].get_payload(decode=True) == payload
    assert _doc(raw) == _doc_without_join(raw, monkeypatch)


@pytest.mark.parametrize("content_type", [b"text/csv", b"application/html", b"image/plain",
                                          b"message/rfc822", None])
def test_parts_the_parser_may_read_as_text_are_joined_not_spared(
        content_type: bytes | None) -> None:
    raw = _with_attachment(b"a,b,c\n" * 4000)
    old = b'Content-Type: application/octet-stream; name="x.bin"\r\n'
    raw = raw.replace(old, b"Content-Type: " + content_type + b"\r\n" if content_type else b"")
    prepared = parser_input(raw)
    assert prepared.lifted == {}
    assert prepared.data == join_base64_bodies(raw) != raw


@pytest.mark.parametrize(("headers", "spared"), [
    (b'Content-Type: text/csv\r\nContent-Disposition: attachment; filename="d.csv"', True),
    (b"Content-Type: text/csv\r\nContent-Disposition:\r\n attachment", True),
    (b"Content-Type: image/png\r\nContent-ID: <logo@example.com>", True),
    (b"Content-Type: application/pdf;\r\n name*0*=utf-8''r%C3%A9sum%C3%A9.pdf", True),
    (b"Content-Type: application/octet-stream", False),  # mail-parser decodes it as text
    (b'Content-Type: text/csv; name=""', False),
    (b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"', False),
])
def test_only_parts_mail_parser_files_as_attachments_are_spared(
        headers: bytes, spared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _with_attachment(b"a,b,c\n" * 4000)
    old = b'Content-Type: application/octet-stream; name="x.bin"'
    raw = raw.replace(old, headers)
    prepared = parser_input(raw)
    assert bool(prepared.lifted) is spared
    assert prepared.data != raw  # joined at least
    assert _doc(raw) == _doc_without_join(raw, monkeypatch)


def test_bodies_that_are_not_pure_base64_or_small_are_left_alone() -> None:
    small = _with_attachment(b"tiny")
    assert join_base64_bodies(small) == small
    text = b"A" * 76 + b"\r\n"
    looks_like = (b"From: a@example.com\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                  + text * (MIN_JOIN_BYTES // 70) + b"not base64: a sentence.\r\n")
    assert join_base64_bodies(looks_like) == looks_like
    plain = b"Subject: x\r\n\r\n" + text * 1000  # base64-looking lines, no base64 header
    assert join_base64_bodies(plain) == plain


def test_documents_are_identical_over_every_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = (corpus.benchmark_mix(7, 60).messages
                + list(corpus.special_cases().values())
                + corpus.generate_corpus(3, 40, mix="hostile").messages
                + [corpus.big_attachment(2 * 1024 * 1024)])
    changed = spared = 0
    for raw in messages:
        prepared = parser_input(raw)
        changed += prepared.data != raw
        spared += bool(prepared.lifted)
        assert _doc(raw) == _doc_without_join(raw, monkeypatch)
    assert changed >= 10, "the benchmark mix has many large attachments to join"
    assert spared >= 10, "... most of them files the parser is spared"


def test_fast_base64_decoding_gives_the_stdlib_bytes_or_steps_aside() -> None:
    """Every body the fast path decodes must decode to what the stdlib's strict decoding of
    the joined lines gives, with no defect; every well-formed encoding must take it."""
    import base64
    import random
    from email._encoded_words import decode_b  # what get_payload(decode=True) runs

    from ingest.mimefast import decode_pure_base64

    rng = random.Random(7)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    taken = 0
    for _ in range(20_000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data += b"=" * rng.choice([0, 0, 1, 2, 3])
        if rng.random() < 0.1 and len(data) > 2:
            i = rng.randrange(len(data))
            data = data[:i] + b"=" + data[i:]
        body = rng.choice([b"\r\n", b"\n"]).join(data[i:i + 7] for i in range(0, len(data), 7))
        decoded = decode_pure_base64(body)
        if decoded is not None:
            taken += 1
            assert decode_b(body.replace(b"\r", b"").replace(b"\n", b"")) == (decoded, [])
    assert taken > 1000
    for size in range(0, 200):
        payload = bytes(rng.randrange(256) for _ in range(size))
        body = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        assert decode_pure_base64(body) == payload
    assert decode_pure_base64(b"QUJD=\r\n") is None  # extra padding: the stdlib's defect
    assert decode_pure_base64(b"QQ==QUJD\r\n") is None  # data after padding
