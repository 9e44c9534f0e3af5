"""Ticket events without servers: signatures a receiver can check, the payload, the
``[events]`` table's errors, the retry verdicts and the backoff schedule."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from ingest.config import config_from_dict
from ingest.errors import ConfigError
from ingest.events import (
    BODY_EXCERPT_MAX_CHARS,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    EventsConfig,
    Response,
    TransportError,
    Verdict,
    backoff_s,
    backoff_schedule,
    build_event,
    classify_status,
    conversation_id,
    encode_event,
    parse_events_config,
    parse_retry_after,
    post_event,
    scan_archived_since,
    sign,
    verify_signature,
    wants_event,
)
from ingest.sinks.memory import MemorySink

pytestmark = pytest.mark.unit

CONFIG_PATH = Path("/etc/popvault/popvault.toml")


def _account(account_id: str = "support", **over: Any) -> dict[str, Any]:
    return {"id": account_id, "host": "pop.example.com", "username": f"{account_id}@x.org",
            "password_env": "PV_TEST_PW", **over}


def _config(events: Any, accounts: list[dict[str, Any]] | None = None) -> EventsConfig | None:
    """``[events]`` as parsed from a whole configuration (it reads ``Config.raw``)."""
    data: dict[str, Any] = {"accounts": accounts if accounts is not None else [
        _account(events=["webhook", "celery"])]}
    if events is not None:
        data["events"] = events
    return parse_events_config(config_from_dict(data, path=CONFIG_PATH))


def _doc(**popvault: Any) -> dict[str, Any]:
    pv = {"message_key": "k1", "first_archived": "2026-03-01T10:00:00Z",
          "accounts": ["support"], "message_id_normalized": "<a@x.org>",
          "body_text": "Hello,\nmy printer is on fire.", "has_attachments": True, **popvault}
    return {
        "@timestamp": "2026-03-01T09:59:00Z",
        "email": {"message_id": "<a@X.org>", "subject": "Printer",
                  "from": {"address": ["alice@example.org"]},
                  "to": {"address": ["support@example.com"]},
                  "cc": {"address": ["bob@example.org", "carol@example.org"]},
                  "attachments": [{"file": {"name": "photo.jpg", "mime_type": "image/jpeg"}},
                                  {"file": {"mime_type": "text/calendar"}}]},
        "popvault": pv,
    }


# -- signatures ------------------------------------------------------------------------------

def test_signature_is_hmac_sha256_of_raw_body_and_a_receiver_can_verify_it() -> None:
    event = build_event("k1", "support", _doc())
    body = encode_event(event)
    header = sign("s3cret", body)
    # What any receiver does, with nothing of popvault's:
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert header == expected
    assert verify_signature("s3cret", body, header)
    assert not verify_signature("other", body, header)
    assert not verify_signature("s3cret", body + b" ", header)
    assert not verify_signature("s3cret", body, header.removeprefix("sha256="))
    assert not verify_signature("s3cret", body, None)
    assert json.loads(body) == event


def test_post_event_sends_signed_body_and_idempotency_key() -> None:
    seen: list[tuple[str, bytes, Mapping[str, str], float]] = []

    def transport(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> Response:
        seen.append((url, body, headers, timeout))
        return Response(204)

    event = build_event("key-42", "support", _doc(message_key="key-42"))
    attempt = post_event("https://hooks.example/t", "pw", event, timeout_s=3.0,
                         transport=transport)
    assert attempt.verdict is Verdict.DELIVERED
    url, body, headers, timeout = seen[0]
    assert (url, timeout) == ("https://hooks.example/t", 3.0)
    assert headers[EVENT_ID_HEADER] == "key-42"
    assert verify_signature("pw", body, headers[SIGNATURE_HEADER])
    assert headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(("status", "verdict"), [
    (200, Verdict.DELIVERED), (202, Verdict.DELIVERED), (408, Verdict.RETRY),
    (429, Verdict.RETRY), (500, Verdict.RETRY), (503, Verdict.RETRY),
    (301, Verdict.REJECTED), (400, Verdict.REJECTED), (401, Verdict.REJECTED),
    (404, Verdict.REJECTED), (422, Verdict.REJECTED),
])
def test_status_verdicts(status: int, verdict: Verdict) -> None:
    assert classify_status(status) is verdict


def test_connection_failure_is_retried_and_retry_after_kept() -> None:
    def down(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> Response:
        raise TransportError("ConnectionRefusedError: [Errno 111]")

    def busy(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> Response:
        return Response(429, retry_after_s=30.0, text="slow down\n\x00please")

    event = build_event("k1", "support", _doc())
    a = post_event("http://127.0.0.1:9/", "pw", event, timeout_s=1, transport=down)
    assert a.verdict is Verdict.RETRY and a.status is None and "Refused" in a.reason
    b = post_event("http://127.0.0.1:9/", "pw", event, timeout_s=1, transport=busy)
    assert b.verdict is Verdict.RETRY and b.retry_after_s == 30.0
    assert b.reason == "HTTP 429: slow down  please"
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("999999") == 3600.0


# -- payload ---------------------------------------------------------------------------------

def test_payload_shape() -> None:
    event = build_event("k1", "support", _doc())
    assert event == {
        "version": 1, "type": "message.archived", "event_id": "k1", "message_key": "k1",
        "account_id": "support", "message_id": "<a@X.org>", "conversation_id": "<a@x.org>",
        "@timestamp": "2026-03-01T09:59:00Z", "first_archived": "2026-03-01T10:00:00Z",
        "from": ["alice@example.org"], "to": ["support@example.com"],
        "cc": ["bob@example.org", "carol@example.org"], "subject": "Printer",
        "kind": "human", "has_attachments": True, "attachments": ["photo.jpg"],
        "text": "Hello,\nmy printer is on fire.", "text_source": "body_excerpt",
        "text_truncated": False,
    }
    json.dumps(event)  # JSON only: it is a Celery argument too


def test_payload_prefers_reply_text_and_caps_the_body_excerpt() -> None:
    reply = build_event("k1", "support", _doc(reply_text="Thanks, fixed."))
    assert (reply["text"], reply["text_source"]) == ("Thanks, fixed.", "reply_text")
    long = build_event("k1", "support", _doc(body_text="x" * 5000))
    assert len(long["text"]) == BODY_EXCERPT_MAX_CHARS and long["text_truncated"] is True
    bare = build_event("k1", "support", {"popvault": {"message_key": "k1"}})
    assert bare["text"] == "" and bare["from"] == [] and bare["kind"] == "human"
    assert bare["conversation_id"] is None


def test_conversation_id_prefers_thread_then_message_id() -> None:
    assert conversation_id(_doc(thread={"conversation_id": "conv-7"})) == "conv-7"
    assert conversation_id(_doc()) == "<a@x.org>"
    doc = _doc()
    del doc["popvault"]["message_id_normalized"]
    assert conversation_id(doc) == "<a@x.org>"  # normalized here: domain lower-cased


def test_events_only_for_the_first_account_and_wanted_kinds() -> None:
    doc = _doc(accounts=["support", "sales"])
    assert wants_event(doc, "support", ["human"])
    assert not wants_event(doc, "sales", ["human"])  # a duplicate that joined
    assert not wants_event(_doc(kind="auto_reply"), "support", ["human"])
    assert not wants_event(_doc(kind="bounce"), "support", ["human", "list"])
    assert wants_event(_doc(kind="list"), "support", ["human", "list"])
    assert wants_event(_doc(kind="human"), "support", ["human"])


def test_scan_of_a_non_elasticsearch_sink_filters_and_orders_in_python() -> None:
    sink = MemorySink()
    for key, when, accounts in [("b", "2026-03-01T10:00:02Z", ["support"]),
                                ("a", "2026-03-01T10:00:01Z", ["sales", "support"]),
                                ("c", "2026-03-01T09:00:00Z", ["support"]),
                                ("d", "2026-03-01T10:00:03Z", ["sales"])]:
        sink.documents[key] = _doc(message_key=key, first_archived=when, accounts=accounts)
    since = 1772359200000  # 2026-03-01T10:00:00Z
    pages = list(scan_archived_since(sink, "support", since, page_size=1))
    assert [[k for k, _d in page] for page in pages] == [["a"], ["b"]]


# -- configuration ---------------------------------------------------------------------------

def test_config_defaults_and_accounts() -> None:
    cfg = _config({"webhook_url": "https://hooks.example/t", "secret_env": "PV_HOOK"},
                  accounts=[_account(events=["webhook", "celery"]), _account("sales")])
    assert cfg is not None
    assert cfg.accounts == {"support": ("webhook", "celery")}
    assert cfg.celery_queue == "tickets" and cfg.include_kinds == ("human",)
    assert cfg.max_attempts == 8
    assert "hooks.example" not in repr(cfg)
    assert _config(None, accounts=[_account("sales")]) is None


@pytest.mark.parametrize(("events", "key"), [
    ({"webhook_url": "https://h/t", "secret_env": "S", "colour": 1}, "colour"),
    ({"secret_env": "S"}, "webhook_url"),  # an account wants the webhook
    ({"webhook_url": "https://h/t"}, "secret_env"),
    ({"webhook_url": "https://h/t", "secret": "inline"}, "secret"),
    ({"webhook_url": "ftp://h/t", "secret_env": "S"}, "webhook_url"),
    ({"webhook_url": "https://u:p@h/t", "secret_env": "S"}, "webhook_url"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "include_kinds": ["spam"]},
     "include_kinds"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "include_kinds": "human"},
     "include_kinds"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "max_attempts": 0}, "max_attempts"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "timeout_s": -1}, "timeout_s"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "celery_queue": " "}, "celery_queue"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "retry_base_s": 60,
      "retry_max_s": 10}, "retry_max_s"),
    ({"webhook_url": "https://h/t", "secret_env": "S", "max_run_s": 1000}, "max_run_s"),
])
def test_config_errors_name_file_and_key(events: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(events)
    text = str(info.value)
    assert str(CONFIG_PATH) in text and "[events]" in text and repr(key) in text, text


def test_events_table_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"\[events\] must be a table"):
        _config("nope")


def test_celery_only_needs_no_webhook() -> None:
    cfg = _config({"celery_queue": "helpdesk"}, accounts=[_account(events=["celery"])])
    assert cfg is not None and cfg.celery_queue == "helpdesk" and cfg.webhook_url is None


# -- backoff ---------------------------------------------------------------------------------

def test_backoff_schedule_doubles_and_caps() -> None:
    assert list(backoff_schedule(8, base_s=10, max_s=3600)) == [
        10, 20, 40, 80, 160, 320, 640]
    assert list(backoff_schedule(5, base_s=1, max_s=5)) == [1, 2, 4, 5]
    assert backoff_s(0, base_s=10, max_s=60) == 0
    assert backoff_s(500, base_s=10, max_s=60) == 60  # no overflow
    rng = random.Random(7)
    for n in range(1, 10):
        plain = backoff_s(n, base_s=2, max_s=100)
        jittered = backoff_s(n, base_s=2, max_s=100, rng=rng, jitter=True)
        assert plain / 2 <= jittered <= plain
