"""Local mail collections as streams of raw messages: mbox files, Maildir folders, ``.eml``
directories (readers), and the matching writers for a later ``export``.

Readers yield :class:`SourceMessage` — the message's bytes exactly as stored (for mbox: after
removing the envelope line and undoing ``>From `` quoting), where they came from (file and byte
offset), or an error for an entry that is not a message. A bad entry never stops the stream.

**mbox variants handled.** Read as *mboxrd*: a message starts at a line beginning ``From `` (the
*envelope line*, which is not part of the message) that is the first line of the file or follows
an empty line; the empty line before it is the writer's separator and is dropped too. Inside a
message, a line matching ``>+From `` loses one ``>`` (mboxrd unquoting). Consequences for the
other variants:

* *mboxo* (writers quote ``From `` as ``>From `` but leave ``>From `` alone) reads correctly,
  except that a body line that really began with ``>From `` comes back as ``From `` — mboxo
  cannot represent that line, no reader can recover it.
* *mboxcl/mboxcl2* (``Content-Length:`` framing, no quoting) are read by the ``From `` rule;
  ``Content-Length`` is ignored, so an unquoted ``From `` line right after an empty line in a body
  splits that message (the second half is then reported as an entry without a header block).

Line endings may be LF or CRLF (mixed is fine): they are kept as they are in the file.

**Damage handled** (each reported with the file and the byte offset, then reading goes on):
an entry without a header block (binary junk, an empty entry); a run of NUL bytes at a line
start (what a crash leaves in a pre-allocated file) — everything up to the next ``From `` line
is reported as one damaged region; text before the first ``From `` line; a last message cut
mid-line (no final line ending). A message cut exactly at a line end cannot be told from a
complete one.

The mbox reader streams: it holds one message at a time, never the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

READ_BUFFER_BYTES = 1024 * 1024
"""Buffered-reader size for mbox files: few system calls on multi-GB files."""
LINE_LIMIT_BYTES = 1024 * 1024
"""Longest piece read as one line; longer lines are read in pieces (a piece that does not start
a line can never be a separator), so a file without newlines cannot exhaust memory."""
NUL_RUN_MIN_BYTES = 16
"""A line starting with at least this many NUL bytes marks a damaged region (a few NULs can be
legitimate in 8-bit mail; a block of them is a filesystem hole or a crash)."""
ENVELOPE_PREFIX = b"From "
EML_SUFFIXES = (".eml",)
MAILDIR_SUBDIRS = ("new", "cur")
"""Maildir folders whose files are messages (``tmp`` holds deliveries in progress)."""

_HEADER_FIELD_RE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
"""An RFC 5322 header field name and colon (a few writers put spaces before the colon)."""
_QUOTED_FROM_RE = re.compile(rb"^>+From ")


class SourceKind(StrEnum):
    """The shapes of local mail collections ``import`` understands."""

    MBOX = "mbox"
    MAILDIR = "maildir"
    EML_DIR = "eml_dir"


class NotAMailSource(ValueError):
    """Raised by :func:`detect_source` when a path is none of the shapes, saying why."""


@dataclass(frozen=True)
class SourceRef:
    """Where a message (or a damaged entry) is: a file, and for mbox the byte offset of its
    envelope line (0 for one-message files)."""

    path: Path
    offset: int = 0

    def __str__(self) -> str:
        return f"{self.path} @ byte {self.offset}"


@dataclass(frozen=True)
class SourceMessage:
    """One entry of a source: ``raw`` bytes to archive, or ``error`` (then ``raw`` is empty).

    ``end`` is the offset just past this entry in the source (for a directory: bytes of all
    files read so far), for progress by bytes.
    """

    ref: SourceRef
    raw: bytes
    error: str | None = None
    end: int = 0


def looks_like_message(raw: bytes) -> bool:
    """True when ``raw`` starts with a header field: the least a message must have.

    Deliberately lenient (broken headers after the first line are the parser's problem and the
    archive keeps them); what it rejects is junk that would otherwise be archived as mail.
    """
    return bool(_HEADER_FIELD_RE.match(raw[:1000]))


# -- detection ----------------------------------------------------------------------------------


def detect_source(path: Path) -> SourceKind:
    """The shape of ``path``; raises :class:`NotAMailSource` naming it and what was expected."""
    if path.is_file():
        try:
            with path.open("rb") as fh:
                head = fh.read(len(ENVELOPE_PREFIX))
        except OSError as exc:
            raise NotAMailSource(f"{path}: cannot be read ({exc.strerror})") from None
        if head == ENVELOPE_PREFIX:
            return SourceKind.MBOX
        if path.suffix.lower() in EML_SUFFIXES:
            raise NotAMailSource(f"{path}: a single .eml file; import its directory instead")
        raise NotAMailSource(f"{path}: not an mbox file (it does not start with 'From ')")
    if path.is_dir():
        if all((path / sub).is_dir() for sub in MAILDIR_SUBDIRS):
            return SourceKind.MAILDIR
        if any(_eml_files(path)):
            return SourceKind.EML_DIR
        raise NotAMailSource(f"{path}: a directory that is neither a Maildir (cur/ and new/) "
                             "nor holds .eml files")
    if not path.exists():
        raise NotAMailSource(f"{path}: no such file or directory")
    raise NotAMailSource(f"{path}: neither a file nor a directory")


def iter_source(path: Path, kind: SourceKind | None = None) -> Iterator[SourceMessage]:
    """Messages of any supported source (detected when ``kind`` is None)."""
    kind = kind or detect_source(path)
    if kind is SourceKind.MBOX:
        return iter_mbox(path)
    if kind is SourceKind.MAILDIR:
        return iter_maildir(path)
    return iter_eml_dir(path)


def source_files(path: Path, kind: SourceKind) -> list[Path]:
    """The files a source reads, in reading order (their sizes drive progress)."""
    if kind is SourceKind.MBOX:
        return [path]
    if kind is SourceKind.MAILDIR:
        return _maildir_files(path)
    return list(_eml_files(path))


# -- mbox ---------------------------------------------------------------------------------------


class _MboxReader:
    """The state machine behind :func:`iter_mbox` (see the module docstring for the rules)."""

    def __init__(self, path: Path, fh: BinaryIO) -> None:
        self.path = path
        self.fh = fh
        self.offset = 0  # file offset of the next byte to read
        self.entry_offset: int | None = None  # envelope line of the message being collected
        self.lines: list[bytes] = []
        self.garbage_offset: int | None = None  # start of a damaged region being skipped
        self.garbage_bytes = 0
        self.garbage_why = ""

    def __iter__(self) -> Iterator[SourceMessage]:
        prev_blank = True  # the file start counts as "after an empty line"
        at_line_start = True
        while True:
            piece = self.fh.readline(LINE_LIMIT_BYTES)
            if not piece:
                break
            start = self.offset
            self.offset += len(piece)
            if at_line_start and piece.startswith(b"\0" * NUL_RUN_MIN_BYTES):
                yield from self._finish_entry(at_eof=False)
                stripped = piece.lstrip(b"\0")
                self._garbage(start, len(piece) - len(stripped), "a run of NUL bytes")
                start += len(piece) - len(stripped)
                piece = stripped
                if not piece:  # a line of NULs without a line end: next piece starts fresh
                    continue
            if at_line_start and piece.startswith(ENVELOPE_PREFIX) and (
                    prev_blank or self.garbage_offset is not None):
                yield from self._finish_entry(at_eof=False)
                yield from self._finish_garbage()
                self.entry_offset = start
                self.lines = []
            elif self.garbage_offset is not None:
                self.garbage_bytes += len(piece)
            elif self.entry_offset is None:
                if piece.strip():  # text before the first envelope line
                    self._garbage(start, len(piece), "data that is not after a 'From ' line")
            elif at_line_start and _QUOTED_FROM_RE.match(piece):
                self.lines.append(piece[1:])  # mboxrd: one '>' fewer
            else:
                self.lines.append(piece)
            at_line_start = piece.endswith(b"\n")
            prev_blank = at_line_start and piece in (b"\n", b"\r\n")
        yield from self._finish_entry(at_eof=True)
        yield from self._finish_garbage()

    def _garbage(self, start: int, size: int, why: str) -> None:
        if self.garbage_offset is None:
            self.garbage_offset, self.garbage_bytes, self.garbage_why = start, 0, why
        self.garbage_bytes += size

    def _finish_garbage(self) -> Iterator[SourceMessage]:
        if self.garbage_offset is None:
            return
        ref = SourceRef(self.path, self.garbage_offset)
        text = (f"damaged region of {self.garbage_bytes} bytes starting with "
                f"{self.garbage_why}; skipped up to the next 'From ' line")
        self.garbage_offset = None
        yield SourceMessage(ref, b"", text, end=self.offset)

    def _finish_entry(self, *, at_eof: bool) -> Iterator[SourceMessage]:
        if self.entry_offset is None:
            return
        ref = SourceRef(self.path, self.entry_offset)
        lines, self.lines, self.entry_offset = self.lines, [], None
        end = self.offset
        if at_eof and lines and not lines[-1].endswith(b"\n"):
            yield SourceMessage(ref, b"", "truncated message: the file ends in the middle of "
                                "a line (an interrupted copy?); not imported", end=end)
            return
        if len(lines) >= 2 and lines[-1] in (b"\n", b"\r\n") and lines[-2].endswith(b"\n"):
            lines.pop()  # the writer's empty separator line
        elif len(lines) == 1 and lines[0] in (b"\n", b"\r\n"):
            lines.pop()
        raw = b"".join(lines)
        if not raw:
            yield SourceMessage(ref, b"", "empty entry: a 'From ' line with no message",
                                end=end)
        elif not looks_like_message(raw):
            yield SourceMessage(ref, b"", "not a message: the entry does not start with a "
                                "header block", end=end)
        else:
            yield SourceMessage(ref, raw, end=end)


def iter_mbox(path: Path) -> Iterator[SourceMessage]:
    """Stream the messages of an mbox file (see the module docstring for the rules).

    Raises OSError only if the file cannot be opened; damage inside it becomes error entries.
    """
    with path.open("rb", buffering=READ_BUFFER_BYTES) as fh:
        yield from _MboxReader(path, fh)


# -- Maildir and .eml directories ----------------------------------------------------------------


def _maildir_files(path: Path) -> list[Path]:
    """Files of ``new/`` then ``cur/``, sorted by name (Maildir names start with the delivery
    time, so this is roughly delivery order); dot files are skipped, as Maildir readers do."""
    files: list[Path] = []
    for sub in MAILDIR_SUBDIRS:
        folder = path / sub
        files += sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return files


def _eml_files(path: Path) -> Iterator[Path]:
    """``*.eml`` files under ``path`` (recursively), sorted for a stable order."""
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(EML_SUFFIXES):
                yield Path(root) / name


def _read_files(files: list[Path]) -> Iterator[SourceMessage]:
    """One message per file; ``end`` counts bytes over all files (progress of the source)."""
    done = 0
    for file in files:
        ref = SourceRef(file, 0)
        try:
            raw = file.read_bytes()
        except OSError as exc:
            yield SourceMessage(ref, b"", f"cannot be read: {exc.strerror}", end=done)
            continue
        done += len(raw)
        if not raw:
            yield SourceMessage(ref, b"", "empty file", end=done)
        elif not looks_like_message(raw):
            yield SourceMessage(ref, b"", "not a message: the file does not start with a "
                                "header block", end=done)
        else:
            yield SourceMessage(ref, raw, end=done)


def iter_maildir(path: Path) -> Iterator[SourceMessage]:
    """Messages of a Maildir folder (``new/`` and ``cur/``; sub-folders are separate sources).

    A Maildir file is the message as delivered, so its bytes are archived unchanged.
    """
    return _read_files(_maildir_files(path))


def iter_eml_dir(path: Path) -> Iterator[SourceMessage]:
    """Messages of a directory of ``.eml`` files (searched recursively), bytes unchanged."""
    return _read_files(list(_eml_files(path)))


# -- writers (for export, and for building test sources) ------------------------------------------


def mboxrd_quote(raw: bytes) -> bytes:
    """The message as an mboxrd body: every line matching ``>*From `` gains one '>'."""
    return re.sub(rb"(?m)^(>*From )", rb">\1", raw)


def mbox_entry(raw: bytes, *, sender: str = "MAILER-DAEMON",
               date: str = "Thu Jan  1 00:00:00 1970", newline: bytes = b"\n") -> bytes:
    """One mboxrd entry: envelope line, quoted message, a final line end if missing, then the
    empty separator line. :func:`iter_mbox` gives back ``raw`` exactly when it ends with a line
    end (an mbox cannot store a message without one)."""
    body = mboxrd_quote(raw)
    if not body.endswith(b"\n"):
        body += newline
    return b"From " + sender.encode() + b" " + date.encode() + newline + body + newline
