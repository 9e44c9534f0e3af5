"""The Celery app, built from the TOML configuration (``$POPVAULT_CONFIG``, else the defaults
of :func:`ingest.config.load_config`), and each worker process's runtime.

Settings that make redelivery safe (see the issue): JSON only; tasks acknowledged after they
run (``task_acks_late``) and requeued if their process dies (``task_reject_on_worker_lost``);
one task prefetched per process; soft < hard time limit < the Redis transport's visibility
timeout, so a running poll's task is never handed to a second worker (and if it were, the
account lock would turn it away). Results are ignored: the health records are the results.

Each pool process opens its sink, raw store and a one-child parser pool lazily on its first
poll and closes them when it exits; a process forked from a parent that had them opens its own.
"""

from __future__ import annotations

import logging
import multiprocessing.process as mp_process
import os
import signal
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab
from kombu import Queue

from ingest.archive import FilesystemStore, open_store
from ingest.config import Config, load_config
from ingest.errors import ConfigError
from ingest.events import parse_events_config
from workers import embedded_redis, metrics
from workers.events import DISPATCH_TASK, EVENTS_QUEUE
from workers.schedule import (
    POLL_QUEUE,
    SWEEP_QUEUE,
    WorkerSettings,
    parse_worker_settings,
)

log = logging.getLogger("popvault.workers")

SWEEP_TASK = "popvault.sweep"
POLL_TASK = "popvault.poll_account"
POLL_BATCH_TASK = "popvault.poll_accounts"
RETENTION_TASK = "popvault.retention"
RETENTION_HOUR_UTC = 3
"""Daily retention runs at 03:30 UTC, on the sweep queue (maintenance, not polling)."""
SWEEP_TIME_LIMIT_S = 120
"""A sweep over many thousands of accounts takes well under a second; this only catches hangs."""
REDIS_SOCKET_TIMEOUT_S = 10.0


def create_app(config: Config, settings: WorkerSettings | None = None) -> Celery:
    """A Celery app for ``config``; tasks come from :mod:`workers.tasks`."""
    settings = settings or parse_worker_settings(config)
    s = settings.schedule
    # Without [broker]: the embedded Redis of the archive (started by `popvault run`).
    url = embedded_redis.celery_broker_url(config)
    app = Celery("popvault", broker=url, include=["workers.tasks", "workers.events"])
    beat_file = (s.beat_schedule_file or embedded_redis.beat_schedule_file(config)
                 or str(Path(tempfile.gettempdir()) / "popvault-beat"))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=s.task_soft_time_limit_s,
        task_time_limit=s.task_time_limit_s,
        broker_transport_options={"visibility_timeout": s.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(POLL_QUEUE), Queue(SWEEP_QUEUE)),
        task_default_queue=POLL_QUEUE,
        task_routes={SWEEP_TASK: {"queue": SWEEP_QUEUE}, POLL_TASK: {"queue": POLL_QUEUE},
                     POLL_BATCH_TASK: {"queue": POLL_QUEUE},
                     RETENTION_TASK: {"queue": SWEEP_QUEUE}},
        beat_schedule={
            "popvault-retention": {
                "task": RETENTION_TASK,
                "schedule": crontab(hour=RETENTION_HOUR_UTC, minute=30),
                "options": {"queue": SWEEP_QUEUE, "expires": 6 * 3600},
            },
            "popvault-sweep": {
                "task": SWEEP_TASK,
                "schedule": s.sweep_interval_s,
                # A sweep nobody ran in time is worthless: the next one re-derives everything.
                "options": {"expires": max(1.0, s.sweep_interval_s)},
            },
        },
        beat_schedule_filename=beat_file,
        timezone="UTC",
        enable_utc=True,
        # Task events cost a Redis publish per task state; Flower switches them on itself
        # (its --enable_events, on by default) while it watches, like `celery events` does.
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    events = parse_events_config(config)
    if events is not None:  # ticket events: a dispatcher run every few seconds, own queue
        app.conf.task_queues = (*app.conf.task_queues, Queue(EVENTS_QUEUE))
        app.conf.task_routes = {**app.conf.task_routes, DISPATCH_TASK: {"queue": EVENTS_QUEUE}}
        app.conf.beat_schedule = {**app.conf.beat_schedule, "popvault-events-dispatch": {
            "task": DISPATCH_TASK, "schedule": events.dispatch_interval_s,
            "options": {"queue": EVENTS_QUEUE, "expires": max(1.0, events.dispatch_interval_s)},
        }}
    return app


