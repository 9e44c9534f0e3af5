"""Raw message bytes to the indexed document; every message yields a document, whatever it holds.

mail-parser does the MIME work (bodies, charsets, defects). Everything taken from headers
(addresses, dates, subject, the header map) is computed here from the parsed
``email.message.Message``, so the same code serves the full parse, the headers-only document
of an oversize message and the fallback document when parsing fails or times out.

Field names follow ECS ``email.*`` where ECS defines them; popvault's own fields live under
``popvault.*``. ``schemas/document.schema.json`` is the contract; tests validate against it.

Enrichment, each behind its own module so it can be tuned alone: ``popvault.kind`` and friends
(:mod:`ingest.classify`, from headers, so fallback documents are classified too),
``popvault.reply_text`` (:mod:`ingest.replytext`) and ``popvault.attachment_text`` /
``attachment_errors`` (:mod:`ingest.attachtext`, full parse only: it needs the decoded parts).
"""

from __future__ import annotations

import email.header
import email.utils
import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from functools import cache
from typing import Any

from ingest import __version__
from ingest.attachtext import AttachmentTexts
from ingest.classify import DEFAULT_RULES, ClassifyRules, classify
from ingest.dedup import header_fields, header_text, normalize_message_id, split_message
from ingest.htmltext import html_to_text
from ingest.mimefast import parser_input
from ingest.replytext import reply_text

DEFAULT_MAX_BODY_CHARS = 1_000_000
MAX_HEADER_VALUE_BYTES = 8191
"""UTF-8 bytes per header value: fits ES ``ignore_above: 8191`` and Lucene's term limit."""
MAX_HEADER_NAMES = 200
MAX_HEADER_NAME_CHARS = 128
"""Longer names are dropped: a flattened key becomes part of every term it indexes."""
MAX_HEADER_REPEATS = 100
"""Values kept per repeated header (10,000 Received lines would bloat every document)."""
MAX_FALLBACK_HEADER_BYTES = 1024 * 1024
"""Header bytes read by the fallback path, which runs in the pool's parent and must be cheap."""
MAX_ATTACHMENTS = 1000
MAX_MIME_DEPTH = 50
MAX_ADDRESSES = 1000
MAX_THREAD_IDS = 200
MAX_DEFECTS = 100
MAX_SUBJECT_CHARS = 8191
MAX_ERROR_CHARS = 300
MIN_YEAR, END_YEAR = 1970, 2100
"""Dates outside [1970, 2100) are forged or broken; they would scatter mail over odd indices."""

PARSE_OK, PARSE_FAILED, PARSE_OVERSIZE, PARSE_TIMEOUT = "ok", "failed", "oversize", "timeout"
ADDRESS_FIELDS = (
    ("from", "from"),
    ("to", "to"),
    ("cc", "cc"),
    ("bcc", "bcc"),
    ("reply_to", "reply-to"),
    ("sender", "sender"),
)
"""(ECS field, header name) pairs."""

_FIELD_NAME = re.compile(rb"^[!-9;-~]{1,998}$")
"""RFC 5322 field name: printable US-ASCII except colon (so no spaces)."""
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n")
_ANGLE_TOKEN = re.compile(r"<[^<>]*>")
_EXTENSION = re.compile(r"\.([A-Za-z0-9]{1,16})$")


