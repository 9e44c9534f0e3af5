"""When each account is next polled: worker settings, due times, jitter, and the sweep.

Due times live in one Redis ZSET (:func:`workers.keys.due`): account id scored by the epoch
millisecond it is next due; ``+inf`` means paused. Beat runs :func:`sweep` every few seconds;
it re-derives what is due from the configuration and that ZSET, and *claims* each due account
by moving its due time forward (to now + interval + jitter) in a Lua script that first checks
the score is still the one it read. Two overlapping sweeps therefore enqueue an account at most
once per due time. The queue is never the record of work: a lost task only delays that account
until its next due time, and the task itself sets the real next due time when its poll ends.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ingest.config import AccountConfig, Config
from ingest.errors import ConfigError, LoginDelay, PopvaultError
from workers import health, keys
from workers.limits import DEFAULT_MAX_CONNECTIONS, MAX_BACKOFF_S, backoff_s

log = logging.getLogger("popvault.workers.schedule")

SWEEP_BATCH = 500
"""Due accounts read and claimed per round trip (ZRANGEBYSCORE ... LIMIT)."""
MIN_TASKS_PER_ROUND = 16
"""A claim round is spread over at least this many poll tasks (when it has that many
accounts), so that every worker process gets some of it."""
SEED_CHUNK = 1000
"""Account ids checked per ZMSCORE when looking for accounts that have no due time yet."""
POLL_QUEUE = "popvault.poll"
SWEEP_QUEUE = "popvault.sweep"

_CLAIM = """
local claimed = {}
for i = 1, #ARGV, 3 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    claimed[#claimed + 1] = ARGV[i]
  end
end
return claimed
"""

_UNCLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


# -- settings -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: every tunable of the scheduler, with its unit in the name."""

    sweep_interval_s: float = 10.0
    """Beat sends a sweep this often; also the finest granularity of due times."""
    jitter_fraction: float = 0.1
    """The next due time is ``interval * (1 + uniform(0, jitter_fraction))`` away."""
    first_poll_spread_s: float = 60.0
    """Accounts never seen before are due within ``min(interval, this)``, spread at random."""
    more_pending_delay_s: float = 5.0
    """Next poll after a poll that left messages on the server (capped session)."""
    max_enqueue_per_sweep: int = 2000
    """Claims per sweep; the rest stay due and go to the next sweep."""
    max_backlog: int = 10_000
    """No claims while this many poll tasks wait in the queue (workers are behind)."""
    poll_batch: int = 16
    """Most accounts one poll task checks, one after another: a task's own cost (broker round
    trips, hand-over to a worker process) is paid once for all of them. 1 = a task each."""
    poll_batch_handoff_s: float = 10.0
    """A batch task that has run this long sends its remaining accounts back to the queue as a
    new task, so one busy mailbox delays the others by at most this much."""
    host_busy_retry_s: float = 10.0
    """Countdown (±50 %) before retrying a task whose host had no free connection slot."""
    host_busy_max_retries: int = 30
    """After this many retries the task gives up; the account's next due time still holds."""
    max_backoff_s: float = MAX_BACKOFF_S
    """Cap of the exponential backoff of failing accounts."""
    lock_ttl_s: float = 60.0
    """Account lock and host lease lifetime without renewal (a dead worker's delay)."""
    task_soft_time_limit_s: int = 3600
    """A poll running this long is interrupted (SoftTimeLimitExceeded, no QUIT, no DELE)."""
    task_time_limit_s: int = 3660
    """A poll running this long has its worker process killed; must exceed the soft limit."""
    visibility_timeout_s: int = 4200
    """Redis transport: an unacknowledged task is redelivered after this; must exceed the hard
    limit, or a running poll's task would be delivered twice (the lock would still hold)."""
    beat_schedule_file: str | None = None
    """Where beat keeps its state; ``None`` means a file in the system temp directory."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the workers read from the TOML besides ``ingest.config``: schedule, hosts, metrics."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_connections_by_host: dict[str, int] = field(default_factory=dict)
    default_max_connections: int = DEFAULT_MAX_CONNECTIONS
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"

    def max_connections(self, host: str) -> int:
        return self.max_connections_by_host.get(host.lower(), self.default_max_connections)


def _number(table: dict[str, Any], key: str, where: str, default: float, *,
            integer: bool = False, minimum: float = 0.0) -> Any:
    value = table.get(key, default)
    wrong_type = (isinstance(value, bool) or not isinstance(value, int | float)
                  or (integer and not isinstance(value, int)))
    if wrong_type or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: key {key!r}: expected {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{where}: key {key!r}: must be at least {minimum}, got {value}")
    return int(value) if integer else float(value)


def _table(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def broker_url(config: Config) -> str:
    """``[broker] url``: Celery's broker and the Redis of locks, due times and health."""
    if config.broker is None:
        raise ConfigError(f"{config.path or 'configuration'}: workers need [broker] url = "
                          "\"redis://host:6379/0\"")
    return config.broker.url


