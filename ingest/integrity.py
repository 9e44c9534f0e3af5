"""Archive integrity: re-hash raw objects against the index, and seal each day in a manifest.

Two questions a compliance archive must answer, and why each needs its own check:

1. *Is every message the index points at still here, byte for byte?* :func:`verify_objects`
   takes every ``popvault.raw_sha256`` of the documents and every receipt's ``raw_sha256``,
   re-hashes the stored object (decrypting when sealed) and reports ``missing``, ``corrupt``
   (bytes or size no longer match) and ``orphan`` objects (stored, referenced by nothing:
   a crash between archive and index, or a document removed by hand).
2. *Has anyone quietly rewritten history?* Re-hashing cannot see a message that was removed
   together with its document and receipt. Each day's raw hashes are therefore sealed in a
   **daily manifest** ``<archive>/manifests/YYYY-MM-DD.json``::

       {"date": "2026-03-01", "count": 1234, "merkle_root": "<hex>",
        "prev_root_hash": "<hash of the previous manifest>", "hash": "<hex>"}

   ``merkle_root`` is the RFC 6962 Merkle tree hash over the day's sorted raw hashes (leaf
   ``SHA-256(0x00 || digest)``, node ``SHA-256(0x01 || left || right)``, so a leaf can never
   pass for a node), ``hash`` is the SHA-256 of the manifest's canonical JSON without ``hash``
   (:func:`ingest.audit.canonical_json`) and ``prev_root_hash`` is the previous manifest's
   ``hash`` (64 zeros for the first): editing, removing or reordering a manifest breaks the
   chain at that point. Beside each manifest, ``YYYY-MM-DD.leaves`` lists the sealed hashes
   one per line; it is covered by ``merkle_root``, and lets :func:`verify_manifests` name
   exactly which hashes were added or removed instead of only saying "the root differs".

A raw hash belongs to the day it first entered the archive: the earliest of its receipts'
``archived_at`` and its documents' ``popvault.first_archived`` (UTC). Receipts are never
deleted (retention marks them ``expired``), so a closed day's set is stable.

As with the audit log, the chain cannot detect its own *last* manifests being removed, or all
of them being rewritten: record the newest ``hash`` outside the archive to anchor it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from ingest.archive import FilesystemStore
from ingest.audit import canonical_json
from ingest.errors import ArchiveError
from ingest.outcome import ReceiptStatus
from ingest.sinks.base import Receipt

MANIFEST_DIR = "manifests"
GENESIS_HASH = "0" * 64
"""``prev_root_hash`` of the first manifest: there is nothing before it."""
MANIFEST_FIELDS = ("date", "count", "merkle_root", "prev_root_hash", "hash")
VERIFY_WORKERS = min(8, os.cpu_count() or 1)
"""Objects re-hashed at once: SHA-256, zstd and AES-GCM all release the GIL on large buffers,
so threads scale with cores until the disk is the limit."""
MAX_LISTED_FINDINGS = 1000
"""Findings kept in a report per kind; the counts stay exact beyond it."""


class ScanningSink(Protocol):
    """The full-scan half of a sink (every sink provides it; not part of the write contract)."""

    def iter_documents(self) -> Iterator[tuple[str, dict[str, Any]]]: ...
    def iter_receipts(self, account_id: str | None = None) -> Iterator[Receipt]: ...


# -- references -------------------------------------------------------------------------------


@dataclass
class References:
    """Every raw hash the index points at, who points at it, and the day it was archived."""

    documents: dict[str, list[str]] = field(default_factory=dict)  # sha -> message keys
    receipts: dict[str, list[str]] = field(default_factory=dict)  # sha -> receipt ids
    sizes: dict[str, int] = field(default_factory=dict)  # sha -> raw_size recorded
    day: dict[str, dt.date] = field(default_factory=dict)  # sha -> first archived (UTC)
    expired_only: set[str] = field(default_factory=set)
    """Hashes referenced only by ``expired`` receipts: retention may have removed the bytes."""

    @property
    def required(self) -> set[str]:
        """Hashes that must be present in the raw store."""
        return (set(self.documents) | set(self.receipts)) - self.expired_only

    @property
    def all(self) -> set[str]:
        return set(self.documents) | set(self.receipts)

    def by_day(self) -> dict[dt.date, list[str]]:
        days: dict[dt.date, list[str]] = {}
        for sha, day in self.day.items():
            days.setdefault(day, []).append(sha)
        return {d: sorted(v) for d, v in sorted(days.items())}

    def referenced_by(self, sha: str) -> list[str]:
        return ([f"document {k}" for k in self.documents.get(sha, [])]
                + [f"receipt {r}" for r in self.receipts.get(sha, [])])


def utc_day(value: str | None) -> dt.date | None:
    """The UTC calendar day of an ISO 8601 timestamp (None when absent or unreadable)."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).date()


