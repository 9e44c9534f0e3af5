"""ElasticsearchSink against the real Elasticsearch 9.2 test node (tests/harness).

Every count is exact and read back from Elasticsearch itself. The tests at the bottom use a
stand-in client (no server) for the retry paths a real single node cannot be made to produce
on demand (429 storms, 5xx, a dropped connection mid-batch).
"""

from __future__ import annotations

import datetime as dt
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from ingest.config import ElasticsearchConfig
from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason
from ingest.sinks.base import IndexItem
from ingest.sinks.elasticsearch import ElasticsearchSink, IndexNames, TemplateSource
from ingest.sinks.retry import Verdict, backoff_s, classify

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

# --- templates: the schemas package when it exists, else this minimal stand-in ---------------

_KEYWORD = {"type": "keyword"}
_ADDRESS = {"properties": {"address": _KEYWORD, "name": {"type": "text"}}}


class FallbackTemplates:
    """Minimal composable templates with the fields the sink and the search syntax use."""

    def index_template(self, prefix: str) -> dict[str, Any]:
        return {
            "index_patterns": [f"{prefix}-messages-*"],
            "template": {
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {
                    "dynamic": "strict",
                    "properties": {
                        "@timestamp": {"type": "date"},
                        "email": {"properties": {
                            "origination_timestamp": {"type": "date"},
                            "subject": {"type": "text",
                                        "fields": {"keyword": {"type": "keyword",
                                                               "ignore_above": 1024}}},
                            "from": _ADDRESS, "to": _ADDRESS, "cc": _ADDRESS, "bcc": _ADDRESS,
                            "attachments": {"properties": {"file": {"properties": {
                                "name": _KEYWORD}}}},
                        }},
                        "popvault": {"properties": {
                            "accounts": _KEYWORD,
                            "body_text": {"type": "text"},
                            "body_truncated": {"type": "boolean"},
                            "has_attachments": {"type": "boolean"},
                        }},
                    },
                },
            },
        }

    def receipts_template(self, prefix: str) -> dict[str, Any]:
        kw = _KEYWORD
        return {
            "index_patterns": [f"{prefix}-receipts-*"],
            "template": {
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {"dynamic": "strict", "properties": {
                    "account_id": kw, "uidl": kw, "message_key": kw, "raw_sha256": kw,
                    "raw_size": {"type": "long"}, "status": kw, "reason": kw,
                    "archived_at": {"type": "date"}, "deleted_at": {"type": "date"},
                    "note": {"type": "text"},
                }},
            },
        }


def template_source() -> TemplateSource:
    try:
        schemas = importlib.import_module("schemas")
    except ImportError:
        return FallbackTemplates()
    if hasattr(schemas, "index_template") and hasattr(schemas, "receipts_template"):
        return cast(TemplateSource, schemas)
    return FallbackTemplates()


# --- documents --------------------------------------------------------------------------------


def make_doc(subject: str, *, sender: str = "alice@example.com",
             to: tuple[str, ...] = ("bob@example.org",), cc: tuple[str, ...] = (),
             body: str = "hello there", when: str | None = "2026-01-15T10:00:00Z",
             files: tuple[str, ...] = ()) -> dict[str, Any]:
    email: dict[str, Any] = {
        "subject": subject,
        "from": {"address": sender},
        "to": [{"address": a} for a in to],
    }
    if cc:
        email["cc"] = [{"address": a} for a in cc]
    if files:
        email["attachments"] = [{"file": {"name": n}} for n in files]
    if when is not None:
        email["origination_timestamp"] = when
    return {"@timestamp": when or "2026-03-01T00:00:00Z", "email": email,
            "popvault": {"body_text": body, "has_attachments": bool(files)}}


