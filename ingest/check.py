"""``popvault check``: connect to one account step by step and say, in plain words, what works.

Each step is ``ok``, ``warn`` (works, but something deserves attention) or ``fail``; the run
stops at the first failure because later steps depend on it. A failing step carries
``advice``: what to change in the configuration or on the server. Secrets are read only for
the login step and never appear in any step (the auth module scrubs server echoes too).
Nothing is deleted: the check ends with QUIT after no DELE.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from ingest.config import AccountConfig, resolve_secret
from ingest.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    LoginDelay,
    MailboxInUse,
    PlaintextRefused,
    PopvaultError,
    TLSError,
    UidlUnsupported,
)
from ingest.pop3.session import Pop3Session

CHECK_DNS_TIMEOUT_S = 30.0
"""getaddrinfo has no timeout of its own; this is only reported, not enforced."""


class CheckStatus(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckStep:
    """One diagnosis step: ``name`` (dns, tcp, tls, greeting, capa, stls, auth, stat, uidl)."""

    name: str
    status: CheckStatus
    detail: str
    advice: str | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "status": str(self.status), "detail": self.detail,
                "advice": self.advice, "elapsed_s": round(self.elapsed_s, 4)}


class _Stop(Exception):
    """A step failed; the run ends there."""


class _Run:
    def __init__(self) -> None:
        self.steps: list[CheckStep] = []

    def add(self, name: str, status: CheckStatus, detail: str, advice: str | None,
            started: float) -> None:
        self.steps.append(CheckStep(name, status, detail, advice, time.monotonic() - started))
        if status is CheckStatus.FAIL:
            raise _Stop

    def step(self, name: str, action: Callable[[], tuple[CheckStatus, str]],
             advise: Callable[[PopvaultError], str]) -> None:
        started = time.monotonic()
        try:
            status, detail = action()
        except PopvaultError as exc:
            self.add(name, CheckStatus.FAIL, str(exc), advise(exc), started)
        else:
            self.add(name, status, detail, None, started)


def _name(parts: object) -> str:
    """``getpeercert()`` subject/issuer tuples to ``CN=..., O=...``."""
    short = {"commonName": "CN", "organizationName": "O", "countryName": "C",
             "organizationalUnitName": "OU"}
    out = []
    if isinstance(parts, tuple):
        for rdn in parts:
            for key, value in rdn:
                out.append(f"{short.get(key, key)}={value}")
    return ", ".join(out) or "?"


def check_account(account: AccountConfig) -> list[CheckStep]:
    """Diagnose one account: DNS, TCP, TLS + certificate, greeting, CAPA, STLS, login,
    STAT, UIDL. Returns the steps done; the last one is the failure, if any."""
    run = _Run()
    session: Pop3Session | None = None
    host, port = account.host, account.port
    try:
        run.step("dns", lambda: _dns(host, port),
                 lambda exc: f"check the host name {host!r} (typo? VPN? DNS server?)")

        def tcp() -> tuple[CheckStatus, str]:
            nonlocal session
            started = time.monotonic()
            session = Pop3Session.connect(account)
            return CheckStatus.OK, (f"connected to {host}:{port} in "
                                    f"{(time.monotonic() - started) * 1000:.0f} ms")

        run.step("tcp", tcp, lambda exc: _tcp_advice(account, exc))
        assert session is not None
        s = session
        if account.security == "tls":
            run.step("tls", lambda: _tls(s, s.start_tls), lambda exc: _tls_advice(account, exc))
        run.step("greeting", lambda: (CheckStatus.OK, s.read_greeting().text[:200]),
                 lambda exc: "the port answered but not like a POP3 server: check port and "
                             "security (995 = 'tls', 110 = 'starttls')")
        run.step("capa", lambda: _capa(s),
                 lambda exc: "the server broke off during CAPA; try again, or report it")
        if account.security == "starttls":
            run.step("stls", lambda: _tls(s, s.stls), lambda exc: _tls_advice(account, exc))
        elif account.security == "none":
            started = time.monotonic()
            run.add("tls", CheckStatus.WARN, "security = 'none': the session is not encrypted",
                    None, started)

        def login() -> tuple[CheckStatus, str]:
            password = token = None
            if account.auth == "xoauth2":
                token = resolve_secret(account.token, what="token", account_id=account.id)
            else:
                password = resolve_secret(account.password, what="password",
                                          account_id=account.id)
            mech = s.login(password=password, token=token)
            status = CheckStatus.OK
            detail = f"logged in as {account.username!r} with {mech.upper()}"
            if not s.encrypted and mech != "apop":
                status = CheckStatus.WARN
                detail += " over an unencrypted connection (allow_plaintext_auth = true)"
            elif mech == "apop":
                status = CheckStatus.WARN if not s.encrypted else status
                detail += " (APOP: MD5 digest, weak against offline guessing)"
            return status, detail

        run.step("auth", login, lambda exc: _auth_advice(account, exc))

        def stat() -> tuple[CheckStatus, str]:
            count, octets = s.stat()
            return CheckStatus.OK, f"{count} messages, {octets} octets"

        run.step("stat", stat, lambda exc: "the server refused STAT after login; report it")

        def uidl() -> tuple[CheckStatus, str]:
            uids = s.uidl(tolerate_missing=True)
            if uids is None:
                if account.uidl_fallback == "content":
                    return CheckStatus.WARN, ("no UIDL: new messages will be recognised by "
                                              "content (uidl_fallback = 'content'), slower")
                raise UidlUnsupported("the server does not support UIDL",
                                      account_id=account.id)
            return CheckStatus.OK, f"UIDL supported ({len(uids)} ids)"

        run.step("uidl", uidl, lambda exc: "without UIDL popvault cannot tell new messages "
                                           "from old; set uidl_fallback = 'content'")
        s.quit()
    except _Stop:
        pass
    finally:
        if session is not None:
            session.close()
    return run.steps


def _dns(host: str, port: int) -> tuple[CheckStatus, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    return CheckStatus.OK, f"{host} resolves to {', '.join(addresses)}"


def _capa(session: Pop3Session) -> tuple[CheckStatus, str]:
    caps = session.capa()
    if not caps.known:
        return CheckStatus.WARN, ("no CAPA (an RFC 1939-only server): capabilities unknown; "
                                  "USER, UIDL and TOP will simply be tried")
    return CheckStatus.OK, "; ".join(caps.lines)


def _tcp_advice(account: AccountConfig, exc: PopvaultError) -> str:
    text = str(exc)
    if "refused" in text:
        if account.port == 995 or account.security == "tls":
            return (f"port {account.port} refused: is the server on 110 with "
                    "security = 'starttls'?")
        return (f"port {account.port} refused: is the server on 995 with security = 'tls'? "
                "Is it running?")
    if "timed out" in text:
        return "no answer: a firewall may drop the connection, or the host/port is wrong"
    return "check the host name, the port and the network path to the server"


def _tls(session: Pop3Session, action: Callable[[], None]) -> tuple[CheckStatus, str]:
    action()
    info = session.tls_info()
    cert = info.get("certificate") or {}
    head = f"{info.get('version')} ({info.get('cipher')})"
    if not isinstance(cert, dict) or not cert:
        return CheckStatus.WARN, (f"{head}; certificate NOT verified (verify = false): anyone "
                                  "on the path could read the password")
    return CheckStatus.OK, (f"{head}; certificate verified: subject {_name(cert.get('subject'))}"
                            f"; issuer {_name(cert.get('issuer'))}; expires "
                            f"{cert.get('notAfter', '?')}")


def _tls_advice(account: AccountConfig, exc: PopvaultError) -> str:
    text = str(exc)
    if "not trusted" in text:
        if account.ca_file is None:
            return ("the server's certificate is not signed by a CA you trust: set "
                    "ca_file = <the CA that signed it> or fix the server's chain")
        return (f"the server's certificate is not signed by a CA you trust: ca_file = "
                f"{account.ca_file} does not hold its CA; point ca_file at the right CA or "
                "fix the server's chain")
    if "does not match the host name" in text:
        return "use the host name the certificate names (see its subject), not an IP or alias"
    if "does not offer STLS" in text:
        return "use security = 'tls' on port 995, or enable STLS on the server"
    if "expired" in text:
        return "the server's certificate has expired: its administrator must renew it"
    if isinstance(exc, ConnectError):
        return ("the connection broke during the TLS handshake: is the port really TLS? "
                "(995 = 'tls', 110 = 'starttls')")
    return "the TLS handshake failed: check security/port, and the server's TLS settings"


def _auth_advice(account: AccountConfig, exc: PopvaultError) -> str:
    if isinstance(exc, ConfigError):
        return "the secret could not be read: fix password_env/_file/_command (or token_*)"
    if isinstance(exc, PlaintextRefused):
        return ("use security = 'tls' or 'starttls'; only if you accept the risk, "
                "set allow_plaintext_auth = true")
    if isinstance(exc, MailboxInUse):
        return "another client holds the mailbox open; close it or wait, then retry"
    if isinstance(exc, LoginDelay):
        return "the server limits how often you may log in; raise interval_s"
    if isinstance(exc, AuthError):
        if account.auth == "xoauth2":
            return "the token was refused: refresh it, and check its scope and the user name"
        return (f"check username = {account.username!r} and the password; some providers "
                "need an app password or OAuth2 (auth = 'xoauth2')")
    if isinstance(exc, TLSError | ConnectError):
        return "the connection broke during login; try again"
    return "the server refused the login for another reason: see its reply"
