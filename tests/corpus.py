"""Deterministic test mail: the same seed gives the same bytes, on any machine, on any day.

Used by the unit tests, the benchmarks and the integration tests (which load these messages
into Dovecot). Every message is CRLF-terminated as a POP3 server returns it after
dot-unstuffing. Nothing reads the clock: dates are spread over 2026 from the seed.

Each message has its own Message-ID and a valid Date unless its case says otherwise.
:class:`Corpus` carries ``expected_distinct_keys``, counted by construction (how many
different messages were built), never by calling :func:`ingest.dedup.message_key`: the test
would otherwise check the key function against itself.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

CRLF = b"\r\n"
EPOCH_2026 = datetime(2026, 1, 1, tzinfo=UTC)
DATE_SPREAD_S = 240 * 86400  # January to August 2026
DOMAIN = "corpus.popvault.test"
WORDS = (
    "archive", "invoice", "meeting", "quarterly", "report", "schedule", "budget", "review",
    "contract", "delivery", "customer", "server", "backup", "retention", "policy", "search",
    "index", "message", "mailbox", "account", "project", "deadline", "attached", "please",
    "find", "regards", "thanks", "update", "status", "team", "vendor", "compliance",
    "audit", "approval", "draft", "final", "version", "shipment", "order", "payment",
    "reminder", "agenda", "minutes", "notes",
)
TIMEZONES = (0, 60, 120, -300, -480, 330, 540)  # minutes east of UTC
BIG_ATTACHMENT_BYTES = 20 * 1024 * 1024
NESTING_BOMB_DEPTH = 5000
"""Deeper than Python's email parser can recurse: a parse failure the pipeline must survive."""


@dataclass
class Corpus:
    """Messages plus what a correct pipeline must make of them."""

    messages: list[bytes]
    expected_distinct_keys: int
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)


# -- building blocks -----------------------------------------------------------------------


def _date(rng: random.Random) -> str:
    offset = timedelta(minutes=rng.choice(TIMEZONES))
    moment = EPOCH_2026 + timedelta(seconds=rng.randrange(DATE_SPREAD_S))
    return format_datetime(moment.astimezone(timezone(offset)))


def _message_id(seed: int, index: int, tag: str) -> str:
    # Mixed-case local part on purpose: it must survive normalization unchanged.
    return f"<{tag}.{seed}.{index}.AbC@{DOMAIN.upper()}>"


def _text(rng: random.Random, size: int) -> str:
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(6, 12)))
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines)


def _person(rng: random.Random) -> str:
    first = rng.choice(("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"))
    return f"{first}{rng.randint(1, 99)}@example{rng.randint(1, 5)}.test"


def _headers(
    rng: random.Random,
    seed: int,
    index: int,
    tag: str,
    *,
    subject: str | None = None,
    content_type: str = "text/plain; charset=us-ascii",
    extra: list[str] | None = None,
    message_id: bool = True,
    date: bool = True,
) -> list[str]:
    sender = _person(rng)
    lines = [f"From: {sender.split('@')[0].title()} <{sender}>", f"To: {_person(rng)}"]
    if rng.random() < 0.3:
        lines.append(f"Cc: {_person(rng)}, {_person(rng)}")
    lines.append(f"Subject: {subject or ' '.join(rng.choices(WORDS, k=5))} #{index}")
    if date:
        lines.append(f"Date: {_date(rng)}")
    if message_id:
        lines.append(f"Message-ID: {_message_id(seed, index, tag)}")
    lines += ["MIME-Version: 1.0", f"Content-Type: {content_type}"]
    lines += extra or []
    return lines


def _trace(account: str, hop: str) -> list[str]:
    """Headers a delivering server adds; different per mailbox copy of one message."""
    return [
        f"Return-Path: <bounce@{DOMAIN}>",
        f"Delivered-To: {account}",
        f"Received: from {hop}.{DOMAIN} ({hop}.{DOMAIN} [192.0.2.7]) by mx.{DOMAIN} "
        f"with ESMTPS id {hop.upper()}42 for <{account}>; Sat, 03 Jan 2026 10:00:0{len(hop) % 10} "
        "+0000",
        f"X-Original-To: {account}",
        "Authentication-Results: mx.corpus.popvault.test; spf=pass",
    ]


