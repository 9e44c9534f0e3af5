"""Ticket events end to end: real Dovecot accounts polled by ``python -m ingest poll``, a real
Elasticsearch index, the dispatcher in a real Celery worker process, a real Celery consumer
worker (:mod:`tests.integration.events_consumer`) and a real HTTP receiver that checks every
signature. The dispatcher worker is SIGKILLed mid-run and replaced; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ingest.events import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from tests.harness.mailbox import Mailbox
from tests.harness.stack import Stack
from tests.integration.support import REPO, kill_group, start_celery

pytestmark = pytest.mark.integration

SECRET_ENV = "POPVAULT_TEST_EVENTS_SECRET"
WORKER_START_TIMEOUT_S = 60
DISPATCH_TASK = "popvault.events.dispatch"
EVENTS_QUEUE = "popvault.events"
TICKETS_QUEUE = "tickets"


# -- the webhook receiver -------------------------------------------------------------------

@dataclass
class Delivery:
    event_id: str
    signature_ok: bool
    status: int
    event: dict[str, Any]


@dataclass
class Receiver:
    """``http.server`` on 127.0.0.1 in a thread: verifies signatures, can fail on purpose."""

    secret: str
    fail_first: int = 0
    always_fail: bool = False
    delay_s: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = verify_signature(receiver.secret, body, self.headers.get(SIGNATURE_HEADER))
                event = json.loads(body)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver.lock:
                    failing = receiver.always_fail or receiver.fail_first > 0
                    if receiver.fail_first > 0:
                        receiver.fail_first -= 1
                    status = 500 if failing else (204 if ok else 401)
                    receiver.deliveries.append(Delivery(
                        self.headers.get(EVENT_ID_HEADER, ""), ok, status, event))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def ok(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.status == 204]

    def all(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# -- mail -----------------------------------------------------------------------------------

def human(tag: str, i: int) -> tuple[str, bytes]:
    msgid = f"<{tag}.{i}.{uuid.uuid4().hex[:6]}@customer.example>"
    msg = EmailMessage()
    msg["From"] = f"Customer {i} <customer{i}@customer.example>"
    msg["To"] = "support@popvault.test"
    msg["Subject"] = f"Help with order {i} ({tag})"  # distinct threads per tag
    msg["Date"] = formatdate(1_770_000_000 + i * 60)
    msg["Message-ID"] = msgid
    msg.set_content(f"Hello,\norder {i} never arrived.\n")
    return msgid, msg.as_bytes()


def auto_reply(tag: str) -> tuple[str, bytes]:
    msgid = f"<{tag}.ooo@customer.example>"
    msg = EmailMessage()
    msg["From"] = "Dana <dana@customer.example>"
    msg["To"] = "support@popvault.test"
    msg["Subject"] = "Automatic reply: Your ticket"
    msg["Date"] = formatdate(1_770_000_000)
    msg["Message-ID"] = msgid
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content("I am out of the office until Monday.\n")
    return msgid, msg.as_bytes()


def bounce(tag: str) -> tuple[str, bytes]:
    msgid = f"<{tag}.dsn@mx.popvault.test>"
    raw = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.popvault.test>\r\n"
        "To: support@popvault.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {formatdate(1_770_000_000)}\r\n"
        f"Message-ID: {msgid}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B0UND"\r\n'
        "\r\n"
        "--B0UND\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "--B0UND\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.popvault.test\r\n\r\n"
        "Final-Recipient: rfc822; nobody@customer.example\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
        "--B0UND\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        "From: support@popvault.test\r\n"
        "To: nobody@customer.example\r\n"
        "Subject: Your ticket\r\n\r\n"
        "--B0UND--\r\n"
    )
    return msgid, raw.encode()


# -- the environment ------------------------------------------------------------------------

@dataclass
class EventsEnv:
    stack: Stack
    redis: Any
    broker_url: str
    es_prefix: str | None
    write_config: Callable[..., Path]
    logs: Path
    run: str
    receiver: Receiver
    config_path: Path | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def configure(self, accounts: list[dict[str, Any]], **events: Any) -> Path:
        table = {"webhook_url": self.receiver.url, "secret_env": SECRET_ENV,
                 "celery_queue": TICKETS_QUEUE, "retry_base_s": 0.2, "retry_max_s": 1.0,
                 "timeout_s": 5.0, **events}
        self.config_path = self.write_config(
            accounts=accounts, es_prefix=self.es_prefix,
            extra={"broker": {"url": self.broker_url}, "parse": {"workers": 1},
                   "schedule": {"lock_ttl_s": 3}, "events": table})
        return self.config_path

    def poll(self, account_id: str) -> dict[str, Any]:
        assert self.config_path is not None
        env = {**os.environ, "POPVAULT_CONFIG": str(self.config_path)}
        done = subprocess.run([sys.executable, "-m", "ingest", "poll", "--json", "--account",
                               account_id], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        assert self.config_path is not None
        env = {**os.environ, "POPVAULT_CONFIG": str(self.config_path), "PYTHONPATH": str(REPO),
               "POPVAULT_EVENTS_BROKER": self.broker_url}
        return start_celery(args, node=f"{name}-{self.run}@%h", what=name, env=env,
                            logfile=self.logs / f"{name}.log",
                            timeout_s=WORKER_START_TIMEOUT_S, procs=self.procs)

    def start_dispatcher(self, name: str) -> subprocess.Popen[bytes]:
        return self._start(name, ["-A", "workers", "worker", "--pool", "prefork",
                                  "--concurrency", "2", "-Q", EVENTS_QUEUE])

    def start_consumer(self) -> subprocess.Popen[bytes]:
        return self._start("consumer", ["-A", "tests.integration.events_consumer", "worker",
                                         "--pool", "solo", "-Q", TICKETS_QUEUE])

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        kill_group(proc)

    def send_dispatch(self) -> None:
        from celery import Celery

        client = Celery("popvault-test", broker=self.broker_url)
        client.conf.update(task_serializer="json", accept_content=["json"])
        with client.connection_for_write() as conn:
            client.send_task(DISPATCH_TASK, queue=EVENTS_QUEUE, connection=conn)

    def drive(self, check: Callable[[], bool], timeout: float, what: str,
              every_s: float = 0.5) -> float:
        """Send dispatcher runs (what beat does) until ``check()``; returns seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return time.monotonic() - t0
            self.send_dispatch()
            time.sleep(every_s)
        tail = "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in self.logs.glob("*.log"))
        pytest.fail(f"timed out after {timeout}s waiting for {what}; logs in {self.logs}\n{tail}")

    def handled(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange("test:events:handled", 0, -1)]

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange("test:events:received", 0, -1)]

    def documents(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """message_id -> (message_key, source) of every indexed document."""
        from elasticsearch import Elasticsearch

        es = Elasticsearch(self.stack.es_url)
        try:
            es.indices.refresh(index=f"{self.es_prefix}-messages")
            hits = es.search(index=f"{self.es_prefix}-messages", size=1000,
                             query={"match_all": {}})["hits"]["hits"]
            return {h["_source"]["email"]["message_id"]: (h["_id"], h["_source"]) for h in hits}
        finally:
            es.close()


@pytest.fixture
def ev(stack: Stack, redis_client: Any, es_prefix: str, write_config: Callable[..., Path],
       monkeypatch: pytest.MonkeyPatch) -> Iterator[EventsEnv]:
    secret = uuid.uuid4().hex
    monkeypatch.setenv(SECRET_ENV, secret)
    db = redis_client.connection_pool.connection_kwargs["db"]
    base = stack.redis_url.rsplit("/", 1)[0]
    run = uuid.uuid4().hex[:8]
    logs = Path(os.environ.get("POPVAULT_TEST_LOG_DIR", "/tmp/popvault-test-logs")) / f"ev{run}"
    logs.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(secret).start()
    env = EventsEnv(stack, redis_client, f"{base}/{db}", es_prefix, write_config, logs, run,
                    receiver)
    try:
        yield env
    finally:
        for proc in env.procs:
            env.kill(proc)
        receiver.stop()


def _account(mb: Mailbox) -> dict[str, Any]:
    return mb.account_config(events=["webhook", "celery"])


def _machine_kinds_missing(docs: Mapping[str, tuple[str, dict[str, Any]]],
                           ids: list[str]) -> list[str]:
    return [m for m in ids if "kind" not in docs[m][1].get("popvault", {})]


# -- tests ----------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_one_event_per_new_human_message_none_for_duplicates_or_machines(
        ev: EventsEnv, mailbox_factory: Callable[..., Mailbox]) -> None:
    """Two event-enabled accounts; A gets 5 human mails, an auto-reply, a bounce and a mail
    that B also gets (polled after A: a duplicate in B); B gets one mail of its own. The
    receiver fails the first 3 POSTs with 500. Exactly one successful webhook delivery and
    one Celery event per new human message; nothing for the duplicate in B."""
    a, b = mailbox_factory(), mailbox_factory()
    humans = [human("a", i) for i in range(5)]
    shared = human("shared", 0)
    own_b = human("b", 0)
    machines = [auto_reply("a"), bounce("a")]
    a.deliver_many(raw for _m, raw in [*humans, shared, *machines])
    b.deliver_many([shared[1], own_b[1]])
    ev.receiver.fail_first = 3
    ev.configure([_account(a), _account(b)])
    assert ev.poll(a.username)["accounts"][0]["new"] == 8
    report_b = ev.poll(b.username)["accounts"][0]
    assert (report_b["new"], report_b["joined"]) == (1, 1)

    docs = ev.documents()
    expected = {docs[m][0]: a.username for m, _raw in [*humans, shared]}
    expected[docs[own_b[0]][0]] = b.username
    ev.start_consumer()
    ev.start_dispatcher("dispatcher")
    took = ev.drive(lambda: len(ev.receiver.ok()) >= len(expected)
                    and len(ev.handled()) >= len(expected), 120, "every event delivered")
    for _ in range(4):  # more runs: nothing new may go out
        ev.send_dispatch()
        time.sleep(0.5)

    ok = ev.receiver.ok()
    assert Counter(d.event_id for d in ok) == Counter(list(expected)), "one per message"
    assert all(d.signature_ok for d in ev.receiver.all())
    assert len(ev.receiver.all()) == len(expected) + 3  # 3 failures retried, then delivered
    for d in ok:
        assert d.event["event_id"] == d.event["message_key"] == d.event_id
        assert d.event["account_id"] == expected[d.event_id]
        assert d.event["kind"] == "human" and d.event["text"]
    shared_event = next(d.event for d in ok if d.event_id == docs[shared[0]][0])
    assert shared_event["account_id"] == a.username  # the duplicate in B made no event
    assert shared_event["conversation_id"] == docs[shared[0]][1]["popvault"][
        "message_id_normalized"]
    handled = ev.handled()
    assert sorted(e["event_id"] for e in handled) == sorted(expected)
    assert len(ev.received()) == len(expected)
    for m, _raw in machines:
        assert docs[m][0] not in {d.event_id for d in ev.receiver.all()} or \
            "kind" not in docs[m][1]["popvault"]
    print(f"\n{len(expected)} events (webhook + Celery) in {took:.1f}s, 3 retried 500s")
    missing = _machine_kinds_missing(docs, [m for m, _raw in machines])
    if missing:
        pytest.xfail(f"popvault.kind not written by the pipeline yet for {missing}: the "
                     "dispatcher treats them as human (documented fallback)")
    machine_keys = {docs[m][0] for m, _raw in machines}
    assert not machine_keys & {d.event_id for d in ev.receiver.all()}
    assert not machine_keys & {e["event_id"] for e in ev.received()}


