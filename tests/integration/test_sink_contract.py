"""One contract suite for every sink: memory, embedded (SQLite) and Elasticsearch (real node).

The poll logic is tested against MemorySink; this suite is what makes that meaningful: the same
batches must give the same outcomes, counts, receipts and search hits on all three sinks.
Where MemorySink's documented search subset differs (substring instead of analysed words), the
memory leg of that query is skipped with the reason.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ingest.config import ElasticsearchConfig
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from ingest.outcome import Delivery, DuplicateReason
from ingest.searchquery import Text, parse_query
from ingest.sinks.base import IndexItem, ItemOutcome, SearchResult, Sink
from ingest.sinks.elasticsearch import ElasticsearchSink
from ingest.sinks.embedded import EmbeddedSink
from ingest.sinks.memory import MemorySink
from tests.corpus import (
    generate_mail,
    same_message_id_different_content,
    same_message_two_deliveries,
    with_attachments,
)

if TYPE_CHECKING:
    import elasticsearch

SINK_KINDS = ("memory", "embedded", "elasticsearch")
FIRST_ARCHIVED = "2026-01-01T00:00:00Z"
DELETED_AT = "2026-02-01T00:00:00Z"


def make_item(raw: bytes, account_id: str, uidl: str | None) -> IndexItem:
    key = message_key(raw)
    sha = raw_sha256(raw)
    doc = build_document(raw, raw_sha256=sha, message_key=key, first_archived=FIRST_ARCHIVED)
    return IndexItem(message_key=key, account_id=account_id, uidl=uidl, raw_sha256=sha,
                     raw_size=len(raw), document=doc)


def open_sink(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
              es_prefix: str | None = None) -> Sink:
    """A fresh, empty sink of ``kind``; the stack is only started for Elasticsearch."""
    if kind == "memory":
        return MemorySink()
    if kind == "embedded":
        return EmbeddedSink(tmp_path / "index.sqlite3")
    stack = request.getfixturevalue("stack")
    prefix = es_prefix if es_prefix is not None else request.getfixturevalue("es_prefix")
    return ElasticsearchSink(ElasticsearchConfig(url=stack.es_url, index_prefix=prefix))


@pytest.fixture(params=SINK_KINDS)
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    opened = open_sink(request.param, request, tmp_path)
    opened.ensure_schema()
    yield opened
    opened.close()


def deliveries(outcomes: list[ItemOutcome]) -> list[Delivery]:
    return [o.delivery for o in outcomes]


# -- write contract ---------------------------------------------------------------------------


def test_ensure_schema_is_idempotent(sink: Sink) -> None:
    sink.ensure_schema()
    item = make_item(generate_mail(1, 1)[0], "work", "u1")
    assert deliveries(sink.write([item])) == [Delivery.DELIVERED]
    sink.ensure_schema()
    assert sink.count_documents() == 1
    assert sink.count_receipts() == 1


def test_write_batch_counts_exactly(sink: Sink) -> None:
    items = [make_item(raw, "work", f"u{i}") for i, raw in enumerate(generate_mail(3, 12))]
    outcomes = sink.write(items)
    assert deliveries(outcomes) == [Delivery.DELIVERED] * 12
    assert {o.reason for o in outcomes} == {DuplicateReason.NEW}
    assert all(o.receipt is not None and o.receipt.uidl == i.uidl
               for o, i in zip(outcomes, items, strict=True))
    sink.refresh()
    assert sink.count_documents() == 12
    assert sink.count_receipts() == 12
    assert sink.count_receipts("work") == 12
    assert sink.count_receipts("home") == 0
    assert sink.accounts_of([i.message_key for i in items]) == {
        i.message_key: ["work"] for i in items}


def test_replay_changes_nothing(sink: Sink) -> None:
    items = [make_item(raw, "work", f"u{i}") for i, raw in enumerate(generate_mail(4, 6))]
    first = sink.write(items)
    again = sink.write(items)
    assert deliveries(again) == [Delivery.DELIVERED] * 6
    assert {o.reason for o in again} == {DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT}
    assert [o.receipt for o in again] == [o.receipt for o in first]  # the original receipt
    assert all(o.receipt is not None and o.receipt.reason is DuplicateReason.NEW for o in again)
    sink.refresh()
    assert sink.count_documents() == 6
    assert sink.count_receipts() == 6
    assert sink.accounts_of([items[0].message_key]) == {items[0].message_key: ["work"]}


def test_same_key_second_account_joins_one_document(sink: Sink) -> None:
    one, two = same_message_two_deliveries(seed=5)
    first, second = make_item(one, "alice", "a1"), make_item(two, "bob", "b1")
    assert first.message_key == second.message_key
    assert sink.write([first])[0].reason is DuplicateReason.NEW
    joined = sink.write([second])[0]
    assert joined.delivery is Delivery.DELIVERED
    assert joined.reason is DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT
    assert joined.receipt is not None and joined.receipt.reason is (
        DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT)
    sink.refresh()
    assert sink.count_documents() == 1
    assert sink.count_receipts() == 2
    assert sink.accounts_of([first.message_key]) == {first.message_key: ["alice", "bob"]}
    hits = sink.search("account:bob").hits
    assert [h.message_key for h in hits] == [first.message_key]
    assert hits[0].document["popvault"]["accounts"] == ["alice", "bob"]


def test_same_key_two_accounts_in_one_batch(sink: Sink) -> None:
    one, two = same_message_two_deliveries(seed=6)
    outcomes = sink.write([make_item(one, "alice", "a1"), make_item(two, "bob", "b1")])
    assert deliveries(outcomes) == [Delivery.DELIVERED] * 2
    assert [o.reason for o in outcomes] == [DuplicateReason.NEW,
                                            DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT]
    sink.refresh()
    assert sink.count_documents() == 1
    assert sink.accounts_of([outcomes[0].message_key]) == {
        outcomes[0].message_key: ["alice", "bob"]}


def test_same_message_id_different_content_gives_two_documents(sink: Sink) -> None:
    one, two = same_message_id_different_content(seed=7)
    items = [make_item(one, "work", "u1"), make_item(two, "work", "u2")]
    assert items[0].message_key != items[1].message_key
    outcomes = sink.write(items)
    assert [o.reason for o in outcomes] == [DuplicateReason.NEW, DuplicateReason.NEW]
    sink.refresh()
    assert sink.count_documents() == 2


def test_get_receipts_returns_stored_fields(sink: Sink) -> None:
    items = [make_item(raw, "work", f"u{i}") for i, raw in enumerate(generate_mail(8, 3))]
    written = {o.uidl: o.receipt for o in sink.write(items)}
    got = sink.get_receipts("work", ["u0", "u2", "missing"])
    assert set(got) == {"u0", "u2"}
    for uidl, receipt in got.items():
        assert receipt == written[uidl]
        item = items[int(uidl[1:])]
        assert (receipt.account_id, receipt.message_key, receipt.raw_sha256,
                receipt.raw_size) == ("work", item.message_key, item.raw_sha256, item.raw_size)
        assert receipt.deleted_at is None
    assert sink.get_receipts("home", ["u0"]) == {}
    assert sink.get_receipts("work", []) == {}


def test_mark_deleted_drops_live_count(sink: Sink) -> None:
    items = [make_item(raw, "work", f"u{i}") for i, raw in enumerate(generate_mail(9, 5))]
    sink.write(items)
    sink.mark_deleted("work", ["u1", "u3", "unknown"], DELETED_AT)
    sink.refresh()
    assert sink.count_receipts("work") == 5
    assert sink.count_receipts("work", live_only=True) == 3
    assert sink.count_receipts(live_only=True) == 3
    got = sink.get_receipts("work", ["u1", "u2"])
    assert got["u1"].deleted_at == DELETED_AT
    assert got["u2"].deleted_at is None


def test_uidl_reused_for_another_message_is_rejected(sink: Sink) -> None:
    first, other = generate_mail(10, 2)
    original = sink.write([make_item(first, "work", "u1")])[0].receipt
    outcome = sink.write([make_item(other, "work", "u1")])[0]
    assert outcome.delivery is Delivery.REJECTED
    assert outcome.receipt == original
    assert outcome.error and "UIDL 'u1'" in outcome.error
    sink.refresh()
    assert sink.count_receipts() == 1


def test_item_without_uidl_writes_no_receipt(sink: Sink) -> None:
    outcome = sink.write([make_item(generate_mail(11, 1)[0], "import", None)])[0]
    assert outcome.delivery is Delivery.DELIVERED and outcome.receipt is None
    sink.refresh()
    assert sink.count_documents() == 1
    assert sink.count_receipts() == 0


# -- search: the same query set gives the same hits everywhere ------------------------------------


@dataclass(frozen=True)
class Case:
    query: str
    memory_skip: str | None = None  # why MemorySink's documented subset differs here
    nonempty: bool = True  # the corpus is built so that this query finds something


SUBSTRING = "MemorySink matches substrings, Elasticsearch and FTS5 whole words"
SEARCH_CASES = (
    Case("report"),
    Case("REPORT"),
    Case("budget review"),
    Case('"please find"'),
    Case('"find please"'),  # a phrase is ordered: different hits from "please find"
    Case("subject:budget"),
    Case("subject:#9", memory_skip=SUBSTRING + " ('#9' is in '#90')"),
    Case("rep", memory_skip=SUBSTRING + " ('rep' is in 'report')", nonempty=False),
    Case("pdf"),  # an attachment-name substring through free text
    Case("report.pdf"),  # one token for Elasticsearch, two for FTS5; same hits here
    Case("has:attachment"),
    Case("-has:attachment"),
    Case("from:{from_domain}"),
    Case("from:@{from_domain}"),
    Case("from:{from_address}"),
    Case("to:{to_domain}"),
    Case("-to:{to_domain}"),
    Case("after:2026-03-01"),
    Case("before:2026-03-01"),
    Case("after:2026-03-01 before:2026-05-01"),
    Case("-after:2026-03-01"),
    Case("account:home"),
    Case("account:work -account:home"),
    Case("account:home account:work"),
    Case("filename:report"),
    Case("filename:.PDF"),
    Case("-report -budget"),
    Case("welcome"),  # html-only bodies
    Case("has:attachment -filename:zip after:2026-02-01"),
)


@pytest.fixture(scope="module")
def search_prefix(es_client: elasticsearch.Elasticsearch) -> Iterator[str]:
    """Like the ``es_prefix`` fixture, but shared by the module's search cases."""
    prefix = f"pvt-{secrets.token_hex(5)}"
    yield prefix
    es = es_client.options(ignore_status=404)
    es.indices.delete(index=f"{prefix}*", expand_wildcards="all", ignore_unavailable=True,
                      allow_no_indices=True)
    es.indices.delete_index_template(name=f"{prefix}*")