def collect_references(sink: ScanningSink) -> References:
    """Scan documents and receipts once; see the module docstring for the day rule."""
    refs = References()
    live: set[str] = set()

    def note_day(sha: str, day: dt.date | None) -> None:
        if day is not None and (sha not in refs.day or day < refs.day[sha]):
            refs.day[sha] = day

    for key, doc in sink.iter_documents():
        pv = doc.get("popvault") or {}
        sha = pv.get("raw_sha256")
        if not isinstance(sha, str):
            continue
        refs.documents.setdefault(sha, []).append(key)
        live.add(sha)
        if isinstance(pv.get("raw_size"), int):
            refs.sizes.setdefault(sha, pv["raw_size"])
        note_day(sha, utc_day(pv.get("first_archived")))
    expired: set[str] = set()
    for receipt in sink.iter_receipts():
        sha = receipt.raw_sha256
        refs.receipts.setdefault(sha, []).append(receipt.id)
        refs.sizes.setdefault(sha, receipt.raw_size)
        if receipt.status is ReceiptStatus.EXPIRED:
            expired.add(sha)
        else:
            live.add(sha)
        note_day(sha, utc_day(receipt.archived_at))
    refs.expired_only = expired - live
    return refs


# -- object verification ----------------------------------------------------------------------


class FindingKind(StrEnum):
    MISSING = "missing"  # referenced, not in the raw store
    CORRUPT = "corrupt"  # present, but does not decompress/decrypt/re-hash, or wrong size
    ORPHAN = "orphan"  # in the raw store, referenced by nothing
    MANIFEST = "manifest"  # a daily manifest is altered, out of chain, or no longer matches


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    subject: str  # a raw SHA-256, or a manifest date
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "subject": self.subject, "detail": self.detail}


@dataclass
class VerifyReport:
    referenced: int = 0
    stored: int = 0
    checked: int = 0
    checked_bytes: int = 0
    sampled: bool = False
    encrypted: int = 0
    duration_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {str(k): 0 for k in FindingKind})
    findings: list[Finding] = field(default_factory=list)
    manifests: int = 0
    unsealed_days: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def add(self, finding: Finding) -> None:
        self.counts[str(finding.kind)] += 1
        if self.counts[str(finding.kind)] <= MAX_LISTED_FINDINGS:
            self.findings.append(finding)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "referenced": self.referenced, "stored": self.stored,
            "checked": self.checked, "checked_bytes": self.checked_bytes,
            "sampled": self.sampled, "encrypted": self.encrypted,
            "duration_s": round(self.duration_s, 3),
            "objects_per_s": round(self.checked / self.duration_s, 1) if self.duration_s else None,
            "counts": self.counts, "manifests": self.manifests,
            "unsealed_days": self.unsealed_days, "notes": self.notes,
            "findings": [f.to_dict() for f in self.findings],
        }


Progress = Callable[[int, int], None]
"""``progress(done, total)``, called from the verifying thread after each object."""


