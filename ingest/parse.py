"""Bytes to document in a bounded child process, so one hostile message cannot stall a worker.

A message is parsed in a child process with an address-space limit (``RLIMIT_AS``) and a
wall-clock deadline. A message that overruns its deadline has its child killed; a message
whose child dies (memory limit, segfault) is blamed exactly. Either way the caller gets a
headers-only document flagged ``parse_status = "timeout"`` or ``"failed"``, built in this
process, and the child is replaced. :meth:`ParserPool.submit` never yields an exception.

Why each child is a plain process with its own pipes rather than a ``ProcessPoolExecutor``:
the pool dispatches a message only to an idle child, so it knows which message runs in which
process and since when. That makes the deadline measure parse time, not queue time, and lets
a kill hit only the culprit (killing one child of a shared executor breaks the executor and
fails every other in-flight message with it). One supervisor thread waits on every child's
pipe at once; an executor per child would add a feeder and a manager thread each, and their
hand-offs cost the fetching process as much CPU as the fetch itself.

IPC stays cheap: the raw bytes go down the pipe as they are (no pickling), in pipes enlarged
to 1 MiB so a 5 MB message is a few writes, not eighty; the document dict comes back pickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
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
PIPE_BYTES = 1024 * 1024
"""Requested pipe capacity (Linux ``F_SETPIPE_SZ``; the default is 64 KiB)."""
STOP_TIMEOUT_S = 5.0
"""How long a child asked to stop may take before it is killed."""

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


def _child_main(requests: Connection, results: Connection, memory_mb: int,
                target: Target) -> None:
    """The child's loop: say ready, then parse one message per request until told to stop.

    A request is the pickled keyword arguments, then the raw bytes as they are; ``None``
    stops the child. The reply is ``("ok", document)`` or ``("error", reason)``.
    """
    _child_init(memory_mb)
    results.send(("ready", os.getpid()))
    while True:
        try:
            kwargs = requests.recv()
            if kwargs is None:
                return
            raw = requests.recv_bytes()
        except EOFError:  # the parent is gone
            return
        try:
            reply: tuple[str, Any] = ("ok", _build_in_child(target, raw, kwargs))
        except Exception as exc:  # MemoryError under the limit, or a target's own bug
            reply = ("error", error_text(exc))
        del raw
        results.send(reply)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (no inherited threads or sockets), spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The fork server imports the parsing code once; every child (also each replacement
    # after MAX_TASKS_PER_CHILD) forks from it with the imports done, instead of paying
    # about 0.2 CPU-seconds for them. Only effective before the fork server first starts.
    context.set_forkserver_preload([__name__, "html2text", "mailparser"])
    return context


def _enlarge_pipe(conn: Connection) -> None:
    """Ask for a 1 MiB pipe; where that is refused (other systems, a lower limit) keep it."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(conn.fileno(), set_size, PIPE_BYTES)


@dataclass
class _Task:
    raw: bytes
    kwargs: dict[str, Any]
    future: Future[Document]


