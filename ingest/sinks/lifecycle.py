"""Sink-side operations for retention: scan documents, match queries, expire, delete by ``_id``.

Why a separate module and not more methods on the sinks: polling never deletes, and keeping the
destructive operations out of :class:`ingest.sinks.base.Sink` means no poll code path can reach
them. Each sink gets a small adapter (:func:`lifecycle_for`) with the same five operations:

* :meth:`Lifecycle.iter_docs` -- every document, reduced to what retention rules look at
  (:class:`DocInfo`), never the body;
* :meth:`Lifecycle.match_keys` -- the message keys matching popvault search syntax, with the
  *sink's own* semantics (the same hits as ``popvault search``, without its result cap);
* :meth:`Lifecycle.expire_receipts` -- set ``status = expired`` on receipts (never delete them:
  a receipt is what keeps its UIDL from being downloaded again);
* :meth:`Lifecycle.delete_documents` -- delete documents by ``_id`` (idempotent);
* :meth:`Lifecycle.refresh`.

Elasticsearch: point in time + ``search_after`` scans, bulk ``delete`` by ``_index``/``_id`` and
bulk partial ``update`` of receipts. No delete-by-query and no scripts: the minimal distribution
has no painless, and an explicit id list is what the audit trail records. The adapter reuses
the sink's request wrapper (``_call``: retries, error mapping) and bulk plumbing (``_bulk``)
on purpose, as a friend module in the same package, so retries behave exactly as for writes.

Embedded: one SQLite transaction per batch over the sink's own connection (documents and all
their search rows go together), queries through the same SQL the sink's search uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ingest.docpath import field_values
from ingest.errors import SinkError
from ingest.outcome import ReceiptStatus
from ingest.searchquery import (
    FIELD_ACCOUNTS,
    FIELD_FROM,
    FIELD_TIMESTAMP,
    FIELDS_TO,
    parse_query,
    to_es_query,
)
from ingest.sinks.base import Receipt, receipt_id

FIELD_RAW_SHA256 = "popvault.raw_sha256"
SCAN_PAGE_SIZE = 1_000
"""Hits per page of a retention scan (sources are a few fields, so pages can be large)."""
SCAN_KEEP_ALIVE = "5m"
"""Point-in-time keep-alive between two pages; retention work happens between scans."""
SQL_CHUNK_VARS = 500
"""Bound variables per ``IN (...)`` statement."""
DOC_SOURCE_FIELDS = [FIELD_TIMESTAMP, FIELD_RAW_SHA256, FIELD_ACCOUNTS, FIELD_FROM, *FIELDS_TO]


@dataclass(frozen=True)
class DocInfo:
    """What retention needs of a document. ``index`` is where it lives (Elasticsearch only)."""

    message_key: str
    timestamp: str | None
    raw_sha256: str | None
    accounts: tuple[str, ...] = ()
    from_addresses: tuple[str, ...] = ()
    to_addresses: tuple[str, ...] = ()  # To, Cc and Bcc, lower-cased
    index: str | None = field(default=None, compare=False)


class Lifecycle(Protocol):
    """The retention operations of one sink (see the module docstring)."""

    def iter_docs(self) -> Iterator[DocInfo]: ...

    def match_keys(self, query: str) -> set[str]: ...

    def iter_receipts(self) -> Iterator[Receipt]: ...

    def expire_receipts(self, receipts: Sequence[Receipt], note: str) -> None: ...

    def delete_documents(self, docs: Sequence[DocInfo]) -> int: ...

    def refresh(self) -> None: ...


def doc_info(message_key: str, doc: Mapping[str, Any], index: str | None = None) -> DocInfo:
    """A :class:`DocInfo` from a document source (full or filtered to DOC_SOURCE_FIELDS)."""
    stamp = doc.get(FIELD_TIMESTAMP)
    raw = field_values(doc, FIELD_RAW_SHA256)
    return DocInfo(
        message_key=message_key,
        timestamp=stamp if isinstance(stamp, str) else None,
        raw_sha256=str(raw[0]) if raw else None,
        accounts=tuple(str(v) for v in field_values(doc, FIELD_ACCOUNTS)),
        from_addresses=tuple(str(v).lower() for v in field_values(doc, FIELD_FROM)),
        to_addresses=tuple(str(v).lower() for f in FIELDS_TO for v in field_values(doc, f)),
        index=index,
    )


def expired_receipt(receipt: Receipt, note: str) -> Receipt:
    return replace(receipt, status=ReceiptStatus.EXPIRED, note=note)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


class MemoryLifecycle:
    """Over :class:`ingest.sinks.memory.MemorySink` (its dicts are public)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def iter_docs(self) -> Iterator[DocInfo]:
        for key, doc in list(self.sink.documents.items()):
            yield doc_info(key, doc)

    def match_keys(self, query: str) -> set[str]:
        from ingest.sinks.memory import _holds

        parsed = parse_query(query)
        return {key for key, doc in self.sink.documents.items()
                if all(_holds(c, doc) for c in parsed.clauses)}

    def iter_receipts(self) -> Iterator[Receipt]:
        yield from self.sink.iter_receipts()

    def expire_receipts(self, receipts: Sequence[Receipt], note: str) -> None:
        self.sink._check(writing=True)
        for receipt in receipts:
            if receipt.id in self.sink.receipts:
                self.sink.receipts[receipt.id] = expired_receipt(
                    self.sink.receipts[receipt.id], note)

    def delete_documents(self, docs: Sequence[DocInfo]) -> int:
        self.sink._check(writing=True)
        deleted = 0
        for info in docs:
            if self.sink.documents.pop(info.message_key, None) is not None:
                deleted += 1
            self.sink.indices.pop(info.message_key, None)
        return deleted

    def refresh(self) -> None:
        self.sink.refresh()


