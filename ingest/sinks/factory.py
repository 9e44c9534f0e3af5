"""Choose the sink a configuration asks for: Elasticsearch when configured, else embedded."""

from __future__ import annotations

from ingest.config import Config
from ingest.errors import ConfigError
from ingest.sinks.base import Sink

EMBEDDED_INDEX_FILE = "index.sqlite3"


def open_sink(config: Config) -> Sink:
    """Open (but do not yet touch) the configured sink."""
    if config.elasticsearch is not None:
        from ingest.sinks.elasticsearch import ElasticsearchSink

        return ElasticsearchSink(config.elasticsearch)
    from ingest.sinks.embedded import EmbeddedSink

    try:
        config.archive_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"[archive] path {config.archive_path} cannot be created: "
                          f"{exc.strerror}") from None
    return EmbeddedSink(config.archive_path / EMBEDDED_INDEX_FILE)
