"""``import_paths()``: backfill local mail (mbox, Maildir, ``.eml``) through the poll pipeline.

Each message goes through the same :class:`~ingest.pipeline.Ingester` as a polled one: raw
archive → message key → parse → dedup → index. What makes an import **resumable** is a receipt
per message copy with a synthetic UIDL, ``import:<raw_sha256>``: the receipt contract already
dedups per (account, UIDL), so a re-run (or a run after a crash) hashes each message — cheap —
asks the sink which of those UIDLs have receipts, in chunks, and archives and parses only the
rest. Identical bytes found twice (two copies of one file) are one copy: the second is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.archive import RawStore
from ingest.classify import ClassifyRules
from ingest.config import ACCOUNT_ID_RE
from ingest.mailsources import (
    NotAMailSource,
    SourceKind,
    SourceMessage,
    SourceRef,
    detect_source,
    iter_source,
    source_files,
)
from ingest.outcome import Delivery, DuplicateReason
from ingest.parse import ParserPool
from ingest.pipeline import Ingester, Written
from ingest.sinks.base import Sink
from ingest.threads import DEFAULT_THREAD_RULES, ThreadRules

log = logging.getLogger("popvault.importer")

DEFAULT_IMPORT_ACCOUNT = "import"
IMPORT_UIDL_PREFIX = "import:"
"""Synthetic UIDLs are ``import:<raw_sha256>``; no POP3 server hands out such a UIDL."""
RECEIPT_CHECK_MESSAGES = 500
"""Messages hashed and held before one receipt lookup: one ``mget``/query per this many, and
at most this many raw messages in memory besides the Ingester's batch."""
RECEIPT_CHECK_BYTES = 64 * 1024 * 1024
"""... or fewer, once their raw bytes reach this much (bounds memory with large messages)."""
MAX_REPORTED_ERRORS = 1000
"""Errors kept in the report (all are counted; a broken 2 GB mbox must not flood memory)."""


def import_uidl(raw_sha256: str) -> str:
    """The one place the synthetic UIDL of an imported message copy is built."""
    return IMPORT_UIDL_PREFIX + raw_sha256


class InvalidImport(ValueError):
    """The arguments cannot be imported (bad account id, a path that is no mail source)."""


@dataclass(frozen=True)
class EntryError:
    """One entry that was not imported: where it is and why (person-readable)."""

    file: str
    offset: int
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "error": self.error}


