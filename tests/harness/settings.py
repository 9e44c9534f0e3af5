"""Where the test stack lives and which loopback ports it uses (all overridable by env)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tests.harness.proc import HarnessError

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # loopback only, always
ES_VERSION = "9.2.0"  # 9.2.1+ integ-test zips are not on Maven Central


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise HarnessError(f"{name}={raw!r} is not a TCP port")
    return int(raw)


@dataclass(frozen=True)
class Settings:
    dir: Path
    cache_dir: Path
    pop3_port: int
    pop3s_port: int
    redis_port: int
    es_port: int
    es_transport_port: int
    host: str = HOST

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def other_ca_file(self) -> Path:
        return self.tls_dir / "other-ca.pem"

    @property
    def dovecot_dir(self) -> Path:
        return self.dir / "dovecot"

    @property
    def dovecot_log(self) -> Path:
        return self.dovecot_dir / "dovecot.log"

    @property
    def users_dir(self) -> Path:
        """One passwd-file per user (``users/<name>``), see dovecot.py for why."""
        return self.dovecot_dir / "users"

    @property
    def mail_dir(self) -> Path:
        return self.dir / "mail"

    @property
    def redis_dir(self) -> Path:
        return self.dir / "redis"

    @property
    def es_dir(self) -> Path:
        return self.dir / "es"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def es_url(self) -> str:
        return f"http://{self.host}:{self.es_port}"


def load() -> Settings:
    stack = Path(os.environ.get("POPVAULT_STACK_DIR") or REPO_ROOT / ".stack").resolve()
    cache = Path(os.environ.get("POPVAULT_CACHE") or Path.home() / ".cache" / "popvault")
    return Settings(
        dir=stack,
        cache_dir=cache.resolve(),
        pop3_port=_port("POPVAULT_TEST_POP3_PORT", 17110),
        pop3s_port=_port("POPVAULT_TEST_POP3S_PORT", 17995),
        redis_port=_port("POPVAULT_TEST_REDIS_PORT", 16379),
        es_port=_port("POPVAULT_TEST_ES_PORT", 19200),
        es_transport_port=_port("POPVAULT_TEST_ES_TRANSPORT_PORT", 19300),
    )


def java_major(java_home: Path) -> int:
    """Major version from a JDK's ``release`` file (no JVM start needed)."""
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return 0
    m = re.search(r'^JAVA_VERSION="(\d+)', text, re.M)
    return int(m.group(1)) if m else 0


def find_java_home(minimum: int = 21) -> Path:
    """ES 9 needs Java 21+; the distro default may be 17, so look explicitly."""
    override = os.environ.get("POPVAULT_ES_JAVA_HOME")
    if override:
        if java_major(Path(override)) < minimum:
            raise HarnessError(f"POPVAULT_ES_JAVA_HOME={override} is not a JDK >= {minimum}")
        return Path(override)
    best: tuple[int, Path] | None = None
    jvm = Path("/usr/lib/jvm")
    for home in sorted(jvm.iterdir()) if jvm.is_dir() else []:
        if home.is_symlink() or not (home / "bin" / "java").exists():
            continue
        major = java_major(home)
        if major >= minimum and (best is None or major > best[0]):
            best = (major, home)
    if best is None:
        raise HarnessError(f"no JDK >= {minimum} under /usr/lib/jvm; run .ci/install-deps.sh")
    return best[1]
