"""Per-message delivery outcomes and the words receipts use.

Modelled on Vector's event finalization: a message ends Delivered, Errored (transient, try
again next poll) or Rejected (permanent, needs a person). Only Delivered allows deletion;
the DELE rule itself is applied in one place, ``AccountPoller._deletions`` (ingest/poll.py).
"""

from __future__ import annotations

from enum import StrEnum


class Delivery(StrEnum):
    DELIVERED = "delivered"
    ERRORED = "errored"
    REJECTED = "rejected"


class ReceiptStatus(StrEnum):
    """Why a (account, UIDL) pair needs no further download; stored in each receipt."""

    ARCHIVED = "archived"  # raw stored, document indexed: this copy made or joined the doc
    OVERSIZE = "oversize"  # archived raw; indexed from headers only
    PARSE_FAILED = "parse_failed"  # archived raw; indexed with parse_error
    EXPIRED = "expired"  # document removed by retention; kept so the UIDL is never fetched again


class DuplicateReason(StrEnum):
    """Answers "why is this message a duplicate?"."""

    NEW = "new"
    UIDL_ALREADY_ARCHIVED = "uidl_already_archived"
    SAME_MESSAGE_OTHER_ACCOUNT = "same_message_other_account"
    SAME_MESSAGE_SAME_ACCOUNT = "same_message_same_account"
