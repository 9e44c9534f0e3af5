"""TOML configuration as frozen dataclasses; every error names the file, the account and the key.

Secrets are never stored in these objects: an account holds *where* its password comes from
(``password_env``, ``password_file``, ``password_command``) and :func:`resolve_secret` reads it
only when a session needs it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ingest.errors import ConfigError

CONFIG_ENV = "POPVAULT_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("popvault.toml"), Path("/etc/popvault/popvault.toml"))
ACCOUNT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_COMMAND_TIMEOUT_S = 30
DEFAULT_MAX_MESSAGE_BYTES = 50 * 1024 * 1024

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("auto", "user", "apop", "plain", "xoauth2")
UIDL_FALLBACKS = ("refuse", "content")
EVENT_SINKS = ("webhook", "celery")


@dataclass(frozen=True)
class SecretSource:
    """Where a secret comes from; never the secret itself."""

    env: str | None = None
    file: Path | None = None
    command: str | None = None

    def is_set(self) -> bool:
        return bool(self.env or self.file or self.command)

    def describe(self) -> str:
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        if self.command:
            return "command " + shlex.split(self.command)[0]
        return "nothing"


@dataclass(frozen=True)
class OnArchived:
    """What to do with a message on the server once it is archived and indexed."""

    action: str = "keep"  # keep | delete | delete_after_days
    days: int = 0

    @property
    def deletes(self) -> bool:
        return self.action != "keep"


@dataclass(frozen=True)
class AccountConfig:
    id: str
    host: str
    username: str
    port: int = 995
    security: str = "tls"
    password: SecretSource = field(default_factory=SecretSource)
    token: SecretSource = field(default_factory=SecretSource)
    ca_file: Path | None = None
    verify: bool = True
    auth: str = "auto"
    allow_plaintext_auth: bool = False
    on_archived: OnArchived = field(default_factory=OnArchived)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    uidl_fallback: str = "refuse"
    pipelining: bool = True
    max_messages_per_session: int = 0  # 0 = no cap
    max_bytes_per_session: int = 0  # 0 = no cap
    drain: bool = True
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 120.0
    session_deadline_s: float = 3600.0
    interval_s: int = 300
    tags: tuple[str, ...] = ()
    events: tuple[str, ...] = ()  # "webhook" and/or "celery": ticket events for new mail

    def __repr__(self) -> str:  # no secrets here anyway, but keep repr short
        return f"AccountConfig(id={self.id!r}, host={self.host!r}, port={self.port})"


@dataclass(frozen=True)
class ElasticsearchConfig:
    url: str = "http://127.0.0.1:9200"
    index_prefix: str = "popvault"
    api_key: SecretSource = field(default_factory=SecretSource)
    username: str | None = None
    password: SecretSource = field(default_factory=SecretSource)
    ca_file: Path | None = None
    verify: bool = True
    request_timeout_s: float = 60.0
    bulk_max_bytes: int = 5 * 1024 * 1024
    max_retries: int = 5
    max_body_chars: int = 1_000_000


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class ParseConfig:
    timeout_s: float = 30.0
    memory_mb: int = 1024
    workers: int = 0  # 0 = one per CPU


@dataclass(frozen=True)
class Config:
    path: Path | None
    archive_path: Path
    accounts: tuple[AccountConfig, ...]
    elasticsearch: ElasticsearchConfig | None = None
    broker: BrokerConfig | None = None
    parse: ParseConfig = field(default_factory=ParseConfig)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def account(self, account_id: str) -> AccountConfig:
        for acc in self.accounts:
            if acc.id == account_id:
                return acc
        raise ConfigError(
            f"no account with id {account_id!r} in {self.path or 'the configuration'}",
            account_id=account_id,
        )

    def select(self, ids: list[str] | None) -> list[AccountConfig]:
        if not ids:
            return list(self.accounts)
        return [self.account(i) for i in ids]

    def with_accounts(self, accounts: list[AccountConfig]) -> Config:
        return replace(self, accounts=tuple(accounts))


class _Reader:
    """Reads one TOML table, remembering where it is so errors can name file and key."""

    def __init__(self, data: dict[str, Any], where: str, account_id: str | None = None) -> None:
        self.data = data
        self.where = where
        self.account_id = account_id
        self.used: set[str] = set()

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: key {key!r}: {why}", account_id=self.account_id)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool and (
            not isinstance(kind, tuple) or bool not in kind
        ):
            raise self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def required(self, key: str, kind: type) -> Any:
        if key not in self.data:
            raise self.fail(key, "is required")
        return self.get(key, kind)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def positive(self, key: str, default: int, *, allow_zero: bool = False) -> int:
        value = self.get(key, int, default)
        if value < 0 or (value == 0 and not allow_zero):
            raise self.fail(key, "must be a positive integer")
        return int(value)

    def path(self, key: str, base: Path | None) -> Path | None:
        value = self.get(key, str)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        return p

    def secret(self, prefix: str, base: Path | None) -> SecretSource:
        env = self.get(f"{prefix}_env", str)
        file = self.path(f"{prefix}_file", base)
        command = self.get(f"{prefix}_command", str)
        if sum(x is not None for x in (env, file, command)) > 1:
            raise self.fail(
                f"{prefix}_env", f"give only one of {prefix}_env, {prefix}_file, {prefix}_command"
            )
        if prefix in self.data:
            raise self.fail(
                prefix,
                f"secrets are not kept in the config file; use {prefix}_env, "
                f"{prefix}_file or {prefix}_command",
            )
        return SecretSource(env=env, file=file, command=command)

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key (check the spelling)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse_on_archived(r: _Reader) -> OnArchived:
    value = r.get("on_archived", str, "keep")
    if value in ("keep", "delete"):
        return OnArchived(action=value)
    m = re.fullmatch(r"delete_after_days:(\d+)", value)
    if m:
        return OnArchived(action="delete_after_days", days=int(m.group(1)))
    raise r.fail("on_archived", f"must be keep, delete or delete_after_days:N, got {value!r}")


def _parse_account(data: Any, index: int, where: str, base: Path | None,
                   defaults: dict[str, Any]) -> AccountConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [[accounts]] entry {index + 1} must be a table")
    merged = {**defaults, **data}
    raw_id = merged.get("id")
    if not isinstance(raw_id, str) or not ACCOUNT_ID_RE.match(raw_id):
        raise ConfigError(
            f"{where}: [[accounts]] entry {index + 1}: key 'id' must be 1-64 characters of "
            f"letters, digits, '_', '.', '-', got {raw_id!r}"
        )
    r = _Reader(merged, f"{where}: account {raw_id!r}", raw_id)
    r.get("id", str)
    security = r.choice("security", SECURITY_MODES, "tls")
    default_port = {"tls": 995, "starttls": 110, "none": 110}[security]
    port = r.get("port", int, default_port)
    if not 0 < port < 65536:
        raise r.fail("port", f"must be 1-65535, got {port}")
    auth = r.choice("auth", AUTH_MODES, "auto")
    acc = AccountConfig(
        id=raw_id,
        host=r.required("host", str),
        username=r.required("username", str),
        port=port,
        security=security,
        password=r.secret("password", base),
        token=r.secret("token", base),
        ca_file=r.path("ca_file", base),
        verify=r.get("verify", bool, True),
        auth=auth,
        allow_plaintext_auth=r.get("allow_plaintext_auth", bool, False),
        on_archived=_parse_on_archived(r),
        max_message_bytes=r.positive("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        uidl_fallback=r.choice("uidl_fallback", UIDL_FALLBACKS, "refuse"),
        pipelining=r.get("pipelining", bool, True),
        max_messages_per_session=r.positive("max_messages_per_session", 0, allow_zero=True),
        max_bytes_per_session=r.positive("max_bytes_per_session", 0, allow_zero=True),
        drain=r.get("drain", bool, True),
        connect_timeout_s=r.get("connect_timeout_s", float, 30.0),
        read_timeout_s=r.get("read_timeout_s", float, 120.0),
        session_deadline_s=r.get("session_deadline_s", float, 3600.0),
        interval_s=r.positive("interval_s", 300),
        tags=tuple(r.get("tags", list, [])),
        events=tuple(r.get("events", list, [])),
    )
    for sink in acc.events:
        if sink not in EVENT_SINKS:
            raise r.fail("events", f"each entry must be one of {', '.join(EVENT_SINKS)}, "
                                   f"got {sink!r}")
    if auth == "xoauth2" and not acc.token.is_set():
        raise r.fail("auth", "xoauth2 needs token_env, token_file or token_command")
    if auth != "xoauth2" and not acc.password.is_set():
        raise r.fail("password_env", "give password_env, password_file or password_command")
    if acc.ca_file is not None and not acc.ca_file.is_file():
        raise r.fail("ca_file", f"no such file: {acc.ca_file}")
    r.check_unknown()
    return acc


def _parse_es(data: Any, where: str, base: Path | None) -> ElasticsearchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [elasticsearch] must be a table")
    r = _Reader(data, f"{where}: [elasticsearch]")
    prefix = r.get("index_prefix", str, "popvault")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,100}", prefix):
        raise r.fail("index_prefix", "must be lowercase letters, digits, '_', '.', '-'")
    cfg = ElasticsearchConfig(
        url=r.get("url", str, "http://127.0.0.1:9200"),
        index_prefix=prefix,
        api_key=r.secret("api_key", base),
        username=r.get("username", str),
        password=r.secret("password", base),
        ca_file=r.path("ca_file", base),
        verify=r.get("verify", bool, True),
        request_timeout_s=r.get("request_timeout_s", float, 60.0),
        bulk_max_bytes=r.positive("bulk_max_bytes", 5 * 1024 * 1024),
        max_retries=r.positive("max_retries", 5, allow_zero=True),
        max_body_chars=r.positive("max_body_chars", 1_000_000),
    )
    r.check_unknown()
    return cfg


def load_config(path: Path | str | None = None) -> Config:
    """Load and validate the configuration from ``path``, ``$POPVAULT_CONFIG`` or a default."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if env:
            path = Path(env)
        else:
            path = next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)
            if path is None:
                raise ConfigError(
                    "no configuration file: pass --config FILE or set POPVAULT_CONFIG "
                    f"(looked for {', '.join(str(p) for p in DEFAULT_CONFIG_PATHS)})"
                )
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, path=path)


