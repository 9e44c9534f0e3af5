"""Fixtures for tests against the real stack (Dovecot POP3, Redis, Elasticsearch).

Names here are a contract used by every integration test; see tests/harness for the stack.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.harness import dovecot
from tests.harness import mailbox as mailbox_mod
from tests.harness import stack as stack_mod
from tests.harness.mailbox import Mailbox
from tests.harness.stack import Stack
from tests.harness.toml_writer import deep_merge, dumps
from tests.integration.support import lease_key, release_lease

if TYPE_CHECKING:
    import elasticsearch
    import redis

HERE = Path(__file__).resolve().parent
REDIS_LEASE_S = 3600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test, so `-m "not integration"`
    runs without any servers."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Stack:
    """Start (or reuse) the stack; `up` is idempotent and locked against parallel runs."""
    return stack_mod.up()


@pytest.fixture
def mailbox_factory(stack: Stack, monkeypatch: pytest.MonkeyPatch
                    ) -> Iterator[Callable[..., Mailbox]]:
    """``mailbox_factory(name=None, password=None) -> Mailbox``; users vanish at teardown."""
    made: list[Mailbox] = []

    def factory(name: str | None = None, password: str | None = None) -> Mailbox:
        mb = mailbox_mod.create(stack.settings, monkeypatch.setenv, name, password)
        made.append(mb)
        return mb

    yield factory
    for mb in made:
        dovecot.remove_user(stack.settings, mb.username)


@pytest.fixture(scope="session")
def es_client(stack: Stack) -> Iterator[elasticsearch.Elasticsearch]:
    from elasticsearch import Elasticsearch

    client = Elasticsearch(stack.es_url, request_timeout=60)
    yield client
    client.close()


@pytest.fixture
def es_prefix(es_client: elasticsearch.Elasticsearch) -> Iterator[str]:
    """A unique index prefix; its indices, aliases and templates are deleted afterwards."""
    prefix = f"pvt-{secrets.token_hex(5)}"
    yield prefix
    es = es_client.options(ignore_status=404)
    es.indices.delete(index=f"{prefix}*", expand_wildcards="all", ignore_unavailable=True,
                      allow_no_indices=True)
    es.indices.delete_index_template(name=f"{prefix}*")
    es.cluster.delete_component_template(name=f"{prefix}*")
    es.indices.delete_template(name=f"{prefix}*")


@pytest.fixture
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    """A client on a Redis db (1..15) leased in db 0, so concurrent pytest runs never flush
    each other's data; flushed before and after."""
    import redis as redis_lib

    base = stack.redis_url.rsplit("/", 1)[0]
    control = redis_lib.Redis.from_url(f"{base}/0")
    token = uuid.uuid4().hex
    db = next((n for n in range(1, 16)
               if control.set(lease_key(n), token, nx=True, ex=REDIS_LEASE_S)),
              None)
    if db is None:
        control.close()
        pytest.fail("all Redis test dbs 1..15 are leased; stale leases expire after 1h")
    client = redis_lib.Redis.from_url(f"{base}/{db}")
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
        release_lease(control, db, token)
        control.close()


@pytest.fixture
def tmp_archive(tmp_path: Path) -> Path:
    path = tmp_path / "archive"
    path.mkdir()
    return path


@pytest.fixture
def write_config(stack: Stack, tmp_archive: Path, tmp_path: Path) -> Callable[..., Path]:
    """``write_config(accounts=[...], es_prefix=None, extra=None) -> Path`` of a popvault
    TOML file; ``extra`` is deep-merged over the generated tables."""
    counter = [0]

    def write(accounts: list[dict[str, Any]] | None = None, es_prefix: str | None = None,
              extra: dict[str, Any] | None = None) -> Path:
        data: dict[str, Any] = {"archive": {"path": str(tmp_archive)}}
        if es_prefix is not None:
            data["elasticsearch"] = {"url": stack.es_url, "index_prefix": es_prefix}
        data = deep_merge(data, extra or {})
        if accounts:
            data["accounts"] = list(accounts)
        counter[0] += 1
        path = tmp_path / ("popvault.toml" if counter[0] == 1 else
                           f"popvault-{counter[0]}.toml")
        path.write_text(dumps(data))
        return path

    return write
