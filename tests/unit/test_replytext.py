"""Reply text: the new part of real-world reply styles, without quotes and signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest import replytext
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from ingest.replytext import reply_text
from tests.unit.test_document import assert_valid

REPLIES = Path(__file__).resolve().parents[1] / "corpora" / "replies"

# file -> (marker of the new part, markers that must be gone)
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "outlook_from_sent.eml": ("NEWPART_OUTLOOK", ("QUOTED_OUTLOOK", "Sent: Monday")),
    "outlook_original_message.eml": ("NEWPART_ORIGINAL", ("QUOTED_ORIGINAL", "Original Message")),
    "gmail_on_wrote.eml": ("NEWPART_GMAIL", ("QUOTED_GMAIL", "wrote:")),
    "apple_mail.eml": ("NEWPART_APPLE", ("QUOTED_APPLE", "Sent from my iPhone")),
    "german_am_schrieb.eml": ("NEUERTEIL_DEUTSCH", ("ZITAT_DEUTSCH", "schrieb")),
    "french_le_a_ecrit.eml": ("NOUVELLE_PARTIE", ("PARTIE_CITEE", "a écrit")),
    "signature_dashes.eml": ("NEWPART_SIG", ("SIGNATURE_LINE", "+1 555")),
    "not_a_reply.eml": ("NEWPART_PLAIN", ()),
    "outlook_html_only.eml": ("NEWPART_HTML", ("QUOTED_HTML",)),
}


def _build(path: Path) -> dict[str, Any]:
    raw = path.read_bytes().replace(b"\n", b"\r\n")
    return build_document(raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw),
                          first_archived="2026-09-01T12:00:00Z")


def test_every_corpus_file_has_an_expectation() -> None:
    assert sorted(p.name for p in REPLIES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reply_text_keeps_the_new_part_only(name: str) -> None:
    doc = _build(REPLIES / name)
    assert_valid(doc)
    pv = doc["popvault"]
    keep, gone = EXPECTED[name]
    assert keep in pv["reply_text"]
    for marker in gone:
        assert marker not in pv["reply_text"], marker
        assert marker in pv["body_text"], marker  # the full body still has it


def test_hyphen_lists_are_not_signatures() -> None:
    text = reply_text("Two options:\n- refund\n- replacement\n\n-- \nAnna")
    assert "- replacement" in text and "Anna" not in text


def test_a_sentence_starting_with_thanks_is_kept() -> None:
    body = ("Hi,\n\nThanks, that fixed it. One more question: can I export PDFs?\n\n"
            "On Mon, Jan 5, 2026 at 10:00 AM Support <s@example.com> wrote:\n> old")
    assert reply_text(body) == ("Hi,\n\nThanks, that fixed it. One more question: "
                                "can I export PDFs?")


def test_short_signoff_is_dropped() -> None:
    body = "Works now.\n\nBest regards,\nAnna Schmidt\n\nOn Mon, 5 Jan 2026, Bob wrote:\n> x"
    assert reply_text(body) == "Works now."


def test_library_failure_falls_back_to_full_body(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(_text: str) -> str:
        raise RuntimeError("library bug")

    monkeypatch.setattr(replytext, "_split", explode)
    body = "New text\n\n> quoted\n"
    assert reply_text(body) == body.strip()


def test_all_quoted_falls_back_to_full_body() -> None:
    body = "> only a quote\n> nothing new"
    assert reply_text(body) == body


@pytest.mark.parametrize("body", ["", "   \n ", "\0\0", ">" * 10_000, "-- \n" * 5000,
                                  "From: x\nSent: y\n" * 2000])
def test_odd_bodies_never_raise(body: str) -> None:
    assert isinstance(reply_text(body), str)