def _join(header_lines: list[str], body: bytes | str) -> bytes:
    head = "\r\n".join(header_lines).encode("utf-8")
    data = body.encode("utf-8") if isinstance(body, str) else body
    return head + CRLF + CRLF + data + CRLF


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _attachment_part(boundary: str, name: str, mime: str, data: bytes) -> bytes:
    head = (
        f"--{boundary}\r\nContent-Type: {mime}; name=\"{name}\"\r\n"
        f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    return head + _b64(data)


# -- named builders (each returns one message unless it says otherwise) --------------------


def plain_text(seed: int = 0, index: int = 0, *, size: int = 2000) -> bytes:
    rng = random.Random(f"plain:{seed}:{index}")
    return _join(_headers(rng, seed, index, "plain"), _text(rng, size))


def html_only(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"html:{seed}:{index}")
    items = "".join(f"<li>{w}</li>" for w in rng.choices(WORDS, k=4))
    html = (
        "<html><head><style>p {color: red}</style></head><body>"
        f"<p>Hello <b>{rng.choice(WORDS)}</b> &amp; welcome</p><ul>{items}</ul>"
        '<p><a href="https://example.test/x">the link</a></p><script>var x=1;</script>'
        "</body></html>"
    )
    return _join(_headers(rng, seed, index, "html", content_type="text/html; charset=utf-8"), html)


def alternative(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"alt:{seed}:{index}")
    text = _text(rng, 800)
    body = (
        "--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{text}\r\n"
        "--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<p>{text}</p>\r\n--ALT--"
    )
    ctype = 'multipart/alternative; boundary="ALT"'
    return _join(_headers(rng, seed, index, "alt", content_type=ctype), body)


def with_attachments(
    seed: int = 0, index: int = 0, *, count: int = 2, size: int = 50_000, text_size: int = 1000
) -> bytes:
    """A text part and ``count`` attachments of ``size`` random bytes each."""
    rng = random.Random(f"att:{seed}:{index}")
    boundary = f"MIX{seed}x{index}"
    parts = [
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{_text(rng, text_size)}\r\n".encode()
    ]
    for number in range(count):
        name, mime = rng.choice(
            (("report.pdf", "application/pdf"), ("photo.JPG", "image/jpeg"),
             ("data.csv", "text/csv"), ("archive.zip", "application/zip"))
        )
        parts.append(_attachment_part(boundary, f"{number}-{name}", mime, rng.randbytes(size)))
    body = b"".join(parts) + f"--{boundary}--".encode()
    ctype = f'multipart/mixed; boundary="{boundary}"'
    return _join(_headers(rng, seed, index, "att", content_type=ctype), body)


def big_attachment(size_bytes: int = BIG_ATTACHMENT_BYTES, seed: int = 0, index: int = 0) -> bytes:
    """One attachment of ``size_bytes`` (default 20 MiB): oversize and memory paths."""
    return with_attachments(seed, index, count=1, size=size_bytes, text_size=200)


def rfc2047_subjects(seed: int = 0, index: int = 0) -> list[bytes]:
    """Encoded-word subjects in UTF-8 (B and Q), ISO-8859-1 and Shift_JIS."""
    jis = base64.b64encode("日本語の件名です".encode("shift_jis")).decode()
    subjects = (
        "=?UTF-8?B?" + base64.b64encode("Grüße 📬 Ünïcödé".encode()).decode() + "?=",
        "=?utf-8?q?caf=C3=A9_cr=C3=A8me?= and =?utf-8?q?_more?=",
        "=?ISO-8859-1?Q?R=E9union_=E0_Z=FCrich?=",
        f"=?Shift_JIS?B?{jis}?=",
    )
    out = []
    for number, subject in enumerate(subjects):
        rng = random.Random(f"2047:{seed}:{index}:{number}")
        out.append(
            _join(_headers(rng, seed, index * 10 + number, "enc", subject=subject), "body")
        )
    return out


def eight_bit_utf8(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"8bit:{seed}:{index}")
    headers = _headers(
        rng, seed, index, "utf8", content_type="text/plain; charset=utf-8",
        extra=["Content-Transfer-Encoding: 8bit"],
    )
    return _join(headers, "Grüße aus Köln — naïve café 日本\r\n")


def latin1_body(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"latin1:{seed}:{index}")
    headers = _headers(
        rng, seed, index, "latin1", content_type="text/plain; charset=iso-8859-1",
        extra=["Content-Transfer-Encoding: 8bit"],
    )
    return _join(headers, "Réunion à Zürich, ça coûte 5 €?".encode("latin-1", "replace"))


def undeclared_8bit(seed: int = 0, index: int = 0) -> bytes:
    """8-bit bytes, no charset declared, an 8-bit header too."""
    rng = random.Random(f"raw8:{seed}:{index}")
    headers = _headers(rng, seed, index, "raw8", content_type="text/plain")
    head = ("\r\n".join(headers)).encode() + b"\r\nX-Note: caf\xe9 \xff\xfe"
    return head + CRLF + CRLF + b"Stra\xdfe \xc3\xa9t\xc3\xa9 \x80\x81" + CRLF


def missing_message_id(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"noid:{seed}:{index}")
    return _join(_headers(rng, seed, index, "noid", message_id=False), _text(rng, 300))


def missing_date(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"nodate:{seed}:{index}")
    return _join(_headers(rng, seed, index, "nodate", date=False), _text(rng, 300))


def bad_date(seed: int = 0, index: int = 0) -> bytes:
    """A Date header that does not parse, and a second one in year 1850."""
    rng = random.Random(f"baddate:{seed}:{index}")
    headers = _headers(rng, seed, index, "baddate", date=False)
    headers.append("Date: Someday, 99 Smarch 20xx 25:61:00 +9999")
    headers.append("Date: Mon, 1 Jan 1850 00:00:00 +0000")
    return _join(headers, "bad dates")


def same_message_id_different_content(seed: int = 0, index: int = 0) -> tuple[bytes, bytes]:
    """Two different messages sharing one Message-ID (a forger, or a broken client)."""
    rng = random.Random(f"sameid:{seed}:{index}")
    headers = _headers(rng, seed, index, "sameid")
    return _join(headers, "first version of the body"), _join(headers, "a different body")


def same_message_two_deliveries(seed: int = 0, index: int = 0) -> tuple[bytes, bytes]:
    """One message as two mailboxes hold it: different trace headers, same content."""
    rng = random.Random(f"twice:{seed}:{index}")
    headers = _headers(rng, seed, index, "twice")
    body = _text(rng, 600)
    first = _join(_trace("alice@corpus.popvault.test", "mx1") + headers, body)
    second = _join(_trace("bob@corpus.popvault.test", "relay22") + headers, body)
    return first, second


def bad_boundary(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"badb:{seed}:{index}")
    ctype = 'multipart/mixed; boundary="DECLARED"'
    body = (
        "--ACTUAL\r\nContent-Type: text/plain\r\n\r\nthe boundary never matches\r\n--ACTUAL--"
    )
    return _join(_headers(rng, seed, index, "badb", content_type=ctype), body)


def broken_base64(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"b64:{seed}:{index}")
    ctype = 'multipart/mixed; boundary="B"'
    body = (
        "--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
        "\r\nSGVsbG8gd29y!!bGQ=\r\n=== not base64 ***\r\n"
        "--B\r\nContent-Type: application/octet-stream; name=\"x.bin\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nAAEC@@@#\r\nAw\r\n--B--"
    )
    return _join(_headers(rng, seed, index, "b64", content_type=ctype), body)


def header_without_colon(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"nocolon:{seed}:{index}")
    headers = _headers(rng, seed, index, "nocolon")
    headers.insert(2, "This line is not a header at all")
    return _join(headers, "body after a broken header block")


def nul_bytes(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"nul:{seed}:{index}")
    headers = _headers(rng, seed, index, "nul")
    head = ("\r\n".join(headers)).encode() + b"\r\nX-Nul: a\x00b"
    return head + CRLF + CRLF + b"text with \x00 NUL \x00 bytes" + CRLF


def long_lines(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"long:{seed}:{index}")
    headers = _headers(rng, seed, index, "long", extra=["X-Long: " + "h" * 10_000])
    return _join(headers, "x" * 10_000 + "\r\n" + "y" * 10_000)


def dot_lines(seed: int = 0, index: int = 0) -> bytes:
    """Lines that begin with dots, as they are after POP3 dot-unstuffing."""
    rng = random.Random(f"dot:{seed}:{index}")
    return _join(_headers(rng, seed, index, "dot"), ".\r\n..\r\n.hidden line\r\n...three\r\nend")


def nested_multipart_bomb(
    seed: int = 0, index: int = 0, *, depth: int = NESTING_BOMB_DEPTH
) -> bytes:
    """``depth`` nested multiparts: recursion in the MIME parser, a classic DoS."""
    rng = random.Random(f"bomb:{seed}:{index}")
    opening = "".join(
        f"--L{level}\r\nContent-Type: multipart/mixed; boundary=\"L{level + 1}\"\r\n\r\n"
        for level in range(depth)
    )
    closing = "".join(f"\r\n--L{level}--" for level in reversed(range(depth + 1)))
    body = opening + f"--L{depth}\r\nContent-Type: text/plain\r\n\r\ncore" + closing
    ctype = 'multipart/mixed; boundary="L0"'
    return _join(_headers(rng, seed, index, "bomb", content_type=ctype), body)


def rfc2231_attachment(seed: int = 0, index: int = 0) -> bytes:
    """File names in RFC 2231 (with continuations) and RFC 2047 (common, non-standard)."""
    rng = random.Random(f"2231:{seed}:{index}")
    body = (
        "--P\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        "--P\r\nContent-Type: application/pdf\r\n"
        "Content-Disposition: attachment;\r\n filename*0*=UTF-8''R%C3%A9sum%C3%A9%20;\r\n"
        " filename*1*=final.PDF\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n"
        "--P\r\nContent-Type: image/png; name=\"=?utf-8?B?"
        + base64.b64encode("Grüße.png".encode()).decode()
        + "?=\"\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--P--"
    )
    ctype = 'multipart/mixed; boundary="P"'
    return _join(_headers(rng, seed, index, "2231", content_type=ctype), body)


def unknown_charset(seed: int = 0, index: int = 0) -> bytes:
    rng = random.Random(f"charset:{seed}:{index}")
    headers = _headers(
        rng, seed, index, "charset", subject="=?x-klingon?q?qapla=E9?=",
        content_type="text/plain; charset=x-klingon",
    )
    return _join(headers, b"bytes \xe9\xff in no known charset")


def headers_only(seed: int = 0, index: int = 0) -> bytes:
    """No blank line, no body."""
    rng = random.Random(f"hdr:{seed}:{index}")
    return ("\r\n".join(_headers(rng, seed, index, "hdr"))).encode() + CRLF


def binary_garbage(seed: int = 0, index: int = 0) -> bytes:
    return random.Random(f"garbage:{seed}:{index}").randbytes(4096)


HOSTILE_BUILDERS: dict[str, Callable[[int, int], bytes]] = {
    "bad_boundary": bad_boundary,
    "broken_base64": broken_base64,
    "header_without_colon": header_without_colon,
    "nul_bytes": nul_bytes,
    "long_lines": long_lines,
    "dot_lines": dot_lines,
    "nested_multipart_bomb": nested_multipart_bomb,
    "unknown_charset": unknown_charset,
    "headers_only": headers_only,
    "binary_garbage": binary_garbage,
    "bad_date": bad_date,
    "undeclared_8bit": undeclared_8bit,
}
NORMAL_BUILDERS: dict[str, Callable[[int, int], bytes]] = {
    "plain_text": plain_text,
    "html_only": html_only,
    "alternative": alternative,
    "with_attachments": lambda seed, index: with_attachments(seed, index, count=1, size=3000),
    "eight_bit_utf8": eight_bit_utf8,
    "latin1_body": latin1_body,
    "missing_message_id": missing_message_id,
    "missing_date": missing_date,
    "rfc2231_attachment": rfc2231_attachment,
}


def special_cases(seed: int = 0) -> dict[str, bytes]:
    """Every named case once (except the 20 MiB attachment), pairs split as ``name[0|1]``."""
    builders = {**NORMAL_BUILDERS, **HOSTILE_BUILDERS}
    cases = {name: build(seed, 0) for name, build in builders.items()}
    for number, message in enumerate(rfc2047_subjects(seed)):
        cases[f"rfc2047_subject[{number}]"] = message
    for name, pair in (
        ("same_message_id_different_content", same_message_id_different_content(seed)),
        ("same_message_two_deliveries", same_message_two_deliveries(seed)),
    ):
        cases[f"{name}[0]"], cases[f"{name}[1]"] = pair
    cases["empty"] = b""
    return cases


# -- corpora -------------------------------------------------------------------------------


def generate_corpus(seed: int, n: int, *, mix: str = "default") -> Corpus:
    """``n`` messages. Mixes: ``default`` (all distinct, normal mail), ``duplicates`` (every
    fifth message is a second delivery of the one before), ``hostile`` (the malformed cases,
    each made distinct), ``benchmark`` (see :func:`benchmark_mix`)."""
    if mix == "benchmark":
        return benchmark_mix(seed, n)
    if mix == "default":
        return _cycle(seed, n, NORMAL_BUILDERS)
    if mix == "hostile":
        return _cycle(seed, n, HOSTILE_BUILDERS)
    if mix == "duplicates":
        messages: list[bytes] = []
        names: list[str] = []
        distinct = 0
        index = 0
        while len(messages) < n:
            first, second = same_message_two_deliveries(seed, index)
            messages.append(first)
            names.append(f"delivery[0]#{index}")
            distinct += 1
            if index % 5 == 4 and len(messages) < n:
                messages.append(second)
                names.append(f"delivery[1]#{index}")
            index += 1
        return Corpus(messages, distinct, names)
    raise ValueError(f"unknown corpus mix {mix!r}")


def generate_mail(seed: int, n: int, *, mix: str = "default") -> list[bytes]:
    """The messages of :func:`generate_corpus`, for callers that need only the bytes."""
    return generate_corpus(seed, n, mix=mix).messages


def _cycle(seed: int, n: int, builders: dict[str, Callable[[int, int], bytes]]) -> Corpus:
    items = list(builders.items())
    messages = []
    names = []
    for index in range(n):
        name, build = items[index % len(items)]
        messages.append(build(seed, index))
        names.append(f"{name}#{index}")
    # binary_garbage of different indices differs; every other builder varies its Message-ID
    # or content with the index, so all are distinct by construction.
    return Corpus(messages, n, names)


def benchmark_mix(seed: int, n: int) -> Corpus:
    """~70% text of 2-20 KB, ~25% with 1-3 attachments of 20-500 KB, ~5% with 1-5 MB."""
    rng = random.Random(f"bench:{seed}")
    messages = []
    names = []
    for index in range(n):
        roll = rng.random()
        if roll < 0.70:
            messages.append(plain_text(seed, index, size=rng.randint(2_000, 20_000)))
            names.append(f"text#{index}")
        elif roll < 0.95:
            count, size = rng.randint(1, 3), rng.randint(20_000, 500_000)
            messages.append(with_attachments(seed, index, count=count, size=size))
            names.append(f"attachments#{index}")
        else:
            size = rng.randint(1_000_000, 5_000_000)
            messages.append(with_attachments(seed, index, count=1, size=size))
            names.append(f"large#{index}")
    return Corpus(messages, n, names)
