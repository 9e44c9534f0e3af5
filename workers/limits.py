"""Per-host connection limit (a Redis counting semaphore) and failure backoff.

The semaphore is a ZSET of lease tokens scored by their expiry in Redis server time
(``TIME``), so clock skew between worker machines does not matter. Acquiring first drops
expired leases (their worker died or stalled), then adds ours if fewer than ``limit`` remain;
all in one Lua script, so two workers can never both take the last slot. A lease is renewed by
the same :class:`~workers.locks.Heartbeat` as the account lock and removed on release.
"""

from __future__ import annotations

import random
from typing import Any

from workers import keys
from workers.locks import new_token

DEFAULT_MAX_CONNECTIONS = 4
"""Connections per POP3 host when ``[[hosts]]`` does not name it."""
LEASE_TTL_MS = 60_000
"""How long a slot outlives its last renewal (renewed with the account lock)."""
MAX_BACKOFF_S = 6 * 3600
"""Longest wait between polls of a failing account."""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class HostSlot:
    """One connection slot of ``host``; :meth:`acquire` never waits."""

    def __init__(self, client: Any, host: str, limit: int, *,
                 lease_ms: int = LEASE_TTL_MS, token: str | None = None) -> None:
        self.client = client
        self.host = host
        self.key = keys.host_slots(host)
        self.limit = limit
        self.lease_ms = lease_ms
        self.token = token or new_token()
        self.held = False
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    def __repr__(self) -> str:
        return f"HostSlot(host={self.host!r}, limit={self.limit})"

    def acquire(self) -> bool:
        self.held = bool(self._acquire(keys=[self.key],
                                       args=[self.token, self.limit, self.lease_ms]))
        return self.held

    def renew(self) -> bool:
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.lease_ms]))
        if not ok:
            self.held = False
        return ok

    def release(self) -> None:
        self.client.zrem(self.key, self.token)
        self.held = False

    def release_in(self, pipe: Any) -> None:
        """Queue the release on ``pipe`` (a pipeline the caller executes; it
        clears ``held`` once that succeeded)."""
        pipe.zrem(self.key, self.token)


def in_use(client: Any, host: str) -> int:
    """Live leases of ``host`` (expired ones are not counted)."""
    now_s, now_us = client.time()
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    return int(client.zcount(keys.host_slots(host), f"({now_ms}", "+inf"))


def backoff_s(interval_s: float, failures: int, *, cap_s: float = MAX_BACKOFF_S) -> float:
    """Delay before the next poll after ``failures`` consecutive failures.

    ``min(interval * 2**failures, cap)``, but never shorter than the interval itself.
    """
    if failures <= 0:
        return float(interval_s)
    exponent = min(failures, 32)  # 2**32 * any interval is past every sensible cap
    return float(max(interval_s, min(interval_s * 2**exponent, cap_s)))


def busy_retry_s(base_s: float) -> float:
    """Countdown before retrying a task that found its host full: base ±50 %."""
    return base_s * random.uniform(0.5, 1.5)
