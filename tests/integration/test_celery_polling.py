"""Scheduled polling end to end: real Dovecot, Redis, Elasticsearch and Celery worker processes.

Nothing is mocked. Sweeps are sent to the worker as ``popvault.sweep`` tasks (what beat does);
the worker runs as a separate ``celery -A workers worker --pool prefork`` process tree that
the fixtures always kill. Dovecot's log shows every login, so "each account polled exactly
once" is checked on the server's side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness import dovecot, elastic, redisd
from tests.harness.proc import is_root
from tests.harness.settings import Settings, load
from tests.integration.support import REPO, leased_db, make_mail, start_celery

pytestmark = pytest.mark.integration

WORKER_START_TIMEOUT_S = 60


# -- stack, mailboxes, config ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hs() -> Settings:
    s = load()
    redisd.start(s)
    dovecot.start(s)
    elastic.start(s)
    return s


@dataclass
class Box:
    """A Dovecot user with a Maildir we deliver into directly."""

    s: Settings
    username: str
    password: str
    delivered: list[str] = field(default_factory=list)  # Message-IDs

    @property
    def maildir(self) -> Path:
        return dovecot.user_maildir(self.s, self.username)

    def deliver(self, raws: list[tuple[str, bytes]]) -> None:
        uid, gid = dovecot.mail_ids()
        for msgid, raw in raws:
            name = f"{time.time_ns()}.{uuid.uuid4().hex}.popvault-test"
            tmp = self.maildir / "tmp" / name
            tmp.write_bytes(raw)
            if is_root():
                os.chown(tmp, uid, gid)
            os.replace(tmp, self.maildir / "new" / name)
            self.delivered.append(msgid)

    def message_ids(self) -> set[str]:
        """Message-IDs still on the server."""
        out = set()
        for sub in ("new", "cur"):
            for p in (self.maildir / sub).iterdir():
                m = re.search(rb"^Message-ID: (<[^>]+>)", p.read_bytes(), re.M | re.I)
                if m:
                    out.add(m.group(1).decode())
        return out

    def count(self) -> int:
        return sum(len(list((self.maildir / sub).iterdir())) for sub in ("new", "cur"))


@dataclass
class Env:
    s: Settings
    dir: Path
    run: str
    redis: redis.Redis
    db: int
    boxes: list[Box] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    config_path: Path | None = None
    logs: Path = Path("/tmp")

    @property
    def prefix(self) -> str:
        return f"pvw{self.run}"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.s.host}:{self.s.redis_port}/{self.db}"

    def mailbox(self) -> Box:
        name = f"pvw{self.run}-{len(self.boxes)}"
        password = f"pw-{uuid.uuid4().hex[:12]}"
        dovecot.add_user(self.s, name, password)
        box = Box(self.s, name, password)
        self.boxes.append(box)
        return box

    def account(self, box: Box, **overrides: Any) -> dict[str, Any]:
        pw = self.dir / "secrets" / box.username
        pw.parent.mkdir(exist_ok=True)
        pw.write_text(box.password)
        pw.chmod(0o600)
        return {"id": box.username, "host": "localhost", "port": self.s.pop3s_port,
                "security": "tls", "ca_file": str(self.s.ca_file), "username": box.username,
                "password_file": str(pw), "interval_s": 3600, **overrides}

    def write_config(self, accounts: list[dict[str, Any]], schedule: dict[str, Any] | None = None,
                     hosts: list[dict[str, Any]] | None = None) -> Path:
        sched = {"sweep_interval_s": 1, "first_poll_spread_s": 0, "jitter_fraction": 0.1,
                 "host_busy_retry_s": 1, "host_busy_max_retries": 200, "lock_ttl_s": 6,
                 "more_pending_delay_s": 1, "task_soft_time_limit_s": 300,
                 "task_time_limit_s": 330, "visibility_timeout_s": 600, **(schedule or {})}
        lines = [
            f'[archive]\npath = "{self.dir / "archive"}"\n',
            f'[elasticsearch]\nurl = "{self.s.es_url}"\nindex_prefix = "{self.prefix}"\n',
            f'[broker]\nurl = "{self.broker_url}"\n',
            "[parse]\nworkers = 1\n",
            "[schedule]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sched.items()),
        ]
        for h in hosts or []:
            lines.append("[[hosts]]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                 for k, v in h.items()))
        for acc in accounts:
            lines.append("[[accounts]]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                    for k, v in acc.items()))
        path = self.dir / "popvault.toml"
        path.write_text("\n".join(lines))
        self.config_path = path
        return path

    # -- workers ----------------------------------------------------------------------------

    def start_worker(self, name: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
        assert self.config_path is not None
        env = {**os.environ, "POPVAULT_CONFIG": str(self.config_path), "PYTHONPATH": str(REPO)}
        return start_celery(
            ["-A", "workers", "worker", "--pool", "prefork", "--concurrency", str(concurrency),
             "-Q", "popvault.poll,popvault.sweep"],
            node=f"{name}-{self.run}@%h", what=f"worker {name}", env=env,
            logfile=self.logs / f"worker-{name}.log", timeout_s=WORKER_START_TIMEOUT_S,
            procs=self.workers)

    def kill_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def send_sweeps(self, n: int = 1) -> None:
        from celery import Celery

        client = Celery("popvault-test", broker=self.broker_url)
        client.conf.update(task_serializer="json", accept_content=["json"])
        with client.connection_for_write() as conn:
            for _ in range(n):
                client.send_task("popvault.sweep", queue="popvault.sweep", connection=conn)

    def health(self, account_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(f"popvault:health:{account_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str,
                   sweep_every_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for box in self.boxes:
                error = self.health(box.username).get("last_error", "")
                if '"stage": "internal"' in error:
                    pytest.fail(f"{box.username}: {error}; logs in {self.logs}")
            self.send_sweeps()
            time.sleep(sweep_every_s)
        errors = [line for p in self.logs.glob("worker-*.log")
                  for line in p.read_text(errors="replace").splitlines()
                  if "ERROR" in line or "WARNING" in line][-30:]
        pytest.fail(f"timed out after {timeout}s waiting for {what}; logs in {self.logs}\n"
                    + "\n".join(errors))

    def status_json(self) -> dict[str, Any]:
        import typer
        from typer.testing import CliRunner

        from workers.commands import register

        app = typer.Typer()
        accounts_app = typer.Typer()
        app.add_typer(accounts_app, name="accounts")
        register(app, accounts_app)
        result = CliRunner().invoke(app, ["status", "--json", "--config", str(self.config_path)])
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def es_count(self) -> int:
        from elasticsearch import Elasticsearch

        es = Elasticsearch(self.s.es_url)
        try:
            es.indices.refresh(index=f"{self.prefix}-*", allow_no_indices=True)
            if not es.indices.exists_alias(name=f"{self.prefix}-messages"):
                return 0
            return int(es.count(index=f"{self.prefix}-messages")["count"])
        finally:
            es.close()

    def es_message_ids(self) -> set[str]:
        from elasticsearch import Elasticsearch

        es = Elasticsearch(self.s.es_url)
        try:
            es.indices.refresh(index=f"{self.prefix}-*", allow_no_indices=True)
            if not es.indices.exists_alias(name=f"{self.prefix}-messages"):
                return set()
            hits = es.search(index=f"{self.prefix}-messages", size=10_000,
                             source=["email.message_id"], query={"match_all": {}})
            out = set()
            for h in hits["hits"]["hits"]:
                mid = h["_source"].get("email", {}).get("message_id")
                if mid:
                    out.add(mid if mid.startswith("<") else f"<{mid}>")
            return out
        finally:
            es.close()

    def logins(self) -> Counter[str]:
        text = self.s.dovecot_log.read_text(errors="replace")
        return Counter(re.findall(rf"Login: user=<(pvw{self.run}-\d+)>", text))


@pytest.fixture()
def env(hs: Settings, tmp_path: Path) -> Iterator[Env]:
    with leased_db(hs.host, hs.redis_port) as db:
        client = redis.Redis(host=hs.host, port=hs.redis_port, db=db)
        client.flushdb()
        run = uuid.uuid4().hex[:8]
        # Worker logs outlive pytest's tmp_path rotation (other runs share the machine).
        logs = Path(os.environ.get("POPVAULT_TEST_LOG_DIR", "/tmp/popvault-test-logs")) / run
        logs.mkdir(parents=True, exist_ok=True)
        e = Env(s=hs, dir=tmp_path, run=run, redis=client, db=db, logs=logs)
        try:
            yield e
        finally:
            for proc in e.workers:
                e.kill_worker(proc)
            client.flushdb()
            client.close()
            for box in e.boxes:
                dovecot.remove_user(hs, box.username)
            _drop_indices(hs, e.prefix)


def _drop_indices(s: Settings, prefix: str) -> None:
    from elasticsearch import Elasticsearch

    es = Elasticsearch(s.es_url)
    try:
        for name in es.indices.get(index=f"{prefix}-*", allow_no_indices=True):
            es.indices.delete(index=name, ignore_unavailable=True)
        for t in es.indices.get_index_template(name=f"{prefix}*").get("index_templates", []):
            es.indices.delete_index_template(name=t["name"])
    except Exception:  # cleanup is best effort; names are unique per run
        pass
    finally:
        es.close()


# -- tests ----------------------------------------------------------------------------------

@pytest.mark.timeout(420)
def test_many_accounts_polled_once_each_failures_isolated(env: Env) -> None:
    """52 accounts: 50 good with mail, one wrong password, one closed port.

    Overlapping sweeps (3 at once, every second) and a host limit of 3 connections: every
    good message archived once, one login per good account, failing ones paused / backing off.
    """
    accounts = []
    total = 0
    for i in range(50):
        box = env.mailbox()
        box.deliver([make_mail(box.username, j) for j in range(2 + i % 5)])
        total += len(box.delivered)
        accounts.append(env.account(box))
    bad_pw = env.mailbox()
    bad_pw.deliver([make_mail(bad_pw.username, 0)])
    acc = env.account(bad_pw)
    Path(acc["password_file"]).write_text("wrong-password")
    accounts.append(acc)
    closed = env.mailbox()
    accounts.append({**env.account(closed), "id": "closed-port", "port": 1,
                     "connect_timeout_s": 5.0})
    # Batches of 3 (52 due // 16 tasks per round); a batch hands its rest back after 0.1 s,
    # which the first poll with mail in each process (it starts the parser) always exceeds.
    env.write_config(accounts, hosts=[{"host": "localhost", "max_connections": 3}],
                     schedule={"poll_batch": 16, "poll_batch_handoff_s": 0.1})
    env.start_worker("w1", concurrency=4)

    good = [b.username for b in env.boxes[:50]]
    t0 = time.monotonic()
    env.send_sweeps(3)
    env.wait_until(lambda: all(env.health(a).get("last_success") for a in good), 240,
                   "all 50 good accounts to succeed")
    elapsed = time.monotonic() - t0
    env.send_sweeps(3)  # more overlapping sweeps: nothing is due, nothing polled again
    time.sleep(3)

    assert env.es_count() == total
    logins = env.logins()
    assert all(logins[a] == 1 for a in good), {a: logins[a] for a in good if logins[a] != 1}

    data = env.status_json()
    by_id = {r["account_id"]: r for r in data["accounts"]}
    assert len(by_id) == 52
    for a, box in zip(good, env.boxes[:50], strict=True):
        rec = by_id[a]
        assert rec["state"] == "ok", rec
        assert rec["consecutive_failures"] == 0
        assert rec["messages_archived"] == len(box.delivered)
        assert rec["last_report"]["new"] == len(box.delivered)
    auth = by_id[bad_pw.username]
    assert auth["state"] == "paused" and auth["paused"] == "auth_failed", auth
    assert auth["last_error"]["stage"] == "auth"
    assert "wrong-password" not in json.dumps(auth)
    port = by_id["closed-port"]
    assert port["state"] == "failing" and port["consecutive_failures"] >= 1, port
    assert port["last_error"]["stage"] == "connect"
    due = env.redis.zscore("popvault:due", "closed-port")
    assert due is not None and due > (time.time() + 3600 * 1.5) * 1000  # backed off: 2x
    assert env.redis.zscore("popvault:due", bad_pw.username) == float("inf")
    # Host limit honoured: the semaphore turned tasks away at least sometimes, never broke.
    busy = sum(r["host_busy"] for r in data["accounts"])
    log = (env.logs / "worker-w1.log").read_text(errors="replace")
    assert "popvault.poll_accounts" in log, "no batch task ran"
    handoffs = log.count("back to the queue after")
    assert handoffs >= 1, "no batch handed its remaining accounts on"
    print(f"\n50 accounts / {total} messages archived in {elapsed:.1f}s with 4 processes; "
          f"host-busy retries {busy}, batch hand-offs {handoffs}")


@pytest.mark.timeout(420)
def test_sigkill_mid_poll_loses_and_duplicates_nothing(env: Env) -> None:
    """on_archived = delete; the worker tree is SIGKILLed while polls run; a new worker
    finishes: every message archived exactly once, and only archived messages left the server."""
    accounts = []
    total = 0
    for _ in range(12):
        box = env.mailbox()
        box.deliver([make_mail(box.username, j, pad_bytes=40_000) for j in range(40)])
        total += len(box.delivered)
        # Small sessions: many DELE/QUIT points, so the kill lands between and inside them.
        accounts.append(env.account(box, on_archived="delete", interval_s=5,
                                    max_messages_per_session=10))
    env.write_config(accounts, schedule={"lock_ttl_s": 3})
    w1 = env.start_worker("w1", concurrency=4)
    env.send_sweeps(2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and env.es_count() < total // 4:
        time.sleep(0.05)
    env.kill_worker(w1)  # SIGKILL the whole process tree, mid-poll
    archived_at_kill = env.es_count()
    assert 0 < archived_at_kill < total, "kill did not land mid-run; make the corpus larger"

    in_es = env.es_message_ids()
    for box in env.boxes:
        gone = set(box.delivered) - box.message_ids()
        assert gone <= in_es, f"{box.username}: deleted without being archived: {gone - in_es}"

    env.start_worker("w2", concurrency=4)
    env.wait_until(lambda: all(b.count() == 0 for b in env.boxes), 240,
                   "every mailbox to be emptied", sweep_every_s=1.0)
    assert env.es_count() == total
    assert env.es_message_ids() == {m for b in env.boxes for m in b.delivered}
    print(f"\nkilled with {archived_at_kill}/{total} archived; finished with {total}, "
          "no duplicates, nothing lost")