@dataclass
class Loaded:
    sinks: dict[str, Sink]
    values: dict[str, str]


@pytest.fixture(scope="module")
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           search_prefix: str) -> Iterator[Loaded]:
    """All three sinks holding one corpus: two accounts, a message seen in both."""
    mail = [*generate_mail(21, 30), with_attachments(21, 90), with_attachments(21, 91)]
    work = [make_item(raw, "work", f"w{i}") for i, raw in enumerate(mail) if i % 3]
    home = [make_item(raw, "home", f"h{i}") for i, raw in enumerate(mail) if not i % 3]
    one, two = same_message_two_deliveries(seed=21)
    work.append(make_item(one, "work", "w-twice"))
    home.append(make_item(two, "home", "h-twice"))
    sinks: dict[str, Sink] = {}
    for kind in SINK_KINDS:
        sink = open_sink(kind, request, tmp_path_factory.mktemp(kind), es_prefix=search_prefix)
        sink.ensure_schema()
        assert set(deliveries(sink.write(work) + sink.write(home))) == {Delivery.DELIVERED}
        sink.refresh()
        sinks[kind] = sink
    doc = work[0].document["email"]
    values = {
        "from_address": doc["from"]["address"][0],
        "from_domain": doc["from"]["address"][0].split("@")[1],
        "to_domain": doc["to"]["address"][0].split("@")[1],
    }
    yield Loaded(sinks, values)
    for sink in sinks.values():
        sink.close()


