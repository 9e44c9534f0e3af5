"""`popvault import` end to end, on the embedded default and on real Elasticsearch.

A 1,000-message mbox with damage injected, a Maildir (cur+new) and an .eml directory go
through the real CLI; the assertions are about what ends up in the archive and the index.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingest.archive import FilesystemStore
from ingest.config import load_config
from ingest.mailsources import mbox_entry
from ingest.sinks.factory import open_sink
from tests import corpus
from tests.integration.support import run_cli as support_run_cli

QUOTED_BODY = (b"From: quoter@example.test\r\nTo: x@example.test\r\nSubject: quoting\r\n"
               b"Message-ID: <quoted.1@example.test>\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
               b"\r\nFrom the start of a line\r\n>From already quoted\r\nend\r\n")


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return support_run_cli(*args, config=config, timeout=900)


def import_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_cli("import", "--json", *args, config=config)
    assert "Traceback" not in done.stderr, done.stderr
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"import printed no JSON (exit {done.returncode}): {done.stdout}\n"
                    f"{done.stderr}")


@dataclass
class Sources:
    paths: list[Path]
    messages: list[bytes]  # every valid message as written (what the archive must hold)
    distinct: int  # documents expected
    errors: list[tuple[str, int]]  # (file, offset) of every damaged entry


def build_sources(root: Path) -> Sources:
    mails = corpus.generate_corpus(seed=2026, n=1000)
    first, second = corpus.same_message_two_deliveries(seed=2026, index=9)
    root.mkdir(parents=True, exist_ok=True)
    mbox_path = root / "big.mbox"
    errors: list[tuple[str, int]] = []
    with mbox_path.open("wb") as fh:
        for i, msg in enumerate(mails.messages):
            fh.write(mbox_entry(msg, newline=b"\r\n"))
            if i == 100:
                errors.append((str(mbox_path), fh.tell()))
                fh.write(b"From garbage Thu Jan  1 00:00:00 1970\r\n" + bytes(range(256)) * 8
                         + b"\r\n\r\n")
            if i == 500:
                errors.append((str(mbox_path), fh.tell()))
                fh.write(b"\0" * 8192)
        # Hand-quoted (mboxrd) body, independent of the writer.
        fh.write(b"From quoter Mon Mar  2 10:00:00 2026\r\n"
                 + QUOTED_BODY.replace(b"\r\nFrom the", b"\r\n>From the")
                 .replace(b"\r\n>From already", b"\r\n>>From already") + b"\r\n")
        fh.write(mbox_entry(first, newline=b"\r\n"))
        errors.append((str(mbox_path), fh.tell()))
        fh.write(mbox_entry(corpus.plain_text(seed=1, index=1))[:-30])  # cut mid-line

    maildir = root / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    md_mails = corpus.generate_mail(seed=2027, n=10)
    for i, msg in enumerate(md_mails):
        name = f"{1700000000 + i}.M{i}P1.host" + (":2,S" if i % 2 else "")
        (maildir / ("cur" if i % 2 else "new") / name).write_bytes(msg)
    (maildir / "cur" / "1800000000.M1P1.host:2,S").write_bytes(second)  # joins the mbox copy

    eml_dir = root / "eml"
    eml_dir.mkdir()
    eml_mails = corpus.generate_mail(seed=2028, n=10)
    for i, msg in enumerate(eml_mails):
        (eml_dir / f"{i:03d}.eml").write_bytes(msg)
    bad = eml_dir / "zz-bad.eml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a message")
    errors.append((str(bad), 0))

    messages = [*mails.messages, QUOTED_BODY, first, *md_mails, second, *eml_mails]
    distinct = mails.expected_distinct_keys + 1 + 1 + len(md_mails) + len(eml_mails)
    return Sources([mbox_path, maildir, eml_dir], messages, distinct, errors)


@pytest.fixture(params=["embedded", "elasticsearch"])
def import_config(request: pytest.FixtureRequest, write_config: Any) -> Path:
    prefix = request.getfixturevalue("es_prefix") if request.param == "elasticsearch" else None
    config: Path = write_config(es_prefix=prefix)
    return config


def test_import_mbox_maildir_eml_exactly_once(import_config: Path, tmp_path: Path,
                                              tmp_archive: Path) -> None:
    src = build_sources(tmp_path / "sources")
    paths = [str(p) for p in src.paths]

    code, report = import_json(import_config, *paths)
    assert code == 1  # damaged entries make the import not ok
    backend = "embedded" if load_config(import_config).elasticsearch is None else "es"
    print(f"\nimport ({backend}): {report['messages_read']} messages in "
          f"{report['duration_s']} s = {report['messages_per_s']} msg/s")
    assert report["account_id"] == "import"
    assert report["files"] == 1 + 11 + 11
    assert report["messages_read"] == len(src.messages)
    assert report["new"] == src.distinct
    assert report["joined"] == 1  # second delivery of one message
    assert report["skipped"] == 0
    assert report["errors"] == len(src.errors)
    assert sorted((e["file"], e["offset"]) for e in report["error_details"]) == sorted(src.errors)

    store = FilesystemStore(tmp_archive)
    for raw in src.messages:
        assert store.read(hashlib.sha256(raw).hexdigest()) == raw
    sink = open_sink(load_config(import_config))
    try:
        assert sink.count_documents() == src.distinct
        assert sink.count_receipts("import") == len(src.messages)
    finally:
        sink.close()

    code, again = import_json(import_config, *paths)
    assert code == 1
    assert (again["new"], again["joined"]) == (0, 0)
    assert again["skipped"] == again["messages_read"] == len(src.messages)
    assert again["errors"] == len(src.errors)
    sink = open_sink(load_config(import_config))
    try:
        assert sink.count_documents() == src.distinct
        assert sink.count_receipts("import") == len(src.messages)
    finally:
        sink.close()


def test_import_refuses_bad_path_and_account(write_config: Any, tmp_path: Path) -> None:
    config = write_config()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    done = run_cli("import", str(notes), config=config)
    assert done.returncode == 2 and str(notes) in done.stderr and "mbox" in done.stderr
    mbox = tmp_path / "ok.mbox"
    mbox.write_bytes(mbox_entry(corpus.plain_text()))
    done = run_cli("import", "--account", "bad:id", str(mbox), config=config)
    assert done.returncode == 2 and "bad:id" in done.stderr
