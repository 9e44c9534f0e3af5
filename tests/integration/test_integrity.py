"""`popvault verify` and `manifest build` against a real poll into Elasticsearch (and an
encrypted archive): flipped bytes, deleted objects, orphans and altered manifests are caught."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ingest.archive import FilesystemStore, open_store
from ingest.config import load_config
from ingest.crypto import is_encrypted
from tests import corpus
from tests.integration.support import run_cli

QUOTED = (b"From: quoter@example.test\r\nTo: x@example.test\r\nSubject: quoting\r\n"
          b"Message-ID: <quoted.7@example.test>\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
          b"\r\nFrom the start of a line\r\n>From already quoted\r\n>>From twice\r\nend\r\n")


def cli_json(*args: str, config: Path) -> tuple[int, dict[str, Any], str]:
    done = run_cli(*args, "--json", config=config)
    assert "Traceback" not in done.stderr, done.stderr
    try:
        return done.returncode, json.loads(done.stdout), done.stderr
    except ValueError:
        pytest.fail(f"{args[0]} printed no JSON (exit {done.returncode}): {done.stdout}\n"
                    f"{done.stderr}")


def polled(mailbox_factory: Any, write_config: Any, es_prefix: str | None,
           extra: dict[str, Any] | None = None, n: int = 12) -> tuple[Any, Path]:
    box = mailbox_factory()
    box.deliver_many(corpus.generate_mail(seed=7, n=n))
    box.deliver(QUOTED)
    config = write_config(accounts=[box.account_config()], es_prefix=es_prefix, extra=extra)
    done = run_cli("poll", "--json", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    return box, config


def test_verify_catches_flip_delete_orphan_and_altered_manifest(
        mailbox_factory: Any, write_config: Any, es_prefix: str, tmp_archive: Path) -> None:
    _box, config = polled(mailbox_factory, write_config, es_prefix)
    code, report, _ = cli_json("verify", config=config)
    assert code == 0 and report["ok"], report
    assert report["checked"] == report["referenced"] == report["stored"] == 13
    code, built, _ = cli_json("manifest", "build", config=config)
    assert code == 0 and [m["status"] for m in built["manifests"]] == ["built"]
    assert built["manifests"][0]["count"] == 13
    code, again, _ = cli_json("manifest", "build", config=config)
    assert [m["status"] for m in again["manifests"]] == ["unchanged"]

    store = FilesystemStore(tmp_archive)
    flipped, deleted = sorted(store.iter_hashes())[:2]
    path = store.path_for(flipped)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    store.delete(deleted)
    orphan = store.put_bytes(b"Subject: nobody\r\n\r\nreferenced by nothing\r\n").sha256
    manifest = next((tmp_archive / "manifests").glob("*.json"))
    altered = json.loads(manifest.read_text())
    altered["count"] += 1
    manifest.write_text(json.dumps(altered))

    code, report, _ = cli_json("verify", config=config)
    assert code == 1 and not report["ok"]
    assert report["counts"] == {"missing": 1, "corrupt": 1, "orphan": 1, "manifest": 1}
    by_kind = {f["kind"]: f for f in report["findings"]}
    assert by_kind["missing"]["subject"] == deleted
    assert by_kind["corrupt"]["subject"] == flipped
    assert by_kind["orphan"]["subject"] == orphan
    assert "edited" in by_kind["manifest"]["detail"]
    # human output names them too, and the runs are in the audit log
    done = run_cli("verify", config=config)
    assert done.returncode == 1 and deleted in done.stdout and "Traceback" not in done.stderr
    audit = (tmp_archive / "audit" / "audit.log").read_text().splitlines()
    assert [json.loads(line)["action"] for line in audit] == ["verify"] * 3


def test_verify_sample_checks_only_n(mailbox_factory: Any, write_config: Any,
                                     es_prefix: str) -> None:
    _box, config = polled(mailbox_factory, write_config, es_prefix, n=5)
    code, report, _ = cli_json("verify", "--sample", "2", config=config)
    assert code == 0 and report["checked"] == 2 and report["sampled"]


def write_key(path: Path) -> Path:
    path.write_text(os.urandom(32).hex() + "\n")
    return path


def test_encrypted_archive_verifies_exports_original_bytes_and_wrong_key_is_clear(
        mailbox_factory: Any, write_config: Any, tmp_path: Path, tmp_archive: Path) -> None:
    key = write_key(tmp_path / "k1.key")
    enc = {"encryption": {"key_id": "k1", "key_file": str(key)}}
    box, config = polled(mailbox_factory, write_config, None, extra=enc, n=8)  # embedded sink
    served = box.served()
    store = open_store(load_config(config))
    hashes = list(store.iter_hashes())
    assert len(hashes) == 9
    assert all(is_encrypted(store.path_for(h).read_bytes()[:4]) for h in hashes)
    code, report, _ = cli_json("verify", config=config)
    assert code == 0 and report["ok"] and report["encrypted"] == 9, report

    out = tmp_path / "all.zip"
    code, exported, _ = cli_json("export", "", "--format", "eml-zip", "--out", str(out),
                                 config=config)
    assert code == 0 and exported["count"] == 9
    import zipfile

    with zipfile.ZipFile(out) as zf:
        got = sorted(zf.read(n) for n in zf.namelist() if n.endswith(".eml"))
    assert got == sorted(served)

    # rotate: k1 becomes an old key, k2 writes; everything stays readable
    k2 = write_key(tmp_path / "k2.key")
    rotated = write_config(accounts=[box.account_config()], extra={"encryption": {
        "key_id": "k2", "key_file": str(k2), "old_keys": {"k1": str(key)}}})
    code, report, _ = cli_json("verify", config=rotated)
    assert code == 0 and report["ok"]

    # the wrong key for k1: one clear line naming the key id, archive exit code, no traceback
    wrong = write_config(accounts=[box.account_config()], extra={"encryption": {
        "key_id": "k1", "key_file": str(write_key(tmp_path / "wrong.key"))}})
    done = run_cli("export", "", "--format", "mbox", "--out", str(tmp_path / "x.mbox"),
                   config=wrong)
    assert done.returncode == 8, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "key id 'k1'" in done.stderr
    assert not (tmp_path / "x.mbox").exists() and not (tmp_path / "x.mbox.part").exists()
    code, report, _ = cli_json("verify", config=wrong)
    assert code == 1 and report["counts"]["corrupt"] == 9
    assert "key id 'k1'" in report["findings"][0]["detail"]
