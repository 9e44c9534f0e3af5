"""What only the SQLite sink has: a file, WAL, durability across reopen, threads, sqlite errors.

The behaviour it shares with the other sinks is in tests/integration/test_sink_contract.py.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason
from ingest.searchquery import QuerySyntaxError, Text, TextScope
from ingest.sinks.base import IndexItem
from ingest.sinks.embedded import SCHEMA_VERSION, EmbeddedSink, fts_expression
from tests.corpus import generate_mail, with_attachments

THREADS = 4


def make_item(raw: bytes, account_id: str, uidl: str | None) -> IndexItem:
    key = message_key(raw)
    sha = raw_sha256(raw)
    doc = build_document(raw, raw_sha256=sha, message_key=key,
                         first_archived="2026-01-01T00:00:00Z")
    return IndexItem(message_key=key, account_id=account_id, uidl=uidl, raw_sha256=sha,
                     raw_size=len(raw), document=doc)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "index.sqlite3"


def test_opening_touches_nothing_until_first_use(db: Path) -> None:
    sink = EmbeddedSink(db)
    assert not db.exists()
    sink.ensure_schema()
    assert db.exists()
    sink.close()


def test_schema_is_versioned_wal_and_idempotent(db: Path) -> None:
    sink = EmbeddedSink(db)
    sink.ensure_schema()
    sink.ensure_schema()
    assert sink.journal_mode() == "wal"
    with sink._sql("test") as conn:  # private on purpose: synchronous is per connection
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    sink.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"documents", "document_accounts", "receipts", "fts"} <= tables
    EmbeddedSink(db).ensure_schema()  # reopening an installed file is fine too


def test_newer_schema_is_refused(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SinkError, match="newer than this popvault") as info:
        EmbeddedSink(db).ensure_schema()
    assert str(db) in str(info.value)
    assert not info.value.transient


def test_reopen_keeps_documents_receipts_and_search(db: Path) -> None:
    mail = generate_mail(2, 8)
    sink = EmbeddedSink(db)
    sink.write([make_item(raw, "work", f"u{i}") for i, raw in enumerate(mail)])
    sink.write([make_item(mail[0], "home", "h0")])
    sink.mark_deleted("work", ["u1"], "2026-02-01T00:00:00Z")
    sink.close()

    again = EmbeddedSink(db)
    assert again.count_documents() == 8
    assert again.count_receipts() == 9
    assert again.count_receipts("work", live_only=True) == 7
    key = message_key(mail[0])
    assert again.accounts_of([key]) == {key: ["work", "home"]}
    assert again.get_receipts("work", ["u1"])["u1"].deleted_at == "2026-02-01T00:00:00Z"
    assert [h.message_key for h in again.search("account:home").hits] == [key]
    replay = again.write([make_item(mail[0], "home", "h0")])[0]
    assert replay.delivery is Delivery.DELIVERED
    assert replay.receipt is not None and replay.receipt.reason is (
        DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT)
    again.close()


@pytest.mark.parametrize("shared", [True, False], ids=["one-sink", "sink-per-thread"])
def test_concurrent_writes_from_threads(db: Path, shared: bool) -> None:
    """``poll --parallel 4``: each thread an account, all polling the same messages.

    ``sink-per-thread`` gives each thread its own connection, as separate processes would have,
    so the file lock and busy_timeout are exercised, not only the in-process lock.
    """
    mail = generate_mail(3, 20)
    EmbeddedSink(db).ensure_schema()
    one = EmbeddedSink(db)
    errors: list[BaseException] = []
    outcomes: list[Delivery] = []
    start = threading.Barrier(THREADS)

    def poll(account: str) -> None:
        sink = one if shared else EmbeddedSink(db)
        try:
            start.wait()
            items = [make_item(raw, account, f"u{i}") for i, raw in enumerate(mail)]
            for batch in range(0, len(items), 5):
                outcomes.extend(o.delivery for o in sink.write(items[batch:batch + 5]))
        except BaseException as exc:  # reported below, a thread cannot fail the test
            errors.append(exc)
        finally:
            if not shared:
                sink.close()

    threads = [threading.Thread(target=poll, args=(f"acct{n}",)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert outcomes == [Delivery.DELIVERED] * (THREADS * len(mail))
    assert one.count_documents() == len(mail)
    assert one.count_receipts() == THREADS * len(mail)
    accounts = one.accounts_of([message_key(raw) for raw in mail])
    assert all(sorted(a) == [f"acct{n}" for n in range(THREADS)] for a in accounts.values())
    one.close()


def test_missing_directory_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "index.sqlite3"
    with pytest.raises(SinkError) as info:
        EmbeddedSink(path).ensure_schema()
    assert str(path) in str(info.value)


def test_disk_full_is_index_full_and_rolls_back(db: Path) -> None:
    sink = EmbeddedSink(db)
    sink.write([make_item(generate_mail(4, 1)[0], "work", "u0")])
    # Simulate a full disk: cap the file at its current size (per connection).
    with sink._sql("test") as conn:  # private on purpose: no public way to fill a disk
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
    big = [make_item(with_attachments(4, i, text_size=200_000), "work", f"b{i}")
           for i in range(3)]
    with pytest.raises(IndexFull, match="disk full") as info:
        sink.write(big)
    assert str(db) in str(info.value)
    assert not info.value.transient
    assert sink.count_documents() == 1  # the failed batch left nothing behind
    assert sink.count_receipts() == 1
    sink.close()


def test_body_is_capped_and_lone_surrogates_survive(db: Path) -> None:
    raw = generate_mail(5, 1)[0]
    item = make_item(raw, "work", "u0")
    item.document["email"]["subject"] = "broken \udce9 subject"
    sink = EmbeddedSink(db, max_body_chars=10)
    assert sink.write([item])[0].delivery is Delivery.DELIVERED
    doc = sink.search("subject:broken").hits[0].document
    assert len(doc["popvault"]["body_text"]) == 10
    assert doc["popvault"]["body_truncated"] is True
    assert doc["email"]["subject"] == "broken ? subject"  # as the ES sink encodes it
    sink.close()


def test_query_syntax_error_before_touching_the_file(db: Path) -> None:
    with pytest.raises(QuerySyntaxError):
        EmbeddedSink(db).search("nosuchfield:x")
    assert not db.exists()


@pytest.mark.parametrize(("term", "expected"), [
    (Text("budget"), '(subject : ("budget")) OR (body_text : ("budget"))'
                     ' OR (attachment_text : ("budget"))'),
    (Text("a-b"), '(subject : ("a" AND "b")) OR (body_text : ("a" AND "b"))'
                  ' OR (attachment_text : ("a" AND "b"))'),
    (Text("please find", phrase=True),
     '(subject : "please find") OR (body_text : "please find")'
     ' OR (attachment_text : "please find")'),
    (Text('AND"NOT', scope=TextScope.SUBJECT), '(subject : ("AND" AND "NOT"))'),
    (Text("!!"), None),
])
def test_fts_expression_quotes_every_token(term: Text, expected: str | None) -> None:
    assert fts_expression(term) == expected


def test_operator_words_and_punctuation_are_searched_as_text(db: Path) -> None:
    sink = EmbeddedSink(db)
    sink.write([make_item(generate_mail(6, 1)[0], "work", "u0")])
    for query in ("OR", "NOT", "AND", '"*"', "NEAR(", "subject:^x", "x*"):
        assert sink.search(query).total == 0
    sink.close()
