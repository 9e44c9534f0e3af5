"""The one decision every Elasticsearch reply goes through: done, try again, or give up.

Modelled on Vector's ``sinks/elasticsearch/retry.rs``: 429 and 5xx are worth another try after a
backoff, other 4xx will fail the same way forever, and a ``200`` bulk reply with
``"errors": true`` is judged item by item. Two things are split out of "4xx" because a person
must act on them, not the message: the flood-stage disk block (:attr:`Verdict.FULL`, which stops
the whole poll) and other cluster/index blocks (:attr:`Verdict.BLOCKED`, errored until lifted).

This module is pure: no client import, no I/O, so it is unit-tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

INITIAL_BACKOFF_S = 0.5
"""Wait before the first retry of a request or item; doubles on every further attempt."""
MAX_BACKOFF_S = 30.0
"""Longest single wait between two attempts, however many retries are configured."""
ERROR_REASON_MAX_CHARS = 500
"""Elasticsearch reasons can quote whole field values; keep this much of them in outcomes."""

FLOOD_STAGE_MARKERS = (
    "flood-stage",
    "flood stage",
    "read-only-allow-delete",
    "read_only_allow_delete",
    "read-only / allow delete",
    "FORBIDDEN/12/",
    "TOO_MANY_REQUESTS/12/",
)
"""Texts that identify the disk-watermark write block (block id 12) across ES 6-9 wordings:
``FORBIDDEN/12/index read-only / allow delete (api)`` before 7.x,
``TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has
read-only-allow-delete block`` since."""

RETRYABLE_ERROR_TYPES = ("es_rejected_execution_exception", "circuit_breaking_exception",
                         "unavailable_shards_exception", "node_not_connected_exception",
                         "no_shard_available_action_exception")
"""Error types that are load or recovery, whatever status code a proxy turned them into."""
BLOCKING_ERROR_TYPES = ("cluster_block_exception", "index_closed_exception")


class Verdict(StrEnum):
    OK = "ok"  # 2xx: acknowledged
    CONFLICT = "conflict"  # 409: exists already (create) or changed since read (if_seq_no)
    MISSING = "missing"  # 404: no such document or index
    RETRY = "retry"  # 429, 5xx, connection trouble: try again after a backoff
    BLOCKED = "blocked"  # an index/cluster block other than flood-stage: errored, retry later
    FULL = "full"  # flood-stage disk watermark: stop writing until space is freed
    REJECT = "reject"  # other 4xx: this item will never be accepted as it is


def _errors(error: Mapping[str, Any] | None) -> Iterator[Mapping[str, Any]]:
    """The error and its nested causes (``caused_by``, ``root_cause``), outermost first."""
    seen = 0
    stack: list[Any] = [error]
    while stack and seen < 20:  # ES nests a few levels; bound it against odd bodies
        item = stack.pop(0)
        if not isinstance(item, Mapping):
            continue
        seen += 1
        yield item
        stack.append(item.get("caused_by"))
        roots = item.get("root_cause")
        if isinstance(roots, list):
            stack.extend(roots)


def is_flood_stage(error: Mapping[str, Any] | None) -> bool:
    """True if ``error`` is the read-only-allow-delete (disk watermark) block."""
    for err in _errors(error):
        if err.get("type") != "cluster_block_exception":
            continue
        reason = str(err.get("reason", ""))
        if any(marker.lower() in reason.lower() for marker in FLOOD_STAGE_MARKERS):
            return True
    return False


def classify(status: int, error: Mapping[str, Any] | None) -> Verdict:
    """Decide what a bulk item (or a whole request) with this status and error means."""
    if 200 <= status < 300 and not error:
        return Verdict.OK
    if is_flood_stage(error):
        return Verdict.FULL
    types = {str(err.get("type", "")) for err in _errors(error)}
    if types & set(RETRYABLE_ERROR_TYPES):
        return Verdict.RETRY
    if types & set(BLOCKING_ERROR_TYPES) and status < 500:
        return Verdict.BLOCKED  # 503 blocks (e.g. "state not recovered") are retryable
    if status == 409:
        return Verdict.CONFLICT
    if status == 429 or status >= 500 or status == 0:
        return Verdict.RETRY
    if status == 404:
        return Verdict.MISSING
    if status == 408:  # request timeout at a proxy: the request may be fine next time
        return Verdict.RETRY
    return Verdict.REJECT


def describe(error: Mapping[str, Any] | str | None) -> str:
    """``type: reason`` of an Elasticsearch error (with its first cause), bounded in length."""
    if error is None:
        return "no error detail"
    if isinstance(error, str):
        text = error
    else:
        parts: list[str] = []
        for err in _errors(error):
            piece = f"{err.get('type', 'error')}: {err.get('reason', '')}".rstrip(": ")
            if piece not in parts:
                parts.append(piece)
            if len(parts) == 2:
                break
        text = " (caused by ".join(parts) + (")" if len(parts) > 1 else "")
    text = " ".join(text.split())
    if len(text) > ERROR_REASON_MAX_CHARS:
        text = text[:ERROR_REASON_MAX_CHARS] + "..."
    return text


def backoff_s(retry_number: int) -> float:
    """Wait before retry ``retry_number`` (0-based): exponential, capped at MAX_BACKOFF_S."""
    return float(min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * (2 ** max(0, retry_number))))


def error_of_body(body: Any) -> Mapping[str, Any] | None:
    """The ``error`` object of a failed whole-request reply (or None if the body has none)."""
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            return err
        if isinstance(err, str):
            return {"type": "error", "reason": err}
    return None
