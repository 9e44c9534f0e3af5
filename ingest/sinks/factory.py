"""Choose the sink a configuration asks for: Elasticsearch when configured, else embedded."""

from __future__ import annotations

from ingest.config import Config
from ingest.sinks.base import Sink


def open_sink(config: Config) -> Sink:
    """Open (but do not yet touch) the configured sink."""
    if config.elasticsearch is not None:
        from ingest.sinks.elasticsearch import ElasticsearchSink

        return ElasticsearchSink(config.elasticsearch)
    from ingest.sinks.embedded import EmbeddedSink

    return EmbeddedSink(config.archive_path / "index.sqlite3")
