"""POP3 logins: USER/PASS, APOP (RFC 1939), AUTH PLAIN (RFC 5034/4616), AUTH XOAUTH2.

Rules that hold for every mechanism:

* A password or token never crosses an unencrypted link unless the account sets
  ``allow_plaintext_auth``; :class:`PlaintextRefused` is raised *before* anything is sent.
* Secrets never reach an exception, a log line or a ``repr``: server text is scrubbed of
  them (a server could echo what it got) and commands carrying them are logged redacted.
* A failed login raises :class:`AuthError` with our words in ``message`` and the server's
  trimmed text in ``server_reply``; response codes ``[IN-USE]``, ``[LOGIN-DELAY]``,
  ``[SYS/TEMP]``, ``[SYS/PERM]`` win over the generic "wrong password".

Used errors: AuthError, PlaintextRefused, MailboxInUse, LoginDelay, ServerTempFail,
ServerPermFail, ProtocolError (a reply that fits no step of the exchange).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from typing import Protocol

from ingest.config import AccountConfig
from ingest.errors import AuthError, PlaintextRefused, PopvaultError, ProtocolError
from ingest.pop3.protocol import SPECIFIC_CODES, Capabilities, Reply, error_for_reply

log = logging.getLogger("popvault.pop3")

MECHANISMS = ("user", "apop", "plain", "xoauth2")
SENDS_SECRET = frozenset({"user", "plain", "xoauth2"})
"""Mechanisms that put the password or token itself on the wire (base64 is not encryption)."""

REJECTED = "the server rejected the user name or password"
REJECTED_TOKEN = "the server rejected the OAuth2 token"


class AuthChannel(Protocol):
    """What a login needs from a session: one line out, one reply in, and link facts."""

    @property
    def encrypted(self) -> bool: ...

    def send_line(self, line: bytes, *, redacted: str | None = None) -> None:
        """Send ``line`` + CRLF; log ``redacted`` instead of the line when given."""

    def read_reply(self) -> Reply: ...


def choose_mechanism(
    requested: str,
    caps: Capabilities,
    apop_timestamp: bytes | None,
    *,
    encrypted: bool,
    allow_plaintext: bool,
) -> str:
    """Pick the login mechanism; for ``auto``: SASL PLAIN, then USER/PASS, then APOP.

    USER is tried when CAPA lists it or when CAPA is unknown (RFC 1939 servers without CAPA
    almost all take USER). On a plaintext link without ``allow_plaintext_auth``, ``auto``
    skips the mechanisms that send the password and may still settle on APOP; an explicit
    choice is honoured or refused, never silently replaced.
    """
    if requested != "auto":
        if requested not in MECHANISMS:
            raise AuthError(f"unknown auth mechanism {requested!r}")
        _check_link(requested, encrypted=encrypted, allow_plaintext=allow_plaintext)
        return requested
    candidates: list[str] = []
    if "PLAIN" in caps.sasl:
        candidates.append("plain")
    if caps.user is not False:
        candidates.append("user")
    if apop_timestamp is not None:
        candidates.append("apop")
    if not candidates:
        raise AuthError("the server offers no login mechanism popvault supports "
                        f"(SASL: {', '.join(sorted(caps.sasl)) or 'none'}; no USER, no APOP)")
    for mech in candidates:
        if encrypted or allow_plaintext or mech not in SENDS_SECRET:
            return mech
    _check_link(candidates[0], encrypted=encrypted, allow_plaintext=allow_plaintext)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_link(mech: str, *, encrypted: bool, allow_plaintext: bool) -> None:
    if mech in SENDS_SECRET and not encrypted and not allow_plaintext:
        raise PlaintextRefused(
            f"refusing to send the {'token' if mech == 'xoauth2' else 'password'} "
            f"({mech.upper()}) over an unencrypted connection: use security = 'tls' or "
            "'starttls', or set allow_plaintext_auth = true if you accept the risk"
        )


def authenticate(
    channel: AuthChannel,
    account: AccountConfig,
    *,
    caps: Capabilities,
    apop_timestamp: bytes | None,
    password: str | None,
    token: str | None,
) -> str:
    """Log in with the account's mechanism and return the one used (``"plain"``...)."""
    mech = choose_mechanism(account.auth, caps, apop_timestamp, encrypted=channel.encrypted,
                            allow_plaintext=account.allow_plaintext_auth)
    secrets = tuple(s for s in (password, token) if s)
    try:
        if mech == "xoauth2":
            if not token:
                raise AuthError("auth = 'xoauth2' needs a token and none was given")
            _xoauth2(channel, account, token, caps)
        else:
            if not password:
                raise AuthError(f"{mech.upper()} login needs a password and none was given")
            if mech == "user":
                _user_pass(channel, account, password, caps)
            elif mech == "apop":
                _apop(channel, account, password, apop_timestamp, caps)
            else:
                _plain(channel, account, password, caps)
    except PopvaultError as exc:
        _scrub(exc, secrets)
        if exc.account_id is None:
            exc.account_id = account.id
        raise
    log.info("logged in", extra={"account_id": account.id, "mechanism": mech})
    return mech


SCRUB_WINDOW_CHARS = 12
"""A server reply containing any run of this many characters of a secret is withheld: servers
may echo a truncated token, and our own trimming could cut a full echo down to a part."""


def _leaks(text: str, secret: str) -> bool:
    width = min(len(secret), SCRUB_WINDOW_CHARS)
    return any(secret[i:i + width] in text for i in range(len(secret) - width + 1))


