"""Sweep cost with many accounts: nothing due, all due, and concurrent sweeps.

    .venv/bin/python -m tests.harness up      # or any Redis
    .venv/bin/python benchmarks/bench_idle_accounts.py --accounts 1000 10000 --db 7

Uses (and flushes) one Redis database; enqueue is a no-op, so this measures the scheduler's
Redis work only (what every sweep costs beat's worker).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import redis

from ingest.config import Config, config_from_dict
from workers import keys
from workers.schedule import ScheduleConfig, sweep

SETTINGS = ScheduleConfig(first_poll_spread_s=0, max_enqueue_per_sweep=1_000_000,
                          max_backlog=1_000_000)
"""No per-sweep cap here: the point is the cost of claiming everything at once."""


def make_config(n: int) -> Config:
    return config_from_dict({
        "broker": {"url": "redis://unused/0"},
        "accounts": [{"id": f"acc{i:06d}", "host": f"pop{i % 50}.example.com",
                      "username": f"u{i}", "password_env": "PW"} for i in range(n)],
    })


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench(r: redis.Redis, url: str, n: int, repeat: int) -> tuple[float, float, float, float]:
    """(first sweep, median nothing-due sweep, median all-due sweep, 4 concurrent sweeps) in ms."""
    r.flushdb()
    config = make_config(n)
    first = timed(lambda: sweep(r, config, SETTINGS, enqueue=lambda _a: None), 1)[0]
    idle = statistics.median(timed(
        lambda: sweep(r, config, SETTINGS, enqueue=lambda _a: None), repeat))

    def all_due() -> None:
        r.zadd(keys.due(), {a.id: 1 for a in config.accounts})

    busy: list[float] = []
    for _ in range(repeat):
        all_due()
        busy += timed(lambda: sweep(r, config, SETTINGS, enqueue=lambda _a: None), 1)
    all_due()
    sent: list[str] = []
    lock = threading.Lock()

    def enqueue(a: str) -> None:
        with lock:
            sent.append(a)

    def one() -> None:
        c = redis.Redis.from_url(url)
        sweep(c, config, SETTINGS, enqueue=enqueue)
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = (time.perf_counter() - t0) * 1000
    assert len(sent) == len(set(sent)) == n, (len(sent), len(set(sent)))
    return first, idle, statistics.median(busy), concurrent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:16379")
    ap.add_argument("--db", type=int, default=7)  # tests lease 8-15
    ap.add_argument("--accounts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    r = redis.Redis.from_url(f"{args.url}/{args.db}")
    print(f"{'accounts':>9} {'first (seed+all due)':>21} {'nothing due':>12} {'all due':>9} "
          f"{'4 concurrent, all due':>22}")
    for n in args.accounts:
        row = bench(r, f"{args.url}/{args.db}", n, args.repeat)
        print(f"{n:>9} {row[0]:>18.1f} ms {row[1]:>9.1f} ms {row[2]:>6.1f} ms "
              f"{row[3]:>19.1f} ms")
    r.flushdb()


if __name__ == "__main__":
    main()
