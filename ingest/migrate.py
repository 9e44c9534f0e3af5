"""Move the embedded store (``<archive>/index.sqlite3``) into Elasticsearch, then verify.

Documents go through :meth:`ElasticsearchSink.write`, one :class:`IndexItem` per account the
document lists, all items of a document in one batch: the sink then creates the document with
exactly that accounts list, in that order, in the monthly index :meth:`index_for` picks — or,
when it already exists (a re-run, or mail polled into Elasticsearch meanwhile), adds the missing
accounts with its guarded join. Those items carry no UIDL, so ``write`` makes no receipts of its
own (its receipts would get a new ``archived_at`` and a recomputed ``reason``).

Receipts are copied with every original field: the ones Elasticsearch lacks are created with
``create`` (409 → someone else has it, never overwritten); ones present and equal count as
unchanged; ones present and different are reported, never overwritten — the receipt already in
Elasticsearch is what polls have been trusting.

Idempotent: a second run creates nothing and changes nothing. The verification pass then reads
every source document and receipt back from Elasticsearch (realtime ``mget``) and compares.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

from ingest.outcome import Delivery, DuplicateReason
from ingest.sinks.base import IndexItem, Receipt
from ingest.sinks.elasticsearch import ElasticsearchSink
from ingest.sinks.embedded import EmbeddedSink

T = TypeVar("T")

DOCUMENT_BATCH = 500
"""Documents per ``write`` (the sink splits bulk requests by bytes on its own)."""
RECEIPT_BATCH = 1_000
"""Receipts per lookup and create round."""
MAX_REPORTED_PROBLEMS = 200
"""Problems listed in the report (all are counted)."""

MigrateProgress = Callable[[str, int, int], None]
"""(phase, done, total); phases are ``documents``, ``receipts``, ``verify``."""


@dataclass
class MigrationReport:
    """What a migration did and what the verification found; a table or ``--json``."""

    source: str
    target: str
    documents_source: int = 0
    documents_created: int = 0
    documents_joined: int = 0  # existed in Elasticsearch; accounts were added
    documents_unchanged: int = 0
    receipts_source: int = 0
    receipts_created: int = 0
    receipts_unchanged: int = 0
    receipts_conflicting: int = 0  # present in Elasticsearch with different fields (kept)
    documents_target: int = 0  # after the migration, in Elasticsearch
    receipts_target: int = 0
    verified_documents: int = 0  # present with at least the source's accounts
    verified_receipts: int = 0  # present with equal fields
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def counts_match(self) -> bool:
        """Elasticsearch holds exactly as many records as the embedded store (False is
        expected, and fine, when Elasticsearch also holds mail polled into it directly)."""
        return (self.documents_target == self.documents_source
                and self.receipts_target == self.receipts_source)

    @property
    def ok(self) -> bool:
        return (self.problem_count == 0
                and self.verified_documents == self.documents_source
                and self.verified_receipts == self.receipts_source)

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "ok": self.ok,
            "counts_match": self.counts_match,
            "documents": {"source": self.documents_source, "created": self.documents_created,
                          "joined": self.documents_joined,
                          "unchanged": self.documents_unchanged,
                          "target": self.documents_target,
                          "verified": self.verified_documents},
            "receipts": {"source": self.receipts_source, "created": self.receipts_created,
                         "unchanged": self.receipts_unchanged,
                         "conflicting": self.receipts_conflicting,
                         "target": self.receipts_target, "verified": self.verified_receipts},
            "problems": self.problem_count,
            "problem_details": list(self.problems),
            "duration_s": round(self.duration_s, 3),
        }


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _accounts(document: dict[str, Any]) -> list[str]:
    accounts = (document.get("popvault") or {}).get("accounts") or []
    return [accounts] if isinstance(accounts, str) else list(accounts)


class _Migration:
    def __init__(self, source: EmbeddedSink, target: ElasticsearchSink,
                 report: MigrationReport, progress: MigrateProgress | None) -> None:
        self.source = source
        self.target = target
        self.report = report
        self.progress = progress

    def _tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # -- documents ------------------------------------------------------------------------------

    def documents(self) -> None:
        done = 0
        for batch in _batches(self.source.iter_documents(), DOCUMENT_BATCH):
            self._document_batch(batch)
            done += len(batch)
            self._tick("documents", done, self.report.documents_source)

    def _document_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        items: list[IndexItem] = []
        spans: list[tuple[str, int, int]] = []  # key, first item, item count
        for key, doc in batch:
            accounts = _accounts(doc)
            if not accounts:
                self.report.problem(f"document {key}: lists no account; not migrated")
                continue
            pv = doc.get("popvault") or {}
            spans.append((key, len(items), len(accounts)))
            items += [IndexItem(message_key=key, account_id=account, uidl=None,
                                raw_sha256=str(pv.get("raw_sha256", "")),
                                raw_size=int(pv.get("raw_size") or 0), document=doc)
                      for account in accounts]
        outcomes = self.target.write(items)
        for key, first, count in spans:
            mine = outcomes[first:first + count]
            failed = [o for o in mine if o.delivery is not Delivery.DELIVERED]
            if failed:
                self.report.problem(f"document {key}: {failed[0].delivery}: {failed[0].error}")
            elif mine[0].reason is DuplicateReason.NEW:
                self.report.documents_created += 1
            elif all(o.reason is DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT for o in mine):
                self.report.documents_unchanged += 1
            else:
                self.report.documents_joined += 1

    # -- receipts -------------------------------------------------------------------------------

    def receipts(self) -> None:
        done = 0
        for batch in _batches(self.source.iter_receipts(), RECEIPT_BATCH):
            self._receipt_batch(batch)
            done += len(batch)
            self._tick("receipts", done, self.report.receipts_source)

    def _existing(self, receipts: Sequence[Receipt]) -> dict[str, Receipt]:
        """Receipts Elasticsearch already has for these, keyed by receipt id."""
        by_account: dict[str, list[str]] = {}
        for r in receipts:
            by_account.setdefault(r.account_id, []).append(r.uidl)
        found: dict[str, Receipt] = {}
        for account, uidls in by_account.items():
            for stored in self.target.get_receipts(account, uidls).values():
                found[stored.id] = stored
        return found

    def _receipt_batch(self, batch: list[Receipt]) -> None:
        existing = self._existing(batch)
        missing: dict[str, Receipt] = {}
        for r in batch:
            stored = existing.get(r.id)
            if stored is None:
                missing[r.id] = r
            elif stored == r:
                self.report.receipts_unchanged += 1
            else:
                self._conflict(r, stored)
        # The sink's own receipt writer: bulk create with the receipt's fields, 409 → the
        # stored one is read back (a poll may have written it between our lookup and now).
        written = self.target._write_receipts(missing)
        for rid, r in missing.items():
            got = written.get(rid)
            if isinstance(got, Receipt):
                if got == r:
                    self.report.receipts_created += 1
                else:
                    self._conflict(r, got)
            else:
                delivery, text = got or (Delivery.ERRORED, "no reply")
                self.report.problem(f"receipt {rid}: {delivery}: {text}")

    def _conflict(self, ours: Receipt, theirs: Receipt) -> None:
        self.report.receipts_conflicting += 1
        mine, other = ours.to_dict(), theirs.to_dict()
        fields = ", ".join(f"{k}: {mine[k]!r} here, {other[k]!r} in Elasticsearch"
                           for k in mine if mine[k] != other[k])
        self.report.problem(f"receipt {ours.id} differs ({fields}); Elasticsearch's kept")

    # -- verification ---------------------------------------------------------------------------

    def verify(self) -> None:
        total = self.report.documents_source + self.report.receipts_source
        done = 0
        for batch in _batches(self.source.iter_documents(), DOCUMENT_BATCH):
            index_of = {key: self.target.index_for(doc) for key, doc in batch}
            seen = self.target.accounts_of(index_of, index_of=index_of)
            for key, doc in batch:
                want = _accounts(doc)
                have = seen.get(key)
                if have is None:
                    self.report.problem(f"verify: document {key} missing in {index_of[key]}")
                elif not set(want) <= set(have):
                    self.report.problem(f"verify: document {key} lists accounts {have}, "
                                        f"expected at least {want}")
                else:
                    self.report.verified_documents += 1
            done += len(batch)
            self._tick("verify", done, total)
        for receipts in _batches(self.source.iter_receipts(), RECEIPT_BATCH):
            existing = self._existing(receipts)
            for r in receipts:
                stored = existing.get(r.id)
                if stored is None:
                    self.report.problem(f"verify: receipt {r.id} missing")
                elif stored == r:
                    self.report.verified_receipts += 1
                # a differing receipt was reported as a conflict already
            done += len(receipts)
            self._tick("verify", done, total)
        self.report.documents_target = self.target.count_documents()
        self.report.receipts_target = self.target.count_receipts()


def migrate_to_elasticsearch(source: EmbeddedSink, target: ElasticsearchSink, *,
                             progress: MigrateProgress | None = None) -> MigrationReport:
    """Copy every document and receipt of ``source`` into ``target``, then verify.

    Installs the target's schema first (idempotent). Raises SinkError when either store fails
    as a whole; per-record problems end up in the report. Safe to re-run at any point.
    """
    report = MigrationReport(source=str(source.path),
                             target=f"{target.url} (prefix {target.config.index_prefix})")
    started = time.monotonic()
    try:
        target.ensure_schema()
        report.documents_source = source.count_documents()
        report.receipts_source = source.count_receipts()
        migration = _Migration(source, target, report, progress)
        migration.documents()
        migration.receipts()
        target.refresh()
        migration.verify()
    finally:
        report.duration_s = time.monotonic() - started
    return report