def make_item(key: str, account: str = "acct-a", uidl: str | None = None,
              **kw: Any) -> IndexItem:
    return IndexItem(message_key=key, account_id=account,
                     uidl=uidl if uidl is not None else f"uidl-{key}",
                     raw_sha256="ab" * 32, raw_size=1234,
                     document=make_doc(kw.pop("subject", key), **kw))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def make_sink(stack: Any, es_client: Any, es_prefix: str,
              ) -> Iterator[Callable[..., ElasticsearchSink]]:
    made: list[ElasticsearchSink] = []

    def make(*, now: dt.datetime = T0, url: str | None = None, install: bool = True,
             **cfg: Any) -> ElasticsearchSink:
        config = ElasticsearchConfig(url=url or stack.es_url, index_prefix=es_prefix,
                                     request_timeout_s=30.0, **cfg)
        sink = ElasticsearchSink(config, templates=template_source(), now=lambda: now,
                                 sleep=lambda s: None)
        made.append(sink)
        if install:
            sink.ensure_schema()
        return sink

    yield make
    for s in made:
        s.close()
    es_client.options(ignore_status=404).indices.delete_index_template(name=f"{es_prefix}-*")


@pytest.fixture
def sink(make_sink: Callable[..., ElasticsearchSink]) -> ElasticsearchSink:
    return make_sink()


def receipts_in_es(es_client: Any, prefix: str) -> dict[str, dict[str, Any]]:
    es_client.indices.refresh(index=f"{prefix}-receipts")
    resp = es_client.search(index=f"{prefix}-receipts", size=1000)
    return {h["_id"]: h["_source"] for h in resp["hits"]["hits"]}


# --- schema -----------------------------------------------------------------------------------


def test_ensure_schema_is_idempotent(sink: ElasticsearchSink, es_client: Any,
                                     es_prefix: str) -> None:
    sink.ensure_schema()
    sink.ensure_schema()
    n = IndexNames(es_prefix)
    assert es_client.indices.exists_index_template(name=n.messages_template)
    assert es_client.indices.exists_index_template(name=n.receipts_template)
    assert set(es_client.indices.get_alias(name=n.receipts_alias)) == {n.receipts_index}
    assert set(es_client.indices.get_alias(name=n.messages_alias)) == {n.undated_index}
    assert sink.count_documents() == 0
    assert sink.search("anything").total == 0


def test_write_before_schema_install_is_refused(make_sink: Callable[..., ElasticsearchSink],
                                                es_client: Any, es_prefix: str) -> None:
    s = make_sink(install=False)
    with pytest.raises(SinkError, match="schemas install") as err:
        s.write([make_item("k1")])
    assert not err.value.transient
    assert not es_client.indices.get(index=f"{es_prefix}-*")  # nothing auto-created


# --- write ------------------------------------------------------------------------------------


def test_batch_then_replay_changes_nothing(make_sink: Callable[..., ElasticsearchSink],
                                           es_client: Any, es_prefix: str) -> None:
    first = make_sink(now=T0)
    batch = [make_item("k1"), make_item("k2"), make_item("k3", when=None)]
    out = first.write(batch)
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 3
    assert [o.reason for o in out] == [DuplicateReason.NEW] * 3
    assert first.count_documents() == 3
    before = receipts_in_es(es_client, es_prefix)
    assert set(before) == {"acct-a:uidl-k1", "acct-a:uidl-k2", "acct-a:uidl-k3"}
    assert before["acct-a:uidl-k1"]["archived_at"] == "2026-03-01T12:00:00.000Z"
    # the date rule: monthly index from origination, undated otherwise
    assert es_client.get(index=f"{es_prefix}-messages-2026.01", id="k1")["found"]
    assert es_client.get(index=f"{es_prefix}-messages-undated", id="k3")["found"]

    replay = make_sink(now=T0 + dt.timedelta(days=2))
    out = replay.write(batch)
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 3
    assert [o.reason for o in out] == [DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT] * 3
    assert all(o.receipt is not None and o.receipt.reason is DuplicateReason.NEW for o in out)
    assert replay.count_documents() == 3
    assert receipts_in_es(es_client, es_prefix) == before  # original receipts kept
    doc = es_client.get(index=f"{es_prefix}-messages-2026.01", id="k1")["_source"]
    assert doc["popvault"]["accounts"] == ["acct-a"]


