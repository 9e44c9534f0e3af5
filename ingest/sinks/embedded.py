"""Embedded sink: documents, receipts and full text in one SQLite file under the archive.

The default when no ``[elasticsearch]`` section is configured. Why SQLite: one ``write`` batch is
**one transaction** holding the documents, their accounts, the full-text rows and the receipts,
so a receipt can never exist without its document (Elasticsearch needs three idempotent phases
for the same guarantee). WAL plus ``synchronous=FULL`` make a committed batch survive a power
cut, which matters because DELE follows the acknowledgement.

Layout (schema version in ``PRAGMA user_version``)::

    documents(message_key PK, timestamp_ms, has_attachments, json)   json without accounts
    document_accounts(message_key, account_id)    popvault.accounts, in insertion order (rowid)
    document_addresses(message_key, role, address, domain)   from/to/cc/bcc, lower-cased
    document_files(message_key, name)             attachment names, lower-cased
    receipts(account_id, uidl, ...Receipt fields, PK(account_id, uidl))
    fts(message_key UNINDEXED, subject, body_text, attachment_text)   FTS5, unicode61 without
                                                  diacritic folding (attachment_text: version 2)

Why addresses and attachment names are plain tables, not FTS columns: Elasticsearch treats them
as keywords (exact address, ``*@domain``, ``*substring*`` of a name); a tokenizer would turn
``alice@example.com`` into words and match ``bob@alice.example.com`` too.

Search follows :func:`ingest.searchquery.to_es_query` term by term (see :meth:`search`):
words must all occur in one field (``best_fields`` with ``operator: and``), phrases are FTS5
phrases, free text also matches attachment-name substrings. Known differences from
Elasticsearch's ``standard`` analyzer: FTS5 splits on every non-alphanumeric character
(``don't`` is two words, ``3.14`` two numbers) where ES keeps such tokens whole; a query word
is split the same way, so it matches a superset in those cases. Ranking is FTS5 ``bm25``, not
Lucene's, so hit order among equally relevant documents can differ; hit sets do not.

Thread safety: one connection guarded by a lock (``check_same_thread=False``), enough for
``popvault poll --parallel 4`` whose threads spend their time on the network and the parser;
other processes on the same file wait on ``busy_timeout`` (writers take ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ingest.docpath import field_values
from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason, ReceiptStatus
from ingest.searchquery import (
    FIELD_ATTACHMENT_TEXT,
    FIELD_BODY,
    FIELD_FILENAME,
    FIELD_FROM,
    FIELD_HAS_ATTACHMENTS,
    FIELD_SUBJECT,
    FIELD_TIMESTAMP,
    FIELDS_TO,
    Account,
    Address,
    AddressRole,
    Clause,
    DateBound,
    DateTerm,
    Filename,
    HasAttachment,
    Text,
    TextScope,
    parse_query,
)
from ingest.sinks.base import (
    IndexItem,
    ItemOutcome,
    Receipt,
    SearchHit,
    SearchResult,
    uidl_reused,
)
from ingest.sinks.elasticsearch import (
    MAX_SEARCH_LIMIT,
    cap_body_text,
    join_reason,
    utc_now_iso,
    with_accounts,
)

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version``; a file with a higher number was written by a newer
popvault and is refused rather than misread. 2: ``fts`` gained ``attachment_text``."""
DEFAULT_MAX_BODY_CHARS = 1_000_000
"""Same default as ElasticsearchConfig.max_body_chars, so both sinks index the same text."""
BUSY_TIMEOUT_S = 30.0
"""How long a writer waits for another process's transaction on the same file."""
SQL_CHUNK_VARS = 500
"""Bound variables per ``IN (...)`` lookup; far below SQLite's limit, keeps statements small."""
MESSAGE_MAX_CHARS = 300
"""Length bound for sqlite error text placed in our messages."""

_ROLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("from", FIELD_FROM),
    *((f.split(".")[1], f) for f in FIELDS_TO),  # "to", "cc", "bcc"
)
_TO_ROLES = tuple(role for role, _f in _ROLE_FIELDS if role != "from")
_TOKEN_RE = re.compile(r"[^\W_]+")
"""What FTS5's unicode61 tokenizer keeps as a token: runs of letters and digits."""
_TRANSIENT_ERRORS = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_PROTOCOL"})
_FULL_ERRORS = frozenset({"SQLITE_FULL"})

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS documents (
        message_key TEXT PRIMARY KEY,
        timestamp_ms INTEGER,
        has_attachments INTEGER NOT NULL DEFAULT 0,
        json TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS documents_timestamp ON documents(timestamp_ms)",
    """CREATE TABLE IF NOT EXISTS document_accounts (
        message_key TEXT NOT NULL,
        account_id TEXT NOT NULL,
        UNIQUE (message_key, account_id))""",
    "CREATE INDEX IF NOT EXISTS document_accounts_account ON document_accounts(account_id)",
    """CREATE TABLE IF NOT EXISTS document_addresses (
        message_key TEXT NOT NULL,
        role TEXT NOT NULL,
        address TEXT NOT NULL,
        domain TEXT)""",
    "CREATE INDEX IF NOT EXISTS document_addresses_key ON document_addresses(message_key)",
    "CREATE INDEX IF NOT EXISTS document_addresses_address ON document_addresses(address)",
    "CREATE INDEX IF NOT EXISTS document_addresses_domain ON document_addresses(domain)",
    """CREATE TABLE IF NOT EXISTS document_files (
        message_key TEXT NOT NULL,
        name TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS document_files_key ON document_files(message_key)",
    """CREATE TABLE IF NOT EXISTS receipts (
        account_id TEXT NOT NULL,
        uidl TEXT NOT NULL,
        message_key TEXT NOT NULL,
        raw_sha256 TEXT NOT NULL,
        raw_size INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        archived_at TEXT NOT NULL,
        deleted_at TEXT,
        note TEXT,
        PRIMARY KEY (account_id, uidl)) WITHOUT ROWID""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
        message_key UNINDEXED, subject, body_text, attachment_text,
        tokenize = 'unicode61 remove_diacritics 0')""",
)
_MIGRATE_FROM_1 = (
    # FTS5 tables cannot ADD COLUMN: rename, create the new one (in _SCHEMA), copy, drop.
    # Version-1 documents had no attachment text, so the new column starts empty.
    "ALTER TABLE fts RENAME TO fts_v1",
)
_MIGRATE_FROM_1_COPY = (
    "INSERT INTO fts(message_key, subject, body_text, attachment_text) "
    "SELECT message_key, subject, body_text, '' FROM fts_v1",
    "DROP TABLE fts_v1",
)


def _clean(text: str) -> str:
    """Text SQLite can store: lone surrogates (from broken mail) become ``?``, as in the ES
    sink's encoder, never a crash. The raw message in the archive keeps the original bytes."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _epoch_ms(value: Any) -> int | None:
    """``@timestamp`` as epoch milliseconds (naive = UTC), or None if absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _fts_string(tokens: Sequence[str]) -> str:
    """An FTS5 string literal: the tokens as one phrase (tokens hold no quotes)."""
    return '"' + " ".join(tokens) + '"'


def fts_expression(term: Text) -> str | None:
    """The FTS5 MATCH expression for a word or phrase term, or None if it has no tokens.

    Mirrors ``to_es_query``: a word is ``match``/``multi_match best_fields`` with
    ``operator: and`` -- every token in the same field; a phrase is ``match_phrase``. A term
    without tokens (``"!!"``) matches nothing, like a match query that analyses to nothing.
    """
    tokens = _TOKEN_RE.findall(term.value)
    if not tokens:
        return None
    if term.phrase:
        body = _fts_string(tokens)
    else:
        body = "(" + " AND ".join(_fts_string([t]) for t in tokens) + ")"
    columns = (["subject"] if term.scope is TextScope.SUBJECT
               else ["subject", "body_text", "attachment_text"])
    return " OR ".join(f"({c} : {body})" for c in columns)


class EmbeddedSink:
    """The :class:`ingest.sinks.base.Sink` over one SQLite file (see the module docstring).

    Args:
        path: the database file (``<archive>/index.sqlite3``); its directory must exist.
        max_body_chars: body text indexed per document, as ``ElasticsearchConfig``.
        now: the clock for ``archived_at``.
    """

    name = "embedded"

    def __init__(
        self,
        path: Path,
        *,
        max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.path = Path(path)
        self.max_body_chars = max_body_chars
        self._now = now
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._ready = False

    def __repr__(self) -> str:
        return f"EmbeddedSink(path={str(self.path)!r})"

    # -- connection and errors ------------------------------------------------------------------

    def _error(self, what: str, exc: sqlite3.Error) -> SinkError:
        """Our error for a sqlite one: names the file, says whether a retry may help."""
        code = getattr(exc, "sqlite_errorname", "") or ""
        text = " ".join(str(exc).split())[:MESSAGE_MAX_CHARS]
        if code in _FULL_ERRORS or "disk is full" in text:
            return IndexFull(
                f"{what} failed: disk full, the index {self.path} cannot grow ({text}); "
                "free disk space, then poll again (the batch was rolled back, nothing is lost)")
        transient = code in _TRANSIENT_ERRORS or "locked" in text.lower()
        hint = (" (another process holds a write lock; retrying next poll)" if transient
                else "")
        return SinkError(f"{what} failed on the index {self.path}: {text}{hint}",
                         transient=transient)

    @contextlib.contextmanager
    def _sql(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with sqlite errors turned into ours."""
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise self._error(what, exc) from exc

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: wait for the write lock up front, so a
        batch never fails half-way on a lock upgrade); rolled back on any error."""
        with self._sql(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        if not self._ready:
            self._install(self._conn)
        return self._conn

    def _install(self, conn: sqlite3.Connection) -> None:
        """Create the schema if missing (idempotent); refuse a newer schema version."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SinkError(
                f"the index {self.path} has schema version {version}, newer than this "
                f"popvault understands ({SCHEMA_VERSION}): upgrade popvault", transient=False)
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrating = version == 1
                for statement in _MIGRATE_FROM_1 if migrating else ():
                    conn.execute(statement)
                for statement in _SCHEMA:
                    conn.execute(statement)
                for statement in _MIGRATE_FROM_1_COPY if migrating else ():
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        self._ready = True

    def ensure_schema(self) -> None:
        """Create the file's tables if missing; idempotent (every other call does it too, so
        the embedded index needs no separate install step)."""
        with self._sql("creating the schema"):
            pass

    def journal_mode(self) -> str:
        """The file's journal mode (``wal``), for ``popvault check`` and tests."""
        with self._sql("reading the journal mode") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    # -- write ----------------------------------------------------------------------------------

    def write(self, items: Sequence[IndexItem]) -> list[ItemOutcome]:
        """Create or join documents, then receipts, item by item in batch order, all in one
        transaction: either the whole batch is durable or nothing is (and SinkError says why).

        Raises IndexFull when the disk is full, SinkError (transient) when another process
        held the write lock past ``BUSY_TIMEOUT_S``.
        """
        if not items:
            return []
        now = utc_now_iso(self._now())
        outcomes: list[ItemOutcome] = []
        with self._transaction(f"writing {len(items)} message(s)") as conn:
            for item in items:
                outcomes.append(self._write_item(conn, item, now))
        return outcomes

    def _write_item(self, conn: sqlite3.Connection, item: IndexItem, now: str) -> ItemOutcome:
        accounts = self._accounts(conn, [item.message_key]).get(item.message_key)
        if accounts is None:
            reason = DuplicateReason.NEW
            try:
                self._insert_document(conn, item)
            except (TypeError, ValueError) as exc:
                return ItemOutcome(
                    item.message_key, item.account_id, item.uidl, Delivery.REJECTED, reason,
                    error=f"document {item.message_key} cannot be encoded as JSON: {exc}")
        else:
            reason = join_reason(accounts, item.account_id)
        conn.execute("INSERT OR IGNORE INTO document_accounts(message_key, account_id) "
                     "VALUES (?, ?)", (item.message_key, item.account_id))
        if item.uidl is None:
            return ItemOutcome(item.message_key, item.account_id, None, Delivery.DELIVERED,
                               reason)
        stored = self._receipts(conn, item.account_id, [item.uidl]).get(item.uidl)
        if stored is None:
            stored = Receipt(
                account_id=item.account_id, uidl=item.uidl, message_key=item.message_key,
                raw_sha256=item.raw_sha256, raw_size=item.raw_size, status=item.status,
                reason=reason, archived_at=now)
            data = stored.to_dict()
            conn.execute(
                "INSERT INTO receipts(account_id, uidl, message_key, raw_sha256, raw_size, "
                "status, reason, archived_at, deleted_at, note) VALUES "
                "(:account_id, :uidl, :message_key, :raw_sha256, :raw_size, :status, :reason, "
                ":archived_at, :deleted_at, :note)", data)
        elif stored.message_key != item.message_key:
            return uidl_reused(item, stored, reason)
        return ItemOutcome(item.message_key, item.account_id, item.uidl, Delivery.DELIVERED,
                           reason, receipt=stored)

    def _insert_document(self, conn: sqlite3.Connection, item: IndexItem) -> None:
        """The document row plus its search rows; ``popvault.accounts`` lives in its table."""
        doc = cap_body_text(item.document, self.max_body_chars)
        popvault = doc.get("popvault")
        if isinstance(popvault, Mapping) and "accounts" in popvault:
            doc["popvault"] = {k: v for k, v in popvault.items() if k != "accounts"}
        text = _clean(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
        has_attachments = any(v is True for v in field_values(doc, FIELD_HAS_ATTACHMENTS))
        timestamp = field_values(doc, FIELD_TIMESTAMP)
        key = item.message_key
        conn.execute("INSERT INTO documents(message_key, timestamp_ms, has_attachments, json) "
                     "VALUES (?, ?, ?, ?)",
                     (key, _epoch_ms(timestamp[0] if timestamp else None),
                      int(has_attachments), text))
        addresses = []
        for role, dotted in _ROLE_FIELDS:
            for value in field_values(doc, dotted):
                address = _clean(str(value)).lower()
                domain = address.rsplit("@", 1)[1] if "@" in address else None
                addresses.append((key, role, address, domain))
        conn.executemany("INSERT INTO document_addresses(message_key, role, address, domain) "
                         "VALUES (?, ?, ?, ?)", addresses)
        conn.executemany("INSERT INTO document_files(message_key, name) VALUES (?, ?)",
                         [(key, _clean(str(v)).lower()) for v in field_values(doc, FIELD_FILENAME)])
        conn.execute("INSERT INTO fts(message_key, subject, body_text, attachment_text) "
                     "VALUES (?, ?, ?, ?)",
                     (key, _clean(" \n".join(str(v) for v in field_values(doc, FIELD_SUBJECT))),
                      _clean(" \n".join(str(v) for v in field_values(doc, FIELD_BODY))),
                      _clean(" \n".join(str(v) for v in field_values(doc, FIELD_ATTACHMENT_TEXT)))))

    # -- reads ----------------------------------------------------------------------------------

    @staticmethod
    def _accounts(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for start in range(0, len(keys), SQL_CHUNK_VARS):
            chunk = keys[start:start + SQL_CHUNK_VARS]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                "SELECT d.message_key, a.account_id FROM documents d "
                "LEFT JOIN document_accounts a ON a.message_key = d.message_key "
                f"WHERE d.message_key IN ({marks}) ORDER BY a.rowid", chunk)
            for key, account in rows:
                accounts = found.setdefault(key, [])
                if account is not None:
                    accounts.append(account)
        return found

    @staticmethod
    def _receipts(conn: sqlite3.Connection, account_id: str,
                  uidls: Sequence[str]) -> dict[str, Receipt]:
        found: dict[str, Receipt] = {}
        for start in range(0, len(uidls), SQL_CHUNK_VARS):
            chunk = list(uidls[start:start + SQL_CHUNK_VARS])
            marks = ",".join("?" * len(chunk))
            cursor = conn.execute(
                "SELECT * FROM receipts WHERE account_id = ? "
                f"AND uidl IN ({marks})", [account_id, *chunk])
            for receipt in _rows_to_receipts(cursor):
                found[receipt.uidl] = receipt
        return found

    def get_receipts(self, account_id: str, uidls: Iterable[str]) -> dict[str, Receipt]:
        """Receipts of these UIDLs, keyed by UIDL (committed data is always current)."""
        wanted = list(dict.fromkeys(uidls))
        if not wanted:
            return {}
        with self._sql("reading receipts") as conn:
            return self._receipts(conn, account_id, wanted)

    def accounts_of(self, message_keys: Iterable[str], *,
                    index_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        """Accounts each already-indexed key was seen in (``index_of`` is not needed here)."""
        keys = list(dict.fromkeys(message_keys))
        if not keys:
            return {}
        with self._sql("reading documents") as conn:
            return self._accounts(conn, keys)

    def mark_deleted(self, account_id: str, uidls: Sequence[str], when: str) -> None:
        """Set ``deleted_at`` on these receipts; missing receipts are ignored."""
        if not uidls:
            return
        with self._transaction("recording deletions") as conn:
            conn.executemany("UPDATE receipts SET deleted_at = ? WHERE account_id = ? "
                             "AND uidl = ?", [(when, account_id, u) for u in dict.fromkeys(uidls)])

    def count_documents(self) -> int:
        with self._sql("counting documents") as conn:
            return int(conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def count_receipts(self, account_id: str | None = None, *, live_only: bool = False) -> int:
        """Receipts stored (for one account, or all; ``live_only``: copies not yet deleted
        from the server)."""
        sql = "SELECT count(*) FROM receipts WHERE 1"
        args: list[Any] = []
        if account_id:
            sql += " AND account_id = ?"
            args.append(account_id)
        if live_only:
            sql += " AND deleted_at IS NULL"
        with self._sql("counting receipts") as conn:
            return int(conn.execute(sql, args).fetchone()[0])

    def refresh(self) -> None:
        """Nothing to do: a committed transaction is searchable at once."""

    # -- search ---------------------------------------------------------------------------------

    def search(self, query: str, *, limit: int = 20) -> SearchResult:
        """Run popvault's search syntax; best FTS5 ``bm25`` match first, then newest.

        Raises QuerySyntaxError (a ValueError) for bad syntax, before touching the file.
        Filter-only queries score 0, as in Elasticsearch, so they come newest first.
        """
        parsed = parse_query(query)
        size = max(0, min(limit, MAX_SEARCH_LIMIT))
        where: list[str] = []
        args: list[Any] = []
        ranking: list[str] = []
        for clause in parsed.clauses:
            sql, clause_args = _clause_sql(clause)
            where.append(f"NOT ({sql})" if clause.negated else f"({sql})")
            args.extend(clause_args)
            if isinstance(clause.term, Text) and not clause.negated:
                expr = fts_expression(clause.term)
                if expr is not None:
                    ranking.append(f"({expr})")
        condition = " AND ".join(where) or "1"
        if ranking:
            rank_join = ("LEFT JOIN (SELECT message_key, bm25(fts) AS score FROM fts "
                         "WHERE fts MATCH ?) r ON r.message_key = d.message_key")
            rank_args: list[Any] = [" OR ".join(ranking)]
            score = "COALESCE(r.score, 0.0)"
        else:
            rank_join, rank_args, score = "", [], "0.0"
        with self._sql("searching") as conn:
            total = int(conn.execute(f"SELECT count(*) FROM documents d WHERE {condition}",
                                     args).fetchone()[0])
            rows = conn.execute(
                f"SELECT d.message_key, d.json, {score} AS score FROM documents d {rank_join} "
                f"WHERE {condition} ORDER BY score ASC, d.timestamp_ms DESC, d.message_key "
                "LIMIT ?", [*rank_args, *args, size]).fetchall()
            accounts = self._accounts(conn, [row[0] for row in rows])
        hits = [SearchHit(message_key=key, score=-float(rank) if rank else 0.0,
                          document=with_accounts(json.loads(text), accounts.get(key, [])))
                for key, text, rank in rows]
        return SearchResult(total=total, hits=hits)

    # -- full scans (reconcile, migrate, verify) ------------------------------------------------

    def iter_documents(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every document as (message_key, document with ``popvault.accounts``)."""
        with self._sql("scanning documents") as conn:
            rows = conn.execute("SELECT message_key, json FROM documents").fetchall()
            keys = [key for key, _ in rows]
            accounts = self._accounts(conn, keys)
        for key, text in rows:
            yield key, with_accounts(json.loads(text), accounts.get(key, []))

    def iter_receipts(self, account_id: str | None = None) -> Iterator[Receipt]:
        """Every receipt (of one account, or all)."""
        with self._sql("scanning receipts") as conn:
            if account_id:
                cursor = conn.execute("SELECT * FROM receipts WHERE account_id = ?",
                                      (account_id,))
            else:
                cursor = conn.execute("SELECT * FROM receipts")
            receipts = list(_rows_to_receipts(cursor))
        yield from receipts

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._ready = False


def _rows_to_receipts(cursor: sqlite3.Cursor) -> Iterator[Receipt]:
    names = [c[0] for c in cursor.description]
    for row in cursor:
        data = dict(zip(names, row, strict=True))
        yield Receipt(
            account_id=data["account_id"], uidl=data["uidl"], message_key=data["message_key"],
            raw_sha256=data["raw_sha256"], raw_size=int(data["raw_size"]),
            status=ReceiptStatus(data["status"]), reason=DuplicateReason(data["reason"]),
            archived_at=data["archived_at"], deleted_at=data["deleted_at"], note=data["note"])


def _clause_sql(clause: Clause) -> tuple[str, list[Any]]:
    """One term as a SQL condition on ``documents d`` that is never NULL (so NOT works like
    Elasticsearch's ``must_not``: a document lacking the field matches the negation)."""
    term = clause.term
    if isinstance(term, Text):
        expr = fts_expression(term)
        text_sql = ("d.message_key IN (SELECT message_key FROM fts WHERE fts MATCH ?)"
                    if expr is not None else "0")
        args: list[Any] = [expr] if expr is not None else []
        if term.scope is TextScope.SUBJECT:
            return text_sql, args
        # Elasticsearch adds a case-insensitive *value* wildcard on attachment names.
        return (f"{text_sql} OR EXISTS (SELECT 1 FROM document_files f WHERE "
                "f.message_key = d.message_key AND instr(f.name, ?) > 0)",
                [*args, term.value.lower()])
    if isinstance(term, Address):
        roles = ("from",) if term.role is AddressRole.FROM else _TO_ROLES
        marks = ",".join("?" * len(roles))
        domain = term.domain
        column, value = ("domain", domain) if domain is not None else ("address", term.value)
        return (f"EXISTS (SELECT 1 FROM document_addresses a WHERE a.message_key = "
                f"d.message_key AND a.role IN ({marks}) AND a.{column} = ?)",
                [*roles, value.lower()])
    if isinstance(term, DateTerm):
        op = ">=" if term.bound is DateBound.AFTER else "<"
        return (f"d.timestamp_ms IS NOT NULL AND d.timestamp_ms {op} ?",
                [int(term.instant.timestamp() * 1000)])
    if isinstance(term, HasAttachment):
        return "d.has_attachments = 1", []
    if isinstance(term, Account):
        return ("EXISTS (SELECT 1 FROM document_accounts a WHERE a.message_key = "
                "d.message_key AND a.account_id = ?)", [term.account_id])
    if isinstance(term, Filename):
        return ("EXISTS (SELECT 1 FROM document_files f WHERE f.message_key = d.message_key "
                "AND instr(f.name, ?) > 0)", [term.value.lower()])
    raise TypeError(f"unknown search term {term!r}")  # pragma: no cover - closed union

