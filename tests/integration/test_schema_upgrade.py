"""Upgrading popvault must not strand indices created under an older (strict) mapping."""

from __future__ import annotations

import copy
from typing import Any

from ingest import dedup
from ingest.config import ElasticsearchConfig
from ingest.document import build_document
from ingest.outcome import Delivery
from ingest.sinks.base import IndexItem
from ingest.sinks.elasticsearch import ElasticsearchSink
from tests import corpus


class _OldTemplates:
    """The current templates minus a field, standing in for an older popvault release."""

    def __init__(self, drop: str) -> None:
        import schemas

        self._schemas = schemas
        self.drop = drop

    def index_template(self, prefix: str) -> dict[str, Any]:
        body = copy.deepcopy(self._schemas.index_template(prefix))
        del body["template"]["mappings"]["properties"]["popvault"]["properties"][self.drop]
        return body

    def receipts_template(self, prefix: str) -> dict[str, Any]:
        return self._schemas.receipts_template(prefix)


def test_existing_indices_accept_new_fields_after_schema_install(
        stack: Any, es_prefix: str, es_client: Any) -> None:
    config = ElasticsearchConfig(url=stack.es_url, index_prefix=es_prefix)
    raw = corpus.generate_mail(seed=77, n=1)[0]
    sha = dedup.raw_sha256(raw)
    doc = build_document(raw, raw_sha256=sha, message_key=dedup.message_key(raw),
                         first_archived="2026-01-01T00:00:00Z")
    assert "reply_text" in doc["popvault"]
    item = IndexItem(message_key=doc["popvault"]["message_key"], account_id="acc", uidl="u1",
                     raw_sha256=sha, raw_size=len(raw), document=doc)

    old = ElasticsearchSink(config, templates=_OldTemplates("reply_text"))
    old.ensure_schema()
    es_client.indices.create(index=old.index_for(doc))  # the month's index, old mapping
    rejected = old.write([item])
    assert rejected[0].delivery is Delivery.REJECTED  # strict mapping: the field is unknown
    old.close()

    new = ElasticsearchSink(config)
    new.ensure_schema()
    assert new.write([item])[0].delivery is Delivery.DELIVERED
    assert new.count_documents() == 1
    new.close()
