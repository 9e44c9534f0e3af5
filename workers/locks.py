"""Per-account lock in Redis: one poll of an account at a time, across all workers.

``SET key token NX PX ttl`` takes the lock; only the holder of ``token`` can renew or release
it (both are Lua scripts that compare the token first, so a worker whose lock expired can
never delete its successor's). A :class:`Heartbeat` thread renews the lock while a poll runs;
if the worker dies, renewals stop and the lock expires after ``ttl_ms``. A task redelivered by
the broker (visibility timeout, lost worker) therefore finds the lock held while the first
poll still runs, and takes it only once that poll has ended or died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from workers import keys

log = logging.getLogger("popvault.workers.locks")

LOCK_TTL_MS = 60_000
"""How long a lock outlives its last renewal: the delay before a dead worker's account is
polled again. Renewals happen every third of it, so two missed renewals are tolerated."""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_token() -> str:
    """A unique lock token that also says who holds it (host, pid) for ``redis-cli GET``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


class AccountLock:
    """The lock of one account; use :meth:`acquire` / :meth:`release` or ``with``."""

    def __init__(self, client: Any, account_id: str, *, ttl_ms: int = LOCK_TTL_MS,
                 token: str | None = None) -> None:
        self.client = client
        self.account_id = account_id
        self.key = keys.account_lock(account_id)
        self.ttl_ms = ttl_ms
        self.token = token or new_token()
        self.held = False
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits."""
        self.held = bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        return self.held

    def renew(self) -> bool:
        """Push the expiry out by ``ttl_ms``; False if the lock is no longer ours."""
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not ok:
            self.held = False
        return ok

    def release(self) -> bool:
        """Delete the lock if it is still ours; False if it expired or changed hands."""
        was_ours = bool(self._release(keys=[self.key], args=[self.token]))
        self.held = False
        return was_ours

    def release_in(self, pipe: Any) -> None:
        """Queue the token-checked release on ``pipe`` (a pipeline the caller executes; it
        clears ``held`` once that succeeded)."""
        pipe.eval(_RELEASE, 1, self.key, self.token)

    def holder(self) -> str | None:
        """The token of whoever holds the lock now (for status and tests)."""
        value = self.client.get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def __enter__(self) -> AccountLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held:
            self.release()


class Renewable(Protocol):
    def renew(self) -> bool: ...


class Heartbeat:
    """A daemon thread that renews leases every ``interval_s`` until stopped.

    ``lost`` is set when a renewal reports the lease is gone (it expired: the worker stalled
    longer than the TTL). A Redis outage is logged and retried; the lease expires on its own
    if the outage outlasts it, which is then reported as lost.
    """

    def __init__(self, leases: list[Renewable], interval_s: float, *,
                 on_lost: Callable[[Renewable], None] | None = None) -> None:
        self.leases = leases
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popvault-heartbeat",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for lease in self.leases:
                try:
                    ok = lease.renew()
                except Exception as exc:  # a Redis hiccup must not kill the heartbeat
                    log.warning("lease renewal failed: %s", type(exc).__name__)
                    continue
                self.renewals += 1
                if not ok and not self.lost.is_set():
                    self.lost.set()
                    log.error("lease lost before the poll ended: %r", lease)
                    if self.on_lost:
                        self.on_lost(lease)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
