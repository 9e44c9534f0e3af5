"""Account health records in Redis, and pausing/resuming accounts.

One HASH per account (:func:`workers.keys.health`); every field is readable with
``redis-cli HGETALL popvault:health:<id>``:

``state``                 an :class:`AccountState` value
``last_poll_started``     ISO time the last poll began; ``last_poll_ended`` when it ended
``last_success``          ISO time of the last poll without a fatal error
``last_error``            JSON of ``PopvaultError.to_dict()`` plus ``at`` (never secrets)
``consecutive_failures``  polls in a row that ended with a fatal error
``messages_archived``     total messages archived from this account (new + joined)
``bytes_fetched``         total raw bytes downloaded
``last_report``           JSON counts of the last poll (``AccountReport.to_dict()`` trimmed)
``paused`` / ``paused_at`` why and since when polls are paused (absent when not paused)
``settings_hash``         hash of the non-secret connection settings when paused for auth
``next_due``              ISO time of the next poll; ``skipped_locked`` / ``host_busy`` counts
``last_task_id``          the Celery task id of the last poll

Paused accounts are scored ``+inf`` in the due ZSET (so sweeps never claim them) and listed in
the ``paused`` SET (so sweeps can check auth-paused accounts for changed settings cheaply).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ingest.config import AccountConfig
from workers import keys
from workers.locks import AccountLock

AUTH_FAILED = "auth_failed"
OPERATOR = "operator"

_RESCHEDULE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""


class AccountState(StrEnum):
    """An account's state as stored in Redis and shown by ``popvault status``."""

    NEW = "new"  # configured, never polled
    OK = "ok"  # last poll had no fatal error
    FAILING = "failing"  # last poll ended with an error; backing off
    FLAGGED = "flagged"  # e.g. suspected UIDL reset: polls do nothing until an operator acts
    PAUSED = "paused"  # no polls until resumed (auth failure or operator)