def config_from_dict(data: dict[str, Any], *, path: Path | None = None) -> Config:
    """Build a :class:`Config` from already-parsed TOML (tests and tools write such dicts)."""
    where = str(path) if path else "configuration"
    base = path.parent.resolve() if path else None
    known = {"archive", "elasticsearch", "broker", "accounts", "account_defaults", "parse",
             "hosts", "retention", "holds", "support", "metrics", "schedule", "events",
             "encryption"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown top-level key {key!r} (check the spelling)")
    archive = data.get("archive", {})
    if not isinstance(archive, dict):
        raise ConfigError(f"{where}: [archive] must be a table")
    ar = _Reader(archive, f"{where}: [archive]")
    archive_path = ar.path("path", base) or Path("~/.local/share/popvault").expanduser()
    ar.check_unknown()

    defaults = data.get("account_defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: [account_defaults] must be a table")
    raw_accounts = data.get("accounts", [])
    if not isinstance(raw_accounts, list):
        raise ConfigError(f"{where}: 'accounts' must be an array of tables ([[accounts]])")
    accounts = [_parse_account(a, i, where, base, defaults) for i, a in enumerate(raw_accounts)]
    seen: set[str] = set()
    for acc in accounts:
        if acc.id in seen:
            raise ConfigError(f"{where}: account id {acc.id!r} appears twice", account_id=acc.id)
        seen.add(acc.id)

    es = _parse_es(data["elasticsearch"], where, base) if "elasticsearch" in data else None
    broker = None
    if "broker" in data:
        br = _Reader(data["broker"], f"{where}: [broker]")
        broker = BrokerConfig(url=br.required("url", str))
        br.check_unknown()
    parse_cfg = ParseConfig()
    if "parse" in data:
        pr = _Reader(data["parse"], f"{where}: [parse]")
        parse_cfg = ParseConfig(
            timeout_s=pr.get("timeout_s", float, 30.0),
            memory_mb=pr.positive("memory_mb", 1024),
            workers=pr.positive("workers", 0, allow_zero=True),
        )
        pr.check_unknown()
    return Config(path=path, archive_path=archive_path, accounts=tuple(accounts),
                  elasticsearch=es, broker=broker, parse=parse_cfg, raw=data)


def resolve_secret(source: SecretSource, *, what: str, account_id: str | None = None) -> str:
    """Read a secret at the moment it is needed. Errors say where it was looked for, not what."""
    if source.env:
        value = os.environ.get(source.env)
        if value is None or value == "":
            raise ConfigError(f"{what}: environment variable {source.env} is not set",
                              account_id=account_id)
        return value
    if source.file:
        try:
            return source.file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {source.file}: {exc.strerror}",
                              account_id=account_id) from None
    if source.command:
        try:
            done = subprocess.run(shlex.split(source.command), capture_output=True, text=True,
                                  timeout=SECRET_COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{what}: {source.describe()} failed: {type(exc).__name__}",
                              account_id=account_id) from None
        if done.returncode != 0:
            raise ConfigError(f"{what}: {source.describe()} exited with {done.returncode}",
                              account_id=account_id)
        return done.stdout.rstrip("\r\n")
    raise ConfigError(f"{what}: no source configured", account_id=account_id)
