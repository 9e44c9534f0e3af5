"""Benchmark: many accounts polled by real Celery workers (prefork) against the test Dovecot.

(a) idle sweep: N accounts over implicit TLS with no mail. A worker is started, one
    ``popvault.sweep`` task claims every account (all due now) and enqueues its poll; the clock
    runs until every account's health record has ``last_poll_ended``. Prints seconds,
    accounts/s and the worker tree's peak RSS per ``--concurrency``, and the same accounts
    checked by a naive 8-thread stdlib ``poplib`` loop (TLS verified, USER/PASS, UIDL, QUIT).
(b) N x M new messages (``tests.corpus.generate_mail``, written into Maildirs), fetched by
    workers with each ``--concurrency``: msg/s, MB/s and peak RSS. Each run has fresh
    accounts, archive dir, ES index prefix and Redis db contents.

Not a test: it prints figures. Needs the test stack (``python -m tests.harness up``)::

    .venv/bin/python -m benchmarks.bench_many_accounts --accounts 1000 \\
        --messages-per-account 10 --concurrency 1 4 8

Uses (and flushes) Redis db ``--db`` (6), leased in db 0 like the tests lease theirs; every
Dovecot user, ES index and worker it creates is removed at the end, also on Ctrl-C. The per-host
connection limit is set to the worker's concurrency (``--max-connections`` to override), so
the ``[[hosts]]`` semaphore does not throttle the run. Worker logs are kept under
``/tmp/popvault-bench-logs/<run>``.
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks.bench_poll import make_mailbox
from benchmarks.measure import _tree_rss
from tests import corpus
from tests.harness import dovecot, settings
from tests.integration.support import lease_key, release_lease

REPO = Path(__file__).resolve().parents[1]
PASSWORD_ENV = "BENCH_POP_PASSWORD"
WORKER_READY_TIMEOUT_S = 60
SAMPLE_INTERVAL_S = 0.05
CHECK_INTERVAL_S = 0.25
"""Completion checks ask only about accounts not yet seen done: checking all 1,000 every 0.1 s
cost the machine a tenth of a core that the naive loop (not watched) did not pay."""
SWEEP_EVERY_S = 2.0
LOG_ROOT = Path(os.environ.get("POPVAULT_BENCH_LOG_DIR", "/tmp/popvault-bench-logs"))


@dataclass
class Result:
    label: str
    concurrency: int
    accounts: int
    seconds: float
    peak_rss_bytes: int
    ready_rss_bytes: int
    polled: int
    archived: int = 0
    states: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    host_busy: int = 0
    timed_out: bool = False
    first_s: float | None = None
    """Seconds until the first account was polled (worker warm-up: sink, schema, parser pool)."""

    def steady_rate(self) -> float:
        """Polls/s after the first one ended (warm-up excluded)."""
        if self.first_s is None or self.polled < 2 or self.seconds <= self.first_s:
            return 0.0
        return (self.polled - 1) / (self.seconds - self.first_s)


@dataclass
class Bench:
    s: settings.Settings
    r: redis.Redis
    db: int
    run: str
    work: Path
    logs: Path
    password: str
    users: list[str] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://{self.s.host}:{self.s.redis_port}/{self.db}"

    # -- mailboxes --------------------------------------------------------------------------

    def make_users(self, names: list[str], mail: list[list[bytes]] | None = None) -> None:
        for i, name in enumerate(names):
            self.users.append(name)
            if mail is None:
                dovecot.add_user(self.s, name, self.password)
            else:
                make_mailbox(self.s, name, self.password, mail[i])

    def remove_users(self, names: list[str]) -> None:
        gone = set(names)
        for name in names:
            dovecot.remove_user(self.s, name)
        self.users = [u for u in self.users if u not in gone]

    # -- config and worker ------------------------------------------------------------------

    def write_config(self, names: list[str], prefix: str, concurrency: int,
                     max_connections: int) -> Path:
        n = len(names)
        sched = {"sweep_interval_s": 1, "first_poll_spread_s": 0, "jitter_fraction": 0,
                 "max_enqueue_per_sweep": max(2000, n), "max_backlog": max(10_000, 2 * n),
                 "host_busy_retry_s": 1, "host_busy_max_retries": 200, "lock_ttl_s": 30,
                 "more_pending_delay_s": 1, "task_soft_time_limit_s": 600,
                 "task_time_limit_s": 660, "visibility_timeout_s": 900}
        parts = [
            f'[archive]\npath = "{self.work / prefix / "archive"}"\n',
            f'[elasticsearch]\nurl = "{self.s.es_url}"\nindex_prefix = "{prefix}"\n',
            f'[broker]\nurl = "{self.broker_url}"\n',
            "[parse]\nworkers = 1\n",
            "[schedule]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sched.items()),
            f'[[hosts]]\nhost = "{self.s.host}"\n'
            f"max_connections = {max_connections or max(1, concurrency)}\n",
        ]
        for name in names:
            parts.append(
                f'[[accounts]]\nid = "{name}"\nhost = "{self.s.host}"\n'
                f'port = {self.s.pop3s_port}\nsecurity = "tls"\nca_file = "{self.s.ca_file}"\n'
                f'username = "{name}"\npassword_env = "{PASSWORD_ENV}"\ninterval_s = 3600\n')
        path = self.work / f"{prefix}.toml"
        path.write_text("\n".join(parts))
        return path

    def env(self, config: Path) -> dict[str, str]:
        return {**os.environ, "POPVAULT_CONFIG": str(config), PASSWORD_ENV: self.password,
                "PYTHONPATH": str(REPO)}

    def start_worker(self, config: Path, name: str, concurrency: int,
                     loglevel: str) -> tuple[subprocess.Popen[bytes], Path]:
        logfile = self.logs / f"worker-{name}.log"
        with open(logfile, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "prefork",
                 "--concurrency", str(concurrency), "-Q", "popvault.poll,popvault.sweep",
                 "-n", f"{name}-{self.run}@%h", "--loglevel", loglevel, "--without-gossip",
                 "--without-mingle"],
                cwd=REPO, env=self.env(config), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.workers.append(proc)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"worker {name} exited {proc.returncode}; see {logfile}")
            if b" ready." in logfile.read_bytes():
                return proc, logfile
            time.sleep(0.1)
        raise SystemExit(f"worker {name} not ready in {WORKER_READY_TIMEOUT_S}s; see {logfile}")

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc in self.workers:
            self.workers.remove(proc)

    def drop_indices(self, prefix: str) -> None:
        from elasticsearch import Elasticsearch

        es = Elasticsearch(self.s.es_url, request_timeout=60).options(ignore_status=404)
        try:
            es.indices.delete(index=f"{prefix}*", expand_wildcards="all",
                              ignore_unavailable=True, allow_no_indices=True)
            es.indices.delete_index_template(name=f"{prefix}*")
            es.cluster.delete_component_template(name=f"{prefix}*")
        except Exception as exc:  # best effort: the prefix is unique to this run
            print(f"  warning: dropping ES indices {prefix}*: {exc}", file=sys.stderr)
        finally:
            es.close()
        if prefix in self.prefixes:
            self.prefixes.remove(prefix)

    # -- one measured worker run ------------------------------------------------------------

    def worker_run(self, label: str, names: list[str], concurrency: int, *,
                   max_connections: int, loglevel: str, timeout_s: float) -> Result:
        """Fresh Redis db, prefix and archive; one sweep; wait until every account was polled."""
        from celery import Celery

        self.r.flushdb()
        prefix = f"pvbench-{self.run}-{label}-c{concurrency}".lower()
        self.prefixes.append(prefix)
        config = self.write_config(names, prefix, concurrency, max_connections)
        subprocess.run([sys.executable, "-m", "ingest", "schemas", "install", "-c", str(config)],
                       env=self.env(config), cwd=REPO, check=True, capture_output=True)
        proc, logfile = self.start_worker(config, f"{label}-c{concurrency}", concurrency,
                                          loglevel)
        peak = ready_rss = _tree_rss(proc.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                time.sleep(SAMPLE_INTERVAL_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        client = Celery("popvault-bench", broker=self.broker_url)
        client.conf.update(task_serializer="json", accept_content=["json"])
        keys = [f"popvault:health:{n}" for n in names]
        pending = list(keys)
        timed_out = False
        first_s: float | None = None
        try:
            with client.connection_for_write() as conn:
                t0 = time.monotonic()
                client.send_task("popvault.sweep", queue="popvault.sweep", connection=conn)
                last_sweep = t0
                while True:
                    pipe = self.r.pipeline(transaction=False)
                    for k in pending:
                        pipe.hexists(k, "last_poll_ended")
                    ended = pipe.execute()
                    now = time.monotonic()
                    if first_s is None and any(ended):
                        first_s = now - t0
                    pending = [k for k, e in zip(pending, ended, strict=True) if not e]
                    if not pending:
                        break
                    if now - t0 > timeout_s:
                        timed_out = True
                        break
                    if proc.poll() is not None:
                        raise SystemExit(f"worker died ({proc.returncode}); see {logfile}")
                    if now - last_sweep >= SWEEP_EVERY_S:  # what beat would do
                        client.send_task("popvault.sweep", queue="popvault.sweep",
                                         connection=conn)
                        last_sweep = now
                    time.sleep(CHECK_INTERVAL_S)
                seconds = time.monotonic() - t0
        finally:
            done.set()
            sampler.join()
            self.kill_worker(proc)
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, ["state", "messages_archived", "last_error", "last_poll_ended",
                           "host_busy"])
        result = Result(label, concurrency, len(names), seconds, peak, ready_rss, 0,
                        timed_out=timed_out, first_s=first_s)
        for state, archived, error, ended, busy in pipe.execute():
            result.polled += ended is not None
            result.states[(state or b"new").decode()] += 1
            result.archived += int(archived or 0)
            result.host_busy += int(busy or 0)
            if error and len(result.errors) < 5:
                err = json.loads(error)
                result.errors.append(f"{err.get('stage')}: {err.get('message')}")
        self.drop_indices(prefix)
        shutil.rmtree(self.work / prefix, ignore_errors=True)
        self.r.flushdb()
        if result.errors or timed_out:
            print(f"  see {logfile}", file=sys.stderr)
        return result


# -- the naive peer --------------------------------------------------------------------------

def naive_check(s: settings.Settings, names: list[str], password: str,
                threads: int = 8) -> tuple[float, int]:
    """(seconds, failures) of checking every account with stdlib poplib in ``threads`` threads."""
    ctx = ssl.create_default_context(cafile=str(s.ca_file))

    def one(name: str) -> bool:
        try:
            pop = poplib.POP3_SSL(s.host, s.pop3s_port, context=ctx, timeout=30)
        except OSError:
            return False
        try:
            pop.user(name)
            pop.pass_(password)
            pop.uidl()
            pop.quit()
            return True
        except (OSError, poplib.error_proto):
            with suppress(OSError):
                pop.close()
            return False

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        ok = list(pool.map(one, names))
    return time.monotonic() - t0, ok.count(False)


# -- setup and output ------------------------------------------------------------------------

@contextmanager
def leased_db(s: settings.Settings, db: int, ttl_s: int = 4 * 3600) -> Iterator[redis.Redis]:
    """Redis db ``db``, leased in db 0 with the tests' key so no pytest run flushes it meanwhile."""
    meta = redis.Redis(host=s.host, port=s.redis_port, db=0)
    key, token = lease_key(db), uuid.uuid4().hex
    if not meta.set(key, token, nx=True, ex=ttl_s):
        meta.close()
        raise SystemExit(f"Redis db {db} is leased by someone else ({key}); pass --db N")
    client = redis.Redis(host=s.host, port=s.redis_port, db=db)
    client.flushdb()
    try:
        yield client
    finally:
        with suppress(redis.RedisError):
            client.flushdb()
        client.close()
        release_lease(meta, db, token)
        meta.close()