@pytest.mark.timeout(300)
def test_dispatcher_sigkilled_mid_run_still_delivers_everything_at_least_once(
        ev: EventsEnv, mailbox_factory: Callable[..., Mailbox]) -> None:
    """40 new messages, a slow receiver; the dispatcher worker tree is SIGKILLed while it
    sends, a new one takes over: every event arrives at least once, ids = message keys."""
    a = mailbox_factory()
    mails = [human("k", i) for i in range(40)]
    a.deliver_many(raw for _m, raw in mails)
    ev.receiver.delay_s = 0.05
    ev.configure([_account(a)])
    assert ev.poll(a.username)["accounts"][0]["new"] == 40
    docs = ev.documents()
    expected = {docs[m][0] for m, _raw in mails}
    ev.start_consumer()
    w1 = ev.start_dispatcher("w1")
    ev.drive(lambda: len(ev.receiver.ok()) >= 10, 60, "10 deliveries", every_s=0.1)
    ev.kill(w1)
    at_kill = len({d.event_id for d in ev.receiver.ok()})
    assert at_kill < len(expected), "the kill did not land mid-run"

    ev.start_dispatcher("w2")
    t0 = time.monotonic()
    ev.drive(lambda: {d.event_id for d in ev.receiver.ok()} >= expected
             and {e["event_id"] for e in ev.handled()} >= expected, 120, "all events")
    after_s = time.monotonic() - t0
    ok = ev.receiver.ok()
    counts = Counter(d.event_id for d in ok)
    assert set(counts) == expected
    by_message_id = {d.event["message_id"]: d.event_id for d in ok}
    assert len(by_message_id) == len(expected) == len(set(by_message_id.values()))
    assert all(d.event_id == d.event["message_key"] for d in ok)
    handled = Counter(e["event_id"] for e in ev.handled())
    assert set(handled) == expected and max(handled.values()) == 1  # consumer deduped
    received = Counter(e["event_id"] for e in ev.received())
    assert set(received) == expected
    print(f"\nkilled after {at_kill}/40 webhook deliveries; resent "
          f"{sum(counts.values()) - len(expected)} webhook and "
          f"{sum(received.values()) - len(expected)} Celery duplicates; the rest in "
          f"{after_s:.1f}s (incl. a {3}s lock expiry)")


