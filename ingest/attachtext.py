"""Searchable text from attachments: PDF, DOCX, XLSX, ODT, HTML and plain text.

Compliance searches must find a phrase whether it was typed in the body or sent as a PDF.
:class:`AttachmentTexts` collects ``popvault.attachment_text`` while the document builder walks
the MIME tree, and ``popvault.attachment_errors`` for attachments whose text could not be read
(``"report.pdf: PdfReadError"``): ECS ``email.attachments[].file`` is strict and has no room
for a status, and a broken attachment must be visible rather than silently unsearchable.

Bounded on every axis, because attachments are the largest and most hostile part of mail:

* attachments over :data:`MAX_ATTACHMENT_BYTES` are skipped and flagged;
* zip containers (DOCX, XLSX, ODT) are refused when they declare more than
  :data:`MAX_UNZIPPED_BYTES` or :data:`MAX_ZIP_ENTRIES` (zip bombs);
* at most :data:`MAX_PDF_PAGES` pages, :data:`MAX_CHARS_PER_ATTACHMENT` characters per
  attachment and :data:`MAX_CHARS_PER_MESSAGE` per message;
* a time budget per attachment and per message, checked between pages, paragraphs and rows.
  One page or one XML parse cannot be interrupted from here; the parser pool's child timeout
  is the hard stop behind this soft one.

Extractors are generators of text chunks, so a cap or budget stops the work as soon as it is
reached and keeps what was read so far. Nothing here raises to the caller.

Cheap for the common case: the kind of an attachment is decided from its name, MIME type and
first bytes; images, archives and unknown types cost one dictionary lookup. The extraction
libraries are imported on first use only.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
"""Decoded attachment size above which no text is extracted (the bytes stay archived)."""
MAX_CHARS_PER_ATTACHMENT = 200_000
MAX_CHARS_PER_MESSAGE = 1_000_000
"""Same order as the body cap: one index field must stay well under Lucene's limits."""
MAX_PDF_PAGES = 200
MAX_UNZIPPED_BYTES = 200 * 1024 * 1024
"""Declared uncompressed size of a DOCX/XLSX/ODT above which it is treated as a zip bomb."""
MAX_ZIP_ENTRIES = 10_000
ATTACHMENT_BUDGET_S = 8.0
"""Soft time per attachment; with the message budget below, under the 30 s parse timeout."""
MESSAGE_BUDGET_S = 20.0
MAX_ERRORS = 100
MAX_ERROR_CHARS = 1024
"""``popvault.attachment_errors`` is a keyword field with ``ignore_above: 1024``."""
BINARY_SNIFF_BYTES = 8192
"""Leading bytes of a "text" attachment searched for NUL: a NUL means it is not text."""
PDF_MAGIC_WINDOW = 1024
"""PDF readers accept ``%PDF-`` anywhere in the first KiB (leading junk is common)."""

logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns per malformed object


class TextKind(StrEnum):
    PDF = "pdf"
    DOCX = "docx"
    XLSX = "xlsx"
    ODT = "odt"
    HTML = "html"
    TEXT = "text"


_BY_EXTENSION = {
    "pdf": TextKind.PDF,
    "docx": TextKind.DOCX, "docm": TextKind.DOCX,
    "xlsx": TextKind.XLSX, "xlsm": TextKind.XLSX,
    "odt": TextKind.ODT,
    "htm": TextKind.HTML, "html": TextKind.HTML,
    "txt": TextKind.TEXT, "text": TextKind.TEXT, "csv": TextKind.TEXT, "tsv": TextKind.TEXT,
    "md": TextKind.TEXT, "log": TextKind.TEXT, "json": TextKind.TEXT, "xml": TextKind.TEXT,
}
_BY_MIME = {
    "application/pdf": TextKind.PDF,
    "application/x-pdf": TextKind.PDF,
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": TextKind.DOCX,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": TextKind.XLSX,
    "application/vnd.ms-excel.sheet.macroenabled.12": TextKind.XLSX,
    "application/vnd.oasis.opendocument.text": TextKind.ODT,
    "text/html": TextKind.HTML,
    "application/xhtml+xml": TextKind.HTML,
    "text/plain": TextKind.TEXT,
    "text/csv": TextKind.TEXT,
    "text/markdown": TextKind.TEXT,
    "text/tab-separated-values": TextKind.TEXT,
    "application/json": TextKind.TEXT,
}


