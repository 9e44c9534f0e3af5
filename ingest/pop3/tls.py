"""Verifying TLS contexts for POP3, and plain-words explanations of certificate failures.

Unlike stdlib ``poplib.POP3_SSL`` (which historically did not verify), a context from here
checks the chain and the host name unless the account explicitly says ``verify = false``.
"""

from __future__ import annotations

import functools
import ssl
import threading
from pathlib import Path

from ingest.errors import ConfigError

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
"""TLS 1.0/1.1 are deprecated (RFC 8996); a server that offers nothing newer is refused."""

# OpenSSL X509_V_ERR_* codes we explain in our own words.
_UNTRUSTED_CODES = {2, 18, 19, 20, 21, 27}  # unknown issuer, self-signed, chain incomplete
_EXPIRED_CODE = 10
_NOT_YET_VALID_CODE = 9
_HOSTNAME_MISMATCH_CODE = 62


def create_ssl_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """Return a client context: TLS >= 1.2, chain and host name verified.

    ``ca_file`` replaces the system CAs (a private CA is the usual reason to set it); with
    ``verify=False`` nothing is checked, which only makes sense for a lab server.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load ca_file {ca_file}: {exc}") from exc
    ctx.minimum_version = MIN_TLS_VERSION
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.lru_cache(maxsize=64)
def _cached_context(ca_file: Path | None, ca_stamp: tuple[int, int] | None,
                    verify: bool) -> ssl.SSLContext:
    return create_ssl_context(ca_file, verify)


def shared_ssl_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """One context per CA file (as it is now on disk) and verify setting, for every session
    of a process: building one reads the CA file and costs more than the handshake's own
    certificate check, and TLS sessions can only be resumed through the context that made
    them."""
    stamp = None
    if ca_file is not None:
        try:
            info = ca_file.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None  # create_ssl_context reports the unreadable file
    return _cached_context(ca_file, stamp, verify)


class SessionCache:
    """TLS sessions by server, so the next connection to it can resume instead of a full
    handshake (saves the server a signature, the client a chain verification). Resumption is
    the server's choice; a refused or expired session costs nothing but the full handshake.
    Each entry holds its context, so a session is only ever offered through the context that
    made it (Python refuses any other)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._sessions: dict[tuple[str, int], tuple[ssl.SSLContext, ssl.SSLSession]] = {}
        self._lock = threading.Lock()

    def get(self, host: str, port: int, context: ssl.SSLContext) -> ssl.SSLSession | None:
        with self._lock:
            entry = self._sessions.get((host.lower(), port))
        return entry[1] if entry is not None and entry[0] is context else None

    def put(self, host: str, port: int, context: ssl.SSLContext,
            session: ssl.SSLSession | None) -> None:
        if session is None:
            return
        key = (host.lower(), port)
        with self._lock:
            if key not in self._sessions and len(self._sessions) >= self._capacity:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[key] = (context, session)


TLS_SESSIONS = SessionCache()
"""This process's sessions."""


def describe_verify_error(exc: ssl.SSLCertVerificationError, host: str) -> str:
    """Say why a certificate was refused and what to change, from OpenSSL's verify code."""
    why = exc.verify_message or exc.reason or str(exc)
    code = exc.verify_code
    if code in _UNTRUSTED_CODES:
        return (f"certificate is not trusted: {why}; set ca_file to the CA that signed the "
                f"server's certificate, or fix the server's chain")
    if code == _HOSTNAME_MISMATCH_CODE:
        return (f"certificate does not match the host name {host!r}: {why}; connect using a "
                "name listed in the certificate")
    if code == _EXPIRED_CODE:
        return f"certificate has expired: {why}; the server must renew it"
    if code == _NOT_YET_VALID_CODE:
        return f"certificate is not yet valid: {why}; check the clocks"
    return f"certificate verification failed: {why}"
