"""The index side of conversation threading (:mod:`ingest.threads`), one adapter per sink type.

Written as functions over each sink, like :mod:`ingest.sinks.lifecycle`, so the sinks keep
their one job (the write contract) and threading can change without touching them.

* **Elasticsearch**: ``terms`` lookups, and for subjects one aggregation (which subjects
  exist at all) then an ``msearch`` for those, on the read alias after one refresh per poll
  (search is near-real-time; a parent written a second ago must not be missed). The poll's
  own earlier batches are remembered in process instead of refreshing again. Re-pointing is
  a ``terms`` search on ``conversation_id`` paged by ``message_key``, then bulk partial
  ``update`` by ``_index`` and ``_id``: no scripts and no update-by-query, which need
  painless (absent from the minimal distribution).
* **embedded**: SQL over the documents' JSON, with expression indexes on the three thread
  fields (created on first use, ``IF NOT EXISTS``; SQLite maintains them on every write) so a
  lookup is an index probe, not a scan of every document; re-pointing is one ``UPDATE ...
  json_set`` inside a write transaction.
* **memory**: the dicts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ingest.docpath import field_value
from ingest.errors import SinkError
from ingest.threads import SubjectMatch, SubjectQuery, ThreadIndex, parse_timestamp

FIELD_MESSAGE_ID = "popvault.message_id_normalized"
FIELD_CONVERSATION = "popvault.thread.conversation_id"
FIELD_SUBJECT = "popvault.thread.subject_normalized"
FIELD_ACCOUNTS = "popvault.accounts"
FIELD_MESSAGE_KEY = "popvault.message_key"
FIELD_TIMESTAMP = "@timestamp"
TERMS_CHUNK = 1_000
"""Ids per ``terms`` query or SQL ``IN``: far below both engines' limits."""
LOOKUP_HITS_PER_ID = 4
"""Documents fetched per looked-up Message-ID (a forged id can be shared by several
documents; any one of them answers)."""
MSEARCH_CHUNK = 200
"""Subject searches per ``msearch`` request (one batch's worth)."""
OVERLAY_LIMIT = 20_000
"""Documents an Elasticsearch thread index remembers between refreshes; past this it forgets
them and refreshes before its next lookup instead (bounds a long drain's memory)."""
REPOINT_PAGE = 1_000
"""Documents per page while collecting children to re-point."""
UPDATE_RETRY_ON_CONFLICT = 3
"""A re-point may race an account join on the same document; both are partial updates of
different fields, so retrying on the fresh version is always right."""


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


class MemoryThreadIndex:
    """Over :class:`ingest.sinks.memory.MemorySink` (its dicts are public); honours its
    ``unavailable``/``full`` injection like its own calls do."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def conversations_of(self, message_ids: Sequence[str]) -> dict[str, str]:
        self.sink._check()
        wanted = set(message_ids)
        found: dict[str, str] = {}
        for doc in self.sink.documents.values():
            mid, conv = field_value(doc, FIELD_MESSAGE_ID), field_value(doc, FIELD_CONVERSATION)
            if mid in wanted and isinstance(conv, str):
                found.setdefault(mid, conv)
        return found

    def newest_by_subject(self, queries: Sequence[SubjectQuery]) -> list[SubjectMatch | None]:
        self.sink._check()
        subjects = {q.subject for q in queries}
        by_subject: dict[str, list[tuple[dt.datetime, str, list[str]]]] = {}
        for doc in self.sink.documents.values():
            subject, conv = field_value(doc, FIELD_SUBJECT), field_value(doc, FIELD_CONVERSATION)
            when = parse_timestamp(doc.get(FIELD_TIMESTAMP))
            if subject in subjects and isinstance(conv, str) and when is not None:
                accounts = list(field_value(doc, FIELD_ACCOUNTS) or [])
                by_subject.setdefault(subject, []).append((when, conv, accounts))
        out: list[SubjectMatch | None] = []
        for q in queries:
            best: SubjectMatch | None = None
            for when, conv, accounts in by_subject.get(q.subject, []):
                if (q.account_id in accounts and q.start <= when <= q.end
                        and (best is None or when > best.timestamp)):
                    best = SubjectMatch(conv, when)
            out.append(best)
        return out

    def repoint(self, moves: Mapping[str, str]) -> int:
        self.sink._check(writing=True)
        changed = 0
        for doc in self.sink.documents.values():
            conv = field_value(doc, FIELD_CONVERSATION)
            if isinstance(conv, str) and conv in moves and moves[conv] != conv:
                doc["popvault"]["thread"]["conversation_id"] = moves[conv]
                changed += 1
        return changed

    def written(self, docs: Sequence[Mapping[str, Any]], account_id: str) -> None:
        """Nothing to do: this sink's reads see its writes at once."""


