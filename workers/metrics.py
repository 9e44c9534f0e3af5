"""Prometheus metrics of the workers, served on ``[metrics] port`` when configured.

Celery's prefork pool runs polls in child processes, so metrics use prometheus_client's
multiprocess mode: :func:`start_server` (called once in the worker's main process, before the
pool forks) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory and serves the sum of all
children's files. Without a port every function here is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("popvault.workers.metrics")

POLL_SECONDS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_metrics: dict[str, Any] | None = None


def enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def start_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` for this worker and all its pool processes (main process only)."""
    directory = Path(tempfile.gettempdir()) / f"popvault-metrics-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


def _get() -> dict[str, Any] | None:
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        from prometheus_client import Counter, Histogram

        _metrics = {
            "archived": Counter("popvault_messages_archived_total",
                                "Messages archived (new documents and joined copies)."),
            "bytes": Counter("popvault_bytes_fetched_total", "Raw bytes downloaded."),
            "duration": Histogram("popvault_poll_duration_seconds", "Duration of one poll.",
                                  buckets=POLL_SECONDS_BUCKETS),
            "polls": Counter("popvault_polls_total", "Polls by outcome.", ["outcome"]),
            "errors": Counter("popvault_poll_errors_total", "Failed polls by stage.",
                              ["stage"]),
            "skipped": Counter("popvault_poll_skipped_total", "Tasks that did not poll.",
                               ["reason"]),
            "claimed": Counter("popvault_sweep_claimed_total",
                               "Accounts claimed and enqueued by sweeps."),
        }
    return _metrics


def observe_poll(report: dict[str, Any], outcome: str) -> None:
    m = _get()
    if m is None:
        return
    # No per-account labels: thousands of accounts would mean thousands of series; per-account
    # figures are in the health records (``popvault status``).
    m["archived"].inc(int(report.get("new", 0)) + int(report.get("joined", 0)))
    m["bytes"].inc(int(report.get("bytes_fetched", 0)))
    m["duration"].observe(float(report.get("duration_s", 0.0)))
    m["polls"].labels(outcome).inc()
    error = report.get("error")
    if error:
        m["errors"].labels(str(error.get("stage", "unknown"))).inc()


def count_skip(reason: str) -> None:
    m = _get()
    if m is not None:
        m["skipped"].labels(reason).inc()


def count_claimed(n: int) -> None:
    m = _get()
    if m is not None and n:
        m["claimed"].inc(n)


def process_exit(pid: int) -> None:
    """Drop a finished pool process's live gauges (none yet; counters are kept)."""
    if not enabled():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