def verify_objects(store: FilesystemStore, refs: References, report: VerifyReport, *,
                   sample: int | None = None, rng: random.Random | None = None,
                   progress: Progress | None = None) -> None:
    """Fill ``report`` with missing, orphan and corrupt objects.

    Missing and orphan objects come from set arithmetic over names and are always complete;
    ``sample`` limits only the costly part, re-hashing, to a random subset of the present
    referenced objects.
    """
    stored = set(store.iter_hashes())
    required = refs.required
    report.referenced = len(refs.all)
    report.stored = len(stored)
    for sha in sorted(required - stored):
        report.add(Finding(FindingKind.MISSING, sha, "referenced by "
                           + ", ".join(refs.referenced_by(sha)[:5])))
    for sha in sorted(stored - refs.all):
        report.add(Finding(FindingKind.ORPHAN, sha, "stored but referenced by no document "
                           "and no receipt"))
    to_check = sorted(refs.all & stored)
    if sample is not None and sample < len(to_check):
        to_check = sorted((rng or random.SystemRandom()).sample(to_check, sample))
        report.sampled = True
    total = len(to_check)

    def check(sha: str) -> tuple[str, int | None, str | None, bool]:
        try:
            encrypted = store.is_encrypted(sha)
            size = store.verify(sha)
        except ArchiveError as exc:
            return sha, None, str(exc), False
        return sha, size, None, encrypted

    done = 0
    with ThreadPoolExecutor(max_workers=VERIFY_WORKERS) as pool:
        for sha, size, error, encrypted in pool.map(check, to_check):
            done += 1
            if error is not None:
                report.add(Finding(FindingKind.CORRUPT, sha, error))
            else:
                assert size is not None
                report.checked_bytes += size
                report.encrypted += encrypted
                expected = refs.sizes.get(sha)
                if expected is not None and expected != size:
                    report.add(Finding(FindingKind.CORRUPT, sha, f"object holds {size} bytes; "
                                       f"the index recorded {expected}"))
            report.checked += 1
            if progress is not None:
                progress(done, total)


# -- Merkle tree ------------------------------------------------------------------------------


def _leaf(sha_hex: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(sha_hex)).digest()


def merkle_root(leaves: Sequence[str]) -> str:
    """RFC 6962 Merkle tree hash (hex) of ``leaves`` (hex SHA-256 digests, in the given order).

    The empty tree hashes to SHA-256 of nothing; an odd node is carried up unpaired (the tree
    splits at the largest power of two below ``n``), so no leaf is ever duplicated.
    """
    level = [_leaf(s) for s in leaves]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    # Bottom-up pairing with the odd node carried up gives the same tree as RFC 6962's
    # recursive split at the largest power of two.
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


# -- manifests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    date: str
    count: int
    merkle_root: str
    prev_root_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        return {"date": self.date, "count": self.count, "merkle_root": self.merkle_root,
                "prev_root_hash": self.prev_root_hash}

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    @staticmethod
    def seal(date: str, leaves: Sequence[str], prev: str) -> Manifest:
        root = merkle_root(leaves)
        body = {"date": date, "count": len(leaves), "merkle_root": root, "prev_root_hash": prev}
        return Manifest(date, len(leaves), root, prev,
                        hashlib.sha256(canonical_json(body)).hexdigest())


