"""The popvault error tree, in one module so every stage can import it without cycles.

::

    PopvaultError(message, *, account_id=None, server_reply=None, transient=False)
     ├── ConfigError          the TOML file or a secret source is wrong (names file, account, key)
     ├── ConnectError         DNS, TCP connect or read timeout, connection reset
     ├── TLSError             handshake, certificate or host name verification failed
     ├── AuthError            the server refused our credentials ([AUTH], -ERR on PASS/AUTH)
     │    └── PlaintextRefused  we refused to send a password over an unencrypted link
     ├── ProtocolError        the server broke RFC 1939/2449 or answered -ERR where it must not
     │    ├── MailboxInUse      [IN-USE]: another session holds the maildrop lock (transient)
     │    ├── LoginDelay        [LOGIN-DELAY]: the server wants fewer logins (transient)
     │    ├── ServerTempFail    [SYS/TEMP]: the server has a temporary problem (transient)
     │    ├── ServerPermFail    [SYS/PERM]: the server has a lasting problem
     │    └── UidlUnsupported   no UIDL and the account did not opt into a fallback
     ├── ArchiveError         the raw store could not write or verify bytes
     ├── ParseError           a message could not be turned into a document (never fatal)
     └── SinkError            the index refused or could not be reached
          └── IndexFull         flood-stage disk watermark: writes blocked until space is freed

``message`` tells a person what to fix. ``server_reply`` is the trimmed, untrusted text of the
server's ``-ERR`` line, kept apart from our own words. ``transient`` says a retry may succeed.
No password or token may ever be passed into an exception.
"""

from __future__ import annotations

SERVER_REPLY_MAX_CHARS = 200
"""Server text is untrusted: keep only this many printable characters of it."""


def trim_reply(text: str | bytes | None) -> str | None:
    """Return server text made safe to show: printable ASCII, bounded length."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text.strip())
    if len(cleaned) > SERVER_REPLY_MAX_CHARS:
        cleaned = cleaned[:SERVER_REPLY_MAX_CHARS] + "..."
    return cleaned


class PopvaultError(Exception):
    """Base of every error popvault raises on purpose."""

    stage = "popvault"
    default_transient = False

    def __init__(
        self,
        message: str,
        *,
        account_id: str | None = None,
        server_reply: str | bytes | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.account_id = account_id
        self.server_reply = trim_reply(server_reply)
        self.transient = self.default_transient if transient is None else transient

    def __str__(self) -> str:
        text = self.message
        if self.account_id and f"account {self.account_id!r}" not in text:
            text = f"account {self.account_id!r}: {text}"
        if self.server_reply:
            text = f"{text} (server said: {self.server_reply})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__str__()!r})"

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe description, for ``--json`` output and account health records."""
        return {
            "error": type(self).__name__,
            "stage": self.stage,
            "message": self.message,
            "account_id": self.account_id,
            "server_reply": self.server_reply,
            "transient": self.transient,
        }


class ConfigError(PopvaultError):
    """Raised when the configuration file or a secret source is unusable."""

    stage = "config"


class ConnectError(PopvaultError):
    """Raised when the server cannot be reached or the connection breaks or times out."""

    stage = "connect"
    default_transient = True


class TLSError(PopvaultError):
    """Raised when TLS cannot be established or the certificate is not trusted."""

    stage = "tls"


class AuthError(PopvaultError):
    """Raised when the server rejects the credentials."""

    stage = "auth"


class PlaintextRefused(AuthError):
    """Raised before sending a password over a connection that is not encrypted."""


class ProtocolError(PopvaultError):
    """Raised when the server's answer breaks the protocol or refuses a command."""

    stage = "protocol"


class MailboxInUse(ProtocolError):
    """Raised on ``[IN-USE]`` (RFC 2449): another session holds the maildrop."""

    default_transient = True


class LoginDelay(ProtocolError):
    """Raised on ``[LOGIN-DELAY]`` (RFC 2449): logged in again too soon."""

    default_transient = True

    def __init__(self, message: str, *, delay_s: int | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.delay_s = delay_s


class ServerTempFail(ProtocolError):
    """Raised on ``[SYS/TEMP]`` (RFC 3206): a temporary server problem."""

    default_transient = True


class ServerPermFail(ProtocolError):
    """Raised on ``[SYS/PERM]`` (RFC 3206): a lasting server problem."""


class UidlUnsupported(ProtocolError):
    """Raised when the server has no UIDL and the account has no fallback configured."""


class ArchiveError(PopvaultError):
    """Raised when raw bytes cannot be stored durably or fail verification."""

    stage = "archive"


class ParseError(PopvaultError):
    """Raised inside parsing; callers turn it into a ``parse_error`` field, never a lost message."""

    stage = "parse"


class SinkError(PopvaultError):
    """Raised when the index cannot be reached or refuses documents."""

    stage = "sink"
    default_transient = True


class IndexFull(SinkError):
    """Raised when Elasticsearch blocks writes (flood-stage disk watermark)."""

    default_transient = False


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_CONNECT = 4
EXIT_TLS = 5
EXIT_AUTH = 6
EXIT_PROTOCOL = 7
EXIT_ARCHIVE = 8
EXIT_SINK = 9

_EXIT_BY_TYPE: list[tuple[type[PopvaultError], int]] = [
    (ConfigError, EXIT_CONFIG),
    (ConnectError, EXIT_CONNECT),
    (TLSError, EXIT_TLS),
    (AuthError, EXIT_AUTH),
    (ProtocolError, EXIT_PROTOCOL),
    (ArchiveError, EXIT_ARCHIVE),
    (SinkError, EXIT_SINK),
]


def exit_code(exc: BaseException | None) -> int:
    """Map an error to the command's exit code, in this one place."""
    if exc is None:
        return EXIT_OK
    for kind, code in _EXIT_BY_TYPE:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILED
