"""`popvault poll` end to end against real Dovecot and Elasticsearch (issue 2's acceptance).

Every assertion is about a real outcome: documents in the index, bytes in the archive, and
what the POP3 server still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ingest.archive import FilesystemStore
from ingest.config import load_config
from ingest.sinks.elasticsearch import ElasticsearchSink
from tests import corpus
from tests.integration.proxy import CuttableProxy
from tests.integration.support import run_cli


def poll_json(config: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    done = run_cli("poll", "--json", *extra, config=config)
    assert "Traceback" not in done.stderr, done.stderr
    try:
        data = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"poll printed no JSON (exit {done.returncode}): {done.stdout}\n{done.stderr}")
    return done.returncode, {a["account_id"]: a for a in data["accounts"]}, done.stderr


def es_count(es_client: Any, prefix: str) -> int:
    es_client.indices.refresh(index=f"{prefix}-*")
    return int(es_client.count(index=f"{prefix}-messages")["count"])


@pytest.fixture
def three_mailboxes(mailbox_factory: Any) -> tuple[list[Any], int]:
    """≥ 300 messages over 3 accounts, with cross-account copies and Message-ID collisions."""
    boxes = [mailbox_factory() for _ in range(3)]
    expected = 0
    for i, box in enumerate(boxes):
        mails = corpus.generate_mail(seed=100 + i, n=110)
        box.deliver_many(mails)
        expected += len(mails)
    shared_a, shared_b = corpus.same_message_two_deliveries()
    boxes[0].deliver(shared_a)
    boxes[1].deliver(shared_b)
    expected += 1  # one message, two mailboxes → one document
    twin_1, twin_2 = corpus.same_message_id_different_content()
    boxes[2].deliver(twin_1)
    boxes[2].deliver(twin_2)
    expected += 2  # same Message-ID, different content → two documents
    return boxes, expected


def test_poll_archives_indexes_and_second_poll_downloads_nothing(
        three_mailboxes: tuple[list[Any], int], write_config: Any, es_prefix: str,
        es_client: Any, tmp_archive: Path) -> None:
    boxes, expected = three_mailboxes
    served = {box.username: box.served() for box in boxes}
    total_served = sum(len(v) for v in served.values())
    assert total_served >= 300
    config = write_config(accounts=[b.account_config() for b in boxes], es_prefix=es_prefix)

    code, reports, stderr = poll_json(config)
    assert code == 0, stderr
    assert es_count(es_client, es_prefix) == expected
    assert sum(r["new"] for r in reports.values()) == expected
    assert sum(r["joined"] for r in reports.values()) == total_served - expected
    store = FilesystemStore(tmp_archive)
    for messages in served.values():
        for raw in messages:
            assert store.read(hashlib.sha256(raw).hexdigest()) == raw
    # Every message in a mailbox is distinct, so each account appears on exactly as many
    # documents as its mailbox holds; the shared message lists two accounts.
    aggs = es_client.search(index=f"{es_prefix}-messages", size=0,
                            aggs={"n": {"terms": {"field": "popvault.accounts"}}})
    per_account = {b["key"]: b["doc_count"] for b in aggs["aggregations"]["n"]["buckets"]}
    assert per_account == {b.username: len(served[b.username]) for b in boxes}
    assert all(box.count() == len(served[box.username]) for box in boxes), "keep deletes nothing"

    code, reports, stderr = poll_json(config)
    assert code == 0, stderr
    for box in boxes:
        r = reports[box.username]
        assert (r["new"], r["joined"], r["bytes_fetched"]) == (0, 0, 0)
        assert r["already_archived"] == len(served[box.username])
    assert es_count(es_client, es_prefix) == expected


def test_delete_empties_mailbox_only_after_archive_and_index(
        mailbox_factory: Any, write_config: Any, es_prefix: str, es_client: Any,
        tmp_archive: Path) -> None:
    box = mailbox_factory()
    box.deliver_many(corpus.generate_mail(seed=7, n=60))
    served = box.served()
    uidls = box.uidls()
    config = write_config(accounts=[box.account_config(on_archived="delete")], es_prefix=es_prefix)
    code, reports, stderr = poll_json(config)
    assert code == 0, stderr
    assert reports[box.username]["deleted"] == len(served)
    assert box.count() == 0
    store = FilesystemStore(tmp_archive)
    sink = ElasticsearchSink(load_config(config).elasticsearch)  # type: ignore[arg-type]
    try:
        for raw in served:
            assert store.read(hashlib.sha256(raw).hexdigest()) == raw
        receipts = sink.get_receipts(box.username, uidls)
        assert set(receipts) == set(uidls)
        assert {r.raw_sha256 for r in receipts.values()} == {
            hashlib.sha256(raw).hexdigest() for raw in served}
        assert all(r.deleted_at for r in receipts.values())
        keys = sorted({r.message_key for r in receipts.values()})
        es_client.indices.refresh(index=f"{es_prefix}-*")
        docs = es_client.search(index=f"{es_prefix}-messages",
                                query={"ids": {"values": keys}}, size=1000)
        assert len(docs["hits"]["hits"]) == len(keys) == len(served)
    finally:
        sink.close()


def test_elasticsearch_lost_mid_poll_deletes_nothing_and_recovers(
        mailbox_factory: Any, write_config: Any, es_prefix: str, es_client: Any,
        stack: Any) -> None:
    box = mailbox_factory()
    mails = corpus.generate_mail(seed=11, n=450)
    box.deliver_many(mails)
    held = box.count()
    port = int(stack.es_url.rsplit(":", 1)[1])
    proxy = CuttableProxy("127.0.0.1", port)
    try:
        config = write_config(accounts=[box.account_config(on_archived="delete")],
                              es_prefix=es_prefix,
                              extra={"elasticsearch": {"url": proxy.url}})
        # Install the schema first, then cut the index off once the first bulk is under way.
        assert run_cli("schemas", "install", config=config).returncode == 0
        start = proxy.bytes_up

        def cutter() -> None:
            deadline = time.monotonic() + 120
            while proxy.bytes_up - start < 200_000 and time.monotonic() < deadline:
                time.sleep(0.005)
            proxy.cut()

        watcher = threading.Thread(target=cutter, daemon=True)
        watcher.start()
        code, reports, stderr = poll_json(config)
        watcher.join()
        assert code != 0
        report = reports[box.username]
        assert report["error"] is not None and report["error"]["stage"] == "sink"
        assert "Elasticsearch" in report["error"]["message"]
        assert box.count() == held, "nothing may be deleted while the index is unreachable"

        proxy.restore()
        code, reports, stderr = poll_json(config)
        assert code == 0, json.dumps(reports) + stderr
        assert box.count() == 0
        assert es_count(es_client, es_prefix) == len(mails)
    finally:
        proxy.close()


@pytest.mark.parametrize("case", ["wrong_password", "untrusted_cert", "plaintext_refused"])
def test_setting_errors_are_clear_and_distinct(case: str, mailbox_factory: Any, stack: Any,
                                               write_config: Any, es_prefix: str) -> None:
    box = mailbox_factory()
    box.deliver(corpus.generate_mail(seed=3, n=1)[0])
    if case == "wrong_password":
        acc = box.account_config()
        os.environ[acc["password_env"]] = "definitely-wrong-pw"
        expect_code, expect_text = 6, "rejected"
    elif case == "untrusted_cert":
        acc = box.account_config(ca_file=str(stack.other_ca_file))
        expect_code, expect_text = 5, "certificate"
    else:
        acc = box.account_config(security="none", port=stack.pop3_port, auth="user")
        expect_code, expect_text = 6, "plaintext"
    config = write_config(accounts=[acc], es_prefix=es_prefix)
    done = run_cli("poll", config=config)
    assert done.returncode == expect_code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert expect_text in done.stderr.lower()
    assert "definitely-wrong-pw" not in done.stderr + done.stdout
    assert box.count() == 1


def test_search_finds_by_sender_subject_and_body(mailbox_factory: Any, write_config: Any,
                                                 es_prefix: str) -> None:
    box = mailbox_factory()
    box.deliver(b"From: Zoe Quux <zoe@quux.example>\r\nTo: ops@example.com\r\n"
                b"Subject: Quarterly xylophone report\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
                b"Message-ID: <search-1@quux.example>\r\n\r\nThe flamingo budget is approved.\r\n")
    box.deliver_many(corpus.generate_mail(seed=5, n=20))
    config = write_config(accounts=[box.account_config()], es_prefix=es_prefix)
    assert poll_json(config)[0] == 0
    for query in ("from:zoe@quux.example", "from:quux.example", "subject:xylophone",
                  "flamingo", '"flamingo budget"', "to:ops@example.com after:2026-03-01"):
        done = run_cli("search", query, "--json", config=config)
        assert done.returncode == 0, done.stderr
        hits = json.loads(done.stdout)["hits"]
        assert [h["document"]["message_id"] for h in hits] == ["<search-1@quux.example>"], query


def test_hostile_and_oversize_mail_is_archived_and_indexed(
        mailbox_factory: Any, write_config: Any, es_prefix: str, es_client: Any,
        tmp_archive: Path) -> None:
    """Nothing is dropped: malformed mail gets a document (with parse_error if need be), and
    a message over max_message_bytes is archived whole and indexed from its headers."""
    from jsonschema import Draft202012Validator

    import schemas

    box = mailbox_factory()
    hostile = corpus.generate_corpus(seed=21, n=40, mix="hostile")
    box.deliver_many(hostile.messages)
    box.deliver(corpus.big_attachment(3 * 1024 * 1024, seed=4))
    served = box.served()
    limit = 2 * 1024 * 1024
    config = write_config(accounts=[box.account_config(max_message_bytes=limit,
                                                       on_archived="delete")],
                          es_prefix=es_prefix)
    code, reports, stderr = poll_json(config)
    report = reports[box.username]
    assert code == 0, json.dumps(report) + stderr
    assert report["oversize"] == 1
    assert box.count() == 0
    store = FilesystemStore(tmp_archive)
    for raw in served:
        assert store.read(hashlib.sha256(raw).hexdigest()) == raw
    es_client.indices.refresh(index=f"{es_prefix}-*")
    docs = [h["_source"] for h in es_client.search(
        index=f"{es_prefix}-messages", size=1000, query={"match_all": {}})["hits"]["hits"]]
    assert len(docs) == report["new"] == hostile.expected_distinct_keys + 1
    big = [d for d in docs if d["popvault"].get("oversize")]
    assert len(big) == 1 and big[0]["popvault"]["raw_size"] > limit
    assert big[0]["popvault"]["parse_status"] == "oversize"
    validator = Draft202012Validator(schemas.document_schema())
    for doc in docs:
        errors = sorted(validator.iter_errors(doc), key=str)
        assert not errors, (doc["popvault"]["message_key"], errors[0].message)


def test_embedded_default_without_elasticsearch(mailbox_factory: Any, write_config: Any,
                                                tmp_archive: Path) -> None:
    """No [elasticsearch] section: documents, receipts and search live beside the archive."""
    boxes = [mailbox_factory() for _ in range(2)]
    shared_a, shared_b = corpus.same_message_two_deliveries(seed=9)
    for i, box in enumerate(boxes):
        box.deliver_many(corpus.generate_mail(seed=300 + i, n=30))
    boxes[0].deliver(shared_a)
    boxes[1].deliver(shared_b)
    config = write_config(accounts=[b.account_config(on_archived="delete") for b in boxes])
    served = [raw for b in boxes for raw in b.served()]
    code, reports, stderr = poll_json(config)
    assert code == 0, json.dumps(reports) + stderr
    assert sum(r["new"] for r in reports.values()) == 61
    assert sum(r["joined"] for r in reports.values()) == 1
    assert all(b.count() == 0 for b in boxes)
    assert (tmp_archive / "index.sqlite3").is_file()
    store = FilesystemStore(tmp_archive)
    for raw in served:
        assert store.read(hashlib.sha256(raw).hexdigest()) == raw
    subject = corpus.generate_mail(seed=300, n=30)[0].split(b"Subject: ", 1)[1].split(b"\r\n")[0]
    done = run_cli("search", f'subject:"{subject.decode()}"', "--json", config=config)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] >= 1


@pytest.mark.parametrize("backend", ["elasticsearch", "embedded"])
def test_phrase_inside_an_attached_contract_is_found_by_search(
        backend: str, mailbox_factory: Any, write_config: Any, es_prefix: str) -> None:
    """A phrase only present in a PDF/DOCX attachment finds the message (issue: compliance)."""
    from tests.unit.test_attachtext import make_docx, make_pdf, message

    box = mailbox_factory()
    box.deliver(message(("contract.pdf", "application/pdf",
                         make_pdf(["Master agreement", "the indemnification ceiling applies"]))))
    box.deliver(message(("memo.docx", "application/vnd.openxmlformats-officedocument."
                         "wordprocessingml.document", make_docx("quarterly walrus inventory"))))
    box.deliver_many(corpus.generate_mail(seed=31, n=10))
    config = write_config(accounts=[box.account_config()],
                          es_prefix=es_prefix if backend == "elasticsearch" else None)
    assert poll_json(config)[0] == 0
    for query, name in (('"indemnification ceiling"', "contract.pdf"),
                        ("walrus", "memo.docx")):
        done = run_cli("search", query, "--json", config=config)
        assert done.returncode == 0, done.stderr
        hits = json.loads(done.stdout)["hits"]
        assert [h["document"]["attachments"] for h in hits] == [[name]], query


def test_classification_rules_come_from_the_config(mailbox_factory: Any, write_config: Any,
                                                   tmp_archive: Path) -> None:
    """[support.classify] replaces built-in patterns; a misspelt rule names file and key."""
    from ingest.sinks.embedded import EmbeddedSink

    box = mailbox_factory()
    box.deliver(b"From: robot@monitor.example\r\nTo: ops@example.com\r\n"
                b"Subject: Robot report: nightly backup ok\r\n"
                b"Date: Tue, 03 Mar 2026 04:00:00 +0000\r\n"
                b"Message-ID: <robot-1@monitor.example>\r\n\r\nAll green.\r\n")
    rules = {"support": {"classify": {"auto_reply_subjects": ["^Robot report:"]}}}
    config = write_config(accounts=[box.account_config()], extra=rules)
    assert poll_json(config)[0] == 0
    sink = EmbeddedSink(tmp_archive / "index.sqlite3")
    try:
        docs = list(sink.iter_documents())
    finally:
        sink.close()
    assert [doc["popvault"]["kind"] for _key, doc in docs] == ["auto_reply"]

    bad = write_config(accounts=[box.account_config()],
                       extra={"support": {"classify": {"auto_reply_subject": ["x"]}}})
    done = run_cli("poll", config=bad)
    assert done.returncode == 3, done.stderr
    assert str(bad) in done.stderr and "auto_reply_subject" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_idle_poll_sends_uidl_but_no_list(mailbox_factory: Any, stack: Any,
                                            write_config: Any, es_prefix: str) -> None:
    """Fewer round trips: LIST (sizes) is asked for only when there is something to fetch.
    Plaintext with APOP, through a recording proxy, so the commands can be read."""
    from tests.integration.proxy import CuttableProxy

    box = mailbox_factory()
    box.deliver_many(corpus.generate_mail(seed=11, n=3))
    proxy = CuttableProxy("127.0.0.1", stack.pop3_port)
    try:
        acc = box.account_config(security="none", host="127.0.0.1", port=proxy.port,
                                 auth="apop")
        config = write_config(accounts=[acc], es_prefix=es_prefix)
        first = run_cli("poll", "--json", config=config)
        assert first.returncode == 0, first.stderr
        sent = bytes(proxy.upstream).upper()
        assert b"\r\nLIST\r\n" in sent and b"RETR " in sent
        proxy.upstream.clear()
        again = run_cli("poll", "--json", config=config)
        assert again.returncode == 0, again.stderr
        sent = bytes(proxy.upstream).upper()
        assert b"UIDL\r\n" in sent and b"QUIT\r\n" in sent
        assert b"LIST" not in sent and b"RETR" not in sent
        assert json.loads(again.stdout)["accounts"][0]["server_messages"] == 3
    finally:
        proxy.close()