def timestamps(result: SearchResult) -> list[float | None]:
    """Hit order as instants, so equal ``@timestamp`` values may come in any order."""
    out: list[float | None] = []
    for hit in result.hits:
        raw = hit.document.get("@timestamp")
        out.append(dt.datetime.fromisoformat(raw).timestamp() if isinstance(raw, str) else None)
    return out


def _has_text(query: str) -> bool:
    return any(isinstance(c.term, Text) and not c.negated for c in parse_query(query).clauses)


@pytest.mark.parametrize("case", SEARCH_CASES, ids=[c.query for c in SEARCH_CASES])
@pytest.mark.parametrize("kind", ("memory", "embedded"))
def test_search_matches_elasticsearch(loaded: Loaded, case: Case, kind: str) -> None:
    if kind == "memory" and case.memory_skip:
        pytest.skip(case.memory_skip)
    query = case.query.format(**loaded.values)
    expected = loaded.sinks["elasticsearch"].search(query, limit=100)
    got = loaded.sinks[kind].search(query, limit=100)
    assert got.total == expected.total
    assert {h.message_key for h in got.hits} == {h.message_key for h in expected.hits}
    if case.nonempty:
        assert 0 < expected.total < loaded.sinks[kind].count_documents()
    if not _has_text(query):  # no scores: newest first everywhere (ties in any order)
        assert timestamps(got) == timestamps(expected)


def test_search_returns_documents_with_accounts(loaded: Loaded) -> None:
    for kind, sink in loaded.sinks.items():
        hits = sink.search("account:home account:work").hits
        assert len(hits) == 1, kind
        assert sorted(hits[0].document["popvault"]["accounts"]) == ["home", "work"], kind


def test_search_limit_and_order(loaded: Loaded) -> None:
    newest = {kind: timestamps(sink.search("", limit=5)) for kind, sink in loaded.sinks.items()}
    assert len(newest["elasticsearch"]) == 5
    assert newest["memory"] == newest["embedded"] == newest["elasticsearch"]
    for sink in loaded.sinks.values():
        assert sink.search("report", limit=0).hits == []