class AttachmentTextError(Exception):
    """An attachment whose text cannot be read for a reason of ours (size, type, budget)."""


class _Skip(AttachmentTextError):
    pass


def text_kind(name: str | None, mime_type: str, data: bytes) -> TextKind | None:
    """Which extractor reads this attachment, or None when it holds no text we read.

    The file name's extension wins over the MIME type (mailers send PDFs as
    ``application/octet-stream``), then the type; PDF magic bytes catch unnamed PDFs.
    """
    if name and "." in name:
        kind = _BY_EXTENSION.get(name.rsplit(".", 1)[1].lower())
        if kind is not None:
            return kind
    kind = _BY_MIME.get(mime_type.lower())
    if kind is not None:
        return kind
    if b"%PDF-" in data[:PDF_MAGIC_WINDOW]:
        return TextKind.PDF
    return None


@dataclass
class _Budget:
    """A wall-clock deadline checked between chunks; ``time.monotonic`` is injected for tests."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)


@dataclass
class AttachmentTexts:
    """Collects text and errors for one message; feed it with :meth:`add`, read the fields.

    Args:
        max_attachment_bytes, max_chars_per_attachment, max_chars_per_message: the caps.
        attachment_budget_s, message_budget_s: soft time limits.
        clock: time source (tests pass a fake one).
    """

    max_attachment_bytes: int = MAX_ATTACHMENT_BYTES
    max_chars_per_attachment: int = MAX_CHARS_PER_ATTACHMENT
    max_chars_per_message: int = MAX_CHARS_PER_MESSAGE
    attachment_budget_s: float = ATTACHMENT_BUDGET_S
    message_budget_s: float = MESSAGE_BUDGET_S
    clock: Callable[[], float] = time.monotonic
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    chars: int = 0
    _message_budget: _Budget | None = None

    def add(
        self, name: str | None, mime_type: str, data: bytes, charset: str | None = None
    ) -> None:
        """Extract the text of one attachment (if it is of a kind we read); never raises."""
        kind = text_kind(name, mime_type, data)
        if kind is None:
            return
        label = name or f"unnamed {mime_type}"
        if self._message_budget is None:
            self._message_budget = _Budget(self.message_budget_s, self.clock)
        if len(data) > self.max_attachment_bytes:
            self._error(label, f"TooLarge ({len(data)} bytes > {self.max_attachment_bytes})")
            return
        room = min(self.max_chars_per_attachment, self.max_chars_per_message - self.chars)
        if room <= 0:
            self._error(label, "MessageTextLimit")
            return
        if self._message_budget.left() <= 0:
            self._error(label, "MessageTimeBudget")
            return
        budget = _Budget(min(self.attachment_budget_s, self._message_budget.left()), self.clock)
        parts: list[str] = []
        used = 0
        try:
            for chunk in _EXTRACTORS[kind](data, charset):
                chunk = _clean(chunk).strip()
                if not chunk:
                    continue
                if used + len(chunk) + 1 > room:
                    parts.append(chunk[: max(0, room - used)])
                    used = room
                    self._error(label, "Truncated")
                    break
                parts.append(chunk)
                used += len(chunk) + 1
                if budget.left() <= 0:
                    self._error(label, "TimeBudget")
                    break
        except _Skip as exc:
            self._error(label, str(exc))
        except Exception as exc:  # hostile bytes, deep nesting (RecursionError): flag, go on
            self._error(label, type(exc).__name__)
        text = "\n".join(p for p in parts if p)
        if text:
            self.texts.append(text)
            self.chars += len(text) + 2

    @property
    def text(self) -> str:
        """``popvault.attachment_text``: every attachment's text, blank-line separated."""
        return "\n\n".join(self.texts)[: self.max_chars_per_message]

    def _error(self, label: str, reason: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            entry = f"{label[:300]}: {reason}"[:MAX_ERROR_CHARS]
            if entry not in self.errors:
                self.errors.append(entry)


def _clean(text: str) -> str:
    """No lone surrogates or NULs (JSON, Lucene and SQLite reject them)."""
    if text.isascii() and "\0" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\0", " ")


# -- extractors ----------------------------------------------------------------------------


def _pdf(data: bytes, _charset: str | None) -> Iterator[str]:
    if b"%PDF-" not in data[:PDF_MAGIC_WINDOW]:
        raise _Skip("NotPdf")
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        try:
            reader.decrypt("")  # many "encrypted" PDFs only restrict printing
        except Exception as exc:
            raise _Skip("Encrypted") from exc
    pages = reader.pages
    count = len(pages)
    for index in range(min(count, MAX_PDF_PAGES)):
        yield pages[index].extract_text() or ""
    if count > MAX_PDF_PAGES:
        raise _Skip(f"PageLimit ({count} pages > {MAX_PDF_PAGES})")


def _check_zip(data: bytes) -> None:
    """Refuse zip bombs before a library inflates anything."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise _Skip("BadZipFile") from exc
    if len(infos) > MAX_ZIP_ENTRIES:
        raise _Skip(f"ZipBomb ({len(infos)} entries)")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_UNZIPPED_BYTES:
        raise _Skip(f"ZipBomb ({declared} bytes uncompressed)")


def _docx(data: bytes, _charset: str | None) -> Iterator[str]:
    _check_zip(data)
    import docx

    document = docx.Document(io.BytesIO(data))
    for paragraph in document.paragraphs:
        yield paragraph.text
    for table in document.tables:
        for row in table.rows:
            yield "\t".join(cell.text for cell in row.cells)


def _xlsx(data: bytes, _charset: str | None) -> Iterator[str]:
    _check_zip(data)
    import openpyxl

    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        for sheet in workbook.worksheets:
            yield sheet.title
            for row in sheet.iter_rows(values_only=True):
                cells = [str(value) for value in row if value is not None]
                if cells:
                    yield "\t".join(cells)
    finally:
        workbook.close()


def _odt(data: bytes, _charset: str | None) -> Iterator[str]:
    _check_zip(data)
    from odf import teletype
    from odf.namespaces import TEXTNS
    from odf.opendocument import load

    document = load(io.BytesIO(data))
    wanted = {(TEXTNS, "p"), (TEXTNS, "h")}  # paragraphs and headings
    stack = [document.text]
    while stack:  # depth-first, document order, no recursion (nesting can be deep)
        node = stack.pop()
        if getattr(node, "qname", None) in wanted:
            yield teletype.extractText(node)
            continue
        stack.extend(reversed(getattr(node, "childNodes", [])))


def _decode(data: bytes, charset: str | None) -> str:
    if charset:
        try:
            return data.decode(charset, "replace")
        except LookupError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _html(data: bytes, charset: str | None) -> Iterator[str]:
    from ingest.htmltext import html_to_text

    yield html_to_text(_decode(data, charset))


def _text(data: bytes, charset: str | None) -> Iterator[str]:
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _Skip("Binary")
    text = _decode(data, charset)
    if text.count("\ufffd") > len(text) // 20 + 10:  # undeclared binary, not text
        raise _Skip("Binary")
    yield text.replace("\r\n", "\n")


_EXTRACTORS: dict[TextKind, Callable[[bytes, str | None], Iterator[str]]] = {
    TextKind.PDF: _pdf,
    TextKind.DOCX: _docx,
    TextKind.XLSX: _xlsx,
    TextKind.ODT: _odt,
    TextKind.HTML: _html,
    TextKind.TEXT: _text,
}