def test_same_key_other_account_joins_one_document(sink: ElasticsearchSink, es_client: Any,
                                                   es_prefix: str) -> None:
    assert sink.write([make_item("k1", "acct-a", "1")])[0].reason is DuplicateReason.NEW
    out = sink.write([make_item("k1", "acct-b", "77"), make_item("k2", "acct-b", "78")])
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 2
    assert [o.reason for o in out] == [DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT,
                                       DuplicateReason.NEW]
    assert sink.count_documents() == 2
    doc = es_client.get(index=f"{es_prefix}-messages-2026.01", id="k1")["_source"]
    assert doc["popvault"]["accounts"] == ["acct-a", "acct-b"]
    got = sink.get_receipts("acct-b", ["77", "78", "79"])
    assert set(got) == {"77", "78"}
    assert got["77"].message_key == "k1"
    assert got["77"].reason is DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT
    assert sink.get_receipts("acct-a", ["1"])["1"].reason is DuplicateReason.NEW
    # accounts_of: realtime mget with the index hint, and the refresh+ids fallback
    hint = {"k1": sink.index_for(make_doc("k1"))}
    assert sink.accounts_of(["k1"], index_of=hint) == {"k1": ["acct-a", "acct-b"]}
    assert sink.accounts_of(["k1", "k2", "nope"]) == {"k1": ["acct-a", "acct-b"],
                                                     "k2": ["acct-b"]}


def test_one_batch_with_copies_of_one_key(sink: ElasticsearchSink, es_client: Any,
                                          es_prefix: str) -> None:
    out = sink.write([make_item("k1", "acct-a", "1"), make_item("k1", "acct-a", "2"),
                      make_item("k1", "acct-b", "1")])
    assert [o.reason for o in out] == [DuplicateReason.NEW,
                                       DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT,
                                       DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT]
    assert sink.count_documents() == 1
    assert len(receipts_in_es(es_client, es_prefix)) == 3


