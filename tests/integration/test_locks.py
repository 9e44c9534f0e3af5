"""Redis building blocks of the workers against a real Redis: account lock, heartbeat, host
semaphore, and sweep claims under concurrent sweeps."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ingest.config import Config, config_from_dict
from tests.harness import redisd
from tests.harness.settings import load
from tests.integration.support import leased_db
from workers import health, keys
from workers.limits import HostSlot, in_use
from workers.locks import AccountLock, Heartbeat
from workers.schedule import ScheduleConfig, now_ms, sweep

pytestmark = pytest.mark.integration

@pytest.fixture()
def rurl() -> Iterator[str]:
    s = load()
    redisd.start(s)  # idempotent: reuses a running server
    with leased_db(s.host, s.redis_port) as db:
        yield f"redis://{s.host}:{s.redis_port}/{db}"


@pytest.fixture()
def r(rurl: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(rurl)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# -- account lock ---------------------------------------------------------------------------

def test_lock_is_exclusive_and_release_checks_the_token(r: redis.Redis) -> None:
    a = AccountLock(r, "acc1", ttl_ms=5000)
    b = AccountLock(r, "acc1", ttl_ms=5000)
    assert a.acquire()
    assert not b.acquire()
    assert not b.release()  # not b's lock: must not delete a's
    assert a.holder() == a.token
    assert 0 < r.pttl(keys.account_lock("acc1")) <= 5000
    assert a.release()
    assert a.holder() is None
    assert b.acquire()
    assert AccountLock(r, "acc2").acquire()  # other accounts are independent


def test_expired_lock_goes_to_the_next_worker_and_the_old_holder_cannot_touch_it(
        r: redis.Redis) -> None:
    old = AccountLock(r, "acc", ttl_ms=200)
    assert old.acquire()
    time.sleep(0.35)  # the worker "died": no renewals
    new = AccountLock(r, "acc", ttl_ms=5000)
    assert new.acquire()
    assert not old.renew()
    assert not old.release()
    assert new.holder() == new.token


def test_heartbeat_keeps_a_long_poll_locked(r: redis.Redis) -> None:
    lock = AccountLock(r, "acc", ttl_ms=300)
    assert lock.acquire()
    with Heartbeat([lock], interval_s=0.1) as hb:
        time.sleep(1.2)  # four TTLs
        assert not AccountLock(r, "acc").acquire()
        assert not hb.lost.is_set()
        assert hb.renewals >= 8
    time.sleep(0.45)
    assert AccountLock(r, "acc").acquire()  # renewals stopped: expired


def test_heartbeat_reports_a_lost_lock(r: redis.Redis) -> None:
    lock = AccountLock(r, "acc", ttl_ms=2000)
    assert lock.acquire()
    lost: list[Any] = []
    with Heartbeat([lock], interval_s=0.05, on_lost=lost.append) as hb:
        r.delete(keys.account_lock("acc"))
        assert hb.lost.wait(2)
    assert lost == [lock]


def test_threads_contending_never_overlap(r: redis.Redis, rurl: str) -> None:
    inside = 0
    max_inside = 0
    wins = Counter[int]()
    guard = threading.Lock()

    def worker(n: int) -> None:
        nonlocal inside, max_inside
        client = redis.Redis.from_url(rurl)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            lock = AccountLock(client, "hot", ttl_ms=5000)
            if lock.acquire():
                with guard:
                    inside += 1
                    max_inside = max(max_inside, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1
                wins[n] += 1
                assert lock.release()
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert max_inside == 1
    assert sum(wins.values()) > 50
    print(f"\nlock contention, 8 threads x 1.5 s: {sum(wins.values())} acquisitions, "
          f"{len(wins)} distinct winners, max holders at once {max_inside}")


def _process_contender(url: str, seconds: float) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lock = AccountLock(client, "hot", ttl_ms=5000)
        if lock.acquire():
            # Count holders in Redis itself: any overlap across processes shows up here.
            holders = client.incr("test:holders")
            client.set("test:max", max(int(client.get("test:max") or 0), holders))
            client.incr("test:wins")
            time.sleep(0.001)
            client.decr("test:holders")
            lock.release()


def test_processes_contending_never_overlap(r: redis.Redis, rurl: str) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_contender, args=(rurl, 1.5)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(15)
        assert p.exitcode == 0
    assert int(r.get("test:max") or 0) == 1
    assert int(r.get("test:wins") or 0) > 50


# -- host semaphore -------------------------------------------------------------------------

def test_host_slots_count_up_to_the_limit(r: redis.Redis) -> None:
    slots = [HostSlot(r, "Pop.Example.com", 3) for _ in range(5)]
    got = [s.acquire() for s in slots]
    assert got == [True, True, True, False, False]
    assert in_use(r, "pop.example.com") == 3
    slots[0].release()
    assert slots[3].acquire()
    assert not slots[4].acquire()
    assert HostSlot(r, "other.example.com", 3).acquire()


def test_host_slot_leases_expire_and_renew(r: redis.Redis) -> None:
    a, b = HostSlot(r, "h", 2, lease_ms=200), HostSlot(r, "h", 2, lease_ms=200)
    assert a.acquire() and b.acquire()
    with Heartbeat([a], interval_s=0.05):
        time.sleep(0.35)  # b's worker "died"; a is renewed
    c = HostSlot(r, "h", 2, lease_ms=5000)
    assert c.acquire()  # b's expired lease was dropped
    assert not b.renew()
    assert not HostSlot(r, "h", 2).acquire()  # a (renewed) + c


def test_host_slots_hold_under_thread_contention(r: redis.Redis, rurl: str) -> None:
    inside = 0
    max_inside = 0
    refused = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, max_inside, refused
        client = redis.Redis.from_url(rurl)
        for _ in range(100):
            slot = HostSlot(client, "busy.example.com", 2)
            if slot.acquire():
                with guard:
                    inside += 1
                    max_inside = max(max_inside, inside)
                time.sleep(0.001)
                with guard:
                    inside -= 1
                slot.release()
            else:
                with guard:
                    refused += 1
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert max_inside == 2
    assert refused > 0


# -- sweep ----------------------------------------------------------------------------------

def _accounts_config(n: int, interval_s: int = 300) -> Config:
    return config_from_dict({
        "broker": {"url": "redis://unused/0"},
        "accounts": [{"id": f"acc{i:05d}", "host": f"pop{i % 7}.example.com",
                      "username": f"u{i}", "password_env": "PW", "interval_s": interval_s}
                     for i in range(n)],
    })


NOW_SPREAD = ScheduleConfig(first_poll_spread_s=0, jitter_fraction=0.1)


def test_first_sweep_enqueues_every_account_once_then_nothing(r: redis.Redis) -> None:
    config = _accounts_config(1000)
    sent: list[str] = []
    t0 = time.perf_counter()
    result = sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    first = time.perf_counter() - t0
    assert result.seeded == 1000
    assert sorted(sent) == sorted(a.id for a in config.accounts)
    scores = dict(r.zrange(keys.due(), 0, -1, withscores=True))
    now = now_ms()
    assert all(now + 250_000 < s <= now + 331_000 for s in scores.values())
    t0 = time.perf_counter()
    again = sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    idle = time.perf_counter() - t0
    assert again.claimed == [] and len(sent) == 1000
    print(f"\nsweep 1,000 accounts: all due {first * 1000:.1f} ms, nothing due "
          f"{idle * 1000:.1f} ms")


def test_concurrent_sweeps_enqueue_each_account_once(r: redis.Redis, rurl: str) -> None:
    config = _accounts_config(2000)
    sweep(r, config, NOW_SPREAD, enqueue=lambda _a: None)
    for rnd in range(3):
        # Everything due again, at slightly different past times.
        r.zadd(keys.due(), {a.id: random.randint(1, 10_000) for a in config.accounts})
        sent: list[str] = []
        guard = threading.Lock()
        barrier = threading.Barrier(4)
        results = []

        def one(seed: int, sent: list[str] = sent, barrier: threading.Barrier = barrier,
                results: list[Any] = results, guard: threading.Lock = guard) -> None:
            client = redis.Redis.from_url(rurl)

            def enqueue(account_id: str) -> None:
                with guard:
                    sent.append(account_id)

            barrier.wait()
            results.append(sweep(client, config, NOW_SPREAD, enqueue=enqueue,
                                 rng=random.Random(seed)))
            client.close()

        threads = [threading.Thread(target=one, args=(rnd * 10 + i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        counts = Counter(sent)
        assert len(counts) == 2000, f"round {rnd}: {2000 - len(counts)} accounts not enqueued"
        assert max(counts.values()) == 1, f"round {rnd}: {counts.most_common(3)}"
        assert sum(len(x.claimed) for x in results) == 2000
        print(f"round {rnd}: claims per sweep {[len(x.claimed) for x in results]}, "
              f"lost races {sum(x.lost_races for x in results)}")


def test_paused_accounts_are_not_claimed_until_resumed(r: redis.Redis) -> None:
    config = _accounts_config(3)
    sent: list[str] = []
    health.pause(r, "acc00001", health.OPERATOR, now_ms=now_ms())
    sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    assert sorted(sent) == ["acc00000", "acc00002"]
    assert r.zscore(keys.due(), "acc00001") == float("inf")
    assert health.resume(r, "acc00001", now_ms=now_ms())
    sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    assert sent[-1] == "acc00001" and len(sent) == 3
    assert not health.is_paused(r, "acc00001")


def test_auth_paused_account_resumes_when_its_settings_change(r: redis.Redis) -> None:
    config = _accounts_config(2)
    acc = config.account("acc00000")
    health.pause(r, acc.id, health.AUTH_FAILED, now_ms=now_ms(), account=acc)
    sent: list[str] = []
    sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    assert sent == ["acc00001"]  # same settings: stays paused
    changed = config.with_accounts([config.accounts[0].__class__(
        **{**acc.__dict__, "username": "fixed"}), config.accounts[1]])
    result = sweep(r, changed, NOW_SPREAD, enqueue=sent.append)
    assert result.resumed == ["acc00000"] and sent[-1] == "acc00000"


def test_failed_enqueue_restores_the_due_time(r: redis.Redis) -> None:
    config = _accounts_config(5)
    r.zadd(keys.due(), {a.id: 1000 + i for i, a in enumerate(config.accounts)})

    calls: list[str] = []

    def broken(account_id: str) -> None:
        calls.append(account_id)
        raise ConnectionError("broker down")

    result = sweep(r, config, NOW_SPREAD, enqueue=broken)
    assert result.claimed == [] and result.enqueue_failed == 5
    assert len(calls) == 1  # a down broker is not hammered once per account
    assert r.zscore(keys.due(), "acc00000") == 1000  # still due: the next sweep retries
    sent: list[str] = []
    sweep(r, config, NOW_SPREAD, enqueue=sent.append)
    assert len(sent) == 5


def test_backlog_throttles_claims(r: redis.Redis) -> None:
    config = _accounts_config(10)
    r.rpush("popvault.poll", *[b"x"] * 8)
    sent: list[str] = []
    settings = ScheduleConfig(first_poll_spread_s=0, max_backlog=10)
    result = sweep(r, config, settings, enqueue=sent.append)
    assert len(sent) == 2 and result.backlog == 8
    r.rpush("popvault.poll", *[b"x"] * 8)
    result = sweep(r, config, settings, enqueue=sent.append)
    assert result.throttled and len(sent) == 2


def test_accounts_removed_from_the_config_leave_the_schedule(r: redis.Redis) -> None:
    sweep(r, _accounts_config(10), NOW_SPREAD, enqueue=lambda _a: None)
    result = sweep(r, _accounts_config(4), NOW_SPREAD, enqueue=lambda _a: None)
    assert result.removed == 6 and r.zcard(keys.due()) == 4


def test_reschedule_never_unpauses(r: redis.Redis) -> None:
    health.pause(r, "acc", health.OPERATOR, now_ms=now_ms())
    health.reschedule(r, "acc", 5)
    assert r.zscore(keys.due(), "acc") == float("inf")


def test_batched_sweep_sends_each_due_account_once_in_bounded_batches(r: redis.Redis) -> None:
    config = _accounts_config(1000)
    batches: list[list[str]] = []
    result = sweep(r, config, NOW_SPREAD, enqueue_batch=batches.append)
    sent = [a for b in batches for a in b]
    assert sorted(sent) == sorted(a.id for a in config.accounts) == sorted(result.claimed)
    assert max(len(b) for b in batches) == NOW_SPREAD.poll_batch
    # two claim rounds of 500: each spread over at least 16 tasks
    assert len(batches) >= 2 * 500 // NOW_SPREAD.poll_batch
    assert sweep(r, config, NOW_SPREAD, enqueue_batch=batches.append).claimed == []

    few = _accounts_config(5)
    r.flushdb()
    small: list[list[str]] = []
    sweep(r, few, NOW_SPREAD, enqueue_batch=small.append)
    assert small == [[a.id] for a in few.accounts] or sorted(len(b) for b in small) == [1] * 5


def test_failed_batch_enqueue_restores_every_due_time_of_the_round(r: redis.Redis) -> None:
    config = _accounts_config(40)
    r.zadd(keys.due(), {a.id: 1000 + i for i, a in enumerate(config.accounts)})
    calls: list[list[str]] = []

    def broken(account_ids: list[str]) -> None:
        calls.append(account_ids)
        if len(calls) > 1:
            raise ConnectionError("broker down")

    result = sweep(r, config, NOW_SPREAD, enqueue_batch=broken)
    assert len(calls) == 2  # the first batch went out, the second failed, no third try
    assert sorted(result.claimed) == sorted(calls[0])
    assert result.enqueue_failed == 40 - len(calls[0])
    for i, account in enumerate(config.accounts):
        if account.id not in calls[0]:
            assert r.zscore(keys.due(), account.id) == 1000 + i  # due again next sweep


def test_begin_poll_takes_the_lock_and_reads_state_in_one_go(r: redis.Redis) -> None:
    lock = AccountLock(r, "acc1", ttl_ms=5000)
    r.hset(keys.health("acc1"), "consecutive_failures", 3)
    assert health.begin_poll(r, "acc1", lock) == (False, 3) and lock.held
    other = AccountLock(r, "acc1", ttl_ms=5000)
    assert health.begin_poll(r, "acc1", other) == (False, 3) and not other.held
    assert lock.holder() == lock.token

    health.pause(r, "acc2", health.OPERATOR, now_ms=now_ms())
    paused = AccountLock(r, "acc2", ttl_ms=5000)
    assert health.begin_poll(r, "acc2", paused)[0] is True
    assert paused.holder() is None  # a paused account's lock is given back at once


def test_poll_outcome_slot_and_lock_are_released_in_one_transaction(r: redis.Redis) -> None:
    lock = AccountLock(r, "acc1", ttl_ms=5000)
    assert lock.acquire()
    slot = HostSlot(r, "pop.example.com", 2, lease_ms=5000, token=lock.token)
    assert slot.acquire() and in_use(r, "pop.example.com") == 1
    theirs = AccountLock(r, "acc9", ttl_ms=5000)
    assert theirs.acquire()
    stale = AccountLock(r, "acc9", ttl_ms=5000)  # e.g. a lock that expired and changed hands

    def release(pipe: Any) -> None:
        slot.release_in(pipe)
        lock.release_in(pipe)
        stale.release_in(pipe)  # the token check leaves the new holder's lock alone

    failures = health.record_poll(r, "acc1", {"new": 2}, now_ms=now_ms(), next_due_ms=42,
                                  failed=False, flagged=False, also=release)
    assert failures == 0
    assert lock.holder() is None and in_use(r, "pop.example.com") == 0
    assert r.zscore(keys.due(), "acc1") == 42
    assert health.read_all(r, ["acc1"])["acc1"]["messages_archived"] == 2
    assert theirs.holder() == theirs.token
