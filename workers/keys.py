"""Every Redis key popvault's workers use is built here, one function each.

All keys share :data:`PREFIX` so one Redis can serve other applications (and ``SCAN`` for
``popvault:*`` shows everything). Account ids are validated by ``ingest.config``
(``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``), so they never contain ``:`` and need no escaping;
host names are lower-cased so ``POP.example.com`` and ``pop.example.com`` share one limit.
"""

from __future__ import annotations

PREFIX = "popvault"


def due() -> str:
    """ZSET: account_id scored by the epoch millisecond it is next due (``+inf`` = paused)."""
    return f"{PREFIX}:due"


def paused() -> str:
    """SET: ids of paused accounts (the reason lives in the account's health hash)."""
    return f"{PREFIX}:paused"


def account_lock(account_id: str) -> str:
    """STRING: the token of the worker polling ``account_id``; expires unless renewed."""
    return f"{PREFIX}:lock:account:{account_id}"


def host_slots(host: str) -> str:
    """ZSET: connection lease tokens for ``host`` scored by their expiry (epoch ms)."""
    return f"{PREFIX}:slots:host:{host.lower()}"


def health(account_id: str) -> str:
    """HASH: the account's health record (see :mod:`workers.health`)."""
    return f"{PREFIX}:health:{account_id}"


def sweep_stats() -> str:
    """HASH: figures from the most recent sweep (for ``popvault status``)."""
    return f"{PREFIX}:sweep:last"


def events_lock() -> str:
    """STRING: the token of the one running ticket-event dispatcher; expires unless renewed."""
    return f"{PREFIX}:events:lock"


def events_mark() -> str:
    """HASH: account_id -> epoch ms high-water mark of ``popvault.first_archived`` below which
    every event of that account is delivered or dead-lettered (see :mod:`workers.events`)."""
    return f"{PREFIX}:events:mark"


def events_done(account_id: str, channel: str) -> str:
    """ZSET: message keys whose event on ``channel`` is finished (delivered or dead-lettered),
    scored by ``first_archived`` epoch ms; pruned below mark - safety window."""
    return f"{PREFIX}:events:done:{account_id}:{channel}"


def events_attempts(account_id: str, channel: str) -> str:
    """HASH: message_key -> JSON ``{attempts, next_at_ms, last_error, first_archived_ms}`` of
    events that failed at least once and are not finished yet."""
    return f"{PREFIX}:events:attempts:{account_id}:{channel}"


def events_dead() -> str:
    """HASH: ``account_id:channel:message_key`` -> JSON dead letter (event, attempts, error);
    kept until an operator removes it."""
    return f"{PREFIX}:events:dead"


def events_stats() -> str:
    """HASH: figures from the most recent dispatcher run (for status and tests)."""
    return f"{PREFIX}:events:last"


def events_seen(event_id: str) -> str:
    """STRING with TTL: set by :func:`workers.events.consume` once an event was handled, so a
    consumer drops the redelivered copies of at-least-once delivery."""
    return f"{PREFIX}:events:seen:{event_id}"
