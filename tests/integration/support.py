"""Helpers shared by the integration tests (and the benchmarks): Redis db leases, Celery
worker processes in their own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]

LEASE_DBS = range(8, 16)
"""Redis databases these tests lease, one per test, so concurrent pytest runs on one
machine (several engineers, one harness) never flush each other's queues and keys."""


def lease_key(db: int) -> str:
    """The key in db 0 whose holder owns Redis db ``db`` (tests, fixtures, benchmarks)."""
    return f"popvault-test:db-lease:{db}"


def release_lease(meta: redis.Redis, db: int, token: str) -> None:
    """Drop the lease on ``db`` if it is still ours (it may have expired and been re-taken)."""
    if meta.get(lease_key(db)) == token.encode():
        meta.delete(lease_key(db))


@contextmanager
def leased_db(host: str, port: int, ttl_s: int = 900) -> Iterator[int]:
    """A free db of ``LEASE_DBS``, waiting up to 120 s for one."""
    meta = redis.Redis(host=host, port=port, db=0)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 120
    try:
        while True:
            for n in LEASE_DBS:
                if meta.set(lease_key(n), token, nx=True, ex=ttl_s):
                    try:
                        yield n
                    finally:
                        release_lease(meta, n, token)
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("no free Redis test database (8-15) for 120 s")
            time.sleep(0.5)
    finally:
        meta.close()


def start_celery(args: list[str], *, node: str, what: str, env: dict[str, str],
                 logfile: Path, timeout_s: float,
                 procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start ``celery <args>`` (node name ``node``) from the repo root in a process group of
    its own, output appended to ``logfile``, and add it to ``procs`` (for teardown to kill,
    ready or not); return once it logs " ready.", else fail the test with the log."""
    log = open(logfile, "ab")  # noqa: SIM115 - the process owns it until killed
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *args, "-n", node, "--loglevel", "info",
         "--without-gossip", "--without-mingle"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{logfile.read_text()}")
        if b" ready." in logfile.read_bytes():
            return proc
        time.sleep(0.2)
    pytest.fail(f"{what} not ready in {timeout_s}s:\n{logfile.read_text()[-4000:]}")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it leads one: ``start_new_session``) and reap it."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def make_mail(tag: str, i: int, pad_bytes: int = 0, *,
              domain: str = "popvault.test") -> tuple[str, bytes]:
    """A small distinct message (Message-ID, bytes), padded to about ``pad_bytes``."""
    from email.message import EmailMessage
    from email.utils import formatdate

    msgid = f"<{tag}.{i}@{domain}>"
    msg = EmailMessage()
    msg["From"] = f"Sender {i} <sender{i}@example.org>"
    msg["To"] = f"{tag}@example.com"
    msg["Subject"] = f"{tag} message {i}"
    msg["Date"] = formatdate(1_700_000_000 + i * 60)
    msg["Message-ID"] = msgid
    msg.set_content(f"Hello {tag} {i}.\n" + ("padding line of text\n" * (pad_bytes // 21)))
    return msgid, msg.as_bytes()


def run_cli(*args: str, config: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``popvault ARGS`` as a user would (a subprocess), with POPVAULT_CONFIG set."""
    env = {**os.environ, "POPVAULT_CONFIG": str(config)}
    return subprocess.run([sys.executable, "-m", "ingest", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
