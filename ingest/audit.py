"""Append-only, hash-chained audit trail of compliance actions: ``<archive>/audit/audit.log``.

Why a file beside the raw objects and not a sink document: the audit must survive what it
records (a retention run deletes documents; an index can be rebuilt) and must be readable with
nothing but ``cat`` and ``sha256sum``. One JSON object per line::

    {"seq": 7, "time": "2026-03-01T03:17:00.123Z", "actor": "root",
     "action": "retention.apply", "what": {...}, "why": {...},
     "prev_hash": "<hash of entry 6>", "hash": "<sha256 of this entry without 'hash'>"}

``hash`` is the SHA-256 of the entry's canonical JSON (sorted keys, no spaces, UTF-8) without
the ``hash`` key, and ``prev_hash`` chains it to the previous entry (:data:`GENESIS_HASH` for
the first). Editing an entry breaks its own hash; removing one leaves a gap in ``seq``;
reordering breaks ``prev_hash``. :func:`verify` names the first such entry.

What the chain cannot see on its own: the *last* entries being cut off, or the whole file being
rewritten with fresh hashes. Both change the head hash, so record ``head_hash`` from
``popvault audit verify --json`` somewhere else (a ticket, a WORM bucket) to anchor it.

Concurrency: appenders take an exclusive ``flock`` on ``audit.lock`` (never on the log itself, so
readers are never blocked), read the last entry, and write the new line with one ``write`` on an
``O_APPEND`` descriptor followed by ``fsync``: an entry that :func:`append` returned is durable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ingest.errors import ArchiveError
from ingest.filelock import exclusive_lock

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
LOCK_FILE = "audit.lock"
GENESIS_HASH = "0" * 64
"""``prev_hash`` of entry 1: there is nothing before it."""
MAX_LISTED_KEYS = 100
"""Above this many message keys an entry records the count and a SHA-256 over the sorted keys
instead of the keys themselves, so one retention batch cannot make a multi-megabyte line."""
TAIL_READ_BYTES = 64 * 1024
"""Bytes read from the end of the log to find the last entry (one entry is far smaller)."""
ENTRY_FIELDS = ("seq", "time", "actor", "action", "what", "why", "prev_hash", "hash")


class Action(StrEnum):
    """Actions popvault records; other modules may pass their own ``area.verb`` strings."""

    RETENTION_APPLY = "retention.apply"
    HOLD_ADD = "hold.add"
    HOLD_RELEASE = "hold.release"
    EXPORT = "export"
    VERIFY = "verify"


class FindingKind(StrEnum):
    """How the chain is broken at the first bad entry."""

    UNREADABLE = "unreadable"  # a line that is not a JSON entry with every field
    EDITED = "edited"  # the entry's own hash no longer matches its content
    REMOVED = "removed"  # seq jumps forward: the entries in between are gone
    REORDERED = "reordered"  # seq or prev_hash out of order, the expected entry comes later


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    actor: str
    action: str
    what: dict[str, Any]
    why: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENTRY_FIELDS}


@dataclass(frozen=True)
class AuditFinding:
    """The first place the chain is broken: ``seq`` as written in the offending line."""

    kind: FindingKind
    line: int  # 1-based line number in audit.log
    seq: int | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "line": self.line, "seq": self.seq,
                "detail": self.detail}


@dataclass
class VerifyReport:
    path: Path
    entries: int = 0
    head_hash: str = GENESIS_HASH
    findings: list[AuditFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "entries": self.entries,
                "head_hash": self.head_hash,
                "findings": [f.to_dict() for f in self.findings]}


def canonical_json(obj: Any) -> bytes:
    """The one byte form that is hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted, distinct keys joined by ``\\n``."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode("utf-8")).hexdigest()


def keys_summary(keys: Iterable[str], *, label: str = "message_keys") -> dict[str, Any]:
    """What to record for a set of keys: the keys, or their count and digest.

    Above :data:`MAX_LISTED_KEYS` the entry holds ``<label>_sha256`` (:func:`keys_digest`);
    whoever holds the list (a retention plan, an export manifest) can prove it is the one that
    was recorded. ``label`` names the kind: ``message_keys``, ``raw_sha256``.
    """
    ordered = sorted(set(keys))
    if len(ordered) <= MAX_LISTED_KEYS:
        return {"count": len(ordered), label: ordered}
    return {"count": len(ordered), f"{label}_sha256": keys_digest(ordered)}


