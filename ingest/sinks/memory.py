"""An in-memory :class:`~ingest.sinks.base.Sink` for unit tests of the poll logic.

It follows the Elasticsearch sink's rules exactly where the poll logic can observe them --
create-or-join by message key, ``popvault.accounts`` as the union of accounts, receipts only
after the document, a kept original receipt on replay, the same duplicate reasons, body text
capped at ``max_body_chars`` -- and it shares the helpers that define them
(:func:`~ingest.sinks.elasticsearch.join_reason`, :func:`cap_body_text`, ...), which are pure and
import no client.

Failure injection (tests swap behaviour, they do not monkeypatch):

* ``fail(item)`` is asked before an item's document is written; returning
  ``Delivery.ERRORED`` or ``Delivery.REJECTED`` fails that item with that outcome.
* ``fail_receipt(item)`` does the same for the receipt, after the document is stored (the
  "document acknowledged, receipt not" case: the item is not DELIVERED, the document stays).
* ``unavailable = True`` makes every call raise a transient :class:`SinkError`, like an
  unreachable cluster; ``full = True`` makes writes raise :class:`IndexFull`.

Search evaluates the whole :mod:`ingest.searchquery` tree, but simply: words and phrases are
case-insensitive *substrings* of subject, body text or attachment names (Elasticsearch matches
analysed words, so ``rep`` finds ``report`` here but not there); results are newest first, with
no scores.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ingest.docpath import field_values
from ingest.errors import IndexFull, SinkError
from ingest.outcome import Delivery, DuplicateReason
from ingest.searchquery import (
    FIELD_ACCOUNTS,
    FIELD_ATTACHMENT_TEXT,
    FIELD_BODY,
    FIELD_FILENAME,
    FIELD_FROM,
    FIELD_HAS_ATTACHMENTS,
    FIELD_SUBJECT,
    FIELD_TIMESTAMP,
    FIELDS_TO,
    Account,
    Address,
    AddressRole,
    Clause,
    DateBound,
    DateTerm,
    Filename,
    HasAttachment,
    Text,
    TextScope,
    parse_query,
)
from ingest.sinks.base import (
    IndexItem,
    ItemOutcome,
    Receipt,
    SearchHit,
    SearchResult,
    receipt_id,
    uidl_reused,
)
from ingest.sinks.elasticsearch import (
    IndexNames,
    cap_body_text,
    join_reason,
    utc_now_iso,
    with_accounts,
)

FailHook = Callable[[IndexItem], Delivery | None]
DEFAULT_MAX_BODY_CHARS = 1_000_000
"""Same default as ElasticsearchConfig.max_body_chars."""


class MemorySink:
    """Documents and receipts in dicts; see the module docstring for the injection hooks."""

    name = "memory"

    def __init__(
        self,
        *,
        fail: FailHook | None = None,
        fail_receipt: FailHook | None = None,
        max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
        prefix: str = "popvault",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.fail = fail
        self.fail_receipt = fail_receipt
        self.max_body_chars = max_body_chars
        self.names = IndexNames(prefix)
        self.unavailable = False
        self.full = False
        self.documents: dict[str, dict[str, Any]] = {}  # message_key -> document
        self.indices: dict[str, str] = {}  # message_key -> index it would live in
        self.receipts: dict[str, Receipt] = {}  # receipt_id -> receipt
        self.schema_installs = 0
        self.write_calls = 0
        self.closed = False
        self._now = now

    def _check(self, writing: bool = False) -> None:
        if self.unavailable:
            raise SinkError("Elasticsearch at memory:// is unreachable: injected", transient=True)
        if writing and self.full:
            raise IndexFull("Elasticsearch blocked writes: disk usage exceeded the flood-stage "
                            "watermark (injected); free disk space, then poll again")

    def ensure_schema(self) -> None:
        self._check()
        self.schema_installs += 1

    def index_for(self, document: Mapping[str, Any]) -> str:
        return self.names.index_for(document)

    def write(self, items: Sequence[IndexItem]) -> list[ItemOutcome]:
        """Same contract as ElasticsearchSink.write, item by item in batch order."""
        self._check(writing=True)
        self.write_calls += 1
        now = utc_now_iso(self._now())
        outcomes: list[ItemOutcome] = []
        for item in items:
            injected = self.fail(item) if self.fail else None
            if injected is not None and injected is not Delivery.DELIVERED:
                outcomes.append(self._failed(item, injected, "document", DuplicateReason.NEW))
                continue
            existing = self.documents.get(item.message_key)
            if existing is None:
                reason = DuplicateReason.NEW
                doc = with_accounts(cap_body_text(copy.deepcopy(item.document),
                                                  self.max_body_chars), [item.account_id])
                self.documents[item.message_key] = doc
                self.indices[item.message_key] = self.index_for(item.document)
            else:
                accounts: list[str] = existing["popvault"]["accounts"]
                reason = join_reason(accounts, item.account_id)
                if item.account_id not in accounts:
                    accounts.append(item.account_id)
            if item.uidl is None:
                outcomes.append(ItemOutcome(item.message_key, item.account_id, None,
                                            Delivery.DELIVERED, reason))
                continue
            injected = self.fail_receipt(item) if self.fail_receipt else None
            if injected is not None and injected is not Delivery.DELIVERED:
                outcomes.append(self._failed(item, injected, "receipt", reason))
                continue
            rid = receipt_id(item.account_id, item.uidl)
            stored = self.receipts.get(rid)
            if stored is None:
                stored = Receipt(
                    account_id=item.account_id, uidl=item.uidl, message_key=item.message_key,
                    raw_sha256=item.raw_sha256, raw_size=item.raw_size, status=item.status,
                    reason=reason, archived_at=now)
                self.receipts[rid] = stored
            elif stored.message_key != item.message_key:
                outcomes.append(uidl_reused(item, stored, reason))
                continue
            outcomes.append(ItemOutcome(item.message_key, item.account_id, item.uidl,
                                        Delivery.DELIVERED, reason, receipt=stored))
        return outcomes

    def _failed(self, item: IndexItem, delivery: Delivery, what: str,
                reason: DuplicateReason) -> ItemOutcome:
        index = self.names.receipts_alias if what == "receipt" else self.index_for(item.document)
        name = item.message_key if what == "document" else receipt_id(item.account_id,
                                                                        item.uidl or "")
        if delivery is Delivery.REJECTED:
            text = f"{what} {name} rejected by index {index}: injected permanent failure"
        else:
            text = f"{what} {name} not written to {index}: injected transient failure"
        return ItemOutcome(item.message_key, item.account_id, item.uidl, delivery, reason,
                           error=text)

    def get_receipts(self, account_id: str, uidls: Iterable[str]) -> dict[str, Receipt]:
        self._check()
        found: dict[str, Receipt] = {}
        for uidl in uidls:
            receipt = self.receipts.get(receipt_id(account_id, uidl))
            if receipt is not None:
                found[uidl] = receipt
        return found

    def accounts_of(self, message_keys: Iterable[str], *,
                    index_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        self._check()
        return {k: list(self.documents[k]["popvault"]["accounts"])
                for k in message_keys if k in self.documents}

    def mark_deleted(self, account_id: str, uidls: Sequence[str], when: str) -> None:
        self._check(writing=True)
        for uidl in uidls:
            rid = receipt_id(account_id, uidl)
            if rid in self.receipts:
                self.receipts[rid] = replace(self.receipts[rid], deleted_at=when)

    def count_documents(self) -> int:
        self._check()
        return len(self.documents)

    def count_receipts(self, account_id: str | None = None, *, live_only: bool = False) -> int:
        self._check()
        return sum(1 for r in self.receipts.values()
                   if (account_id is None or r.account_id == account_id)
                   and not (live_only and r.deleted_at))

    def refresh(self) -> None:
        self._check()

    def search(self, query: str, *, limit: int = 20) -> SearchResult:
        """Substring semantics, newest first (see the module docstring)."""
        parsed = parse_query(query)
        self._check()
        hits = [(key, doc) for key, doc in self.documents.items()
                if all(_holds(c, doc) for c in parsed.clauses)]
        hits.sort(key=lambda kv: str(_get(kv[1], FIELD_TIMESTAMP) or ""), reverse=True)
        return SearchResult(total=len(hits), hits=[
            SearchHit(message_key=k, score=None, document=copy.deepcopy(d))
            for k, d in hits[:max(0, limit)]])

    def iter_documents(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self._check()
        for key, doc in list(self.documents.items()):
            yield key, copy.deepcopy(doc)

    def iter_receipts(self, account_id: str | None = None) -> Iterator[Receipt]:
        self._check()
        for receipt in list(self.receipts.values()):
            if account_id is None or receipt.account_id == account_id:
                yield receipt

    def close(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------------------------
# query evaluation (reference semantics, simple on purpose)
# ---------------------------------------------------------------------------------------------


def _get(doc: Mapping[str, Any], dotted: str) -> Any:
    """Values at a dotted path (see :func:`ingest.docpath.field_values`); ``@timestamp`` is one
    value, like the date field it is in the index."""
    values = field_values(doc, dotted)
    if dotted == FIELD_TIMESTAMP:
        return values[0] if values else None
    return values


def _strings(doc: Mapping[str, Any], dotted: str) -> list[str]:
    return [str(v).lower() for v in _get(doc, dotted) if v is not None]


def _address_matches(term: Address, values: list[str]) -> bool:
    domain = term.domain
    if domain is not None:
        return any(v.endswith("@" + domain) for v in values)
    return term.value in values


def _timestamp(doc: Mapping[str, Any]) -> dt.datetime | None:
    raw = _get(doc, FIELD_TIMESTAMP)
    if not isinstance(raw, str):
        return None
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _holds(clause: Clause, doc: Mapping[str, Any]) -> bool:
    term = clause.term
    result: bool
    if isinstance(term, Text):
        needle = term.value.lower()
        fields = [FIELD_SUBJECT] if term.scope is TextScope.SUBJECT else [
            FIELD_SUBJECT, FIELD_BODY, FIELD_ATTACHMENT_TEXT, FIELD_FILENAME]
        result = any(needle in s for f in fields for s in _strings(doc, f))
    elif isinstance(term, Address):
        fields = [FIELD_FROM] if term.role is AddressRole.FROM else list(FIELDS_TO)
        result = _address_matches(term, [s for f in fields for s in _strings(doc, f)])
    elif isinstance(term, DateTerm):
        when = _timestamp(doc)
        if when is None:
            result = False
        elif term.bound is DateBound.AFTER:
            result = when >= term.instant
        else:
            result = when < term.instant
    elif isinstance(term, HasAttachment):
        result = any(v is True for v in _get(doc, FIELD_HAS_ATTACHMENTS))
    elif isinstance(term, Account):
        result = term.account_id in [str(v) for v in _get(doc, FIELD_ACCOUNTS)]
    elif isinstance(term, Filename):
        result = any(term.value in s for s in _strings(doc, FIELD_FILENAME))
    else:  # pragma: no cover - Term is a closed union
        raise TypeError(f"unknown search term {term!r}")
    return result != clause.negated
