"""The sink contract: a batch of messages in, one outcome per message out.

A sink stores two kinds of record:

* a **document** per distinct message, ``_id`` = ``message_key``; a copy of the same message
  seen in another account or fetched again joins the existing document (its account id is added
  to ``popvault.accounts``), it never creates a second one;
* a **receipt** per ``(account_id, uidl)``, written only after that message's document is
  acknowledged. A receipt is what lets a later poll skip the download and lets DELE go out.

``write`` must be idempotent: replaying the same batch changes nothing. It returns, per item,
``Delivery.DELIVERED`` only when both the document and the receipt are durably acknowledged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.outcome import Delivery, DuplicateReason, ReceiptStatus

RECEIPT_ID_SEPARATOR = ":"  # account ids never contain ':' (see config.ACCOUNT_ID_RE)


def receipt_id(account_id: str, uidl: str) -> str:
    """The one place a receipt's id is built."""
    return f"{account_id}{RECEIPT_ID_SEPARATOR}{uidl}"


@dataclass(frozen=True)
class Receipt:
    """Durable record that one server copy (account, UIDL) is archived and indexed."""

    account_id: str
    uidl: str
    message_key: str
    raw_sha256: str
    raw_size: int
    status: ReceiptStatus
    reason: DuplicateReason
    archived_at: str  # ISO 8601 UTC
    deleted_at: str | None = None
    note: str | None = None

    @property
    def id(self) -> str:
        return receipt_id(self.account_id, self.uidl)

    def to_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "uidl": self.uidl,
            "message_key": self.message_key,
            "raw_sha256": self.raw_sha256,
            "raw_size": self.raw_size,
            "status": str(self.status),
            "reason": str(self.reason),
            "archived_at": self.archived_at,
            "deleted_at": self.deleted_at,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Receipt:
        return cls(
            account_id=data["account_id"],
            uidl=data["uidl"],
            message_key=data["message_key"],
            raw_sha256=data["raw_sha256"],
            raw_size=int(data["raw_size"]),
            status=ReceiptStatus(data["status"]),
            reason=DuplicateReason(data["reason"]),
            archived_at=data["archived_at"],
            deleted_at=data.get("deleted_at"),
            note=data.get("note"),
        )


@dataclass
class IndexItem:
    """One message copy to index: its document and the receipt to write once it is indexed.

    ``document`` is the full document as built by :mod:`ingest.document` (without
    ``popvault.accounts``, which the sink maintains). ``uidl`` is None for imports that have
    no server copy; then no receipt is written.
    """

    message_key: str
    account_id: str
    uidl: str | None
    raw_sha256: str
    raw_size: int
    document: dict[str, Any]
    status: ReceiptStatus = ReceiptStatus.ARCHIVED


@dataclass
class ItemOutcome:
    """What happened to one :class:`IndexItem`."""

    message_key: str
    account_id: str
    uidl: str | None
    delivery: Delivery
    reason: DuplicateReason = DuplicateReason.NEW
    error: str | None = None  # a person-readable cause when not delivered
    receipt: Receipt | None = None


def uidl_reused(item: IndexItem, stored: Receipt, reason: DuplicateReason) -> ItemOutcome:
    """REJECTED: ``item``'s UIDL already has a receipt (``stored``) for another message."""
    return ItemOutcome(
        item.message_key, item.account_id, item.uidl, Delivery.REJECTED, reason,
        error=(f"UIDL {item.uidl!r} of account {item.account_id!r} already has a "
               f"receipt for message {stored.message_key}, but the server now "
               f"returns message {item.message_key} for it (UIDL reused?); "
               "left on the server for a person to check"),
        receipt=stored)


@dataclass
class SearchHit:
    message_key: str
    score: float | None
    document: dict[str, Any]


@dataclass
class SearchResult:
    total: int
    hits: list[SearchHit] = field(default_factory=list)


class Sink(Protocol):
    """What every sink (Elasticsearch, embedded, memory) provides."""

    name: str

    def ensure_schema(self) -> None:
        """Create templates, indices and aliases if missing; idempotent."""

    def get_receipts(self, account_id: str, uidls: Iterable[str]) -> dict[str, Receipt]:
        """Receipts that exist for these UIDLs of the account, keyed by UIDL (realtime)."""
        ...

    def accounts_of(self, message_keys: Iterable[str], *,
                    index_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        """For keys already indexed: the accounts each was seen in (realtime).

        ``index_of`` may say where a key lives, which lets a sink skip a costly lookup.
        """
        ...

    def write(self, items: Sequence[IndexItem]) -> list[ItemOutcome]:
        """Index documents, then write receipts for those acknowledged; one outcome per item."""
        ...

    def count_receipts(self, account_id: str | None = None, *, live_only: bool = False) -> int:
        """Receipts stored for an account (``live_only``: copies still on the server)."""
        ...

    def mark_deleted(self, account_id: str, uidls: Sequence[str], when: str) -> None:
        """Record on the receipts that these copies were deleted from the server."""

    def refresh(self) -> None:
        """Make everything written so far visible to search (end of a poll run)."""

    def search(self, query: str, *, limit: int = 20) -> SearchResult:
        """Run popvault's search syntax (see :mod:`ingest.searchquery`)."""
        ...

    def count_documents(self) -> int:
        """Number of distinct messages indexed (refreshes first, for tests and summaries)."""
        ...

    def close(self) -> None:
        """Release connections."""
