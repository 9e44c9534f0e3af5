"""Export the raw bytes of every message matching a search, exactly as archived.

Why raw bytes and not documents: an export answers a legal request, and only the original bytes
(verified against their SHA-256 on the way out, :meth:`FilesystemStore.read`) prove what was
received. Two containers:

* ``mbox`` in **mboxrd** form, the framing :func:`ingest.mailsources.iter_mbox` (``popvault
  import``) reads: each message is preceded by a ``From `` envelope line and followed by one
  empty ``\\n`` separator line; every line of the message that matches ``>*From `` gets one
  more ``>``. The reader drops the separator and one ``>``, so bytes round-trip exactly,
  including bodies that already quote ``>From ``. Line endings stay as archived (POP3 delivers
  CRLF). One limit is inherent to mbox: a message must end with a line break for the next
  envelope line to be recognised, so the rare message without one (an imported ``.eml``)
  gets one added; such messages are counted in ``unterminated`` and the command says to use
  ``eml-zip`` for them. The manifest goes next to the mbox as ``FILE.manifest.csv``.
* ``eml-zip``: one ``<message_key>.eml`` member per message, plus ``manifest.csv`` inside.

The manifest lists message key, Message-ID, date, sender, subject, SHA-256, size and where the
message is in the container, so the receiving side can check every message independently.
Outputs are written to ``FILE.part`` and renamed only when complete: a failed export (a missing
or corrupt raw object) leaves nothing that could be mistaken for a complete one.

Matching runs the query with each sink's own semantics, with paging and no result cap
(``popvault search`` stops at 10,000): a point in time with ``search_after`` on Elasticsearch,
keyset paging over ``rowid`` in SQL for the embedded sink, a filter for the memory sink.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from ingest.archive import FilesystemStore
from ingest.docpath import field_value
from ingest.errors import ArchiveError
from ingest.searchquery import parse_query

PAGE_SIZE = 500
"""Documents per page while matching: bounded memory, few round trips."""
MANIFEST_COLUMNS = ("message_key", "message_id", "date", "from", "subject", "sha256", "size",
                    "location")
ZIP_MANIFEST_NAME = "manifest.csv"
MANIFEST_SUFFIX = ".manifest.csv"
MBOX_SEPARATOR_SENDER = "MAILER-DAEMON"
"""``From `` line sender when the archive has no usable address (as Python's mailbox does)."""
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""Earliest time a ZIP entry can carry."""
_SOURCE_FIELDS = ["@timestamp", "email.message_id", "email.from.address", "email.subject",
                  "email.origination_timestamp", "popvault.raw_sha256", "popvault.raw_size"]

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_SAFE_SENDER = re.compile(r"^[\x21-\x7e]{1,254}$")


class ExportFormat(StrEnum):
    MBOX = "mbox"
    EML_ZIP = "eml-zip"


@dataclass(frozen=True)
class ExportItem:
    """What the manifest says about one exported message."""

    message_key: str
    message_id: str
    date: str
    sender: str
    subject: str
    sha256: str
    size: int
    location: str

    def row(self) -> list[str]:
        return [self.message_key, self.message_id, self.date, self.sender, self.subject,
                self.sha256, str(self.size), self.location]


@dataclass
class ExportReport:
    query: str
    format: ExportFormat
    out: Path
    manifest: Path
    count: int = 0
    bytes: int = 0
    out_sha256: str = ""
    manifest_sha256: str = ""
    unterminated: list[str] = field(default_factory=list)
    """mbox only: message keys that got a line break appended (see the module docstring)."""
    items: list[ExportItem] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "format": str(self.format), "out": str(self.out),
                "manifest": str(self.manifest), "count": self.count, "bytes": self.bytes,
                "out_sha256": self.out_sha256, "manifest_sha256": self.manifest_sha256,
                "unterminated": self.unterminated}


# -- matching ---------------------------------------------------------------------------------


def iter_matches(sink: Any, query: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every document matching ``query`` as (message_key, document), in pages.

    Raises QuerySyntaxError (a ValueError) before touching the sink when the query is bad.
    """
    parsed = parse_query(query)
    from ingest.sinks.elasticsearch import ElasticsearchSink
    from ingest.sinks.embedded import EmbeddedSink
    from ingest.sinks.memory import MemorySink

    if isinstance(sink, ElasticsearchSink):
        return _iter_es(sink, parsed)
    if isinstance(sink, EmbeddedSink):
        return _iter_embedded(sink, parsed)
    if isinstance(sink, MemorySink):
        from ingest.sinks.memory import _holds

        return ((k, d) for k, d in sink.iter_documents()
                if all(_holds(c, d) for c in parsed.clauses))
    raise TypeError(f"export does not know how to page through {type(sink).__name__}")


def _iter_es(sink: Any, parsed: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Point in time + ``search_after`` (the sink's scan), oldest first; only the fields the
    export needs. Failures read as SinkError, like every other command's."""
    from ingest.searchquery import to_es_query

    alias = sink.names.messages_alias
    sort = [{"@timestamp": {"order": "asc", "unmapped_type": "date"}}, {"_shard_doc": "asc"}]
    for hit in sink.scan(alias, to_es_query(parsed), source=list(_SOURCE_FIELDS), sort=sort,
                         page_size=PAGE_SIZE, what="exporting from"):
        yield hit["_id"], hit.get("_source") or {}


def _iter_embedded(sink: Any, parsed: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The embedded sink's own search SQL (same semantics as ``popvault search``), keyset-paged
    over ``rowid`` so a page costs the same at the end as at the start."""
    import json

    from ingest.sinks.embedded import _clause_sql

    where: list[str] = []
    args: list[Any] = []
    for clause in parsed.clauses:
        sql, clause_args = _clause_sql(clause)
        where.append(f"NOT ({sql})" if clause.negated else f"({sql})")
        args.extend(clause_args)
    condition = " AND ".join(where) or "1"
    last = 0
    while True:
        with sink._sql("exporting") as conn:
            rows = conn.execute(
                f"SELECT d.rowid, d.message_key, d.json FROM documents d WHERE d.rowid > ? "
                f"AND ({condition}) ORDER BY d.rowid LIMIT ?", [last, *args, PAGE_SIZE],
            ).fetchall()
        if not rows:
            return
        for rowid, key, text in rows:
            yield key, json.loads(text)
            last = rowid


# -- containers -------------------------------------------------------------------------------


def quote_mboxrd(raw: bytes) -> bytes:
    """mboxrd: one more ``>`` on every line that starts with ``>*From ``."""
    return _FROM_LINE.sub(rb">\1", raw)


def _from_line(sender: str, date: dt.datetime | None) -> bytes:
    who = sender if _SAFE_SENDER.match(sender) else MBOX_SEPARATOR_SENDER
    when = (date or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).astimezone(dt.UTC)
    return f"From {who} {when.strftime('%a %b %d %H:%M:%S %Y')}\n".encode("ascii")


def _first(value: Any) -> str:
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def _date(doc: dict[str, Any]) -> tuple[str, dt.datetime | None]:
    text = _first(field_value(doc, "email.origination_timestamp")) or _first(doc.get("@timestamp"))
    try:
        when = dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        when = None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return text, when


class _HashingWriter:
    """Counts and hashes what goes to a file, so the output's SHA-256 costs no second read."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


Progress = Callable[[int], None]
"""``progress(done)`` after each message (the total is unknown until the scan ends)."""


def export(sink: Any, store: FilesystemStore, query: str, fmt: ExportFormat, out: Path, *,
           progress: Progress | None = None) -> ExportReport:
    """Write every message matching ``query`` to ``out``; see the module docstring.

    Raises QuerySyntaxError for bad query text, ArchiveError when a raw object is missing or
    does not verify (nothing is left at ``out`` then), SinkError when the index fails.
    """
    out = Path(out)
    manifest = out.with_name(out.name + MANIFEST_SUFFIX) if fmt is ExportFormat.MBOX else out
    report = ExportReport(query=query, format=fmt, out=out, manifest=manifest)
    matches = iter_matches(sink, query)  # syntax errors before any file is created
    part = out.with_name(out.name + ".part")
    try:
        with part.open("wb") as raw_fh:
            hashing = _HashingWriter(raw_fh)
            if fmt is ExportFormat.MBOX:
                _write_mbox(hashing, matches, store, report, progress)
            else:
                _write_zip(hashing, matches, store, report, progress)
            raw_fh.flush()
            os.fsync(raw_fh.fileno())
        report.out_sha256 = hashing.digest.hexdigest()
        if fmt is ExportFormat.MBOX:
            data = _manifest_csv(report.items)
            manifest_part = manifest.with_name(manifest.name + ".part")
            manifest_part.write_bytes(data)
            os.replace(manifest_part, manifest)
            report.manifest_sha256 = hashlib.sha256(data).hexdigest()
        os.replace(part, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise ArchiveError(f"cannot write export {out}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return report


def _messages(matches: Iterable[tuple[str, dict[str, Any]]], store: FilesystemStore
              ) -> Iterator[tuple[str, dict[str, Any], bytes, dt.datetime | None, str]]:
    for key, doc in matches:
        sha = _first(field_value(doc, "popvault.raw_sha256"))
        if not sha:
            raise ArchiveError(f"document {key} has no popvault.raw_sha256: cannot export it")
        raw = store.read(sha)  # verified against its SHA-256 (and decrypted if sealed)
        date_text, when = _date(doc)
        yield key, doc, raw, when, date_text


def _item(key: str, doc: dict[str, Any], raw: bytes, date_text: str,
          location: str) -> ExportItem:
    return ExportItem(
        message_key=key, message_id=_first(field_value(doc, "email.message_id")), date=date_text,
        sender=_first(field_value(doc, "email.from.address")),
        subject=_first(field_value(doc, "email.subject")),
        sha256=_first(field_value(doc, "popvault.raw_sha256")), size=len(raw), location=location)


def _write_mbox(fh: _HashingWriter, matches: Iterable[tuple[str, dict[str, Any]]],
                store: FilesystemStore, report: ExportReport,
                progress: Progress | None) -> None:
    for n, (key, doc, raw, when, date_text) in enumerate(_messages(matches, store), start=1):
        item = _item(key, doc, raw, date_text, str(n))
        fh.write(_from_line(item.sender, when))
        body = quote_mboxrd(raw)
        if not body.endswith(b"\n"):
            body += b"\n"
            report.unterminated.append(key)
        fh.write(body)
        fh.write(b"\n")  # the empty separator line
        report.items.append(item)
        report.count += 1
        report.bytes += len(raw)
        if progress is not None:
            progress(report.count)


def _write_zip(fh: _HashingWriter, matches: Iterable[tuple[str, dict[str, Any]]],
               store: FilesystemStore, report: ExportReport,
               progress: Progress | None) -> None:
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[call-overload]
                         allowZip64=True) as zf:
        for key, doc, raw, when, date_text in _messages(matches, store):
            name = f"{key}.eml"
            stamp = ZIP_EPOCH
            if when is not None and when.year >= ZIP_EPOCH[0]:
                u = when.astimezone(dt.UTC)
                stamp = (u.year, u.month, u.day, u.hour, u.minute, u.second)
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, raw)
            report.items.append(_item(key, doc, raw, date_text, name))
            report.count += 1
            report.bytes += len(raw)
            if progress is not None:
                progress(report.count)
        data = _manifest_csv(report.items)
        zf.writestr(zipfile.ZipInfo(ZIP_MANIFEST_NAME, date_time=ZIP_EPOCH), data,
                    compress_type=zipfile.ZIP_DEFLATED)
        report.manifest_sha256 = hashlib.sha256(data).hexdigest()


def _manifest_csv(items: Iterable[ExportItem]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(MANIFEST_COLUMNS)
    for item in items:
        writer.writerow(item.row())
    return buf.getvalue().encode("utf-8")


def read_manifest(data: bytes) -> list[dict[str, str]]:
    """Rows of an export manifest as dicts (for checks on the receiving side and tests)."""
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