def test_concurrent_joins_lose_no_account(make_sink: Callable[..., ElasticsearchSink],
                                          es_client: Any, es_prefix: str) -> None:
    """Racing read-modify-writes (if_seq_no) from 8 writers: every account ends up listed."""
    make_sink().write([make_item("k1", "acct-0", "1")])
    sinks = [make_sink(install=False) for _ in range(8)]
    barrier = threading.Barrier(len(sinks))
    results: list[Any] = []

    def run(i: int) -> None:
        barrier.wait()
        results.extend(sinks[i].write([make_item("k1", f"acct-{i + 1}", "1")]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.delivery for o in results] == [Delivery.DELIVERED] * 8
    doc = es_client.get(index=f"{es_prefix}-messages-2026.01", id="k1")["_source"]
    assert sorted(doc["popvault"]["accounts"]) == [f"acct-{i}" for i in range(9)]


def test_rejected_document_names_key_and_index(sink: ElasticsearchSink, es_client: Any,
                                               es_prefix: str) -> None:
    bad = make_item("bad-key")
    bad.document["@timestamp"] = "not a date"
    out = sink.write([make_item("ok1"), bad, make_item("ok2")])
    assert [o.delivery for o in out] == [Delivery.DELIVERED, Delivery.REJECTED,
                                         Delivery.DELIVERED]
    err = out[1].error or ""
    assert "bad-key" in err
    assert f"rejected by index {es_prefix}-messages-2026.01" in err
    assert "parsing_exception" in err
    assert out[1].receipt is None
    assert sink.count_documents() == 2
    assert set(receipts_in_es(es_client, es_prefix)) == {"acct-a:uidl-ok1", "acct-a:uidl-ok2"}


def test_unknown_field_under_strict_mapping_is_rejected(sink: ElasticsearchSink,
                                                        es_client: Any, es_prefix: str) -> None:
    mapping = es_client.indices.get_index_template(name=f"{es_prefix}-messages")
    dynamic = mapping["index_templates"][0]["index_template"]["template"]["mappings"].get(
        "dynamic")
    if dynamic != "strict":
        pytest.skip("the installed template is not strict at the root")
    bad = make_item("strict-key")
    bad.document["no_such_field"] = 1
    out = sink.write([bad, make_item("fine")])
    assert [o.delivery for o in out] == [Delivery.REJECTED, Delivery.DELIVERED]
    assert "strict" in (out[0].error or "")


def test_body_text_is_capped(make_sink: Callable[..., ElasticsearchSink], es_client: Any,
                             es_prefix: str) -> None:
    sink = make_sink(max_body_chars=100)
    item = make_item("long", body="word " * 1000)
    sink.write([item])
    src = es_client.get(index=f"{es_prefix}-messages-2026.01", id="long")["_source"]
    assert len(src["popvault"]["body_text"]) == 100
    assert src["popvault"]["body_truncated"] is True
    assert len(item.document["popvault"]["body_text"]) == 5000  # caller's dict untouched


def test_unicode_and_broken_surrogates_survive(sink: ElasticsearchSink, es_client: Any,
                                               es_prefix: str) -> None:
    out = sink.write([make_item("u1", body="Grüße – 日本語 \ud800 end")])
    assert out[0].delivery is Delivery.DELIVERED
    src = es_client.get(index=f"{es_prefix}-messages-2026.01", id="u1")["_source"]
    assert src["popvault"]["body_text"].startswith("Grüße – 日本語 ")


def test_mark_deleted(sink: ElasticsearchSink) -> None:
    sink.write([make_item("k1", uidl="1"), make_item("k2", uidl="2")])
    sink.mark_deleted("acct-a", ["1", "no-such-uidl"], "2026-03-02T00:00:00Z")
    got = sink.get_receipts("acct-a", ["1", "2"])
    assert got["1"].deleted_at == "2026-03-02T00:00:00Z"
    assert got["2"].deleted_at is None


def test_iterators(sink: ElasticsearchSink) -> None:
    sink.write([make_item(f"k{i}", "acct-a" if i % 2 else "acct-b") for i in range(7)])
    assert sorted(k for k, _ in sink.iter_documents()) == [f"k{i}" for i in range(7)]
    assert len(list(sink.iter_receipts())) == 7
    assert {r.uidl for r in sink.iter_receipts("acct-b")} == {"uidl-k0", "uidl-k2", "uidl-k4",
                                                              "uidl-k6"}


def test_get_receipts_many(sink: ElasticsearchSink) -> None:
    sink.write([make_item(f"k{i}", uidl=str(i)) for i in range(1500)])
    got = sink.get_receipts("acct-a", [str(i) for i in range(2500)])
    assert len(got) == 1500


# --- failures ---------------------------------------------------------------------------------


def test_unreachable_is_a_transient_sink_error(make_sink: Callable[..., ElasticsearchSink],
                                               ) -> None:
    sink = make_sink(url="http://127.0.0.1:1", install=False, max_retries=1)
    started = time.monotonic()
    for call in (lambda: sink.write([make_item("k1")]),
                 lambda: sink.get_receipts("acct-a", ["1"]),
                 sink.ensure_schema):
        with pytest.raises(SinkError) as err:
            call()
        assert type(err.value) is SinkError
        assert err.value.transient
        assert "Elasticsearch at http://127.0.0.1:1 is unreachable" in str(err.value)
    assert time.monotonic() - started < 30


def test_secrets_never_reach_messages(make_sink: Callable[..., ElasticsearchSink],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.config import SecretSource

    monkeypatch.setenv("PV_TEST_ES_PASSWORD", "s3cr3t-pa55")
    sink = make_sink(url="http://elastic:inurl-pa55@127.0.0.1:1", install=False, max_retries=0,
                     username="elastic", password=SecretSource(env="PV_TEST_ES_PASSWORD"))
    with pytest.raises(SinkError) as err:
        sink.write([make_item("k1")])
    text = str(err.value) + repr(err.value) + repr(sink)
    assert "s3cr3t-pa55" not in text and "inurl-pa55" not in text


def test_flood_stage_block_raises_index_full(sink: ElasticsearchSink, es_client: Any,
                                             es_prefix: str) -> None:
    sink.write([make_item("k1")])
    index = f"{es_prefix}-messages-2026.01"
    es_client.indices.put_settings(index=index,
                                   settings={"index.blocks.read_only_allow_delete": True})
    try:
        with pytest.raises(IndexFull) as err:
            sink.write([make_item("k2"), make_item("k3", when="2025-12-01T00:00:00Z")])
        assert "flood-stage" in str(err.value) and "free disk space" in str(err.value)
        assert index in str(err.value)
    finally:
        es_client.indices.put_settings(index=index,
                                       settings={"index.blocks.read_only_allow_delete": None})
    out = sink.write([make_item("k2"), make_item("k3", when="2025-12-01T00:00:00Z")])
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 2
    assert sink.count_documents() == 3


def test_flood_stage_on_receipts_raises_index_full(sink: ElasticsearchSink, es_client: Any,
                                                   es_prefix: str) -> None:
    index = IndexNames(es_prefix).receipts_index
    es_client.indices.put_settings(index=index,
                                   settings={"index.blocks.read_only_allow_delete": True})
    try:
        with pytest.raises(IndexFull):
            sink.write([make_item("k1")])
    finally:
        es_client.indices.put_settings(index=index,
                                       settings={"index.blocks.read_only_allow_delete": None})
    assert sink.write([make_item("k1")])[0].delivery is Delivery.DELIVERED


# --- search -----------------------------------------------------------------------------------


@pytest.fixture
def corpus(sink: ElasticsearchSink) -> ElasticsearchSink:
    sink.write([
        make_item("m1", "acct-a", subject="Invoice for March", sender="billing@shop.example",
                  to=("alice@example.com",), body="please pay the invoice",
                  when="2026-01-10T08:00:00Z", files=("Invoice-03.pdf",)),
        make_item("m2", "acct-b", subject="Lunch tomorrow", sender="carol@example.com",
                  to=("dan@shop.example",), body="see you at noon in the park",
                  when="2026-02-10T08:00:00Z"),
        make_item("m3", "acct-a", subject="Re: Lunch tomorrow", sender="Dan@Shop.Example",
                  to=("carol@example.com",), cc=("eve@other.example",), body="noon works",
                  when="2026-02-11T08:00:00Z"),
        make_item("m4", "acct-a", subject="Budget draft", sender="eve@other.example",
                  to=("team@example.com",), body="the quarterly budget is attached",
                  when="2025-12-20T08:00:00Z", files=("budget-q1.xlsx", "notes.txt")),
    ])
    sink.refresh()
    return sink


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("from:billing@shop.example", {"m1"}),
        ("from:shop.example", {"m1", "m3"}),
        ("from:@SHOP.example", {"m1", "m3"}),
        ("to:carol@example.com", {"m3"}),
        ("to:other.example", {"m3"}),  # via Cc
        ("to:example.com", {"m1", "m3", "m4"}),
        ("subject:lunch", {"m2", "m3"}),
        ('subject:"lunch tomorrow"', {"m2", "m3"}),
        ('subject:"tomorrow lunch"', set()),
        ("noon", {"m2", "m3"}),
        ('"at noon"', {"m2"}),
        ("invoice", {"m1"}),
        ("budget-q1", {"m4"}),  # attachment name
        ("has:attachment", {"m1", "m4"}),
        ("-has:attachment", {"m2", "m3"}),
        ("after:2026-02-10", {"m2", "m3"}),
        ("before:2026-02-10", {"m1", "m4"}),
        ("after:2026-01-01 before:2026-02-11", {"m1", "m2"}),
        ("account:acct-b", {"m2"}),
        ("filename:PDF", {"m1"}),
        ("lunch -from:shop.example", {"m2"}),
        ("", {"m1", "m2", "m3", "m4"}),
    ],
)
def test_search(corpus: ElasticsearchSink, query: str, expected: set[str]) -> None:
    result = corpus.search(query, limit=50)
    assert {h.message_key for h in result.hits} == expected
    assert result.total == len(expected)


