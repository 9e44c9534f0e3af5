"""Compliance commands: ``retention plan|apply``, ``hold add|list|release``, ``audit verify|show``.

Registered by :mod:`ingest.cli` through ``COMMAND_MODULES``. Same conventions as the other
commands: a table for people, ``--json`` for machines, one error line and the mapped exit code
on failure. Every change (apply, hold add/release) is recorded in the audit trail with the
``--actor`` given, else the OS user.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from ingest.audit import Action, AuditLog, default_actor
from ingest.cli import ConfigOpt, JsonOpt, _config, _run, err, out
from ingest.config import Config
from ingest.errors import EXIT_FAILED, EXIT_USAGE
from ingest.holds import HoldStore
from ingest.retention import RetentionPolicy, parse_retention

ActorOpt = Annotated[str | None, typer.Option(
    "--actor", help="Who is acting, for the audit trail (default: the OS user).")]

retention_app = typer.Typer(no_args_is_help=True,
                            help="Expire messages past their retention period.")
hold_app = typer.Typer(no_args_is_help=True,
                       help="Legal holds: messages matching a hold are never expired.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")

def register(app: typer.Typer) -> None:
    """Add the ``retention``, ``hold`` and ``audit`` command groups to ``app``."""
    app.add_typer(retention_app, name="retention")
    app.add_typer(hold_app, name="hold")
    app.add_typer(audit_app, name="audit")


def _policy(config: Config) -> RetentionPolicy:
    policy = _run(lambda: parse_retention(config))
    if policy is None:
        err.print(f"error: {config.path or 'the configuration'} has no [retention] table")
        raise typer.Exit(EXIT_USAGE)
    return policy


# -- retention --------------------------------------------------------------------------------


def _print_plan(data: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for col in ("rule", "keep", "matched", "expired", "held", "oldest", "newest"):
        table.add_column(col, justify="right" if col in ("matched", "expired", "held")
                         else "left")
    for t in data["rules"]:
        table.add_row(t["rule"], t["keep"], str(t["matched"]), str(t["expired"]),
                      str(t["held"]), t["oldest"] or "", t["newest"] or "")
    out.print(table)
    out.print(f"{data['documents']} message(s) examined, {data['expired']} expired, "
              f"{data['held']} kept by legal holds ({', '.join(data['holds']) or 'none'}), "
              f"{data['undated']} without a timestamp (never expire)", highlight=False)


@retention_app.command("plan")
def retention_plan(config_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show what `retention apply` would expire now, per rule; changes nothing."""
    from ingest.retention import plan_retention
    from ingest.sinks.factory import open_sink
    from ingest.sinks.lifecycle import lifecycle_for

    config = _config(config_path)
    policy = _policy(config)
    sink = _run(lambda: open_sink(config))
    try:
        holds = _run(lambda: HoldStore(config.archive_path).active())
        plan = _run(lambda: plan_retention(policy, lifecycle_for(sink), holds))
    finally:
        sink.close()
    data = plan.to_dict()
    if as_json:
        out.print_json(json.dumps(data))
    else:
        _print_plan(data, f"retention plan at {plan.now}")


