"""`popvault reconcile` against real Dovecot and Elasticsearch: every server message is
archived, pending or inconsistent, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest.archive import FilesystemStore
from tests import corpus
from tests.integration.test_integrity import cli_json, run_cli


def test_reconcile_pending_archived_and_inconsistent(
        mailbox_factory: Any, write_config: Any, es_prefix: str, es_client: Any,
        tmp_archive: Path) -> None:
    box = mailbox_factory()
    box.deliver_many(corpus.generate_mail(seed=11, n=6))
    config = write_config(accounts=[box.account_config()], es_prefix=es_prefix)
    assert run_cli("poll", config=config).returncode == 0
    box.deliver_many(corpus.generate_mail(seed=12, n=2))  # arrived after the poll

    code, rep, _ = cli_json("reconcile", "--account", box.username, config=config)
    assert code == 0 and rep["ok"], rep
    assert rep["server_messages"] == 8
    assert rep["counts"]["archived"] == 6 and rep["counts"]["pending"] == 2
    uidls = box.uidls()
    states = {m["uidl"]: m["state"] for m in rep["messages"]}
    assert [states[u] for u in uidls] == ["archived"] * 6 + ["pending"] * 2

    # remove one document by hand, directly in Elasticsearch; lose another's raw object
    victim, lost = rep["messages"][1], rep["messages"][3]
    hit = es_client.search(index=f"{es_prefix}-messages",
                           query={"ids": {"values": [victim["message_key"]]}})["hits"]["hits"][0]
    es_client.delete(index=hit["_index"], id=hit["_id"], refresh=True)
    FilesystemStore(tmp_archive).delete(lost["raw_sha256"])

    code, rep, _ = cli_json("reconcile", "--account", box.username, config=config)
    assert code == 1 and not rep["ok"]
    by_uidl = {m["uidl"]: m for m in rep["messages"]}
    assert by_uidl[victim["uidl"]]["state"] == "inconsistent"
    assert "missing from the index" in by_uidl[victim["uidl"]]["reason"]
    assert by_uidl[lost["uidl"]]["state"] == "inconsistent"
    assert "raw object" in by_uidl[lost["uidl"]]["reason"]
    assert rep["counts"] == {"archived": 4, "pending": 2, "oversize": 0, "parse_failed": 0,
                             "expired": 0, "inconsistent": 2}
    done = run_cli("reconcile", "--account", box.username, config=config)
    assert done.returncode == 1 and "missing from the index" in done.stdout
    # reconcile is read-only: the server still holds everything
    assert len(box.uidls()) == 8


def test_reconcile_oversize_and_unknown_account(mailbox_factory: Any, write_config: Any,
                                                es_prefix: str) -> None:
    box = mailbox_factory()
    box.deliver(corpus.plain_text(seed=1, size=20_000))
    box.deliver(corpus.plain_text(seed=2, size=200))
    config = write_config(accounts=[box.account_config(max_message_bytes=5_000)],
                          es_prefix=es_prefix)
    assert run_cli("poll", config=config).returncode == 0
    code, rep, _ = cli_json("reconcile", "--account", box.username, config=config)
    assert code == 0 and rep["counts"]["oversize"] == 1 and rep["counts"]["archived"] == 1
    done = run_cli("reconcile", "--account", "nobody", config=config)
    assert done.returncode == 3 and "nobody" in done.stderr and "Traceback" not in done.stderr