def parse_worker_settings(config: Config) -> WorkerSettings:
    """Read ``[schedule]``, ``[[hosts]]`` and ``[metrics]`` from ``config.raw``."""
    where = str(config.path) if config.path else "configuration"
    raw = config.raw
    sch = _table(raw, "schedule", where)
    sw = f"{where}: [schedule]"
    d = ScheduleConfig()
    known = set(ScheduleConfig.__dataclass_fields__)
    for key in sch:
        if key not in known:
            raise ConfigError(f"{sw}: unknown key {key!r} (check the spelling)")
    beat_file = sch.get("beat_schedule_file")
    if beat_file is not None and not isinstance(beat_file, str):
        raise ConfigError(f"{sw}: key 'beat_schedule_file': expected a string")
    schedule = ScheduleConfig(
        sweep_interval_s=_number(sch, "sweep_interval_s", sw, d.sweep_interval_s, minimum=0.1),
        jitter_fraction=_number(sch, "jitter_fraction", sw, d.jitter_fraction),
        first_poll_spread_s=_number(sch, "first_poll_spread_s", sw, d.first_poll_spread_s),
        more_pending_delay_s=_number(sch, "more_pending_delay_s", sw, d.more_pending_delay_s),
        max_enqueue_per_sweep=_number(sch, "max_enqueue_per_sweep", sw,
                                      d.max_enqueue_per_sweep, integer=True, minimum=1),
        max_backlog=_number(sch, "max_backlog", sw, d.max_backlog, integer=True, minimum=1),
        poll_batch=_number(sch, "poll_batch", sw, d.poll_batch, integer=True, minimum=1),
        poll_batch_handoff_s=_number(sch, "poll_batch_handoff_s", sw, d.poll_batch_handoff_s,
                                     minimum=0.1),
        host_busy_retry_s=_number(sch, "host_busy_retry_s", sw, d.host_busy_retry_s,
                                  minimum=0.1),
        host_busy_max_retries=_number(sch, "host_busy_max_retries", sw,
                                      d.host_busy_max_retries, integer=True),
        max_backoff_s=_number(sch, "max_backoff_s", sw, d.max_backoff_s, minimum=1),
        lock_ttl_s=_number(sch, "lock_ttl_s", sw, d.lock_ttl_s, minimum=1),
        task_soft_time_limit_s=_number(sch, "task_soft_time_limit_s", sw,
                                       d.task_soft_time_limit_s, integer=True, minimum=1),
        task_time_limit_s=_number(sch, "task_time_limit_s", sw, d.task_time_limit_s,
                                  integer=True, minimum=1),
        visibility_timeout_s=_number(sch, "visibility_timeout_s", sw, d.visibility_timeout_s,
                                     integer=True, minimum=1),
        beat_schedule_file=beat_file,
    )
    if not schedule.task_soft_time_limit_s < schedule.task_time_limit_s \
            < schedule.visibility_timeout_s:
        raise ConfigError(
            f"{sw}: need task_soft_time_limit_s < task_time_limit_s < visibility_timeout_s, got "
            f"{schedule.task_soft_time_limit_s} / {schedule.task_time_limit_s} / "
            f"{schedule.visibility_timeout_s} (a running poll must never be redelivered)")
    if not schedule.poll_batch_handoff_s < schedule.task_soft_time_limit_s / 2:
        raise ConfigError(
            f"{sw}: poll_batch_handoff_s ({schedule.poll_batch_handoff_s:g}) must be under half "
            f"of task_soft_time_limit_s ({schedule.task_soft_time_limit_s}): a batch's last poll "
            "starts that late and needs the rest of the limit")

    hosts_raw = raw.get("hosts", [])
    if not isinstance(hosts_raw, list):
        raise ConfigError(f"{where}: 'hosts' must be an array of tables ([[hosts]])")
    by_host: dict[str, int] = {}
    for i, entry in enumerate(hosts_raw):
        hw = f"{where}: [[hosts]] entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{hw} must be a table")
        host = entry.get("host")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{hw}: key 'host' is required (a host name)")
        for key in entry:
            if key not in ("host", "max_connections"):
                raise ConfigError(f"{hw}: unknown key {key!r} (check the spelling)")
        if host.lower() in by_host:
            raise ConfigError(f"{hw}: host {host!r} appears twice")
        by_host[host.lower()] = _number(entry, "max_connections", hw, DEFAULT_MAX_CONNECTIONS,
                                        integer=True, minimum=1)

    met = _table(raw, "metrics", where)
    mw = f"{where}: [metrics]"
    for key in met:
        if key not in ("port", "addr"):
            raise ConfigError(f"{mw}: unknown key {key!r} (check the spelling)")
    port = met.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise ConfigError(f"{mw}: key 'port' must be 1-65535, got {port!r}")
    addr = met.get("addr", "0.0.0.0")
    if not isinstance(addr, str):
        raise ConfigError(f"{mw}: key 'addr' must be a string")
    return WorkerSettings(schedule=schedule, max_connections_by_host=by_host,
                          metrics_port=port, metrics_addr=addr)


