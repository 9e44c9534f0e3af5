"""``popvault import`` and ``popvault migrate``: getting existing mail and indexes in.

Registered through ``ingest.cli.COMMAND_MODULES``; the work is in :mod:`ingest.importer` and
:mod:`ingest.migrate`, this module only wires configuration, progress and output.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ingest.archive import open_store
from ingest.classify import classify_rules_from_config
from ingest.cli import ConfigOpt, JsonOpt, _config, _parser, _run, err, out
from ingest.config import DEFAULT_MAX_MESSAGE_BYTES, Config
from ingest.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, PopvaultError, exit_code
from ingest.importer import (
    DEFAULT_IMPORT_ACCOUNT,
    ImportReport,
    InvalidImport,
    import_paths,
    plan_sources,
    validate_account_id,
)
from ingest.migrate import MigrationReport, migrate_to_elasticsearch
from ingest.threads import thread_rules_from_config

if TYPE_CHECKING:
    from ingest.sinks.elasticsearch import ElasticsearchSink
    from ingest.sinks.embedded import EmbeddedSink

DEFAULT_MAX_BODY_CHARS = 1_000_000
"""Body text indexed per document when no ``[elasticsearch]`` section sets it (as poll)."""


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def import_command(
    paths: Annotated[list[Path], typer.Argument(
        help="mbox files, Maildir folders (cur/ and new/) or directories of .eml files.")],
    account: Annotated[str, typer.Option(
        "--account", "-a", help="Account id recorded on the documents and receipts.")
    ] = DEFAULT_IMPORT_ACCOUNT,
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import local mail through the archive → parse → dedup → index pipeline; re-runs skip
    what is already imported. Exit 0 only if every entry was imported."""
    try:
        validate_account_id(account)
        plan_sources(paths)  # fail on a bad path before opening anything
    except InvalidImport as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    config = _config(config_path)
    from ingest.sinks.factory import open_sink

    sink = _run(lambda: open_sink(config))
    try:
        _run(sink.ensure_schema)
        store = _run(lambda: open_store(config))
        es = config.elasticsearch
        show_progress = not as_json and err.is_terminal
        with _parser(config) as parser, Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TimeElapsedColumn(), console=err, disable=not show_progress,
        ) as progress:
            task = progress.add_task("import", total=None)

            def hook(report: ImportReport) -> None:
                progress.update(task, completed=report.bytes_read, total=report.bytes_total,
                                description=(
                                    f"{report.messages_read} read · {report.new} new · "
                                    f"{report.joined} joined · {report.skipped} skipped · "
                                    f"{report.error_count} err · "
                                    f"{report.messages_per_s:.0f} msg/s"))

            report = _run(lambda: import_paths(
                paths, account_id=account, sink=sink, store=store, parser=parser,
                max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                max_body_chars=es.max_body_chars if es else DEFAULT_MAX_BODY_CHARS,
                now=_utc_now, progress=hook, thread_rules=thread_rules_from_config(config),
                classify_rules=classify_rules_from_config(config)))
        if report.new or report.joined:
            _run(sink.refresh)
    finally:
        sink.close()
    _print_import(report, as_json)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _print_import(report: ImportReport, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    table = Table(title=f"popvault import (account {report.account_id})")
    for col in ("files", "messages read", "new", "joined", "skipped", "errors", "MB",
                "msg/s", "time"):
        table.add_column(col, justify="right")
    table.add_row(str(report.files), str(report.messages_read), str(report.new),
                  str(report.joined), str(report.skipped), str(report.error_count),
                  f"{report.bytes_read / 1e6:.1f}", f"{report.messages_per_s:.0f}",
                  f"{report.duration_s:.1f}s")
    out.print(table)
    for e in report.errors[:20]:
        err.print(f"[yellow]{e.file}[/] @ byte {e.offset}: {e.error}", highlight=False)
    if report.error_count > 20:
        err.print(f"... {report.error_count - 20} more (--json lists up to "
                  f"{len(report.errors)})")


def migrate_command(
    to_elasticsearch: Annotated[bool, typer.Option(
        "--to-elasticsearch", help="Copy the embedded store into [elasticsearch].")] = False,
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the embedded index (<archive>/index.sqlite3) into Elasticsearch, then verify;
    idempotent."""
    if not to_elasticsearch:
        err.print("error: say where to: --to-elasticsearch")
        raise typer.Exit(EXIT_USAGE)
    config = _config(config_path)
    try:
        source, target = _open_stores(config)
    except PopvaultError as exc:  # printed without markup: the text names "[elasticsearch]"
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exit_code(exc)) from None
    try:
        show_progress = not as_json and err.is_terminal
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err, disable=not show_progress) as progress:
            tasks: dict[str, TaskID] = {}

            def hook(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(phase, total=total)
                progress.update(tasks[phase], completed=done, total=total)

            report = _run(lambda: migrate_to_elasticsearch(source, target, progress=hook))
    finally:
        source.close()
        target.close()
    _print_migration(report, as_json)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _open_stores(config: Config) -> tuple[EmbeddedSink, ElasticsearchSink]:
    """The embedded store to read (even though [elasticsearch] is configured) and the target."""
    from ingest.sinks.elasticsearch import ElasticsearchSink
    from ingest.sinks.embedded import EmbeddedSink
    from ingest.sinks.factory import EMBEDDED_INDEX_FILE

    if config.elasticsearch is None:
        raise ConfigError(f"{config.path}: migrate --to-elasticsearch needs an "
                          "[elasticsearch] section (the target)")
    path = config.archive_path / EMBEDDED_INDEX_FILE
    if not path.is_file():
        raise ConfigError(f"no embedded index at {path} ([archive] path in {config.path}): "
                          "nothing to migrate")
    return EmbeddedSink(path), ElasticsearchSink(config.elasticsearch)


def _print_migration(report: MigrationReport, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    data = report.to_dict()
    table = Table(title=f"popvault migrate: {report.source} → {report.target}")
    for col in ("records", "in source", "created", "joined", "unchanged", "conflicting",
                "in Elasticsearch", "verified"):
        table.add_column(col, justify="left" if col == "records" else "right")
    d, r = data["documents"], data["receipts"]
    table.add_row("documents", str(d["source"]), str(d["created"]), str(d["joined"]),
                  str(d["unchanged"]), "-", str(d["target"]), str(d["verified"]))
    table.add_row("receipts", str(r["source"]), str(r["created"]), "-", str(r["unchanged"]),
                  str(r["conflicting"]), str(r["target"]), str(r["verified"]))
    out.print(table)
    status = "[green]verified[/]" if report.ok else "[red]verification failed[/]"
    counts = "counts match" if report.counts_match else (
        "Elasticsearch holds other records too" if report.ok else "counts differ")
    out.print(f"{status}; {counts}; {report.duration_s:.1f}s")
    for line in report.problems[:20]:
        err.print(f"[yellow]problem:[/] {line}", highlight=False)
    if report.problem_count > 20:
        err.print(f"... {report.problem_count - 20} more")


def register(app: typer.Typer) -> None:
    """Add ``import`` and ``migrate`` to the ``popvault`` command line."""
    app.command("import")(import_command)
    app.command("migrate")(migrate_command)
