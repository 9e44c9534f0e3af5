"""Message keys: one key per message across mailboxes, never one key for two messages."""

from __future__ import annotations

import random

import pytest

from ingest import dedup
from ingest.dedup import content_fingerprint, message_key, normalize_message_id, raw_sha256
from tests import corpus


def _lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def test_two_deliveries_share_a_key() -> None:
    first, second = corpus.same_message_two_deliveries(seed=3)
    assert first != second
    assert message_key(first) == message_key(second)
    assert raw_sha256(first) != raw_sha256(second)


def test_crlf_and_lf_copies_share_a_key() -> None:
    raw = corpus.alternative(seed=1)
    assert message_key(raw) == message_key(_lf(raw))
    assert message_key(raw) == message_key(raw + b"\r\n\r\n  \r\n")  # trailing blank lines


def test_same_message_id_different_content_differs() -> None:
    first, second = corpus.same_message_id_different_content(seed=2)
    assert message_key(first) != message_key(second)


def test_no_message_id_fingerprint_decides() -> None:
    raw = corpus.missing_message_id(seed=4)
    assert b"Message-ID" not in raw
    assert message_key(raw) == message_key(_lf(raw))
    assert message_key(raw) != message_key(raw.replace(b"\r\n\r\n", b"\r\n\r\nchanged ", 1))


@pytest.mark.parametrize(
    "trace",
    [
        b"Received: from elsewhere by mx; Sun, 04 Jan 2026 10:00:00 +0000",
        b"Return-Path: <other@example.test>",
        b"Delivered-To: someone@example.test",
        b"X-Original-To: someone@example.test",
        b"Authentication-Results: mx; dkim=pass",
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none",
        b"X-Spam-Status: No, score=-1.0",
        b"Status: RO",
        b"X-UID: 42",
        b"Bcc: hidden@example.test",
        b"Envelope-To: someone@example.test",
        b"Content-Length: 12345",
        b"Lines: 7",
    ],
)
def test_fingerprint_ignores_trace_headers(trace: bytes) -> None:
    raw = corpus.plain_text(seed=5)
    assert content_fingerprint(trace + b"\r\n" + raw) == content_fingerprint(raw)
    assert message_key(trace + b"\r\n" + raw) == message_key(raw)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Subject: ", b"Subject: [SPAM] "),
        (b"To: ", b"To: intruder@example.test, "),
        (b"MIME-Version: 1.0", b"MIME-Version: 1.0\r\nCc: added@example.test"),
    ],
)
def test_fingerprint_covers_originator_headers(old: bytes, new: bytes) -> None:
    raw = corpus.plain_text(seed=6)
    assert old in raw
    assert message_key(raw.replace(old, new, 1)) != message_key(raw)


def test_folding_and_whitespace_do_not_matter() -> None:
    raw = b"Subject: a  long\tsubject\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    folded = b"Subject: a long\r\n  subject\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    assert message_key(raw) == message_key(folded)


def test_header_name_case_does_not_matter() -> None:
    raw = b"Subject: s\r\nMessage-ID: <x@y>\r\n\r\nbody"
    assert message_key(raw) == message_key(b"SUBJECT: s\r\nmessage-id: <x@y>\r\n\r\nbody")


def test_domain_case_does_not_matter_local_part_does() -> None:
    base = b"Subject: s\r\nMessage-ID: <Abc@Example.COM>\r\n\r\nbody"
    assert message_key(base) != message_key(base.replace(b"Abc", b"abc"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<Abc.Def@Example.COM>", "<Abc.Def@example.com>"),
        ("  <abc@EXAMPLE.org>  (a comment)", "<abc@example.org>"),
        ("(comment first) <x@Y.z>", "<x@y.z>"),
        ("< folded@\r\n Example.TEST >", "<folded@example.test>"),
        ("bare@Example.Org", "<bare@example.org>"),
        ("<no-at-sign>", "<no-at-sign>"),
        ("garbage without brackets", None),
        ("<>", None),
        ("", None),
        (None, None),
        ("   ", None),
    ],
)
def test_normalize_message_id(value: str | None, expected: str | None) -> None:
    assert normalize_message_id(value) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n",
        b"\n\n\n",
        b"no headers at all and no blank line",
        b"Subject: only headers",
        b"\x00\xff\xfe:\r\n\r\n\x00",
        b":\r\n:\r\n\r\n",
        random.Random(1).randbytes(10_000),
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    key = message_key(raw)
    assert len(key) == 64 and int(key, 16) >= 0
    assert len(content_fingerprint(raw)) == 64


