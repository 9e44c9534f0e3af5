"""Make large base64 parts cheap for the stdlib MIME parser, without changing what it decodes.

mail-parser uses ``email``'s feed parser, which walks a message line by line: a 5 MB
attachment is 70,000 lines of 76 characters and most of the parse time. Base64 decoding
ignores line breaks, so joining a base64 body into one line gives the parser the same
payload in one step. Only the parser's input changes; the archive keeps the bytes as served.

A region is joined only if its part declares ``Content-Transfer-Encoding: base64`` and the
whole body up to the next boundary line consists of base64 characters and line breaks.

:func:`parser_input` goes one step further for parts that are plainly files (a type that is
not text, message or multipart, and no ``plain``/``html`` subtype, which mail-parser would read
as body text): the parser gets a short placeholder instead of the body, and
:meth:`ParserInput.restore` puts the body back into the parsed tree before anything reads it.
The feed parser's cost grows with every byte it is given (a regular expression scans each
part's whole payload), so a file it never sees costs it nothing. A spared body is also decoded
here, with SIMD base64 (:func:`decode_pure_base64`), when that is sure to give the stdlib's
bytes: :meth:`ParserInput.decoded_payload` hands them to the attachment code.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from email.message import Message

import pybase64

MIN_JOIN_BYTES = 16 * 1024
"""Smaller bodies parse quickly anyway; joining them is not worth the scan."""

_CTE_HEADER = b"content-transfer-encoding:"
_BASE64_AND_BREAKS = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
                      b"\r\n")


def _body_start(raw: bytes, header_pos: int) -> int:
    """Index just after the blank line that ends the header block containing header_pos."""
    crlf = raw.find(b"\r\n\r\n", header_pos)
    # Only an earlier bare-LF blank line can win: never scan the body for one.
    lf = raw.find(b"\n\n", header_pos, len(raw) if crlf == -1 else crlf)
    if crlf != -1 and (lf == -1 or crlf <= lf):
        return crlf + 4
    return -1 if lf == -1 else lf + 2


def _base64_headers(low: bytes) -> list[int]:
    """Offsets of ``Content-Transfer-Encoding: base64`` header lines in lower-cased ``low``."""
    found: list[int] = []
    i = low.find(_CTE_HEADER)
    while i != -1:
        line_end = low.find(b"\n", i)
        value = low[i + len(_CTE_HEADER):line_end if line_end != -1 else len(low)]
        if (i == 0 or low[i - 1] == 0x0A) and value.strip() == b"base64":
            found.append(i)
        i = low.find(_CTE_HEADER, i + len(_CTE_HEADER))
    return found


_CONTENT_TYPE = re.compile(rb"(?:^|\n)content-type:[ \t]*([a-z0-9!#$&^_.+-]+)/([a-z0-9!#$&^_.+-]+)")
_NOT_FILES = (b"message", b"multipart")
_FILE_FIELDS = re.compile(rb"(?:^|\n)(content-type|content-disposition|content-id):"
                          rb"((?:[^\n]*)(?:\n[ \t][^\n]*)*)")
"""The part header fields that make mail-parser file a part as an attachment (with their
folded continuation lines)."""
_NAME_PARAM = re.compile(rb';\s*(?:file)?name\*?(?:\d+\*?)?\s*=\s*"?[^"\s;]')
"""A non-empty ``name``/``filename`` parameter, RFC 2231 forms included."""


def _is_file_part(low: bytes, header: int, body_start: int) -> bool:
    """Does the header block around ``header`` (lower-cased bytes) make the part a file that
    mail-parser files as an attachment and never reads as body text?

    Its type must not be message or multipart, nor have a ``plain``/``html`` subtype (those
    are body text), and mail-parser must see it as an attachment: a file name, an
    ``attachment`` disposition, or a Content-ID. Anything else keeps its body in the parse.
    """
    block_start = low.rfind(b"\n--", 0, header) + 1
    match = _CONTENT_TYPE.search(low, block_start, body_start)
    if match is None:  # no Content-Type: text/plain (or message/rfc822 in a digest)
        return False
    main, sub = match.group(1), match.group(2)
    if main in _NOT_FILES or sub in (b"plain", b"html"):
        return False
    for found in _FILE_FIELDS.finditer(low, block_start, body_start):
        name, value = found.group(1), found.group(2)
        if name == b"content-id" and value.strip():
            return True
        if name == b"content-disposition" and value.strip().startswith(b"attachment"):
            return True
        if _NAME_PARAM.search(value):
            return True
    return False


def decode_pure_base64(body: bytes) -> bytes | None:
    """``body`` (base64 characters and line breaks only) decoded exactly as the stdlib's
    ``get_payload(decode=True)`` would, or None when that is not certain.

    The stdlib joins the lines and decodes strictly; for a body that is whole quantums of four
    characters with at most two ``=``, all at the end, lenient decoding that skips line breaks
    gives the same bytes, and pybase64 does that several times faster than binascii. Anything
    else (missing, extra or inner padding) is left to the stdlib and its defects.
    """
    padding = 0
    first = body.find(b"=")
    if first != -1:
        tail = body[first:]
        padding = tail.count(b"=")
        if padding > 2 or tail.strip(b"=\r\n"):
            return None
    try:
        decoded = pybase64.b64decode(body, validate=False)
    except ValueError:  # binascii.Error: the data length cannot be valid base64
        return None
    # The decoded length gives the data characters modulo 4 (0, 2 or 3 for remainder 0, 1,
    # 2 of the length by 3); with the padding they must make whole quantums.
    return decoded if _PADDING_FOR_REMAINDER[len(decoded) % 3] == padding else None


_PADDING_FOR_REMAINDER = (0, 2, 1)


@dataclass
class ParserInput:
    """What the parser is given, and the bodies it was spared (placeholder -> base64 body)."""

    data: bytes
    lifted: dict[str, bytes] = field(default_factory=dict)
    _decoded: dict[int, tuple[Message, bytes]] = field(default_factory=dict, repr=False)

    def restore(self, message: Message) -> None:
        """Put each spared body back into the parsed tree, and keep its decoded bytes."""
        if not self.lifted:
            return
        for part in message.walk():
            payload = part.get_payload() if not part.is_multipart() else None
            if isinstance(payload, str):
                original = self.lifted.pop(payload.strip(), None)
                if original is not None:
                    part.set_payload(original.decode("ascii"))
                    decoded = decode_pure_base64(original)
                    if decoded is not None:
                        self._decoded[id(part)] = (part, decoded)

    def decoded_payload(self, part: Message) -> bytes | None:
        """The decoded body of a restored part (what ``get_payload(decode=True)`` returns),
        or None for any other part."""
        entry = self._decoded.get(id(part))
        return entry[1] if entry is not None and entry[0] is part else None


def _placeholder(number: int) -> bytes:
    """Valid base64 (a parser that decodes it finds no defect), unlike any real body."""
    return base64.b64encode(f"popvault-spared-part-{number:06d}".encode())


def parser_input(raw: bytes, *, spare_files: bool = True) -> ParserInput:
    """``raw`` with each large, pure base64 part body joined into a single line, or (file
    parts, with ``spare_files``) replaced by a placeholder that :meth:`ParserInput.restore`
    swaps back."""
    if len(raw) < MIN_JOIN_BYTES:
        return ParserInput(raw)
    out: list[bytes] = []
    lifted: dict[str, bytes] = {}
    pos = 0
    low = raw.lower()
    for header in _base64_headers(low):
        if header < pos:
            continue
        start = _body_start(raw, header)
        if start == -1:
            break
        end = raw.find(b"\n--", start)
        if end == -1:
            end = len(raw)
        body = raw[start:end]
        if len(body) < MIN_JOIN_BYTES or body.translate(None, _BASE64_AND_BREAKS):
            continue  # small, or not only base64: leave it exactly as it is
        if spare_files and _is_file_part(low, header, start):
            token = _placeholder(len(lifted))
            # The parser would end the payload before the CRLF that precedes the boundary.
            lifted[token.decode("ascii")] = body[:-1] if body.endswith(b"\r") else body
            joined = token
        else:
            joined = body.replace(b"\r", b"").replace(b"\n", b"")
        out += [raw[pos:start], joined, b"\r" if body.endswith(b"\r") else b""]
        pos = end
    if not out:
        return ParserInput(raw)
    out.append(raw[pos:])
    return ParserInput(b"".join(out), lifted)