# -- due times ------------------------------------------------------------------------------

def now_ms() -> int:
    return int(time.time() * 1000)


def jittered_interval_ms(interval_s: float, jitter_fraction: float,
                         rng: random.Random | None = None) -> int:
    """``interval * (1 + uniform(0, jitter))`` in ms: polls drift apart instead of bunching."""
    r = rng or random
    return int(interval_s * 1000 * (1.0 + r.uniform(0.0, jitter_fraction)))


def first_due_ms(now: int, interval_s: float, spread_s: float,
                 rng: random.Random | None = None) -> int:
    """Due time of an account with no due time yet: now, spread over ``min(interval, spread)``."""
    r = rng or random
    return now + int(r.uniform(0.0, min(interval_s, spread_s)) * 1000)


@dataclass(frozen=True)
class NextPoll:
    """When to poll an account next after a poll, and whether that poll counts as a failure."""

    delay_s: float
    failed: bool
    reason: str  # "ok" | "more_pending" | "login_delay" | "backoff"


def next_poll(interval_s: float, error: PopvaultError | None, more_pending: bool,
              failures_before: int, settings: ScheduleConfig,
              rng: random.Random | None = None) -> NextPoll:
    """Decide the next poll from one poll's outcome.

    ``[LOGIN-DELAY]`` waits what the server asked (not a failure); other errors back off
    exponentially (``failures_before + 1`` failures); messages left on the server come back
    soon; otherwise the account's interval plus jitter.
    """
    jitter = jittered_interval_ms(interval_s, settings.jitter_fraction, rng) / 1000 - interval_s
    if isinstance(error, LoginDelay):
        wait = max(float(error.delay_s or 0), settings.more_pending_delay_s,
                   settings.sweep_interval_s)
        return NextPoll(wait, failed=False, reason="login_delay")
    if error is not None:
        wait = backoff_s(interval_s, failures_before + 1, cap_s=settings.max_backoff_s)
        return NextPoll(wait + jitter, failed=True, reason="backoff")
    if more_pending:
        return NextPoll(settings.more_pending_delay_s, failed=False, reason="more_pending")
    return NextPoll(interval_s + jitter, failed=False, reason="ok")


# -- the sweep ------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What one sweep did; logged and kept in :func:`workers.keys.sweep_stats`."""

    configured: int = 0
    seeded: int = 0
    removed: int = 0
    resumed: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    lost_races: int = 0
    enqueue_failed: int = 0
    backlog: int = 0
    throttled: bool = False
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"configured": self.configured, "seeded": self.seeded, "removed": self.removed,
                "resumed": list(self.resumed), "claimed": len(self.claimed),
                "lost_races": self.lost_races, "enqueue_failed": self.enqueue_failed,
                "backlog": self.backlog, "throttled": self.throttled,
                "duration_s": round(self.duration_s, 4)}


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def seed_due(client: Any, accounts: dict[str, AccountConfig], settings: ScheduleConfig,
             now: int, rng: random.Random | None = None) -> tuple[int, int]:
    """Give every configured account without a due time one; drop ids no longer configured.

    Returns ``(seeded, removed)``. ``ZADD NX`` keeps a concurrent sweep's value.
    """
    key = keys.due()
    ids = list(accounts)
    missing: list[str] = []
    for chunk in _chunks(ids, SEED_CHUNK):
        scores = client.zmscore(key, chunk)
        missing += [i for i, s in zip(chunk, scores, strict=True) if s is None]
    if missing:
        pipe = client.pipeline(transaction=False)
        for chunk in _chunks(missing, SEED_CHUNK):
            pipe.zadd(key, {i: first_due_ms(now, accounts[i].interval_s,
                                            settings.first_poll_spread_s, rng)
                            for i in chunk}, nx=True)
        pipe.execute()
    removed = 0
    if client.zcard(key) > len(ids):  # some member is not configured (any more)
        stale = [m for m in map(_text, client.zrange(key, 0, -1)) if m not in accounts]
        for chunk in _chunks(stale, SEED_CHUNK):
            removed += int(client.zrem(key, *chunk))
    return len(missing), removed