def test_search_order_and_limit(corpus: ElasticsearchSink) -> None:
    newest_first = corpus.search("from:shop.example")  # filters only: all score 0
    assert [h.message_key for h in newest_first.hits] == ["m3", "m1"]
    limited = corpus.search("", limit=1)
    assert limited.total == 4 and len(limited.hits) == 1


def test_bulk_throughput(make_sink: Callable[..., ElasticsearchSink],
                         capsys: pytest.CaptureFixture[str]) -> None:
    """About 2,000 small documents with receipts; prints docs/s (report, not a gate)."""
    sink = make_sink()
    items = [make_item(f"t{i:05d}", uidl=str(i), body=f"message number {i} " * 20,
                       when=f"2026-{1 + i % 12:02d}-15T10:00:00Z") for i in range(2000)]
    started = time.perf_counter()
    for start in range(0, len(items), 500):
        out = sink.write(items[start:start + 500])
        assert all(o.delivery is Delivery.DELIVERED for o in out)
    elapsed = time.perf_counter() - started
    assert sink.count_documents() == 2000
    with capsys.disabled():
        print(f"\n[es sink] 2000 docs + receipts in {elapsed:.2f}s = {2000 / elapsed:.0f} docs/s")


# --- retry paths with a stand-in client (no server) -------------------------------------------


