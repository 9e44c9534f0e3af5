"""``popvault status``, ``popvault accounts pause|resume`` and ``popvault run``.

:func:`register` adds them to the ``popvault`` typer app; Celery and Redis are imported inside
the commands only, so the rest of the CLI starts without them.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ingest.config import Config, load_config
from ingest.errors import EXIT_CONNECT, EXIT_USAGE, PopvaultError, exit_code

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML configuration (default: $POPVAULT_CONFIG or ./popvault.toml)",
    envvar="POPVAULT_CONFIG", show_envvar=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

RUN_STOP_TIMEOUT_S = 120
"""``popvault run`` waits this long for a warm shutdown before forcing a cold one."""

out = Console()
err = Console(stderr=True)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except PopvaultError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exit_code(exc)) from None


def _redis(config: Config) -> Any:
    """A Redis client for the broker database, checked with PING.

    Without ``[broker]``: the archive's embedded Redis; if no ``popvault run`` serves it, a
    temporary server is started for this command and stopped when the command exits.
    """
    import redis

    from workers import embedded_redis

    try:
        url = embedded_redis.redis_url(config)
        if config.broker is None:
            server = embedded_redis.EmbeddedRedis(config.archive_path)
            if server.start(exclusive=False):
                atexit.register(server.stop)
    except PopvaultError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exit_code(exc)) from None
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        err.print(f"[bold red]error:[/] cannot reach Redis at {_safe_url(url)}: "
                  f"{type(exc).__name__}", highlight=False)
        raise typer.Exit(EXIT_CONNECT) from None
    return client


def _safe_url(url: str) -> str:
    """The broker URL without a password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _known(config: Config, account_id: str) -> None:
    if account_id not in {a.id for a in config.accounts}:
        err.print(f"[bold red]error:[/] no account with id {account_id!r} in "
                  f"{config.path or 'the configuration'}", highlight=False)
        raise typer.Exit(EXIT_USAGE)


def status_records(config: Config, client: Any) -> dict[str, Any]:
    """What ``popvault status --json`` prints."""
    from workers import health, keys

    records = health.read_all(client, [a.id for a in config.accounts])
    sweep_raw = client.hgetall(keys.sweep_stats())
    sweep = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                           else v)
             for k, v in sweep_raw.items()}
    if "at_ms" in sweep:
        sweep["at"] = health.iso_ms(int(sweep.pop("at_ms")))
    return {"accounts": list(records.values()), "last_sweep": sweep or None}