def backlog(client: Any, queue: str = POLL_QUEUE) -> int:
    """Poll tasks waiting in the broker (kombu's Redis transport keeps a queue in a LIST)."""
    return int(client.llen(queue))


def batch_size(claimed: int, most: int) -> int:
    """Accounts per poll task for a round of ``claimed``: up to ``most``, but never so many
    that the round makes fewer than :data:`MIN_TASKS_PER_ROUND` tasks."""
    return max(1, min(most, claimed // MIN_TASKS_PER_ROUND))


def sweep(client: Any, config: Config, settings: ScheduleConfig, *,
          enqueue: Callable[[str], None] | None = None,
          enqueue_batch: Callable[[list[str]], None] | None = None,
          now: int | None = None, rng: random.Random | None = None,
          queue: str = POLL_QUEUE) -> SweepResult:
    """Claim every due account and enqueue it once; safe to run concurrently.

    ``enqueue(account_id)`` sends a poll task for one account; ``enqueue_batch(ids)`` (used
    instead when given) one task for several (:func:`batch_size`, ``settings.poll_batch``).
    If it raises, the claims of those accounts and the rest of the round are undone (each
    account's old due time is restored, unless another sweep moved it meanwhile), so a
    broker outage delays nothing beyond the next sweep.
    """
    if enqueue_batch is not None:
        send, most = enqueue_batch, settings.poll_batch
    elif enqueue is not None:
        one = enqueue

        def send(ids: list[str]) -> None:
            one(ids[0])

        most = 1
    else:
        raise TypeError("sweep() needs enqueue or enqueue_batch")
    started = time.monotonic()
    result = SweepResult()
    accounts = {a.id: a for a in config.accounts}
    result.configured = len(accounts)
    now = now_ms() if now is None else now
    result.resumed = health.resume_if_settings_changed(client, accounts.values(), now_ms=now)
    result.seeded, result.removed = seed_due(client, accounts, settings, now, rng)
    result.backlog = backlog(client, queue)
    room = min(settings.max_enqueue_per_sweep, settings.max_backlog - result.backlog)
    if room <= 0:
        result.throttled = True
        log.warning("sweep: %d poll tasks already queued; claiming nothing", result.backlog)
    claim = client.register_script(_CLAIM)
    unclaim = client.register_script(_UNCLAIM)
    key = keys.due()
    offset = 0
    while room > 0:
        rows = client.zrangebyscore(key, "-inf", now, start=offset,
                                    num=min(SWEEP_BATCH, room), withscores=True)
        if not rows:
            break
        args: list[str | int] = []
        planned: dict[str, tuple[int, int]] = {}
        for member, score in rows:
            account_id = _text(member)
            acc = accounts.get(account_id)
            if acc is None:  # configured away since seed_due: leave it to the next sweep
                offset += 1
                continue
            new = now + jittered_interval_ms(acc.interval_s, settings.jitter_fraction, rng)
            planned[account_id] = (int(score), new)
            args += [account_id, int(score), new]
        won = [_text(m) for m in claim(keys=[key], args=args)] if args else []
        result.lost_races += len(planned) - len(won)
        size = batch_size(len(won), most)
        for start in range(0, len(won), size):
            chunk = won[start:start + size]
            if not result.enqueue_failed:
                try:
                    send(chunk)
                except Exception as exc:
                    log.error("sweep: could not enqueue account_id=%s (%s); returning the "
                              "rest of this batch to the schedule", ",".join(chunk),
                              type(exc).__name__)
                else:
                    result.claimed += chunk
                    continue
            for account_id in chunk:  # the broker is down: undo, don't keep trying
                old, new = planned[account_id]
                unclaim(keys=[key], args=[account_id, new, old])
                result.enqueue_failed += 1
        room -= len(won)
        if len(rows) < SWEEP_BATCH or result.enqueue_failed:
            break
    result.duration_s = time.monotonic() - started
    client.hset(keys.sweep_stats(), mapping={
        "at_ms": now, "claimed": len(result.claimed), "configured": result.configured,
        "backlog": result.backlog, "duration_s": f"{result.duration_s:.4f}",
        "throttled": int(result.throttled)})
    return result