def mb(n: float) -> str:
    return f"{n / 1e6:6.0f} MB"


def describe(r: Result) -> str:
    extra = ""
    if r.polled < r.accounts:
        extra += f"  ONLY {r.polled}/{r.accounts} polled" + (" (timed out)" if r.timed_out else "")
    bad = {k: v for k, v in r.states.items() if k != "ok"}
    if bad:
        extra += f"  states {dict(r.states)}"
    if r.host_busy:
        extra += f"  host_busy {r.host_busy}"
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--messages-per-account", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--skip-naive", action="store_true", help="no stdlib poplib comparison")
    ap.add_argument("--skip-idle", action="store_true", help="skip part (a)")
    ap.add_argument("--skip-fetch", action="store_true", help="skip part (b)")
    ap.add_argument("--naive-threads", type=int, default=8)
    ap.add_argument("--max-connections", type=int, default=0,
                    help="[[hosts]] max_connections for the Dovecot host (0: = concurrency)")
    ap.add_argument("--db", type=int, default=6, help="Redis db for broker, locks, health")
    ap.add_argument("--loglevel", default="info", help="worker log level")
    ap.add_argument("--timeout", type=float, default=3600, help="per worker run, seconds")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    n, m = args.accounts, args.messages_per_account

    s = settings.load()
    run = uuid.uuid4().hex[:6]
    logs = LOG_ROOT / run
    logs.mkdir(parents=True, exist_ok=True)
    print(f"run {run}: {n} accounts, {m} messages each, concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPUs; worker logs in {logs}", file=sys.stderr)

    with leased_db(s, args.db) as r, \
            tempfile.TemporaryDirectory(prefix="popvault-bench-many-") as tmp:
        b = Bench(s=s, r=r, db=args.db, run=run, work=Path(tmp), logs=logs,
                  password=uuid.uuid4().hex)
        try:
            if not args.skip_idle:
                idle_part(b, args)
            if not args.skip_fetch and m > 0:
                fetch_part(b, args)
        finally:
            for proc in list(b.workers):
                b.kill_worker(proc)
            b.remove_users(list(b.users))
            for prefix in list(b.prefixes):
                b.drop_indices(prefix)


