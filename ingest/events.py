"""Ticket events for newly archived mail: configuration, payload, signing, webhook delivery.

A support inbox wants a ticket opened for each new message a person wrote. popvault tells
the ticket system in one or both of two ways, chosen per account (``events = ["webhook",
"celery"]``): an HTTP POST of a signed JSON payload, and a Celery task
(:data:`TICKET_EVENT_TASK`) sent to a queue the ticket system's workers consume.

Delivery is **at least once**. The event id is the message key, so a consumer that sees an
id twice drops the second (``X-Popvault-Event-Id`` on the webhook, ``event_id`` in the
payload). Which documents produce an event is decided from the index, never from the poll:
a document is "new for account A" when A is ``popvault.accounts[0]`` -- the account whose
poll created it. A later copy in any account only joins that document (appends to
``popvault.accounts``, keeps ``popvault.first_archived``), so a duplicate never produces a
second event. The Celery dispatcher that walks documents by ``first_archived`` lives in
:mod:`workers.events`; this module is pure (no Celery, no Redis, no server client at import)
so it can be tested without servers.

Webhook verdicts follow the sink's retry rule (:mod:`ingest.sinks.retry`): 2xx delivered;
connection failures, timeouts, 408, 429 and 5xx retried with exponential backoff; any other
status rejected for good (dead-lettered at once: repeating a request the receiver refuses
would only fail again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from ingest.config import EVENT_SINKS, Config, SecretSource, _Reader, resolve_secret
from ingest.dedup import normalize_message_id
from ingest.errors import ConfigError, SinkError

TICKET_EVENT_TASK = "popvault.ticket_event"
"""The Celery task name consumers register; its one argument is the event dict (JSON)."""
EVENT_TYPE = "message.archived"
PAYLOAD_VERSION = 1
"""Bumped when a payload field changes meaning; consumers can branch on ``version``."""
SIGNATURE_HEADER = "X-Popvault-Signature"
EVENT_ID_HEADER = "X-Popvault-Event-Id"
SIGNATURE_PREFIX = "sha256="

BODY_EXCERPT_MAX_CHARS = 2_000
"""Body characters sent when the document has no ``reply_text``: enough to triage a ticket."""
REPLY_TEXT_MAX_CHARS = 20_000
"""Cap on ``reply_text``: it is the new part of a reply, usually short; this bounds the POST."""
MAX_ADDRESSES = 100
"""Addresses per field in the payload; a mail to 5,000 recipients is not a ticket's business."""
MAX_ATTACHMENT_NAMES = 100
MAX_RETRY_AFTER_S = 3600.0
"""A receiver's ``Retry-After`` is honoured up to this (an hour); beyond it is a typo or abuse."""
MAX_ERROR_CHARS = 200
"""Receiver text kept in a dead letter or log line (untrusted, trimmed)."""

DEFAULT_CELERY_QUEUE = "tickets"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_RETRY_BASE_S = 10.0
"""First retry after 10 s, doubling: 8 attempts span about 21 minutes before a dead letter."""
DEFAULT_RETRY_MAX_S = 3600.0
DEFAULT_INCLUDE_KINDS: tuple[str, ...] = ("human",)
DEFAULT_SAFETY_WINDOW_S = 600.0
"""How far behind its high-water mark the dispatcher looks again. A document becomes visible
after its ``first_archived`` stamp (parse, then bulk write, then the index refresh) and that
stamp comes from the polling worker's clock; anything later than this is missed."""
DEFAULT_DISPATCH_INTERVAL_S = 5.0
DEFAULT_MAX_EVENTS_PER_RUN = 1_000
DEFAULT_MAX_RUN_S = 60.0
"""A dispatcher run stops sending after this long and leaves the rest to the next run, so its
lock is never held for long and one slow receiver cannot starve the others for minutes."""
MAX_RUN_S_LIMIT = 300.0

KINDS = ("human", "auto_reply", "bounce", "list")
"""Values of ``popvault.kind`` (:class:`ingest.classify.Kind`); a missing kind means human."""
RETRY_STATUSES = frozenset({408, 429})


class Verdict(StrEnum):
    """What one delivery attempt came to; readable in Redis and logs."""

    DELIVERED = "delivered"
    RETRY = "retry"  # transient: connection, timeout, 408, 429, 5xx
    REJECTED = "rejected"  # permanent: any other status; retrying cannot help


