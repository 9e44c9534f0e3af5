"""One TLS context per CA file (as it is on disk) and verify setting; sessions by server."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.pop3.tls import SessionCache, shared_ssl_context

SYSTEM_CA = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"


def test_contexts_are_shared_until_the_ca_file_changes(tmp_path: Path) -> None:
    default = shared_ssl_context(None, True)
    assert default is shared_ssl_context(None, True)
    assert default is not shared_ssl_context(None, False)
    assert shared_ssl_context(None, False).verify_mode == ssl.CERT_NONE
    pem = Path(SYSTEM_CA).read_bytes()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem)
    first = shared_ssl_context(ca, True)
    assert first is shared_ssl_context(ca, True)
    ca.write_bytes(pem + b"\n")  # rotated: a new context reads it again
    os.utime(ca, ns=(1, 1))
    assert shared_ssl_context(ca, True) is not first


def test_an_unreadable_ca_file_is_still_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        shared_ssl_context(tmp_path / "missing.pem", True)


def test_session_cache_is_per_server_and_context_and_bounded() -> None:
    cache = SessionCache(capacity=2)
    ctx_a, ctx_b = ssl.create_default_context(), ssl.create_default_context()
    marker: object = object()
    cache.put("Pop.Example.com", 995, ctx_a, marker)  # type: ignore[arg-type]
    assert cache.get("pop.example.com", 995, ctx_a) is marker
    assert cache.get("pop.example.com", 995, ctx_b) is None
    assert cache.get("pop.example.com", 110, ctx_a) is None
    cache.put("b.example.com", 995, ctx_a, object())  # type: ignore[arg-type]
    cache.put("c.example.com", 995, ctx_a, object())  # type: ignore[arg-type]
    assert cache.get("pop.example.com", 995, ctx_a) is None  # the oldest made room
