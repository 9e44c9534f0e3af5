"""The ``popvault`` command line: human tables by default, ``--json`` for machines.

Every :class:`~ingest.errors.PopvaultError` ends as one clear line on stderr and the exit code
from :func:`ingest.errors.exit_code`; a traceback means a bug in popvault.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest import __version__
from ingest.archive import open_store
from ingest.config import Config, load_config
from ingest.errors import EXIT_FAILED, EXIT_USAGE, PopvaultError, exit_code
from ingest.heap import limit_arenas
from ingest.poll import AccountReport, PollOptions, poll_account

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="popvault: archive POP3 mailboxes raw, index them, search them.")
accounts_app = typer.Typer(no_args_is_help=True, help="Inspect configured accounts.")
schemas_app = typer.Typer(no_args_is_help=True, help="Index templates and aliases.")
app.add_typer(accounts_app, name="accounts")
app.add_typer(schemas_app, name="schemas")

_PIPE_WIDTH = 160  # rich assumes 80 columns when not on a terminal; tables need more
out = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML configuration (default: $POPVAULT_CONFIG or ./popvault.toml)",
    envvar="POPVAULT_CONFIG", show_envvar=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AccountOpt = Annotated[list[str] | None, typer.Option(
    "--account", "-a", help="Only this account (repeatable).")]

T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    """Call ``fn``; turn our errors into one line and an exit code, never a traceback."""
    try:
        return fn()
    except PopvaultError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exit_code(exc)) from None


def _config(path: Path | None) -> Config:
    return _run(lambda: load_config(path))


@contextmanager
def _parser(config: Config) -> Iterator[Any]:
    from ingest.parse import ParserPool

    workers = config.parse.workers or os.cpu_count() or 1
    with ParserPool(workers=workers, timeout_s=config.parse.timeout_s,
                    memory_mb=config.parse.memory_mb) as pool:
        yield pool


class _Formatter(logging.Formatter):
    """One line per record; tracebacks only with ``-vv`` (they are for developers)."""

    def __init__(self, *, show_tracebacks: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.show_tracebacks = show_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if not self.show_tracebacks and (record.exc_info or record.exc_text):
            record = logging.makeLogRecord(record.__dict__)
            if record.exc_info and record.exc_info[1] is not None:
                record.msg = f"{record.getMessage()} ({record.exc_info[1]})"
                record.args = None
            record.exc_info = None
            record.exc_text = None
        return super().format(record)


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output (-vv for debug).")] = 0,
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(show_tracebacks=verbose >= 2))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The ES client logs every retried request with a traceback; our own error says it better.
    logging.getLogger("elastic_transport").setLevel(
        logging.DEBUG if verbose >= 2 else logging.ERROR)


@app.command()
def version() -> None:
    """Print popvault's version."""
    out.print(__version__)


@app.command()
def poll(
    config_path: ConfigOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
    parallel: Annotated[int, typer.Option(help="Accounts polled at once.")] = 4,
    accept_uidl_reset: Annotated[bool, typer.Option(
        help="Ingest an account flagged for a suspected UIDL reset.")] = False,
) -> None:
    """Poll accounts once, in this process; exit 0 only if every account succeeded."""
    config = _config(config_path)
    accounts = _run(lambda: config.select(account))
    if not accounts:
        err.print("error: no accounts configured")
        raise typer.Exit(EXIT_USAGE)
    from ingest.sinks.factory import open_sink

    sink = _run(lambda: open_sink(config))
    reports: list[AccountReport] = []
    try:
        _run(sink.ensure_schema)
        show_progress = not as_json and err.is_terminal
        with _parser(config) as parser, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=err, disable=not show_progress,
        ) as progress:
            tasks = {a.id: progress.add_task(a.id, total=None) for a in accounts}

            def hook(account_id: str, done: int, total: int) -> None:
                progress.update(tasks[account_id], completed=done, total=total)

            def one(account_id: str) -> AccountReport:
                options = PollOptions(accept_uidl_reset=accept_uidl_reset, progress=hook)
                store = open_store(config)
                return poll_account(config, account_id, sink=sink, store=store,
                                    parser=parser, options=options)

            with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                reports = list(pool.map(one, [a.id for a in accounts]))
        if any(r.new or r.joined for r in reports):
            try:  # so that `popvault search` right after a poll sees what it indexed
                sink.refresh()
            except PopvaultError as exc:  # the reports (already delivered mail) still count
                err.print(f"warning: {escape(str(exc))}", highlight=False)
    finally:
        sink.close()
    _print_reports(reports, as_json)
    failed = [r for r in reports if not r.ok]
    if failed:
        codes = [exit_code(r.error) for r in failed if r.error is not None]
        raise typer.Exit(codes[0] if codes and len(set(codes)) == 1 else EXIT_FAILED)


