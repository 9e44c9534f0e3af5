"""Ticket events under Celery: the dispatcher task, and the helpers a consumer's task uses.

The index is the record, the queue never is, and the poll code knows nothing of events.
Beat sends :data:`DISPATCH_TASK` every ``[events] dispatch_interval_s``; one run at a time
holds :func:`workers.keys.events_lock` (token-checked, renewed by a heartbeat, expiring if the
worker dies). A run, for each account with ``events``:

1. reads the account's high-water mark (epoch ms of ``popvault.first_archived``; the first
   run for an account sets it to now, so enabling events does not replay the archive);
2. scans documents of the account archived at or after ``mark - safety_window_s``
   (:func:`ingest.events.scan_archived_since`), oldest first, and keeps those that are new
   for this account and of a wanted kind (:func:`ingest.events.wants_event`);
3. per channel (``celery``, ``webhook``) skips keys already finished -- a ZSET of message keys
   delivered or dead-lettered, scored by first_archived, pruned below the window -- and
   events whose retry is not due yet;
4. sends the rest, and marks one finished only *after* the send succeeded; a failure counts
   an attempt and sets the next try (exponential backoff), and after ``max_attempts`` (or at
   once on a permanent refusal) writes a dead letter and finishes the event;
5. moves the mark to the oldest unfinished event, or past everything scanned.

A crash between a send and its mark leaves the key unfinished, so the next run sends it
again: at least once. Consumers dedupe on ``event_id`` (= message key); :func:`consume` does
that for a Celery consumer.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task, signals

from ingest.config import Config
from ingest.errors import PopvaultError
from ingest.events import (
    TICKET_EVENT_TASK,
    Attempt,
    EventsConfig,
    Transport,
    Verdict,
    backoff_s,
    build_event,
    channels_for,
    first_archived_ms,
    parse_events_config,
    post_event,
    resolve_webhook_secret,
    scan_archived_since,
    urllib_transport,
    wants_event,
)
from workers import keys
from workers.locks import AccountLock, Heartbeat

log = logging.getLogger("popvault.workers.events")

DISPATCH_TASK = "popvault.events.dispatch"
EVENTS_QUEUE = "popvault.events"
"""The dispatcher's own queue: a slow webhook never delays sweeps or polls."""
DISPATCH_SOFT_TIME_LIMIT_S = 540
DISPATCH_TIME_LIMIT_S = 600
"""Hard limits of one run; a run stops sending after ``[events] max_run_s`` (at most 300 s)
plus one request timeout, far below these."""
DISPATCH_LOCK_TTL_MS = 60_000
"""The dispatcher lock outlives its last renewal by this (the task uses ``[schedule]
lock_ttl_s``, same meaning): after a SIGKILL the next run starts at most this much later.
Renewed every third of it."""
SEEN_TTL_S = 7 * 24 * 3600
"""How long a consumer remembers a handled event id; redeliveries come within minutes."""
CELERY_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 2.0}
"""A broker hiccup is retried briefly in place; a longer outage becomes a counted attempt."""


class DispatchLock(AccountLock):
    """The single dispatcher lock: :class:`AccountLock`'s token-checked scripts, another key."""

    def __init__(self, client: Any, *, ttl_ms: int = DISPATCH_LOCK_TTL_MS) -> None:
        super().__init__(client, "events-dispatcher", ttl_ms=ttl_ms)
        self.key = keys.events_lock()


@dataclass
class DispatchResult:
    """What one run did; logged and kept in :func:`workers.keys.events_stats`."""

    scanned: int = 0
    wanted: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    waiting: int = 0  # unfinished, retry not due yet (or the run's budget ran out)
    skipped: str | None = None  # "locked" | "disabled" when the run did nothing
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"scanned": self.scanned, "wanted": self.wanted, "delivered": self.delivered,
                "failed": self.failed, "dead": self.dead, "waiting": self.waiting,
                "skipped": self.skipped, "errors": list(self.errors[:10]),
                "duration_s": round(self.duration_s, 4)}


SendTask = Callable[[dict[str, Any], str], None]
"""``(event, queue)``: publish the ticket task; raises when the broker did not take it."""


