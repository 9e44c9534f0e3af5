"""Conversation threading over every sink (memory, embedded, real Elasticsearch).

A support-inbox corpus of threads arrives out of order over two accounts, children before
parents, in several batches through the real :class:`~ingest.pipeline.Ingester` (archive,
parser pool, resolver, sink). Every message must end in exactly its thread's conversation, and
"thread sizes" aggregated by conversation id must match. A second test times resolution of
200-message batches (the pipeline's batch size) and prints the overhead.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.archive import FilesystemStore
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from ingest.outcome import Delivery
from ingest.parse import ParserPool
from ingest.pipeline import Ingester
from ingest.sinks.base import IndexItem, Sink
from ingest.sinks.elasticsearch import ElasticsearchSink
from ingest.sinks.embedded import EmbeddedSink
from ingest.sinks.memory import MemorySink
from ingest.sinks.threadindex import thread_index_for
from ingest.threads import DEFAULT_THREAD_RULES, resolve_conversations
from tests.integration.test_sink_contract import SINK_KINDS, open_sink

START = dt.datetime(2026, 1, 10, 9, 0, tzinfo=dt.UTC)
DOMAIN = "Support.Example.TEST"  # upper-case domain: normalized ids lower-case it
FIRST_ARCHIVED = "2026-03-01T00:00:00Z"


@dataclass(frozen=True)
class Mail:
    name: str
    thread: str  # expected thread name (see EXPECTED)
    raw: bytes


def msgid(name: str) -> str:
    return f"<{name}.Id@{DOMAIN}>"


def normalized(name: str) -> str:
    return f"<{name}.Id@{DOMAIN.lower()}>"


def mail(name: str, thread: str, subject: str, *, hours: float, refs: Sequence[str] = (),
         irt: Sequence[str] = (), with_id: bool = True) -> Mail:
    lines = [f"From: customer-{thread}@example.test", "To: support@example.test",
             f"Subject: {subject}",
             f"Date: {format_datetime(START + dt.timedelta(hours=hours))}"]
    if with_id:
        lines.append(f"Message-ID: {msgid(name)}")
    if irt:
        lines.append("In-Reply-To: " + " ".join(msgid(r) for r in irt))
    if refs:
        lines.append("References: " + "\r\n ".join(msgid(r) for r in refs))
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    body = f"Message {name} of thread {thread}.\r\n"
    return Mail(name, thread, ("\r\n".join(lines) + "\r\n\r\n" + body).encode())


def support_corpus() -> dict[str, Mail]:
    """Four threads plus the messages that must not join them (19 documents)."""
    day = 24.0
    mails = [
        # A: a References chain from a modern client.
        mail("a1", "A", "Quarterly numbers", hours=0),
        mail("a2", "A", "Re: Quarterly numbers", hours=2, refs=["a1"], irt=["a1"]),
        mail("a3", "A", "Re: Quarterly numbers", hours=3, refs=["a1", "a2"], irt=["a2"]),
        mail("a4", "A", "AW: Re: Quarterly numbers", hours=5, refs=["a1", "a2", "a3"],
             irt=["a3"]),
        mail("a5", "A", "Re: AW: Re: Quarterly numbers", hours=8,
             refs=["a1", "a2", "a3", "a4"], irt=["a4"]),
        # B: an old client that only writes In-Reply-To.
        mail("b1", "B", "Server room temperature", hours=1),
        mail("b2", "B", "RE: Server room temperature", hours=4, irt=["b1"]),
        mail("b3", "B", "RE: RE: Server room temperature", hours=6, irt=["b2"]),
        mail("b4", "B", "RE: RE: RE: Server room temperature", hours=9, irt=["b3"]),
        # C: a helpdesk ticket; replies lack References (one has In-Reply-To only).
        mail("c1", "C", "[#4711] Printer on fire", hours=2),
        mail("c2", "C", "Re: [#4711] Printer on fire", hours=3),
        mail("c3", "C", "AW: [#4711] Printer on fire", hours=7, irt=["c2"]),
        mail("c4", "C", "Re: [#4711] Printer on fire (update)", hours=30),
        # D: no threading headers at all, only the subject.
        mail("d1", "D", "Invoice 2026-0042 overdue", hours=1 * day),
        mail("d2", "D", "Re: Invoice 2026-0042 overdue", hours=3 * day),
        mail("d3", "D", "AW: RE:  invoice 2026-0042 OVERDUE", hours=5 * day),
        # Same subject, 60 days later: outside the window, a conversation of its own.
        mail("d_late", "D_late", "Re: Invoice 2026-0042 overdue", hours=65 * day),
        # Same subject, in the window, but delivered to the other account only.
        mail("d_sales", "D_sales", "Invoice 2026-0042 overdue", hours=2 * day),
        # No Message-ID and a generic subject: its own message key.
        mail("e1", "E", "Re:", hours=12, with_id=False),
    ]
    return {m.name: m for m in mails}


ARRIVAL: list[tuple[str, list[str]]] = [
    ("support", ["a5", "b4", "c4", "d2"]),
    ("sales", ["a3", "b3", "c3"]),
    ("support", ["a2", "d1", "c2"]),
    ("sales", ["a4", "d_sales", "a2"]),  # a2 again: the same message in a second account
    ("support", ["a1", "b1", "e1"]),
    ("support", ["b2", "d3", "d_late", "c1"]),
]
"""(account, messages) per batch: children before parents, threads split over accounts."""


def expected_conversations(mails: dict[str, Mail]) -> dict[str, str]:
    """Thread name -> conversation id, by the rules (written out, not computed by them)."""
    return {
        "A": normalized("a1"),  # References root
        # In-Reply-To chain arriving b4, b3, b1, b2: b3 waits for b2 (b4 follows it); b1 has
        # no threading headers, so it joins its replies by subject, whose conversation is
        # then "<b2>"; b2 finally finds its parent b1 there. One conversation, named <b2>.
        "B": normalized("b2"),
        "C": "ticket:4711",
        "D": normalized("d2"),  # subject thread: the first of it to arrive
        "D_late": normalized("d_late"),
        "D_sales": normalized("d_sales"),
        "E": "key:" + message_key(mails["e1"].raw),
    }


@pytest.fixture(params=SINK_KINDS)
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    opened = open_sink(request.param, request, tmp_path)
    opened.ensure_schema()
    yield opened
    opened.close()


def conversations(sink: Sink) -> dict[str, dict[str, Any]]:
    """message_key -> the stored ``popvault.thread`` object."""
    sink.refresh()
    docs = sink.iter_documents()  # type: ignore[attr-defined]
    return {key: doc["popvault"]["thread"] for key, doc in docs}


def thread_sizes(sink: Sink) -> dict[str, int]:
    """Documents per conversation id, aggregated by each store itself."""
    sink.refresh()
    if isinstance(sink, ElasticsearchSink):
        resp = sink.client.search(
            index=sink.names.messages_alias, size=0,
            aggs={"threads": {"terms": {"field": "popvault.thread.conversation_id",
                                        "size": 1000}}})
        return {b["key"]: b["doc_count"] for b in resp["aggregations"]["threads"]["buckets"]}
    if isinstance(sink, EmbeddedSink):
        with sink._sql("aggregating threads") as conn:
            rows = conn.execute(
                "SELECT json_extract(json, '$.popvault.thread.conversation_id'), count(*) "
                "FROM documents GROUP BY 1").fetchall()
        return dict(rows)
    assert isinstance(sink, MemorySink)
    return dict(collections.Counter(
        d["popvault"]["thread"]["conversation_id"] for d in sink.documents.values()))


def test_threads_converge_out_of_order_over_two_accounts(sink: Sink, tmp_path: Path) -> None:
    mails = support_corpus()
    expected = expected_conversations(mails)
    store = FilesystemStore(tmp_path / "archive")
    with ParserPool(workers=2, timeout_s=30) as parser:
        for number, (account, names) in enumerate(ARRIVAL):
            ingester = Ingester(account_id=account, sink=sink, store=store, parser=parser,
                                max_message_bytes=10 * 1024 * 1024, max_body_chars=100_000,
                                now=lambda: FIRST_ARCHIVED)
            for name in names:
                staged = ingester.stage([mails[name].raw], ref=name, uidl=f"{number}-{name}")
                assert staged is not None
                assert ingester.add(staged) == []  # far below a full batch
            written = ingester.finish()
            assert [o.delivery for _s, o in written] == [Delivery.DELIVERED] * len(names)

    stored = conversations(sink)
    got = {name: stored[message_key(m.raw)]["conversation_id"] for name, m in mails.items()}
    assert got == {name: expected[m.thread] for name, m in mails.items()}
    assert stored[message_key(mails["c2"].raw)]["ticket"] == "4711"
    assert "ticket" not in stored[message_key(mails["a1"].raw)]
    assert stored[message_key(mails["d3"].raw)]["subject_normalized"] == (
        "invoice 2026-0042 overdue")
    assert stored[message_key(mails["e1"].raw)]["subject_normalized"] == ""

    sizes = collections.Counter(m.thread for m in mails.values())
    assert thread_sizes(sink) == {expected[t]: n for t, n in sizes.items()}
    assert sink.count_documents() == len(mails)


def test_one_poll_threads_across_its_batches_without_refreshing(sink: Sink,
                                                                tmp_path: Path) -> None:
    """One Ingester (one poll) writing several batches: later batches must see the earlier
    ones. Elasticsearch's periodic refresh is switched off after the first batch, so only
    what the poll remembers (and the refresh a re-point makes) can find them."""
    day = 24.0
    mails = {m.name: m for m in [
        mail("p1", "P", "Toner low on floor 3", hours=0),
        mail("p2", "P", "Re: Toner low on floor 3", hours=1, irt=["p1"]),
        mail("s2", "P", "AW: toner LOW on floor 3", hours=2),  # subject only
        mail("q3", "P", "Re: Re: Toner low on floor 3", hours=4, irt=["q2"]),  # before q2
        mail("q2", "P", "Re: Toner low on floor 3", hours=3, irt=["p2"]),
        mail("q4", "P", "Re: Re: Re: Toner low on floor 3", hours=5, irt=["q3"]),
        mail("x1", "X", "Toner low on floor 3", hours=40 * day),  # outside the window
    ]}
    batches = [["p1"], ["s2"], ["p2"], ["q3"], ["q2"], ["q4", "x1"]]
    store = FilesystemStore(tmp_path / "archive")
    with ParserPool(workers=1, timeout_s=30) as parser:
        ingester = Ingester(account_id="support", sink=sink, store=store, parser=parser,
                            max_message_bytes=10 * 1024 * 1024, max_body_chars=100_000,
                            now=lambda: FIRST_ARCHIVED)
        for number, names in enumerate(batches):
            for name in names:
                staged = ingester.stage([mails[name].raw], ref=name, uidl=name)
                assert staged is not None
                assert ingester.add(staged) == []
            written = ingester.finish()
            assert [o.delivery for _s, o in written] == [Delivery.DELIVERED] * len(names)
            if number == 0 and isinstance(sink, ElasticsearchSink):
                sink.client.indices.put_settings(index=sink.names.messages_alias,
                                                 settings={"index": {"refresh_interval": "-1"}})

    stored = conversations(sink)
    got = {name: stored[message_key(m.raw)]["conversation_id"] for name, m in mails.items()}
    assert got == {**{name: normalized("p1") for name in mails if name != "x1"},
                   "x1": normalized("x1")}


# -- overhead -------------------------------------------------------------------------------


def timing_corpus(threads: int) -> tuple[list[bytes], list[bytes], dict[str, str]]:
    """``threads`` threads of 4: (replies, first messages, message name -> thread root).

    A quarter of the threads each: References, In-Reply-To only, ticket tag, subject only. The
    replies come before their first messages (every In-Reply-To reply provisional), and each
    In-Reply-To thread's first message answers an older mail that is not archived, so its
    arrival re-points its three replies: the worst case.
    """
    replies: list[bytes] = []
    roots: list[bytes] = []
    thread_of: dict[str, str] = {}
    for t in range(threads):
        kind = t % 4
        base = f"Topic {t} about {'report' if kind else 'budget'} number {t * 7}"
        subject = f"[#{90000 + t}] {base}" if kind == 2 else base
        names = [f"t{t}m{i}" for i in range(4)]
        for i, name in enumerate(names):
            refs = names[:i] if kind == 0 and i else []
            irt = ([names[i - 1]] if i else [f"older{t}"]) if kind == 1 else []
            m = mail(name, f"T{t}", ("Re: " * i) + subject, hours=t + i, refs=refs, irt=irt)
            (roots if i == 0 else replies).append(m.raw)
            thread_of[name] = f"T{t}"
    return replies, roots, thread_of


def items_for(raws: Sequence[bytes], account: str, tag: str) -> list[IndexItem]:
    items = []
    for i, raw in enumerate(raws):
        key, sha = message_key(raw), raw_sha256(raw)
        doc = build_document(raw, raw_sha256=sha, message_key=key,
                             first_archived=FIRST_ARCHIVED)
        items.append(IndexItem(key, account, f"{tag}-{i}", sha, len(raw), doc))
    return items


def test_resolution_overhead_per_200_message_batch(sink: Sink) -> None:
    replies, roots, _ = timing_corpus(200)  # 600 replies, 200 first messages
    batches = [items_for(replies[i:i + 200], "support", f"r{i}")
               for i in range(0, len(replies), 200)]
    batches.append(items_for(roots, "support", "roots"))
    report: list[str] = []
    for number, items in enumerate(batches):
        docs = [json.loads(json.dumps(item.document)) for item in items]
        started = time.perf_counter()
        result = resolve_conversations(docs, account_id="support", rules=DEFAULT_THREAD_RULES,
                                       index=thread_index_for(sink))
        resolve_ms = (time.perf_counter() - started) * 1000
        for item, doc in zip(items, docs, strict=True):
            item.document = doc
        started = time.perf_counter()
        outcomes = sink.write(items)
        write_ms = (time.perf_counter() - started) * 1000
        assert {o.delivery for o in outcomes} == {Delivery.DELIVERED}
        report.append(f"batch {number} ({len(items)} msgs, {'roots' if number == 3 else 'replies'}"
                      f"): resolve {resolve_ms:.0f} ms (lookups {result.looked_up}, subject "
                      f"queries {result.subject_queries}, re-pointed {result.repointed}); "
                      f"write {write_ms:.0f} ms")
    print(f"\n[threads overhead, {sink.name}] " + "\n  ".join(report))
    sizes = thread_sizes(sink)
    assert len(sizes) == 200 and set(sizes.values()) == {4}
    assert result.repointed == 150  # the last batch: 50 In-Reply-To threads x 3 replies
