"""Elasticsearch sink: one document per message key, one receipt per (account, UIDL).

Layout (all names built by :class:`IndexNames`, nowhere else)::

    <prefix>-messages              read alias over every messages index (search, count)
    <prefix>-messages-YYYY.MM      documents by the UTC month of email.origination_timestamp
    <prefix>-messages-undated      documents without an origination timestamp
    <prefix>-receipts              alias over the one receipts index (write index)
    <prefix>-receipts-000001       the receipts themselves
    templates <prefix>-messages, <prefix>-receipts   composable index templates

Why the target index comes from the origination date: it is part of the message key's
fingerprint, so two copies of one key always compute the same index, and a ``create`` with
``_id = message_key`` into that index is the dedup (409 = "already archived").

Why the receipts index sits behind an alias: ``get``/``mget``/``create``/``update`` through a
single-index alias are realtime and behave exactly as on the index, and a later mapping change
becomes reindex + atomic alias swap with no code change. Writes use ``require_alias`` so a
missing schema can never auto-create a concrete ``<prefix>-receipts`` index with guessed
mappings.

``write`` runs in three phases, each a bulk request (or several of at most
``config.bulk_max_bytes``): create documents; join existing ones (read ``popvault.accounts``,
write the union guarded by ``if_seq_no``/``if_primary_term`` -- no scripts, the minimal
distribution has no painless); create receipts for what was acknowledged. Every phase retries
429/5xx/connection failures with exponential backoff (:mod:`ingest.sinks.retry`), and every step
is idempotent, so a retried or replayed batch never duplicates anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from ingest.config import ElasticsearchConfig, resolve_secret
from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason
from ingest.searchquery import parse_query, to_es_query
from ingest.sinks.base import (
    IndexItem,
    ItemOutcome,
    Receipt,
    SearchHit,
    SearchResult,
    receipt_id,
    uidl_reused,
)
from ingest.sinks.retry import Verdict, backoff_s, classify, describe, error_of_body

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

T = TypeVar("T")

CLIENT_MAX_RETRIES = 1
"""Immediate retries inside the client, for a pooled keep-alive connection that a proxy closed.
Backoff and the real retry budget (``config.max_retries``) live in this module, in one place."""
BULK_MAX_ACTIONS = 1_000
"""Most actions in one bulk request, whatever their size; bounds the reply we must parse."""
MGET_CHUNK_IDS = 1_000
"""Ids per ``mget`` (receipts, joins) and per ``ids`` search."""
JOIN_MAX_ATTEMPTS = 10
"""Read-modify-write rounds when adding an account to an existing document races another
writer (each lost race is a 409 on ``if_seq_no``); after that the items are ERRORED. A writer
only loses to another writer's success, so N concurrent writers of one key need at most N
rounds: 10 covers more accounts than ever poll one message at the same moment."""
JOIN_JITTER_S = 0.05
"""Most random wait between two join rounds, so racing writers stop colliding in lockstep."""
SCAN_PAGE_SIZE = 500
"""Hits per page when iterating all documents or receipts."""
SCAN_KEEP_ALIVE = "2m"
"""How long a point in time (or scroll) stays open between two pages."""
MAX_SEARCH_LIMIT = 10_000
"""index.max_result_window's default: deeper pages need search_after (iter_documents)."""
DEFAULT_TEMPLATE_PRIORITY = 500
"""Above the built-in templates (100-200) so a prefix like ``logs`` cannot collide."""
RECEIPTS_INDEX_GENERATION = "000001"
MESSAGE_MAX_CHARS = 300
"""Length bound for foreign exception text placed in our messages."""

UNDATED_SUFFIX = "undated"
ORIGINATION_FIELD = ("email", "origination_timestamp")


@dataclass(frozen=True)
class IndexNames:
    """Every index, alias and template name popvault uses, derived from the prefix."""

    prefix: str

    @property
    def messages_alias(self) -> str:
        return f"{self.prefix}-messages"

    @property
    def messages_pattern(self) -> str:
        return f"{self.prefix}-messages-*"

    @property
    def messages_template(self) -> str:
        return f"{self.prefix}-messages"

    @property
    def undated_index(self) -> str:
        return f"{self.prefix}-messages-{UNDATED_SUFFIX}"

    def monthly_index(self, year: int, month: int) -> str:
        return f"{self.prefix}-messages-{year:04d}.{month:02d}"

    @property
    def receipts_alias(self) -> str:
        return f"{self.prefix}-receipts"

    @property
    def receipts_pattern(self) -> str:
        return f"{self.prefix}-receipts-*"

    @property
    def receipts_index(self) -> str:
        return f"{self.prefix}-receipts-{RECEIPTS_INDEX_GENERATION}"

    @property
    def receipts_template(self) -> str:
        return f"{self.prefix}-receipts"

    def index_for(self, document: Mapping[str, Any]) -> str:
        """The concrete index of a document: fixed by its origination month (UTC)."""
        when = origination_time(document)
        if when is None:
            return self.undated_index
        return self.monthly_index(when.year, when.month)


def origination_time(document: Mapping[str, Any]) -> dt.datetime | None:
    """``email.origination_timestamp`` as an aware UTC datetime, or None if absent/unreadable.

    Naive values are taken as UTC. An unreadable value counts as absent: the rule only has to
    be deterministic, because the same key always carries the same Date header.
    """
    email = document.get(ORIGINATION_FIELD[0])
    raw = email.get(ORIGINATION_FIELD[1]) if isinstance(email, Mapping) else None
    if isinstance(raw, dt.datetime):
        when = raw
    elif isinstance(raw, str) and raw.strip():
        try:
            when = dt.datetime.fromisoformat(raw.strip())
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