# ---------------------------------------------------------------------------------------------
# embedded (SQLite)
# ---------------------------------------------------------------------------------------------

_SQL_MESSAGE_ID = "json_extract(json, '$.popvault.message_id_normalized')"
_SQL_CONVERSATION = "json_extract(json, '$.popvault.thread.conversation_id')"
_SQL_SUBJECT = "json_extract(json, '$.popvault.thread.subject_normalized')"
_SQL_INDEXES = {
    "documents_thread_message_id": _SQL_MESSAGE_ID,
    "documents_thread_conversation": _SQL_CONVERSATION,
    "documents_thread_subject": _SQL_SUBJECT,
}
"""Expression indexes; queries below spell the expressions exactly so SQLite uses them."""


def _epoch_ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


class EmbeddedThreadIndex:
    """Over :class:`ingest.sinks.embedded.EmbeddedSink`, through its connection and lock."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._indexed = False

    def _ensure_indexes(self) -> None:
        """Create the expression indexes once per file (building them on a big existing store
        takes one scan; after that SQLite keeps them current on every insert and update)."""
        if self._indexed:
            return
        names = list(_SQL_INDEXES)
        with self.sink._sql("checking thread indexes") as conn:
            have = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name IN "
                f"({','.join('?' * len(names))})", names)}
        if have != set(names):
            with self.sink._transaction("creating thread indexes") as conn:
                for name, expr in _SQL_INDEXES.items():
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON documents({expr})")
        self._indexed = True

    def conversations_of(self, message_ids: Sequence[str]) -> dict[str, str]:
        self._ensure_indexes()
        found: dict[str, str] = {}
        with self.sink._sql("looking up thread parents") as conn:
            for chunk in _chunks(list(dict.fromkeys(message_ids)), TERMS_CHUNK):
                rows = conn.execute(
                    f"SELECT {_SQL_MESSAGE_ID}, {_SQL_CONVERSATION} FROM documents "
                    f"WHERE {_SQL_MESSAGE_ID} IN ({','.join('?' * len(chunk))})", chunk)
                for mid, conv in rows:
                    if isinstance(conv, str):
                        found.setdefault(mid, conv)
        return found

    def newest_by_subject(self, queries: Sequence[SubjectQuery]) -> list[SubjectMatch | None]:
        self._ensure_indexes()
        out: list[SubjectMatch | None] = []
        with self.sink._sql("looking up threads by subject") as conn:
            for q in queries:
                row = conn.execute(
                    f"SELECT {_SQL_CONVERSATION}, timestamp_ms FROM documents "
                    f"WHERE {_SQL_SUBJECT} = ? AND timestamp_ms BETWEEN ? AND ? "
                    f"AND {_SQL_CONVERSATION} IS NOT NULL "
                    "AND EXISTS (SELECT 1 FROM document_accounts a WHERE "
                    "a.message_key = documents.message_key AND a.account_id = ?) "
                    "ORDER BY timestamp_ms DESC LIMIT 1",
                    (q.subject, _epoch_ms(q.start), _epoch_ms(q.end), q.account_id)).fetchone()
                out.append(None if row is None else SubjectMatch(
                    row[0], dt.datetime.fromtimestamp(row[1] / 1000, tz=dt.UTC)))
        return out

    def repoint(self, moves: Mapping[str, str]) -> int:
        self._ensure_indexes()
        pairs = [(new, old) for old, new in moves.items() if new != old]
        if not pairs:
            return 0
        with self.sink._transaction(f"re-pointing {len(pairs)} conversation(s)") as conn:
            cursor = conn.executemany(
                "UPDATE documents SET json = json_set(json, "
                f"'$.popvault.thread.conversation_id', ?) WHERE {_SQL_CONVERSATION} = ?", pairs)
            return int(cursor.rowcount)

    def written(self, docs: Sequence[Mapping[str, Any]], account_id: str) -> None:
        """Nothing to do: this sink's reads see its writes at once."""