def idle_part(b: Bench, args: argparse.Namespace) -> None:
    n = args.accounts
    names = [f"pvb{b.run}i{i:05d}" for i in range(n)]
    t0 = time.monotonic()
    b.make_users(names)
    print(f"(a) created {n} idle Dovecot users in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    naive: tuple[float, int] | None = None
    if not args.skip_naive:  # first: it also warms Dovecot's auth and the page cache
        naive = naive_check(b.s, names, b.password, args.naive_threads)
    results = []
    for c in args.concurrency:
        print(f"(a) idle sweep, concurrency {c} ...", file=sys.stderr)
        results.append(b.worker_run("idle", names, c, max_connections=args.max_connections,
                                    loglevel=args.loglevel, timeout_s=args.timeout))
    b.remove_users(names)

    print(f"\n(a) idle sweep: {n} accounts over implicit TLS, no mail")
    print(f"  {'':<30} {'seconds':>8} {'accounts/s':>11} {'peak RSS':>9} {'RSS ready':>10}"
          f" {'1st poll s':>10} {'after 1st/s':>11}")
    for res in results:
        print(f"  popvault worker, concurrency {res.concurrency:<2} {res.seconds:8.2f} "
              f"{res.polled / res.seconds:11.1f} {mb(res.peak_rss_bytes):>9} "
              f"{mb(res.ready_rss_bytes):>10} {res.first_s or 0:10.2f} "
              f"{res.steady_rate():11.1f}{describe(res)}")
        for err in res.errors:
            print(f"      error: {err}")
    if naive is not None:
        seconds, failed = naive
        rate = (n - failed) / seconds
        note = f"  ({failed} FAILED)" if failed else ""
        print(f"  {f'naive poplib, {args.naive_threads} threads':<30} {seconds:8.2f} "
              f"{rate:11.1f}{note}")
        for res in results:
            print(f"  ratio popvault c={res.concurrency} ÷ naive (accounts/s): "
                  f"{res.polled / res.seconds / rate:.2f} overall, "
                  f"{res.steady_rate() / rate:.2f} after the first poll")


def fetch_part(b: Bench, args: argparse.Namespace) -> None:
    n, m = args.accounts, args.messages_per_account
    mail = [corpus.generate_mail(args.seed * 1_000_003 + i, m) for i in range(n)]
    served = sum(len(x.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
                 for box in mail for x in box)
    results = []
    for c in args.concurrency:
        names = [f"pvb{b.run}f{c}x{i:05d}" for i in range(n)]
        t0 = time.monotonic()
        b.make_users(names, mail)
        print(f"(b) concurrency {c}: {n} mailboxes x {m} messages written in "
              f"{time.monotonic() - t0:.1f}s ...", file=sys.stderr)
        try:
            results.append(b.worker_run("fetch", names, c, max_connections=args.max_connections,
                                        loglevel=args.loglevel, timeout_s=args.timeout))
        finally:
            b.remove_users(names)

    total = n * m
    print(f"\n(b) fetch: {n} accounts x {m} = {total} new messages, "
          f"{served / 1e6:.1f} MB as served")
    print(f"  {'':<30} {'seconds':>8} {'msg/s':>8} {'MB/s':>6} {'peak RSS':>9} "
          f"{'RSS ready':>10} {'archived':>9} {'1st poll s':>10}")
    for res in results:
        missing = f"  MISSING {total - res.archived}" if res.archived != total else ""
        print(f"  popvault worker, concurrency {res.concurrency:<2} {res.seconds:8.2f} "
              f"{res.archived / res.seconds:8.1f} {served / res.seconds / 1e6:6.2f} "
              f"{mb(res.peak_rss_bytes):>9} {mb(res.ready_rss_bytes):>10} "
              f"{res.archived:>9} {res.first_s or 0:10.2f}{missing}{describe(res)}")
        for err in res.errors:
            print(f"      error: {err}")


if __name__ == "__main__":
    main()
