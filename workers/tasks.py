"""Celery tasks: thin wrappers around :mod:`workers.schedule` and ``ingest.poll``.

Task arguments are account ids only, never message bytes or secrets. A poll task:

1. drops out if the account is unknown or paused;
2. takes the account lock, or returns at once ("skipped: locked");
3. takes a connection slot of the account's host, or is retried later with a countdown;
4. polls under a heartbeat that renews lock and slot;
5. records the outcome in the account's health record, sets its next due time (interval,
   backoff, LOGIN-DELAY or soon when messages are pending), pauses it on an auth failure.

A batch task (``popvault.poll_accounts``, what the sweep sends when many accounts are due)
does the same for each of its accounts in turn. After ``poll_batch_handoff_s`` it sends the
rest back to the queue as a new batch; an account whose host is busy gets a task of its own,
which retries as above.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from ingest.errors import AuthError, ConfigError, PopvaultError
from workers import health, metrics
from workers.app import (
    POLL_BATCH_TASK,
    POLL_TASK,
    RETENTION_TASK,
    SWEEP_TASK,
    Runtime,
    app,
    runtime,
)
from workers.limits import HostSlot, busy_retry_s
from workers.locks import AccountLock, Heartbeat
from workers.schedule import POLL_QUEUE, next_poll, now_ms
from workers.schedule import sweep as run_sweep

log = logging.getLogger("popvault.workers.tasks")


class PollTimeout(PopvaultError):
    """Raised (recorded) when a poll ran into the task's soft time limit."""

    stage = "timeout"
    default_transient = True


class InternalError(PopvaultError):
    """Recorded when a poll failed on an unexpected exception (a bug; see the worker log)."""

    stage = "internal"


@app.task(name=SWEEP_TASK, soft_time_limit=100, time_limit=120)
def sweep() -> dict[str, Any]:
    """Claim and enqueue every due account (beat sends this every ``sweep_interval_s``)."""
    rt = runtime()
    config = rt.config()
    intervals = {a.id: a.interval_s for a in config.accounts}

    def enqueue_batch(account_ids: list[str]) -> None:
        # A task still queued after one interval is superseded by the next claim.
        expires = max(30, min(intervals.get(a, 300) for a in account_ids))
        if len(account_ids) == 1:
            poll_account_task.apply_async(args=(account_ids[0],), queue=POLL_QUEUE,
                                          expires=expires)
        else:
            poll_accounts_task.apply_async(args=(account_ids,), queue=POLL_QUEUE,
                                           expires=expires)

    result = run_sweep(rt.redis(), config, rt.settings.schedule, enqueue_batch=enqueue_batch)
    metrics.count_claimed(len(result.claimed))
    log.info("sweep configured=%d claimed=%d lost_races=%d seeded=%d resumed=%d backlog=%d "
             "duration_s=%.3f", result.configured, len(result.claimed), result.lost_races,
             result.seeded, len(result.resumed), result.backlog, result.duration_s,
             extra=result.to_dict())
    return result.to_dict()


@app.task(name=RETENTION_TASK, soft_time_limit=6 * 3600, time_limit=6 * 3600 + 300)
def retention() -> dict[str, Any]:
    """Apply the configured retention policy (beat sends this daily); a no-op without one."""
    from ingest.retention import run_scheduled

    result = run_scheduled(runtime().config())
    log.info("retention %s", result.get("status", "done"), extra=result)
    return result


@app.task(bind=True, name=POLL_TASK)
def poll_account_task(self: Any, account_id: str) -> dict[str, Any]:
    """Poll one account (see the module docstring)."""
    rt = runtime()
    outcome = poll_once(rt, account_id, task_id=self.request.id)
    if outcome["status"] == "host_busy":
        s = rt.settings.schedule
        if self.request.retries < s.host_busy_max_retries:
            raise self.retry(countdown=busy_retry_s(s.host_busy_retry_s),
                             max_retries=s.host_busy_max_retries)
        log.info("account_id=%s host still busy after %d retries; waiting for its next due "
                 "time", account_id, self.request.retries)
    return outcome


@app.task(bind=True, name=POLL_BATCH_TASK)
def poll_accounts_task(self: Any, account_ids: list[str]) -> dict[str, Any]:
    """Poll several accounts in turn (see the module docstring); returns counts by status."""
    rt = runtime()
    s = rt.settings.schedule
    started = time.monotonic()
    counts: dict[str, int] = {}
    rest: list[str] = []
    for index, account_id in enumerate(account_ids):
        if index and time.monotonic() - started > s.poll_batch_handoff_s:
            rest = account_ids[index:]
            break
        outcome = poll_once(rt, account_id, task_id=self.request.id)
        status = str(outcome["status"])
        counts[status] = counts.get(status, 0) + 1
        if status == "host_busy":  # its own task waits for a slot, with the usual retries
            poll_account_task.apply_async(args=(account_id,), queue=POLL_QUEUE,
                                          countdown=busy_retry_s(s.host_busy_retry_s))
        elif outcome.get("timed_out"):  # the soft limit struck: the hard one is near
            rest = account_ids[index + 1:]
            break
    if rest:
        log.info("batch task_id=%s handing %d accounts back to the queue after %.1fs",
                 self.request.id, len(rest), time.monotonic() - started)
        poll_accounts_task.apply_async(args=(rest,), queue=POLL_QUEUE)
        counts["handed_off"] = len(rest)
    return {"task_id": self.request.id, "accounts": len(account_ids), **counts}


