"""Daily manifests: RFC 6962 Merkle roots, the hash chain, idempotent builds, tamper findings."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from ingest.archive import FilesystemStore
from ingest.integrity import (
    GENESIS_HASH,
    BuildStatus,
    FindingKind,
    ManifestDir,
    References,
    VerifyReport,
    build_manifests,
    merkle_root,
    verify_manifests,
)

pytestmark = pytest.mark.unit

D1, D2, D3 = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 3)
TODAY = dt.date(2026, 3, 10)


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _rfc6962(leaves: list[bytes]) -> bytes:
    """The recursive definition, straight from RFC 6962 section 2.1."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962(leaves[:k]) + _rfc6962(leaves[k:])).digest()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 100])
def test_merkle_root_matches_rfc6962(n: int) -> None:
    hashes = [sha(i) for i in range(n)]
    assert merkle_root(hashes) == _rfc6962([bytes.fromhex(h) for h in hashes]).hex()


def refs_for(days: dict[dt.date, list[str]]) -> References:
    refs = References()
    for day, hashes in days.items():
        for h in hashes:
            refs.receipts[h] = [f"acc:{h[:8]}"]
            refs.day[h] = day
    return refs


def check(tmp_path: Path, refs: References, today: dt.date = TODAY) -> VerifyReport:
    report = VerifyReport()
    verify_manifests(tmp_path, refs, report, today=today)
    return report


def test_build_chains_days_and_is_idempotent(tmp_path: Path) -> None:
    refs = refs_for({D1: [sha(1), sha(2)], D2: [sha(3)], D3: [sha(4), sha(5), sha(6)]})
    first = build_manifests(tmp_path, refs, today=TODAY)
    assert [r.status for r in first] == [BuildStatus.BUILT] * 3
    mdir = ManifestDir(tmp_path)
    m1, m2 = mdir.load_raw(D1), mdir.load_raw(D2)
    assert set(m1) == {"date", "count", "merkle_root", "prev_root_hash", "hash"}
    assert m1["prev_root_hash"] == GENESIS_HASH and m2["prev_root_hash"] == m1["hash"]
    assert m1["count"] == 2 and m1["merkle_root"] == merkle_root(sorted([sha(1), sha(2)]))
    before = {p.name: p.read_bytes() for p in mdir.dir.iterdir()}
    again = build_manifests(tmp_path, refs, today=TODAY)
    assert [r.status for r in again] == [BuildStatus.UNCHANGED] * 3
    assert {p.name: p.read_bytes() for p in mdir.dir.iterdir()} == before
    assert check(tmp_path, refs).ok


def test_build_until_date_seals_only_earlier_days(tmp_path: Path) -> None:
    refs = refs_for({D1: [sha(1)], D2: [sha(2)], D3: [sha(3)]})
    results = build_manifests(tmp_path, refs, until=D2, today=TODAY)
    assert [r.date for r in results] == [D1.isoformat(), D2.isoformat()]
    assert check(tmp_path, refs).unsealed_days == [D3.isoformat()]


def test_todays_manifest_can_grow_but_closed_days_cannot(tmp_path: Path) -> None:
    refs = refs_for({D1: [sha(1)], D2: [sha(2)]})
    build_manifests(tmp_path, refs, today=D2)
    refs = refs_for({D1: [sha(1)], D2: [sha(2), sha(3)]})
    report = check(tmp_path, refs, today=D2)
    assert report.ok and "behind by 1" in report.notes[0]
    assert [r.status for r in build_manifests(tmp_path, refs, today=D2)] == \
        [BuildStatus.UNCHANGED, BuildStatus.REBUILT]
    assert check(tmp_path, refs, today=D2).ok
    # the next day, D2 is closed: a hash removed from it is a finding and is not resealed
    shrunk = refs_for({D1: [sha(1)], D2: [sha(3)]})
    assert build_manifests(tmp_path, shrunk, today=D3)[1].status is BuildStatus.MISMATCH
    report = check(tmp_path, shrunk, today=D3)
    assert report.counts[str(FindingKind.MANIFEST)] == 1
    assert "1 removed" in report.findings[0].detail and sha(2)[:16] in report.findings[0].detail


def test_altered_manifest_breaks_its_hash_and_the_chain(tmp_path: Path) -> None:
    refs = refs_for({D1: [sha(1)], D2: [sha(2)], D3: [sha(3)]})
    build_manifests(tmp_path, refs, today=TODAY)
    path = ManifestDir(tmp_path).path_for(D2)
    data = json.loads(path.read_text())
    data["count"] = 7
    path.write_text(json.dumps(data))
    report = check(tmp_path, refs)
    assert not report.ok
    assert any("edited" in f.detail and f.subject == D2.isoformat() for f in report.findings)
    # rehashing the edited manifest does not help: the next one still points at the old hash
    body = {k: v for k, v in data.items() if k != "hash"}
    from ingest.audit import canonical_json

    data["hash"] = hashlib.sha256(canonical_json(body)).hexdigest()
    path.write_text(json.dumps(data))
    report = check(tmp_path, refs)
    assert any("chain broken" in f.detail and f.subject == D3.isoformat()
               for f in report.findings)


def test_removed_manifest_breaks_the_chain(tmp_path: Path) -> None:
    refs = refs_for({D1: [sha(1)], D2: [sha(2)], D3: [sha(3)]})
    build_manifests(tmp_path, refs, today=TODAY)
    ManifestDir(tmp_path).path_for(D2).unlink()
    report = check(tmp_path, refs)
    assert any("chain broken" in f.detail and f.subject == D3.isoformat()
               for f in report.findings)


def test_message_removed_from_index_and_store_is_caught_by_the_root(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    hashes = [store.put_bytes(f"Subject: {i}\r\n\r\nbody\r\n".encode()).sha256 for i in range(4)]
    refs = refs_for({D1: hashes})
    build_manifests(tmp_path, refs, today=TODAY)
    # someone deletes a message everywhere: document, receipt and object
    store.delete(hashes[2])
    refs = refs_for({D1: [h for h in hashes if h != hashes[2]]})
    report = check(tmp_path, refs)
    assert [f.kind for f in report.findings] == [FindingKind.MANIFEST]
    assert hashes[2][:16] in report.findings[0].detail
