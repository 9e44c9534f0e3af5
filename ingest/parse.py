"""Bytes to document in a bounded child process, so one hostile message cannot stall a worker.

A message is parsed in a child process with an address-space limit (``RLIMIT_AS``) and a
wall-clock deadline. A message that overruns its deadline has its child killed; a message
whose child dies (memory limit, segfault) is blamed exactly. Either way the caller gets a
headers-only document flagged ``parse_status = "timeout"`` or ``"failed"``, built in this
process, and the child is replaced. :meth:`ParserPool.submit` never yields an exception.

Why one single-worker ``ProcessPoolExecutor`` per slot rather than one executor with N
workers: the pool dispatches a message only to an idle slot, so it knows which message runs
in which process and since when. That makes the deadline measure parse time, not queue time,
and lets a kill hit only the culprit. With a shared executor, killing one child breaks the
executor and fails every other in-flight message with it.

IPC stays cheap: the raw bytes go down pickled once, the document dict comes back.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ingest.dedup import message_key as compute_message_key
from ingest.dedup import raw_sha256 as compute_raw_sha256
from ingest.document import (
    PARSE_FAILED,
    PARSE_TIMEOUT,
    build_document,
    error_text,
    fallback_document,
    now_iso,
)
from ingest.heap import release_free_memory

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MEMORY_MB = 1024
MAX_TASKS_PER_CHILD = 500
"""Replace a child after this many messages, so heap fragmentation never meets the limit."""
MAX_START_FAILURES = 3
"""Consecutive child start failures before the pool gives up and flags messages as failed."""
START_TIMEOUT_S = 60.0
"""How long a new child may take to start (imports included) before it counts as failed."""

Document = dict[str, Any]
Target = Callable[..., Document]


def parse_in_process(raw: bytes, **build_kwargs: Any) -> Document:
    """Build the document here, without a child (tests, tools, ``--no-isolation``)."""
    return build_document(raw, **_complete_kwargs(raw, build_kwargs))


def _complete_kwargs(raw: bytes, kwargs: dict[str, Any], *,
                     with_key: bool = True) -> dict[str, Any]:
    """Fill in the identity fields a caller may leave out (computed the one standard way).

    ``with_key=False`` leaves the message key to the child (:func:`_build_in_child`): it is
    a pass over the whole message, better spent off the fetching process.
    """
    done = dict(kwargs)
    if "raw_sha256" not in done:
        done["raw_sha256"] = compute_raw_sha256(raw)
    if with_key and "message_key" not in done:
        done["message_key"] = compute_message_key(raw)
    if "first_archived" not in done:
        done["first_archived"] = now_iso()
    return done


LARGE_PARSE_BYTES = 3 * 1024 * 1024
"""Messages at least this large are parsed one at a time (a parse needs about five times the
message in memory)."""
TRIM_AFTER_BYTES = 1024 * 1024
"""After parsing a message this large, the child hands its freed heap back to the system."""


def _build_in_child(target: Target, raw: bytes, kwargs: dict[str, Any]) -> Document:
    """Runs in the child: compute what the parent left out, then build the document."""
    if "message_key" not in kwargs:
        kwargs = {**kwargs, "message_key": compute_message_key(raw)}
    try:
        return target(raw, **kwargs)
    finally:
        if len(raw) >= TRIM_AFTER_BYTES:
            release_free_memory()


def _child_init(memory_mb: int) -> None:
    """Runs once in each child: cap its address space, quiet noisy loggers, warm imports."""
    import resource

    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    import html2text  # noqa: F401  (imported now so the first message does not pay for it)
    import mailparser  # noqa: F401


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (no inherited threads or sockets), spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


@dataclass
class _Task:
    raw: bytes
    kwargs: dict[str, Any]
    future: Future[Document]


@dataclass
class _Slot:
    """One child process and what it is doing."""

    executor: ProcessPoolExecutor
    pid: Future[int]
    started_at: float
    task: _Task | None = None
    running: Future[Document] | None = None
    deadline: float = 0.0
    tasks_run: int = 0

    def ready(self) -> bool:
        return self.pid.done() and self.pid.exception() is None


@dataclass
class PoolStats:
    """Counters for logs and metrics."""

    parsed: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    children_started: int = 0


class ParserPool:
    """Parse messages in bounded child processes; ``submit`` returns a future of a document.

    Args:
        workers: child processes; ``None`` or 0 means one per CPU.
        timeout_s: wall-clock limit per message, counted from when its child starts on it.
        memory_mb: ``RLIMIT_AS`` of each child, in MiB (0 = no limit).
        max_tasks_per_child: messages a child parses before it is replaced.
        target: the module-level function run in the child (tests swap in a slow one).
        lazy: start the children on the first ``submit``, not on entering (a worker whose
            polls mostly find nothing new never pays for them).

    Use as a context manager; leaving it waits for submitted messages, then stops children.
    Futures are completed from the pool's supervisor thread: keep done-callbacks short.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = DEFAULT_MEMORY_MB,
        max_tasks_per_child: int = MAX_TASKS_PER_CHILD,
        target: Target = build_document,
        lazy: bool = False,
    ) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.lazy = lazy
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_tasks_per_child = max_tasks_per_child
        self.target = target
        self.stats = PoolStats()
        self._context = _mp_context()
        self._cond = threading.Condition()
        self._pending: deque[_Task] = deque()
        self._slots: list[_Slot] = []
        self._start_failures = 0
        self._closing = False
        self._woken = False
        self._opened = False
        self._starting = threading.Lock()
        self._supervisor: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Any) -> ParserPool:
        """Build from :class:`ingest.config.ParseConfig`."""
        return cls(workers=config.workers, timeout_s=config.timeout_s, memory_mb=config.memory_mb)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ParserPool:
        """Start the children; messages are handed to each once its imports are done (the
        supervisor watches them start), so the caller connects meanwhile."""
        with self._starting:
            self._opened = True
            with self._cond:
                if self._supervisor is not None:
                    return self
                self._slots = [self._new_slot() for _ in range(self.workers)]
            supervisor = threading.Thread(
                target=self._supervise, name="popvault-parser-pool", daemon=True
            )
            supervisor.start()
            with self._cond:
                self._supervisor = supervisor
        return self

    def close(self) -> None:
        """Finish every submitted message, then stop the children."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        for slot in self._slots:
            slot.executor.shutdown(wait=True, cancel_futures=True)
        self._slots = []

    def __enter__(self) -> ParserPool:
        if self.lazy:
            self._opened = True
            return self
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- use ---------------------------------------------------------------------------------

    def submit(self, raw: bytes, **build_kwargs: Any) -> Future[Document]:
        """Queue one message; the future always resolves to a document, never an exception."""
        future: Future[Document] = Future()
        task = _Task(raw, _complete_kwargs(raw, build_kwargs, with_key=False), future)
        if self.lazy and self._opened and self._supervisor is None and not self._closing:
            self.start()
        with self._cond:
            if self._closing or self._supervisor is None:
                raise RuntimeError("ParserPool is not running (use it as a context manager)")
            self._pending.append(task)
            self._cond.notify_all()
        return future

    def parse(self, raw: bytes, **build_kwargs: Any) -> Document:
        """Submit and wait: the document for one message."""
        return self.submit(raw, **build_kwargs).result()

    @property
    def in_flight(self) -> int:
        """Messages submitted and not yet done; a fetch loop uses it for backpressure."""
        with self._cond:
            return len(self._pending) + sum(1 for s in self._slots if s.task is not None)

    # -- supervisor --------------------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=_child_init,
            initargs=(self.memory_mb,),
        )
        pid = executor.submit(os.getpid)
        pid.add_done_callback(self._wake)
        self.stats.children_started += 1
        return _Slot(executor=executor, pid=pid, started_at=time.monotonic())

    def _wake(self, _future: Future[Any]) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _supervise(self) -> None:
        with self._cond:
            while True:
                self._woken = False
                now = time.monotonic()
                for index, slot in enumerate(self._slots):
                    self._slots[index] = self._check_slot(slot, now)
                self._dispatch(now)
                busy = any(slot.task is not None for slot in self._slots)
                if self._closing and not busy and not self._pending:
                    return
                if self._woken:
                    # A future finished while this thread held the lock: add_done_callback
                    # ran _wake right here, and its notify reached nobody. Look again now
                    # instead of sleeping until the next deadline (a parse timeout away).
                    continue
                self._cond.wait(self._next_wakeup(now))

    def _check_slot(self, slot: _Slot, now: float) -> _Slot:
        """Collect a finished result, enforce the deadline, replace dead or worn-out children."""
        if slot.running is not None and slot.task is not None:
            if slot.running.done():
                return self._finish(slot)
            if now >= slot.deadline:
                return self._expire(slot)
            return slot
        failure = slot.pid.exception() if slot.pid.done() else None
        if failure is not None:
            self._start_failures += 1
            log.warning("parser child failed to start: %s", error_text(failure))
            return self._replace(slot)
        if not slot.pid.done() and now - slot.started_at > START_TIMEOUT_S:
            self._start_failures += 1
            self._kill(slot)
            return self._replace(slot)
        return slot

    def _dispatch(self, now: float) -> None:
        if self._start_failures >= MAX_START_FAILURES:
            while self._pending:  # no child can run: flag rather than hang the caller
                task = self._pending.popleft()
                self._resolve_fallback(task, PARSE_FAILED, "parser process could not start")
            if any(slot.ready() for slot in self._slots):
                self._start_failures = 0
            return
        for slot in self._slots:
            if not self._pending:
                return
            if slot.task is None and slot.ready():
                startable = self._next_task()
                if startable is None:
                    return
                slot.task = startable
                slot.deadline = now + self.timeout_s
                slot.running = slot.executor.submit(_build_in_child, self.target,
                                                    startable.raw, startable.kwargs)
                slot.running.add_done_callback(self._wake)

    def _next_task(self) -> _Task | None:
        """The oldest pending message that may start now: a large one waits while another
        large one is being parsed (their parses set the pool's peak memory), small ones
        overtake it meanwhile."""
        large_running = any(s.task is not None and len(s.task.raw) >= LARGE_PARSE_BYTES
                            for s in self._slots)
        for index, task in enumerate(self._pending):
            if not (large_running and len(task.raw) >= LARGE_PARSE_BYTES):
                del self._pending[index]
                return task
        return None

    def _next_wakeup(self, now: float) -> float | None:
        deadlines = [slot.deadline for slot in self._slots if slot.task is not None]
        starting = [slot.started_at + START_TIMEOUT_S for slot in self._slots if not slot.ready()]
        soonest = min(deadlines + starting, default=None)
        return None if soonest is None else max(0.0, soonest - now) + 0.01

    def _finish(self, slot: _Slot) -> _Slot:
        task, running = slot.task, slot.running
        assert task is not None and running is not None
        slot.task, slot.running = None, None
        slot.tasks_run += 1
        error = running.exception()
        if error is None:
            self.stats.parsed += 1
            self._start_failures = 0
            _resolve(task.future, running.result())
            if slot.tasks_run >= self.max_tasks_per_child:
                return self._replace(slot)
            return slot
        if isinstance(error, BrokenProcessPool):
            self.stats.crashes += 1
            reason = "parser process died (memory limit or crash)"
        else:
            self.stats.errors += 1
            reason = "parser process raised " + error_text(error)
        log.warning("message %s: %s", task.kwargs.get("message_key"), reason)
        self._resolve_fallback(task, PARSE_FAILED, reason)
        return self._replace(slot)  # a child that raised past build_document is suspect

    def _expire(self, slot: _Slot) -> _Slot:
        task = slot.task
        assert task is not None
        self.stats.timeouts += 1
        log.warning(
            "message %s: parse exceeded %.1f s; child killed",
            task.kwargs.get("message_key"),
            self.timeout_s,
        )
        self._kill(slot)
        slot.task, slot.running = None, None
        self._resolve_fallback(task, PARSE_TIMEOUT, f"parse exceeded {self.timeout_s:g} s")
        return self._replace(slot)

    def _kill(self, slot: _Slot) -> None:
        if slot.pid.done() and slot.pid.exception() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(slot.pid.result(), signal.SIGKILL)

    def _replace(self, slot: _Slot) -> _Slot:
        slot.executor.shutdown(wait=False, cancel_futures=True)
        return self._new_slot()

    def _resolve_fallback(self, task: _Task, status: str, reason: str) -> None:
        kwargs = task.kwargs
        try:
            document = fallback_document(
                task.raw,
                raw_sha256=kwargs["raw_sha256"],
                message_key=kwargs.get("message_key") or compute_message_key(task.raw),
                first_archived=kwargs["first_archived"],
                parse_status=status,
                parse_error=reason,
            )
        except Exception as exc:  # fallback_document does not raise; belt and braces
            task.future.set_exception(exc)
            return
        _resolve(task.future, document)


def _resolve(future: Future[Document], document: Document) -> None:
    if not future.done():
        future.set_result(document)
