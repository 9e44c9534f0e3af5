"""`popvault migrate --to-elasticsearch`: an embedded archive moved into real Elasticsearch.

The embedded archive is built by importing (two accounts sharing one message); afterwards every
document (with both accounts) and every receipt must be in Elasticsearch with equal fields, and
a second migration must change nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ingest.config import load_config
from ingest.mailsources import mbox_entry
from ingest.sinks.elasticsearch import ElasticsearchSink
from ingest.sinks.embedded import EmbeddedSink
from ingest.sinks.factory import EMBEDDED_INDEX_FILE
from tests import corpus
from tests.integration.test_import import import_json, run_cli


def migrate_json(config: Path) -> tuple[int, dict[str, Any]]:
    done = run_cli("migrate", "--to-elasticsearch", "--json", config=config)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def es_state(es_client: Any, prefix: str) -> dict[str, tuple[str, int, int, dict[str, Any]]]:
    """Every document and receipt: id -> (index, seq_no, primary_term, source)."""
    es_client.indices.refresh(index=f"{prefix}-*")
    found = {}
    for alias in (f"{prefix}-messages", f"{prefix}-receipts"):
        resp = es_client.search(index=alias, size=10_000, seq_no_primary_term=True,
                                query={"match_all": {}})
        for hit in resp["hits"]["hits"]:
            found[f"{alias}/{hit['_id']}"] = (hit["_index"], hit["_seq_no"],
                                              hit["_primary_term"], hit["_source"])
    return found


def test_migrate_embedded_to_elasticsearch(write_config: Any, es_prefix: str, es_client: Any,
                                           tmp_archive: Path, tmp_path: Path) -> None:
    shared_a, shared_b = corpus.same_message_two_deliveries(seed=5, index=1)
    alpha = tmp_path / "alpha.mbox"
    alpha.write_bytes(b"".join(mbox_entry(m, newline=b"\r\n") for m in
                               [*corpus.generate_mail(seed=51, n=30), shared_a]))
    beta = tmp_path / "beta"
    beta.mkdir()
    for i, msg in enumerate([*corpus.generate_mail(seed=52, n=20), shared_b]):
        (beta / f"{i:03d}.eml").write_bytes(msg)
    (beta / "dup-of-alpha.eml").write_bytes(shared_a)  # the very same bytes, other account

    embedded_config = write_config()
    code, report = import_json(embedded_config, "--account", "alpha", str(alpha))
    assert code == 0 and report["new"] == 31
    code, report = import_json(embedded_config, "--account", "beta", str(beta))
    assert code == 0 and (report["new"], report["joined"]) == (20, 2)

    source = EmbeddedSink(tmp_archive / EMBEDDED_INDEX_FILE)
    docs = dict(source.iter_documents())
    receipts = {r.id: r.to_dict() for r in source.iter_receipts()}
    source.close()
    assert len(docs) == 51 and len(receipts) == 53
    shared = [d for d in docs.values() if d["popvault"]["accounts"] == ["alpha", "beta"]]
    assert len(shared) == 1

    es_config = write_config(es_prefix=es_prefix)  # same [archive] path, plus [elasticsearch]
    code, first = migrate_json(es_config)
    assert code == 0, first
    assert first["ok"] and first["counts_match"]
    assert first["documents"] == {"source": 51, "created": 51, "joined": 0, "unchanged": 0,
                                  "target": 51, "verified": 51}
    assert first["receipts"] == {"source": 53, "created": 53, "unchanged": 0, "conflicting": 0,
                                 "target": 53, "verified": 53}

    sink = ElasticsearchSink(load_config(es_config).elasticsearch)  # type: ignore[arg-type]
    try:
        state = es_state(es_client, es_prefix)
        for key, doc in docs.items():
            index, _seq, _term, es_doc = state[f"{es_prefix}-messages/{key}"]
            assert index == sink.index_for(doc)
            assert es_doc == doc  # every field, accounts list in order
        es_receipts = {r.id: r.to_dict() for r in sink.iter_receipts()}
        assert es_receipts == receipts
    finally:
        sink.close()

    code, second = migrate_json(es_config)
    assert code == 0, second
    assert second["documents"]["created"] == 0 and second["documents"]["unchanged"] == 51
    assert second["receipts"]["created"] == 0 and second["receipts"]["unchanged"] == 53
    assert es_state(es_client, es_prefix) == state  # not even a no-op write


def test_migrate_needs_elasticsearch_and_an_embedded_index(write_config: Any,
                                                           es_prefix: str) -> None:
    done = run_cli("migrate", "--to-elasticsearch", config=write_config())
    assert done.returncode == 3 and "[elasticsearch]" in done.stderr
    done = run_cli("migrate", "--to-elasticsearch", config=write_config(es_prefix=es_prefix))
    assert done.returncode == 3 and EMBEDDED_INDEX_FILE in done.stderr
