"""The new part of a reply: the body without quoted history and without the signature.

Support staff search what the customer wrote *this time*; the full body repeats every earlier
message of the thread and makes each old phrase match every later reply. ``popvault.reply_text``
holds the new part, ``popvault.body_text`` stays the full text.

mail-parser-reply does the splitting: it knows the reply headers of common clients in many
languages (Gmail "On ... wrote:", Outlook "From: ... Sent: ..." blocks and "-----Original
Message-----", German "Am ... schrieb ...:", French "Le ... a écrit :") and common signature
openers. Its patterns are regular expressions over the whole text, so the input is capped
(:data:`MAX_REPLY_INPUT_CHARS`). Any failure, or an empty result, falls back to the full body:
a reply text that loses the message would be worse than one that keeps the quote.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

MAX_REPLY_INPUT_CHARS = 100_000
"""Body characters handed to the splitter. The new part of a reply comes first; the library's
signature pattern (``(.|\\s)*``) walks to the end of the text, so the cap bounds its work."""
MAX_SIGNATURE_LINES = 10
"""A sign-off block longer than this (without a ``-- `` line) is taken for content."""
MAX_SIGNOFF_CHARS = 40
"""A sign-off line ("Best regards, Anna") is short; a longer one is a sentence."""
REPLY_LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "nl", "it", "sv", "da", "pl", "cs")
"""Languages whose reply headers are recognised (the library always adds English)."""

_QUOTE_LINE = re.compile(r"^\s*>")
_SIG_DASHES = re.compile(r"^--[ \t]*$", re.MULTILINE)


def reply_text(body: str, *, max_chars: int = MAX_REPLY_INPUT_CHARS) -> str:
    """The new part of ``body``; the full ``body`` (stripped) if nothing could be split off.

    Never raises.
    """
    if not body.strip():
        return ""
    text = body[:max_chars]
    if not _may_hold_history(text):
        return body.strip()  # nothing to split off: skip the library's regex work
    try:
        new = _split(text)
    except Exception as exc:  # a library bug must never cost us the document
        log.debug("reply splitting failed: %s", type(exc).__name__)
        return body.strip()
    new = _drop_trailing_quotes(new).strip()
    return new if new else body.strip()


def _may_hold_history(text: str) -> bool:
    """Cheap pre-check: a quote, a signature delimiter or a header-like line exists.

    Most mail in an archive is not a reply with history; for it the full text is the answer,
    and skipping the library keeps the parse cheap.
    """
    if _SIG_DASHES.search(text):
        return True
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(">") or stripped.startswith("-----") or stripped.startswith("___"):
            return True
        head = stripped[:40].lower()
        if ":" in head and (head.endswith(":") or head.split(":", 1)[0].strip("* ") in _HEADERISH):
            return True
    return False


_HEADERISH = frozenset({
    "from", "sent", "to", "subject", "date", "cc", "von", "gesendet", "an", "betreff", "datum",
    "de", "envoyé", "à", "objet", "enviado", "para", "asunto", "fecha", "van", "verzonden",
    "aan", "onderwerp", "da", "inviato", "a", "oggetto", "data", "från", "skickat", "till",
    "ämne", "fra", "sendt", "til", "emne", "od", "wysłane", "do", "temat", "odesláno", "komu",
    "předmět",
})


def _split(text: str) -> str:
    from mailparser_reply.parser import EmailMessage

    message = EmailMessage(text=text, languages=list(REPLY_LANGUAGES), keep_hyphen_lists=True)
    message.read()
    if not message.replies:
        return text
    first = message.replies[0]
    if first.signatures and not _plausible_signature(str(first.signatures)):
        return str(first.full_body)  # keep the text the library took for a sign-off
    return str(first.body)


def _plausible_signature(signature: str) -> bool:
    """Whether what the library cut off as a signature looks like one.

    Its sign-off list has "Thanks," and "Best,": it also cuts "Thanks, that fixed it. One
    more question..." and everything after. A ``-- `` delimiter is trusted; otherwise the
    sign-off line must be short and not a sentence, and the block short.
    """
    lines = [line.strip() for line in signature.strip().splitlines() if line.strip()]
    if not lines:
        return True
    if lines[0].startswith(("--", "__")):
        return True
    first = lines[0]
    return (len(lines) <= MAX_SIGNATURE_LINES and len(first) <= MAX_SIGNOFF_CHARS
            and not any(mark in first for mark in ".?!:"))


def _drop_trailing_quotes(text: str) -> str:
    """Remove ``>``-quoted lines at the end (clients that quote without a header line)."""
    lines = text.splitlines()
    while lines and (not lines[-1].strip() or _QUOTE_LINE.match(lines[-1])):
        lines.pop()
    return "\n".join(lines)
