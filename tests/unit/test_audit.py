"""The audit trail: hash chain, durability rules, and verify's findings."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from ingest.audit import (
    GENESIS_HASH,
    MAX_LISTED_KEYS,
    Action,
    AuditLog,
    FindingKind,
    append,
    canonical_json,
    entry_hash,
    keys_summary,
)
from ingest.errors import ArchiveError


def _fill(archive: Path, n: int) -> AuditLog:
    log = AuditLog(archive)
    for i in range(n):
        log.append(Action.HOLD_ADD, what={"hold": f"H{i}"}, why={"note": f"case {i}"},
                   actor="tester")
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text("utf-8").splitlines(keepends=True)


def test_entries_chain_and_hash_canonical_json(tmp_path: Path) -> None:
    log = _fill(tmp_path, 3)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert entries[1].prev_hash == entries[0].hash
    assert entries[2].prev_hash == entries[1].hash
    for e in entries:
        body = {k: v for k, v in e.to_dict().items() if k != "hash"}
        assert e.hash == hashlib.sha256(canonical_json(body)).hexdigest()
        assert e.actor == "tester"
    first = json.loads(_lines(log)[0])
    assert set(first) == {"seq", "time", "actor", "action", "what", "why", "prev_hash", "hash"}
    assert first["time"].endswith("Z")


def test_actor_defaults_to_os_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ingest.audit.getpass.getuser", lambda: "compliance-officer")
    entry = append(tmp_path, "export", what={"count": 0}, why={"ticket": "T-1"})
    assert entry.actor == "compliance-officer"
    assert entry.action == "export"


def test_verify_passes_on_intact_log(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    report = log.verify()
    assert report.ok
    assert report.entries == 5
    assert report.head_hash == log.entries()[-1].hash


def test_verify_of_missing_log_is_empty_and_ok(tmp_path: Path) -> None:
    report = AuditLog(tmp_path).verify()
    assert report.ok and report.entries == 0 and report.head_hash == GENESIS_HASH


def test_verify_catches_edited_entry(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    lines = _lines(log)
    data = json.loads(lines[2])
    data["what"]["hold"] = "SOMETHING-ELSE"
    lines[2] = json.dumps(data) + "\n"
    log.path.write_text("".join(lines), "utf-8")
    report = log.verify()
    assert not report.ok
    (finding,) = report.findings
    assert (finding.kind, finding.seq, finding.line) == (FindingKind.EDITED, 3, 3)
    assert report.entries == 2


def test_verify_catches_edited_entry_with_recomputed_hash(tmp_path: Path) -> None:
    log = _fill(tmp_path, 4)
    lines = _lines(log)
    data = json.loads(lines[1])
    data["actor"] = "someone-else"
    data["hash"] = entry_hash(data)
    lines[1] = canonical_json(data).decode() + "\n"
    log.path.write_text("".join(lines), "utf-8")
    (finding,) = log.verify().findings
    assert finding.kind is FindingKind.EDITED
    assert finding.seq == 3  # the next entry no longer links to the rewritten one


def test_verify_catches_removed_entry(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    lines = _lines(log)
    del lines[2]
    log.path.write_text("".join(lines), "utf-8")
    report = log.verify()
    (finding,) = report.findings
    assert finding.kind is FindingKind.REMOVED
    assert finding.seq == 4 and finding.line == 3
    assert "entry 3 removed" in finding.detail


def test_verify_catches_swapped_entries(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("".join(lines), "utf-8")
    (finding,) = log.verify().findings
    assert finding.kind is FindingKind.REORDERED
    assert finding.seq == 3 and finding.line == 2


def test_verify_catches_unreadable_line(tmp_path: Path) -> None:
    log = _fill(tmp_path, 3)
    with log.path.open("a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    (finding,) = log.verify().findings
    assert finding.kind is FindingKind.UNREADABLE and finding.line == 4


def test_append_refuses_after_damaged_last_line(tmp_path: Path) -> None:
    log = _fill(tmp_path, 2)
    with log.path.open("a", encoding="utf-8") as fh:
        fh.write('{"seq": 3, "tim')  # an interrupted write
    with pytest.raises(ArchiveError, match="incomplete line"):
        log.append(Action.VERIFY, what={}, why={})


def test_keys_summary_lists_few_and_digests_many() -> None:
    few = keys_summary(["b", "a", "a"])
    assert few == {"count": 2, "message_keys": ["a", "b"]}
    many = [f"{i:064x}" for i in range(MAX_LISTED_KEYS + 1)]
    summary = keys_summary(reversed(many))
    expected = hashlib.sha256("\n".join(sorted(many)).encode()).hexdigest()
    assert summary == {"count": MAX_LISTED_KEYS + 1, "message_keys_sha256": expected}
    assert keys_summary(["x"], label="raw_sha256") == {"count": 1, "raw_sha256": ["x"]}


def _append_many(archive: str, worker: int, n: int) -> None:
    log = AuditLog(Path(archive))
    for i in range(n):
        log.append("test.concurrent", what={"worker": worker, "i": i}, why={}, actor="w")


def test_concurrent_appenders_keep_one_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    log = AuditLog(tmp_path)
    report = log.verify()
    assert report.ok, report.findings
    assert report.entries == 100
    seen = {(e.what["worker"], e.what["i"]) for e in log.entries()}
    assert len(seen) == 100


def test_tail_returns_last_entries_oldest_first(tmp_path: Path) -> None:
    log = _fill(tmp_path, 5)
    assert [e.seq for e in log.tail(2)] == [4, 5]
    assert log.tail(0) == []