@cache
def _lean_parser() -> Any:
    """mail-parser's ``MailParser``, minus two costs whose results popvault never reads.

    - ``mail`` and ``mail_partial``: two summary dicts built at the end of every parse
      (popvault reads the tree, the text parts and the defects, not these).
    - Plain address lists (see :func:`plain_address_pairs`) skip the forensic address
      scanner that ``MailParser`` runs over every address header: same pairs, and no defect
      can come from them (a test holds both to that). Anything else still goes through it.
    """
    import mailparser
    import mailparser.core as core

    forensic = getattr(core, "get_addresses", None)
    if forensic is not None and not getattr(forensic, "popvault_fast_path", False):
        def get_addresses(raw_header: Any, *, defects: list[Any] | None = None,
                          decode_names: bool = False) -> list[tuple[str, str]]:
            if isinstance(raw_header, str):
                plain = plain_address_pairs(raw_header)
                if plain is not None:
                    return plain
            result: list[tuple[str, str]] = forensic(raw_header, defects=defects,
                                                     decode_names=decode_names)
            return result

        get_addresses.popvault_fast_path = True  # type: ignore[attr-defined]
        get_addresses.forensic = forensic  # type: ignore[attr-defined]
        core.get_addresses = get_addresses

    class LeanMailParser(mailparser.MailParser):
        def _make_mail(self, complete: bool = True) -> dict[str, Any]:
            return {}

    return LeanMailParser