@retention_app.command("apply")
def retention_apply(
    config_path: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
    = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete expired messages (documents and unreferenced raw objects; receipts are kept,
    marked expired), recording each batch in the audit trail."""
    from ingest.archive import open_store
    from ingest.retention import apply_retention, plan_retention
    from ingest.sinks.factory import open_sink
    from ingest.sinks.lifecycle import lifecycle_for

    config = _config(config_path)
    policy = _policy(config)
    sink = _run(lambda: open_sink(config))
    try:
        if not yes:
            if not sys.stdin.isatty():
                err.print("error: retention apply deletes messages; pass --yes to run it "
                          "without a terminal")
                raise typer.Exit(EXIT_USAGE)
            holds = _run(lambda: HoldStore(config.archive_path).active())
            preview = _run(lambda: plan_retention(policy, lifecycle_for(sink), holds))
            _print_plan(preview.to_dict(), "retention apply would expire")
            if not preview.expired:
                out.print("nothing to expire")
                return
            if not typer.confirm(f"Delete {preview.expired} message(s) for good?"):
                raise typer.Exit(EXIT_FAILED)
        store = _run(lambda: open_store(config))
        report = _run(lambda: apply_retention(policy, sink, store, config.archive_path,
                                              actor=actor))
    finally:
        sink.close()
    data = report.to_dict()
    if as_json:
        out.print_json(json.dumps(data))
        return
    _print_plan(data, f"retention applied at {report.plan.now}")
    out.print(f"{report.documents_deleted} document(s) deleted, {report.receipts_expired} "
              f"receipt(s) marked expired, {report.raw_deleted} raw object(s) deleted, "
              f"{report.batches} batch(es) audited", highlight=False)


# -- holds ------------------------------------------------------------------------------------


@hold_app.command("add")
def hold_add(
    name: Annotated[str, typer.Argument(help="A unique name, e.g. LEGAL-2026-04.")],
    query: Annotated[str, typer.Option("--query", "-q", help="popvault search syntax.")],
    note: Annotated[str | None, typer.Option(help="Why (ticket, matter).")] = None,
    config_path: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Place a legal hold: matching messages, now or arriving later, are never expired."""
    config = _config(config_path)
    who = actor or default_actor()
    hold = _run(lambda: HoldStore(config.archive_path).add(name, query, actor=who, note=note))
    _run(lambda: AuditLog(config.archive_path).append(
        Action.HOLD_ADD, what={"hold": hold.name, "query": hold.query},
        why={"note": hold.note}, actor=who))
    out.print(f"hold {hold.name!r} placed: {hold.query}", highlight=False)


@hold_app.command("release")
def hold_release(
    name: Annotated[str, typer.Argument(help="The hold's name.")],
    config_path: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Release a legal hold; its messages fall back under the retention rules."""
    config = _config(config_path)
    who = actor or default_actor()
    hold = _run(lambda: HoldStore(config.archive_path).release(name, actor=who))
    _run(lambda: AuditLog(config.archive_path).append(
        Action.HOLD_RELEASE, what={"hold": hold.name, "query": hold.query},
        why={"note": hold.note}, actor=who))
    out.print(f"hold {hold.name!r} released", highlight=False)


@hold_app.command("list")
def hold_list(
    config_path: ConfigOpt = None,
    as_json: JsonOpt = False,
    released: Annotated[bool, typer.Option("--all", help="Include released holds.")] = False,
) -> None:
    """List legal holds (active only unless --all)."""
    config = _config(config_path)
    holds = _run(lambda: HoldStore(config.archive_path).all())
    shown = holds if released else [h for h in holds if h.active]
    if as_json:
        out.print_json(json.dumps({"holds": [h.to_dict() for h in shown]}))
        return
    table = Table(title=f"{len(shown)} hold(s)")
    for col in ("name", "query", "note", "created", "by", "released"):
        table.add_column(col, overflow="fold")
    for h in shown:
        table.add_row(h.name, h.query, h.note or "", h.created_at, h.created_by,
                      f"{h.released_at} by {h.released_by}" if h.released_at else "")
    out.print(table)


# -- audit ------------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(config_path: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Recompute the hash chain; exit non-zero at the first edited, removed or reordered
    entry. Keep the printed head hash elsewhere: it also catches a cut-off tail."""
    config = _config(config_path)
    report = _run(lambda: AuditLog(config.archive_path).verify())
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    elif report.ok:
        out.print(f"audit trail intact: {report.entries} entries, head {report.head_hash}",
                  highlight=False)
    else:
        for finding in report.findings:
            err.print(f"[bold red]{finding.kind}:[/] {finding.detail}", highlight=False)
        err.print(f"{report.entries} entries verified before it, head {report.head_hash}",
                  highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@audit_app.command("show")
def audit_show(
    config_path: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="Most recent entries to show.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show the most recent audit entries, oldest first."""
    config = _config(config_path)
    entries = _run(lambda: AuditLog(config.archive_path).tail(limit))
    if as_json:
        out.print_json(json.dumps({"entries": [e.to_dict() for e in entries]}))
        return
    table = Table(title=f"last {len(entries)} audit entr{'y' if len(entries) == 1 else 'ies'}")
    for col in ("seq", "time", "actor", "action", "what", "why"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(str(e.seq), e.time, e.actor, e.action, _brief(e.what), _brief(e.why))
    out.print(table)


def _brief(data: dict[str, Any]) -> str:
    """An entry's what/why in one cell: long key lists shortened to their count."""
    shown = {k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 3 else v)
             for k, v in data.items()}
    return json.dumps(shown, separators=(", ", ": "), ensure_ascii=False)