def poll_once(rt: Runtime, account_id: str, *, task_id: str | None = None) -> dict[str, Any]:
    """One guarded poll of ``account_id``; returns ``{"status": ..., ...}`` for logs and tests.

    ``status`` is ``polled``, ``skipped`` (with ``reason`` locked, paused, unknown_account)
    or ``host_busy``.
    """
    client = rt.redis()
    config = rt.config()
    s = rt.settings.schedule
    ctx = {"account_id": account_id, "task_id": task_id}
    try:
        account = config.account(account_id)
    except ConfigError:
        log.warning("account_id=%s is not configured (any more); task dropped", account_id,
                    extra=ctx)
        return {**ctx, "status": "skipped", "reason": "unknown_account"}
    ttl_ms = int(s.lock_ttl_s * 1000)
    lock = AccountLock(client, account_id, ttl_ms=ttl_ms)
    paused, failures_before = health.begin_poll(client, account_id, lock)
    if paused:
        return {**ctx, "status": "skipped", "reason": "paused"}
    if not lock.held:
        health.count_skip(client, account_id, "locked")
        metrics.count_skip("locked")
        log.info("account_id=%s task_id=%s skipped: locked by %s", account_id, task_id,
                 lock.holder(), extra=ctx)
        return {**ctx, "status": "skipped", "reason": "locked"}
    slot = HostSlot(client, account.host, rt.settings.max_connections(account.host),
                    lease_ms=ttl_ms, token=lock.token)
    try:
        if not slot.acquire():
            health.count_skip(client, account_id, "host_busy")
            metrics.count_skip("host_busy")
            log.info("account_id=%s task_id=%s host %s has no free connection slot",
                     account_id, task_id, account.host, extra=ctx)
            return {**ctx, "status": "host_busy"}
        with Heartbeat([lock, slot], s.lock_ttl_s / 3):
            health.record_started(client, account_id, task_id=task_id, now_ms=now_ms())
            report = _poll(rt, account_id)
        # The outcome, the slot and the lock go back in one transaction.
        return _finish(rt, account_id, report, failures_before, ctx, release=(slot, lock))
    finally:
        if slot.held:
            slot.release()
        if lock.held:
            lock.release()


def _poll(rt: Runtime, account_id: str) -> Any:
    from ingest.poll import AccountReport, poll_account

    report: AccountReport
    try:
        sink, store, parser = rt.resources()
        report = poll_account(rt.config(), account_id, sink=sink, store=store, parser=parser)
    except SoftTimeLimitExceeded:
        report = AccountReport(account_id=account_id)
        report.error = PollTimeout("poll interrupted by the task's soft time limit "
                                   "(nothing deleted; raise [schedule] task_soft_time_limit_s "
                                   "or cap sessions)", account_id=account_id)
    except PopvaultError as exc:  # the sink, store or parser could not be opened
        report = AccountReport(account_id=account_id)
        exc.account_id = exc.account_id or account_id
        report.error = exc
    except Exception as exc:  # a bug: record it like a failure so status shows it, back off
        log.exception("poll account_id=%s: internal error", account_id)
        report = AccountReport(account_id=account_id)
        report.error = InternalError(f"internal error: {type(exc).__name__}",
                                     account_id=account_id)
    return report


def _finish(rt: Runtime, account_id: str, report: Any, failures_before: int,
            ctx: dict[str, Any], *, release: tuple[HostSlot, AccountLock]) -> dict[str, Any]:
    client = rt.redis()
    account = rt.config().account(account_id)
    error: PopvaultError | None = report.error
    plan = next_poll(account.interval_s, error, report.more_pending, failures_before,
                     rt.settings.schedule)
    now = now_ms()
    data = report.to_dict()
    slot, lock = release

    def release_both(pipe: Any) -> None:
        slot.release_in(pipe)
        lock.release_in(pipe)

    # An auth failure keeps the lock until the account is paused (below).
    early = not isinstance(error, AuthError)
    failures = health.record_poll(client, account_id, data, now_ms=now,
                                  next_due_ms=now + int(plan.delay_s * 1000),
                                  failed=plan.failed, flagged=bool(report.flags),
                                  also=release_both if early else None)
    if early:
        slot.held = lock.held = False
    if isinstance(error, AuthError):
        health.pause(client, account_id, health.AUTH_FAILED, now_ms=now, account=account)
    outcome = "failed" if plan.failed else ("flagged" if report.flags else "ok")
    metrics.observe_poll(data, outcome)
    fields = {**ctx, "new": report.new, "joined": report.joined, "deleted": report.deleted,
              "failed": report.failed, "bytes_fetched": report.bytes_fetched,
              "duration_s": round(report.duration_s, 3), "next_poll_s": round(plan.delay_s, 1),
              "next_reason": plan.reason, "consecutive_failures": failures}
    if error is not None:
        fields["stage"] = error.stage
        log.warning("poll account_id=%s task_id=%s failed stage=%s: %s; next in %.0fs (%s)",
                    account_id, ctx["task_id"], error.stage, error.message, plan.delay_s,
                    plan.reason, extra=fields)
    else:
        log.info("poll account_id=%s task_id=%s new=%d joined=%d deleted=%d failed=%d "
                 "bytes=%d duration_s=%.2f next in %.0fs (%s)", account_id, ctx["task_id"],
                 report.new, report.joined, report.deleted, report.failed,
                 report.bytes_fetched, report.duration_s, plan.delay_s, plan.reason,
                 extra=fields)
    return {**ctx, "status": "polled", "ok": report.ok, "report": data, "outcome": outcome,
            "timed_out": isinstance(error, PollTimeout)}