@cache
def parser_version() -> str:
    """Installed mail-parser version, recorded so old documents can be re-parsed selectively."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mail-parser")
    except PackageNotFoundError:
        return "unknown"


def build_document(
    raw: bytes,
    *,
    raw_sha256: str,
    message_key: str,
    first_archived: str,
    max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
    headers_only: bool = False,
    classify_rules: ClassifyRules = DEFAULT_RULES,
) -> dict[str, Any]:
    """Parse ``raw`` into a document; on any parser error return the headers-only fallback.

    ``headers_only`` is for messages over ``max_message_bytes``: only the header block is read
    and the document is flagged ``oversize``. ``classify_rules`` override the kind patterns
    (a config's ``[support]`` table). Never raises for any input bytes.
    """
    ids = {"raw_sha256": raw_sha256, "message_key": message_key, "first_archived": first_archived}
    if headers_only:
        return fallback_document(
            raw, parse_status=PARSE_OVERSIZE, parse_error=None, classify_rules=classify_rules,
            **ids,
        )
    try:
        prepared = parser_input(raw)  # same payloads, faster (see ingest.mimefast)
        parsed = _lean_parser().from_bytes(prepared.data)
        message = parsed.message
        if message is None:
            raise ValueError("mail-parser returned no message")
        prepared.restore(message)
        headers = _header_message(split_message(raw)[0]) if _headers_cut_short(message) else message
        body = _body(parsed.text_plain, parsed.text_html, max_body_chars)
        attachments: list[dict[str, Any]] = []
        texts = AttachmentTexts()
        count = _collect_attachments(message, attachments, 0, texts, prepared.decoded_payload)
        defects = _mailparser_defects(parsed.defects)
        return _assemble(
            headers, raw, ids, body=body, attachments=attachments, attachment_count=count,
            defects=defects, parse_status=PARSE_OK, parse_error=None,
            tree=message, texts=texts, classify_rules=classify_rules,
        )
    except Exception as exc:  # any parser bug or hostile input: keep the message, flag it
        return fallback_document(
            raw, parse_status=PARSE_FAILED, parse_error=error_text(exc),
            classify_rules=classify_rules, **ids,
        )


def fallback_document(
    raw: bytes,
    *,
    raw_sha256: str,
    message_key: str,
    first_archived: str,
    parse_status: str,
    parse_error: str | None,
    classify_rules: ClassifyRules = DEFAULT_RULES,
) -> dict[str, Any]:
    """A document from the header block only, for oversize, failed and timed-out messages.

    Uses the stdlib header parser (``compat32``, the most lenient), then a plain byte scan if
    even that fails. Cheap and bounded, so the pool can run it in its parent process.
    """
    ids = {"raw_sha256": raw_sha256, "message_key": message_key, "first_archived": first_archived}
    header_block = split_message(raw)[0][:MAX_FALLBACK_HEADER_BYTES]
    message = _header_message(header_block)
    empty_body = ("", False, "none")
    try:
        return _assemble(
            message, raw, ids, body=empty_body, attachments=[], attachment_count=0,
            defects=[type(d).__name__ for d in message.defects][:MAX_DEFECTS],
            parse_status=parse_status, parse_error=parse_error, classify_rules=classify_rules,
        )
    except Exception as exc:
        error = f"{parse_error}; " if parse_error else ""
        return _assemble(
            Message(), raw, ids, body=empty_body, attachments=[], attachment_count=0,
            defects=[], parse_status=PARSE_FAILED if parse_status == PARSE_OK else parse_status,
            parse_error=(error + "headers unreadable: " + error_text(exc))[:MAX_ERROR_CHARS],
        )


def index_month(doc: dict[str, Any]) -> str | None:
    """``YYYY.MM`` of the message's own Date header, or None (the sink then uses ``-undated``).

    Only ``email.origination_timestamp`` is used, never ``@timestamp``: the Date header is part
    of the content fingerprint, so every copy with this message key has the same Date and the
    document always lands in the same monthly index. ``@timestamp`` may come from a Received
    line or the archive time, which differ between copies and would split one message over
    two indices.
    """
    stamp = doc.get("email", {}).get("origination_timestamp")
    if not isinstance(stamp, str) or len(stamp) < 7 or stamp[4] != "-":
        return None
    return f"{stamp[:4]}.{stamp[5:7]}"


def error_text(exc: BaseException) -> str:
    """A short, single-line reason for ``popvault.parse_error``."""
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return clean(text)[:MAX_ERROR_CHARS]


# -- assembly ------------------------------------------------------------------------------


def _assemble(
    message: Message,
    raw: bytes,
    ids: dict[str, str],
    *,
    body: tuple[str, bool, str],
    attachments: list[dict[str, Any]],
    attachment_count: int,
    defects: list[str],
    parse_status: str,
    parse_error: str | None,
    tree: Message | None = None,
    texts: AttachmentTexts | None = None,
    classify_rules: ClassifyRules = DEFAULT_RULES,
) -> dict[str, Any]:
    items = _raw_items(message)
    first = _first_values(items)
    date_value = parse_date(first.get("date"))
    received = first.get("received")
    delivery = parse_date(received.rpartition(";")[2]) if received and ";" in received else None

    mail: dict[str, Any] = {}
    if first.get("message-id"):
        mail["message_id"] = clean(decode_header_value(first["message-id"]).strip())
    if "subject" in first:
        mail["subject"] = clean(decode_header_value(first["subject"]))[:MAX_SUBJECT_CHARS]
    from_names: list[str] = []
    for field, header in ADDRESS_FIELDS:
        values = [value for name, value in items if name == header]
        addresses, names = parse_addresses(values)
        if addresses:
            mail[field] = {"address": addresses}
        if field == "from":
            from_names = names
    if date_value:
        mail["origination_timestamp"] = date_value
    if delivery:
        mail["delivery_timestamp"] = delivery
    mail["content_type"] = _content_type(message)
    mailer = first.get("x-mailer") or first.get("user-agent")
    if mailer:
        mail["x_mailer"] = _cap_bytes(clean(decode_header_value(mailer)), MAX_HEADER_VALUE_BYTES)
    if attachments:
        mail["attachments"] = attachments

    body_text, truncated, source = body
    headers = header_map(items)
    kind = classify(headers, tree, body_text=body_text, rules=classify_rules)
    popvault: dict[str, Any] = {
        "message_key": ids["message_key"],
        "raw_sha256": ids["raw_sha256"],
        "raw_size": len(raw),
        "first_archived": ids["first_archived"],
        "from_name": from_names,
        "body_text": body_text,
        "body_truncated": truncated,
        "body_source": source,
        "reply_text": reply_text(body_text),
        "thread": {
            "in_reply_to": _thread_ids(first.get("in-reply-to")),
            "references": _thread_ids(first.get("references")),
        },
        "message_id_normalized": normalize_message_id(mail.get("message_id")),
        "headers": headers,
        "defects": defects,
        "parse_status": parse_status,
        "has_attachments": attachment_count > 0,
        "attachment_count": attachment_count,
        "parser": {"name": "mail-parser", "version": parser_version()},
        "popvault_version": __version__,
        "date_header_valid": date_value is not None,
        **kind.fields(),
    }
    if texts is not None:
        if texts.texts:
            popvault["attachment_text"] = texts.text
        if texts.errors:
            popvault["attachment_errors"] = list(texts.errors)
    if parse_status != PARSE_OK:
        popvault["parse_error"] = parse_error or parse_status
    if parse_status == PARSE_OVERSIZE:
        popvault["oversize"] = True
    return {
        "@timestamp": date_value or delivery or ids["first_archived"],
        "email": mail,
        "popvault": popvault,
    }


def _raw_items(message: Message) -> list[tuple[str, str]]:
    """``(lowercase name, raw value)`` in order; raw values may hold surrogate-escaped bytes."""
    items: list[tuple[str, str]] = []
    for name, value in message.raw_items():
        if isinstance(name, str) and isinstance(value, str):
            items.append((name.strip().lower(), value))
    return items


def _first_values(items: list[tuple[str, str]]) -> dict[str, str]:
    first: dict[str, str] = {}
    for name, value in items:
        first.setdefault(name, value)
    return first


def _header_message(header_block: bytes) -> Message:
    """Parse a header block leniently; fall back to a byte scan if the stdlib gives up."""
    try:
        message = BytesHeaderParser(policy=compat32).parsebytes(header_block + b"\n\n")
    except Exception:
        return _scanned_headers(header_block)
    return _scanned_headers(header_block) if _headers_cut_short(message) else message


def _headers_cut_short(message: Message) -> bool:
    """True when the stdlib stopped reading headers at a line that is not a header.

    It then treats every later header (Date, Subject, From...) as body text. The byte scan
    skips the bad line instead and keeps the rest.
    """
    return any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in message.defects)


def _scanned_headers(header_block: bytes) -> Message:
    """Headers by plain byte scan: every ``name: value`` line with a valid field name."""
    message = Message()
    for name, value in header_fields(header_block):
        if _FIELD_NAME.match(name):
            message[name.decode("ascii")] = header_text(value).strip()
    message.defects.append(MissingHeaderBodySeparatorDefect())
    return message


def _content_type(message: Message) -> str:
    try:
        return clean(message.get_content_type())[:255]
    except Exception:
        return "text/plain"


# -- text ----------------------------------------------------------------------------------


def clean(text: str) -> str:
    """Make text safe for JSON and Lucene: no lone surrogates, no NULs."""
    if text.isascii() and "\0" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\0", "\ufffd")


def _unescape_bytes(value: str) -> str:
    """Undo the parser's surrogateescape: 8-bit header bytes as UTF-8, else Latin-1."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return clean(value)
    return header_text(data)


def decode_header_value(value: str) -> str:
    """Decode RFC 2047 encoded-words in any charset Python knows; unknown ones as UTF-8.

    Never raises: a value that cannot be decoded is returned as it came.
    """
    text = _FOLD.sub("", _unescape_bytes(value))
    if "=?" not in text:
        return clean(text)
    try:
        chunks = email.header.decode_header(text)
    except Exception:
        return clean(text)
    out: list[str] = []
    for data, charset in chunks:
        if isinstance(data, str):
            out.append(data)
            continue
        try:
            out.append(data.decode(charset or "ascii"))
        except (LookupError, UnicodeError):
            out.append(header_text(data))
    return clean("".join(out))


def _cap_bytes(text: str, limit: int) -> str:
    """Cut ``text`` so its UTF-8 form fits in ``limit`` bytes, on a character boundary."""
    if len(text) <= limit // 4:
        return text
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def header_map(items: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Every header, decoded, for the ``flattened`` field: names lowercase, values capped."""
    grouped: dict[str, list[str]] = {}
    for name, value in items:
        if not name or len(name) > MAX_HEADER_NAME_CHARS:
            continue
        if name not in grouped:
            if len(grouped) >= MAX_HEADER_NAMES:
                continue
            grouped[name] = []
        if len(grouped[name]) < MAX_HEADER_REPEATS:
            grouped[name].append(_cap_bytes(decode_header_value(value), MAX_HEADER_VALUE_BYTES))
    return {clean(k): v[0] if len(v) == 1 else v for k, v in grouped.items()}


# -- dates, addresses, thread ids ----------------------------------------------------------


def parse_date(value: str | None) -> str | None:
    """An RFC 5322 date as ``YYYY-MM-DDTHH:MM:SSZ`` UTC; None if unparseable or out of range."""
    if not value:
        return None
    try:
        stamp = email.utils.parsedate_to_datetime(_unescape_bytes(value).strip())
    except Exception:
        return None
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    try:
        stamp = stamp.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    if not MIN_YEAR <= stamp.year < END_YEAR:
        return None
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_addresses(values: list[str]) -> tuple[list[str], list[str]]:
    """Lowercased addresses and decoded display names from all occurrences of one header."""
    addresses: list[str] = []
    names: list[str] = []
    for value in values:
        for name, address in _address_pairs(_unescape_bytes(value)):
            address = clean(address.strip()).lower()
            if not _plausible_address(address) or address in addresses:
                continue
            if len(addresses) >= MAX_ADDRESSES:
                break
            addresses.append(address)
            name = clean(" ".join(name.split()))[:1024]
            if name and name not in names:
                names.append(name)
    return addresses, names


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_ITEM = re.compile(
    rf"[ \t]*(?:((?:{_ATEXT}[ \t]+)*{_ATEXT})?[ \t]*<({_PLAIN_ADDRESS})>|({_PLAIN_ADDRESS}))"
    r"[ \t]*(?:,|$)")
"""One item of a plain address list: ``addr``, ``<addr>`` or ``Words <addr>``, ASCII atoms
only (no quotes, comments, dots in names, encoded words, groups or folding)."""


def plain_address_pairs(value: str) -> list[tuple[str, str]] | None:
    """``(name, address)`` pairs of a plain address list, or None if it is anything more.

    Most address headers are this simple; mail-parser's forensic parser walks every
    character in Python (a millisecond a message). For these it gives the same pairs (a
    test holds the two to that), so the fast path only skips the work, never changes it.
    """
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    while pos < end:
        match = _PLAIN_ITEM.match(value, pos)
        if match is None or match.end() == pos:
            return None
        name, bracketed, bare = match.groups()
        if name and "=?" in name:  # an encoded word: the forensic parser decodes it
            return None
        pairs.append((" ".join(name.split()) if name else "", bracketed or bare))
        pos = match.end()
    return pairs or None


def _address_pairs(value: str) -> list[tuple[str, str]]:
    """mail-parser's forensic address parser, the stdlib one if it fails; names decoded."""
    plain = plain_address_pairs(value)
    if plain is not None:
        return plain
    try:
        from mailparser.utils import get_addresses

        return list(get_addresses(value, decode_names=True))
    except Exception:
        pass
    try:
        return [
            (decode_header_value(name), address)
            for name, address in email.utils.getaddresses([value])
        ]
    except Exception:
        return []


def _plausible_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and len(address) <= 512 and address.isprintable() and (
        " " not in address
    )


def _thread_ids(value: str | None) -> list[str]:
    if not value:
        return []
    out: list[str] = []
    for token in _ANGLE_TOKEN.findall(_unescape_bytes(value)):
        normalized = normalize_message_id(token)
        if normalized and normalized not in out:
            out.append(clean(normalized)[:1024])
            if len(out) >= MAX_THREAD_IDS:
                break
    return out


# -- bodies, attachments, defects ----------------------------------------------------------


def _body(plain: list[str], html: list[str], max_chars: int) -> tuple[str, bool, str]:
    """Text parts joined; HTML converted only when there is no text part."""
    parts = [p for p in plain if p and p.strip()]
    if parts:
        text, source = "\n\n".join(parts), "text"
    else:
        markup = [h for h in html if h and h.strip()]
        if not markup:
            return "", False, "none"
        text = html_to_text("\n".join(markup), max_html_chars=max(4 * max_chars, 10_000))
        source = "html"
    text = clean(text.replace("\r\n", "\n"))
    if len(text) > max_chars:
        return text[:max_chars], True, source
    return text, False, source


def _collect_attachments(
    part: Message,
    out: list[dict[str, Any]],
    depth: int,
    texts: AttachmentTexts | None = None,
    decoded_payload: Callable[[Message], bytes | None] | None = None,
) -> int:
    """Append attachment records under ``part``; return how many were found (uncapped).

    A leaf is an attachment when it has a file name, says ``Content-Disposition: attachment``
    or is not text/plain or text/html (images, calendars, octet streams). An attached message
    (``message/*`` with a name or ``attachment`` disposition) counts once, as one file. A
    multipart whose boundary never matched is broken structure, not a file. File names are
    never invented (mail-parser makes up random ones, which would make documents differ
    between two parses of the same bytes). ``texts``, if given, gets each leaf's bytes for
    text extraction (attached messages are not opened: their own archive copy is the record).
    ``decoded_payload`` may already hold a leaf's decoded bytes (see :mod:`ingest.mimefast`).
    """
    if depth > MAX_MIME_DEPTH:
        return 0
    name = _filename(part)
    disposition = (part.get_content_disposition() or "").lower()
    mime_type = _content_type(part)
    if part.is_multipart():
        if mime_type.startswith("message/") and (name or disposition == "attachment"):
            inner = part.get_payload()
            data = b""
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                try:
                    data = inner[0].as_bytes()
                except Exception:  # an unflattenable inner message still counts as a file
                    data = b""
            _add_attachment(out, name, mime_type, data)
            return 1
        found = 0
        payload = part.get_payload()
        for sub in payload if isinstance(payload, list) else []:
            if isinstance(sub, Message):
                found += _collect_attachments(sub, out, depth + 1, texts, decoded_payload)
        return found
    if mime_type.startswith("multipart/"):  # a multipart whose boundary never matched
        return 0
    if not (name or disposition == "attachment" or mime_type not in ("text/plain", "text/html")):
        return 0
    decoded: Any = decoded_payload(part) if decoded_payload is not None else None
    if decoded is None:
        decoded = part.get_payload(decode=True)
    data = decoded if isinstance(decoded, bytes) else b""
    _add_attachment(out, name, mime_type, data)
    if texts is not None:
        texts.add(name, mime_type, data, _charset(part))
    return 1


def _charset(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def _add_attachment(out: list[dict[str, Any]], name: str | None, mime: str, data: bytes) -> None:
    if len(out) >= MAX_ATTACHMENTS:
        return
    file: dict[str, Any] = {"mime_type": mime}
    if name:
        file["name"] = name
        match = _EXTENSION.search(name)
        if match:
            file["extension"] = match.group(1).lower()
    file["size"] = len(data)
    file["hash"] = {"sha256": hashlib.sha256(data).hexdigest()}
    out.append({"file": file})


def _filename(part: Message) -> str | None:
    """The part's file name, RFC 2231 parameters and RFC 2047 words both decoded."""
    try:
        name = part.get_filename()
    except Exception:
        return None
    if not isinstance(name, str):
        return None
    name = decode_header_value(name).strip()
    return name[:1024] or None


def _mailparser_defects(defects: Any) -> list[str]:
    """mail-parser's defect records as short strings: ``"<Kind> (<where>)"``."""
    out: list[str] = []
    for record in defects if isinstance(defects, list) else []:
        if not isinstance(record, dict):
            continue
        for where, entries in record.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                kind = str(entry).split(":", 1)[0].strip()
                short = clean(f"{kind} ({where})")[:200]
                if short not in out:
                    out.append(short)
                if len(out) >= MAX_DEFECTS:
                    return out
    return out


def now_iso() -> str:
    """Current UTC time in the document's timestamp format (for callers and tools)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