def iso_ms(epoch_ms: float) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def settings_hash(account: AccountConfig) -> str:
    """Hash of the settings that decide whether a login can succeed; no secret values.

    Secret *sources* (env name, file path, command) are included: pointing the account at a
    new secret resumes it. A changed secret behind the same source needs ``accounts resume``.
    """
    fields = {
        "host": account.host, "port": account.port, "username": account.username,
        "security": account.security, "auth": account.auth,
        "password": [account.password.env, str(account.password.file or ""),
                     account.password.command],
        "token": [account.token.env, str(account.token.file or ""), account.token.command],
        "ca_file": str(account.ca_file or ""), "verify": account.verify,
        "allow_plaintext_auth": account.allow_plaintext_auth,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_paused(client: Any, account_id: str) -> bool:
    return bool(client.sismember(keys.paused(), account_id))


def pause(client: Any, account_id: str, reason: str, *, now_ms: int,
          account: AccountConfig | None = None) -> None:
    """Stop polling ``account_id`` until :func:`resume` (or, for auth, a settings change)."""
    pipe = client.pipeline(transaction=True)
    pipe.sadd(keys.paused(), account_id)
    pipe.zadd(keys.due(), {account_id: "+inf"})
    mapping: dict[str, str] = {"paused": reason, "paused_at": iso_ms(now_ms),
                               "state": AccountState.PAUSED.value, "next_due": ""}
    if account is not None:
        mapping["settings_hash"] = settings_hash(account)
    pipe.hset(keys.health(account_id), mapping=mapping)
    pipe.execute()


def resume(client: Any, account_id: str, *, now_ms: int) -> bool:
    """Poll ``account_id`` at the next sweep, with its failure count reset; False if it was
    not paused (it is still made due now and its backoff reset)."""
    pipe = client.pipeline(transaction=True)
    pipe.srem(keys.paused(), account_id)
    pipe.zadd(keys.due(), {account_id: now_ms})
    pipe.hdel(keys.health(account_id), "paused", "paused_at", "settings_hash")
    pipe.hset(keys.health(account_id), mapping={"consecutive_failures": 0,
                                                "next_due": iso_ms(now_ms)})
    was_paused, *_ = pipe.execute()
    return bool(was_paused)


def resume_if_settings_changed(client: Any, accounts: Iterable[AccountConfig], *,
                               now_ms: int) -> list[str]:
    """Resume auth-paused accounts whose connection settings changed since they were paused."""
    paused = {_text(m) for m in client.smembers(keys.paused())}
    candidates = [a for a in accounts if a.id in paused]
    if not candidates:
        return []
    pipe = client.pipeline(transaction=False)
    for acc in candidates:
        pipe.hmget(keys.health(acc.id), ["paused", "settings_hash"])
    resumed: list[str] = []
    for acc, (reason, stored) in zip(candidates, pipe.execute(), strict=True):
        if reason is not None and _text(reason) == AUTH_FAILED and (
                stored is None or _text(stored) != settings_hash(acc)):
            resume(client, acc.id, now_ms=now_ms)
            resumed.append(acc.id)
    return resumed


def reschedule(client: Any, account_id: str, due_ms: int, *, pipeline: Any = None) -> None:
    """Set the next due time unless the account is paused (a pause always wins).

    EVAL, not a registered script: a registered script queued on a pipeline costs the
    pipeline a SCRIPT EXISTS round trip of its own."""
    (pipeline if pipeline is not None else client).eval(
        _RESCHEDULE, 2, keys.due(), keys.paused(), account_id, due_ms)


def begin_poll(client: Any, account_id: str, lock: AccountLock) -> tuple[bool, int]:
    """One round trip before a poll: is the account paused, take ``lock`` (an
    :class:`~workers.locks.AccountLock`), read its failure count. Returns ``(paused, failures)``;
    ``lock.held`` says whether the lock was taken. A paused account's lock is given back."""
    pipe = client.pipeline(transaction=False)
    pipe.sismember(keys.paused(), account_id)
    pipe.set(lock.key, lock.token, nx=True, px=lock.ttl_ms)
    pipe.hget(keys.health(account_id), "consecutive_failures")
    paused, taken, failures = pipe.execute()
    lock.held = bool(taken)
    if paused and lock.held:
        lock.release()
    return bool(paused), int(failures or 0)


def record_started(client: Any, account_id: str, *, task_id: str | None, now_ms: int) -> None:
    client.hset(keys.health(account_id), mapping={"last_poll_started": iso_ms(now_ms),
                                                  "last_task_id": task_id or ""})


def count_skip(client: Any, account_id: str, reason: str) -> None:
    """Count a task that did not poll: ``skipped_locked`` or ``host_busy``."""
    field = {"locked": "skipped_locked"}.get(reason, reason)
    client.hincrby(keys.health(account_id), field, 1)


def record_poll(client: Any, account_id: str, report: dict[str, Any], *, now_ms: int,
                next_due_ms: int, failed: bool, flagged: bool,
                also: Callable[[Any], None] | None = None) -> int:
    """Store one poll's outcome and next due time atomically; returns the failure count.

    ``also(pipeline)`` may add commands to the same transaction (the poll task releases its
    host slot and account lock there: one round trip for all of it)."""
    key = keys.health(account_id)
    counts = {k: v for k, v in report.items() if k not in ("error", "message_errors")}
    counts["message_errors"] = list(report.get("message_errors", []))[:5]
    pipe = client.pipeline(transaction=True)
    mapping: dict[str, Any] = {"last_poll_ended": iso_ms(now_ms),
                               "last_report": json.dumps(counts),
                               "next_due": iso_ms(next_due_ms)}
    if failed:
        error = dict(report.get("error") or {})
        error["at"] = iso_ms(now_ms)
        mapping["last_error"] = json.dumps(error)
        mapping["state"] = AccountState.FAILING.value
        pipe.hincrby(key, "consecutive_failures", 1)
    else:
        mapping["last_success"] = iso_ms(now_ms)
        mapping["consecutive_failures"] = 0
        mapping["state"] = (AccountState.FLAGGED if flagged else AccountState.OK).value
        if report.get("error"):  # not fatal (LOGIN-DELAY): still worth showing
            error = dict(report["error"])
            error["at"] = iso_ms(now_ms)
            mapping["last_error"] = json.dumps(error)
    archived = int(report.get("new", 0)) + int(report.get("joined", 0))
    pipe.hincrby(key, "messages_archived", archived)
    pipe.hincrby(key, "bytes_fetched", int(report.get("bytes_fetched", 0)))
    pipe.hset(key, mapping=mapping)
    reschedule(client, account_id, next_due_ms, pipeline=pipe)
    if also is not None:
        also(pipe)
    pipe.hget(key, "consecutive_failures")
    *_, failures = pipe.execute()
    return int(failures or 0)


def read_all(client: Any, account_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Health records of ``account_ids`` with their due time and whether a poll holds the lock."""
    pipe = client.pipeline(transaction=False)
    for account_id in account_ids:
        pipe.hgetall(keys.health(account_id))
        pipe.exists(keys.account_lock(account_id))
    replies = pipe.execute()
    due = client.zmscore(keys.due(), account_ids) if account_ids else []
    out: dict[str, dict[str, Any]] = {}
    for i, account_id in enumerate(account_ids):
        raw = {_text(k): _text(v) for k, v in replies[2 * i].items()}
        record: dict[str, Any] = {"account_id": account_id,
                                  "state": raw.get("state", AccountState.NEW.value),
                                  "polling": bool(replies[2 * i + 1])}
        for name in ("consecutive_failures", "messages_archived", "bytes_fetched",
                     "skipped_locked", "host_busy"):
            record[name] = int(raw.get(name, 0))
        for name in ("last_success", "last_poll_started", "last_poll_ended", "paused",
                     "paused_at", "last_task_id"):
            record[name] = raw.get(name) or None
        for name in ("last_error", "last_report"):
            record[name] = json.loads(raw[name]) if raw.get(name) else None
        if record["paused"]:
            record["state"] = AccountState.PAUSED.value
        score = due[i]
        if score is None or score == float("inf"):
            record["next_due"] = None
        else:
            record["next_due"] = iso_ms(score)
        out[account_id] = record
    return out