def cap_body_text(document: Mapping[str, Any], max_chars: int) -> dict[str, Any]:
    """A copy of ``document`` with ``popvault.body_text`` cut to ``max_chars``.

    ``popvault.body_truncated`` is set (only) when text was cut, so a search miss can be
    explained. The raw message in the archive keeps the full text.
    """
    doc = dict(document)
    popvault = doc.get("popvault")
    if isinstance(popvault, Mapping):
        body = popvault.get("body_text")
        if isinstance(body, str) and len(body) > max_chars:
            capped = dict(popvault)
            capped["body_text"] = body[:max_chars]
            capped["body_truncated"] = True
            doc["popvault"] = capped
    return doc


def with_accounts(document: Mapping[str, Any], accounts: Sequence[str]) -> dict[str, Any]:
    """A copy of ``document`` whose ``popvault.accounts`` is ``accounts`` (the sink owns it)."""
    doc = dict(document)
    popvault = doc.get("popvault")
    merged = dict(popvault) if isinstance(popvault, Mapping) else {}
    merged["accounts"] = list(accounts)
    doc["popvault"] = merged
    return doc


def join_reason(seen_accounts: Sequence[str] | set[str], account_id: str) -> DuplicateReason:
    """Why an item that found its key already present (or not) is, or is not, a duplicate."""
    if account_id in seen_accounts:
        return DuplicateReason.SAME_MESSAGE_SAME_ACCOUNT
    if seen_accounts:
        return DuplicateReason.SAME_MESSAGE_OTHER_ACCOUNT
    return DuplicateReason.NEW


