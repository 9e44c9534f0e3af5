"""ingest.searchquery: parsing, error messages and the Elasticsearch translation."""

from __future__ import annotations

import datetime as dt

import pytest

from ingest.searchquery import (
    Account,
    Address,
    AddressRole,
    Clause,
    DateBound,
    DateTerm,
    Filename,
    HasAttachment,
    Query,
    QuerySyntaxError,
    Text,
    TextScope,
    parse_query,
    to_es_query,
)

pytestmark = pytest.mark.unit


def terms(text: str) -> list[tuple[object, bool]]:
    return [(c.term, c.negated) for c in parse_query(text).clauses]


def test_every_term_kind() -> None:
    q = parse_query(
        'from:Alice@Example.com to:example.org subject:invoice subject:"march invoice" '
        'has:attachment after:2026-01-01 before:2026-02-01 account:work filename:Report '
        'budget "quarterly plan"'
    )
    assert [c.term for c in q.clauses] == [
        Address(AddressRole.FROM, "alice@example.com"),
        Address(AddressRole.TO, "example.org"),
        Text("invoice", scope=TextScope.SUBJECT),
        Text("march invoice", phrase=True, scope=TextScope.SUBJECT),
        HasAttachment(),
        DateTerm(DateBound.AFTER, dt.date(2026, 1, 1)),
        DateTerm(DateBound.BEFORE, dt.date(2026, 2, 1)),
        Account("work"),
        Filename("report"),
        Text("budget"),
        Text("quarterly plan", phrase=True),
    ]
    assert not any(c.negated for c in q.clauses)


def test_negation_of_each_form() -> None:
    assert terms('-from:x.com -"a phrase" -word -has:attachment') == [
        (Address(AddressRole.FROM, "x.com"), True),
        (Text("a phrase", phrase=True), True),
        (Text("word"), True),
        (HasAttachment(), True),
    ]


def test_address_or_domain() -> None:
    assert Address(AddressRole.FROM, "example.com").domain == "example.com"
    assert Address(AddressRole.FROM, "@example.com").domain == "example.com"
    assert Address(AddressRole.FROM, "a@example.com").domain is None


def test_field_names_are_case_insensitive_and_whitespace_is_free() -> None:
    assert terms("  FROM:a@b.c\tSubject:Hi  ") == [
        (Address(AddressRole.FROM, "a@b.c"), False),
        (Text("Hi", scope=TextScope.SUBJECT), False),
    ]


def test_text_with_colon_but_no_field_is_free_text() -> None:
    assert terms("10:30") == [(Text("10:30"), False)]


def test_empty_query_matches_everything() -> None:
    assert parse_query("   ") == Query(())
    assert to_es_query(parse_query("")) == {"match_all": {}}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('subject:"unclosed', 'subject:"unclosed'),
        ("form:alice", "form:alice"),
        ("after:2026-13-01", "after:2026-13-01"),
        ("before:yesterday", "before:yesterday"),
        ("has:pdf", "has:pdf"),
        ("from:", "from:"),
        ('from:"a b"', 'from:"a b"'),
        ("from:a@b@c", "from:a@b@c"),
        ('"a"b', '"a"b'),
        ("word - other", "-"),
    ],
)
def test_errors_name_the_bad_token(text: str, names: str) -> None:
    with pytest.raises(QuerySyntaxError) as err:
        parse_query(text)
    assert isinstance(err.value, ValueError)
    assert err.value.token == names
    assert repr(names) in str(err.value) or names in str(err.value)


def test_unknown_field_suggests_quotes() -> None:
    with pytest.raises(QuerySyntaxError, match="double quotes"):
        parse_query("https://example.com")
    assert terms('"https://example.com"') == [(Text("https://example.com", phrase=True), False)]


def test_limits() -> None:
    with pytest.raises(QuerySyntaxError, match="characters"):
        parse_query("a" * 5000)
    with pytest.raises(QuerySyntaxError, match="terms"):
        parse_query(" ".join(["w"] * 100))


def test_es_translation_puts_text_in_must_filters_in_filter_and_negations_in_must_not() -> None:
    q = to_es_query(parse_query(
        "from:example.com to:bob@example.org subject:hello has:attachment after:2026-01-05 "
        "-account:old budget"))
    body = q["bool"]
    assert body["filter"] == [
        {"wildcard": {"email.from.address": {"value": "*@example.com",
                                             "case_insensitive": True}}},
        {"bool": {"should": [
            {"term": {f: {"value": "bob@example.org", "case_insensitive": True}}}
            for f in ("email.to.address", "email.cc.address", "email.bcc.address")
        ], "minimum_should_match": 1}},
        {"term": {"popvault.has_attachments": True}},
        {"range": {"@timestamp": {"gte": "2026-01-05T00:00:00Z",
                                  "format": "strict_date_optional_time"}}},
    ]
    assert body["must"][0] == {"match": {"email.subject": {"query": "hello", "operator": "and"}}}
    free = body["must"][1]["bool"]["should"]
    assert free[0]["multi_match"]["fields"] == ["email.subject", "popvault.body_text",
                                                "popvault.attachment_text"]
    assert free[1] == {"wildcard": {"email.attachments.file.name": {
        "value": "*budget*", "case_insensitive": True}}}
    assert body["must_not"] == [{"term": {"popvault.accounts": "old"}}]


def test_es_phrase_and_before_and_wildcard_escaping() -> None:
    q = to_es_query(Query((
        Clause(Text("a b", phrase=True, scope=TextScope.SUBJECT)),
        Clause(DateTerm(DateBound.BEFORE, dt.date(2026, 2, 1))),
        Clause(Filename("we*ird?")),
    )))
    assert q["bool"]["must"] == [{"match_phrase": {"email.subject": {"query": "a b"}}}]
    assert q["bool"]["filter"][0] == {"range": {"@timestamp": {
        "lt": "2026-02-01T00:00:00Z", "format": "strict_date_optional_time"}}}
    assert q["bool"]["filter"][1]["wildcard"]["email.attachments.file.name"]["value"] == (
        "*we\\*ird\\?*")
