"""POP3 client for popvault: verified TLS, STLS, SASL logins, streaming pipelined RETR.

Replaces stdlib ``poplib`` (2,048-byte line cap, list-of-lines RETR, unverified TLS).
Public names are re-exported here; the modules behind them are implementation detail.
"""

from ingest.pop3.auth import choose_mechanism
from ingest.pop3.protocol import (
    CHUNK_BYTES,
    MAX_CAPA_LINES,
    MAX_LINE_BYTES,
    ByteReader,
    Capabilities,
    Greeting,
    Reply,
    parse_capabilities,
    parse_greeting,
    parse_reply,
)
from ingest.pop3.session import (
    PIPELINE_REFILL_AT,
    PIPELINE_WINDOW,
    Pop3Session,
    Retrieval,
    open_session,
)
from ingest.pop3.tls import create_ssl_context

__all__ = [
    "CHUNK_BYTES",
    "MAX_CAPA_LINES",
    "MAX_LINE_BYTES",
    "PIPELINE_REFILL_AT",
    "PIPELINE_WINDOW",
    "ByteReader",
    "Capabilities",
    "Greeting",
    "Pop3Session",
    "Reply",
    "Retrieval",
    "choose_mechanism",
    "create_ssl_context",
    "open_session",
    "parse_capabilities",
    "parse_greeting",
    "parse_reply",
]