@pytest.mark.timeout(300)
def test_dead_letter_after_max_attempts_and_never_again(
        ev: EventsEnv, mailbox_factory: Callable[..., Mailbox]) -> None:
    """A receiver that always answers 500: each event is tried ``max_attempts`` times, then
    dead-lettered (Redis hash + log line) and never tried again; Celery delivery is unaffected."""
    from workers.events import dead_letters

    a = mailbox_factory()
    mails = [human("d", i) for i in range(2)]
    a.deliver_many(raw for _m, raw in mails)
    ev.receiver.always_fail = True
    ev.configure([_account(a)], max_attempts=3)
    ev.poll(a.username)
    keys_ = {k for k, _doc in ev.documents().values()}
    ev.start_consumer()
    ev.start_dispatcher("dispatcher")
    ev.drive(lambda: len(dead_letters(ev.redis)) >= 2, 60, "two dead letters")
    tries = len(ev.receiver.all())
    for _ in range(6):
        ev.send_dispatch()
        time.sleep(0.5)
    assert len(ev.receiver.all()) == tries == 6  # 3 attempts each, nothing after
    letters = dead_letters(ev.redis)
    assert {d["message_key"] for d in letters} == keys_
    for d in letters:
        assert (d["channel"], d["attempts"], d["status"]) == ("webhook", 3, 500)
        assert d["event"]["event_id"] == d["message_key"]
    assert {e["event_id"] for e in ev.handled()} == keys_
    log = "".join(p.read_text(errors="replace") for p in ev.logs.glob("dispatcher*.log"))
    assert log.count("events: dead letter") == 2


