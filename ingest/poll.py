"""``poll_account()``: the one place where source, archive, parser and sink meet.

The order for each message is fixed and is the product's main promise::

    RETR → raw bytes in the archive → flush (durable) → document indexed → receipt indexed
         → DELE (only if the account deletes) → QUIT

A session that fails anywhere before QUIT is closed without QUIT, so the server deletes
nothing. A message whose document or receipt was not acknowledged has no receipt, so the next
poll downloads it again; the archive is content-addressed, so that costs no space.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.archive import FilesystemStore
from ingest.classify import ClassifyRules, classify_rules_from_config
from ingest.config import AccountConfig, Config, resolve_secret
from ingest.errors import PopvaultError, ProtocolError
from ingest.outcome import Delivery, DuplicateReason
from ingest.parse import ParserPool
from ingest.pipeline import Ingester, Written
from ingest.pop3 import Pop3Session, Retrieval
from ingest.sinks.base import Receipt, Sink
from ingest.state import load_state, save_state
from ingest.threads import DEFAULT_THREAD_RULES, thread_rules_from_config

log = logging.getLogger("popvault.poll")

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
    kept_ambiguous: int = 0  # archived, but left on the server: their UIDL is not unique
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
            "kept_ambiguous": self.kept_ambiguous,
            "flags": list(self.flags),
            "message_errors": list(self.message_errors[:50]),
            "error": self.error.to_dict() if self.error else None,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass
class PollOptions:
    accept_uidl_reset: bool = False
    progress: ProgressHook | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    sleep: Callable[[float], None] = time.sleep


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        self.thread_rules = DEFAULT_THREAD_RULES  # the configured ones are read in run()
        self.classify_rules: ClassifyRules | None = None

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
        # Read here, not in __init__: a bad [support] table becomes this report's ConfigError.
        self.thread_rules = thread_rules_from_config(self.config)
        self.classify_rules = classify_rules_from_config(self.config)
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
            listing = _Listing(session)
            uidls = self._uidls(session, listing)
            self.report.server_messages = len(uidls)
            to_fetch, ambiguous, receipts = self._plan(uidls)
            sizes: dict[int, int] = {}
            if to_fetch:  # LIST only when something is to be fetched: an idle check is UIDL
                sizes = listing.sizes()
                self._check_listing(uidls, sizes)
            capped, more = self._cap(to_fetch, sizes)
            delivered = self._fetch_and_index(session, capped, uidls, sizes, ambiguous,
                                              receipts)
            dele = self._deletions(delivered, receipts, uidls)
            kept = dele & ambiguous
            if kept:  # archived and indexed, but no receipt can name them: never deleted
                dele -= kept
                self.report.kept_ambiguous += len(kept)
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

    def _uidls(self, session: Pop3Session, listing: _Listing) -> dict[int, str]:
        """UIDLs by message number; with the content fallback, each message is its own UIDL."""
        fallback = self.account.uidl_fallback == "content"
        uidls = None
        if session.capabilities.uidl is not False or not fallback:
            uidls = session.uidl(tolerate_missing=fallback)
        if uidls is None:
            return {n: f"#content-{n}" for n in listing.sizes()}
        return uidls

    def _plan(self, uidls: dict[int, str]
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
        return new, ambiguous, receipts

    def _check_listing(self, uidls: dict[int, str], sizes: dict[int, int]) -> None:
        missing = [n for n in uidls if n not in sizes]
        if missing:
            raise ProtocolError(f"UIDL lists message {missing[0]} that LIST does not",
                                account_id=self.account.id)

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
        ingester = Ingester(account_id=acc.id, sink=self.sink, store=self.store,
                            parser=self.parser, max_message_bytes=acc.max_message_bytes,
                            max_body_chars=self._max_body_chars(),
                            now=lambda: utc_iso(self.options.now()),
                            thread_rules=self.thread_rules,
                            classify_rules=self.classify_rules)
        delivered: set[int] = set()
        done = 0
        probe: list[str] | None = [] if self._needs_reset_probe(numbers, uidls, receipts) \
            else None
        items = [(n, sizes[n]) for n in numbers]
        try:
            for retrieval in session.retrieve(items, window=None if acc.pipelining else 1):
                number = retrieval.number
                uidl = uidls[number]
                done += 1
                if self.options.progress:
                    self.options.progress(acc.id, done, len(numbers))
                if retrieval.error is not None and not retrieval.short:
                    self._message_failed(f"RETR {number} (UIDL {uidl}): {retrieval.error}")
                    continue
                staged = ingester.stage(retrieval.chunks(), ref=number,
                                        uidl=None if number in ambiguous else uidl,
                                        rejected=_short_read(retrieval))
                if staged is None:
                    self._message_failed(f"RETR {number} (UIDL {uidl}): {retrieval.error}")
                    continue
                if probe is not None:
                    probe.append(staged.key())
                    if len(probe) >= min(RESET_PROBE_MESSAGES, len(numbers)):
                        if self._probe_says_reset(probe, len(numbers), len(uidls)):
                            raise _ResetDetected()
                        probe = None
                delivered |= self._tally(ingester.add(staged), uidls)
            delivered |= self._tally(ingester.finish(), uidls)
        finally:
            ingester.close()
            self.report.bytes_fetched += ingester.bytes_stored
            self.report.oversize += ingester.oversize
            self.report.parse_failed += ingester.parse_failed
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

    def _probe_says_reset(self, keys: list[str], new: int, total: int) -> bool:
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

    def _max_body_chars(self) -> int:
        es = self.config.elasticsearch
        return es.max_body_chars if es else 1_000_000

    def _message_failed(self, text: str) -> None:
        self.report.failed += 1
        self.report.message_errors.append(text)
        log.warning("message not archived: %s", text, extra={"account_id": self.account.id})

    def _tally(self, written: Written, uidls: dict[int, str]) -> set[int]:
        delivered: set[int] = set()
        for staged, outcome in written:
            if outcome.delivery is Delivery.DELIVERED:
                delivered.add(staged.ref)
                if outcome.reason is DuplicateReason.NEW:
                    self.report.new += 1
                else:
                    self.report.joined += 1
            else:
                self._message_failed(
                    f"message {staged.ref} (UIDL {uidls[staged.ref]}, key "
                    f"{staged.message_key[:16]}): {outcome.delivery}: {outcome.error}")
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


class _Listing:
    """LIST of one session, sent at most once and only when asked for."""

    def __init__(self, session: Pop3Session) -> None:
        self._session = session
        self._sizes: dict[int, int] | None = None

    def sizes(self) -> dict[int, int]:
        if self._sizes is None:
            self._sizes = self._session.list_sizes()
        return self._sizes


def _short_read(retrieval: Retrieval) -> Callable[[], object]:
    """Asked after the body was read: an error then means the bytes are not the message."""
    return lambda: retrieval.error


class _ResetDetected(Exception):
    """Internal: unwinds the fetch loop when a UIDL reset is detected."""


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
