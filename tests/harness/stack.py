"""Bring the whole test stack up/down; ``up`` is idempotent and safe to call concurrently."""

from __future__ import annotations

import fcntl
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.harness import dovecot, elastic, redisd
from tests.harness.settings import Settings, load
from tests.harness.tls import ensure_tls


@dataclass(frozen=True)
class Stack:
    """What tests need to reach the running services."""

    host: str
    pop3_port: int
    pop3s_port: int
    redis_url: str
    es_url: str
    ca_file: Path
    other_ca_file: Path
    dir: Path
    dovecot_log: Path
    settings: Settings


def describe(s: Settings) -> Stack:
    return Stack(host=s.host, pop3_port=s.pop3_port, pop3s_port=s.pop3s_port,
                 redis_url=s.redis_url, es_url=s.es_url, ca_file=s.ca_file,
                 other_ca_file=s.other_ca_file, dir=s.dir, dovecot_log=s.dovecot_log,
                 settings=s)


@contextmanager
def _locked(s: Settings) -> Iterator[None]:
    """Two pytest runs (or `up` + pytest) must not race to start the same services."""
    s.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(s.dir, 0o755)  # mail/ES users must traverse it
    with open(s.dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(s: Settings | None = None, log: Callable[[str], None] | None = None) -> Stack:
    s = s or load()
    say = log or (lambda _m: None)
    with _locked(s):
        t0 = time.monotonic()
        ensure_tls(s)
        for name, mod in (("redis", redisd), ("dovecot", dovecot), ("elasticsearch", elastic)):
            t = time.monotonic()
            how = mod.start(s)
            say(f"{name}: {how} ({time.monotonic() - t:.1f}s)")
        say(f"stack up in {time.monotonic() - t0:.1f}s (state in {s.dir})")
    return describe(s)


def down(s: Settings | None = None, log: Callable[[str], None] | None = None) -> None:
    s = s or load()
    say = log or (lambda _m: None)
    with _locked(s):
        for name, mod in (("elasticsearch", elastic), ("dovecot", dovecot), ("redis", redisd)):
            say(f"{name}: {'stopped' if mod.stop(s) else 'was not running (no live pid file)'}")


def status(s: Settings | None = None) -> list[str]:
    s = s or load()
    return [redisd.status(s), dovecot.status(s), elastic.status(s)]


def env_lines(s: Settings | None = None) -> list[str]:
    s = s or load()
    values = {
        "POPVAULT_STACK_DIR": str(s.dir),
        "POPVAULT_TEST_HOST": s.host,
        "POPVAULT_TEST_POP3_PORT": str(s.pop3_port),
        "POPVAULT_TEST_POP3S_PORT": str(s.pop3s_port),
        "POPVAULT_TEST_REDIS_PORT": str(s.redis_port),
        "POPVAULT_TEST_REDIS_URL": s.redis_url,
        "POPVAULT_TEST_ES_PORT": str(s.es_port),
        "POPVAULT_TEST_ES_TRANSPORT_PORT": str(s.es_transport_port),
        "POPVAULT_TEST_ES_URL": s.es_url,
        "POPVAULT_TEST_CA_FILE": str(s.ca_file),
        "POPVAULT_TEST_OTHER_CA_FILE": str(s.other_ca_file),
        "POPVAULT_TEST_DOVECOT_LOG": str(s.dovecot_log),
    }
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