@pytest.mark.timeout(300)
def test_embedded_sink_dispatch_in_process_and_throughput(
        ev: EventsEnv, mailbox_factory: Callable[..., Mailbox]) -> None:
    """Without Elasticsearch the dispatcher reads the embedded store (``iter_documents``,
    filtered in Python). Run in this process against real Redis, the real receiver and the
    real consumer: 100 new messages, each delivered once per channel; a second pass sends
    nothing."""
    from celery import Celery

    from ingest.config import load_config
    from ingest.events import TICKET_EVENT_TASK
    from workers.events import close_sink, run_dispatch

    a = mailbox_factory()
    mails = [human("e", i) for i in range(100)]
    a.deliver_many(raw for _m, raw in mails)
    ev.es_prefix = None  # write_config then writes no [elasticsearch]: the embedded store
    path = ev.configure([_account(a)])
    assert ev.poll(a.username)["accounts"][0]["new"] == 100
    config = load_config(path)
    assert config.elasticsearch is None
    ev.start_consumer()
    app = Celery("popvault-test", broker=ev.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])

    def send_task(event: dict[str, Any], queue: str) -> None:
        app.send_task(TICKET_EVENT_TASK, args=[event], queue=queue)

    try:
        t0 = time.monotonic()
        first = run_dispatch(ev.redis, config, send_task)
        took = time.monotonic() - t0
        second = run_dispatch(ev.redis, config, send_task)
    finally:
        close_sink()
    assert (first.wanted, first.delivered, first.failed, first.dead) == (100, 200, 0, 0)
    assert (second.delivered, second.waiting) == (0, 0)
    assert len(ev.receiver.ok()) == 100 == len({d.event_id for d in ev.receiver.ok()})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(ev.handled()) < 100:
        time.sleep(0.2)
    assert len({e["event_id"] for e in ev.handled()}) == 100
    print(f"\nembedded: 100 events x 2 channels in {took:.2f}s = {100 / took:.0f} events/s "
          f"({200 / took:.0f} sends/s)")