def utc_now_iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def safe_url(url: str) -> str:
    """The URL without any ``user:password@`` part, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class TemplateSource(Protocol):
    """Where index templates come from; the ``schemas`` package itself satisfies this."""

    def index_template(self, prefix: str) -> dict[str, Any]: ...

    def receipts_template(self, prefix: str) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# bulk plumbing
# ---------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """One bulk action, pre-serialised so its size is known before chunking."""

    action: str  # create | index | update
    index: str
    id: str
    payload: bytes  # action line + source line, each ending in "\n"


@dataclass
class _Result:
    verdict: Verdict
    status: int
    error: Mapping[str, Any] | None = None
    item: Mapping[str, Any] = field(default_factory=dict)
    connection_failure: str | None = None  # set when no reply was received at all

    def reason(self) -> str:
        if self.connection_failure:
            return self.connection_failure
        return f"{self.status} {describe(self.error)}"


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON. Lone surrogates (from broken mail) become U+FFFD, never a crash;
    the raw message in the archive keeps the original bytes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "replace") + b"\n"


def _make_op(action: str, index: str, doc_id: str, source: Mapping[str, Any],
             **meta: Any) -> _Op:
    header = {action: {"_index": index, "_id": doc_id, **meta}}
    return _Op(action, index, doc_id, _dumps(header) + _dumps(source))


class ElasticsearchSink:
    """The :class:`ingest.sinks.base.Sink` over Elasticsearch 9 (see the module docstring).

    Args:
        config: connection and limits.
        client: an ``elasticsearch.Elasticsearch`` (or a stand-in with the same methods) for
            tests; built from ``config`` when omitted.
        templates: where ``ensure_schema`` gets templates; the ``schemas`` package by default.
        sleep: the backoff wait (tests pass a recorder instead of sleeping).
        now: the clock for ``archived_at``.
    """

    name = "elasticsearch"

    def __init__(
        self,
        config: ElasticsearchConfig,
        *,
        client: Any = None,
        templates: TemplateSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.names = IndexNames(config.index_prefix)
        self.url = safe_url(config.url)
        self._templates = templates
        self._sleep = sleep
        self._now = now
        self._secrets: tuple[str, ...] = ()
        self._ready = False
        self._client: Elasticsearch = client if client is not None else self._build_client()

    def __repr__(self) -> str:
        return f"ElasticsearchSink(url={self.url!r}, prefix={self.config.index_prefix!r})"

    @property
    def client(self) -> Elasticsearch:
        """The underlying client, for sink-side maintenance (:mod:`ingest.sinks.lifecycle`)."""
        return self._client

    # -- construction -------------------------------------------------------------------------

    def _build_client(self) -> Elasticsearch:
        from elasticsearch import Elasticsearch

        cfg = self.config
        kwargs: dict[str, Any] = {
            "request_timeout": cfg.request_timeout_s,
            "retry_on_timeout": True,  # safe: every write here is idempotent (create/if_seq_no)
            "max_retries": CLIENT_MAX_RETRIES,
            "retry_on_status": (),  # status retries are ours, with backoff (retry.py)
        }
        secrets: list[str] = []
        if cfg.api_key.is_set():
            key = resolve_secret(cfg.api_key, what="[elasticsearch] api_key")
            kwargs["api_key"] = key
            secrets.append(key)
        elif cfg.username:
            password = resolve_secret(cfg.password, what="[elasticsearch] password")
            kwargs["basic_auth"] = (cfg.username, password)
            secrets.append(password)
        if urlsplit(cfg.url).scheme == "https":
            kwargs["verify_certs"] = cfg.verify
            if cfg.ca_file is not None:
                kwargs["ca_certs"] = str(cfg.ca_file)
            if not cfg.verify:
                kwargs["ssl_show_warn"] = False
        self._secrets = tuple(s for s in secrets if s)
        try:
            return Elasticsearch(cfg.url, **kwargs)
        except (ValueError, TypeError) as exc:
            raise SinkError(
                f"cannot use Elasticsearch URL {self.url}: {self._scrub(str(exc))}",
                transient=False,
            ) from None

    def _scrub(self, text: str) -> str:
        """Foreign error text, bounded, with any configured secret blanked out."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = " ".join(text.split())
        return text[:MESSAGE_MAX_CHARS] + ("..." if len(text) > MESSAGE_MAX_CHARS else "")

    # -- error mapping and retries --------------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> SinkError:
        return SinkError(
            f"Elasticsearch at {self.url} is unreachable: {type(exc).__name__}: "
            f"{self._scrub(str(exc))}",
            transient=True,
        )

    def _full(self, index: str, error: Mapping[str, Any] | None) -> IndexFull:
        return IndexFull(
            f"Elasticsearch blocked writes to {index}: disk usage exceeded the flood-stage "
            "watermark (index read-only-allow-delete block); free disk space on the "
            "Elasticsearch nodes - the block lifts once usage falls below the high watermark "
            "(if it was set by hand, reset index.blocks.read_only_allow_delete) - then poll again."
            f" Elasticsearch said: {self._scrub(describe(error))}"
        )

    def _api_failure(self, what: str, exc: Any) -> SinkError:
        """Turn a whole-request ``ApiError`` into our error (IndexFull, or SinkError)."""
        status = int(exc.meta.status)
        error = error_of_body(getattr(exc, "body", None))
        verdict = classify(status, error)
        if verdict is Verdict.FULL:
            return self._full(what, error)
        if status in (401, 403) and verdict is not Verdict.BLOCKED:
            return SinkError(
                f"Elasticsearch at {self.url} refused {what} ({status}): check the api_key or "
                f"username/password and the role's privileges; it said: "
                f"{self._scrub(describe(error))}",
                transient=False,
            )
        if verdict is Verdict.MISSING:
            return SinkError(
                f"{what} failed: {self._scrub(describe(error))}; run `popvault schemas install`",
                transient=False,
            )
        return SinkError(
            f"Elasticsearch at {self.url}: {what} failed ({status}): "
            f"{self._scrub(describe(error))}",
            transient=verdict in (Verdict.RETRY, Verdict.BLOCKED),
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request, retrying connection failures, 429 and 5xx with backoff."""
        from elastic_transport import ApiError, ConnectionError, ConnectionTimeout

        last: BaseException | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._sleep(backoff_s(attempt - 1))
            try:
                out = fn()
                # ObjectApiResponse is not a Mapping; hand callers the plain JSON body.
                return cast(T, getattr(out, "body", out))
            except (ConnectionError, ConnectionTimeout) as exc:
                last = exc
            except ApiError as exc:
                failure = self._api_failure(what, exc)
                if isinstance(failure, IndexFull) or classify(
                    int(exc.meta.status), error_of_body(exc.body)
                ) is not Verdict.RETRY:
                    raise failure from None
                last = failure
        if isinstance(last, SinkError):
            raise last
        assert last is not None
        raise self._unreachable(last) from None

    def _bulk(self, ops: Sequence[_Op]) -> list[_Result]:
        """Send ``ops`` in size-bounded chunks; retry what deserves it; one result per op.

        Raises SinkError if, after the retries, some op never got any reply (Elasticsearch
        unreachable), and the IndexFull/SinkError of a whole request that failed for good.
        Item-level flood-stage blocks come back as :attr:`Verdict.FULL` for the caller to raise
        after its phase.
        """
        from elastic_transport import ApiError, ConnectionError, ConnectionTimeout

        results: list[_Result | None] = [None] * len(ops)
        pending = list(range(len(ops)))
        last_exc: BaseException | None = None
        for attempt in range(self.config.max_retries + 1):
            if not pending:
                break
            if attempt:
                self._sleep(backoff_s(attempt - 1))
            retry: list[int] = []
            for chunk in self._chunks(ops, pending):
                try:
                    resp = self._client.bulk(
                        operations=cast(Any, [ops[i].payload for i in chunk]),
                    )
                except (ConnectionError, ConnectionTimeout) as exc:
                    last_exc = exc
                    note = (f"Elasticsearch at {self.url} is unreachable: "
                            f"{type(exc).__name__}")
                    for i in chunk:
                        results[i] = _Result(Verdict.RETRY, 0, connection_failure=note)
                    retry.extend(chunk)
                    continue
                except ApiError as exc:
                    failure = self._api_failure("a bulk request", exc)
                    if classify(int(exc.meta.status), error_of_body(exc.body)) is not (
                        Verdict.RETRY
                    ) or isinstance(failure, IndexFull):
                        raise failure from None
                    for i in chunk:
                        results[i] = _Result(Verdict.RETRY, int(exc.meta.status),
                                             error_of_body(exc.body))
                    retry.extend(chunk)
                    continue
                body = getattr(resp, "body", resp)  # ObjectApiResponse -> dict
                items = body.get("items", []) if isinstance(body, Mapping) else []
                if len(items) != len(chunk):
                    raise SinkError(
                        f"Elasticsearch at {self.url} answered a bulk request of {len(chunk)} "
                        f"actions with {len(items)} results", transient=True,
                    )
                for i, item in zip(chunk, items, strict=True):
                    reply = next(iter(item.values())) if item else {}
                    status = int(reply.get("status", 0))
                    error = reply.get("error")
                    verdict = classify(status, error if isinstance(error, Mapping) else None)
                    results[i] = _Result(verdict, status, error, reply)
                    if verdict is Verdict.RETRY:
                        retry.append(i)
            pending = retry
        final = [r if r is not None else _Result(Verdict.RETRY, 0) for r in results]
        if last_exc is not None and any(final[i].connection_failure for i in pending):
            raise self._unreachable(last_exc) from None
        return final

    def _chunks(self, ops: Sequence[_Op], indices: Sequence[int]) -> Iterator[list[int]]:
        """Group op positions into requests of at most bulk_max_bytes / BULK_MAX_ACTIONS.

        An op larger than the byte limit on its own goes alone (Elasticsearch's own limit,
        http.max_content_length, is 100 MB; ours is about batching, not correctness).
        """
        chunk: list[int] = []
        size = 0
        for i in indices:
            n = len(ops[i].payload)
            if chunk and (size + n > self.config.bulk_max_bytes or len(chunk) >= BULK_MAX_ACTIONS):
                yield chunk
                chunk, size = [], 0
            chunk.append(i)
            size += n
        if chunk:
            yield chunk

    # -- schema -------------------------------------------------------------------------------

    def _template_source(self) -> TemplateSource:
        if self._templates is not None:
            return self._templates
        try:
            return cast(TemplateSource, importlib.import_module("schemas"))
        except ImportError as exc:
            raise SinkError(f"cannot load index templates from the schemas package: {exc}",
                            transient=False) from None

    def _template_bodies(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Templates from the schema package, with the names and alias this sink relies on.

        Index patterns and the read alias are set here, not trusted from the template file,
        because routing (index_for) and the alias are this module's contract.
        """
        source = self._template_source()
        prefix = self.config.index_prefix
        messages = json.loads(json.dumps(source.index_template(prefix)))
        receipts = json.loads(json.dumps(source.receipts_template(prefix)))
        messages["index_patterns"] = [self.names.messages_pattern]
        messages.setdefault("priority", DEFAULT_TEMPLATE_PRIORITY)
        messages.setdefault("template", {}).setdefault("aliases", {})
        messages["template"]["aliases"][self.names.messages_alias] = {}
        receipts["index_patterns"] = [self.names.receipts_pattern]
        receipts.setdefault("priority", DEFAULT_TEMPLATE_PRIORITY)
        receipts.setdefault("template", {}).pop("aliases", None)  # alias set on the index
        return messages, receipts

    def ensure_schema(self) -> None:
        """Install templates, the receipts index and alias, and the undated messages index.

        Idempotent: indices are created only if missing. Creating ``-undated`` up front means
        the read alias exists from the start, so search and count work on an empty archive.
        Monthly indices created before the template existed are added to the alias too.

        Cheap when nothing changed: the last step marks both templates with a hash of what
        was installed (``_meta.popvault_installed``), and a call that finds that mark and both
        aliases changes nothing (two reads instead of half a dozen cluster-state updates,
        which every worker process and every ``poll`` used to pay).
        """
        messages, receipts = self._template_bodies()
        n = self.names
        mark = _install_mark(messages, receipts)
        if self._schema_marked(mark):
            self._ready = True
            return
        self._call("installing index template " + n.messages_template,
                   lambda: self._client.indices.put_index_template(
                       name=n.messages_template, **messages))
        self._call("installing index template " + n.receipts_template,
                   lambda: self._client.indices.put_index_template(
                       name=n.receipts_template, **receipts))
        if not self._call("checking alias " + n.receipts_alias,
                          lambda: bool(self._client.indices.exists_alias(name=n.receipts_alias))):
            if self._call("checking index " + n.receipts_alias,
                          lambda: bool(self._client.indices.exists(index=n.receipts_alias))):
                raise SinkError(
                    f"{n.receipts_alias} exists as a concrete index (written before the schema "
                    f"was installed?); reindex it into {n.receipts_index}, delete it, then run "
                    "`popvault schemas install` again", transient=False)
            self._create_index(n.receipts_index, {n.receipts_alias: {"is_write_index": True}})
        self._create_index(n.undated_index, None)
        self._call("adding alias " + n.messages_alias,  # pattern matches -undated at least
                   lambda: self._client.indices.put_alias(index=n.messages_pattern,
                                                          name=n.messages_alias))
        self._upgrade_mappings(n.messages_pattern, messages)
        self._upgrade_mappings(n.receipts_alias, receipts)
        for name, body in ((n.messages_template, messages), (n.receipts_template, receipts)):
            marked = {**body, "_meta": {**body.get("_meta", {}), INSTALL_MARK: mark}}
            self._call("marking index template " + name,
                       lambda name=name, marked=marked:  # type: ignore[misc]
                       self._client.indices.put_index_template(name=name, **marked))
        self._ready = True

    def _schema_marked(self, mark: str) -> bool:
        """Do both templates carry ``mark`` and both aliases exist? (False on any doubt.)"""
        n = self.names
        try:
            for name in (n.messages_template, n.receipts_template):
                found = self._client.indices.get_index_template(name=name)
                metas = [(t.get("index_template", {}).get("_meta") or {})
                         for t in found.get("index_templates", []) if t.get("name") == name]
                if not metas or metas[0].get(INSTALL_MARK) != mark:
                    return False
            return all(bool(self._client.indices.exists_alias(name=alias))
                       for alias in (n.messages_alias, n.receipts_alias))
        except Exception:  # missing, unreachable, refused: the full install then says which
            return False

    def _upgrade_mappings(self, target: str, template: dict[str, Any]) -> None:
        """Push the template's mapping onto indices that already exist.

        A template only shapes indices created after it; with ``dynamic: strict`` an index
        made by an older popvault would reject documents carrying new fields. Adding fields is
        always allowed; a changed field type is refused by Elasticsearch and reported here.
        """
        mappings = template.get("template", {}).get("mappings")
        if not mappings:
            return
        self._call(f"updating the mapping of existing indices {target}",
                   lambda: self._client.indices.put_mapping(index=target, **mappings))

    def _create_index(self, index: str, aliases: dict[str, Any] | None) -> None:
        from elastic_transport import ApiError

        def create() -> None:
            try:
                if aliases:
                    self._client.indices.create(index=index, aliases=aliases)
                else:
                    self._client.indices.create(index=index)
            except ApiError as exc:
                err = error_of_body(exc.body) or {}
                if err.get("type") != "resource_already_exists_exception":
                    raise

        self._call("creating index " + index, create)

    def _require_schema(self) -> None:
        """Refuse to write into an uninstalled schema (documents would get guessed mappings)."""
        if self._ready:
            return
        n = self.names
        have_template = self._call(
            "checking index template " + n.messages_template,
            lambda: bool(self._client.indices.exists_index_template(name=n.messages_template)))
        have_receipts = self._call(
            "checking alias " + n.receipts_alias,
            lambda: bool(self._client.indices.exists_alias(name=n.receipts_alias)))
        if not (have_template and have_receipts):
            raise SinkError(
                f"the Elasticsearch schema for prefix {self.config.index_prefix!r} is not "
                f"installed at {self.url}: run `popvault schemas install`", transient=False)
        self._ready = True

    # -- write --------------------------------------------------------------------------------

    def index_for(self, document: Mapping[str, Any]) -> str:
        """The concrete index a document is (or would be) stored in."""
        return self.names.index_for(document)

    def write(self, items: Sequence[IndexItem]) -> list[ItemOutcome]:
        """Create or join documents, then create receipts; one outcome per item, in order.

        Raises SinkError (transient) when Elasticsearch cannot be reached after the retries,
        and IndexFull when a flood-stage block refuses writes; the caller then deletes nothing
        (anything already written is found again, idempotently, by the next poll).
        """
        if not items:
            return []
        self._require_schema()
        now = utc_now_iso(self._now())

        # Group by message key: one document per key, first item's document wins.
        groups: dict[str, list[int]] = {}
        for pos, item in enumerate(items):
            groups.setdefault(item.message_key, []).append(pos)
        index_of = {key: self.index_for(items[pos[0]].document) for key, pos in groups.items()}

        # Per item: None while undecided, else (delivery, error) for failures.
        failures: dict[int, tuple[Delivery, str]] = {}
        reasons: dict[int, DuplicateReason] = {}

        # Phase 1: create.
        ops: list[_Op] = []
        op_keys: list[str] = []
        for key, positions in groups.items():
            accounts = list(dict.fromkeys(items[p].account_id for p in positions))
            try:
                source = with_accounts(
                    cap_body_text(items[positions[0]].document, self.config.max_body_chars),
                    accounts)
                ops.append(_make_op("create", index_of[key], key, source))
                op_keys.append(key)
            except (TypeError, ValueError) as exc:
                for p in positions:
                    failures[p] = (Delivery.REJECTED,
                                   f"document {key} cannot be encoded as JSON: {exc}")
        conflicts: list[str] = []
        full_error: tuple[str, Mapping[str, Any] | None] | None = None
        for key, result in zip(op_keys, self._bulk(ops), strict=True):
            positions = groups[key]
            if result.verdict is Verdict.OK:
                self._assign_reasons(items, positions, [], reasons)
            elif result.verdict is Verdict.CONFLICT:
                conflicts.append(key)
            else:
                if result.verdict is Verdict.FULL:
                    full_error = (index_of[key], result.error)
                delivery, text = self._item_failure("document", key, index_of[key], result)
                for p in positions:
                    failures[p] = (delivery, text)
        if full_error:
            raise self._full(*full_error)

        # Phase 2: join existing documents.
        if conflicts:
            joined = self._join(conflicts, groups, items, index_of)
            for key, (existing, failure) in joined.items():
                if failure is not None:
                    for p in groups[key]:
                        failures[p] = failure
                else:
                    self._assign_reasons(items, groups[key], existing, reasons)

        # Phase 3: receipts for acknowledged documents.
        receipts: dict[str, Receipt] = {}
        receipt_positions: dict[str, list[int]] = {}
        for pos, item in enumerate(items):
            if pos in failures or item.uidl is None:
                continue
            rid = receipt_id(item.account_id, item.uidl)
            if rid in receipts:  # same copy twice in one batch: one receipt
                receipt_positions[rid].append(pos)
                continue
            receipts[rid] = Receipt(
                account_id=item.account_id, uidl=item.uidl, message_key=item.message_key,
                raw_sha256=item.raw_sha256, raw_size=item.raw_size, status=item.status,
                reason=reasons[pos], archived_at=now)
            receipt_positions[rid] = [pos]
        stored = self._write_receipts(receipts)

        outcomes: list[ItemOutcome] = []
        for pos, item in enumerate(items):
            reason = reasons.get(pos, DuplicateReason.NEW)
            if pos in failures:
                delivery, text = failures[pos]
                outcomes.append(ItemOutcome(item.message_key, item.account_id, item.uidl,
                                            delivery, reason, error=text))
                continue
            if item.uidl is None:
                outcomes.append(ItemOutcome(item.message_key, item.account_id, None,
                                            Delivery.DELIVERED, reason))
                continue
            rid = receipt_id(item.account_id, item.uidl)
            got = stored[rid]
            if isinstance(got, Receipt):
                if got.message_key != item.message_key:
                    outcomes.append(uidl_reused(item, got, reason))
                else:
                    outcomes.append(ItemOutcome(item.message_key, item.account_id, item.uidl,
                                                Delivery.DELIVERED, reason, receipt=got))
            else:
                delivery, text = got
                outcomes.append(ItemOutcome(item.message_key, item.account_id, item.uidl,
                                            delivery, reason, error=text))
        return outcomes

    @staticmethod
    def _assign_reasons(items: Sequence[IndexItem], positions: Sequence[int],
                        existing: Sequence[str], reasons: dict[int, DuplicateReason]) -> None:
        """Reasons in batch order, as if the items had been written one by one."""
        seen = list(existing)
        for p in positions:
            reasons[p] = join_reason(seen, items[p].account_id)
            if items[p].account_id not in seen:
                seen.append(items[p].account_id)

    def _item_failure(self, what: str, key: str, index: str,
                      result: _Result) -> tuple[Delivery, str]:
        """Outcome and person-readable text for an item that was not acknowledged."""
        if result.verdict is Verdict.REJECT:
            return Delivery.REJECTED, (f"{what} {key} rejected by index {index}: "
                                       f"{self._scrub(describe(result.error))}")
        if result.verdict is Verdict.FULL:
            return Delivery.ERRORED, (f"{what} {key} not written to {index}: "
                                      "flood-stage disk watermark block")
        if result.verdict is Verdict.RETRY:
            return Delivery.ERRORED, (f"{what} {key} not written to {index} after "
                                      f"{self.config.max_retries} retries: "
                                      f"{self._scrub(result.reason())}")
        return Delivery.ERRORED, (f"{what} {key} not written to {index}: "
                                  f"{self._scrub(result.reason())}")

    def _join(self, keys: Sequence[str], groups: Mapping[str, list[int]],
              items: Sequence[IndexItem], index_of: Mapping[str, str],
              ) -> dict[str, tuple[list[str], tuple[Delivery, str] | None]]:
        """Add this batch's accounts to existing documents (read, then guarded partial update).

        Returns per key the accounts the document had *before* this batch (for reasons), or a
        failure. Lost races (409 on if_seq_no) re-read and retry, JOIN_MAX_ATTEMPTS times.
        """
        done: dict[str, tuple[list[str], tuple[Delivery, str] | None]] = {}
        before: dict[str, list[str]] = {}
        pending = list(keys)
        for attempt in range(JOIN_MAX_ATTEMPTS):
            if not pending:
                break
            if attempt:
                self._sleep(random.uniform(0, JOIN_JITTER_S))
            current = self._read_accounts(pending, index_of)
            ops: list[_Op] = []
            op_keys: list[str] = []
            for key in pending:
                state = current.get(key)
                if state is None:
                    done[key] = ([], (Delivery.ERRORED,
                                      f"document {key} in {index_of[key]} answered 'exists' "
                                      "to create but could not be read back; retrying next "
                                      "poll"))
                    continue
                accounts, seq_no, primary_term = state
                before.setdefault(key, accounts)
                batch = [items[p].account_id for p in groups[key]]
                union = list(dict.fromkeys([*accounts, *batch]))
                if union == accounts:
                    done[key] = (before[key], None)
                    continue
                ops.append(_make_op("update", index_of[key], key,
                                    {"doc": {"popvault": {"accounts": union}}},
                                    if_seq_no=seq_no, if_primary_term=primary_term))
                op_keys.append(key)
            pending = []
            for key, result in zip(op_keys, self._bulk(ops), strict=True):
                if result.verdict is Verdict.OK:
                    done[key] = (before[key], None)
                elif result.verdict is Verdict.CONFLICT:
                    pending.append(key)
                elif result.verdict is Verdict.FULL:
                    raise self._full(index_of[key], result.error)
                else:
                    done[key] = ([], self._item_failure("document", key, index_of[key], result))
        for key in pending:
            done[key] = ([], (Delivery.ERRORED,
                              f"document {key} in {index_of[key]} kept changing while adding "
                              f"an account ({JOIN_MAX_ATTEMPTS} attempts); retrying next poll"))
        return done

    def _read_accounts(self, keys: Sequence[str], index_of: Mapping[str, str],
                       ) -> dict[str, tuple[list[str], int, int]]:
        """Realtime read of ``popvault.accounts`` with the seq_no/primary_term to guard on."""
        found: dict[str, tuple[list[str], int, int]] = {}
        for start in range(0, len(keys), MGET_CHUNK_IDS):
            chunk = keys[start:start + MGET_CHUNK_IDS]
            docs = [{"_index": index_of[k], "_id": k, "_source": ["popvault.accounts"]}
                    for k in chunk]
            resp = self._call("reading existing documents",
                              lambda docs=docs: self._client.mget(docs=docs))  # type: ignore[misc]
            for doc in resp.get("docs", []):
                if not doc.get("found"):
                    continue
                accounts = ((doc.get("_source") or {}).get("popvault") or {}).get("accounts")
                if isinstance(accounts, str):
                    accounts = [accounts]
                found[doc["_id"]] = (list(accounts or []), int(doc["_seq_no"]),
                                     int(doc["_primary_term"]))
        return found

    def _write_receipts(self, receipts: Mapping[str, Receipt],
                        ) -> dict[str, Receipt | tuple[Delivery, str]]:
        """Create receipts; an existing one (409) is kept and returned instead of ours."""
        if not receipts:
            return {}
        alias = self.names.receipts_alias
        ids = list(receipts)
        ops = [_make_op("create", alias, rid, receipts[rid].to_dict(), require_alias=True)
               for rid in ids]
        out: dict[str, Receipt | tuple[Delivery, str]] = {}
        existing_ids: list[str] = []
        full: Mapping[str, Any] | None = None
        for rid, result in zip(ids, self._bulk(ops), strict=True):
            if result.verdict is Verdict.OK:
                out[rid] = receipts[rid]
            elif result.verdict is Verdict.CONFLICT:
                existing_ids.append(rid)
            else:
                if result.verdict is Verdict.FULL:
                    full = result.error or {}
                out[rid] = self._item_failure("receipt", rid, alias, result)
        if full is not None:
            raise self._full(alias, full)
        if existing_ids:
            stored = self._mget_receipts(existing_ids)
            for rid in existing_ids:
                out[rid] = stored.get(rid) or (
                    Delivery.ERRORED,
                    f"receipt {rid} answered 'exists' to create but could not be read back")
        return out

    def _mget_receipts(self, ids: Sequence[str]) -> dict[str, Receipt]:
        found: dict[str, Receipt] = {}
        alias = self.names.receipts_alias
        for start in range(0, len(ids), MGET_CHUNK_IDS):
            chunk = list(ids[start:start + MGET_CHUNK_IDS])
            resp = self._call("reading receipts",
                              lambda chunk=chunk: self._client.mget(  # type: ignore[misc]
                                  index=alias, ids=chunk))
            for doc in resp.get("docs", []):
                if doc.get("found"):
                    found[doc["_id"]] = Receipt.from_dict(doc["_source"])
        return found

    # -- reads --------------------------------------------------------------------------------

    def get_receipts(self, account_id: str, uidls: Iterable[str]) -> dict[str, Receipt]:
        """Receipts of these UIDLs, keyed by UIDL; realtime ``mget``, no refresh needed."""
        by_id = {receipt_id(account_id, u): u for u in dict.fromkeys(uidls)}
        if not by_id:
            return {}
        found = self._mget_receipts(list(by_id))
        return {by_id[rid]: receipt for rid, receipt in found.items()}

    def accounts_of(self, message_keys: Iterable[str], *,
                    index_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        """Accounts each already-indexed key was seen in.

        Keys whose index the caller gives (``index_of``, from :meth:`index_for` on the
        document) are read with a realtime ``mget`` on that index: exact and cheap. Others are
        looked up across the read alias, where ``mget`` cannot go (several indices), with an
        ``ids`` search after a refresh of the alias -- correct, but each call costs a refresh,
        so the poll loop should pass ``index_of``.
        """
        keys = list(dict.fromkeys(message_keys))
        hinted = [k for k in keys if index_of and k in index_of]
        others = [k for k in keys if not (index_of and k in index_of)]
        result: dict[str, list[str]] = {}
        if hinted:
            assert index_of is not None
            for key, (accounts, _s, _p) in self._read_accounts(hinted, index_of).items():
                result[key] = accounts
        if others:
            alias = self.names.messages_alias
            self._call("refreshing " + alias,
                       lambda: self._client.indices.refresh(index=alias))
            for start in range(0, len(others), MGET_CHUNK_IDS):
                chunk = others[start:start + MGET_CHUNK_IDS]
                resp = self._call("looking up message keys", lambda chunk=chunk: (  # type: ignore[misc]
                    self._client.search(index=alias, query={"ids": {"values": chunk}},
                                        size=len(chunk), source_includes=["popvault.accounts"])))
                for hit in resp["hits"]["hits"]:
                    accounts = ((hit.get("_source") or {}).get("popvault") or {}).get(
                        "accounts") or []
                    result[hit["_id"]] = [accounts] if isinstance(accounts, str) else list(
                        accounts)
        return result

    def mark_deleted(self, account_id: str, uidls: Sequence[str], when: str) -> None:
        """Set ``deleted_at`` on these receipts (partial updates; missing receipts ignored)."""
        if not uidls:
            return
        alias = self.names.receipts_alias
        ids = [receipt_id(account_id, u) for u in dict.fromkeys(uidls)]
        ops = [_make_op("update", alias, rid, {"doc": {"deleted_at": when}}, require_alias=True)
               for rid in ids]
        problems: list[str] = []
        for rid, result in zip(ids, self._bulk(ops), strict=True):
            if result.verdict is Verdict.FULL:
                raise self._full(alias, result.error)
            if result.verdict not in (Verdict.OK, Verdict.MISSING):
                problems.append(f"{rid}: {self._scrub(result.reason())}")
        if problems:
            raise SinkError(
                f"could not record deletion on {len(problems)} receipt(s) in {alias}: "
                + "; ".join(problems[:5]), account_id=account_id, transient=True)

    def count_documents(self) -> int:
        alias = self.names.messages_alias
        self._call("refreshing " + alias, lambda: self._client.indices.refresh(index=alias))
        resp = self._call("counting documents", lambda: self._client.count(index=alias))
        return int(resp["count"])

    def count_receipts(self, account_id: str | None = None, *, live_only: bool = False) -> int:
        """Receipts stored (for one account, or all; ``live_only``: copies not yet deleted
        from the server); refreshes first."""
        alias = self.names.receipts_alias
        filters: list[dict[str, Any]] = []
        if account_id:
            filters.append({"term": {"account_id": account_id}})
        must_not = [{"exists": {"field": "deleted_at"}}] if live_only else []
        query = {"bool": {"filter": filters, "must_not": must_not}}
        self._call("refreshing " + alias, lambda: self._client.indices.refresh(index=alias))
        resp = self._call("counting receipts",
                          lambda: self._client.count(index=alias, query=query))
        return int(resp["count"])

    def search(self, query: str, *, limit: int = 20) -> SearchResult:
        """Run popvault's search syntax on the read alias; best match first, then newest.

        Raises QuerySyntaxError (a ValueError) for bad syntax, before any request. Not
        refreshed: search sees what Elasticsearch has made searchable (about 1 s behind).
        """
        es_query = to_es_query(parse_query(query))
        size = max(0, min(limit, MAX_SEARCH_LIMIT))
        alias = self.names.messages_alias
        resp = self._call("searching " + alias, lambda: self._client.search(
            index=alias, query=es_query, size=size, track_total_hits=True,
            sort=[{"_score": {"order": "desc"}},
                  {"@timestamp": {"order": "desc", "unmapped_type": "date"}}]))
        hits = [SearchHit(message_key=h["_id"], score=h.get("_score"),
                          document=h.get("_source") or {}) for h in resp["hits"]["hits"]]
        return SearchResult(total=int(resp["hits"]["total"]["value"]), hits=hits)

    def refresh(self) -> None:
        """Make everything written so far searchable (tests, and before summaries)."""
        for name in (self.names.messages_alias, self.names.receipts_alias):
            self._call("refreshing " + name,
                       lambda name=name: self._client.indices.refresh(index=name))  # type: ignore[misc]

    # -- full scans (reconcile, migrate, verify) ------------------------------------------------

    def iter_documents(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every document as (message_key, source), in no particular order."""
        for hit in self.scan(self.names.messages_alias, {"match_all": {}}):
            yield hit["_id"], hit.get("_source") or {}

    def iter_receipts(self, account_id: str | None = None) -> Iterator[Receipt]:
        """Every receipt (of one account, or all), in no particular order."""
        query = {"term": {"account_id": account_id}} if account_id else {"match_all": {}}
        for hit in self.scan(self.names.receipts_alias, query):
            yield Receipt.from_dict(hit["_source"])

    def scan(self, index: str, query: dict[str, Any], *,
             source: list[str] | bool = True,
             sort: list[dict[str, Any]] | None = None,
             page_size: int = SCAN_PAGE_SIZE,
             keep_alive: str = SCAN_KEEP_ALIVE,
             what: str = "scanning") -> Iterator[dict[str, Any]]:
        """All hits via a point in time + search_after (consistent view; core since 8.x).

        A point in time sees only refreshed data, so the index is refreshed first: a scan right
        after a write must include it (reconcile, verify, retention and export compare against
        what was written). ``sort`` must end with a tiebreaker; the default is ``_shard_doc``.
        """
        self._call("refreshing " + index, lambda: self._client.indices.refresh(index=index))
        pit = self._call("opening a point in time on " + index,
                         lambda: self._client.open_point_in_time(index=index,
                                                                 keep_alive=keep_alive))
        pit_id: str = pit["id"]
        try:
            after: list[Any] | None = None
            while True:
                kwargs: dict[str, Any] = {
                    "pit": {"id": pit_id, "keep_alive": keep_alive},
                    "query": query, "size": page_size, "source": source,
                    "sort": sort or [{"_shard_doc": "asc"}], "track_total_hits": False,
                }
                if after is not None:
                    kwargs["search_after"] = after
                resp = self._call(f"{what} {index}",
                                  lambda kwargs=kwargs: self._client.search(**kwargs))  # type: ignore[misc]
                pit_id = resp.get("pit_id", pit_id)
                hits = resp["hits"]["hits"]
                if not hits:
                    return
                yield from hits
                after = hits[-1]["sort"]
        finally:
            with contextlib.suppress(Exception):  # best effort: the PIT expires on its own
                self._client.close_point_in_time(id=pit_id)

    def close(self) -> None:
        self._client.close()


INSTALL_MARK = "popvault_installed"
"""Template ``_meta`` key set once a full :meth:`ElasticsearchSink.ensure_schema` completed."""


def _install_mark(messages: dict[str, Any], receipts: dict[str, Any]) -> str:
    """A short hash of both template bodies: a new popvault version or prefix changes it."""
    import hashlib

    text = json.dumps([messages, receipts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