@dataclass
class _Child:
    """One child process, its two pipes, and what it is doing."""

    process: BaseProcess
    requests: Connection
    results: Connection
    started_at: float
    ready: bool = False
    task: _Task | None = None
    deadline: float = 0.0
    tasks_run: int = 0
    retired: bool = False


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
        self._context: Any = _mp_context()
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._running = 0
        self._signalled = False  # a wake-up byte was sent since the supervisor last looked
        self._children: list[_Child] = []
        self._start_failures = 0
        self._closing = False
        self._opened = False
        self._starting = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

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
            if self._supervisor is not None:
                return self
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._children = [self._new_child() for _ in range(self.workers)]
            supervisor = threading.Thread(
                target=self._supervise, name="popvault-parser-pool", daemon=True
            )
            supervisor.start()
            self._supervisor = supervisor
        return self

    def close(self) -> None:
        """Finish every submitted message, then stop the children."""
        with self._lock:
            self._closing = True
        self._wake()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        for child in self._children:
            self._stop(child)
        self._children = []
        for fd in (self._wake_r, self._wake_w):
            if fd != -1:
                os.close(fd)
        self._wake_r = self._wake_w = -1

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
        with self._lock:
            if self._closing or self._supervisor is None:
                raise RuntimeError("ParserPool is not running (use it as a context manager)")
            self._pending.append(task)
            signal_now, self._signalled = not self._signalled, True
        if signal_now:  # else a wake-up is pending and the supervisor will see this task
            self._wake()
        return future

    def parse(self, raw: bytes, **build_kwargs: Any) -> Document:
        """Submit and wait: the document for one message."""
        return self.submit(raw, **build_kwargs).result()

    @property
    def in_flight(self) -> int:
        """Messages submitted and not yet done; a fetch loop uses it for backpressure."""
        with self._lock:
            return len(self._pending) + self._running

    # -- supervisor --------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
            os.write(self._wake_w, b"\0")

    def _new_child(self) -> _Child:
        requests_r, requests_w = self._context.Pipe(duplex=False)
        results_r, results_w = self._context.Pipe(duplex=False)
        _enlarge_pipe(requests_w)
        _enlarge_pipe(results_w)
        process = self._context.Process(
            target=_child_main, args=(requests_r, results_w, self.memory_mb, self.target),
            name="popvault-parser", daemon=True,
        )
        self.stats.children_started += 1
        try:
            process.start()
        finally:
            requests_r.close()
            results_w.close()
        return _Child(process, requests_w, results_r, started_at=time.monotonic())

    def _supervise(self) -> None:
        while True:
            with self._lock:  # from here on, every new submit sends a wake-up of its own
                self._signalled = False
            now = time.monotonic()
            for index, child in enumerate(self._children):
                self._children[index] = self._check_child(child, now)
            self._dispatch(now)
            with self._lock:
                if self._closing and not self._running and not self._pending:
                    return
            by_conn = {child.results: child for child in self._children if not child.retired}
            ready = wait([*by_conn, self._wake_r], self._next_wakeup(now))
            for item in ready:
                if item == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif isinstance(item, Connection):
                    self._receive(by_conn[item])

    def _receive(self, child: _Child) -> None:
        """Read one reply from a child: its ready signal or a result; EOF means it died."""
        try:
            kind, value = child.results.recv()
        except (EOFError, OSError):
            if child.task is not None:
                self.stats.crashes += 1
                self._fail(child, "parser process died (memory limit or crash)")
            elif not child.ready:
                self._start_failures += 1
                log.warning("parser child exited while starting")
            self._retire(child)
            return
        if kind == "ready":
            child.ready = True
            return
        task = child.task
        if task is None:  # a reply nobody asked for: the child is confused, replace it
            self._retire(child)
            return
        if kind != "ok":
            self.stats.errors += 1
            self._fail(child, "parser process raised " + str(value))
            self._retire(child)  # a child that raised past build_document is suspect
            return
        child.task = None
        child.tasks_run += 1
        with self._lock:
            self._running -= 1
        self.stats.parsed += 1
        self._start_failures = 0
        _resolve(task.future, value)
        if child.tasks_run >= self.max_tasks_per_child:
            self._retire(child)

    def _check_child(self, child: _Child, now: float) -> _Child:
        """Enforce the deadline; replace dead, stuck-starting or worn-out children."""
        if child.task is not None and now >= child.deadline:
            self.stats.timeouts += 1
            task = child.task
            log.warning("message %s: parse exceeded %.1f s; child killed",
                        task.kwargs.get("message_key"), self.timeout_s)
            self._fail(child, f"parse exceeded {self.timeout_s:g} s", PARSE_TIMEOUT)
            self._retire(child)
        elif not child.ready and now - child.started_at > START_TIMEOUT_S:
            self._start_failures += 1
            log.warning("parser child did not start within %.0f s", START_TIMEOUT_S)
            self._retire(child)
        return self._new_child() if child.retired else child

    def _fail(self, child: _Child, reason: str, status: str = PARSE_FAILED) -> None:
        task, child.task = child.task, None
        if task is None:
            return
        with self._lock:
            self._running -= 1
        if status == PARSE_FAILED:
            log.warning("message %s: %s", task.kwargs.get("message_key"), reason)
        self._resolve_fallback(task, status, reason)

    def _retire(self, child: _Child) -> None:
        """Kill the child and close its pipes; the next check replaces it."""
        if child.retired:
            return
        child.retired = True
        with contextlib.suppress(OSError, ValueError):
            child.process.kill()
        with contextlib.suppress(OSError, ValueError):
            child.process.join(STOP_TIMEOUT_S)
        child.requests.close()
        child.results.close()
        with contextlib.suppress(ValueError):
            child.process.close()

    def _stop(self, child: _Child) -> None:
        """Ask an idle child to finish; kill it if it does not."""
        if child.retired:
            return
        with contextlib.suppress(OSError, ValueError):
            child.requests.send(None)
            child.process.join(STOP_TIMEOUT_S)
        self._retire(child)

    def _dispatch(self, now: float) -> None:
        if self._start_failures >= MAX_START_FAILURES:
            with self._lock:
                failed, self._pending = list(self._pending), deque()
            for task in failed:  # no child can run: flag rather than hang the caller
                self._resolve_fallback(task, PARSE_FAILED, "parser process could not start")
            if any(child.ready for child in self._children):
                self._start_failures = 0
            return
        for child in self._children:
            if child.task is not None or not child.ready or child.retired:
                continue
            with self._lock:
                startable = self._next_task()
                if startable is None:
                    return
                self._running += 1
            child.task = startable
            child.deadline = now + self.timeout_s
            try:
                child.requests.send(startable.kwargs)
                child.requests.send_bytes(startable.raw)
            except (OSError, ValueError):  # it died idle: its EOF or the next check replaces it
                self.stats.crashes += 1
                self._fail(child, "parser process died (memory limit or crash)")
                self._retire(child)

    def _next_task(self) -> _Task | None:
        """The oldest pending message that may start now: a large one waits while another
        large one is being parsed (their parses set the pool's peak memory), small ones
        overtake it meanwhile. Called with the lock held."""
        large_running = any(c.task is not None and len(c.task.raw) >= LARGE_PARSE_BYTES
                            for c in self._children)
        for index, task in enumerate(self._pending):
            if not (large_running and len(task.raw) >= LARGE_PARSE_BYTES):
                del self._pending[index]
                return task
        return None

    def _next_wakeup(self, now: float) -> float | None:
        deadlines = [child.deadline for child in self._children if child.task is not None]
        starting = [child.started_at + START_TIMEOUT_S
                    for child in self._children if not child.ready]
        soonest = min(deadlines + starting, default=None)
        return None if soonest is None else max(0.0, soonest - now) + 0.01

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