@dataclass(frozen=True)
class EventsConfig:
    """``[events]``: where ticket events go and how hard delivery tries."""

    webhook_url: str | None = None
    secret: SecretSource = field(default_factory=SecretSource)
    celery_queue: str = DEFAULT_CELERY_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_base_s: float = DEFAULT_RETRY_BASE_S
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    include_kinds: tuple[str, ...] = DEFAULT_INCLUDE_KINDS
    safety_window_s: float = DEFAULT_SAFETY_WINDOW_S
    dispatch_interval_s: float = DEFAULT_DISPATCH_INTERVAL_S
    max_events_per_run: int = DEFAULT_MAX_EVENTS_PER_RUN
    max_run_s: float = DEFAULT_MAX_RUN_S
    accounts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """account_id -> its channels ("webhook", "celery"), for accounts with ``events``."""

    def __repr__(self) -> str:  # the URL may carry a token in its query: never print it
        return (f"EventsConfig(accounts={sorted(self.accounts)}, "
                f"celery_queue={self.celery_queue!r}, webhook={self.webhook_url is not None})")


def parse_events_config(config: Config) -> EventsConfig | None:
    """Read ``[events]`` from ``config.raw``; None when no account asks for events.

    Errors name the file and the key, like every configuration error. An account with
    ``events = ["webhook"]`` needs ``webhook_url`` and a secret (payloads are always signed).
    """
    where = str(config.path) if config.path else "configuration"
    table = config.raw.get("events", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [events] must be a table")
    r = _Reader(table, f"{where}: [events]")
    url = r.get("webhook_url", str)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r.fail("webhook_url", "must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise r.fail("webhook_url", "must not hold credentials; the body is signed with "
                                        "secret_env instead")
    secret = r.secret("secret", config.path.parent.resolve() if config.path else None)
    queue = r.get("celery_queue", str, DEFAULT_CELERY_QUEUE)
    if not queue.strip():
        raise r.fail("celery_queue", "must not be empty")
    kinds = r.get("include_kinds", list, list(DEFAULT_INCLUDE_KINDS))
    for kind in kinds:
        if kind not in KINDS:
            raise r.fail("include_kinds", f"each entry must be one of {', '.join(KINDS)}, "
                                          f"got {kind!r}")
    cfg = EventsConfig(
        webhook_url=url,
        secret=secret,
        celery_queue=queue,
        timeout_s=_positive_number(r, "timeout_s", DEFAULT_TIMEOUT_S),
        max_attempts=r.positive("max_attempts", DEFAULT_MAX_ATTEMPTS),
        retry_base_s=_positive_number(r, "retry_base_s", DEFAULT_RETRY_BASE_S),
        retry_max_s=_positive_number(r, "retry_max_s", DEFAULT_RETRY_MAX_S),
        include_kinds=tuple(dict.fromkeys(kinds)),
        safety_window_s=_positive_number(r, "safety_window_s", DEFAULT_SAFETY_WINDOW_S),
        dispatch_interval_s=_positive_number(r, "dispatch_interval_s",
                                             DEFAULT_DISPATCH_INTERVAL_S),
        max_events_per_run=r.positive("max_events_per_run", DEFAULT_MAX_EVENTS_PER_RUN),
        max_run_s=_positive_number(r, "max_run_s", DEFAULT_MAX_RUN_S),
        accounts={a.id: a.events for a in config.accounts if a.events},
    )
    r.check_unknown()
    if cfg.max_run_s > MAX_RUN_S_LIMIT:
        raise r.fail("max_run_s", f"must be at most {MAX_RUN_S_LIMIT:.0f} (the dispatcher task's "
                                  "time limit is 600 s)")
    if cfg.retry_max_s < cfg.retry_base_s:
        raise r.fail("retry_max_s", f"must be at least retry_base_s ({cfg.retry_base_s})")
    webhook_users = sorted(a for a, ch in cfg.accounts.items() if "webhook" in ch)
    if webhook_users and url is None:
        raise r.fail("webhook_url", f"is required: account {webhook_users[0]!r} has "
                                    "events = [\"webhook\"]")
    if url is not None and not secret.is_set():
        raise r.fail("secret_env", "webhook payloads are signed: give secret_env, "
                                   "secret_file or secret_command")
    if not cfg.accounts:
        return None
    return cfg


def _positive_number(r: _Reader, key: str, default: float) -> float:
    value = float(r.get(key, float, default))
    if not value > 0:
        raise r.fail(key, f"must be a positive number, got {value}")
    return value


# -- which documents, and what they say -----------------------------------------------------


def document_kind(document: Mapping[str, Any]) -> str:
    """``popvault.kind``; documents indexed before classification existed count as human."""
    kind = _get(document, "popvault", "kind")
    return kind if isinstance(kind, str) and kind else "human"


def first_account(document: Mapping[str, Any]) -> str | None:
    """The account whose poll created the document: the first of ``popvault.accounts``.

    Sinks keep that list in the order copies arrived (a join appends), so this is stable.
    """
    accounts = _get(document, "popvault", "accounts")
    if isinstance(accounts, str):
        return accounts
    if isinstance(accounts, list) and accounts and isinstance(accounts[0], str):
        return accounts[0]
    return None


def wants_event(document: Mapping[str, Any], account_id: str,
                include_kinds: Iterable[str]) -> bool:
    """True when this document is a new message *of this account* of a wanted kind.

    A copy that joined a document first archived by another account is a duplicate and never
    produces an event, whichever account it arrived in.
    """
    return first_account(document) == account_id and document_kind(document) in set(
        include_kinds)


def conversation_id(document: Mapping[str, Any]) -> str | None:
    """``popvault.thread.conversation_id`` when threading set it, else the normalized
    Message-ID (a message with no thread information starts its own conversation)."""
    conv = _get(document, "popvault", "thread", "conversation_id")
    if isinstance(conv, str) and conv:
        return conv
    normalized = _get(document, "popvault", "message_id_normalized")
    if isinstance(normalized, str) and normalized:
        return normalized
    message_id = _get(document, "email", "message_id")
    return normalize_message_id(message_id) if isinstance(message_id, str) else None


def first_archived_ms(document: Mapping[str, Any]) -> int | None:
    """``popvault.first_archived`` as epoch milliseconds (the dispatcher's ordering)."""
    return iso_to_ms(_get(document, "popvault", "first_archived"))


def iso_to_ms(value: Any) -> int | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def build_event(message_key: str, account_id: str,
                document: Mapping[str, Any]) -> dict[str, Any]:
    """The event for one document: a JSON-safe summary, never the whole document.

    ``event_id`` is the message key: the idempotency key consumers dedupe on. The text is
    ``reply_text`` (the new part of a reply) when the document has it, else the first
    :data:`BODY_EXCERPT_MAX_CHARS` characters of the body.
    """
    reply = _get(document, "popvault", "reply_text")
    body = _get(document, "popvault", "body_text")
    if isinstance(reply, str) and reply.strip():
        text, source, limit = reply, "reply_text", REPLY_TEXT_MAX_CHARS
    else:
        text = body if isinstance(body, str) else ""
        source, limit = "body_excerpt", BODY_EXCERPT_MAX_CHARS
    names: list[str] = []
    for item in _get(document, "email", "attachments") or []:
        name = _get(item, "file", "name") if isinstance(item, Mapping) else None
        if isinstance(name, str) and len(names) < MAX_ATTACHMENT_NAMES:
            names.append(name)
    subject = _get(document, "email", "subject")
    message_id = _get(document, "email", "message_id")
    return {
        "version": PAYLOAD_VERSION,
        "type": EVENT_TYPE,
        "event_id": message_key,
        "message_key": message_key,
        "account_id": account_id,
        "message_id": message_id if isinstance(message_id, str) else None,
        "conversation_id": conversation_id(document),
        "@timestamp": document.get("@timestamp"),
        "first_archived": _get(document, "popvault", "first_archived"),
        "from": _addresses(document, "from"),
        "to": _addresses(document, "to"),
        "cc": _addresses(document, "cc"),
        "subject": subject if isinstance(subject, str) else None,
        "kind": document_kind(document),
        "has_attachments": bool(_get(document, "popvault", "has_attachments")),
        "attachments": names,
        "text": text[:limit],
        "text_source": source,
        "text_truncated": len(text) > limit,
    }


def _addresses(document: Mapping[str, Any], role: str) -> list[str]:
    values = _get(document, "email", role, "address")
    if isinstance(values, str):
        values = [values]
    return [v for v in values or [] if isinstance(v, str)][:MAX_ADDRESSES]


def _get(data: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


# -- signing and the request ----------------------------------------------------------------


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed and signed: compact UTF-8 JSON, keys sorted (stable resends)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"),
                      sort_keys=True).encode("utf-8", "replace")


def sign(secret: str | bytes, body: bytes) -> str:
    """``X-Popvault-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return SIGNATURE_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute over the raw body, compare in constant time."""
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    return hmac.compare_digest(sign(secret, body), header.strip())


def webhook_headers(secret: str | bytes, body: bytes, event_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "popvault-events/1",
        SIGNATURE_HEADER: sign(secret, body),
        EVENT_ID_HEADER: event_id,
    }


def resolve_webhook_secret(cfg: EventsConfig) -> str:
    """The signing secret, read when a delivery needs it (never kept in the config object)."""
    return resolve_secret(cfg.secret, what="[events] secret")


# -- delivery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """What a transport got back: the status, and ``Retry-After`` in seconds if given."""

    status: int
    retry_after_s: float | None = None
    text: str = ""


class TransportError(Exception):
    """Raised by a transport when no HTTP response arrived (DNS, connect, TLS, timeout)."""


Transport = Callable[[str, bytes, Mapping[str, str], float], Response]
"""``(url, body, headers, timeout_s) -> Response``; raises :class:`TransportError`. Tests pass
their own; :func:`urllib_transport` is the real one."""


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    verdict: Verdict
    status: int | None
    reason: str
    retry_after_s: float | None = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would be replayed as GET without its body: treat 3xx as a refusal."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def urllib_transport(url: str, body: bytes, headers: Mapping[str, str],
                     timeout_s: float) -> Response:
    """POST with the standard library (certificates verified by default for https)."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            text = resp.read(MAX_ERROR_CHARS).decode("utf-8", "replace")
            return Response(int(resp.status), None, text)
    except urllib.error.HTTPError as exc:
        try:
            text = exc.read(MAX_ERROR_CHARS).decode("utf-8", "replace")
        except Exception:  # the error body is a courtesy; the status is what counts
            text = ""
        return Response(int(exc.code), parse_retry_after(exc.headers.get("Retry-After")), text)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransportError(f"{type(exc).__name__}: {reason}"[:MAX_ERROR_CHARS]) from exc


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in delay-seconds form (the HTTP-date form is ignored: clocks differ)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def classify_status(status: int) -> Verdict:
    """2xx delivered; 408, 429 and 5xx worth retrying; everything else refused for good."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in RETRY_STATUSES or status >= 500:
        return Verdict.RETRY
    return Verdict.REJECTED


