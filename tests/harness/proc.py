"""Small process/port helpers shared by the service modules (no third-party imports)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class HarnessError(RuntimeError):
    """A service could not be prepared or started; the message says which and why."""


def is_root() -> bool:
    return os.geteuid() == 0


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log, so a start failure explains itself without digging."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None,
              alive: Callable[[], bool] | None = None, interval: float = 0.25) -> None:
    """Poll ``check`` until true; fail early if ``alive`` says the process died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # the service is still coming up; any error means "not yet"
            pass
        if alive is not None and not alive():
            tail = log_tail(log) if log else ""
            raise HarnessError(f"{what}: process exited before becoming ready\n{tail}")
        if time.monotonic() > deadline:
            tail = log_tail(log) if log else ""
            raise HarnessError(f"{what}: not ready after {timeout:.0f}s\n{tail}")
        time.sleep(interval)


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop_pidfile(pidfile: Path, timeout: float = 30.0) -> bool:
    """SIGTERM the pid in ``pidfile``, wait, then SIGKILL; True if something was stopped."""
    pid = read_pid(pidfile)
    if not pid_alive(pid):
        pidfile.unlink(missing_ok=True)
        return False
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    pidfile.unlink(missing_ok=True)
    return True


def ensure_system_user(name: str) -> tuple[int, int]:
    """Create an unprivileged system user when root; otherwise run as ourselves."""
    if not is_root():
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", name], check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def chown_tree(path: Path, uid: int, gid: int) -> None:
    if not is_root():
        return
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), uid, gid)


def which(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs]))
    if not found:
        raise HarnessError(f"{name} not found; run .ci/install-deps.sh")
    return found
