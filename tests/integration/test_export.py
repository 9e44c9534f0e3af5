"""`popvault export` round trips: exported bytes re-import to identical SHA-256s (mbox and
eml-zip), query paging on Elasticsearch, manifests, audit."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import mailbox
import re
import zipfile
from pathlib import Path
from typing import Any

from ingest.mailsources import iter_mbox
from tests.integration.test_integrity import QUOTED, cli_json, polled, run_cli

FROM_FIRST = (b"From: first@example.test\r\nSubject: from line inside\r\n"
              b"Message-ID: <fromline.1@example.test>\r\n\r\nhello\r\n\r\n"
              b"From me to you\r\n\r\n>From quoted\r\n")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_export_mbox_and_zip_round_trip_through_import(
        mailbox_factory: Any, write_config: Any, es_prefix: str, tmp_path: Path,
        tmp_archive: Path) -> None:
    box, config = polled(mailbox_factory, write_config, es_prefix, n=30)
    box.deliver(FROM_FIRST)
    assert run_cli("poll", config=config).returncode == 0
    served = {sha(raw): raw for raw in box.served()}
    assert len(served) == 32

    mbox_path = tmp_path / "all.mbox"
    code, rep, _ = cli_json("export", "", "--format", "mbox", "--out", str(mbox_path),
                            "--reason", "LEGAL-1", config=config)
    assert code == 0 and rep["count"] == 32 and not rep["unterminated"], rep
    data = mbox_path.read_bytes()
    assert rep["out_sha256"] == sha(data)
    # popvault import's own reader gives back every message byte for byte
    read = [m.raw for m in iter_mbox(mbox_path)]
    assert sorted(sha(r) for r in read) == sorted(served)
    # ...and so does Python's mailbox module, after mboxrd unquoting
    box_file = mailbox.mbox(str(mbox_path))
    keys = box_file.keys()
    py = [re.sub(rb"(?m)^>(>*From )", rb"\1", box_file.get_bytes(k)) for k in keys]
    assert sorted(sha(m) for m in py) == sorted(served)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all.mbox.manifest.csv").read_text())))
    assert sorted(r["sha256"] for r in rows) == sorted(served)
    assert all(r["message_key"] and r["size"] for r in rows)
    assert any(r["message_id"] == "<quoted.7@example.test>" for r in rows)

    zip_path = tmp_path / "some.zip"
    code, rep, _ = cli_json("export", "subject:quoting", "--format", "eml-zip", "--out",
                            str(zip_path), config=config)
    assert code == 0 and rep["count"] == 1
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert "manifest.csv" in names
        emls = [zf.read(n) for n in names if n.endswith(".eml")]
    assert len(emls) == 1 and sha(emls[0]) in served and emls[0] == QUOTED

    # re-import both exports into a fresh embedded archive: identical hashes
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    code_all = cli_json("export", "", "--format", "eml-zip", "--out",
                        str(tmp_path / "all.zip"), config=config)[0]
    assert code_all == 0
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "all.zip") as zf:
        zf.extractall(unpacked)
    for source, account in ((mbox_path, "from-mbox"), (unpacked, "from-zip")):
        cfg = write_config(extra={"archive": {"path": str(fresh / account)}})
        code, imported, _ = cli_json("import", "--account", account, str(source), config=cfg)
        assert code == 0, imported
        objects = {p.name.split(".")[0] for p in (fresh / account / "raw").rglob("*.zst")}
        assert objects == set(served), account

    audit = [json.loads(line) for line in
             (tmp_archive / "audit" / "audit.log").read_text().splitlines()]
    exports = [e for e in audit if e["action"] == "export"]
    assert len(exports) == 3
    assert exports[0]["what"]["query"] == "" and exports[0]["why"]["reason"] == "LEGAL-1"
    assert exports[1]["what"]["query"] == "subject:quoting"
    assert exports[0]["what"]["count"] == 32


def test_export_pages_past_one_page_on_elasticsearch(
        mailbox_factory: Any, write_config: Any, es_prefix: str, tmp_path: Path,
        monkeypatch: Any) -> None:
    from ingest import export as export_mod
    from ingest.archive import open_store
    from ingest.config import load_config
    from ingest.sinks.factory import open_sink

    _box, config = polled(mailbox_factory, write_config, es_prefix, n=11)
    monkeypatch.setattr(export_mod, "PAGE_SIZE", 3)
    cfg = load_config(config)
    sink = open_sink(cfg)
    try:
        keys = [k for k, _ in export_mod.iter_matches(sink, "")]
        report = export_mod.export(sink, open_store(cfg), "-subject:quoting",
                                   export_mod.ExportFormat.MBOX, tmp_path / "p.mbox")
    finally:
        sink.close()
    assert len(keys) == len(set(keys)) == 12
    assert report.count == 11


def test_export_refuses_bad_query_and_format(write_config: Any, tmp_path: Path) -> None:
    config = write_config()
    done = run_cli("export", "from:", "--format", "mbox", "--out", str(tmp_path / "x"),
                   config=config)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = run_cli("export", "", "--format", "tar", "--out", str(tmp_path / "x"), config=config)
    assert done.returncode == 2 and "mbox or eml-zip" in done.stderr