def register(app: typer.Typer, accounts_app: typer.Typer) -> None:
    """Add the worker commands to the ``popvault`` CLI."""

    @app.command("status")
    def status(config_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
        """Health of every configured account (from Redis); exit 0 whatever their state."""
        config = _config(config_path)
        client = _redis(config)
        data = status_records(config, client)
        if as_json:
            out.print_json(json.dumps(data))
            return
        table = Table(title=f"popvault status ({len(data['accounts'])} accounts)")
        for col in ("account", "state", "last success", "failures", "archived", "next due",
                    "last error"):
            table.add_column(col, overflow="fold",
                             justify="right" if col in ("failures", "archived") else "left")
        colours = {"ok": "green", "new": "white", "failing": "red", "paused": "yellow",
                   "flagged": "yellow"}
        for rec in data["accounts"]:
            state = rec["state"]
            label = f"[{colours.get(state, 'white')}]{state}[/]"
            if rec["paused"]:
                label += f" ({rec['paused']})"
            if rec["polling"]:
                label += " [cyan]polling[/]"
            error = rec["last_error"]
            error_text = f"{error.get('stage')}: {error.get('message')}" if error else ""
            table.add_row(rec["account_id"], label, rec["last_success"] or "-",
                          str(rec["consecutive_failures"]), str(rec["messages_archived"]),
                          rec["next_due"] or "-", error_text)
        out.print(table)
        if data["last_sweep"]:
            s = data["last_sweep"]
            out.print(f"last sweep {s.get('at', '?')}: claimed {s.get('claimed')}, "
                      f"backlog {s.get('backlog')}, {float(s.get('duration_s', 0)) * 1000:.1f} ms")

    @accounts_app.command("pause")
    def pause(account_id: Annotated[str, typer.Argument(help="Account id.")],
              config_path: ConfigOpt = None) -> None:
        """Stop scheduled polls of an account until ``popvault accounts resume``."""
        from workers import health
        from workers.schedule import now_ms

        config = _config(config_path)
        _known(config, account_id)
        health.pause(_redis(config), account_id, health.OPERATOR, now_ms=now_ms())
        out.print(f"{account_id}: paused")

    @accounts_app.command("resume")
    def resume(account_id: Annotated[str, typer.Argument(help="Account id.")],
               config_path: ConfigOpt = None) -> None:
        """Resume a paused (or backing-off) account: it is polled at the next sweep."""
        from workers import health
        from workers.schedule import now_ms

        config = _config(config_path)
        _known(config, account_id)
        was = health.resume(_redis(config), account_id, now_ms=now_ms())
        out.print(f"{account_id}: {'resumed' if was else 'was not paused; due now'}")

    @app.command("run")
    def run(
        config_path: ConfigOpt = None,
        concurrency: Annotated[int, typer.Option(help="Accounts polled at once.")] = 4,
        loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    ) -> None:
        """Run a worker with an embedded beat on this machine (one process tree).

        Without ``[broker]`` it first starts the archive's embedded Redis (unix socket under
        ``<archive path>/broker/``) and stops it after the worker has exited.

        SIGTERM or Ctrl-C: warm shutdown (running polls finish); a second one, or
        ``RUN_STOP_TIMEOUT_S`` later, a cold shutdown (running polls end without QUIT, so the
        server deletes nothing; their tasks are redelivered).
        """
        config = _config(config_path)
        from ingest.events import parse_events_config
        from workers.embedded_redis import EmbeddedRedis
        from workers.events import EVENTS_QUEUE
        from workers.schedule import POLL_QUEUE, SWEEP_QUEUE, parse_worker_settings

        # Without [broker], this process owns the archive's embedded Redis for its lifetime.
        server = EmbeddedRedis(config.archive_path) if config.broker is None else None
        try:
            parse_worker_settings(config)
            if server is not None:
                server.start(exclusive=True)
        except PopvaultError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exit_code(exc)) from None
        env = dict(os.environ)
        if config.path is not None:
            env["POPVAULT_CONFIG"] = str(Path(config.path).resolve())
        queues = [POLL_QUEUE, SWEEP_QUEUE]
        if parse_events_config(config) is not None:  # the ticket-event dispatcher's queue
            queues.append(EVENTS_QUEUE)
        cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-B",
               "--pool", "prefork", "--concurrency", str(max(1, concurrency)),
               "--loglevel", loglevel, "-Q", ",".join(queues)]
        try:
            code = supervise(cmd, env)
        finally:
            if server is not None:  # after the worker: its warm shutdown still needs Redis
                server.stop()
        raise typer.Exit(code)


def supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``, forwarding SIGTERM/SIGINT as a warm shutdown and escalating to SIGQUIT."""
    from workers.embedded_redis import SUPERVISED_ENV, SUPERVISOR_GONE_SIGNAL, die_with_parent

    # Own session: a terminal's Ctrl-C reaches only us, and we forward exactly one signal
    # (Celery treats a second one as "cold shutdown now"). If we die, even by SIGKILL, the
    # kernel tells the worker, which then kills its own process group (workers.app): no
    # unsupervised worker, beat or parser is left behind.
    child = subprocess.Popen(cmd, env={**env, SUPERVISED_ENV: "1"}, start_new_session=True,
                             preexec_fn=die_with_parent(SUPERVISOR_GONE_SIGNAL))
    stopping: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is not None:
            return
        if stopping:  # second signal: cold shutdown
            child.send_signal(signal.SIGQUIT)
            return
        stopping.append(time.monotonic())
        child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > RUN_STOP_TIMEOUT_S:
                    child.send_signal(signal.SIGQUIT)
                    stopping[0] = time.monotonic()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
