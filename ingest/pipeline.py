"""The transform stage shared by ``poll`` and ``import``: raw bytes in, acknowledged outcomes out.

For every message: stream its bytes into the raw archive, compute its message key, parse it in
the bounded process pool (or, above ``max_message_bytes``, index it from its header block), and
write documents and receipts to the sink in batches — after one ``flush`` has made the batch's
raw objects durable. Callers learn, per message, whether it was delivered; only then may a
source act on it (DELE, or marking an import done).

Batches are written by a writer thread, one at a time and in order, while the caller goes on
fetching and archiving: the index round trips and the flush no longer stall the fetch.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from ingest import dedup
from ingest.archive import RawStore, StoredRaw
from ingest.classify import ClassifyRules
from ingest.document import build_document
from ingest.heap import release_free_memory
from ingest.outcome import Delivery, DuplicateReason, ReceiptStatus
from ingest.parse import ParserPool
from ingest.sinks.base import IndexItem, ItemOutcome, Sink
from ingest.sinks.threadindex import thread_index_for
from ingest.threads import DEFAULT_THREAD_RULES, ThreadIndex, ThreadRules, resolve_conversations

BATCH_MESSAGES = 200
"""Messages per index batch: large enough for efficient bulk requests, small enough that a
failure re-fetches little."""
BATCH_RAW_BYTES = 12 * 1024 * 1024
"""Raw bytes queued for parsing before a batch is written: bounds memory (a parse of a large
MIME message costs several times its size in the child)."""
HEAD_BYTES_FOR_OVERSIZE = 256 * 1024
"""An oversize message is indexed from its first bytes only (the header block)."""
WRITES_IN_FLIGHT = 2
"""Batches handed to the writer thread and not yet acknowledged: one being written, one
waiting. More would only hold more documents in memory; the fetch waits instead."""


@dataclass
class Staged:
    """A message archived and keyed, waiting for its document to be written.

    ``ref`` is the caller's handle (a POP3 message number, a file and offset). ``uidl`` is
    the receipt's UIDL, or None when no receipt must be written for this copy.
    """

    ref: Any
    uidl: str | None
    stored: StoredRaw
    message_key: str
    status: ReceiptStatus
    document: dict[str, Any] | None = None
    future: Future[dict[str, Any]] | None = None
    raw_bytes: int = 0

    def parsing(self) -> bool:
        return self.future is not None and not self.future.done()

    def key(self) -> str:
        """The message key; computed by the parser child, so this may wait for the parse."""
        if not self.message_key:
            doc = self.document if self.document is not None else self.future.result()  # type: ignore[union-attr]
            self.message_key = doc["popvault"]["message_key"]
        return self.message_key


Written = list[tuple[Staged, ItemOutcome]]


class _Collector:
    """Passes chunks through to the archive while keeping a bounded copy for parsing."""

    def __init__(self, chunks: Iterable[bytes], keep_limit: int) -> None:
        self._chunks = chunks
        self._keep_limit = keep_limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if not self.truncated:
                if self.kept + len(chunk) <= self._keep_limit:
                    self.parts.append(chunk)
                    self.kept += len(chunk)
                else:  # over the limit: keep only the head, for the header block
                    self.truncated = True
                    self.parts = [b"".join([*self.parts, chunk])[:HEAD_BYTES_FOR_OVERSIZE]]
            yield chunk

    def data(self) -> bytes:
        return b"".join(self.parts)


def oversize_message_key(head: bytes, raw_sha256: str) -> str:
    """Key for a message too large to fingerprint in memory: Message-ID plus the raw hash.

    Two deliveries of one oversize message therefore stay two documents (their trace headers
    differ): never a wrong merge, at worst a missed one.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    value = headers.get("Message-ID")
    msgid = dedup.normalize_message_id(str(value) if value is not None else None) or ""
    return hashlib.sha256(f"v1-oversize\0{msgid}\0{raw_sha256}".encode()).hexdigest()


