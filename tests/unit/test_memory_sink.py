"""ingest.sinks.memory: the same create-or-join/receipt semantics as the Elasticsearch sink."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason, ReceiptStatus
from ingest.searchquery import QuerySyntaxError
from ingest.sinks.base import IndexItem, Sink
from ingest.sinks.memory import MemorySink

pytestmark = pytest.mark.unit

FIXED_NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def doc(subject: str = "Hello", *, sender: str = "alice@example.com",
        to: tuple[str, ...] = ("bob@example.org",), body: str = "some body",
        when: str | None = "2026-01-15T10:00:00+00:00",
        files: tuple[str, ...] = ()) -> dict[str, Any]:
    email: dict[str, Any] = {
        "subject": subject,
        "from": {"address": sender},
        "to": [{"address": a} for a in to],
        "attachments": [{"file": {"name": n}} for n in files],
    }
    if when is not None:
        email["origination_timestamp"] = when
    return {"@timestamp": when or "2026-03-01T00:00:00Z", "email": email,
            "popvault": {"body_text": body, "has_attachments": bool(files)}}


def item(key: str, account: str = "a", uidl: str | None = "u1", **kw: Any) -> IndexItem:
    return IndexItem(message_key=key, account_id=account, uidl=uidl, raw_sha256="0" * 64,
                     raw_size=100, document=doc(**kw))


@pytest.fixture
def sink() -> MemorySink:
    s = MemorySink(now=lambda: FIXED_NOW)
    s.ensure_schema()
    return s


def test_is_a_sink(sink: MemorySink) -> None:
    s: Sink = sink
    assert s.name == "memory"


def test_new_documents_and_receipts(sink: MemorySink) -> None:
    out = sink.write([item("k1", uidl="u1"), item("k2", uidl="u2")])
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 2
    assert [o.reason for o in out] == [DuplicateReason.NEW] * 2
    assert sink.count_documents() == 2
    got = sink.get_receipts("a", ["u1", "u2", "u3"])
    assert set(got) == {"u1", "u2"}
    assert got["u1"].message_key == "k1"
    assert got["u1"].archived_at == "2026-03-01T12:00:00.000Z"
    assert got["u1"].status is ReceiptStatus.ARCHIVED
    assert out[0].receipt == got["u1"]


def test_replay_changes_nothing_and_keeps_the_original_receipt(sink: MemorySink) -> None:
    batch = [item("k1", uidl="u1"), item("k2", uidl="u2")]
    sink.write(batch)
    before = dict(sink.receipts)
    later = MemorySink(now=lambda: FIXED_NOW + dt.timedelta(days=1))
    later.documents, later.receipts = sink.documents, sink.receipts
    out = later.write(batch)
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 2
    assert [o.reason for o in out] == [DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT] * 2
    assert later.receipts == before
    assert out[0].receipt is not None and out[0].receipt.reason is DuplicateReason.NEW
    assert later.count_documents() == 2


def test_same_key_from_other_account_joins_the_document(sink: MemorySink) -> None:
    sink.write([item("k1", "a", "u1")])
    out = sink.write([item("k1", "b", "x9")])
    assert out[0].reason is DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT
    assert sink.count_documents() == 1
    assert sink.accounts_of(["k1", "nope"]) == {"k1": ["a", "b"]}
    assert sink.get_receipts("b", ["x9"])["x9"].reason is DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT


def test_reasons_within_one_batch_follow_batch_order(sink: MemorySink) -> None:
    out = sink.write([item("k1", "a", "u1"), item("k1", "a", "u2"), item("k1", "b", "u1")])
    assert [o.reason for o in out] == [
        DuplicateReason.NEW, DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT,
        DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT]
    assert sink.accounts_of(["k1"]) == {"k1": ["a", "b"]}
    assert sink.count_receipts() == 3


def test_no_receipt_without_uidl(sink: MemorySink) -> None:
    out = sink.write([item("k1", uidl=None)])
    assert out[0].delivery is Delivery.DELIVERED and out[0].receipt is None
    assert sink.count_receipts() == 0 and sink.count_documents() == 1


def test_injected_document_failures() -> None:
    def fail(it: IndexItem) -> Delivery | None:
        return {"bad": Delivery.REJECTED, "busy": Delivery.ERRORED}.get(it.message_key)

    s = MemorySink(fail=fail)
    out = s.write([item("bad", uidl="1"), item("busy", uidl="2"), item("ok", uidl="3")])
    assert [o.delivery for o in out] == [Delivery.REJECTED, Delivery.ERRORED, Delivery.DELIVERED]
    assert out[0].error is not None and "bad" in out[0].error and "rejected" in out[0].error
    assert s.count_documents() == 1 and set(s.get_receipts("a", ["1", "2", "3"])) == {"3"}


def test_receipt_failure_keeps_the_document_but_is_not_delivered() -> None:
    s = MemorySink(fail_receipt=lambda it: Delivery.ERRORED)
    out = s.write([item("k1")])
    assert out[0].delivery is Delivery.ERRORED
    assert s.count_documents() == 1 and s.count_receipts() == 0
    s.fail_receipt = None
    again = s.write([item("k1")])
    assert again[0].delivery is Delivery.DELIVERED
    assert again[0].reason is DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT


def test_reused_uidl_with_other_content_is_rejected(sink: MemorySink) -> None:
    sink.write([item("k1", uidl="u1")])
    out = sink.write([item("k2", uidl="u1")])
    assert out[0].delivery is Delivery.REJECTED
    assert out[0].error is not None and "UIDL" in out[0].error


def test_unavailable_and_full(sink: MemorySink) -> None:
    sink.unavailable = True
    with pytest.raises(SinkError) as err:
        sink.write([item("k1")])
    assert err.value.transient
    sink.unavailable = False
    sink.full = True
    with pytest.raises(IndexFull):
        sink.write([item("k1")])
    assert sink.count_documents() == 0


def test_body_text_is_capped() -> None:
    s = MemorySink(max_body_chars=10)
    s.write([item("k1", body="x" * 50), item("k2", body="short")])
    docs = dict(s.iter_documents())
    assert docs["k1"]["popvault"]["body_text"] == "x" * 10
    assert docs["k1"]["popvault"]["body_truncated"] is True
    assert "body_truncated" not in docs["k2"]["popvault"]


def test_mark_deleted(sink: MemorySink) -> None:
    sink.write([item("k1", uidl="u1"), item("k2", uidl="u2")])
    sink.mark_deleted("a", ["u1", "missing"], "2026-03-02T00:00:00Z")
    got = sink.get_receipts("a", ["u1", "u2"])
    assert got["u1"].deleted_at == "2026-03-02T00:00:00Z" and got["u2"].deleted_at is None


def test_index_names_follow_the_date_rule(sink: MemorySink) -> None:
    sink.write([item("k1", when="2026-01-31T23:30:00-02:00"), item("k2", uidl="u2", when=None)])
    assert sink.indices == {"k1": "popvault-messages-2026.02", "k2": "popvault-messages-undated"}


def test_search_subset(sink: MemorySink) -> None:
    sink.write([
        item("k1", "a", "1", subject="Invoice March", sender="billing@shop.example",
             when="2026-01-10T08:00:00Z", files=("Invoice-03.pdf",)),
        item("k2", "b", "2", subject="Lunch", sender="carol@example.com", to=("dan@shop.example",),
             body="see you at noon", when="2026-02-10T08:00:00Z"),
        item("k3", "a", "3", subject="Re: lunch", sender="dan@shop.example",
             when="2026-02-11T08:00:00Z"),
    ])

    def keys(q: str) -> list[str]:
        return [h.message_key for h in sink.search(q).hits]

    assert keys("from:shop.example") == ["k3", "k1"]
    assert keys("from:@shop.example -subject:lunch") == ["k1"]
    assert keys("to:dan@shop.example") == ["k2"]
    assert keys("lunch") == ["k3", "k2"]
    assert keys('"at noon"') == ["k2"]
    assert keys("has:attachment") == ["k1"]
    assert keys("invoice-03") == ["k1"]
    assert keys("filename:pdf") == ["k1"]
    assert keys("after:2026-02-10") == ["k3", "k2"]
    assert keys("before:2026-02-10") == ["k1"]
    assert keys("account:b") == ["k2"]
    assert sink.search("", limit=1).total == 3
    with pytest.raises(QuerySyntaxError):
        sink.search("bogus:field")
