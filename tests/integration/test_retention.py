"""Retention, legal holds and the audit trail end to end, on the embedded sink and on a real
Elasticsearch node (and the memory sink, which the unit tests rely on)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ingest.archive import FilesystemStore
from ingest.audit import AuditLog
from ingest.config import config_from_dict
from ingest.dedup import message_key, raw_sha256
from ingest.document import build_document
from ingest.holds import HoldStore
from ingest.outcome import Delivery, ReceiptStatus
from ingest.retention import DEFAULT_RULE, RetentionPolicy, apply_retention, parse_retention
from ingest.sinks.base import IndexItem, Sink
from ingest.sinks.lifecycle import lifecycle_for
from tests.corpus import plain_text, same_message_two_deliveries
from tests.harness.toml_writer import dumps
from tests.integration.test_sink_contract import open_sink

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
FIRST_ARCHIVED = "2026-06-01T00:00:00Z"
RETENTION: dict[str, Any] = {
    "default": "3y",
    "rules": [
        {"name": "finance", "keep": "7y", "match": {"from_domain": "bank.test"}},
        {"name": "support", "keep": "90d", "match": {"account": "support"}},
        {"name": "invoices", "keep": "1y", "match": {"query": "subject:invoice"}},
    ],
}
HOLD_QUERY = "from:carol@client.test"


def restamp(raw: bytes, *, date: dt.datetime, sender: str, subject: str) -> bytes:
    """``raw`` with the Date, From, To and Subject we choose (and no Cc, so recipients are
    known exactly)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"cc:")]
    replacements = {b"date:": f"Date: {format_datetime(date)}",
                    b"from:": f"From: <{sender}>", b"to:": "To: <records@corp.test>",
                    b"subject:": f"Subject: {subject}"}
    out = []
    for ln in lines:
        for prefix, new in replacements.items():
            if ln.lower().startswith(prefix):
                ln = new.encode()
        out.append(ln)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def at(year: int, month: int, day: int = 1) -> dt.datetime:
    return dt.datetime(year, month, day, 10, 0, tzinfo=dt.UTC)


@dataclass
class Archive:
    sink: Sink
    store: FilesystemStore
    path: Path
    keys: dict[str, str]  # name -> message key
    raws: dict[str, str]  # name -> raw sha256 (per copy)
    orphan: str


def item(raw: bytes, account: str, uidl: str, *, raw_override: str | None = None) -> IndexItem:
    key = message_key(raw)
    sha = raw_sha256(raw)
    doc = build_document(raw, raw_sha256=sha, message_key=key, first_archived=FIRST_ARCHIVED)
    return IndexItem(message_key=key, account_id=account, uidl=uidl,
                     raw_sha256=raw_override or sha, raw_size=len(raw), document=doc)


def build_archive(sink: Sink, path: Path) -> Archive:
    """The scenario (NOW = 2026-06-01):

    A finance (bank.test, account support) 2016 -> 7y: expired (first match beats support)
    B finance (bank.test, account support) 2022 -> 7y: kept (support's 90d would expire it)
    C support 2026-01 -> 90d: expired;  D support 2026-04-15 -> 90d: kept
    E invoices 2024-01 from carol@client.test -> 1y: expired by rule, but HELD;
      a second receipt of E (account archive) points at F's raw object (shared)
    F invoices 2024-02 -> 1y: expired; its raw stays (E's receipt still refers to it)
    G default 2020 in accounts work + home (two copies, two raws) -> 3y: expired
    H default 2024 -> 3y: kept
    """
    store = FilesystemStore(path)
    spec = {
        "A": (plain_text(1, 1), "support", at(2016, 1), "teller@bank.test", "statement"),
        "B": (plain_text(1, 2), "support", at(2022, 1), "teller@bank.test", "statement"),
        "C": (plain_text(1, 3), "support", at(2026, 1), "cust@other.test", "help please"),
        "D": (plain_text(1, 4), "support", at(2026, 4, 15), "cust@other.test", "help again"),
        "E": (plain_text(1, 5), "work", at(2024, 1), "carol@client.test", "invoice march"),
        "F": (plain_text(1, 6), "work", at(2024, 2), "dave@client.test", "invoice april"),
        "H": (plain_text(1, 8), "work", at(2024, 1), "erin@other.test", "hello"),
    }
    raws = {n: restamp(r, date=d, sender=s, subject=subj) for n, (r, _a, d, s, subj)
            in spec.items()}
    g1, g2 = (restamp(r, date=at(2020, 1), sender="frank@other.test", subject="old news")
              for r in same_message_two_deliveries(seed=9))
    items = [item(raws[n], spec[n][1], f"u-{n}") for n in spec]
    f_sha = raw_sha256(raws["F"])
    items.append(item(raws["E"], "archive", "u-E2", raw_override=f_sha))
    items += [item(g1, "work", "u-G"), item(g2, "home", "u-G2")]
    outcomes = sink.write(items)
    assert [o.delivery for o in outcomes] == [Delivery.DELIVERED] * len(items)
    for raw in [*raws.values(), g1, g2]:
        store.put_bytes(raw)
    orphan = store.put_bytes(b"raw bytes of a message still being polled\r\n").sha256
    store.flush()
    sink.refresh()
    keys = {n: message_key(r) for n, r in raws.items()} | {"G": message_key(g1)}
    assert message_key(g2) == keys["G"]
    shas = {n: raw_sha256(r) for n, r in raws.items()} | {"G": raw_sha256(g1),
                                                           "G2": raw_sha256(g2)}
    return Archive(sink, store, path, keys, shas, orphan)