class ManifestDir:
    """``<archive>/manifests``: one ``YYYY-MM-DD.json`` and ``.leaves`` per sealed day."""

    def __init__(self, archive_path: Path) -> None:
        self.dir = Path(archive_path) / MANIFEST_DIR

    def path_for(self, day: dt.date) -> Path:
        return self.dir / f"{day.isoformat()}.json"

    def leaves_path(self, day: dt.date) -> Path:
        return self.dir / f"{day.isoformat()}.leaves"

    def days(self) -> list[dt.date]:
        found = []
        for p in self.dir.glob("*.json"):
            with contextlib.suppress(ValueError):
                found.append(dt.date.fromisoformat(p.stem))
        return sorted(found)

    def load_raw(self, day: dt.date) -> dict[str, Any]:
        """The manifest as written (may be tampered with: callers check it)."""
        try:
            data = json.loads(self.path_for(day).read_bytes())
        except OSError as exc:
            raise ArchiveError(f"cannot read manifest {self.path_for(day)}: "
                               f"{exc.strerror}") from None
        except ValueError:
            raise ArchiveError(f"manifest {self.path_for(day)} is not JSON") from None
        if not isinstance(data, dict):
            raise ArchiveError(f"manifest {self.path_for(day)} is not a JSON object")
        return data

    def load_leaves(self, day: dt.date) -> list[str] | None:
        try:
            return self.leaves_path(day).read_text("ascii").split()
        except (OSError, UnicodeDecodeError):
            return None

    def write(self, day: dt.date, manifest: Manifest, leaves: Sequence[str]) -> None:
        """Leaves first, then the manifest, each atomically (temp file, fsync, rename)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.leaves_path(day), "".join(s + "\n" for s in leaves).encode())
            _atomic_write(self.path_for(day),
                          json.dumps(manifest.to_dict(), indent=2).encode() + b"\n")
        except OSError as exc:
            raise ArchiveError(f"cannot write manifest for {day} in {self.dir}: "
                               f"{exc.strerror}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class BuildStatus(StrEnum):
    BUILT = "built"  # newly sealed
    REBUILT = "rebuilt"  # today's (still open) manifest resealed with new hashes
    UNCHANGED = "unchanged"  # already sealed and still matching
    MISMATCH = "mismatch"  # a closed day no longer matches its seal: left alone, see verify
    LATE = "late"  # hashes dated on an unsealed day before a sealed one: cannot be chained


@dataclass(frozen=True)
class BuildResult:
    date: str
    status: BuildStatus
    count: int
    hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"date": self.date, "status": str(self.status), "count": self.count,
                "hash": self.hash}


def today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def build_manifests(archive_path: Path, refs: References, *, until: dt.date | None = None,
                    today: dt.date | None = None) -> list[BuildResult]:
    """Seal every day up to ``until`` (default today) that has hashes, oldest first.

    Idempotent for closed days: a sealed day before ``today`` is never rewritten (a mismatch is
    reported and left for :func:`verify_manifests`). Today's manifest is rebuilt when new
    hashes arrived, as long as no later day is sealed.
    """
    today = today or today_utc()
    until = until or today
    mdir = ManifestDir(archive_path)
    sealed = mdir.days()
    results: list[BuildResult] = []
    prev_hash = GENESIS_HASH
    by_day = refs.by_day()
    for day in sorted(set(by_day) | set(sealed)):
        if day > until:
            break
        leaves = by_day.get(day, [])
        later_sealed = any(d > day for d in sealed)
        if day in sealed:
            data = mdir.load_raw(day)
            current = Manifest.seal(day.isoformat(), leaves, prev_hash)
            stored_hash = str(data.get("hash"))
            if data.get("merkle_root") == current.merkle_root and \
                    data.get("prev_root_hash") == prev_hash:
                results.append(BuildResult(day.isoformat(), BuildStatus.UNCHANGED, len(leaves),
                                           stored_hash))
            elif day >= today and not later_sealed and _only_added(mdir, day, leaves):
                mdir.write(day, current, leaves)
                stored_hash = current.hash
                results.append(BuildResult(day.isoformat(), BuildStatus.REBUILT, len(leaves),
                                           current.hash))
            else:
                results.append(BuildResult(day.isoformat(), BuildStatus.MISMATCH, len(leaves),
                                           stored_hash))
            prev_hash = stored_hash
            continue
        if later_sealed:
            results.append(BuildResult(day.isoformat(), BuildStatus.LATE, len(leaves)))
            continue
        manifest = Manifest.seal(day.isoformat(), leaves, prev_hash)
        mdir.write(day, manifest, leaves)
        sealed.append(day)
        results.append(BuildResult(day.isoformat(), BuildStatus.BUILT, len(leaves),
                                   manifest.hash))
        prev_hash = manifest.hash
    return results


def _only_added(mdir: ManifestDir, day: dt.date, leaves: Sequence[str]) -> bool:
    """Today's seal may grow, never shrink: a hash removed since sealing is a finding."""
    before = mdir.load_leaves(day)
    return before is not None and set(before) <= set(leaves)