# ---------------------------------------------------------------------------------------------
# Elasticsearch
# ---------------------------------------------------------------------------------------------


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ElasticsearchThreadIndex:
    """Over :class:`ingest.sinks.elasticsearch.ElasticsearchSink`; one per poll (Ingester).

    Search is near-real-time, so the first lookup refreshes the read alias (a parent written
    by another poll a moment ago must be found). Later batches of the same poll do not refresh
    again, which cost a segment per batch: what the poll itself wrote since is remembered here
    (:meth:`written`) and answers alongside the index, whose own periodic refresh covers other
    writers within a second. A re-point must see every recent document, so it refreshes.
    """

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._fresh = False
        self._by_id: dict[str, str] = {}
        self._by_subject: dict[str, list[tuple[dt.datetime, str, str]]] = {}
        self._remembered = 0

    def _prepare(self, *, complete: bool = False) -> None:
        """Refresh the read alias before the first search, and before one that must also see
        the documents only remembered here (``complete``)."""
        if self._fresh and not (complete and self._remembered):
            return
        sink = self.sink
        alias = sink.names.messages_alias
        sink._require_schema()  # the "run popvault schemas install" error, not a 404
        sink._call("refreshing " + alias, lambda: sink.client.indices.refresh(index=alias))
        self._forget()
        self._fresh = True

    def _forget(self) -> None:
        self._by_id.clear()
        self._by_subject.clear()
        self._remembered = 0

    def written(self, docs: Sequence[Mapping[str, Any]], account_id: str) -> None:
        if not self._fresh:
            return  # the next lookup refreshes first and finds them in the index
        if self._remembered + len(docs) > OVERLAY_LIMIT:
            self._forget()
            self._fresh = False
            return
        for doc in docs:
            conv = field_value(doc, FIELD_CONVERSATION)
            if not isinstance(conv, str):
                continue
            self._remembered += 1
            mid = field_value(doc, FIELD_MESSAGE_ID)
            if isinstance(mid, str):
                self._by_id.setdefault(mid, conv)
            subject = field_value(doc, FIELD_SUBJECT)
            when = parse_timestamp(doc.get(FIELD_TIMESTAMP))
            if isinstance(subject, str) and when is not None:
                self._by_subject.setdefault(subject, []).append((when, conv, account_id))

    def _search(self, what: str, **kwargs: Any) -> dict[str, Any]:
        sink = self.sink
        alias = sink.names.messages_alias
        result: dict[str, Any] = sink._call(
            what, lambda: sink.client.search(index=alias, track_total_hits=False, **kwargs))
        return result

    def conversations_of(self, message_ids: Sequence[str]) -> dict[str, str]:
        self._prepare()
        wanted = list(dict.fromkeys(message_ids))
        found = {mid: self._by_id[mid] for mid in wanted if mid in self._by_id}
        for chunk in _chunks([m for m in wanted if m not in found], TERMS_CHUNK):
            resp = self._search(
                "looking up thread parents", query={"terms": {FIELD_MESSAGE_ID: chunk}},
                size=len(chunk) * LOOKUP_HITS_PER_ID,
                source=[FIELD_MESSAGE_ID, FIELD_CONVERSATION])
            for hit in resp["hits"]["hits"]:
                source = hit.get("_source") or {}
                mid = field_value(source, FIELD_MESSAGE_ID)
                conv = field_value(source, FIELD_CONVERSATION)
                if isinstance(mid, str) and isinstance(conv, str):
                    found.setdefault(mid, conv)
        return found

    def newest_by_subject(self, queries: Sequence[SubjectQuery]) -> list[SubjectMatch | None]:
        if not queries:
            return []
        self._prepare()
        present = self._subjects_present(queries)
        asked = [i for i, q in enumerate(queries) if (q.account_id, q.subject) in present]
        out: list[SubjectMatch | None] = [None] * len(queries)
        for i, match in zip(asked, self._newest_in_index([queries[i] for i in asked]),
                            strict=True):
            out[i] = match
        for i, q in enumerate(queries):  # written by this poll since the refresh
            for when, conv, account in self._by_subject.get(q.subject, ()):
                best = out[i]
                if (account == q.account_id and q.start <= when <= q.end
                        and (best is None or when > best.timestamp)):
                    out[i] = SubjectMatch(conv, when)
        return out

    def _subjects_present(self, queries: Sequence[SubjectQuery]) -> set[tuple[str, str]]:
        """(account, subject) pairs with any threaded document in the queries' time span: one
        aggregation instead of a search per message, most of which would find nothing."""
        by_account: dict[str, list[SubjectQuery]] = {}
        for q in queries:
            by_account.setdefault(q.account_id, []).append(q)
        present: set[tuple[str, str]] = set()
        for account, group in by_account.items():
            start, end = min(q.start for q in group), max(q.end for q in group)
            subjects = list(dict.fromkeys(q.subject for q in group))
            for chunk in _chunks(subjects, TERMS_CHUNK):
                resp = self._search(
                    "looking up thread subjects", size=0,
                    query={"bool": {"filter": [
                        {"terms": {FIELD_SUBJECT: chunk}},
                        {"term": {FIELD_ACCOUNTS: account}},
                        {"range": {FIELD_TIMESTAMP: {"gte": _iso(start), "lte": _iso(end)}}},
                        {"exists": {"field": FIELD_CONVERSATION}},
                    ]}},
                    aggs={"subjects": {"terms": {"field": FIELD_SUBJECT, "size": len(chunk)}}})
                for bucket in ((resp.get("aggregations") or {}).get("subjects") or {}).get(
                        "buckets", []):
                    present.add((account, bucket["key"]))
        return present

    def _newest_in_index(self, queries: Sequence[SubjectQuery]) -> list[SubjectMatch | None]:
        sink = self.sink
        alias = sink.names.messages_alias
        out: list[SubjectMatch | None] = []
        for start in range(0, len(queries), MSEARCH_CHUNK):
            chunk = queries[start:start + MSEARCH_CHUNK]
            searches: list[dict[str, Any]] = []
            for q in chunk:
                searches.append({"index": alias})
                searches.append({
                    "query": {"bool": {"filter": [
                        {"term": {FIELD_SUBJECT: q.subject}},
                        {"term": {FIELD_ACCOUNTS: q.account_id}},
                        {"range": {FIELD_TIMESTAMP: {"gte": _iso(q.start), "lte": _iso(q.end)}}},
                        {"exists": {"field": FIELD_CONVERSATION}},
                    ]}},
                    "size": 1, "track_total_hits": False,
                    "sort": [{FIELD_TIMESTAMP: {"order": "desc"}}],
                    "_source": [FIELD_CONVERSATION, FIELD_TIMESTAMP],
                })
            resp = sink._call("looking up threads by subject",
                              lambda searches=searches: sink.client.msearch(searches=searches))
            for reply in resp.get("responses", []):
                if "error" in reply:
                    raise SinkError(
                        f"looking up threads by subject in {alias} failed: "
                        f"{sink._scrub(str(reply['error']))[:300]}", transient=True)
                hits = reply["hits"]["hits"]
                source = (hits[0].get("_source") or {}) if hits else {}
                conv = field_value(source, FIELD_CONVERSATION)
                when = parse_timestamp(source.get(FIELD_TIMESTAMP))
                out.append(SubjectMatch(conv, when) if isinstance(conv, str) and when else None)
        if len(out) != len(queries):
            raise SinkError(f"Elasticsearch at {sink.url} answered {len(queries)} subject "
                            f"searches with {len(out)} results", transient=True)
        return out

    def repoint(self, moves: Mapping[str, str]) -> int:
        from ingest.sinks.elasticsearch import _make_op
        from ingest.sinks.lifecycle import ElasticsearchLifecycle

        olds = [old for old, new in moves.items() if new != old]
        if not olds:
            return 0
        self._prepare(complete=True)
        ops = []
        for chunk in _chunks(olds, TERMS_CHUNK):
            after: list[Any] | None = None
            while True:
                extra = {"search_after": after} if after is not None else {}
                resp = self._search(
                    "finding documents to re-point", query={"terms": {FIELD_CONVERSATION: chunk}},
                    size=REPOINT_PAGE, source=[FIELD_CONVERSATION],
                    sort=[{FIELD_MESSAGE_KEY: "asc"}], **extra)
                hits = resp["hits"]["hits"]
                for hit in hits:
                    new = moves.get(field_value(hit.get("_source") or {}, FIELD_CONVERSATION))
                    if new is not None:
                        ops.append(_make_op(
                            "update", hit["_index"], hit["_id"],
                            {"doc": {"popvault": {"thread": {"conversation_id": new}}}},
                            retry_on_conflict=UPDATE_RETRY_ON_CONFLICT))
                if len(hits) < REPOINT_PAGE:
                    break
                after = hits[-1]["sort"]
        if not ops:
            return 0
        self._fresh = False  # the updates must be visible to the next batch's lookups
        # Same verdicts as retention's bulk updates: a document deleted meanwhile is fine.
        return ElasticsearchLifecycle(self.sink)._bulk_checked(
            ops, "re-pointing conversations", self.sink.names.messages_alias)


def thread_index_for(sink: Any) -> ThreadIndex:
    """The threading adapter for ``sink`` (memory, embedded or Elasticsearch)."""
    from ingest.sinks.elasticsearch import ElasticsearchSink
    from ingest.sinks.embedded import EmbeddedSink
    from ingest.sinks.memory import MemorySink

    if isinstance(sink, ElasticsearchSink):
        return ElasticsearchThreadIndex(sink)
    if isinstance(sink, EmbeddedSink):
        return EmbeddedThreadIndex(sink)
    if isinstance(sink, MemorySink):
        return MemoryThreadIndex(sink)
    raise TypeError(f"no threading support for sink {type(sink).__name__}")