@dataclass
class _Run:
    client: Any
    cfg: EventsConfig
    send_task: SendTask
    transport: Transport
    secret: str | None
    deadline: float
    result: DispatchResult
    rng: random.Random
    sent: int = 0

    def budget_left(self) -> bool:
        return self.sent < self.cfg.max_events_per_run and time.monotonic() < self.deadline


def now_ms() -> int:
    return int(time.time() * 1000)


def dispatch(client: Any, sink: Any, cfg: EventsConfig, *, send_task: SendTask,
             transport: Transport = urllib_transport, clock_ms: Callable[[], int] = now_ms,
             rng: random.Random | None = None) -> DispatchResult:
    """One dispatcher pass over every event-enabled account (the caller holds the lock)."""
    started = time.monotonic()
    result = DispatchResult()
    secret = None
    if any("webhook" in ch for ch in cfg.accounts.values()):
        secret = resolve_webhook_secret(cfg)
    run = _Run(client, cfg, send_task, transport, secret, started + cfg.max_run_s, result,
               rng or random.Random())
    for account_id in sorted(cfg.accounts):
        try:
            _dispatch_account(run, sink, account_id, clock_ms)
        except PopvaultError as exc:  # the index is down: every account will wait
            result.errors.append(str(exc))
            log.warning("events: account_id=%s not dispatched: %s", account_id, exc)
    result.duration_s = time.monotonic() - started
    client.hset(keys.events_stats(), mapping={
        "at_ms": clock_ms(), **{k: json.dumps(v) if isinstance(v, list | type(None)) else v
                                for k, v in result.to_dict().items()}})
    return result


def _dispatch_account(run: _Run, sink: Any, account_id: str,
                      clock_ms: Callable[[], int]) -> None:
    client, cfg = run.client, run.cfg
    channels = channels_for(cfg, account_id)
    window_ms = int(cfg.safety_window_s * 1000)
    mark_raw = client.hget(keys.events_mark(), account_id)
    if mark_raw is None:
        mark = clock_ms()
        client.hsetnx(keys.events_mark(), account_id, mark)
        mark = int(client.hget(keys.events_mark(), account_id) or mark)
    else:
        mark = int(mark_raw)
    since = mark - window_ms
    oldest_unfinished: int | None = None
    newest_seen: int | None = None
    stopped = False
    for page in scan_archived_since(sink, account_id, since):
        run.result.scanned += len(page)
        rows: list[tuple[str, int, dict[str, Any]]] = []
        for key, doc in page:
            when = first_archived_ms(doc)
            if when is None:
                continue
            newest_seen = when if newest_seen is None else max(newest_seen, when)
            if wants_event(doc, account_id, cfg.include_kinds):
                rows.append((key, when, doc))
        if not rows:
            continue
        run.result.wanted += len(rows)
        pending = _unfinished(client, account_id, channels, [k for k, _w, _d in rows])
        for key, when, doc in rows:
            todo = pending.get(key, ())
            if not todo:
                continue
            if stopped or not run.budget_left():
                stopped = True
                run.result.waiting += 1
                oldest_unfinished = _min(oldest_unfinished, when)
                continue
            event = build_event(key, account_id, doc)
            if not all([_send(run, account_id, channel, event, when, todo[channel], clock_ms)
                        for channel in todo]):
                oldest_unfinished = _min(oldest_unfinished, when)
    if oldest_unfinished is not None:
        new_mark = oldest_unfinished
    else:
        new_mark = max(mark, newest_seen if newest_seen is not None else mark)
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.events_mark(), account_id, new_mark)
    for channel in channels:
        pipe.zremrangebyscore(keys.events_done(account_id, channel), "-inf",
                              f"({new_mark - window_ms}")
    pipe.execute()
    _prune_attempts(client, account_id, channels, new_mark - window_ms)


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _unfinished(client: Any, account_id: str, channels: tuple[str, ...], message_keys: list[str],
                ) -> dict[str, dict[str, dict[str, Any] | None]]:
    """For each key, the channels whose event is not finished, with its retry state if any."""
    pipe = client.pipeline(transaction=False)
    for channel in channels:
        pipe.zmscore(keys.events_done(account_id, channel), message_keys)
        pipe.hmget(keys.events_attempts(account_id, channel), message_keys)
    replies = pipe.execute()
    out: dict[str, dict[str, dict[str, Any] | None]] = {k: {} for k in message_keys}
    for i, channel in enumerate(channels):
        done, states = replies[2 * i], replies[2 * i + 1]
        for key, score, state in zip(message_keys, done, states, strict=True):
            if score is None:
                out[key][channel] = json.loads(state) if state else None
    return out


