"""popvault's search syntax: text in, a sink-neutral query tree out, plus its Elasticsearch form.

The syntax is deliberately small and Gmail-like, so people can type it without reading a manual::

    from:alice@example.com       sender address (exact, case-insensitive)
    from:example.com             any sender ending in ``@example.com`` (also ``from:@example.com``)
    to:bob@example.com           a recipient in To, Cc or Bcc (same address/domain rules)
    subject:invoice              a word in the subject
    subject:"march invoice"      a phrase in the subject
    has:attachment               messages with at least one attachment
    after:2026-01-01             sent on or after that day (00:00 UTC), inclusive
    before:2026-02-01            sent before that day (00:00 UTC), exclusive
    account:work                 seen in that popvault account
    filename:report              an attachment whose name contains ``report`` (case-insensitive)
    budget                       a word anywhere: subject, body text, attachment text or names
    "quarterly budget"           a phrase anywhere
    -term                        negates any of the above (``-from:x``, ``-"a phrase"``, ``-word``)

Terms are combined with AND. ``after``/``before`` follow Gmail: ``after:D before:E`` is the
half-open day range [D, E). Date values are calendar days in UTC.

:func:`parse_query` turns text into a :class:`Query` (plain frozen dataclasses, no server
types) so the embedded SQLite sink and the memory sink can evaluate the same tree;
:func:`to_es_query` is the Elasticsearch translation. Errors are :class:`QuerySyntaxError`
(a ``ValueError``) naming the offending token, because the text comes straight from a person.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Document field names, in one place (they come from ingest.document's builder).
FIELD_FROM = "email.from.address"
FIELDS_TO = ("email.to.address", "email.cc.address", "email.bcc.address")
FIELD_SUBJECT = "email.subject"
FIELD_BODY = "popvault.body_text"
FIELD_ATTACHMENT_TEXT = "popvault.attachment_text"
FIELD_FILENAME = "email.attachments.file.name"
FIELD_HAS_ATTACHMENTS = "popvault.has_attachments"
FIELD_TIMESTAMP = "@timestamp"
FIELD_ACCOUNTS = "popvault.accounts"
FREE_TEXT_FIELDS = (FIELD_SUBJECT, FIELD_BODY, FIELD_ATTACHMENT_TEXT)
"""Analysed text fields a free word or phrase is matched against: a compliance search must
find a phrase whether it was typed or sent as a PDF. Attachment names are keywords and are
matched separately with a wildcard."""

MAX_QUERY_CHARS = 2_000
"""Longest query text accepted; a search box, not a bulk filter language."""
MAX_TERMS = 64
"""Most terms in one query; each becomes a clause and wildcard clauses are not free."""


class QuerySyntaxError(ValueError):
    """Raised when search text cannot be parsed; the message names the bad token."""

    def __init__(self, message: str, *, token: str | None = None, position: int | None = None):
        super().__init__(message)
        self.token = token
        self.position = position


class AddressRole(StrEnum):
    FROM = "from"
    TO = "to"  # To, Cc or Bcc


class DateBound(StrEnum):
    AFTER = "after"  # inclusive: on or after the day
    BEFORE = "before"  # exclusive: strictly before the day


class TextScope(StrEnum):
    ANY = "any"  # subject, body text, attachment text and attachment names
    SUBJECT = "subject"


@dataclass(frozen=True)
class Text:
    """A word (``phrase=False``) or a quoted phrase, in ``scope``."""

    value: str
    phrase: bool = False
    scope: TextScope = TextScope.ANY


@dataclass(frozen=True)
class Address:
    """A sender or recipient: a full address, or a domain when ``value`` has no local part."""

    role: AddressRole
    value: str  # lower-cased; "example.com" or "@example.com" mean a domain

    @property
    def domain(self) -> str | None:
        """The domain to match (without ``@``) if this is a domain term, else None."""
        if self.value.startswith("@"):
            return self.value[1:]
        if "@" not in self.value:
            return self.value
        return None


@dataclass(frozen=True)
class DateTerm:
    bound: DateBound
    day: dt.date

    @property
    def instant(self) -> dt.datetime:
        """00:00 UTC of the day: the boundary both bounds compare against."""
        return dt.datetime(self.day.year, self.day.month, self.day.day, tzinfo=dt.UTC)


@dataclass(frozen=True)
class HasAttachment:
    pass


@dataclass(frozen=True)
class Account:
    account_id: str


@dataclass(frozen=True)
class Filename:
    value: str  # substring of an attachment file name, case-insensitive


Term = Text | Address | DateTerm | HasAttachment | Account | Filename


@dataclass(frozen=True)
class Clause:
    term: Term
    negated: bool = False


@dataclass(frozen=True)
class Query:
    """All clauses must hold (AND). An empty query matches everything."""

    clauses: tuple[Clause, ...] = ()

    @property
    def positive(self) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if not c.negated)

    @property
    def negative(self) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if c.negated)


KNOWN_FIELDS = ("from", "to", "subject", "has", "after", "before", "account", "filename")
HAS_VALUES = ("attachment",)


@dataclass(frozen=True)
class _Token:
    text: str  # the raw token as typed, for error messages
    position: int  # 0-based offset in the query text
    negated: bool
    field: str | None  # None for free text
    value: str
    quoted: bool


def _tokenize(text: str) -> list[_Token]:
    """Split on whitespace outside double quotes; a token is ``[-][field:]value``."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        start = i
        negated = False
        if text[i] == "-":
            negated = True
            i += 1
        field: str | None = None
        # field name: letters up to a ':' (only if followed by the colon)
        j = i
        while j < n and text[j].isalpha():
            j += 1
        if j > i and j < n and text[j] == ":":
            field = text[i:j].lower()
            i = j + 1
        quoted = False
        if i < n and text[i] == '"':
            close = text.find('"', i + 1)
            if close < 0:
                raw = text[start:]
                raise QuerySyntaxError(
                    f"unclosed quote in {raw!r} (at character {start + 1}): add the closing \"",
                    token=raw, position=start,
                )
            value = text[i + 1 : close]
            quoted = True
            i = close + 1
            if i < n and not text[i].isspace():
                k = i
                while k < n and not text[k].isspace():
                    k += 1
                raw = text[start:k]
                raise QuerySyntaxError(
                    f"unexpected text after the closing quote in {raw!r}: "
                    "put a space between terms", token=raw, position=start,
                )
        else:
            k = i
            while k < n and not text[k].isspace():
                k += 1
            value = text[i:k]
            i = k
        tokens.append(_Token(text[start:i], start, negated, field, value, quoted))
    return tokens