def verify_manifests(archive_path: Path, refs: References, report: VerifyReport, *,
                     today: dt.date | None = None) -> None:
    """Check the chain and recompute every sealed day's root from the index's hashes."""
    today = today or today_utc()
    mdir = ManifestDir(archive_path)
    by_day = refs.by_day()
    prev_hash = GENESIS_HASH
    sealed = mdir.days()
    report.manifests = len(sealed)
    for day in sealed:
        name = day.isoformat()
        try:
            data = mdir.load_raw(day)
        except ArchiveError as exc:
            report.add(Finding(FindingKind.MANIFEST, name, str(exc)))
            prev_hash = "unreadable"
            continue
        missing = [f for f in MANIFEST_FIELDS if f not in data]
        if missing:
            report.add(Finding(FindingKind.MANIFEST, name, f"fields missing: {missing}"))
            prev_hash = str(data.get("hash"))
            continue
        body = {k: data[k] for k in MANIFEST_FIELDS if k != "hash"}
        if hashlib.sha256(canonical_json(body)).hexdigest() != data["hash"]:
            report.add(Finding(FindingKind.MANIFEST, name, "edited: its hash does not match "
                               "its content"))
        if data["date"] != name:
            report.add(Finding(FindingKind.MANIFEST, name, f"file is named {name} but the "
                               f"manifest says {data['date']}"))
        if data["prev_root_hash"] != prev_hash:
            report.add(Finding(FindingKind.MANIFEST, name, "chain broken: prev_root_hash does "
                               "not match the previous manifest's hash (a manifest before it "
                               "was removed, edited or replaced)"))
        prev_hash = str(data["hash"])
        leaves = by_day.get(day, [])
        root = merkle_root(leaves)
        if root == data["merkle_root"] and len(leaves) == data["count"]:
            continue
        sealed_leaves = mdir.load_leaves(day)
        if sealed_leaves is not None and merkle_root(sealed_leaves) == data["merkle_root"]:
            added = sorted(set(leaves) - set(sealed_leaves))
            removed = sorted(set(sealed_leaves) - set(leaves))
            if day >= today and not removed:
                report.notes.append(f"{name}: today's manifest is behind by {len(added)} "
                                    "hash(es); run `popvault manifest build`")
                continue
            detail = (f"the index's hashes for {name} no longer match the sealed root: "
                      f"{len(removed)} removed ({', '.join(s[:16] for s in removed[:5])}), "
                      f"{len(added)} added ({', '.join(s[:16] for s in added[:5])})")
        else:
            detail = (f"the index's {len(leaves)} hashes for {name} do not match the sealed "
                      f"root over {data['count']} (leaves file missing or altered)")
        report.add(Finding(FindingKind.MANIFEST, name, detail))
    sealed_set = set(sealed)
    report.unsealed_days = [d.isoformat() for d in by_day if d not in sealed_set]


def verify_archive(store: FilesystemStore, sink: ScanningSink, *, sample: int | None = None,
                   progress: Progress | None = None, rng: random.Random | None = None,
                   today: dt.date | None = None,
                   clock: Callable[[], float] | None = None) -> VerifyReport:
    """Everything ``popvault verify`` checks; see the module docstring."""
    import time

    now = clock or time.monotonic
    started = now()
    report = VerifyReport()
    refs = collect_references(sink)
    verify_objects(store, refs, report, sample=sample, rng=rng, progress=progress)
    verify_manifests(store.root, refs, report, today=today)
    report.duration_s = now() - started
    return report