def policy() -> RetentionPolicy:
    got = parse_retention(config_from_dict({"retention": RETENTION}))
    assert got is not None
    return got


@pytest.fixture(params=("memory", "embedded", "elasticsearch"))
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    path = tmp_path  # the embedded sink's file is <archive>/index.sqlite3, as configured
    sink = open_sink(request.param, request, tmp_path)
    sink.ensure_schema()
    built = build_archive(sink, path)
    HoldStore(path).add("CASE-7", HOLD_QUERY, actor="counsel", note="matter 7")
    yield built
    sink.close()


def remaining_keys(a: Archive) -> set[str]:
    return {d.message_key for d in lifecycle_for(a.sink).iter_docs()}


def receipt_status(a: Archive) -> dict[str, ReceiptStatus]:
    return {r.uidl: r.status for r in lifecycle_for(a.sink).iter_receipts()}


def test_apply_expires_exactly_what_the_rules_say(archive: Archive) -> None:
    a = archive
    report = apply_retention(policy(), a.sink, a.store, a.path, actor="records-team", now=NOW)
    k = a.keys
    assert remaining_keys(a) == {k["B"], k["D"], k["E"], k["H"]}
    assert report.documents_deleted == 4
    # Receipts are all kept; those of expired messages say so.
    status = receipt_status(a)
    assert {u for u, s in status.items() if s is ReceiptStatus.EXPIRED} == {
        "u-A", "u-C", "u-F", "u-G", "u-G2"}
    assert {u for u, s in status.items() if s is not ReceiptStatus.EXPIRED} == {
        "u-B", "u-D", "u-E", "u-E2", "u-H"}
    assert report.receipts_expired == 5
    assert a.sink.get_receipts("work", ["u-G"])["u-G"].status is ReceiptStatus.EXPIRED
    # Raw objects: expired ones gone, unless still referenced (F by E's second receipt).
    r = a.raws
    for gone in ("A", "C", "G", "G2"):
        assert not a.store.exists(r[gone]), gone
    for kept in ("B", "D", "E", "F", "H"):
        assert a.store.exists(r[kept]), kept
    assert a.store.exists(a.orphan)  # not ours to collect: it may belong to a running poll
    assert report.raw_deleted == 4
    # The held message is still searchable.
    assert [h.message_key for h in a.sink.search(HOLD_QUERY).hits] == [k["E"]]


def test_plan_counts_match_apply(archive: Archive) -> None:
    a = archive
    from ingest.retention import plan_retention

    holds = HoldStore(a.path).active()
    plan = plan_retention(policy(), lifecycle_for(a.sink), holds, now=NOW)
    tallies = {t.rule: t.to_dict() for t in plan.tallies}
    assert {n: (t["matched"], t["expired"], t["held"]) for n, t in tallies.items()} == {
        "finance": (2, 1, 0), "support": (2, 1, 0), "invoices": (2, 1, 1),
        DEFAULT_RULE: (2, 1, 0)}
    assert tallies["finance"]["oldest"] == tallies["finance"]["newest"]
    assert tallies["finance"]["oldest"].startswith("2016-01-01T10:00:00")
    assert plan.held_keys == {a.keys["E"]: ["CASE-7"]}
    assert (plan.expired, plan.held, plan.documents) == (4, 1, 8)
    report = apply_retention(policy(), a.sink, a.store, a.path, now=NOW)
    assert report.plan.to_dict() == plan.to_dict()
    assert report.documents_deleted == plan.expired


