"""The parser pool: bounded children, and a document for every message whatever happens."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.document import build_document
from ingest.parse import ParserPool, parse_in_process
from tests import corpus

ARCHIVED = "2026-09-01T12:00:00Z"
SLOW, CRASH, HOG = b"X-Test-Behaviour: slow", b"X-Test-Behaviour: crash", b"X-Test-Behaviour: hog"


def misbehaving_target(raw: bytes, **kwargs: Any) -> dict[str, Any]:
    """Runs in the child: stands in for a message that makes the parser hang, die or bloat."""
    if SLOW in raw:
        time.sleep(60)
    if CRASH in raw:
        os._exit(3)
    if HOG in raw:
        hog = bytearray(2 * 1024 * 1024 * 1024)  # over the 512 MiB limit below: MemoryError
        hog[0] = 1
    return build_document(raw, **kwargs)


def marked(marker: bytes, seed: int) -> bytes:
    return marker + b"\r\n" + corpus.plain_text(seed=seed)


@pytest.fixture(scope="module")
def pool() -> Iterator[ParserPool]:
    with ParserPool(workers=2, timeout_s=1.5, memory_mb=512, target=misbehaving_target) as p:
        yield p


def test_pool_matches_in_process(pool: ParserPool) -> None:
    messages = list(corpus.special_cases(seed=5).values())[:12]
    futures = [pool.submit(raw, first_archived=ARCHIVED) for raw in messages]
    for raw, future in zip(messages, futures, strict=True):
        assert future.result(timeout=30) == parse_in_process(raw, first_archived=ARCHIVED)


def test_timeout_yields_flagged_headers_only_document(pool: ParserPool) -> None:
    raw = marked(SLOW, 1)
    started = time.monotonic()
    others = [pool.submit(corpus.plain_text(seed=i), first_archived=ARCHIVED) for i in range(4)]
    slow = pool.submit(raw, first_archived=ARCHIVED)
    doc = slow.result(timeout=30)
    assert time.monotonic() - started < 15
    pv = doc["popvault"]
    assert pv["parse_status"] == "timeout"
    assert "exceeded" in pv["parse_error"]
    assert pv["body_text"] == "" and doc["email"]["subject"].endswith("#0")
    assert all(f.result(timeout=30)["popvault"]["parse_status"] == "ok" for f in others)
    after = pool.submit(corpus.plain_text(seed=99), first_archived=ARCHIVED).result(timeout=30)
    assert after["popvault"]["parse_status"] == "ok"
    assert pool.stats.timeouts >= 1


def test_dead_child_yields_failed_document(pool: ParserPool) -> None:
    doc = pool.submit(marked(CRASH, 2), first_archived=ARCHIVED).result(timeout=30)
    assert doc["popvault"]["parse_status"] == "failed"
    assert "died" in doc["popvault"]["parse_error"]
    assert pool.parse(corpus.plain_text(seed=3))["popvault"]["parse_status"] == "ok"


def test_memory_limit_yields_failed_document(pool: ParserPool) -> None:
    doc = pool.submit(marked(HOG, 4), first_archived=ARCHIVED).result(timeout=30)
    assert doc["popvault"]["parse_status"] == "failed"
    error = doc["popvault"]["parse_error"]
    assert "MemoryError" in error or "died" in error
    assert pool.parse(corpus.plain_text(seed=5))["popvault"]["parse_status"] == "ok"


def test_submit_fills_identity_fields(pool: ParserPool) -> None:
    raw = corpus.plain_text(seed=6)
    doc = pool.parse(raw)
    assert doc["popvault"]["message_key"] == parse_in_process(raw)["popvault"]["message_key"]


def test_submit_outside_context_is_refused() -> None:
    with pytest.raises(RuntimeError):
        ParserPool(workers=1).submit(b"Subject: x\r\n\r\n")


def timed_target(raw: bytes, **kwargs: Any) -> dict[str, Any]:
    """Runs in the child: records when it parsed (wall clock, comparable across processes)."""
    started = time.time()
    time.sleep(0.4)
    return {"started": started, "ended": time.time(), "size": len(raw)}


def test_large_messages_are_parsed_one_at_a_time_small_ones_overtake() -> None:
    from ingest.parse import LARGE_PARSE_BYTES

    large = [b"X" * LARGE_PARSE_BYTES + bytes([i]) for i in range(2)]
    small = b"Subject: small\r\n\r\nhi\r\n"
    with ParserPool(workers=2, timeout_s=30, target=timed_target) as pool:
        futures = [pool.submit(raw, first_archived=ARCHIVED) for raw in [*large, small]]
        first, second, tiny = (f.result(timeout=30) for f in futures)
    assert second["started"] >= first["ended"] - 0.05, "two large parses overlapped"
    assert tiny["started"] < first["ended"], "the small message waited behind the large one"


def test_lazy_pool_starts_children_on_the_first_message() -> None:
    with ParserPool(workers=1, timeout_s=30, lazy=True) as pool:
        assert pool.stats.children_started == 0
        doc = pool.parse(corpus.plain_text(seed=3), first_archived=ARCHIVED)
        assert doc["popvault"]["parse_status"] == "ok"
        assert pool.stats.children_started == 1
    with ParserPool(workers=1, timeout_s=30, lazy=True) as idle:
        pass
    assert idle.stats.children_started == 0


def instant_target(raw: bytes, **kwargs: Any) -> dict[str, Any]:
    return {"size": len(raw)}


def test_results_come_back_as_soon_as_they_are_ready() -> None:
    """A finished parse is collected at once, not at the next deadline (20 s away here)."""
    with ParserPool(workers=1, timeout_s=20, target=instant_target) as pool:
        pool.parse(b"warm-up", first_archived=ARCHIVED)
        started = time.monotonic()
        for i in range(50):
            assert pool.parse(b"x" * i, first_archived=ARCHIVED) == {"size": i}
        assert time.monotonic() - started < 5, "a finished parse waited for its deadline"


def test_messages_larger_than_the_pipe_arrive_whole() -> None:
    from ingest.parse import PIPE_BYTES

    sizes = [PIPE_BYTES * 5 + 3, 10, PIPE_BYTES - 1, 0]
    with ParserPool(workers=2, timeout_s=30, target=instant_target) as pool:
        futures = [pool.submit(b"y" * n, first_archived=ARCHIVED) for n in sizes]
        assert [f.result(timeout=30)["size"] for f in futures] == sizes


def test_children_are_replaced_after_their_quota_and_all_stop_on_close() -> None:
    import multiprocessing

    def parsers() -> set[int | None]:
        return {p.pid for p in multiprocessing.active_children() if p.name == "popvault-parser"}

    before = parsers()  # the module's pool is still running
    with ParserPool(workers=2, timeout_s=30, max_tasks_per_child=3,
                    target=instant_target) as pool:
        for i in range(10):
            assert pool.parse(b"z" * i, first_archived=ARCHIVED) == {"size": i}
        assert pool.stats.children_started >= 5
    assert parsers() <= before