def _print_reports(reports: list[AccountReport], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps({"accounts": [r.to_dict() for r in reports]}))
        return
    table = Table(title="popvault poll")
    for col in ("account", "new", "joined", "already", "deleted", "oversize", "parse failed",
                "failed", "MB", "time", "status"):
        table.add_column(col, justify="left" if col in ("account", "status") else "right")
    for r in reports:
        status = "[green]ok[/]" if r.ok else "[red]failed[/]"
        if r.flags:
            status = "[yellow]flagged: " + ", ".join(r.flags) + "[/]"
        table.add_row(r.account_id, str(r.new), str(r.joined), str(r.already_archived),
                      str(r.deleted), str(r.oversize), str(r.parse_failed), str(r.failed),
                      f"{r.bytes_fetched / 1e6:.1f}", f"{r.duration_s:.1f}s", status)
    out.print(table)
    for r in reports:
        if r.error is not None:
            err.print(f"[red]{r.account_id}[/]: {escape(str(r.error))}", highlight=False)
        for line in r.message_errors[:20]:
            err.print(f"[yellow]{r.account_id}[/]: {escape(line)}", highlight=False)
        if len(r.message_errors) > 20:
            err.print(f"{r.account_id}: ... {len(r.message_errors) - 20} more")


@accounts_app.command("check")
def accounts_check(config_path: ConfigOpt = None, account: AccountOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Diagnose account settings step by step (DNS, TCP, TLS, greeting, CAPA, login, STAT)."""
    from ingest.check import check_account

    config = _config(config_path)
    accounts = _run(lambda: config.select(account))
    results: dict[str, list[Any]] = {}
    for acc in accounts:
        results[acc.id] = _run(lambda acc=acc: check_account(acc))  # type: ignore[misc]
    failed = any(step.status == "fail" for steps in results.values() for step in steps)
    if as_json:
        out.print_json(json.dumps({a: [s.to_dict() for s in steps]
                                   for a, steps in results.items()}))
    else:
        for acc_id, steps in results.items():
            table = Table(title=f"account {acc_id}")
            for col in ("step", "result", "detail"):
                table.add_column(col)
            for s in steps:
                colour = {"ok": "green", "warn": "yellow", "fail": "red"}.get(s.status, "white")
                detail = s.detail + (f"\n→ {s.advice}" if s.advice else "")
                table.add_row(s.name, f"[{colour}]{s.status}[/]", escape(detail))
            out.print(table)
    if failed:
        raise typer.Exit(EXIT_FAILED)


@schemas_app.command("install")
def schemas_install(config_path: ConfigOpt = None) -> None:
    """Install index templates, indices and aliases (idempotent)."""
    from ingest.sinks.factory import open_sink

    config = _config(config_path)
    sink = _run(lambda: open_sink(config))
    try:
        _run(sink.ensure_schema)
    finally:
        sink.close()
    out.print(f"schemas installed in {sink.name}")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help='e.g. from:alice@example.com subject:"q3 report"')],
    config_path: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Maximum hits.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Search the archive: from: to: subject: has:attachment after: before: and free text."""
    from ingest.searchquery import QuerySyntaxError
    from ingest.sinks.factory import open_sink

    config = _config(config_path)
    sink = _run(lambda: open_sink(config))
    try:
        try:
            result = _run(lambda: sink.search(query, limit=limit))
        except QuerySyntaxError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
    finally:
        sink.close()
    if as_json:
        out.print_json(json.dumps({"total": result.total, "hits": [
            {"message_key": h.message_key, "score": h.score, "document": _summary(h.document)}
            for h in result.hits]}))
        return
    table = Table(title=f"{result.total} message(s)")
    for col in ("date", "from", "subject", "accounts", "key"):
        table.add_column(col, overflow="fold")
    for h in result.hits:
        s = _summary(h.document)
        table.add_row(s["date"] or "", ", ".join(s["from"]), s["subject"] or "",
                      ", ".join(s["accounts"]), h.message_key[:12])
    out.print(table)


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    email = doc.get("email", {})
    pv = doc.get("popvault", {})
    return {
        "date": doc.get("@timestamp"),
        "from": email.get("from", {}).get("address", []),
        "to": email.get("to", {}).get("address", []),
        "subject": email.get("subject"),
        "message_id": email.get("message_id"),
        "accounts": pv.get("accounts", []),
        "raw_sha256": pv.get("raw_sha256"),
        "attachments": [a.get("file", {}).get("name") for a in email.get("attachments", [])],
    }


def _register_worker_commands() -> None:
    """``status``, ``run``, ``accounts pause|resume`` live in workers/ (they need Redis)."""
    try:
        from workers.commands import register
    except ImportError:  # workers/ not installed alongside: the pipeline still works
        return
    register(app, accounts_app)


COMMAND_MODULES: tuple[str, ...] = ("cli_compliance", "cli_backfill", "cli_integrity",
                                     "cli_kibana")
"""Modules under ``ingest`` that add commands with ``register(app)``; one line each."""


def _register_extra_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"ingest.{name}").register(app)


def main() -> None:
    """Console-script entry point."""
    limit_arenas()  # before any thread starts (see ingest.heap)
    _register_worker_commands()
    _register_extra_commands()
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(EXIT_FAILED)
