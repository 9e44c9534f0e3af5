"""Conversation ids: which thread a message belongs to, so a support inbox reads as tickets.

The rules, in order of precedence (the first that applies decides):

1. **Ticket tag** in the subject (``[support] ticket_pattern``, default ``\\[#(\\d+)\\]``):
   ``ticket:<n>``. Helpdesks put the tag in every reply, and their replies often lack
   threading headers, so the tag is the most reliable link there is.
2. **References**: its first id is the thread root (RFC 5322 3.6.4), so parent and children
   agree on the root's normalized Message-ID without looking anything up. If the root itself
   is known (in the batch or the index) under another conversation (it carried a ticket tag,
   say), its conversation is taken instead; the re-pointing below gives the same answer when
   the root arrives later, so the result does not depend on arrival order.
3. **In-Reply-To** only (old clients): the parent's conversation if the parent is known,
   else the parent's id itself, *provisionally*.
4. **Normalized subject** (reply/forward prefixes in many languages and ``[list]`` tags
   stripped, whitespace collapsed, casefolded), only for messages with none of the above: the
   newest document of the same account with that subject within ``[support]
   subject_window_days`` (default 14) on either side of the message's ``@timestamp``. Empty
   or generic subjects (``Re:``, "test", "(no subject)") never join by subject.
5. Otherwise the message's own normalized Message-ID, or ``key:<message_key>`` without one.

**Re-pointing** makes provisional ids converge: whenever a message's conversation differs from
its own Message-ID, every document whose conversation *is* that Message-ID (children that
arrived first) moves to the new conversation. Applied at each arrival, chains follow too
(child -> parent -> grandparent).

Resolution is per batch: parents in the same batch first, then one lookup per kind in the index
(:class:`ThreadIndex`, implemented per sink in :mod:`ingest.sinks.threadindex`), then the
re-pointing, all *before* the batch is written: a failing lookup fails the batch like a failing
write (nothing acknowledged, retried next poll), and a batch that fails after re-pointing leaves
the index as the retry will leave it anyway.

Known limit: two batches resolved concurrently (parallel polls) cannot see each other's
messages, so a child and its parent written at the same moment can stay apart until another
message of the thread arrives.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ingest.errors import ConfigError

if TYPE_CHECKING:
    from ingest.config import Config

DEFAULT_TICKET_PATTERN = r"\[#(\d+)\]"
"""A helpdesk ticket tag such as ``[#4711]``; group 1 (or a group named ``ticket``) is the
number."""
DEFAULT_SUBJECT_WINDOW_DAYS = 14
"""Days either side of a message in which a same-subject message counts as the same thread."""
MAX_SUBJECT_WINDOW_DAYS = 3650
"""A bigger window is a misconfiguration: any two "Invoice" mails of a decade would merge."""
THREAD_CONFIG_KEYS = ("ticket_pattern", "subject_window_days")
"""The ``[support]`` keys read here; the table's other keys are classification rules."""
TICKET_PREFIX = "ticket:"
KEY_PREFIX = "key:"
MAX_ID_CHARS = 1024
"""``ignore_above`` of the thread keyword fields: longer values would not be searchable."""

RULE_TICKET, RULE_REFERENCES, RULE_IN_REPLY_TO, RULE_SUBJECT, RULE_OWN = (
    "ticket", "references", "in_reply_to", "subject", "own")

_REPLY_PREFIXES = (
    "antw", "doorst", "odp", "enc", "res", "rif", "fwd", "re", "fw", "aw", "wg", "sv", "vs",
    "tr", "rv", "r",
    "回复", "答复", "转发", "回覆", "轉寄", "轉發",
)
"""Reply and forward markers, any case: English, German (AW, WG), Scandinavian (SV) and
Finnish (VS), Dutch (Antw, Doorst), French (TR), Italian (R, RIF), Polish (Odp), Portuguese
(Enc, Res), Spanish (RV), Chinese (simplified and traditional)."""
_PREFIX = re.compile(
    r"^(?:\s*(?:(?:" + "|".join(map(re.escape, _REPLY_PREFIXES)) + r")"
    r"\s*(?:\[\d{1,4}\]|\(\d{1,4}\)|\^\d{1,4})?\s*:|\[[^\[\]]{0,128}\]))+",
    re.IGNORECASE,
)
"""Any sequence of markers (``Re:``, ``Re[2]:``, ``AW :``) and bracketed tags (``[list]``) at
the start. Matched after NFKC, which turns full-width colons (``回复：``) into ``:``."""
GENERIC_SUBJECTS = frozenset({
    "", "(no subject)", "no subject", "(kein betreff)", "kein betreff", "(sans objet)",
    "sans objet", "(sin asunto)", "sin asunto", "(senza oggetto)", "senza oggetto",
    "(geen onderwerp)", "geen onderwerp", "(无主题)", "无主题", "hi", "hello", "hallo", "hey",
    "test", "question", "help", "fyi", "urgent", "info", "information", "thanks", "thank you",
    "request", "inquiry", "enquiry", "support", "problem", "issue",
})
"""Normalized subjects that say nothing about the thread: joining by them would merge
strangers. A subject without any letter or digit is generic too."""


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadRules:
    """The configurable part of the rules (``[support] ticket_pattern``,
    ``subject_window_days``); the default object is the built-in behaviour."""

    ticket_pattern: re.Pattern[str] = field(default=re.compile(DEFAULT_TICKET_PATTERN))
    subject_window_days: int = DEFAULT_SUBJECT_WINDOW_DAYS

    @property
    def subject_window(self) -> dt.timedelta:
        return dt.timedelta(days=self.subject_window_days)


DEFAULT_THREAD_RULES = ThreadRules()


def thread_rules_from_config(config: Config) -> ThreadRules:
    """The rules of ``config``'s ``[support]`` table (defaults where it is absent).

    Raises ConfigError naming the file and the key: a broken pattern silently matching nothing
    would split every ticket into loose messages without anyone noticing.
    """
    where = str(config.path) if config.path else "configuration"
    return thread_rules_from_table(config.raw.get("support", {}), where)


def thread_rules_from_table(table: Any, where: str) -> ThreadRules:
    """Parse the thread keys of a ``[support]`` table; other keys belong to other rules."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [support] must be a table")
    source = table.get("ticket_pattern", DEFAULT_TICKET_PATTERN)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: [support] ticket_pattern must be a non-empty string (a "
                          f"regular expression), got {source!r}")
    try:
        pattern = re.compile(source)
    except re.error as exc:
        raise ConfigError(f"{where}: [support] ticket_pattern {source!r} is not a valid "
                          f"regular expression: {exc}") from None
    if pattern.groups < 1:
        raise ConfigError(f"{where}: [support] ticket_pattern {source!r} needs a capturing "
                          "group around the ticket number, like the default "
                          f"{DEFAULT_TICKET_PATTERN!r}")
    window = table.get("subject_window_days", DEFAULT_SUBJECT_WINDOW_DAYS)
    if isinstance(window, bool) or not isinstance(window, int) or not (
            0 <= window <= MAX_SUBJECT_WINDOW_DAYS):
        raise ConfigError(f"{where}: [support] subject_window_days must be a whole number of "
                          f"days from 0 (never join by subject) to {MAX_SUBJECT_WINDOW_DAYS}, "
                          f"got {window!r}")
    return ThreadRules(ticket_pattern=pattern, subject_window_days=window)


# -- pure per-message rules -----------------------------------------------------------------


def normalize_subject(subject: str | None) -> str:
    """The comparable form of a subject: prefixes and ``[tags]`` stripped, spaces collapsed,
    casefolded (``"AW: Re: [users]  Drucker"`` -> ``"drucker"``)."""
    if not subject:
        return ""
    text = unicodedata.normalize("NFKC", subject)
    text = _PREFIX.sub("", text, count=1)
    return " ".join(text.split()).casefold()[:MAX_ID_CHARS]


def is_generic_subject(normalized: str) -> bool:
    """True when a normalized subject must never join a thread by itself."""
    return normalized in GENERIC_SUBJECTS or not any(ch.isalnum() for ch in normalized)


def ticket_of(subject: str | None, pattern: re.Pattern[str]) -> str | None:
    """The ticket number tagged in ``subject`` (group ``ticket``, else group 1), or None."""
    if not subject:
        return None
    match = pattern.search(subject)
    if match is None:
        return None
    number = match.group("ticket") if "ticket" in pattern.groupindex else match.group(1)
    number = (number or "").strip()
    return number[:MAX_ID_CHARS - len(TICKET_PREFIX)] or None


def parse_timestamp(value: Any) -> dt.datetime | None:
    """``@timestamp`` as an aware datetime (naive = UTC), None if absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class ThreadFacts:
    """What the rules read of one document, computed once."""

    message_id: str | None
    own_id: str
    ticket: str | None
    root: str | None  # first References id
    parent: str | None  # first In-Reply-To id
    subject: str  # normalized
    timestamp: dt.datetime | None

    @property
    def subject_joinable(self) -> bool:
        return not (self.ticket or self.root or self.parent) and not is_generic_subject(
            self.subject)


def facts_of(doc: Mapping[str, Any], rules: ThreadRules = DEFAULT_THREAD_RULES) -> ThreadFacts:
    """Read a document as built by :mod:`ingest.document` (fields may be missing)."""
    popvault = doc.get("popvault") or {}
    thread = popvault.get("thread") or {}
    subject = (doc.get("email") or {}).get("subject")
    subject = subject if isinstance(subject, str) else None
    message_id = popvault.get("message_id_normalized")
    message_id = message_id if isinstance(message_id, str) and message_id else None
    references = thread.get("references") or []
    in_reply_to = thread.get("in_reply_to") or []
    own = message_id or f"{KEY_PREFIX}{popvault.get('message_key', '')}"
    return ThreadFacts(
        message_id=message_id,
        own_id=own,
        ticket=ticket_of(subject, rules.ticket_pattern),
        root=references[0] if references else None,
        parent=in_reply_to[0] if in_reply_to else None,
        subject=normalize_subject(subject),
        timestamp=parse_timestamp(doc.get("@timestamp")),
    )


# -- the index side -------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectQuery:
    """Find the newest document of ``account_id`` with ``subject`` in ``[start, end]``."""

    account_id: str
    subject: str
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class SubjectMatch:
    conversation_id: str
    timestamp: dt.datetime


class ThreadIndex(Protocol):
    """What resolution needs of a sink (see :mod:`ingest.sinks.threadindex`)."""

    def conversations_of(self, message_ids: Sequence[str]) -> dict[str, str]:
        """Normalized Message-ID -> conversation id, for indexed documents that have one."""
        ...

    def newest_by_subject(self, queries: Sequence[SubjectQuery]) -> list[SubjectMatch | None]:
        """Per query, the newest matching document's conversation, or None."""
        ...

    def repoint(self, moves: Mapping[str, str]) -> int:
        """Give every document whose conversation id is a key of ``moves`` the value instead;
        return how many documents changed."""
        ...

    def written(self, docs: Sequence[Mapping[str, Any]], account_id: str) -> None:
        """``docs`` (resolved, then created by ``account_id``'s batch) are now in the sink:
        an index whose searches lag behind its writes must answer for them from here on."""
        ...


# -- resolution -----------------------------------------------------------------------------


@dataclass
class Resolution:
    """What one batch's resolution did (for logs, tests and the overhead figure)."""

    rules: dict[str, int] = field(default_factory=dict)  # rule -> messages decided by it
    looked_up: int = 0  # ids asked of the index
    subject_queries: int = 0
    moves: dict[str, str] = field(default_factory=dict)  # provisional id -> conversation
    repointed: int = 0  # indexed documents that changed conversation


class _Batch:
    """Resolution of one batch: memoized, parents in the batch before the index."""

    def __init__(self, facts: Sequence[ThreadFacts], rules: ThreadRules,
                 known: Mapping[str, str], subject_hits: Mapping[int, SubjectMatch]) -> None:
        self.facts = facts
        self.rules = rules
        self.known = known
        self.subject_hits = subject_hits
        self.position: dict[str, int] = {}
        for i, f in enumerate(facts):
            if f.message_id is not None:
                self.position.setdefault(f.message_id, i)
        self.result: dict[int, tuple[str, str]] = {}
        self.busy: set[int] = set()

    def conversation(self, i: int) -> tuple[str, str]:
        """(conversation id, rule) of message ``i``."""
        if i in self.result:
            return self.result[i]
        self.busy.add(i)
        try:
            got = self._decide(i)
        finally:
            self.busy.discard(i)
        self.result[i] = got
        return got

    def _referenced(self, ref: str, i: int) -> str:
        j = self.position.get(ref)
        if j is not None and j != i and j not in self.busy:  # busy: a reference loop
            return self.conversation(j)[0]
        return self.known.get(ref, ref)

    def _decide(self, i: int) -> tuple[str, str]:
        f = self.facts[i]
        if f.ticket:
            return TICKET_PREFIX + f.ticket, RULE_TICKET
        if f.root:
            return self._referenced(f.root, i), RULE_REFERENCES
        if f.parent:
            return self._referenced(f.parent, i), RULE_IN_REPLY_TO
        if f.subject_joinable and self.rules.subject_window_days and f.timestamp is not None:
            best = self.subject_hits.get(i)
            window = self.rules.subject_window
            for j in range(i):  # earlier in the batch: as if already written
                other = self.facts[j]
                if (other.subject == f.subject and other.timestamp is not None
                        and abs(other.timestamp - f.timestamp) <= window
                        and (best is None or other.timestamp > best.timestamp)
                        and j not in self.busy):
                    best = SubjectMatch(self.conversation(j)[0], other.timestamp)
            if best is not None:
                return best.conversation_id, RULE_SUBJECT
        return f.own_id, RULE_OWN


def _follow(moves: Mapping[str, str], start: str) -> str:
    """Where ``start`` ends up after all moves (a loop stops where it closes)."""
    seen = {start}
    current = start
    while current in moves and moves[current] not in seen:
        current = moves[current]
        seen.add(current)
    return current


def resolve_conversations(docs: Sequence[dict[str, Any]], *, account_id: str,
                          rules: ThreadRules = DEFAULT_THREAD_RULES,
                          index: ThreadIndex) -> Resolution:
    """Set ``popvault.thread.{conversation_id, subject_normalized, ticket}`` on ``docs`` (one
    account's batch, about to be written) and re-point provisional children in ``index``.

    Raises whatever ``index`` raises (SinkError): the batch must then not be written.
    """
    report = Resolution()
    facts = [facts_of(doc, rules) for doc in docs]
    in_batch = {f.message_id for f in facts if f.message_id is not None}
    wanted = list(dict.fromkeys(
        ref for f in facts if not f.ticket
        for ref in [f.root or f.parent] if ref is not None and ref not in in_batch))
    known = index.conversations_of(wanted) if wanted else {}
    report.looked_up = len(wanted)

    window = rules.subject_window
    asking: list[int] = []
    queries: list[SubjectQuery] = []
    for i, f in enumerate(facts):
        if rules.subject_window_days and f.subject_joinable and f.timestamp is not None:
            asking.append(i)
            queries.append(SubjectQuery(account_id, f.subject, f.timestamp - window,
                                        f.timestamp + window))
    matches = index.newest_by_subject(queries) if queries else []
    report.subject_queries = len(queries)
    hits = {i: m for i, m in zip(asking, matches, strict=True) if m is not None}

    batch = _Batch(facts, rules, known, hits)
    decided = [batch.conversation(i) for i in range(len(facts))]
    moves = {f.message_id: conv for f, (conv, _rule) in zip(facts, decided, strict=True)
             if f.message_id is not None and conv != f.message_id}
    final_moves = {old: _follow(moves, old) for old in moves}
    report.moves = {old: new for old, new in final_moves.items() if new != old}

    for doc, f, (conv, rule) in zip(docs, facts, decided, strict=True):
        conv = _follow(report.moves, conv)
        thread = doc.setdefault("popvault", {}).setdefault("thread", {})
        thread["conversation_id"] = conv[:MAX_ID_CHARS]
        thread["subject_normalized"] = f.subject
        if f.ticket:
            thread["ticket"] = f.ticket
        else:
            thread.pop("ticket", None)
        report.rules[rule] = report.rules.get(rule, 0) + 1
    if report.moves:
        report.repointed = index.repoint(report.moves)
    return report