@dataclass
class ImportReport:
    """What an import did; rendered as a table or ``--json``."""

    account_id: str
    files: int = 0
    messages_read: int = 0  # entries that were messages (errors not included)
    new: int = 0  # created a document
    joined: int = 0  # already archived (another account, or same content) → joined it
    skipped: int = 0  # already imported (receipt present, or same bytes earlier this run)
    error_count: int = 0
    errors: list[EntryError] = field(default_factory=list)
    bytes_read: int = 0
    bytes_total: int = 0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def messages_per_s(self) -> float:
        return self.messages_read / self.duration_s if self.duration_s > 0 else 0.0

    def add_error(self, ref: SourceRef, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(EntryError(str(ref.path), ref.offset, text))
        log.warning("not imported: %s: %s", ref, text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "ok": self.ok,
            "files": self.files,
            "messages_read": self.messages_read,
            "new": self.new,
            "joined": self.joined,
            "skipped": self.skipped,
            "errors": self.error_count,
            "error_details": [e.to_dict() for e in self.errors],
            "bytes_read": self.bytes_read,
            "duration_s": round(self.duration_s, 3),
            "messages_per_s": round(self.messages_per_s, 1),
        }


ImportProgress = Callable[[ImportReport], None]
"""Called after each message with the running report (counts, bytes_read of bytes_total)."""


@dataclass(frozen=True)
class PlannedSource:
    path: Path
    kind: SourceKind
    size: int


def validate_account_id(account_id: str) -> str:
    """Same rule as configured account ids: it goes into documents, receipts and keys."""
    if not ACCOUNT_ID_RE.match(account_id):
        raise InvalidImport(f"account id {account_id!r} is invalid: use letters, digits and "
                            "'_.-' (at most 64 characters, starting with a letter or digit)")
    return account_id


def plan_sources(paths: Iterable[Path]) -> list[PlannedSource]:
    """Detect every path's shape before anything is imported (a typo fails fast)."""
    planned: list[PlannedSource] = []
    for path in paths:
        try:
            kind = detect_source(path)
        except NotAMailSource as exc:
            raise InvalidImport(str(exc)) from None
        size = 0
        for file in source_files(path, kind):
            with contextlib.suppress(OSError):  # reported when the reader reaches it
                size += file.stat().st_size
        planned.append(PlannedSource(path, kind, size))
    return planned


@dataclass
class _Hashed:
    message: SourceMessage
    sha256: str
    uidl: str


class _Importer:
    def __init__(self, ingester: Ingester, sink: Sink, report: ImportReport,
                 progress: ImportProgress | None) -> None:
        self.ingester = ingester
        self.sink = sink
        self.report = report
        self.progress = progress
        self.seen: set[str] = set()  # UIDLs met this run: identical bytes twice = one copy
        self.bytes_before_file = 0
        self.started = time.monotonic()

    def run(self, sources: list[PlannedSource]) -> None:
        for source in sources:
            self.report.files += len(source_files(source.path, source.kind))
            for group in _groups(self._hashed(iter_source(source.path, source.kind))):
                self._import_group(group)
            self.bytes_before_file += source.size
            self.report.bytes_read = self.bytes_before_file
        self._tally(self.ingester.finish())

    def _hashed(self, messages: Iterator[SourceMessage]) -> Iterator[_Hashed]:
        for message in messages:
            self.report.bytes_read = self.bytes_before_file + message.end
            if message.error is not None:
                self.report.add_error(message.ref, message.error)
                self._tick()
                continue
            self.report.messages_read += 1
            sha = hashlib.sha256(message.raw).hexdigest()
            yield _Hashed(message, sha, import_uidl(sha))

    def _import_group(self, group: list[_Hashed]) -> None:
        """Skip copies with receipts (or seen earlier this run); stage and add the rest."""
        fresh = [h for h in group if h.uidl not in self.seen]
        receipts = self.sink.get_receipts(self.report.account_id,
                                          [h.uidl for h in fresh]) if fresh else {}
        for h in group:
            if h.uidl in self.seen or h.uidl in receipts:
                self.report.skipped += 1
                self._tick()
                continue
            self.seen.add(h.uidl)
            staged = self.ingester.stage([h.message.raw], ref=h.message.ref, uidl=h.uidl)
            if staged is not None:  # None only for short POP3 reads; never for bytes in hand
                self._tally(self.ingester.add(staged))
            self._tick()

    def _tally(self, written: Written) -> None:
        for staged, outcome in written:
            if outcome.delivery is Delivery.DELIVERED:
                if outcome.reason is DuplicateReason.NEW:
                    self.report.new += 1
                else:
                    self.report.joined += 1
            else:
                # Not acknowledged: no receipt, so the next run imports it again.
                self.seen.discard(staged.uidl or "")
                self.report.add_error(staged.ref, f"{outcome.delivery}: {outcome.error}")

    def _tick(self) -> None:
        if self.progress is not None:
            self.report.duration_s = time.monotonic() - self.started  # live msg/s
            self.progress(self.report)


def _groups(hashed: Iterator[_Hashed]) -> Iterator[list[_Hashed]]:
    """Chunks of at most RECEIPT_CHECK_MESSAGES messages / RECEIPT_CHECK_BYTES raw bytes."""
    group: list[_Hashed] = []
    size = 0
    for h in hashed:
        group.append(h)
        size += len(h.message.raw)
        if len(group) >= RECEIPT_CHECK_MESSAGES or size >= RECEIPT_CHECK_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def import_paths(paths: Iterable[Path], *, account_id: str, sink: Sink, store: RawStore,
                 parser: ParserPool, max_message_bytes: int, max_body_chars: int,
                 now: Callable[[], str], progress: ImportProgress | None = None,
                 thread_rules: ThreadRules = DEFAULT_THREAD_RULES,
                 classify_rules: ClassifyRules | None = None) -> ImportReport:
    """Import every message of ``paths`` (mbox files, Maildirs, ``.eml`` directories).

    Raises InvalidImport before reading anything if the account id or a path is unusable;
    SinkError/ArchiveError if the index or the archive fails as a whole (what was acknowledged
    until then has its receipts, so a re-run continues). Bad entries end up in the report.
    """
    validate_account_id(account_id)
    sources = plan_sources(paths)
    report = ImportReport(account_id=account_id,
                          bytes_total=sum(s.size for s in sources))
    ingester = Ingester(account_id=account_id, sink=sink, store=store, parser=parser,
                        max_message_bytes=max_message_bytes, max_body_chars=max_body_chars,
                        now=now, thread_rules=thread_rules, classify_rules=classify_rules)
    started = time.monotonic()
    try:
        _Importer(ingester, sink, report, progress).run(sources)
    finally:
        ingester.close()
        report.duration_s = time.monotonic() - started
    return report
