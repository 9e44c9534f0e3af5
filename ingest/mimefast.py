"""Make large base64 parts cheap for the stdlib MIME parser, without changing what it decodes.

mail-parser uses ``email``'s feed parser, which walks a message line by line: a 5 MB
attachment is 70,000 lines of 76 characters and most of the parse time. Base64 decoding
ignores line breaks, so joining a base64 body into one line gives the parser the same
payload in one step. Only the parser's input changes; the archive keeps the bytes as served.

A region is joined only if its part declares ``Content-Transfer-Encoding: base64`` and the
whole body up to the next boundary line consists of base64 characters and line breaks.
"""

from __future__ import annotations

MIN_JOIN_BYTES = 16 * 1024
"""Smaller bodies parse quickly anyway; joining them is not worth the scan."""

_CTE_HEADER = b"content-transfer-encoding:"
_BASE64_AND_BREAKS = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
                      b"\r\n")


def _body_start(raw: bytes, header_pos: int) -> int:
    """Index just after the blank line that ends the header block containing header_pos."""
    crlf = raw.find(b"\r\n\r\n", header_pos)
    lf = raw.find(b"\n\n", header_pos)
    if crlf != -1 and (lf == -1 or crlf <= lf):
        return crlf + 4
    return -1 if lf == -1 else lf + 2


def _base64_headers(raw: bytes) -> list[int]:
    """Offsets of ``Content-Transfer-Encoding: base64`` header lines (any case), by find()."""
    low = raw.lower()
    found: list[int] = []
    i = low.find(_CTE_HEADER)
    while i != -1:
        line_end = low.find(b"\n", i)
        value = low[i + len(_CTE_HEADER):line_end if line_end != -1 else len(low)]
        if (i == 0 or low[i - 1] == 0x0A) and value.strip() == b"base64":
            found.append(i)
        i = low.find(_CTE_HEADER, i + len(_CTE_HEADER))
    return found


def join_base64_bodies(raw: bytes) -> bytes:
    """Return ``raw`` with each large, pure base64 part body joined into a single line."""
    if len(raw) < MIN_JOIN_BYTES:
        return raw
    out: list[bytes] = []
    pos = 0
    for header in _base64_headers(raw):
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
        joined = body.replace(b"\r", b"").replace(b"\n", b"")
        out += [raw[pos:start], joined, b"\r" if body.endswith(b"\r") else b""]
        pos = end
    if not out:
        return raw
    out.append(raw[pos:])
    return b"".join(out)
