"""``popvault verify``, ``manifest build``, ``reconcile`` and ``export``: proving the archive.

Registered by :mod:`ingest.cli` through ``COMMAND_MODULES``. Same conventions as the other
commands: human tables on stdout, ``--json`` for machines, progress bars on stderr only on a
terminal, one error line and the mapped exit code for any :class:`PopvaultError`. Each command
exits non-zero when it finds something wrong, so cron and CI can alert on the exit code alone.
``verify`` and ``export`` are recorded in the audit log (:func:`ingest.audit.append`).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest.cli import ConfigOpt, JsonOpt, _config, _run, err, out
from ingest.errors import EXIT_FAILED, EXIT_USAGE

manifest_app = typer.Typer(no_args_is_help=True, help="Daily tamper-evident manifests.")


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not (enabled and err.is_terminal))


def verify(
    config_path: ConfigOpt = None,
    sample: Annotated[int | None, typer.Option(
        "--sample", min=1, help="Re-hash only N random objects (missing/orphan stay complete).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash raw objects against the index; check the manifest chain; exit 1 on any finding."""
    from ingest.archive import open_store
    from ingest.audit import Action, append
    from ingest.integrity import verify_archive
    from ingest.sinks.factory import open_sink

    config = _config(config_path)
    store = _run(lambda: open_store(config))
    sink = _run(lambda: open_sink(config))
    try:
        with _progress(not as_json) as progress:
            task = progress.add_task("verifying", total=None)

            def hook(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            report = _run(lambda: verify_archive(store, sink, sample=sample,  # type: ignore[arg-type]
                                                 progress=hook))
    finally:
        sink.close()
    _run(lambda: append(config.archive_path, Action.VERIFY, what={
        "referenced": report.referenced, "stored": report.stored, "checked": report.checked,
        "sampled": report.sampled, "counts": report.counts, "manifests": report.manifests,
        "ok": report.ok}, why={"command": "verify", "sample": sample}))
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        _print_verify(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _print_verify(report: Any) -> None:
    rate = report.checked / report.duration_s if report.duration_s else 0.0
    table = Table(title="popvault verify")
    for col in ("referenced", "stored", "checked", "encrypted", "missing", "corrupt", "orphan",
                "manifest", "time"):
        table.add_column(col, justify="right")
    c = report.counts
    table.add_row(str(report.referenced), str(report.stored),
                  f"{report.checked}{' (sample)' if report.sampled else ''}",
                  str(report.encrypted), str(c["missing"]), str(c["corrupt"]), str(c["orphan"]),
                  str(c["manifest"]), f"{report.duration_s:.1f}s ({rate:.0f}/s)")
    out.print(table)
    for f in report.findings:
        out.print(f"[red]{f.kind}[/] {f.subject}: {f.detail}", highlight=False)
    for note in report.notes:
        err.print(f"note: {note}", highlight=False)
    if report.unsealed_days:
        err.print(f"note: {len(report.unsealed_days)} day(s) not sealed yet (first "
                  f"{report.unsealed_days[0]}); run `popvault manifest build`", highlight=False)
    out.print("[green]ok[/]" if report.ok else "[red]findings: archive integrity is NOT proven[/]")


@manifest_app.command("build")
def manifest_build(
    config_path: ConfigOpt = None,
    date: Annotated[str | None, typer.Option(
        "--date", help="Seal days up to this one (YYYY-MM-DD, UTC); default today.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal each day's raw hashes in a chained Merkle manifest (idempotent for closed days)."""
    from ingest.integrity import BuildStatus, build_manifests, collect_references
    from ingest.sinks.factory import open_sink

    until = None
    if date is not None:
        try:
            until = dt.date.fromisoformat(date)
        except ValueError:
            err.print(f"[bold red]error:[/] --date {date!r} is not YYYY-MM-DD", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
    config = _config(config_path)
    sink = _run(lambda: open_sink(config))
    try:
        refs = _run(lambda: collect_references(sink))  # type: ignore[arg-type]
    finally:
        sink.close()
    results = _run(lambda: build_manifests(config.archive_path, refs, until=until))
    if as_json:
        out.print_json(json.dumps({"manifests": [r.to_dict() for r in results]}))
    else:
        table = Table(title="popvault manifest build")
        for col in ("date", "status", "hashes", "manifest hash"):
            table.add_column(col)
        for r in results:
            table.add_row(r.date, str(r.status), str(r.count), r.hash or "")
        out.print(table)
    bad = [r for r in results if r.status in (BuildStatus.MISMATCH, BuildStatus.LATE)]
    if bad:
        err.print(f"[red]{len(bad)} day(s) could not be sealed consistently; run "
                  "`popvault verify`[/]")
        raise typer.Exit(EXIT_FAILED)


def reconcile(
    account: Annotated[str, typer.Option("--account", "-a", help="Account id.")],
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
    show_all: Annotated[bool, typer.Option(
        "--all", help="List every message, not only those needing attention.")] = False,
) -> None:
    """Account for every message on the server: archived, pending, oversize or inconsistent."""
    from ingest.archive import open_store
    from ingest.reconcile import State, reconcile_account
    from ingest.sinks.factory import open_sink

    config = _config(config_path)
    acc = _run(lambda: config.account(account))
    store = _run(lambda: open_store(config))
    sink = _run(lambda: open_sink(config))
    try:
        report = _run(lambda: reconcile_account(acc, sink, store))  # type: ignore[arg-type]
    finally:
        sink.close()
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        counts = report.counts
        table = Table(title=f"popvault reconcile {account}: {len(report.messages)} on server")
        for state in State:
            table.add_column(str(state), justify="right")
        table.add_row(*(str(counts[str(s)]) for s in State))
        out.print(table)
        shown = [m for m in report.messages
                 if show_all or m.state is State.INCONSISTENT]
        if shown:
            detail = Table()
            for col in ("#", "uidl", "size", "state", "reason"):
                detail.add_column(col, overflow="fold")
            for m in shown:
                colour = "red" if m.state is State.INCONSISTENT else "white"
                detail.add_row(str(m.number), m.uidl, str(m.size),
                               f"[{colour}]{m.state}[/]", m.reason or "")
            out.print(detail)
        if report.receipts_not_on_server:
            err.print(f"note: {report.receipts_not_on_server} receipt(s) for copies no longer "
                      f"on the server ({report.receipts_deleted_elsewhere} not deleted by "
                      "popvault)", highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def export(
    query: Annotated[str, typer.Argument(help='Search syntax, e.g. from:alice@example.com')],
    fmt: Annotated[str, typer.Option("--format", "-f", help="mbox or eml-zip.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    config_path: ConfigOpt = None,
    reason: Annotated[str | None, typer.Option(
        "--reason", help="Why (ticket, request); recorded in the audit log.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the raw bytes of every matching message, with a manifest of hashes."""
    from ingest.archive import open_store
    from ingest.audit import Action, append, keys_summary
    from ingest.export import ExportFormat
    from ingest.export import export as run_export
    from ingest.searchquery import QuerySyntaxError, parse_query
    from ingest.sinks.factory import open_sink

    try:
        kind = ExportFormat(fmt)
    except ValueError:
        err.print(f"[bold red]error:[/] --format must be mbox or eml-zip, got {fmt!r}",
                  highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    try:
        parse_query(query)
    except QuerySyntaxError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    config = _config(config_path)
    store = _run(lambda: open_store(config))
    sink = _run(lambda: open_sink(config))
    try:
        with _progress(not as_json) as progress:
            task = progress.add_task("exporting", total=None)
            report = _run(lambda: run_export(
                sink, store, query, kind, out_path,
                progress=lambda done: progress.update(task, completed=done)))
    finally:
        sink.close()
    _run(lambda: append(config.archive_path, Action.EXPORT, what={
        "query": query, "format": str(kind), "out": str(out_path.resolve()),
        "out_sha256": report.out_sha256, "manifest_sha256": report.manifest_sha256,
        "bytes": report.bytes, **keys_summary(i.message_key for i in report.items)},
        why={"command": "export", "reason": reason}))
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        out.print(f"exported {report.count} message(s), {report.bytes / 1e6:.1f} MB, to "
                  f"{report.out} (manifest {report.manifest})", highlight=False)
    if report.unterminated:
        err.print(f"[yellow]warning:[/] {len(report.unterminated)} message(s) do not end with a "
                  "line break; mbox needs one, so it was added and their bytes in the mbox "
                  "differ from the archive (use --format eml-zip for exact bytes)",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``popvault`` app."""
    app.command("verify")(verify)
    app.command("reconcile")(reconcile)
    app.command("export")(export)
    app.add_typer(manifest_app, name="manifest")