class FakeClient:
    """Answers bulk requests from a script: each entry maps a body to a reply or an exception."""

    def __init__(self, replies: list[Callable[[list[bytes]], Any]]) -> None:
        self.replies = replies
        self.calls: list[list[bytes]] = []

    def bulk(self, operations: list[bytes]) -> Any:
        self.calls.append(list(operations))
        reply = self.replies.pop(0)
        return reply(operations)

    def mget(self, **kw: Any) -> Any:
        return {"docs": []}

    def close(self) -> None:
        pass


def items_reply(*statuses: int, error: dict[str, Any] | None = None,
                ) -> Callable[[list[bytes]], Any]:
    def reply(ops: list[bytes]) -> Any:
        assert len(ops) == len(statuses)
        out = []
        for status in statuses:
            body: dict[str, Any] = {"status": status, "_index": "x", "_id": "y"}
            if status >= 300:
                body["error"] = error or {"type": "es_rejected_execution_exception",
                                          "reason": "queue full"}
            out.append({"create": body})
        return {"errors": any(s >= 300 for s in statuses), "items": out}
    return reply


def fake_sink(client: FakeClient, waits: list[float], retries: int = 3) -> ElasticsearchSink:
    sink = ElasticsearchSink(ElasticsearchConfig(url="http://fake:9200", index_prefix="pvf",
                                                 max_retries=retries),
                             client=client, sleep=waits.append, now=lambda: T0)
    sink._ready = True  # no schema checks against the stand-in
    return sink


def test_item_429_is_retried_with_backoff_then_delivered() -> None:
    waits: list[float] = []
    client = FakeClient([items_reply(201, 429), items_reply(429), items_reply(201),
                         items_reply(201, 201)])
    out = fake_sink(client, waits).write([make_item("k1"), make_item("k2")])
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 2
    assert waits == [backoff_s(0), backoff_s(1)]
    assert len(client.calls[1]) == 1  # only the rejected item was resent


