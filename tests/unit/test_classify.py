"""Kind classification: a hand-written corpus per kind, rule behaviour, configurable rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ingest.classify import ClassifyRules, Kind, classify
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document, fallback_document
from tests.unit.test_document import assert_valid

KINDS_DIR = Path(__file__).resolve().parents[1] / "corpora" / "kinds"
SPAM_DIR = "spam"
"""Spam-flagged mail: expected kind ``human`` (spam poses as people), ``spam`` true."""
MIN_PRECISION = MIN_RECALL = 0.9
MIN_EXAMPLES = 6


def _load(path: Path) -> bytes:
    """The file as a POP3 server returns it: CRLF line ends."""
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _build(raw: bytes) -> dict[str, Any]:
    return build_document(raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw),
                          first_archived="2026-09-01T12:00:00Z")


def _cases() -> list[tuple[str, str, bool, Path]]:
    """(case id, expected kind, expected spam, path) for every corpus file."""
    out = []
    for folder in sorted(p for p in KINDS_DIR.iterdir() if p.is_dir()):
        kind = Kind.HUMAN.value if folder.name == SPAM_DIR else Kind(folder.name).value
        for path in sorted(folder.glob("*.eml")):
            out.append((f"{folder.name}/{path.name}", kind, folder.name == SPAM_DIR, path))
    return out


CASES = _cases()
DOCS = {case_id: _build(_load(path)) for case_id, _kind, _spam, path in CASES}


def test_every_folder_has_enough_examples() -> None:
    counts = Counter(case_id.split("/")[0] for case_id, *_ in CASES)
    assert set(counts) == {k.value for k in Kind} | {SPAM_DIR}
    assert all(n >= MIN_EXAMPLES for n in counts.values()), counts


def _precision_recall(pairs: list[tuple[str, str]], label: str) -> tuple[float, float]:
    tp = sum(1 for want, got in pairs if want == label and got == label)
    predicted = sum(1 for _want, got in pairs if got == label)
    actual = sum(1 for want, _got in pairs if want == label)
    return (tp / predicted if predicted else 0.0), (tp / actual if actual else 0.0)


def test_precision_and_recall_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    pairs = [(kind, DOCS[case_id]["popvault"]["kind"]) for case_id, kind, _spam, _p in CASES]
    spam_pairs = [(str(spam), str(DOCS[case_id]["popvault"]["spam"]))
                  for case_id, _kind, spam, _p in CASES]
    lines, failures = [], []
    for label, source in [(k.value, pairs) for k in Kind] + [("spam", spam_pairs)]:
        precision, recall = _precision_recall(source, "True" if label == "spam" else label)
        lines.append(f"{label:>10}: precision {precision:.2f} recall {recall:.2f}")
        if precision < MIN_PRECISION or recall < MIN_RECALL:
            failures.append(label)
    wrong = [f"{cid}: want {k}, got {DOCS[cid]['popvault']['kind']} "
             f"{DOCS[cid]['popvault']['kind_reasons']}"
             for cid, k, _s, _p in CASES if DOCS[cid]["popvault"]["kind"] != k]
    with capsys.disabled():
        print("\nkind classification over", len(CASES), "messages\n" + "\n".join(lines))
        for line in wrong:
            print("  misclassified", line)
    assert not failures, (failures, wrong)


@pytest.mark.parametrize("case_id", sorted(DOCS))
def test_corpus_documents_validate(case_id: str) -> None:
    assert_valid(DOCS[case_id])


@pytest.mark.parametrize(("case_id", "recipients", "status", "action"), [
    ("bounce/postfix_user_unknown.eml", ["nobody@example.net"], ["5.1.1"], "failed"),
    ("bounce/gmail_dsn.eml", ["jdoe.typo@example.com"], ["5.1.1"], "failed"),
    ("bounce/exchange_ndr.eml", ["bob@fabrikam.com"], ["5.4.1"], "failed"),
    ("bounce/exim_failed.eml", ["orders@shop.invalid"], [], None),
    ("bounce/postfix_delayed.eml", ["buyer@slow.example"], ["4.4.1"], "delayed"),
    ("bounce/sendmail_returned.eml", ["student42@alumni.example.edu"], ["5.2.1"], "failed"),
])
def test_bounce_fields_come_from_the_dsn(
    case_id: str, recipients: list[str], status: list[str], action: str | None
) -> None:
    bounce = DOCS[case_id]["popvault"]["bounce"]
    assert bounce["recipients"] == recipients
    assert bounce["status"] == status
    assert bounce.get("action") == action


def test_reasons_say_why() -> None:
    assert "multipart/report:delivery-status" in DOCS["bounce/gmail_dsn.eml"]["popvault"][
        "kind_reasons"]
    assert DOCS["auto_reply/outlook_automatic_reply.eml"]["popvault"]["kind_reasons"][:2] == [
        "auto-submitted:auto-generated", "subject:auto_reply"]
    assert DOCS["auto_reply/weak_signals_only.eml"]["popvault"]["kind_reasons"] == [
        "weak:x-auto-response-suppress", "weak:body_phrase"]
    assert DOCS["human/plain_question.eml"]["popvault"]["kind_reasons"] == []
    assert "spam:x-spam-flag" in DOCS["spam/spamassassin_flag.eml"]["popvault"]["kind_reasons"]


def test_one_weak_signal_is_not_enough() -> None:
    for case_id in ("human/outlook_suppress_header.eml", "human/mentions_away.eml"):
        assert DOCS[case_id]["popvault"]["kind"] == "human", case_id


def test_bounce_outranks_auto_submitted_and_spam_is_independent() -> None:
    headers = {"auto-submitted": "auto-replied", "x-failed-recipients": "a@b.example",
               "x-spam-flag": "YES"}
    result = classify(headers)
    assert result.kind is Kind.BOUNCE and result.spam is True
    assert result.bounce is not None and result.bounce.recipients == ("a@b.example",)


def test_oversize_bounce_is_classified_from_headers() -> None:
    raw = _load(KINDS_DIR / "bounce" / "gmail_dsn.eml")
    doc = fallback_document(raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw),
                            first_archived="2026-09-01T12:00:00Z", parse_status="oversize",
                            parse_error=None)
    assert_valid(doc)
    assert doc["popvault"]["kind"] == "bounce"
    assert doc["popvault"]["bounce"]["recipients"] == ["jdoe.typo@example.com"]
    assert doc["popvault"]["bounce"]["status"] == []  # the DSN part was not read


def test_rules_from_dict_override_and_validate() -> None:
    rules = ClassifyRules.from_dict({
        "auto_reply_subjects": [r"ticket received\b"],
        "spam_headers": {"X-Custom-Spam": r"^\s*true"},
    })
    assert classify({"subject": "Ticket received: #12"}, rules=rules).kind is Kind.AUTO_REPLY
    assert classify({"subject": "Automatic reply: x"}, rules=rules).kind is Kind.HUMAN
    assert classify({"x-custom-spam": "true"}, rules=rules).spam is True
    assert classify({"x-spam-flag": "YES"}, rules=rules).spam is False
    with pytest.raises(ValueError, match="auto_reply_subject"):
        ClassifyRules.from_dict({"auto_reply_subject": ["x"]})
    with pytest.raises(ValueError, match="bad pattern"):
        ClassifyRules.from_dict({"bounce_subjects": ["(unclosed"]})
    with pytest.raises(ValueError, match="list of strings"):
        ClassifyRules.from_dict({"list_headers": "list-id"})


def test_build_document_uses_given_rules() -> None:
    raw = _load(KINDS_DIR / "human" / "plain_question.eml")
    rules = ClassifyRules.from_dict({"auto_reply_subjects": ["cannot export"]})
    doc = build_document(raw, raw_sha256=raw_sha256(raw), message_key=message_key(raw),
                         first_archived="2026-09-01T12:00:00Z", classify_rules=rules)
    assert doc["popvault"]["kind"] == "auto_reply"


@pytest.mark.parametrize("headers", [
    {}, {"subject": ["", ""]}, {"content-type": "multipart/report"},
    {"from": "<<<@@@>>>", "x-failed-recipients": ",,,"}, {"precedence": ";;"},
    {"auto-submitted": ""},
])
def test_odd_headers_never_raise(headers: dict[str, Any]) -> None:
    assert classify(headers).kind is Kind.HUMAN
