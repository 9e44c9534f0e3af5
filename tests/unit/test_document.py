"""Bytes to document: every message yields a valid document, whatever it holds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import schemas
from ingest import __version__, document
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document, index_month
from tests import corpus

ARCHIVED = "2026-09-01T12:00:00Z"
CORPORA = Path(__file__).resolve().parents[1] / "corpora"
VALIDATOR = jsonschema.Draft202012Validator(schemas.document_schema())
SPECIAL = corpus.special_cases(seed=7)


def build(raw: bytes, **kwargs: Any) -> dict[str, Any]:
    return build_document(
        raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw), first_archived=ARCHIVED,
        **kwargs,
    )


def assert_valid(doc: dict[str, Any]) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
    assert not errors, errors


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_every_corpus_case_validates(name: str) -> None:
    raw = SPECIAL[name]
    doc = build(raw)
    assert_valid(doc)
    assert doc["popvault"]["raw_size"] == len(raw)
    assert doc["popvault"]["message_key"] == message_key(raw)


@pytest.mark.parametrize("path", sorted(CORPORA.glob("*.eml")), ids=lambda p: p.name)
def test_hand_written_hostile_mail_validates(path: Path) -> None:
    assert_valid(build(path.read_bytes()))


def test_documents_are_deterministic() -> None:
    raw = corpus.rfc2231_attachment(seed=1)
    assert build(raw) == build(raw)


def test_plain_message_fields() -> None:
    raw = corpus.alternative(seed=2)
    doc = build(raw)
    mail, pv = doc["email"], doc["popvault"]
    assert mail["content_type"] == "multipart/alternative"
    assert mail["message_id"].startswith("<alt.2.0.AbC@")
    assert pv["message_id_normalized"].endswith("@corpus.popvault.test>")
    assert "AbC@" in pv["message_id_normalized"]  # local part keeps its case
    assert all(a == a.lower() and "@" in a for a in mail["from"]["address"])
    assert pv["body_source"] == "text" and "\r" not in pv["body_text"]
    assert pv["parse_status"] == "ok" and "parse_error" not in pv
    assert pv["parser"]["name"] == "mail-parser" and pv["parser"]["version"]
    assert pv["popvault_version"] == __version__
    assert pv["date_header_valid"] is True
    assert doc["@timestamp"] == mail["origination_timestamp"]
    assert doc["@timestamp"].startswith("2026-") and doc["@timestamp"].endswith("Z")
    assert "accounts" not in pv


@pytest.mark.parametrize(
    ("index", "subject"),
    [(0, "Grüße 📬 Ünïcödé #0"), (1, "café crème and  more #1"), (2, "Réunion à Zürich #2"),
     (3, "日本語の件名です #3")],
)
def test_rfc2047_subjects_decode(index: int, subject: str) -> None:
    assert build(corpus.rfc2047_subjects(seed=1)[index])["email"]["subject"] == subject


def test_rfc2231_and_rfc2047_file_names() -> None:
    doc = build(corpus.rfc2231_attachment())
    files = [a["file"] for a in doc["email"]["attachments"]]
    assert files[0]["name"] == "Résumé final.PDF"
    assert files[0]["extension"] == "pdf"
    assert files[0]["size"] == 5
    assert files[0]["hash"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert files[1]["name"] == "Grüße.png" and files[1]["mime_type"] == "image/png"
    assert doc["popvault"]["has_attachments"] is True
    assert doc["popvault"]["attachment_count"] == 2


def test_attachment_hash_is_of_decoded_bytes() -> None:
    raw = corpus.with_attachments(seed=3, count=3, size=4000)
    doc = build(raw)
    files = [a["file"] for a in doc["email"]["attachments"]]
    assert len(files) == 3 and all(f["size"] == 4000 for f in files)
    assert len({f["hash"]["sha256"] for f in files}) == 3


def test_html_only_is_converted_to_text() -> None:
    pv = build(corpus.html_only(seed=4))["popvault"]
    assert pv["body_source"] == "html"
    text = pv["body_text"]
    assert "Hello" in text and "&amp;" not in text and "& welcome" in text
    assert "<" not in text.replace("<https", "")  # no markup left
    assert "color: red" not in text and "var x" not in text  # style and script dropped
    assert "https://example.test/x" in text  # link targets stay searchable


def test_latin1_and_8bit_bodies_decode() -> None:
    assert "Réunion à Zürich" in build(corpus.latin1_body())["popvault"]["body_text"]
    assert "Grüße aus Köln" in build(corpus.eight_bit_utf8())["popvault"]["body_text"]
    doc = build(corpus.undeclared_8bit())
    assert doc["popvault"]["headers"]["x-note"].startswith("caf")


def test_body_truncation() -> None:
    pv = build(corpus.plain_text(size=5000), max_body_chars=100)["popvault"]
    assert pv["body_truncated"] is True and len(pv["body_text"]) == 100


def test_parse_failure_still_yields_document(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        @classmethod
        def from_bytes(cls, raw: bytes) -> None:
            raise RuntimeError("parser exploded\nwith a second line")

    monkeypatch.setattr(document, "_lean_parser", lambda: Exploding)
    raw = corpus.plain_text(seed=9)
    doc = build(raw)
    assert_valid(doc)
    pv = doc["popvault"]
    assert pv["parse_status"] == "failed"
    assert pv["parse_error"] == "RuntimeError: parser exploded with a second line"
    assert doc["email"]["subject"].endswith("#0")
    assert doc["email"]["from"]["address"]
    assert pv["body_text"] == "" and pv["body_source"] == "none"


def test_nesting_bomb_fails_gracefully() -> None:
    doc = build(corpus.nested_multipart_bomb(seed=1))
    assert_valid(doc)
    assert doc["popvault"]["parse_status"] == "failed"
    assert "Recursion" in doc["popvault"]["parse_error"]
    assert doc["email"]["subject"]


def test_headers_only_for_oversize() -> None:
    raw = corpus.with_attachments(seed=2, count=1, size=100_000)
    doc = build(raw, headers_only=True)
    assert_valid(doc)
    pv = doc["popvault"]
    assert pv["parse_status"] == "oversize" and pv["oversize"] is True and pv["parse_error"]
    assert pv["body_text"] == "" and pv["raw_size"] == len(raw)
    assert doc["email"]["content_type"] == "multipart/mixed"
    assert doc["email"]["subject"]


def test_header_line_without_colon_keeps_later_headers() -> None:
    doc = build(corpus.header_without_colon())
    assert doc["email"]["subject"].endswith("#0")
    assert doc["email"]["message_id"]


def test_timestamp_fallbacks() -> None:
    received = b"Received: from a by b; Tue, 03 Feb 2026 10:00:05 +0100\r\n"
    no_date = corpus.missing_date(seed=1)
    doc = build(received + no_date)
    assert doc["@timestamp"] == "2026-02-03T09:00:05Z"
    assert doc["email"]["delivery_timestamp"] == "2026-02-03T09:00:05Z"
    assert "origination_timestamp" not in doc["email"]
    assert doc["popvault"]["date_header_valid"] is False
    assert build(no_date)["@timestamp"] == ARCHIVED
    assert index_month(build(no_date)) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 3 Feb 2026 11:00:00 +0100", "2026-02-03T10:00:00Z"),
        ("3 Feb 2026 11:00:00 -0000", "2026-02-03T11:00:00Z"),  # naive means UTC
        ("Tue, 3 Feb 2026 11:00:00 EST", "2026-02-03T16:00:00Z"),
        ("Mon, 1 Jan 1850 00:00:00 +0000", None),
        ("Fri, 1 Jan 2100 00:00:00 +0000", None),
        ("Someday, 99 Smarch 20xx", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_date(value: str | None, expected: str | None) -> None:
    assert document.parse_date(value) == expected


def test_index_month_uses_the_date_header_only() -> None:
    doc = build(corpus.plain_text(seed=1))
    month = index_month(doc)
    assert month is not None
    assert month == doc["email"]["origination_timestamp"][:7].replace("-", ".")
    assert index_month({"@timestamp": "2026-01-01T00:00:00Z", "email": {}}) is None


def test_addresses_and_names() -> None:
    doc = build((CORPORA / "encoded_everything.eml").read_bytes())
    mail, pv = doc["email"], doc["popvault"]
    assert mail["from"]["address"] == ["hans.mueller@example.test"]
    assert pv["from_name"] == ["Müller, Hans"]
    assert mail["to"]["address"] == ["francois@example.test"]
    assert mail["cc"]["address"] == ["valid@example.test"]  # garbage skipped
    assert pv["thread"] == {
        "in_reply_to": ["<parent@example.test>"],
        "references": ["<root@example.test>", "<parent@example.test>"],
    }
    assert pv["message_id_normalized"] == "<folded@example.test>"
    assert mail["attachments"][0]["file"]["name"] == "été.tar.GZ"
    assert mail["attachments"][0]["file"]["extension"] == "gz"


def test_header_map_limits() -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    repeated = b"Received: r\r\n" * 150
    huge = b"X-Huge: " + "é".encode() * 10_000 + b"\r\n"
    headers = build(many + repeated + huge + b"Subject: s\r\n\r\nbody")["popvault"]["headers"]
    assert len(headers) == document.MAX_HEADER_NAMES
    raw = build(repeated + huge + b"\r\nbody")["popvault"]["headers"]
    assert isinstance(raw["received"], list) and len(raw["received"]) == 100
    assert len(raw["x-huge"].encode()) <= document.MAX_HEADER_VALUE_BYTES


def test_no_surrogates_or_nuls_reach_the_document() -> None:
    import json

    for name in ("nul_bytes", "undeclared_8bit", "binary_garbage", "unknown_charset"):
        text = json.dumps(build(SPECIAL[name]), ensure_ascii=False)
        text.encode("utf-8")  # raises on a lone surrogate
        assert "\\u0000" not in text


def test_attached_message_counts_as_one_file() -> None:
    doc = build((CORPORA / "attached_message.eml").read_bytes())
    files = [a["file"] for a in doc["email"]["attachments"]]
    assert [f["mime_type"] for f in files] == ["message/rfc822"]
    assert files[0]["name"] == "original.eml" and files[0]["size"] > 0


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_every_corpus_case_is_enriched(name: str) -> None:
    pv = build(SPECIAL[name])["popvault"]
    assert pv["kind"] in ("human", "auto_reply", "bounce", "list")
    assert isinstance(pv["spam"], bool) and isinstance(pv["kind_reasons"], list)
    assert len(pv["reply_text"]) <= len(pv["body_text"])


def test_generated_mail_is_human_and_random_attachments_are_flagged() -> None:
    doc = build(corpus.with_attachments(seed=3, count=3, size=4000))
    pv = doc["popvault"]
    assert pv["kind"] == "human" and pv["spam"] is False and pv["kind_reasons"] == []
    assert pv["reply_text"] == pv["body_text"].strip()
    names = [a["file"]["name"] for a in doc["email"]["attachments"]]
    flagged = {entry.split(": ", 1)[0] for entry in pv.get("attachment_errors", [])}
    # random bytes: a "report.pdf" is no PDF, a "data.csv" is binary; images and zips unread
    expected = {n for n in names if n.endswith(("report.pdf", "data.csv"))}
    assert flagged == expected
    assert "attachment_text" not in pv


def _address_values() -> list[str]:
    """Every address header value of the test corpora, plus hand-made plain and near-plain
    lists (the near-plain ones must go to the forensic parser)."""
    import email
    from email.policy import compat32

    from ingest.document import ADDRESS_FIELDS

    messages = [*corpus.generate_mail(seed=3, n=60), *corpus.special_cases(seed=3).values(),
                *corpus.benchmark_mix(7, 40).messages,
                *(p.read_bytes() for p in Path(__file__).parents[1].glob("corpora/**/*.eml"))]
    values = []
    for raw in messages:
        try:
            parsed = email.message_from_bytes(raw, policy=compat32)
        except RecursionError:  # the nested-multipart bomb: its headers are elsewhere too
            continue
        for _field, header in ADDRESS_FIELDS:
            values += [v for k, v in parsed.raw_items() if k.lower() == header]
    values += [
        "a@b.c", "<a@b.c>", "Bob <b@c.d>", "Bob  Smith\t<B@C.d>, x@y.z", " x <y@z.w> ,",
        "A.B <a@b.c>", '"Quoted, Name" <q@n.x>', "=?utf-8?q?J=C3=B6rg?= <j@x.y>",
        "a@b.c (comment)", "group: a@b.c, d@e.f;", "x@y.z,,a@b.c", "Bob <b@c.d> Smith",
        "a@[127.0.0.1]", "Jörg <j@x.y>", "a.b.c@d-e.f.g, H <h@i.j>", ",", "",
        "no address here", "<broken@", "a@b.c\r\n d@e.f",
    ]
    return values


def test_plain_address_lists_parse_as_the_forensic_parser_does() -> None:
    from mailparser.utils import get_addresses

    from ingest.document import plain_address_pairs

    fast = 0
    for value in _address_values():
        pairs = plain_address_pairs(value)
        if pairs is None:
            continue
        fast += 1
        assert pairs == list(get_addresses(value, decode_names=True)), value
        diagnostics: list[Any] = []
        assert pairs == list(get_addresses(value, defects=diagnostics)), value
        assert diagnostics == [], value  # so mail-parser's defects cannot differ either
    assert fast >= 50  # the corpora's ordinary headers do take the fast path
    assert plain_address_pairs('"Quoted, Name" <q@n.x>') is None
    assert plain_address_pairs("=?utf-8?q?J=C3=B6rg?= <j@x.y>") is None
    assert plain_address_pairs("a@b.c (comment)") is None


def test_the_lean_parser_leaves_documents_as_mail_parser_makes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Same documents with popvault's lean MailParser (no summary dicts, plain addresses
    fast) as with mail-parser's own, over every corpus; defects included."""
    import mailparser
    import mailparser.core

    messages = [*corpus.generate_mail(seed=4, n=40), *corpus.special_cases(seed=4).values(),
                *(p.read_bytes() for p in Path(__file__).parents[1].glob("corpora/**/*.eml"))]
    ids = {"raw_sha256": "0" * 64, "message_key": "k", "first_archived": "2026-01-01T00:00:00Z"}
    lean = [build_document(raw, **ids) for raw in messages]
    assert getattr(mailparser.core.get_addresses, "popvault_fast_path", False)
    monkeypatch.setattr(document, "_lean_parser", lambda: mailparser.MailParser)
    monkeypatch.setattr(mailparser.core, "get_addresses",
                        mailparser.core.get_addresses.forensic)
    assert not getattr(mailparser.core.get_addresses, "popvault_fast_path", False)
    plain = [build_document(raw, **ids) for raw in messages]
    assert lean == plain