def test_persistent_503_ends_errored() -> None:
    waits: list[float] = []
    err = {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}
    client = FakeClient([items_reply(503, error=err)] * 3)
    out = fake_sink(client, waits, retries=2).write([make_item("k1")])
    assert out[0].delivery is Delivery.ERRORED
    assert "after 2 retries" in (out[0].error or "")
    assert "unavailable_shards_exception" in (out[0].error or "")
    assert len(waits) == 2


def test_connection_lost_mid_batch_raises_transient() -> None:
    from elastic_transport import ConnectionError as TransportConnectionError

    def drop(ops: list[bytes]) -> Any:
        raise TransportConnectionError("connection reset by peer")

    waits: list[float] = []
    out_of_retries = FakeClient([drop, drop])
    with pytest.raises(SinkError) as err:
        fake_sink(out_of_retries, waits, retries=1).write([make_item("k1")])
    assert err.value.transient and "unreachable" in str(err.value)

    recovers = FakeClient([drop, items_reply(201), items_reply(201)])
    out = fake_sink(recovers, [], retries=1).write([make_item("k1")])
    assert out[0].delivery is Delivery.DELIVERED


def test_bulk_requests_respect_the_byte_limit() -> None:
    def all_ok(ops: list[bytes]) -> Any:
        return items_reply(*([201] * len(ops)))(ops)

    limit = 700  # bytes: two of these small documents fit, three do not
    client = FakeClient([all_ok] * 10)
    sink = ElasticsearchSink(ElasticsearchConfig(url="http://fake:9200", index_prefix="pvf",
                                                 bulk_max_bytes=limit),
                             client=client, sleep=lambda s: None, now=lambda: T0)
    sink._ready = True
    out = sink.write([make_item(f"k{i}") for i in range(5)])
    assert [o.delivery for o in out] == [Delivery.DELIVERED] * 5
    assert len(client.calls) >= 4  # documents and receipts each split
    assert all(sum(map(len, call)) <= limit for call in client.calls)


@pytest.mark.parametrize(
    ("status", "error", "verdict"),
    [
        (201, None, Verdict.OK),
        (409, {"type": "version_conflict_engine_exception"}, Verdict.CONFLICT),
        (429, {"type": "es_rejected_execution_exception"}, Verdict.RETRY),
        (503, {"type": "unavailable_shards_exception"}, Verdict.RETRY),
        (400, {"type": "document_parsing_exception"}, Verdict.REJECT),
        (404, {"type": "document_missing_exception"}, Verdict.MISSING),
        (429, {"type": "cluster_block_exception", "reason": "index [x] blocked by: "
               "[TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has "
               "read-only-allow-delete block];"}, Verdict.FULL),
        (403, {"type": "cluster_block_exception", "reason": "index [x] blocked by: "
               "[FORBIDDEN/12/index read-only / allow delete (api)];"}, Verdict.FULL),
        (403, {"type": "cluster_block_exception",
               "reason": "blocked by: [FORBIDDEN/8/index write (api)];"}, Verdict.BLOCKED),
        (503, {"type": "cluster_block_exception",
               "reason": "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered];"},
         Verdict.RETRY),
    ],
)
def test_classify(status: int, error: dict[str, Any] | None, verdict: Verdict) -> None:
    assert classify(status, error) is verdict


def test_ensure_schema_changes_nothing_when_already_installed(sink: ElasticsearchSink,
                                                              es_client: Any) -> None:
    """A second install finds its mark and both aliases: no cluster-state update at all
    (every worker process and every poll calls it)."""
    sink.ensure_schema()
    # Let the new indices' shards start (those are cluster-state updates of their own).
    es_client.cluster.health(wait_for_no_initializing_shards=True, wait_for_events="languid")
    before = es_client.cluster.state(metric="version")["version"]
    sink.ensure_schema()
    assert es_client.cluster.state(metric="version")["version"] == before
    # An alias removed behind its back is noticed, and the full install puts it back.
    n = sink.names
    es_client.indices.delete_alias(index="*", name=n.messages_alias)
    sink.ensure_schema()
    assert es_client.indices.exists_alias(name=n.messages_alias)