def post_event(url: str, secret: str | bytes, event: Mapping[str, Any], *, timeout_s: float,
               transport: Transport = urllib_transport) -> Attempt:
    """One signed POST of ``event``; never raises for network or HTTP trouble."""
    body = encode_event(event)
    headers = webhook_headers(secret, body, str(event["event_id"]))
    try:
        resp = transport(url, body, headers, timeout_s)
    except TransportError as exc:
        return Attempt(Verdict.RETRY, None, str(exc))
    verdict = classify_status(resp.status)
    reason = f"HTTP {resp.status}"
    if verdict is not Verdict.DELIVERED and resp.text.strip():
        reason += ": " + _trim(resp.text)
    return Attempt(verdict, resp.status, reason, resp.retry_after_s)


def _trim(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in " ".join(text.split()))
    return cleaned[:MAX_ERROR_CHARS]


def backoff_s(attempts: int, *, base_s: float, max_s: float,
              rng: random.Random | None = None, jitter: bool = False) -> float:
    """Wait after the ``attempts``-th failed attempt: ``base * 2**(attempts - 1)``, capped.

    With ``jitter`` the wait is drawn from [50 %, 100 %] of that, so events that failed
    together (a receiver outage) do not all come back in the same second.
    """
    if attempts < 1:
        return 0.0
    wait = min(max_s, base_s * (2.0 ** min(attempts - 1, 62)))
    if jitter:
        wait *= (rng or random).uniform(0.5, 1.0)
    return wait


