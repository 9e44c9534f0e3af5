"""``popvault kibana install``: put the data view, saved searches and dashboard into Kibana.

Registered by :mod:`ingest.cli` through ``COMMAND_MODULES``. Secrets come only from
environment variables named on the command line (``--api-key-env``, ``--password-env``), never
from the arguments themselves, so they stay out of shell history and ``ps``; no secret is ever
printed, in tables or in ``--json``. Exit codes: 0 every object imported, 1 Kibana refused some
object or the request, 2 conflicting options, 3 a bad URL, space or prefix or an unset
variable, 4 no connection, 5 TLS, 6 authentication.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ingest.cli import JsonOpt, _run, err, out
from ingest.config import SecretSource, resolve_secret
from ingest.errors import EXIT_FAILED, EXIT_USAGE
from ingest.kibana import DEFAULT_PREFIX, InstallResult, install

kibana_app = typer.Typer(no_args_is_help=True, help="Kibana data view, searches and dashboard.")


@kibana_app.command("install")
def kibana_install(
    url: Annotated[str, typer.Option("--url", help="Kibana base URL, e.g. http://localhost:5601")],
    space: Annotated[str | None, typer.Option("--space", help="Kibana space id (default space "
                                              "if omitted).")] = None,
    prefix: Annotated[str, typer.Option(
        "--prefix", help="Index prefix (index_prefix in the config).")] = DEFAULT_PREFIX,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", metavar="VAR", help="Environment variable holding an encoded API key.")
    ] = None,
    username: Annotated[str | None, typer.Option("--username", help="Basic-auth user.")] = None,
    password_env: Annotated[str | None, typer.Option(
        "--password-env", metavar="VAR", help="Environment variable holding the password.")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="CA certificate(s) for an https URL (default: system CAs).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Do not verify Kibana's TLS certificate (lab use only).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import (overwriting) popvault's saved objects through Kibana's saved objects API."""
    if api_key_env and (username or password_env):
        err.print("error: give --api-key-env, or --username with --password-env, not both")
        raise typer.Exit(EXIT_USAGE)
    if bool(username) != bool(password_env):
        err.print("error: --username and --password-env go together")
        raise typer.Exit(EXIT_USAGE)
    api_key = (_run(lambda: resolve_secret(SecretSource(env=api_key_env), what="--api-key-env"))
               if api_key_env else None)
    password = (_run(lambda: resolve_secret(SecretSource(env=password_env),
                                            what="--password-env"))
                if password_env else None)
    if insecure:
        err.print("[yellow]warning:[/] --insecure: Kibana's certificate is not verified")
    result = _run(lambda: install(url, space=space, api_key=api_key, username=username,
                                  password=password, ca_file=ca_file, verify=not insecure,
                                  prefix=prefix))
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        _print_result(result)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _print_result(result: InstallResult) -> None:
    where = result.url + (f" (space {result.space})" if result.space else "")
    for warning in result.warnings:
        err.print(f"[yellow]Kibana warning:[/] {escape(warning)}", highlight=False)
    if result.errors:
        table = Table(title=f"Kibana at {where} refused {len(result.errors)} object(s)")
        for col in ("type", "id", "title", "reason"):
            table.add_column(col, overflow="fold")
        for e in result.errors:
            table.add_row(e.type, e.id, escape(e.title), escape(e.reason))
        err.print(table)
        err.print(f"[bold red]error:[/] Kibana at {escape(where)} did not import: "
                  + ", ".join(f"{e.type}/{e.id}" for e in result.errors), highlight=False)
        return
    out.print(f"imported {result.success_count} saved object(s) into Kibana at "
              f"{escape(where)}", highlight=False)
    if result.dashboard_url:
        out.print(f"dashboard: {escape(result.dashboard_url)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``popvault kibana ...`` to the ``popvault`` app."""
    app.add_typer(kibana_app, name="kibana")
