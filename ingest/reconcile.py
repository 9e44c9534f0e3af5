"""Account for every message a POP3 server holds: archived, pending, or wrong, and why.

``popvault poll`` proves each message it deletes; reconciliation proves the rest. It asks the
server for UIDL and LIST (read-only: no RETR, no DELE, and the session is closed without QUIT
so nothing can be expunged), then looks each UIDL up in the receipts, the index and the raw
store. A receipt is only written after its document and raw bytes were acknowledged, so any
message with a receipt and without either of those is a real inconsistency (an index restored
from an old snapshot, a document deleted by hand, an object lost on disk) and makes the command
fail; a message without a receipt is simply not polled yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ingest.archive import FilesystemStore
from ingest.config import AccountConfig, resolve_secret
from ingest.outcome import ReceiptStatus
from ingest.pop3.session import Pop3Session
from ingest.sinks.base import Receipt


class State(StrEnum):
    """What is true of one server message; only ``inconsistent`` makes reconcile fail."""

    ARCHIVED = "archived"  # receipt, document (listing this account) and raw object present
    PENDING = "pending"  # no receipt yet: the next poll fetches it
    OVERSIZE = "oversize"  # archived raw, indexed from headers only (receipt status)
    PARSE_FAILED = "parse_failed"  # archived raw, indexed with a parse_error (receipt status)
    EXPIRED = "expired"  # retention removed the document; the receipt keeps the UIDL
    INCONSISTENT = "inconsistent"  # a receipt promises something that is not there


class ReconcileSink(Protocol):
    def get_receipts(self, account_id: str, uidls: Any) -> dict[str, Receipt]: ...
    def accounts_of(self, message_keys: Any, *, index_of: Any = None) -> dict[str, list[str]]:
        ...
    def iter_receipts(self, account_id: str | None = None) -> Iterator[Receipt]: ...


@dataclass(frozen=True)
class MessageState:
    number: int
    uidl: str
    size: int | None
    state: State
    reason: str | None = None
    message_key: str | None = None
    raw_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "uidl": self.uidl, "size": self.size,
                "state": str(self.state), "reason": self.reason,
                "message_key": self.message_key, "raw_sha256": self.raw_sha256}


@dataclass
class ReconcileReport:
    account_id: str
    messages: list[MessageState] = field(default_factory=list)
    receipts_not_on_server: int = 0
    """Receipts of copies the server no longer lists (deleted by us or by someone else)."""
    receipts_deleted_elsewhere: int = 0
    """Of those, how many popvault did not delete itself (no ``deleted_at``): informational."""

    @property
    def counts(self) -> dict[str, int]:
        out = {str(s): 0 for s in State}
        for m in self.messages:
            out[str(m.state)] += 1
        return out

    @property
    def ok(self) -> bool:
        return all(m.state is not State.INCONSISTENT for m in self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {"account_id": self.account_id, "ok": self.ok, "server_messages":
                len(self.messages), "counts": self.counts,
                "receipts_not_on_server": self.receipts_not_on_server,
                "receipts_deleted_elsewhere": self.receipts_deleted_elsewhere,
                "messages": [m.to_dict() for m in self.messages]}


@dataclass(frozen=True)
class ServerListing:
    """What the server holds: message number -> (UIDL, size)."""

    uidls: dict[int, str]
    sizes: dict[int, int]


def list_server(account: AccountConfig) -> ServerListing:
    """UIDL and LIST in one read-only session, closed without QUIT (nothing is expunged)."""
    password = token = None
    if account.auth == "xoauth2":
        token = resolve_secret(account.token, what="token", account_id=account.id)
    else:
        password = resolve_secret(account.password, what="password", account_id=account.id)
    session = Pop3Session.open(account, password=password, token=token,
                               deadline_s=account.session_deadline_s)
    try:
        uidls = session.uidl() or {}
        sizes = session.list_sizes()
    finally:
        session.close()
    return ServerListing(uidls=uidls, sizes=sizes)


_STATUS_STATE = {
    ReceiptStatus.OVERSIZE: State.OVERSIZE,
    ReceiptStatus.PARSE_FAILED: State.PARSE_FAILED,
}


def classify(account_id: str, listing: ServerListing, sink: ReconcileSink,
             store: FilesystemStore, *, exists: Callable[[str], bool] | None = None
             ) -> ReconcileReport:
    """One :class:`MessageState` per server message; see the module docstring."""
    report = ReconcileReport(account_id)
    on_server = set(listing.uidls.values())
    receipts = sink.get_receipts(account_id, sorted(on_server))
    keys = sorted({r.message_key for r in receipts.values()
                   if r.status is not ReceiptStatus.EXPIRED})
    indexed = sink.accounts_of(keys) if keys else {}
    has_raw = exists or store.exists
    for number in sorted(listing.uidls):
        uidl = listing.uidls[number]
        size = listing.sizes.get(number)
        receipt = receipts.get(uidl)
        if receipt is None:
            report.messages.append(MessageState(number, uidl, size, State.PENDING,
                                                "no receipt yet: the next poll fetches it"))
            continue
        state, reason = _judge(receipt, indexed, has_raw)
        report.messages.append(MessageState(number, uidl, size, state, reason,
                                            receipt.message_key, receipt.raw_sha256))
    for receipt in sink.iter_receipts(account_id):
        if receipt.uidl not in on_server:
            report.receipts_not_on_server += 1
            if receipt.deleted_at is None:
                report.receipts_deleted_elsewhere += 1
    return report


def _judge(receipt: Receipt, indexed: dict[str, list[str]],
           has_raw: Callable[[str], bool]) -> tuple[State, str | None]:
    if receipt.status is ReceiptStatus.EXPIRED:
        return State.EXPIRED, receipt.note or "document removed by retention"
    problems: list[str] = []
    accounts = indexed.get(receipt.message_key)
    if accounts is None:
        problems.append(f"receipt but document {receipt.message_key[:16]} is missing from "
                        "the index")
    elif receipt.account_id not in accounts:
        problems.append(f"receipt but document {receipt.message_key[:16]} does not list "
                        f"account {receipt.account_id!r}")
    if not has_raw(receipt.raw_sha256):
        problems.append(f"receipt but raw object {receipt.raw_sha256[:16]} is missing from "
                        "the archive")
    if problems:
        return State.INCONSISTENT, "; ".join(problems)
    return _STATUS_STATE.get(receipt.status, State.ARCHIVED), None


def reconcile_account(account: AccountConfig, sink: ReconcileSink,
                      store: FilesystemStore) -> ReconcileReport:
    """List the server, then classify every message it holds."""
    return classify(account.id, list_server(account), sink, store)
