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