def default_actor() -> str:
    """The OS user running the command; ``unknown`` where none can be determined (containers
    with an unnamed uid), so an audit entry is never refused for lack of a name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _utc_now() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """The audit trail of one archive. Cheap to construct; every call opens what it needs."""

    def __init__(self, archive_path: Path) -> None:
        self.dir = Path(archive_path) / AUDIT_DIR
        self.path = self.dir / AUDIT_FILE
        self.lock_path = self.dir / LOCK_FILE

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self.path)!r})"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.lock_path, label=f"the audit lock {self.lock_path}")

    def append(self, action: str, *, what: Mapping[str, Any], why: Mapping[str, Any],
               actor: str | None = None, now: str | None = None) -> AuditEntry:
        """Append one entry and return it once it is on disk (fsync).

        Args:
            action: ``area.verb``, e.g. :attr:`Action.RETENTION_APPLY`.
            what: what was acted on: message keys (see :func:`keys_summary`), counts.
            why: the reason: a rule or hold name, a ticket.
            actor: who; the OS user when None.
            now: the entry's time (ISO 8601 UTC); the clock when None (tests pass one).

        Raises ArchiveError if the log cannot be written, or if its last line is damaged
        (appending after it would hide the damage; run ``popvault audit verify``).
        """
        with self._locked():
            last = self._last_entry()
            entry: dict[str, Any] = {
                "seq": (last["seq"] + 1) if last else 1,
                "time": now or _utc_now(),
                "actor": actor or default_actor(),
                "action": str(action),
                "what": dict(what),
                "why": dict(why),
                "prev_hash": last["hash"] if last else GENESIS_HASH,
            }
            try:
                entry["hash"] = entry_hash(entry)
                line = canonical_json(entry) + b"\n"
            except (TypeError, ValueError) as exc:
                raise ArchiveError(f"audit entry for {action} is not JSON: {exc}") from None
            created = not self.path.exists()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if created:
                    _fsync_dir(self.dir)
            except OSError as exc:
                raise ArchiveError(f"cannot append to the audit log {self.path}: "
                                   f"{exc.strerror}") from None
        return AuditEntry(**entry)

    def _last_entry(self) -> dict[str, Any] | None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size == 0:
                    return None
                fh.seek(max(0, size - TAIL_READ_BYTES))
                tail = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveError(f"cannot read the audit log {self.path}: {exc.strerror}") \
                from None
        if not tail.endswith(b"\n"):
            raise ArchiveError(f"the audit log {self.path} ends in an incomplete line "
                               "(interrupted write?); run `popvault audit verify` and repair "
                               "it by hand before anything else is recorded")
        last_line = tail[:-1].rsplit(b"\n", 1)[-1]
        try:
            data = json.loads(last_line)
            if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or \
                    not isinstance(data.get("hash"), str):
                raise ValueError("not an entry")
        except ValueError:
            raise ArchiveError(f"the last line of the audit log {self.path} is not an audit "
                               "entry; run `popvault audit verify`") from None
        return data

    def iter_raw(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes without the newline) for every line; nothing if no log yet."""
        try:
            with self.path.open("rb") as fh:
                for number, line in enumerate(fh, start=1):
                    yield number, line.rstrip(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ArchiveError(f"cannot read the audit log {self.path}: {exc.strerror}") \
                from None

    def entries(self) -> list[AuditEntry]:
        """Every readable entry in file order (unreadable lines are skipped; verify says so)."""
        out: list[AuditEntry] = []
        for _n, line in self.iter_raw():
            data = _decode(line)
            if data is not None:
                out.append(AuditEntry(**{k: data[k] for k in ENTRY_FIELDS}))
        return out

    def tail(self, limit: int) -> list[AuditEntry]:
        """The last ``limit`` entries, oldest first."""
        entries = self.entries()
        return entries[-limit:] if limit > 0 else []

    def verify(self) -> VerifyReport:
        """Recompute the chain; stop at the first broken entry (see :class:`FindingKind`)."""
        report = VerifyReport(self.path)
        lines = list(self.iter_raw())
        decoded = [(n, _decode(line)) for n, line in lines]
        expected_seq = 1
        prev_hash = GENESIS_HASH
        for pos, (number, data) in enumerate(decoded):
            if data is None:
                report.findings.append(AuditFinding(
                    FindingKind.UNREADABLE, number, None,
                    f"line {number} is not an audit entry with fields {', '.join(ENTRY_FIELDS)}"))
                break
            seq = data["seq"]
            if entry_hash(data) != data["hash"]:
                report.findings.append(AuditFinding(
                    FindingKind.EDITED, number, seq,
                    f"entry {seq} (line {number}) was edited: its content no longer matches "
                    "its hash"))
                break
            if seq != expected_seq or data["prev_hash"] != prev_hash:
                later = {d["seq"] for _n, d in decoded[pos + 1:] if d is not None}
                if seq > expected_seq and expected_seq not in later:
                    kind = FindingKind.REMOVED
                    missing = (f"entry {expected_seq}" if seq == expected_seq + 1
                               else f"entries {expected_seq}-{seq - 1}")
                    detail = (f"{missing} removed: line {number} holds entry {seq} where "
                              f"entry {expected_seq} was expected")
                elif seq == expected_seq:
                    kind = FindingKind.EDITED
                    detail = (f"entry {seq} (line {number}) does not link to the entry before "
                              "it: that entry or this one was rewritten")
                else:
                    kind = FindingKind.REORDERED
                    detail = (f"entries out of order: line {number} holds entry {seq} where "
                              f"entry {expected_seq} was expected")
                report.findings.append(AuditFinding(kind, number, seq, detail))
                break
            report.entries += 1
            prev_hash = data["hash"]
            expected_seq = seq + 1
        report.head_hash = prev_hash
        return report


def _decode(line: bytes) -> dict[str, Any] | None:
    """An entry dict with every field of the right kind, or None."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != set(ENTRY_FIELDS):
        return None
    if not isinstance(data["seq"], int) or isinstance(data["seq"], bool):
        return None
    if not all(isinstance(data[k], str) for k in ("time", "actor", "action", "prev_hash",
                                                  "hash")):
        return None
    if not isinstance(data["what"], dict) or not isinstance(data["why"], dict):
        return None
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append(archive_path: Path, action: str, *, what: Mapping[str, Any],
           why: Mapping[str, Any], actor: str | None = None) -> AuditEntry:
    """Record one action in the archive's audit trail (the public API for other modules).

    Example: ``append(config.archive_path, Action.EXPORT, what=keys_summary(keys),
    why={"ticket": "LEGAL-12"}, actor=actor)``.
    """
    return AuditLog(archive_path).append(action, what=what, why=why, actor=actor)
