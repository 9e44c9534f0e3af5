"""What kind of mail a message is: a person's, an auto-reply, a bounce or a list post; and spam.

A support inbox is mostly machines talking: vacation replies, delivery failures, newsletters.
Classifying them at ingest lets people filter them out (``popvault.kind``) and lets tools act
on bounces (``popvault.bounce``). The decision uses headers first, because senders that follow
the standards (RFC 3834 ``Auto-Submitted``, RFC 3464 delivery status notifications, RFC 2369 /
RFC 2919 list headers) say what they are; subject patterns cover the clients that do not
(Outlook's "Automatic reply:", in the sender's language).

Order when several apply: ``bounce`` > ``auto_reply`` > ``list`` > ``human``. A bounce usually
also carries ``Auto-Submitted`` (RFC 3464 asks for it), and a vacation reply may be sent to a
list; the more specific kind wins. ``kind_reasons`` lists every signal that fired for the
chosen kind, so a wrong call can be explained and the rules tuned.

Spam is a separate flag, not a kind: a spam bounce is still a bounce.

Works on the decoded header map (``popvault.headers``) so it also classifies oversize and
failed messages from their headers alone; the MIME tree, when there is one, adds the DSN
fields of a bounce.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from email.message import Message
from enum import StrEnum
from typing import Any

from ingest.config import Config
from ingest.errors import ConfigError

MAX_DSN_RECIPIENTS = 100
"""Recipients kept from one DSN; a mass bounce listing thousands would bloat the document."""
MAX_DSN_PARTS = 1000
"""Per-recipient field blocks read from one ``message/delivery-status`` part."""
MAX_DSN_TEXT_CHARS = 200_000
"""Characters of an unparsed ``message/delivery-status`` body scanned by the text fallback."""
MAX_REASONS = 20
BODY_SCAN_CHARS = 2_000
"""Body characters searched for out-of-office phrases (a weak signal); they open the text."""


class Kind(StrEnum):
    """``popvault.kind``: readable in Kibana and logs."""

    HUMAN = "human"
    AUTO_REPLY = "auto_reply"
    BOUNCE = "bounce"
    LIST = "list"


DEFAULT_AUTO_REPLY_SUBJECTS: tuple[str, ...] = (
    # Each is matched at the start of the subject (after whitespace), case-insensitively, so
    # "Re: out of office plans" from a person never matches; clients put the prefix first.
    r"out of (?:the )?office\b",
    r"automatic reply\b",
    r"auto(?:matic)?[- ]?(?:reply|response)\b",
    r"autoresponse\b",
    r"vacation(?: reply| response| notice)?\s*:",
    r"abwesenheitsnotiz\b",
    r"automatische antwort\b",
    r"abwesend\b",
    r"absence du bureau\b",
    r"r[ée]ponse automatique\b",
    r"absent(?:e)? du bureau\b",
    r"respuesta autom[áa]tica\b",
    r"fuera de la oficina\b",
    r"automatisch antwoord\b",
    r"afwezig\b",
    r"afwezigheidsbericht\b",
    r"risposta automatica\b",
    r"fuori sede\b",
    r"resposta autom[áa]tica\b",
    r"fora do escrit[óo]rio\b",
    r"fr[åa]nvaro\b",
    r"automatiskt svar\b",
    r"frav[æe]r\b",
    r"automatisk svar\b",
    r"automatisch(?:es)? (?:antwort|svar)\b",
    r"poza biurem\b",
    r"automatyczna odpowied[źz]\b",
    r"automatick[áa] odpov[ěe]ď\b",
)
DEFAULT_AUTO_REPLY_BODY_PHRASES: tuple[str, ...] = (
    # Weak: people write these too ("I will be out of the office next week" in a real mail).
    r"\bI(?:'m| am) (?:currently )?out of (?:the )?office\b",
    r"\bI(?:'m| am) (?:currently )?(?:away|on (?:annual )?leave|on vacation)\b",
    r"\bnicht im b[üu]ro\b",
    r"\bich bin (?:bis|vom|derzeit|zurzeit|momentan)\b.*\b(?:abwesend|nicht erreichbar)",
    r"\bje suis absente?\b",
    r"\bestar[ée] fuera de la oficina\b",
    r"\bben ik afwezig\b",
    r"\bsono fuori (?:ufficio|sede)\b",
)
DEFAULT_BOUNCE_SENDERS: tuple[str, ...] = (
    r"^mailer-daemon@",
    r"^postmaster@",
    r"^mail-daemon@",
    r"^microsoftexchange[0-9a-f]{32}@",
)
DEFAULT_BOUNCE_SUBJECTS: tuple[str, ...] = (
    r"undeliver(?:able|ed)\b",
    r"delivery status notification \((?:failure|delay)\)",
    r"mail delivery (?:failed|failure|system)\b",
    r"returned mail\b",
    r"failure notice\b",
    r"delivery failure\b",
    r"delivery has failed\b",
    r"non remis\b",
    r"unzustellbar\b",
    r"nicht zustellbar\b",
    r"no se puede entregar\b",
    r"onbestelbaar\b",
    r"non recapitabile\b",
)
DEFAULT_SPAM_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-spam-flag", r"^\s*yes\b"),
    ("x-spam-status", r"^\s*yes\b"),
    ("x-spam", r"^\s*(?:yes|true|spam)\b"),
    ("x-barracuda-spam-flag", r"^\s*yes\b"),
    ("x-ms-exchange-organization-scl", r"^\s*[5-9]\s*$"),
    ("x-spam-verdict", r"^\s*spam\b"),
)
DEFAULT_LIST_HEADERS: tuple[str, ...] = ("list-id", "list-unsubscribe", "list-post")
DEFAULT_LIST_PRECEDENCES: tuple[str, ...] = ("list", "bulk")
DEFAULT_AUTO_REPLY_PRECEDENCES: tuple[str, ...] = ("auto_reply", "auto-reply")
DEFAULT_AUTO_REPLY_HEADERS: tuple[str, ...] = ("x-autoreply", "x-autorespond", "x-autoresponder")
DEFAULT_WEAK_AUTO_REPLY_HEADERS: tuple[str, ...] = ("x-auto-response-suppress",)
WEAK_SIGNALS_NEEDED = 2
"""Weak auto-reply signals that must agree: Outlook sets ``X-Auto-Response-Suppress`` on
ordinary mail too (meeting requests, mail to groups), and people write "I am away"."""


@dataclass(frozen=True)
class ClassifyRules:
    """The patterns :func:`classify` uses; every field has a default and can be overridden.

    Patterns are regular expressions, matched case-insensitively; subject patterns are
    anchored at the subject's start. Header names are lowercase.
    """

    auto_reply_subjects: tuple[str, ...] = DEFAULT_AUTO_REPLY_SUBJECTS
    auto_reply_body_phrases: tuple[str, ...] = DEFAULT_AUTO_REPLY_BODY_PHRASES
    auto_reply_headers: tuple[str, ...] = DEFAULT_AUTO_REPLY_HEADERS
    weak_auto_reply_headers: tuple[str, ...] = DEFAULT_WEAK_AUTO_REPLY_HEADERS
    auto_reply_precedences: tuple[str, ...] = DEFAULT_AUTO_REPLY_PRECEDENCES
    bounce_senders: tuple[str, ...] = DEFAULT_BOUNCE_SENDERS
    bounce_subjects: tuple[str, ...] = DEFAULT_BOUNCE_SUBJECTS
    list_headers: tuple[str, ...] = DEFAULT_LIST_HEADERS
    list_precedences: tuple[str, ...] = DEFAULT_LIST_PRECEDENCES
    spam_headers: tuple[tuple[str, str], ...] = DEFAULT_SPAM_HEADERS
    _compiled: _Compiled | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifyRules:
        """Rules from a config table (e.g. ``[support]``): given keys replace the defaults.

        ``spam_headers`` is a table ``{header = "pattern"}``; every other key a list of
        strings. Unknown keys and bad patterns raise ``ValueError`` naming the key, because a
        misspelt rule that is silently ignored misclassifies mail without anyone noticing.
        """
        known = {f.name for f in fields(cls) if f.init}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(
                    f"unknown classify rule {key!r} (known: {', '.join(sorted(known))})")
            if key == "spam_headers":
                if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise ValueError(
                        "classify rule 'spam_headers' must map header names to patterns")
                values[key] = tuple((k.lower(), v) for k, v in value.items())
            else:
                if isinstance(value, str) or not isinstance(value, Sequence) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise ValueError(f"classify rule {key!r} must be a list of strings")
                lowered = key.endswith(("_headers", "_precedences"))
                values[key] = tuple(v.lower() if lowered else v for v in value)
        rules = cls(**values)
        rules.compiled()  # fail here, naming the rule, rather than on the first message
        return rules

    def compiled(self) -> _Compiled:
        """The patterns compiled once per rules object (classification runs per message)."""
        if self._compiled is None:
            object.__setattr__(self, "_compiled", _Compiled.build(self))
        assert self._compiled is not None
        return self._compiled


@dataclass(frozen=True)
class _Compiled:
    auto_reply_subject: re.Pattern[str] | None
    auto_reply_body: re.Pattern[str] | None
    bounce_sender: re.Pattern[str] | None
    bounce_subject: re.Pattern[str] | None
    spam: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def build(cls, rules: ClassifyRules) -> _Compiled:
        return cls(
            auto_reply_subject=_union("auto_reply_subjects", rules.auto_reply_subjects,
                                      anchored=True),
            auto_reply_body=_union("auto_reply_body_phrases", rules.auto_reply_body_phrases),
            bounce_sender=_union("bounce_senders", rules.bounce_senders),
            bounce_subject=_union("bounce_subjects", rules.bounce_subjects, anchored=True),
            spam=tuple((name, _compile("spam_headers", pattern))
                       for name, pattern in rules.spam_headers),
        )


def _compile(key: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"classify rule {key!r}: bad pattern {pattern!r}: {exc}") from exc


def _union(key: str, patterns: Iterable[str], *, anchored: bool = False) -> re.Pattern[str] | None:
    items = list(patterns)
    for pattern in items:
        _compile(key, pattern)  # name the bad one
    if not items:
        return None
    body = "|".join(f"(?:{p})" for p in items)
    # Subjects: after optional whitespace and a bracketed tag ("[EXT] Automatic reply: ...").
    prefix = r"^\s*(?:\[[^\]]{0,40}\]\s*)?" if anchored else ""
    return re.compile(f"{prefix}(?:{body})", re.IGNORECASE)


DEFAULT_RULES = ClassifyRules()


@dataclass(frozen=True)
class Bounce:
    """``popvault.bounce``: what a delivery status notification reports."""

    recipients: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    action: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recipients": list(self.recipients), "status": list(self.status)}
        if self.action:
            out["action"] = self.action
        return out


@dataclass(frozen=True)
class Classification:
    """The result of :func:`classify`; ``bounce`` is set only when ``kind`` is ``bounce``."""

    kind: Kind
    reasons: tuple[str, ...]
    spam: bool
    bounce: Bounce | None = None

    def fields(self) -> dict[str, Any]:
        """The document fields under ``popvault``."""
        out: dict[str, Any] = {
            "kind": self.kind.value, "kind_reasons": list(self.reasons), "spam": self.spam,
        }
        if self.bounce is not None:
            out["bounce"] = self.bounce.to_dict()
        return out


Headers = Mapping[str, str | list[str]]


def classify(
    headers: Headers,
    parsed: Message | None = None,
    *,
    body_text: str = "",
    rules: ClassifyRules = DEFAULT_RULES,
) -> Classification:
    """Classify one message. Never raises for any header values.

    Args:
        headers: the decoded header map (``popvault.headers``: lowercase name to a value or
            a list of values).
        parsed: the parsed MIME tree, if the body was parsed; used to read DSN fields.
        body_text: the body text; its opening is searched for weak out-of-office phrases.
        rules: patterns; :data:`DEFAULT_RULES` unless a config overrides them.
    """
    compiled = rules.compiled()
    subject = _first(headers, "subject")
    spam_reasons = _spam_reasons(headers, compiled)

    bounce_reasons, bounce = _bounce(headers, parsed, subject, compiled)
    if bounce_reasons:
        return Classification(Kind.BOUNCE, _cap(bounce_reasons + spam_reasons),
                              bool(spam_reasons), bounce)
    auto_reasons = _auto_reply_reasons(headers, subject, body_text, rules, compiled)
    if auto_reasons:
        return Classification(Kind.AUTO_REPLY, _cap(auto_reasons + spam_reasons),
                              bool(spam_reasons))
    list_reasons = _list_reasons(headers, rules)
    if list_reasons:
        return Classification(Kind.LIST, _cap(list_reasons + spam_reasons), bool(spam_reasons))
    return Classification(Kind.HUMAN, _cap(spam_reasons), bool(spam_reasons))


def _cap(reasons: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(reasons))[:MAX_REASONS]


def _all(headers: Headers, name: str) -> list[str]:
    value = headers.get(name)
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def _first(headers: Headers, name: str) -> str:
    values = _all(headers, name)
    return values[0] if values else ""


def _token(value: str) -> str:
    """The first token of a structured header value, lowercased (``auto-replied; x=y``)."""
    return value.strip().split(";", 1)[0].strip().lower()


def _spam_reasons(headers: Headers, compiled: _Compiled) -> list[str]:
    return [f"spam:{name}" for name, pattern in compiled.spam
            if any(pattern.search(v) for v in _all(headers, name))]


def _auto_reply_reasons(
    headers: Headers, subject: str, body_text: str, rules: ClassifyRules, compiled: _Compiled
) -> list[str]:
    strong: list[str] = []
    for value in _all(headers, "auto-submitted"):
        token = _token(value)
        if token and token != "no":
            strong.append(f"auto-submitted:{token[:40]}")
    strong += [f"header:{name}" for name in rules.auto_reply_headers if _all(headers, name)]
    precedence = {_token(v) for v in _all(headers, "precedence")}
    strong += [f"precedence:{p}" for p in rules.auto_reply_precedences if p in precedence]
    if compiled.auto_reply_subject and compiled.auto_reply_subject.search(subject):
        strong.append("subject:auto_reply")
    if strong:
        return strong
    weak = [f"weak:{name}" for name in rules.weak_auto_reply_headers if _all(headers, name)]
    if compiled.auto_reply_body and compiled.auto_reply_body.search(body_text[:BODY_SCAN_CHARS]):
        weak.append("weak:body_phrase")
    return weak if len(weak) >= WEAK_SIGNALS_NEEDED else []


def _list_reasons(headers: Headers, rules: ClassifyRules) -> list[str]:
    reasons = [f"header:{name}" for name in rules.list_headers if _all(headers, name)]
    precedence = {_token(v) for v in _all(headers, "precedence")}
    reasons += [f"precedence:{p}" for p in rules.list_precedences if p in precedence]
    return reasons


# -- bounces -------------------------------------------------------------------------------

_ADDRESS = re.compile(r"<?([^\s<>;,]+@[^\s<>;,]+)>?")
_STATUS = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")
_DSN_LINE = re.compile(r"^([A-Za-z-]+)\s*:\s*(.*)$")


def _bounce(
    headers: Headers, parsed: Message | None, subject: str, compiled: _Compiled
) -> tuple[list[str], Bounce | None]:
    """Reasons and DSN fields if the message is a delivery failure report."""
    reasons: list[str] = []
    content_type = _first(headers, "content-type").lower()
    is_report = content_type.strip().startswith("multipart/report")
    report_dsn = is_report and re.search(r"report-type\s*=\s*\"?delivery-status", content_type)
    if report_dsn:
        reasons.append("multipart/report:delivery-status")
    recipients: list[str] = []
    statuses: list[str] = []
    actions: list[str] = []
    if parsed is not None:
        blocks = _dsn_blocks(parsed)
        if blocks:
            if not report_dsn:
                reasons.append("part:message/delivery-status")
            for block in blocks:
                _read_dsn_block(block, recipients, statuses, actions)
    failed = [_address(v) for v in _all(headers, "x-failed-recipients") for v in v.split(",")]
    if any(failed):
        reasons.append("header:x-failed-recipients")
        for address in failed:
            if address and address not in recipients and len(recipients) < MAX_DSN_RECIPIENTS:
                recipients.append(address)
    sender = _sender(_first(headers, "from"))
    from_daemon = bool(sender and compiled.bounce_sender and compiled.bounce_sender.search(sender))
    bounce_subject = bool(compiled.bounce_subject and compiled.bounce_subject.search(subject))
    if from_daemon and (reasons or bounce_subject or is_report):
        reasons.append("from:mailer-daemon")
        if bounce_subject:
            reasons.append("subject:bounce")
    if not reasons:
        return [], None
    action = "failed" if "failed" in actions else (actions[0] if actions else None)
    return reasons, Bounce(tuple(recipients), tuple(dict.fromkeys(statuses)), action)


def _sender(value: str) -> str:
    """The From address, lowercased; the display name may itself hold an ``@``."""
    try:
        address = email.utils.parseaddr(value)[1]
    except Exception:
        return ""
    return address.strip().lower()[:512]


def _address(value: str) -> str:
    match = _ADDRESS.search(value.split(";", 1)[-1] if ";" in value else value)
    return match.group(1).strip().lower()[:512] if match else ""


def _dsn_blocks(message: Message) -> list[Message | str]:
    """The field blocks of every ``message/delivery-status`` part (Message or raw text)."""
    blocks: list[Message | str] = []
    try:
        parts = list(message.walk())
    except Exception:  # a tree too deep to walk: the headers already said what they could
        return blocks
    for part in parts[:MAX_DSN_PARTS]:
        try:
            if part.get_content_type() != "message/delivery-status":
                continue
            payload = part.get_payload()
        except Exception:
            continue
        if isinstance(payload, list):
            blocks.extend(p for p in payload[:MAX_DSN_PARTS] if isinstance(p, Message))
        elif isinstance(payload, str):  # base64 or unparsed: read it as text
            data = part.get_payload(decode=True)
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else payload
            blocks.append(text[:MAX_DSN_TEXT_CHARS])
    return blocks


def _read_dsn_block(
    block: Message | str, recipients: list[str], statuses: list[str], actions: list[str]
) -> None:
    if isinstance(block, Message):
        items = [(str(k).lower(), str(v)) for k, v in block.items()]
    else:
        items = []
        for line in block.splitlines():
            match = _DSN_LINE.match(line)
            if match:
                items.append((match.group(1).lower(), match.group(2)))
    for name, value in items:
        value = " ".join(value.split())
        if name == "final-recipient" and len(recipients) < MAX_DSN_RECIPIENTS:
            address = _address(value)
            if address and address not in recipients:
                recipients.append(address)
        elif name == "status":
            match = _STATUS.match(value)
            if match and len(statuses) < MAX_DSN_RECIPIENTS:
                statuses.append(match.group(1))
        elif name == "action":
            action = value.split()[0].lower()[:32] if value.split() else ""
            if action:
                actions.append(action)


def classify_rules_from_config(config: Config) -> ClassifyRules | None:
    """``[support.classify]`` of ``config`` (None when absent: the built-in rules apply).

    Given keys replace the defaults, e.g. ``auto_reply_subjects = ["^Robot:"]``; errors name
    the file and the key.
    """
    support = config.raw.get("support", {})
    table = support.get("classify") if isinstance(support, Mapping) else None
    if table is None:
        return None
    where = str(config.path) if config.path else "configuration"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [support.classify] must be a table")
    try:
        return ClassifyRules.from_dict(table)
    except ValueError as exc:
        raise ConfigError(f"{where}: [support.classify]: {exc}") from None