def _send(run: _Run, account_id: str, channel: str, event: dict[str, Any], when: int,
          state: dict[str, Any] | None, clock_ms: Callable[[], int]) -> bool:
    """Try one channel of one event if its retry is due; True when it is finished now."""
    now = clock_ms()
    if state is not None and int(state.get("next_at_ms", 0)) > now:
        run.result.waiting += 1
        return False
    run.sent += 1
    attempt = _attempt(run, channel, event)
    key = event["event_id"]
    client = run.client
    if attempt.verdict is Verdict.DELIVERED:
        pipe = client.pipeline(transaction=True)
        pipe.zadd(keys.events_done(account_id, channel), {key: when})
        pipe.hdel(keys.events_attempts(account_id, channel), key)
        pipe.execute()
        run.result.delivered += 1
        return True
    attempts = int((state or {}).get("attempts", 0)) + 1
    if attempt.verdict is Verdict.REJECTED or attempts >= run.cfg.max_attempts:
        letter = {"account_id": account_id, "channel": channel, "message_key": key,
                  "attempts": attempts, "status": attempt.status, "error": attempt.reason,
                  "verdict": str(attempt.verdict), "dead_at_ms": now, "event": event}
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.events_dead(), f"{account_id}:{channel}:{key}", json.dumps(letter))
        pipe.zadd(keys.events_done(account_id, channel), {key: when})
        pipe.hdel(keys.events_attempts(account_id, channel), key)
        pipe.execute()
        run.result.dead += 1
        log.error("events: dead letter account_id=%s channel=%s message_key=%s after %d "
                  "attempt(s): %s", account_id, channel, key, attempts, attempt.reason,
                  extra={"account_id": account_id, "message_key": key, "channel": channel})
        return True
    wait = backoff_s(attempts, base_s=run.cfg.retry_base_s, max_s=run.cfg.retry_max_s,
                     rng=run.rng, jitter=True)
    if attempt.retry_after_s is not None:
        wait = min(max(wait, attempt.retry_after_s), run.cfg.retry_max_s)
    client.hset(keys.events_attempts(account_id, channel), key, json.dumps({
        "attempts": attempts, "next_at_ms": now + int(wait * 1000),
        "last_error": attempt.reason, "first_archived_ms": when}))
    run.result.failed += 1
    log.warning("events: account_id=%s channel=%s message_key=%s attempt %d failed (%s); "
                "next in %.1fs", account_id, channel, key, attempts, attempt.reason, wait)
    return False


def _attempt(run: _Run, channel: str, event: dict[str, Any]) -> Attempt:
    if channel == "celery":
        try:
            run.send_task(event, run.cfg.celery_queue)
        except Exception as exc:  # kombu/redis errors: the broker did not take it
            return Attempt(Verdict.RETRY, None, f"publish failed: {type(exc).__name__}")
        return Attempt(Verdict.DELIVERED, None, "published")
    assert run.cfg.webhook_url is not None and run.secret is not None  # checked by the config
    return post_event(run.cfg.webhook_url, run.secret, event, timeout_s=run.cfg.timeout_s,
                      transport=run.transport)


def _prune_attempts(client: Any, account_id: str, channels: tuple[str, ...],
                    below_ms: int) -> None:
    """Forget retry state of events that fell out of the window (their document is gone)."""
    for channel in channels:
        key = keys.events_attempts(account_id, channel)
        stale = [field for field, raw in client.hgetall(key).items()
                 if int(json.loads(raw).get("first_archived_ms", 0)) < below_ms]
        if stale:
            client.hdel(key, *stale)


def dead_letters(client: Any) -> list[dict[str, Any]]:
    """Every dead letter, oldest first (for a ``popvault events dead`` command and tests)."""
    letters = [json.loads(raw) for raw in client.hvals(keys.events_dead())]
    return sorted(letters, key=lambda d: (d.get("dead_at_ms", 0), d.get("message_key", "")))


# -- consumers ------------------------------------------------------------------------------