def test_split_message_handles_both_line_endings() -> None:
    assert dedup.split_message(b"A: b\r\n\r\nbody") == (b"A: b", b"body")
    assert dedup.split_message(b"A: b\n\nbody") == (b"A: b", b"body")
    assert dedup.split_message(b"A: b") == (b"A: b", b"")
    assert dedup.split_message(b"\r\nbody") == (b"", b"body")


def test_key_is_versioned_and_hex() -> None:
    key = message_key(corpus.plain_text())
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert dedup.KEY_VERSION == b"v1"


def test_module_states_the_rule() -> None:
    assert dedup.__doc__ and "Message-ID" in dedup.__doc__ and "trace" in dedup.__doc__.lower()


def test_messages_without_originator_headers_never_merge() -> None:
    garbage = [random.Random(seed).randbytes(2000).replace(b"\n", b"") for seed in range(5)]
    assert len({message_key(raw) for raw in garbage}) == 5
    one, two = b"X-A: 1\r\nX-B: 2", b"X-A: 1\r\nX-B: 3"
    assert message_key(one) != message_key(two)
    assert message_key(one) == message_key(one.replace(b"\r\n", b"\n") + b"\n")


@pytest.mark.parametrize("data", [
    b"", b"a\r\nb\r\n", b"a\rb\r\n", b"\r", b"\r\r\n", b"a\nb\r\n\r", b"x" * 100 + b"\r\n\r\r\n",
])
def test_lf_line_ends_turns_only_crlf_into_lf(data: bytes) -> None:
    from ingest.dedup import lf_line_ends

    assert lf_line_ends(data) == data.replace(b"\r\n", b"\n")


def _reference_fingerprint(raw: bytes) -> str:
    """The rule as first written: split, CRLF->LF over the body, strip, hash."""
    import hashlib as h
    import re

    from ingest.dedup import FINGERPRINT_HEADERS, header_fields, split_message

    header_block, body = split_message(raw)
    wanted: dict[bytes, list[bytes]] = {}
    for name, value in header_fields(header_block):
        if name in FINGERPRINT_HEADERS:
            wanted.setdefault(name, []).append(re.sub(rb"[ \t\r\n]+", b" ", value).strip())
    digest = h.sha256()
    if not wanted:
        whole = header_block + b"\n\n" + body
        digest.update(b"whole\n" + whole.replace(b"\r\n", b"\n").rstrip(b" \t\r\n"))
        return digest.hexdigest()
    for name in FINGERPRINT_HEADERS:
        for value in wanted.get(name, ()):
            digest.update(name + b":" + value + b"\n")
    digest.update(b"\n")
    digest.update(body.replace(b"\r\n", b"\n").rstrip(b" \t\r\n"))
    return digest.hexdigest()


def test_fingerprint_matches_the_rule_as_written_on_every_shape() -> None:
    rng = random.Random(5)
    messages = [*corpus.generate_mail(seed=8, n=40), *corpus.special_cases(seed=8).values()]
    pieces = [b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"x" * 5000, b" " * 5000, b"\r\n" * 3000]
    for _ in range(400):
        head = rng.choice([b"From: a@b.c\r\nSubject: s\r\n", b"Subject: s\n", b"", b"\r\n",
                           b"X-Trace: only\r\n", b"\n"])
        sep = rng.choice([b"\r\n", b"\n", b"\r\n\r\n", b"\n\r\n", b""])
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        messages.append(head + sep + body)
    for raw in messages:
        assert content_fingerprint(raw) == _reference_fingerprint(raw), raw[:80]
