"""A throwaway Dovecot user whose Maildir tests fill directly (no MTA in the loop)."""

from __future__ import annotations

import os
import poplib
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.harness import dovecot
from tests.harness.proc import is_root
from tests.harness.settings import Settings

MAX_LINE = 10 * 1024 * 1024  # poplib's 2048-byte line cap would reject legitimate long lines

_name_lock = threading.Lock()
_last_stamp = [0, 0]  # (seconds, microseconds) of the last Maildir name we issued


def _maildir_name() -> str:
    """Strictly increasing ``<sec>.M<usec>`` names: Dovecot gives new mail UIDs in the order
    of these timestamps, so the POP3 order equals the delivery order."""
    with _name_lock:
        now = time.time_ns() // 1000
        sec, usec = divmod(now, 1_000_000)
        if (sec, usec) <= tuple(_last_stamp):
            sec, usec = _last_stamp[0], _last_stamp[1] + 1
            if usec >= 1_000_000:
                sec, usec = sec + 1, 0
        _last_stamp[:] = [sec, usec]
    return f"{sec}.M{usec}P{os.getpid()}Q{secrets.token_hex(4)}.popvault-test"


class _POP3(poplib.POP3):
    """poplib with a larger line limit, for reading back exactly what the server sends."""

    def _getline(self) -> tuple[bytes, int]:
        line = self.file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise poplib.error_proto("line too long")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets


class Mailbox:
    """One POP3 account on the test Dovecot."""

    def __init__(self, settings: Settings, username: str, password: str,
                 set_env: Callable[[str, str], None]) -> None:
        self.settings = settings
        self.username = username
        self.password = password
        self.maildir: Path = dovecot.user_maildir(settings, username)
        self._set_env = set_env
        self._ids = dovecot.mail_ids()
        self._env_used = False

    def __repr__(self) -> str:
        return f"Mailbox({self.username!r})"

    # --- filling the server ---------------------------------------------------------------

    def _write(self, raw: bytes) -> None:
        # Maildir stores LF line endings; Dovecot converts to CRLF when serving.
        data = raw.replace(b"\r\n", b"\n")
        name = _maildir_name()
        tmp = self.maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if is_root():
                os.fchown(f.fileno(), *self._ids)
        os.rename(tmp, self.maildir / "new" / name)

    def deliver(self, raw: bytes) -> None:
        """Put one message on the server exactly as given (CRLF stored as LF)."""
        self._write(raw)

    def deliver_many(self, raws: Iterable[bytes]) -> None:
        """Bulk delivery (thousands of messages in well under a second per thousand)."""
        for raw in raws:
            self._write(raw)

    # --- looking at the server ------------------------------------------------------------

    def count(self) -> int:
        """Messages the server holds: files in new/ + cur/ (no POP3 session needed)."""
        return sum(1 for sub in ("new", "cur") for _ in (self.maildir / sub).iterdir())

    def _session(self) -> _POP3:
        pop = _POP3(self.settings.host, self.settings.pop3_port, timeout=30)
        pop.user(self.username)
        pop.pass_(self.password)
        return pop

    def served(self) -> list[bytes]:
        """RETR every message over plain POP3 (USER/PASS on the non-TLS port).

        Each item is the message as the server sends it after dot-unstuffing: the lines
        joined with CRLF plus a final CRLF (``b"\\r\\n".join(lines) + b"\\r\\n"``). A message
        stored without a trailing newline therefore comes back with one, and a stored LF is a
        CRLF. Order is POP3 message-number order (= delivery order).
        """
        pop = self._session()
        try:
            n, _size = pop.stat()
            out = []
            for i in range(1, n + 1):
                _resp, lines, _octets = pop.retr(i)
                out.append(b"\r\n".join(lines) + b"\r\n")
            return out
        finally:
            pop.quit()

    def uidls(self) -> list[str]:
        """UIDLs in message-number order (Dovecot format ``%08Xu%08Xv``: uid then uidvalidity,
        16 uppercase hex digits)."""
        pop = self._session()
        try:
            _resp, lines, _octets = pop.uidl()
            return [ln.split(b" ", 1)[1].decode("ascii") for ln in lines]
        finally:
            pop.quit()

    # --- account ----------------------------------------------------------------------------

    def set_password(self, new: str) -> None:
        """Change the server-side password (and the env var, if account_config set it)."""
        dovecot.set_password(self.settings, self.username, new)
        self.password = new
        if self._env_used:
            self._set_env(self.password_env, new)

    @property
    def password_env(self) -> str:
        return "POPVAULT_TEST_PW_" + "".join(c if c.isalnum() else "_" for c in
                                             self.username).upper()

    def account_config(self, **overrides: Any) -> dict[str, Any]:
        """One ``[[accounts]]`` table for this mailbox over implicit TLS with the test CA; the
        password travels via an environment variable (restored at fixture teardown)."""
        self._set_env(self.password_env, self.password)
        self._env_used = True
        cfg: dict[str, Any] = {
            "id": self.username,
            "host": self.settings.host,
            "port": self.settings.pop3s_port,
            "security": "tls",
            "username": self.username,
            "password_env": self.password_env,
            "ca_file": str(self.settings.ca_file),
        }
        cfg.update(overrides)
        return cfg


def random_username() -> str:
    return "u" + secrets.token_hex(5)


def random_password() -> str:
    return "pw-" + secrets.token_urlsafe(12)


def create(settings: Settings, set_env: Callable[[str, str], None],
           name: str | None = None, password: str | None = None) -> Mailbox:
    username = name or random_username()
    pw = password if password is not None else random_password()
    dovecot.add_user(settings, username, pw)
    return Mailbox(settings, username, pw, set_env)
