"""``poll_account()``: the one place where source, archive, parser and sink meet.

The order for each message is fixed and is the product's main promise::

    RETR → raw bytes in the archive → flush (durable) → document indexed → receipt indexed
         → DELE (only if the account deletes) → QUIT

A session that fails anywhere before QUIT is closed without QUIT, so the server deletes
nothing. A message whose document or receipt was not acknowledged has no receipt, so the next
poll downloads it again; the archive is content-addressed, so that costs no space.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from ingest import dedup
from ingest.archive import FilesystemStore, StoredRaw
from ingest.config import AccountConfig, Config, resolve_secret
from ingest.document import build_document
from ingest.errors import PopvaultError, ProtocolError
from ingest.outcome import Delivery, DuplicateReason, ReceiptStatus
from ingest.parse import ParserPool
from ingest.pop3 import Pop3Session
from ingest.sinks.base import IndexItem, ItemOutcome, Receipt, Sink
from ingest.state import load_state, save_state

log = logging.getLogger("popvault.poll")

BATCH_MESSAGES = 200
"""Messages per index batch: large enough for efficient bulk requests, small enough that a
failure re-fetches little."""
BATCH_RAW_BYTES = 16 * 1024 * 1024
"""Raw bytes queued for parsing before the batch is written: bounds the poll's memory (a
parse of a large MIME message costs several times its size in the child)."""
HEAD_BYTES_FOR_OVERSIZE = 256 * 1024
"""An oversize message is indexed from its first bytes only (the header block)."""
MAX_SESSIONS_PER_POLL = 50
"""Bounds the drain loop: a server that never empties cannot hold a worker forever."""
MAX_INLINE_LOGIN_DELAY_S = 30
"""A LOGIN-DELAY up to this is waited out inside the poll; longer ones end the poll."""
RESET_MIN_NEW = 20
"""UIDL-reset suspicion needs at least this many unknown UIDLs (and as many live receipts
whose UIDLs vanished) ..."""
RESET_NEW_FRACTION = 0.5
"""... making up at least this share of the mailbox ..."""
RESET_PROBE_MESSAGES = 3
"""... and then this many of them are fetched: all already archived here ⇒ flag, stop."""

ProgressHook = Callable[[str, int, int], None]
"""(account_id, messages done, messages planned) — drives progress bars."""


@dataclass
class AccountReport:
    """What one poll of one account did; rendered as a table or ``--json``."""

    account_id: str
    new: int = 0  # messages that created a new document
    joined: int = 0  # copies of messages already archived (other account or same content)
    already_archived: int = 0  # UIDLs skipped thanks to receipts
    deleted: int = 0
    oversize: int = 0
    parse_failed: int = 0
    failed: int = 0  # messages not delivered this time (stay on the server)
    server_messages: int = 0
    bytes_fetched: int = 0
    sessions: int = 0
    more_pending: bool = False
    flags: list[str] = field(default_factory=list)
    message_errors: list[str] = field(default_factory=list)
    error: PopvaultError | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and not self.flags

    def to_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "ok": self.ok,
            "new": self.new,
            "joined": self.joined,
            "already_archived": self.already_archived,
            "deleted": self.deleted,
            "oversize": self.oversize,
            "parse_failed": self.parse_failed,
            "failed": self.failed,
            "server_messages": self.server_messages,
            "bytes_fetched": self.bytes_fetched,
            "sessions": self.sessions,
            "more_pending": self.more_pending,
            "flags": list(self.flags),
            "message_errors": list(self.message_errors[:50]),
            "error": self.error.to_dict() if self.error else None,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass
class _Pending:
    """A fetched message waiting for its document."""

    number: int
    uidl: str
    stored: StoredRaw
    message_key: str
    status: ReceiptStatus
    document: dict[str, Any] | None = None
    future: Future[dict[str, Any]] | None = None
    raw_bytes: int = 0


@dataclass
class PollOptions:
    accept_uidl_reset: bool = False
    progress: ProgressHook | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    sleep: Callable[[float], None] = time.sleep


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Collector:
    """Passes chunks through to the archive while keeping a bounded copy for parsing."""

    def __init__(self, chunks: Iterable[bytes], keep_limit: int) -> None:
        self._chunks = chunks
        self._keep_limit = keep_limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.total = 0
        self.truncated = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.total += len(chunk)
            if not self.truncated:
                if self.kept + len(chunk) <= self._keep_limit:
                    self.parts.append(chunk)
                    self.kept += len(chunk)
                else:
                    self.truncated = True
                    room = max(0, HEAD_BYTES_FOR_OVERSIZE - self.kept)
                    if room < HEAD_BYTES_FOR_OVERSIZE:
                        self.parts = [b"".join(self.parts)[:HEAD_BYTES_FOR_OVERSIZE]]
                    else:
                        self.parts.append(chunk[:room])
            yield chunk

    def data(self) -> bytes:
        return b"".join(self.parts)


class AccountPoller:
    """Polls one account: one or more POP3 sessions until drained or capped."""

    def __init__(self, config: Config, account: AccountConfig, *, sink: Sink,
                 store: FilesystemStore, parser: ParserPool,
                 options: PollOptions | None = None) -> None:
        self.config = config
        self.account = account
        self.sink = sink
        self.store = store
        self.parser = parser
        self.options = options or PollOptions()
        self.report = AccountReport(account_id=account.id)

    # -- the poll ---------------------------------------------------------------------------

    def run(self) -> AccountReport:
        started = time.monotonic()
        try:
            self._run_sessions()
        except _ResetDetected:
            pass  # flagged and reported by _probe_says_reset; the session closed without QUIT
        except PopvaultError as exc:
            if exc.account_id is None:
                exc.account_id = self.account.id
            self.report.error = exc
            log.warning("poll of %s failed at stage %s: %s", self.account.id, exc.stage, exc,
                        extra={"account_id": self.account.id, "stage": exc.stage})
        finally:
            self.report.duration_s = time.monotonic() - started
        return self.report

    def _run_sessions(self) -> None:
        state = load_state(self.config.archive_path, self.account.id)
        if state.uidl_reset_flagged_at and not self.options.accept_uidl_reset:
            self.report.flags.append("uidl_reset")
            self.report.message_errors.append(
                f"UIDL reset suspected since {state.uidl_reset_flagged_at}: "
                f"{state.uidl_reset_detail}; nothing fetched or deleted. Check the server, then "
                "poll with --accept-uidl-reset")
            return
        password, token = self._secrets()
        for session_no in range(MAX_SESSIONS_PER_POLL):
            more = self._one_session(password, token)
            if not more:
                self.report.more_pending = False
                return
            self.report.more_pending = True
            if not self.account.drain:
                return
            delay = self._login_delay_s
            if delay > MAX_INLINE_LOGIN_DELAY_S:
                log.info("LOGIN-DELAY %ss: ending poll with messages pending", delay)
                return
            if delay:
                self.options.sleep(delay)
            log.debug("session %d done, more pending", session_no + 1)

    def _secrets(self) -> tuple[str | None, str | None]:
        acc = self.account
        password = token = None
        if acc.auth == "xoauth2":
            token = resolve_secret(acc.token, what="token", account_id=acc.id)
        else:
            password = resolve_secret(acc.password, what="password", account_id=acc.id)
        return password, token

    _login_delay_s: int = 0

    def _one_session(self, password: str | None, token: str | None) -> bool:
        """Run one POP3 session; return True when messages were left for another session."""
        acc = self.account
        session = Pop3Session.open(acc, password=password, token=token,
                                   deadline_s=acc.session_deadline_s)
        quit_sent = False
        try:
            self.report.sessions += 1
            self._login_delay_s = session.capabilities.login_delay_s or 0
            sizes = session.list_sizes()
            uidls = self._uidls(session, sizes)
            self.report.server_messages = len(sizes)
            to_fetch, ambiguous, receipts = self._plan(uidls, sizes)
            capped, more = self._cap(to_fetch, sizes)
            delivered = self._fetch_and_index(session, capped, uidls, sizes, ambiguous,
                                              receipts)
            dele = self._deletions(delivered, receipts, uidls)
            if dele:
                for number, refusal in session.dele(sorted(dele)).items():
                    dele.discard(number)
                    self._message_failed(f"DELE {number} (UIDL {uidls[number]}): {refusal}")
            session.quit()
            quit_sent = True
            if dele:
                self.report.deleted += len(dele)
                self.sink.mark_deleted(acc.id, sorted({uidls[n] for n in dele}),
                                       utc_iso(self.options.now()))
            return more
        finally:
            if not quit_sent:
                session.close()

    # -- planning ---------------------------------------------------------------------------

    def _uidls(self, session: Pop3Session, sizes: dict[int, int]) -> dict[int, str]:
        """UIDLs by message number; with the content fallback, each message is its own UIDL."""
        fallback = self.account.uidl_fallback == "content"
        uidls = None
        if session.capabilities.uidl is not False or not fallback:
            uidls = session.uidl(tolerate_missing=fallback)
        if uidls is None:
            return {n: f"#content-{n}" for n in sizes}
        return uidls

    def _plan(self, uidls: dict[int, str], sizes: dict[int, int]
              ) -> tuple[list[int], set[int], dict[str, Receipt]]:
        """Which message numbers to fetch (UIDL-reset probing happens once keys are known)."""
        counts: dict[str, int] = {}
        for u in uidls.values():
            counts[u] = counts.get(u, 0) + 1
        # A UIDL shared by two messages, or a synthetic one, cannot tell them apart: such
        # messages are always fetched and their content decides (never skip unarchived mail).
        ambiguous = {n for n, u in uidls.items() if counts[u] > 1 or u.startswith("#content-")}
        trusted = [u for n, u in uidls.items() if n not in ambiguous]
        receipts = self.sink.get_receipts(self.account.id, trusted) if trusted else {}
        new = sorted(n for n, u in uidls.items() if n in ambiguous or u not in receipts)
        self.report.already_archived = len(uidls) - len(new)
        missing = [n for n in uidls if n not in sizes]
        if missing:
            raise ProtocolError(f"UIDL lists message {missing[0]} that LIST does not",
                                account_id=self.account.id)
        return new, ambiguous, receipts

    def _cap(self, numbers: list[int], sizes: dict[int, int]) -> tuple[list[int], bool]:
        acc = self.account
        out: list[int] = []
        total = 0
        for n in numbers:
            if acc.max_messages_per_session and len(out) >= acc.max_messages_per_session:
                return out, True
            if acc.max_bytes_per_session and out and total + sizes[n] > acc.max_bytes_per_session:
                return out, True
            out.append(n)
            total += sizes[n]
        return out, False

    # -- fetch, archive, parse, index -------------------------------------------------------

    def _fetch_and_index(self, session: Pop3Session, numbers: list[int],
                         uidls: dict[int, str], sizes: dict[int, int],
                         ambiguous: set[int], receipts: dict[str, Receipt]) -> set[int]:
        """Fetch ``numbers``; return the message numbers whose delivery is acknowledged."""
        if not numbers:
            return set()
        acc = self.account
        window = None if acc.pipelining else 1
        delivered: set[int] = set()
        batch: list[_Pending] = []
        done = 0
        probing = self._needs_reset_probe(numbers, uidls, receipts)
        items = [(n, sizes[n]) for n in numbers]
        for retrieval in session.retrieve(items, window=window):
            pending = self._archive_one(retrieval, uidls[retrieval.number])
            done += 1
            if self.options.progress:
                self.options.progress(acc.id, done, len(numbers))
            if pending is None:
                continue
            batch.append(pending)
            if probing and len(batch) >= min(RESET_PROBE_MESSAGES, len(numbers)):
                probing = False
                if self._probe_says_reset(batch, len(numbers), len(uidls)):
                    raise _ResetDetected()
            if len(batch) >= BATCH_MESSAGES or _parsing_bytes(batch) >= BATCH_RAW_BYTES:
                ready, batch = _split_ready(batch)
                delivered |= self._write_batch(ready, ambiguous)
        if batch:
            delivered |= self._write_batch(batch, ambiguous)
        return delivered

    def _needs_reset_probe(self, numbers: list[int], uidls: dict[int, str],
                           receipts: dict[str, Receipt]) -> bool:
        """A reset looks like this: most listed UIDLs unknown *and* many receipts of copies
        the server should still hold whose UIDLs it no longer lists. (Unknown UIDLs alone
        are also what a first poll, or one after a failed index write, looks like.)"""
        if self.options.accept_uidl_reset:
            return False
        if len(numbers) < RESET_MIN_NEW or len(numbers) < RESET_NEW_FRACTION * len(uidls):
            return False
        listed_live = sum(1 for r in receipts.values() if not r.deleted_at)
        vanished = self.sink.count_receipts(self.account.id, live_only=True) - listed_live
        return vanished >= RESET_MIN_NEW

    def _probe_says_reset(self, batch: list[_Pending], new: int, total: int) -> bool:
        keys = [p.message_key for p in batch[:RESET_PROBE_MESSAGES]]
        seen = self.sink.accounts_of(keys)
        if not all(self.account.id in seen.get(k, []) for k in keys):
            return False
        when = utc_iso(self.options.now())
        detail = (f"{new} of {total} UIDLs are unknown, yet the first {len(keys)} of them are "
                  "messages already archived from this account")
        state = load_state(self.config.archive_path, self.account.id)
        state.uidl_reset_flagged_at = when
        state.uidl_reset_detail = detail
        save_state(self.config.archive_path, state)
        self.report.flags.append("uidl_reset")
        self.report.message_errors.append(
            f"UIDL reset suspected: {detail}. Nothing more fetched and nothing deleted; check "
            "the server, then poll with --accept-uidl-reset")
        return True

    def _archive_one(self, retrieval: Any, uidl: str) -> _Pending | None:
        acc = self.account
        if retrieval.error is not None and not getattr(retrieval, "short", False):
            self._message_failed(f"RETR {retrieval.number} (UIDL {uidl}): {retrieval.error}")
            return None
        limit = acc.max_message_bytes
        collector = _Collector(retrieval.chunks(), keep_limit=limit)
        stored = self.store.put_chunks(collector)
        self.report.bytes_fetched += stored.size
        if retrieval.error is not None:  # short read: the bytes are not the whole message
            if not stored.existed:
                self.store.delete(stored.sha256)
            self._message_failed(f"RETR {retrieval.number} (UIDL {uidl}): {retrieval.error}")
            return None
        first_archived = utc_iso(self.options.now())
        if collector.truncated:
            head = collector.data()
            key = oversize_message_key(head, stored.sha256)
            doc = build_document(head, raw_sha256=stored.sha256, message_key=key,
                                 first_archived=first_archived, headers_only=True)
            doc["popvault"]["raw_size"] = stored.size
            self.report.oversize += 1
            return _Pending(retrieval.number, uidl, stored, key, ReceiptStatus.OVERSIZE,
                            document=doc)
        raw = collector.data()
        key = dedup.message_key(raw)
        future = self.parser.submit(raw, raw_sha256=stored.sha256, message_key=key,
                                    first_archived=first_archived,
                                    max_body_chars=self._max_body_chars())
        return _Pending(retrieval.number, uidl, stored, key, ReceiptStatus.ARCHIVED,
                        future=future, raw_bytes=stored.size)

    def _max_body_chars(self) -> int:
        es = self.config.elasticsearch
        return es.max_body_chars if es else 1_000_000

    def _message_failed(self, text: str) -> None:
        self.report.failed += 1
        self.report.message_errors.append(text)
        log.warning("message not archived: %s", text, extra={"account_id": self.account.id})

    def _write_batch(self, batch: list[_Pending], ambiguous: set[int]) -> set[int]:
        items: list[IndexItem] = []
        for p in batch:
            doc = p.document if p.document is not None else p.future.result()  # type: ignore[union-attr]
            status = p.status
            if doc["popvault"].get("parse_status") in ("failed", "timeout"):
                status = ReceiptStatus.PARSE_FAILED
                self.report.parse_failed += 1
            uidl: str | None = p.uidl
            if p.number in ambiguous:
                uidl = None  # content decides; a UIDL that names two messages gets no receipt
            items.append(IndexItem(message_key=p.message_key, account_id=self.account.id,
                                   uidl=uidl, raw_sha256=p.stored.sha256,
                                   raw_size=p.stored.size, document=doc, status=status))
        self.store.flush()  # raw bytes durable before anything is acknowledged
        outcomes = self.sink.write(items)
        return self._tally(batch, outcomes)

    def _tally(self, batch: list[_Pending], outcomes: list[ItemOutcome]) -> set[int]:
        delivered: set[int] = set()
        for p, outcome in zip(batch, outcomes, strict=True):
            if outcome.delivery is Delivery.DELIVERED:
                delivered.add(p.number)
                if outcome.reason is DuplicateReason.NEW:
                    self.report.new += 1
                else:
                    self.report.joined += 1
            else:
                self._message_failed(
                    f"message {p.number} (UIDL {p.uidl}, key {p.message_key[:16]}): "
                    f"{outcome.delivery}: {outcome.error}")
        return delivered

    # -- deletion ---------------------------------------------------------------------------

    def _deletions(self, delivered: set[int], receipts: dict[str, Receipt],
                   uidls: dict[int, str]) -> set[int]:
        """Message numbers to DELE: only copies that are archived, durable and acknowledged."""
        policy = self.account.on_archived
        if not policy.deletes:
            return set()
        now = self.options.now()
        dele: set[int] = set()
        if policy.action == "delete" or policy.days == 0:
            dele |= delivered
        cutoff = now - timedelta(days=policy.days)
        for n, u in uidls.items():
            r = receipts.get(u)
            if r is None or r.deleted_at is not None or n in dele:
                continue
            if policy.days and _parse_iso(r.archived_at) > cutoff:
                continue
            if not self.store.exists(r.raw_sha256):
                self._message_failed(f"UIDL {u}: receipt says archived but raw object "
                                     f"{r.raw_sha256[:16]} is missing; not deleting")
                continue
            dele.add(n)
        return dele


def _parsing_bytes(batch: list[_Pending]) -> int:
    return sum(p.raw_bytes for p in batch if p.future is not None and not p.future.done())


def _split_ready(batch: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """Split a full batch into messages whose documents are ready and those still parsing.

    Writing only the ready ones keeps the parser processes busy during the index write
    (waiting for the whole batch would leave them idle). The oldest message is always
    waited for, so a slow parse applies backpressure instead of letting the queue grow.
    """
    if batch and batch[0].future is not None:
        batch[0].future.result()
    ready: list[_Pending] = []
    waiting: list[_Pending] = []
    for p in batch:  # one done() per message: a parse finishing meanwhile can't fall out
        (ready if p.future is None or p.future.done() else waiting).append(p)
    return ready, waiting


class _ResetDetected(Exception):
    """Internal: unwinds the fetch loop when a UIDL reset is detected."""


def oversize_message_key(head: bytes, raw_sha256: str) -> str:
    """Key for a message too large to fingerprint in memory: Message-ID plus the raw hash.

    Two deliveries of one oversize message therefore stay two documents (their trace headers
    differ): never a wrong merge, at worst a missed one.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    value = headers.get("Message-ID")
    msgid = dedup.normalize_message_id(str(value) if value is not None else None) or ""
    return hashlib.sha256(f"v1-oversize\0{msgid}\0{raw_sha256}".encode()).hexdigest()


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def poll_account(config: Config, account_id: str, *, sink: Sink, store: FilesystemStore,
                 parser: ParserPool, options: PollOptions | None = None) -> AccountReport:
    """Poll one account end to end; never raises for POP3/archive/index problems.

    Errors end up in ``report.error`` (fatal for this poll) or ``report.message_errors``
    (one message each); a report is ``ok`` only if everything on the server is accounted for.
    """
    account = config.account(account_id)
    poller = AccountPoller(config, account, sink=sink, store=store, parser=parser,
                           options=options)
    return poller.run()