def backoff_schedule(max_attempts: int, *, base_s: float, max_s: float) -> Iterator[float]:
    """The waits between ``max_attempts`` attempts (one fewer than attempts), no jitter."""
    for n in range(1, max_attempts):
        yield backoff_s(n, base_s=base_s, max_s=max_s)


def channels_for(cfg: EventsConfig, account_id: str) -> tuple[str, ...]:
    """The channels an account's events go to, in a fixed order."""
    wanted = cfg.accounts.get(account_id, ())
    return tuple(c for c in EVENT_SINKS if c in wanted)


# -- reading the index ----------------------------------------------------------------------

SCAN_PAGE_SIZE = 100
"""Documents per page when scanning for events; bodies are up to 1 MB, so pages stay small."""
SCAN_SOURCE_FIELDS = [
    "@timestamp", "email.message_id", "email.subject", "email.from", "email.to", "email.cc",
    "email.attachments.file.name", "popvault.message_key", "popvault.first_archived",
    "popvault.accounts", "popvault.kind", "popvault.has_attachments", "popvault.reply_text",
    "popvault.body_text", "popvault.thread.conversation_id", "popvault.message_id_normalized",
]


def scan_archived_since(sink: Any, account_id: str, since_ms: int, *,
                        page_size: int = SCAN_PAGE_SIZE,
                        ) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Pages of ``(message_key, document)`` seen in ``account_id`` whose
    ``popvault.first_archived`` is at or after ``since_ms``, oldest first.

    On Elasticsearch this is a filtered search on the read alias, paged with ``search_after``
    on (first_archived, message_key): no refresh is forced (the dispatcher's safety window
    absorbs the refresh interval). Any other sink (embedded, memory) is read whole with
    ``iter_documents()`` and filtered here: O(documents) per call, which is fine at the
    embedded store's scale (one machine, up to some hundred thousand messages) and keeps the
    sink contract unchanged. Raises :class:`ingest.errors.SinkError` when the index fails.
    """
    from ingest.sinks.elasticsearch import ElasticsearchSink

    if isinstance(sink, ElasticsearchSink):
        yield from _scan_elasticsearch(sink, account_id, since_ms, page_size)
        return
    found: list[tuple[int, str, dict[str, Any]]] = []
    for key, doc in sink.iter_documents():
        accounts = _get(doc, "popvault", "accounts") or []
        when = first_archived_ms(doc)
        if when is not None and when >= since_ms and account_id in accounts:
            found.append((when, key, doc))
    found.sort(key=lambda row: (row[0], row[1]))
    for start in range(0, len(found), page_size):
        yield [(key, doc) for _when, key, doc in found[start:start + page_size]]


def _scan_elasticsearch(sink: Any, account_id: str, since_ms: int,
                        page_size: int) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    from elasticsearch import ApiError, NotFoundError
    from elasticsearch import TransportError as EsTransportError

    alias = sink.names.messages_alias
    query = {"bool": {"filter": [
        {"term": {"popvault.accounts": account_id}},
        {"range": {"popvault.first_archived": {"gte": since_ms, "format": "epoch_millis"}}},
    ]}}
    after: list[Any] | None = None
    while True:
        kwargs: dict[str, Any] = {
            "index": alias, "query": query, "size": page_size, "track_total_hits": False,
            "sort": [{"popvault.first_archived": "asc"}, {"popvault.message_key": "asc"}],
            "source_includes": SCAN_SOURCE_FIELDS,
        }
        if after is not None:
            kwargs["search_after"] = after
        try:
            resp = sink.client.search(**kwargs)
        except NotFoundError:
            return  # nothing archived yet: the alias is created with the first document
        except (ApiError, EsTransportError) as exc:
            raise SinkError(f"scanning {alias} for new messages of {account_id} failed: "
                            f"{type(exc).__name__}: {_trim(str(exc))}",
                            account_id=account_id, transient=True) from None
        hits = resp["hits"]["hits"]
        if not hits:
            return
        yield [(hit["_id"], hit.get("_source") or {}) for hit in hits]
        if len(hits) < page_size:
            return
        after = hits[-1]["sort"]