class Runtime:
    """What one worker process needs: configuration, Redis, sink, store, parser pool."""

    def __init__(self, config: Config, settings: WorkerSettings) -> None:
        self._config = config
        self.settings = settings
        self._mtime = _mtime(config.path)
        self._redis: Any = None
        self._resources: tuple[Any, FilesystemStore, Any] | None = None
        self._stack = ExitStack()
        self._lock = threading.Lock()

    def config(self) -> Config:
        """The configuration, re-read when its file changed (accounts added, settings fixed).

        Broker and schedule settings need a restart; a file that no longer loads keeps the
        previous configuration (and is logged).
        """
        path = self._config.path
        mtime = _mtime(path)
        if path is not None and mtime != self._mtime:
            try:
                fresh = load_config(path)
                parse_worker_settings(fresh)
            except ConfigError as exc:
                log.error("configuration changed but does not load; keeping the old one: %s",
                          exc)
            else:
                self._config = fresh
                log.info("configuration reloaded from %s", path)
            self._mtime = mtime
        return self._config

    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                embedded_redis.redis_url(self._config), socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S, health_check_interval=30)
        return self._redis

    def resources(self) -> tuple[Any, FilesystemStore, Any]:
        """``(sink, store, parser)``, opened on first use; raises PopvaultError if they can't be."""
        with self._lock:
            if self._resources is None:
                from ingest.parse import ParserPool
                from ingest.sinks.factory import open_sink

                config = self._config
                stack = ExitStack()
                try:
                    sink = open_sink(config)
                    stack.callback(sink.close)
                    sink.ensure_schema()
                    store = open_store(config)
                    parser = stack.enter_context(ParserPool(  # started by the first new mail
                        workers=1, timeout_s=config.parse.timeout_s,
                        memory_mb=config.parse.memory_mb, lazy=True))
                except BaseException:
                    stack.close()
                    raise
                self._stack = stack
                self._resources = (sink, store, parser)
            return self._resources

    def close(self) -> None:
        with self._lock:
            self._resources = None
            try:
                self._stack.close()
            except Exception as exc:
                log.warning("closing worker resources failed: %s", type(exc).__name__)
            if self._redis is not None:
                self._redis.close()
                self._redis = None


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


_config = load_config()
_settings = parse_worker_settings(_config)
app = create_app(_config, _settings)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's :class:`Runtime` (created on first use)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(_config, _settings)
    return _runtime


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    if os.environ.get(embedded_redis.SUPERVISED_ENV):
        # Started by `popvault run`, whose death (even by SIGKILL) the kernel reports with
        # this signal: take the whole process group down (beat, pool processes, their parser
        # children), not only this process, so no unsupervised part of the tree lives on.
        signal.signal(embedded_redis.SUPERVISOR_GONE_SIGNAL,
                      lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    if _config.broker is None and not embedded_redis.EmbeddedRedis(_config.archive_path).ping():
        # Kombu would only retry in silence: say who starts the embedded server.
        log.error("no [broker] and no embedded Redis answers under %s: start workers with "
                  "`popvault run` (it starts one), or configure [broker] url",
                  embedded_redis.broker_dir(_config.archive_path))
    if _settings.metrics_port:
        metrics.start_server(_settings.metrics_port, _settings.metrics_addr)
    # Import what a poll needs once, here, before the pool forks: each pool process would
    # otherwise import it on its first task (about 0.3 s each, all at once on a fresh start).
    import elasticsearch  # noqa: F401

    import ingest.poll
    import ingest.sinks.factory  # noqa: F401


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # Whatever the parent opened (sockets, threads) is not ours to use or close after fork.
    global _runtime
    _runtime = None
    # billiard installs its own process object as the stdlib's current process. The parser
    # pool (stdlib multiprocessing, forkserver) then fails twice: a daemonic process may not
    # have children, and billiard's authkey type refuses to be pickled for the forkserver.
    # This pool process stops its parser children itself (worker_process_shutdown), so it
    # drops the daemon flag and takes a stdlib authkey.
    current = mp_process.current_process()
    current._config.pop("daemon", None)  # type: ignore[attr-defined]
    current._config["authkey"] = mp_process.AuthenticationString(  # type: ignore[attr-defined]
        os.urandom(32))


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    if _runtime is not None:
        _runtime.close()
    if pid:
        metrics.process_exit(pid)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _runtime is not None:  # solo/threads pools poll in the main process
        _runtime.close()