def consume(client: Any, event: Mapping[str, Any],
            handle: Callable[[Mapping[str, Any]], None], *,
            seen_ttl_s: int = SEEN_TTL_S) -> bool:
    """Handle ``event`` unless its ``event_id`` was handled before; True if handled now.

    The id is remembered only after ``handle`` returned, so a crash inside ``handle`` means
    the redelivered copy is handled (at least once, never silently dropped).
    """
    key = keys.events_seen(str(event["event_id"]))
    if client.exists(key):
        return False
    handle(event)
    client.set(key, "1", ex=seen_ttl_s)
    return True


def register_ticket_consumer(app: Any, handle: Callable[[Mapping[str, Any]], None],
                             redis_client: Callable[[], Any]) -> Any:
    """Register :data:`ingest.events.TICKET_EVENT_TASK` on a consumer's Celery ``app``.

    The task is acknowledged late and requeued if its worker dies, and dedupes by event id
    with :func:`consume`. Run its worker with ``-Q <[events] celery_queue>``.
    """

    @app.task(name=TICKET_EVENT_TASK, acks_late=True, reject_on_worker_lost=True)
    def ticket_event(event: dict[str, Any]) -> bool:
        return consume(redis_client(), event, handle)

    return ticket_event


# -- the task -------------------------------------------------------------------------------

_sink_lock = threading.Lock()
_sink: tuple[Any, Any] | None = None  # (sink, the config sections it was opened for)


def _open_sink(config: Config) -> Any:
    """This process's read-only sink for scanning; reopened when the index settings change.

    Not :meth:`workers.app.Runtime.resources`: that also starts a parser pool, which the
    dispatcher never needs.
    """
    global _sink
    from ingest.sinks.factory import open_sink

    ident = (config.elasticsearch, config.archive_path)
    with _sink_lock:
        if _sink is None or _sink[1] != ident:
            if _sink is not None:
                _sink[0].close()
            _sink = (open_sink(config), ident)
        return _sink[0]


def close_sink() -> None:
    global _sink
    with _sink_lock:
        if _sink is not None:
            _sink[0].close()
            _sink = None


def run_dispatch(client: Any, config: Config, send_task: SendTask, *,
                 transport: Transport = urllib_transport,
                 lock_ttl_ms: int = DISPATCH_LOCK_TTL_MS) -> DispatchResult:
    """Take the lock, dispatch under a heartbeat, release; "locked" if another run holds it."""
    cfg = parse_events_config(config)
    if cfg is None:
        return DispatchResult(skipped="disabled")
    lock = DispatchLock(client, ttl_ms=lock_ttl_ms)
    if not lock.acquire():
        return DispatchResult(skipped="locked")
    try:
        with Heartbeat([lock], lock.ttl_ms / 3000):
            return dispatch(client, _open_sink(config), cfg, send_task=send_task,
                            transport=transport)
    finally:
        lock.release()


@shared_task(bind=True, name=DISPATCH_TASK, soft_time_limit=DISPATCH_SOFT_TIME_LIMIT_S,
             time_limit=DISPATCH_TIME_LIMIT_S, acks_late=False)
def dispatch_events(self: Any) -> dict[str, Any]:
    """One dispatcher run (beat sends this every ``[events] dispatch_interval_s``).

    Acknowledged early, unlike polls: a lost run is replaced by the next one, because the
    index and the Redis marks, not this message, say what is left to send.
    """
    from workers.app import runtime

    rt = runtime()

    def send_task(event: dict[str, Any], queue: str) -> None:
        self.app.send_task(TICKET_EVENT_TASK, args=[event], queue=queue, retry=True,
                           retry_policy=CELERY_PUBLISH_RETRY)

    # Same meaning as the poll lock's TTL: how long a dead worker holds things up.
    result = run_dispatch(rt.redis(), rt.config(), send_task,
                          lock_ttl_ms=int(rt.settings.schedule.lock_ttl_s * 1000))
    if result.skipped is None:
        log.info("events: scanned=%d wanted=%d delivered=%d failed=%d dead=%d waiting=%d "
                 "duration_s=%.3f", result.scanned, result.wanted, result.delivered,
                 result.failed, result.dead, result.waiting, result.duration_s,
                 extra=result.to_dict())
    return result.to_dict()


@signals.worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    close_sink()