# ---------------------------------------------------------------------------------------------
# embedded (SQLite)
# ---------------------------------------------------------------------------------------------


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class EmbeddedLifecycle:
    """Over :class:`ingest.sinks.embedded.EmbeddedSink`, through its connection and lock."""

    DOCUMENT_TABLES = ("document_accounts", "document_addresses", "document_files", "fts")
    """Rows keyed by message_key that go with a document (deleted in the same transaction)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def iter_docs(self) -> Iterator[DocInfo]:
        with self.sink._sql("scanning documents for retention") as conn:
            rows = conn.execute(
                "SELECT message_key, json_extract(json, '$.\"@timestamp\"'), "
                "json_extract(json, '$.popvault.raw_sha256') FROM documents "
                "ORDER BY message_key").fetchall()
        for chunk in _chunks(rows, SQL_CHUNK_VARS):
            keys = [row[0] for row in chunk]
            marks = ",".join("?" * len(keys))
            accounts: dict[str, list[str]] = {}
            senders: dict[str, list[str]] = {}
            recipients: dict[str, list[str]] = {}
            with self.sink._sql("reading document addresses") as conn:
                for key, account in conn.execute(
                        "SELECT message_key, account_id FROM document_accounts WHERE "
                        f"message_key IN ({marks}) ORDER BY rowid", keys):
                    accounts.setdefault(key, []).append(account)
                for key, role, address in conn.execute(
                        "SELECT message_key, role, address FROM document_addresses WHERE "
                        f"message_key IN ({marks})", keys):
                    target = senders if role == "from" else recipients
                    target.setdefault(key, []).append(address)
            for key, stamp, raw in chunk:
                yield DocInfo(message_key=key,
                              timestamp=stamp if isinstance(stamp, str) else None,
                              raw_sha256=raw if isinstance(raw, str) else None,
                              accounts=tuple(accounts.get(key, ())),
                              from_addresses=tuple(senders.get(key, ())),
                              to_addresses=tuple(recipients.get(key, ())))

    def match_keys(self, query: str) -> set[str]:
        from ingest.sinks.embedded import _clause_sql

        where: list[str] = []
        args: list[Any] = []
        for clause in parse_query(query).clauses:
            sql, clause_args = _clause_sql(clause)
            where.append(f"NOT ({sql})" if clause.negated else f"({sql})")
            args.extend(clause_args)
        condition = " AND ".join(where) or "1"
        with self.sink._sql("matching a retention or hold query") as conn:
            return {row[0] for row in conn.execute(
                f"SELECT d.message_key FROM documents d WHERE {condition}", args)}

    def iter_receipts(self) -> Iterator[Receipt]:
        yield from self.sink.iter_receipts()

    def expire_receipts(self, receipts: Sequence[Receipt], note: str) -> None:
        if not receipts:
            return
        with self.sink._transaction(f"expiring {len(receipts)} receipt(s)") as conn:
            conn.executemany(
                "UPDATE receipts SET status = ?, note = ? WHERE account_id = ? AND uidl = ?",
                [(str(ReceiptStatus.EXPIRED), note, r.account_id, r.uidl) for r in receipts])

    def delete_documents(self, docs: Sequence[DocInfo]) -> int:
        """Delete documents and their search rows, all in one transaction."""
        keys = list(dict.fromkeys(d.message_key for d in docs))
        if not keys:
            return 0
        deleted = 0
        with self.sink._transaction(f"deleting {len(keys)} document(s)") as conn:
            for chunk in _chunks(keys, SQL_CHUNK_VARS):
                marks = ",".join("?" * len(chunk))
                for table in self.DOCUMENT_TABLES:
                    conn.execute(f"DELETE FROM {table} WHERE message_key IN ({marks})", chunk)
                deleted += conn.execute(
                    f"DELETE FROM documents WHERE message_key IN ({marks})", chunk).rowcount
        return deleted

    def refresh(self) -> None:
        self.sink.refresh()


# ---------------------------------------------------------------------------------------------
# Elasticsearch
# ---------------------------------------------------------------------------------------------


class ElasticsearchLifecycle:
    """Over :class:`ingest.sinks.elasticsearch.ElasticsearchSink` (see the module docstring)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def _scan(self, index: str, query: dict[str, Any],
              source: list[str] | bool) -> Iterator[dict[str, Any]]:
        """All hits of ``query``, with retention's larger pages and longer keep-alive."""
        return self.sink.scan(index, query, source=source, page_size=SCAN_PAGE_SIZE,
                              keep_alive=SCAN_KEEP_ALIVE)

    def iter_docs(self) -> Iterator[DocInfo]:
        for hit in self._scan(self.sink.names.messages_alias, {"match_all": {}},
                              DOC_SOURCE_FIELDS):
            yield doc_info(hit["_id"], hit.get("_source") or {}, hit["_index"])

    def match_keys(self, query: str) -> set[str]:
        es_query = to_es_query(parse_query(query))
        return {hit["_id"] for hit in self._scan(self.sink.names.messages_alias, es_query,
                                                 False)}

    def iter_receipts(self) -> Iterator[Receipt]:
        yield from self.sink.iter_receipts()

    def _bulk_checked(self, ops: list[Any], what: str, index: str) -> int:
        """Send ``ops``; count OK; missing targets are fine (already done); else SinkError."""
        from ingest.sinks.retry import Verdict

        done = 0
        problems: list[str] = []
        for op, result in zip(ops, self.sink._bulk(ops), strict=True):
            if result.verdict is Verdict.OK:
                done += 1
            elif result.verdict is Verdict.FULL:
                raise self.sink._full(index, result.error)
            elif result.verdict is not Verdict.MISSING:
                problems.append(f"{op.id}: {self.sink._scrub(result.reason())}")
        if problems:
            raise SinkError(f"{what}: {len(problems)} failed in {index}: "
                            + "; ".join(problems[:5]), transient=True)
        return done

    def expire_receipts(self, receipts: Sequence[Receipt], note: str) -> None:
        from ingest.sinks.elasticsearch import _make_op

        alias = self.sink.names.receipts_alias
        ops = [_make_op("update", alias, receipt_id(r.account_id, r.uidl),
                        {"doc": {"status": str(ReceiptStatus.EXPIRED), "note": note}},
                        require_alias=True) for r in receipts]
        if ops:
            self._bulk_checked(ops, "expiring receipts", alias)

    def delete_documents(self, docs: Sequence[DocInfo]) -> int:
        """Bulk ``delete`` by ``_index`` + ``_id``; a document already gone counts as done."""
        from ingest.sinks.elasticsearch import _dumps, _Op

        ops: list[_Op] = []
        for info in docs:
            if info.index is None:
                raise SinkError(f"document {info.message_key}: its index is unknown; "
                                "it must come from iter_docs", transient=False)
            header = {"delete": {"_index": info.index, "_id": info.message_key}}
            ops.append(_Op("delete", info.index, info.message_key, _dumps(header)))
        if not ops:
            return 0
        return self._bulk_checked(ops, "deleting documents", self.sink.names.messages_alias)

    def refresh(self) -> None:
        self.sink.refresh()


def lifecycle_for(sink: Any) -> Lifecycle:
    """The retention adapter for ``sink`` (memory, embedded or Elasticsearch)."""
    from ingest.sinks.elasticsearch import ElasticsearchSink
    from ingest.sinks.embedded import EmbeddedSink
    from ingest.sinks.memory import MemorySink

    if isinstance(sink, ElasticsearchSink):
        return ElasticsearchLifecycle(sink)
    if isinstance(sink, EmbeddedSink):
        return EmbeddedLifecycle(sink)
    if isinstance(sink, MemorySink):
        return MemoryLifecycle(sink)
    raise TypeError(f"no retention support for sink {type(sink).__name__}")


def receipts_by_key(receipts: Iterable[Receipt]) -> dict[str, list[Receipt]]:
    """Receipts grouped by the message key they point to."""
    out: dict[str, list[Receipt]] = {}
    for receipt in receipts:
        out.setdefault(receipt.message_key, []).append(receipt)
    return out