def _scrub(exc: PopvaultError, secrets: tuple[str, ...]) -> None:
    """Drop server text that echoes a secret (and, defensively, check our own words)."""
    for secret in secrets:
        if exc.server_reply and _leaks(exc.server_reply, secret):
            exc.server_reply = "(withheld: the reply repeated part of the credentials)"
        if _leaks(exc.message, secret):
            exc.message = "login failed (details withheld: they contained credentials)"
            exc.args = (exc.message,)


def _failure(reply: Reply, command: str, caps: Capabilities, account: AccountConfig,
             human: str = REJECTED) -> PopvaultError:
    """Response codes first (IN-USE, LOGIN-DELAY, SYS/...); otherwise wrong credentials."""
    if reply.code in SPECIFIC_CODES:
        return error_for_reply(reply, command, login_delay_s=caps.login_delay_s,
                               account_id=account.id)
    return AuthError(f"{command} failed: {human}", account_id=account.id,
                     server_reply=reply.shown())


def _user_pass(channel: AuthChannel, account: AccountConfig, password: str,
               caps: Capabilities) -> None:
    channel.send_line(b"USER " + account.username.encode("utf-8"))
    reply = channel.read_reply()
    if not reply.ok:
        raise _failure(reply, "USER", caps, account)
    channel.send_line(b"PASS " + password.encode("utf-8"), redacted="PASS ***")
    reply = channel.read_reply()
    if not reply.ok:
        raise _failure(reply, "PASS", caps, account)


def apop_digest(timestamp: bytes, password: str) -> str:
    """MD5 over greeting timestamp + password (RFC 1939 section 7)."""
    return hashlib.md5(timestamp + password.encode("utf-8"), usedforsecurity=False).hexdigest()


def _apop(channel: AuthChannel, account: AccountConfig, password: str,
          timestamp: bytes | None, caps: Capabilities) -> None:
    """APOP sends an MD5 digest, not the password, so it is allowed on a plaintext link.

    That is all it protects: MD5 of a short password and a visible timestamp can be
    brute-forced offline, and the rest of the session is readable. Prefer TLS.
    """
    if timestamp is None:
        raise AuthError("auth = 'apop' but the server's greeting has no APOP timestamp "
                        "(<...>): it does not offer APOP")
    digest = apop_digest(timestamp, password)
    channel.send_line(f"APOP {account.username} {digest}".encode(),
                      redacted=f"APOP {account.username} ***")
    reply = channel.read_reply()
    if not reply.ok:
        raise _failure(reply, "APOP", caps, account)


def _expect_continuation(channel: AuthChannel, reply: Reply, command: str,
                         caps: Capabilities, account: AccountConfig) -> None:
    if reply.is_continuation:
        return
    if reply.ok:
        raise ProtocolError(f"{command}: the server said +OK before receiving credentials",
                            account_id=account.id, server_reply=reply.shown())
    raise _failure(reply, command, caps, account,
                   human="the server does not accept this mechanism or the login")


def _plain(channel: AuthChannel, account: AccountConfig, password: str, caps: Capabilities,
           *, initial_response: bool = False) -> None:
    """AUTH PLAIN, by default as command then ``+`` continuation: every server takes it.

    ``initial_response=True`` sends the credentials on the AUTH line (RFC 5034) and saves a
    round trip on servers that accept it.
    """
    blob = base64.b64encode(
        b"\0" + account.username.encode("utf-8") + b"\0" + password.encode("utf-8"))
    if initial_response:
        channel.send_line(b"AUTH PLAIN " + blob, redacted="AUTH PLAIN ***")
    else:
        channel.send_line(b"AUTH PLAIN")
        _expect_continuation(channel, channel.read_reply(), "AUTH PLAIN", caps, account)
        channel.send_line(blob, redacted="***")
    reply = channel.read_reply()
    if reply.is_continuation:  # a server wanting more than PLAIN defines: cancel
        channel.send_line(b"*")
        reply = channel.read_reply()
    if not reply.ok:
        raise _failure(reply, "AUTH PLAIN", caps, account)


def xoauth2_blob(username: str, token: str) -> bytes:
    """The base64 XOAUTH2 initial response; tokens of any length (no line cap on sends)."""
    raw = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


def describe_xoauth2_error(challenge_text: str) -> str:
    """Decode the base64 JSON error a server sends as a ``+`` challenge; never the token.

    Returns e.g. ``"status 401, scope https://outlook.office.com/POP.AccessAsUser.All"``;
    only known keys are used, each value trimmed, so nothing odd reaches the message.
    """
    try:
        data = json.loads(base64.b64decode(challenge_text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return "an undecodable error challenge"
    if not isinstance(data, dict):
        return "an undecodable error challenge"
    parts = [f"{key} {str(data[key])[:100]}" for key in ("status", "scope", "schemes")
             if key in data]
    return ", ".join(parts) or "an error challenge without details"


def _xoauth2(channel: AuthChannel, account: AccountConfig, token: str,
             caps: Capabilities) -> None:
    """AUTH XOAUTH2 (Microsoft 365, Gmail). On failure the server may first send a ``+``
    challenge holding a JSON error; the client must answer it with an empty line and then
    gets the ``-ERR``."""
    channel.send_line(b"AUTH XOAUTH2")
    _expect_continuation(channel, channel.read_reply(), "AUTH XOAUTH2", caps, account)
    channel.send_line(xoauth2_blob(account.username, token), redacted="***")
    reply = channel.read_reply()
    detail = None
    if reply.is_continuation:
        detail = describe_xoauth2_error(reply.text)
        channel.send_line(b"")
        reply = channel.read_reply()
    if not reply.ok:
        human = REJECTED_TOKEN + (f" ({detail})" if detail else "")
        raise _failure(reply, "AUTH XOAUTH2", caps, account, human=human)
