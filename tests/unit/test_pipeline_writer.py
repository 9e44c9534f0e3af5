"""The Ingester's writer thread: batches are written in order, one at a time, while the
caller goes on staging; a write error reaches the caller; close() never leaves a write running."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ingest import pipeline
from ingest.archive import FilesystemStore
from ingest.outcome import Delivery
from ingest.parse import ParserPool
from ingest.sinks.base import IndexItem, ItemOutcome
from ingest.sinks.memory import MemorySink
from tests import corpus

pytestmark = pytest.mark.unit


class GatedSink(MemorySink):
    """Each write waits for the test to open the gate; records the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[str]] = []
        self.broken = False

    def write(self, items: Sequence[IndexItem]) -> list[ItemOutcome]:
        self.started.set()
        assert self.gate.wait(30)
        self.batches.append([i.message_key for i in items])
        if self.broken:
            raise RuntimeError("index unavailable")
        return super().write(items)


def ingester(sink: MemorySink, store: FilesystemStore, parser: ParserPool) -> pipeline.Ingester:
    return pipeline.Ingester(account_id="acc", sink=sink, store=store, parser=parser,
                             max_message_bytes=10_000_000, max_body_chars=100_000,
                             now=lambda: "2026-11-26T00:00:00Z")


def stage(ing: pipeline.Ingester, raw: bytes, n: int) -> pipeline.Staged:
    """Stage one message and wait for its parse, so every batch is whole (3 messages)."""
    staged = ing.stage([raw], ref=n, uidl=f"u{n}")
    assert staged is not None and staged.future is not None
    staged.future.result(timeout=30)
    return staged


def test_staging_goes_on_while_a_batch_is_written_and_order_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "BATCH_MESSAGES", 3)
    mail = corpus.generate_mail(seed=21, n=9)
    sink, store = GatedSink(), FilesystemStore(tmp_path)
    with ParserPool(workers=1, timeout_s=30) as parser:
        ing = ingester(sink, store, parser)
        written: list[Any] = []
        for n, raw in enumerate(mail[:3]):
            written += ing.add(stage(ing, raw, n))
        assert sink.started.wait(30), "the first full batch was not handed to the writer"
        # The writer is stuck in the index: the caller still archives and stages the next
        # batch (two may be in flight; a third would wait).
        for n, raw in enumerate(mail[3:6], start=3):
            staged = stage(ing, raw, n)
            assert store.exists(staged.stored.sha256)
            written += ing.add(staged)
        assert written == [] and len(ing._writes) == 2
        sink.gate.set()
        for n, raw in enumerate(mail[6:], start=6):
            written += ing.add(stage(ing, raw, n))
        written += ing.finish()
        ing.close()
    assert [s.ref for s, _ in written] == list(range(9))
    assert all(o.delivery is Delivery.DELIVERED for _, o in written)
    assert len(sink.documents) == len({s.message_key for s, _ in written})
    keys = [k for batch in sink.batches for k in batch]
    assert keys == [s.message_key for s, _ in written]  # written in the order staged


def test_a_write_error_reaches_the_caller(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "BATCH_MESSAGES", 2)
    mail = corpus.generate_mail(seed=22, n=4)
    sink, store = GatedSink(), FilesystemStore(tmp_path)
    sink.broken = True
    sink.gate.set()
    with ParserPool(workers=1, timeout_s=30) as parser:
        ing = ingester(sink, store, parser)
        with pytest.raises(RuntimeError, match="index unavailable"):
            for n, raw in enumerate(mail):
                ing.add(stage(ing, raw, n))
            ing.finish()
        ing.close()
        ing.close()  # twice is fine
    assert sink.documents == {}