class Ingester:
    """Archive, key, parse and index messages of one account, in batches."""

    def __init__(self, *, account_id: str, sink: Sink, store: RawStore, parser: ParserPool,
                 max_message_bytes: int, max_body_chars: int,
                 now: Callable[[], str],
                 thread_rules: ThreadRules = DEFAULT_THREAD_RULES,
                 classify_rules: ClassifyRules | None = None) -> None:
        self.account_id = account_id
        self.sink = sink
        self.store = store
        self.parser = parser
        self.max_message_bytes = max_message_bytes
        self.max_body_chars = max_body_chars
        self.now = now
        self.thread_rules = thread_rules
        # Only configured rules travel to the parser child; None keeps the built-in ones.
        self.build_extra: dict[str, Any] = (
            {"classify_rules": classify_rules} if classify_rules is not None else {})
        self.pending: list[Staged] = []
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future[Written]] = deque()
        self._threads: ThreadIndex | None = None  # one per poll: see ElasticsearchThreadIndex
        self.bytes_stored = 0
        self.oversize = 0
        self.parse_failed = 0

    def stage(self, chunks: Iterable[bytes], *, ref: Any, uidl: str | None,
              rejected: Callable[[], object] | None = None) -> Staged | None:
        """Archive one message and start its document; None if ``rejected()`` says the bytes
        turned out not to be the whole message (a short RETR): then nothing of it is kept."""
        collector = _Collector(chunks, keep_limit=self.max_message_bytes)
        stored = self.store.put_chunks(collector)
        self.bytes_stored += stored.size
        if rejected is not None and rejected() is not None:
            if not stored.existed:
                self.store.delete(stored.sha256)
            return None
        first_archived = self.now()
        if collector.truncated:
            head = collector.data()
            key = oversize_message_key(head, stored.sha256)
            doc = build_document(head, raw_sha256=stored.sha256, message_key=key,
                                 first_archived=first_archived, headers_only=True,
                                 **self.build_extra)
            doc["popvault"]["raw_size"] = stored.size
            self.oversize += 1
            return Staged(ref, uidl, stored, key, ReceiptStatus.OVERSIZE, document=doc)
        raw = collector.data()
        future = self.parser.submit(raw, raw_sha256=stored.sha256,
                                    first_archived=first_archived,
                                    max_body_chars=self.max_body_chars,
                                    **self.build_extra)
        return Staged(ref, uidl, stored, "", ReceiptStatus.ARCHIVED, future=future,
                      raw_bytes=stored.size)  # the key comes back with the document

    def add(self, staged: Staged) -> Written:
        """Queue a staged message; when the batch is full, hand what is ready to the writer.

        Returns the outcomes of batches the writer has finished since the last call (a write
        error is raised here). Waits only when the writer is :data:`WRITES_IN_FLIGHT` behind.
        """
        self.pending.append(staged)
        parsing = sum(p.raw_bytes for p in self.pending if p.parsing())
        if len(self.pending) < BATCH_MESSAGES and parsing < BATCH_RAW_BYTES:
            return self._collect(wait_for=0)
        ready, self.pending = _split_ready(self.pending)
        if ready:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="popvault-writer")
            self._writes.append(self._writer.submit(self._write, ready))
        return self._collect(wait_for=max(0, len(self._writes) - WRITES_IN_FLIGHT))

    def finish(self) -> Written:
        """Write everything still queued (waiting for the last parses and writes)."""
        written = self._collect(wait_for=len(self._writes))
        batch, self.pending = self.pending, []
        return written + (self._write(batch) if batch else [])

    def close(self) -> None:
        """Let a write in progress end (its outcome is dropped: the caller is failing and acts
        on nothing), then stop the writer thread. Safe to call twice."""
        if self._writes:
            wait(self._writes)
            self._writes.clear()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _collect(self, *, wait_for: int) -> Written:
        """Outcomes of finished writes, in order; the oldest ``wait_for`` are waited for."""
        written: Written = []
        while self._writes and (wait_for > 0 or self._writes[0].done()):
            wait_for -= 1
            written += self._writes.popleft().result()
        return written

    def _write(self, batch: list[Staged]) -> Written:
        docs = [p.document if p.document is not None else p.future.result()  # type: ignore[union-attr]
                for p in batch]
        # Conversation ids need the batch as a whole (parents in it) and the index as it is now.
        if self._threads is None:
            self._threads = thread_index_for(self.sink)
        resolve_conversations(docs, account_id=self.account_id, rules=self.thread_rules,
                              index=self._threads)
        items: list[IndexItem] = []
        for p, doc in zip(batch, docs, strict=True):
            p.message_key = doc["popvault"]["message_key"]
            status = p.status
            if doc["popvault"].get("parse_status") in ("failed", "timeout"):
                status = ReceiptStatus.PARSE_FAILED
                self.parse_failed += 1
            items.append(IndexItem(message_key=p.message_key, account_id=self.account_id,
                                   uidl=p.uidl, raw_sha256=p.stored.sha256,
                                   raw_size=p.stored.size, document=doc, status=status))
        self.store.flush()  # raw bytes durable before anything is acknowledged
        outcomes = self.sink.write(items)
        self._threads.written([doc for doc, o in zip(docs, outcomes, strict=True)
                               if o.delivery is Delivery.DELIVERED
                               and o.reason is DuplicateReason.NEW], self.account_id)
        written = list(zip(batch, outcomes, strict=True))
        del docs, items
        release_free_memory()  # the batch's documents and bulk body are garbage now
        return written


def _split_ready(batch: list[Staged]) -> tuple[list[Staged], list[Staged]]:
    """Split a full batch into messages whose documents are ready and those still parsing.

    Writing only the ready ones keeps the parser processes busy during the index write
    (waiting for the whole batch would leave them idle). The oldest message is always
    waited for, so a slow parse applies backpressure instead of letting the queue grow.
    """
    if batch and batch[0].future is not None:
        batch[0].future.result()
    ready: list[Staged] = []
    waiting: list[Staged] = []
    for p in batch:  # one done() per message: a parse finishing meanwhile can't fall out
        (waiting if p.parsing() else ready).append(p)
    return ready, waiting