def _parse_day(tok: _Token) -> dt.date:
    try:
        if len(tok.value) != 10:
            raise ValueError
        return dt.date.fromisoformat(tok.value)
    except ValueError:
        raise QuerySyntaxError(
            f"{tok.text!r}: {tok.value!r} is not a date; use YYYY-MM-DD, "
            f"e.g. {tok.field}:2026-01-31",
            token=tok.text, position=tok.position,
        ) from None


def _to_term(tok: _Token) -> Term:
    field, value = tok.field, tok.value
    if field is None:
        if not value:
            raise QuerySyntaxError(
                f"{tok.text!r} is empty: give a word or a phrase", token=tok.text,
                position=tok.position,
            )
        return Text(value, phrase=tok.quoted)
    if field not in KNOWN_FIELDS:
        raise QuerySyntaxError(
            f"unknown search field {field!r} in {tok.text!r} (known: {', '.join(KNOWN_FIELDS)}); "
            "to search for the text itself, put it in double quotes",
            token=tok.text, position=tok.position,
        )
    if not value.strip():
        raise QuerySyntaxError(
            f"{tok.text!r}: {field}: needs a value, e.g. {field}:{_EXAMPLES[field]}",
            token=tok.text, position=tok.position,
        )
    if field in ("from", "to"):
        if tok.quoted or any(ch.isspace() for ch in value):
            raise QuerySyntaxError(
                f"{tok.text!r}: an address or domain has no spaces", token=tok.text,
                position=tok.position,
            )
        addr = value.lower()
        if addr.count("@") > 1 or addr.endswith("@"):
            raise QuerySyntaxError(
                f"{tok.text!r}: {value!r} is neither an address nor a domain",
                token=tok.text, position=tok.position,
            )
        return Address(AddressRole(field), addr)
    if field == "subject":
        return Text(value, phrase=tok.quoted, scope=TextScope.SUBJECT)
    if field == "has":
        if value.lower() not in HAS_VALUES:
            raise QuerySyntaxError(
                f"{tok.text!r}: has: supports only {', '.join(HAS_VALUES)}",
                token=tok.text, position=tok.position,
            )
        return HasAttachment()
    if field in ("after", "before"):
        return DateTerm(DateBound(field), _parse_day(tok))
    if field == "account":
        return Account(value)
    return Filename(value.lower())


_EXAMPLES = {
    "from": "alice@example.com", "to": "example.com", "subject": "invoice",
    "has": "attachment", "after": "2026-01-01", "before": "2026-02-01", "account": "work",
    "filename": "report.pdf",
}