def test_apply_twice_is_a_no_op(archive: Archive) -> None:
    a = archive
    apply_retention(policy(), a.sink, a.store, a.path, now=NOW)
    before = (remaining_keys(a), receipt_status(a), sorted(a.store.iter_hashes()),
              AuditLog(a.path).path.read_bytes())
    again = apply_retention(policy(), a.sink, a.store, a.path, now=NOW)
    assert (again.documents_deleted, again.receipts_expired, again.raw_deleted,
            again.batches) == (0, 0, 0, 0)
    assert (remaining_keys(a), receipt_status(a), sorted(a.store.iter_hashes()),
            AuditLog(a.path).path.read_bytes()) == before


def test_hold_release_lets_rules_apply(archive: Archive) -> None:
    a = archive
    apply_retention(policy(), a.sink, a.store, a.path, now=NOW)
    HoldStore(a.path).release("CASE-7", actor="counsel")
    report = apply_retention(policy(), a.sink, a.store, a.path, now=NOW)
    assert report.documents_deleted == 1
    assert a.keys["E"] not in remaining_keys(a)
    # Now nothing refers to F's raw object (E's second receipt expired too).
    assert not a.store.exists(a.raws["F"]) and not a.store.exists(a.raws["E"])


def test_audit_records_batches_and_verifies(archive: Archive) -> None:
    a = archive
    strict = replace(policy(), batch_size=3)
    report = apply_retention(strict, a.sink, a.store, a.path, actor="records-team", now=NOW)
    entries = AuditLog(a.path).entries()
    assert [e.action for e in entries] == ["retention.apply"] * 3  # 2 batches + raw objects
    assert report.batches == 2 and report.audit_seqs == [1, 2, 3]
    recorded = {k for e in entries[:2] for k in e.what["message_keys"]}
    assert recorded == {a.keys[n] for n in ("A", "C", "F", "G")}
    assert sum(sum(e.why["rules"].values()) for e in entries[:2]) == 4
    assert entries[2].what["count"] == 4 and "raw_sha256" in entries[2].what
    assert all(e.actor == "records-team" for e in entries)
    assert AuditLog(a.path).verify().ok


def test_cli_plan_apply_hold_and_audit(archive: Archive, tmp_path: Path,
                                       request: pytest.FixtureRequest) -> None:
    """The commands over the configured sink; the clock is the real one, so only rules whose
    verdict does not change between NOW and today are checked."""
    import typer

    from ingest.cli_compliance import register

    a = archive
    kind = type(a.sink).__name__
    if kind == "MemorySink":
        pytest.skip("the CLI opens the configured sink; memory is not configurable")
    data: dict[str, Any] = {"archive": {"path": str(a.path)}, "retention": RETENTION}
    if kind == "ElasticsearchSink":
        es = a.sink.config  # type: ignore[attr-defined]
        data["elasticsearch"] = {"url": es.url, "index_prefix": es.index_prefix}
    else:
        assert Path(a.sink.path) == a.path / "index.sqlite3"  # type: ignore[attr-defined]
    config = tmp_path / "popvault.toml"
    config.write_text(dumps(data))
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    result = runner.invoke(app, ["hold", "add", "CASE-8", "--query", "from:dave@client.test",
                                 "--actor", "counsel", "-c", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["hold", "list", "--json", "-c", str(config)])
    assert {h["name"] for h in json.loads(result.output)["holds"]} == {"CASE-7", "CASE-8"}
    result = runner.invoke(app, ["retention", "plan", "--json", "-c", str(config)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["held"] == 2  # E and F
    result = runner.invoke(app, ["retention", "apply", "-c", str(config)])
    assert result.exit_code == 2  # no terminal, no --yes: refuse
    result = runner.invoke(app, ["retention", "apply", "--yes", "--json", "--actor", "ops",
                                 "-c", str(config)])
    assert result.exit_code == 0, result.output
    applied = json.loads(result.output)
    assert applied["documents_deleted"] == plan["expired"]
    assert {a.keys["E"], a.keys["F"]} <= remaining_keys(a)
    result = runner.invoke(app, ["audit", "verify", "--json", "-c", str(config)])
    assert result.exit_code == 0 and json.loads(result.output)["ok"]
    result = runner.invoke(app, ["audit", "show", "--json", "-c", str(config)])
    actions = [e["action"] for e in json.loads(result.output)["entries"]]
    assert actions[0] == "hold.add" and "retention.apply" in actions
    # Tamper, then verify fails.
    log = AuditLog(a.path).path
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[1:]))
    result = runner.invoke(app, ["audit", "verify", "-c", str(config)])
    assert result.exit_code == 1
    assert "removed" in result.output