def parse_query(text: str) -> Query:
    """Parse search text into a :class:`Query`; raise :class:`QuerySyntaxError` on bad input."""
    if len(text) > MAX_QUERY_CHARS:
        raise QuerySyntaxError(f"the query is {len(text)} characters long; at most "
                               f"{MAX_QUERY_CHARS} are accepted")
    clauses: list[Clause] = []
    for tok in _tokenize(text):
        if tok.negated and tok.field is None and not tok.quoted and not tok.value:
            raise QuerySyntaxError(
                f"a lone '-' (at character {tok.position + 1}) must be followed by a term, "
                "e.g. -from:example.com", token=tok.text, position=tok.position,
            )
        clauses.append(Clause(_to_term(tok), negated=tok.negated))
    if len(clauses) > MAX_TERMS:
        raise QuerySyntaxError(f"the query has {len(clauses)} terms; at most {MAX_TERMS} "
                               "are accepted")
    return Query(tuple(clauses))


# ---------------------------------------------------------------------------------------------
# Elasticsearch translation
# ---------------------------------------------------------------------------------------------


def _wildcard_escape(text: str) -> str:
    """Make user text literal inside a ``wildcard`` pattern."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def _wildcard(field: str, pattern: str) -> dict[str, Any]:
    return {"wildcard": {field: {"value": pattern, "case_insensitive": True}}}


def _address_query(field: str, term: Address) -> dict[str, Any]:
    domain = term.domain
    if domain is not None:
        # Keyword field only (no domain sub-field in the document): a leading-wildcard
        # query is costly on huge indices but exact and core; acceptable for an archive search.
        return _wildcard(field, "*@" + _wildcard_escape(domain))
    return {"term": {field: {"value": term.value, "case_insensitive": True}}}


def _term_query(term: Term) -> tuple[dict[str, Any], bool]:
    """Return (query, scoring): scoring clauses go in ``must``, the rest in ``filter``."""
    if isinstance(term, Text):
        kind = "match_phrase" if term.phrase else "match"
        if term.scope is TextScope.SUBJECT:
            body: dict[str, Any] = {"query": term.value}
            if not term.phrase:
                body["operator"] = "and"
            return {kind: {FIELD_SUBJECT: body}}, True
        text_q: dict[str, Any] = {
            "multi_match": {
                "query": term.value,
                "fields": list(FREE_TEXT_FIELDS),
                "type": "phrase" if term.phrase else "best_fields",
            }
        }
        if not term.phrase:
            text_q["multi_match"]["operator"] = "and"
        name_q = _wildcard(FIELD_FILENAME, "*" + _wildcard_escape(term.value) + "*")
        return {"bool": {"should": [text_q, name_q], "minimum_should_match": 1}}, True
    if isinstance(term, Address):
        if term.role is AddressRole.FROM:
            return _address_query(FIELD_FROM, term), False
        return {"bool": {"should": [_address_query(f, term) for f in FIELDS_TO],
                         "minimum_should_match": 1}}, False
    if isinstance(term, DateTerm):
        op = "gte" if term.bound is DateBound.AFTER else "lt"
        return {"range": {FIELD_TIMESTAMP: {
            op: term.instant.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "format": "strict_date_optional_time",
        }}}, False
    if isinstance(term, HasAttachment):
        return {"term": {FIELD_HAS_ATTACHMENTS: True}}, False
    if isinstance(term, Account):
        return {"term": {FIELD_ACCOUNTS: term.account_id}}, False
    return _wildcard(FIELD_FILENAME, "*" + _wildcard_escape(term.value) + "*"), False


def to_es_query(query: Query) -> dict[str, Any]:
    """The ``query`` part of an Elasticsearch search body for ``query``.

    Words and phrases score (``must``); addresses, dates, flags and accounts only filter
    (``filter``, cacheable); negated terms go to ``must_not``. Free text is a ``multi_match``
    over :data:`FREE_TEXT_FIELDS` (subject, body text, attachment text) or an attachment-name
    wildcard.
    """
    must: list[dict[str, Any]] = []
    filters: list[dict[str, Any]] = []
    must_not: list[dict[str, Any]] = []
    for clause in query.clauses:
        q, scoring = _term_query(clause.term)
        if clause.negated:
            must_not.append(q)
        elif scoring:
            must.append(q)
        else:
            filters.append(q)
    if not (must or filters or must_not):
        return {"match_all": {}}
    body: dict[str, Any] = {}
    if must:
        body["must"] = must
    if filters:
        body["filter"] = filters
    if must_not:
        body["must_not"] = must_not
    return {"bool": body}
