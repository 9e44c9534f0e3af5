"""Conversation threading rules (:mod:`ingest.threads`) on hand-built documents.

The index side is the MemorySink's adapter; the integration suite runs the same rules over the
embedded and Elasticsearch sinks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ingest.config import config_from_dict
from ingest.errors import ConfigError
from ingest.sinks.base import IndexItem
from ingest.sinks.memory import MemorySink
from ingest.sinks.threadindex import thread_index_for
from ingest.threads import (
    DEFAULT_SUBJECT_WINDOW_DAYS,
    DEFAULT_TICKET_PATTERN,
    ThreadRules,
    is_generic_subject,
    normalize_subject,
    resolve_conversations,
    thread_rules_from_config,
    ticket_of,
)

CONFIG_PATH = Path("/etc/popvault/popvault.toml")


def doc(mid: str | None, subject: str | None = "Printer", *, refs: tuple[str, ...] = (),
        irt: tuple[str, ...] = (), day: int = 1, key: str | None = None) -> dict[str, Any]:
    """A document shaped like ingest.document's, with only what threading reads."""
    email: dict[str, Any] = {}
    if subject is not None:
        email["subject"] = subject
    return {
        "@timestamp": f"2026-03-{day:02d}T10:00:00Z",
        "email": email,
        "popvault": {
            "message_key": key or f"k-{mid or subject}-{day}",
            "message_id_normalized": mid,
            "thread": {"in_reply_to": list(irt), "references": list(refs)},
        },
    }


def ingest(sink: MemorySink, account: str, *docs: dict[str, Any],
           rules: ThreadRules | None = None) -> list[str]:
    """Resolve and write one batch, as Ingester._write does; the batch's conversation ids."""
    resolve_conversations(list(docs), account_id=account, rules=rules or ThreadRules(),
                          index=thread_index_for(sink))
    sink.write([IndexItem(d["popvault"]["message_key"], account, None, "0" * 64, 1, d)
                for d in docs])
    return [d["popvault"]["thread"]["conversation_id"] for d in docs]


def stored(sink: MemorySink) -> dict[str, str]:
    """message_key -> conversation id, as indexed."""
    return {k: d["popvault"]["thread"]["conversation_id"] for k, d in sink.documents.items()}


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


# -- subject normalization ------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "expected"), [
    ("Printer on fire", "printer on fire"),
    ("Re: Printer on fire", "printer on fire"),
    ("RE: re: Re:Printer on fire", "printer on fire"),
    ("Fwd: FW: Fw: Printer   on\tfire ", "printer on fire"),
    ("AW: WG: Drucker brennt", "drucker brennt"),  # German
    ("SV: VS: Skrivaren", "skrivaren"),  # Scandinavian, Finnish
    ("Antw: Doorst: Printer", "printer"),  # Dutch
    ("TR: RE : Imprimante", "imprimante"),  # French, with the space before the colon
    ("R: RIF: Stampante", "stampante"),  # Italian
    ("Odp: Drukarka", "drukarka"),  # Polish
    ("Enc: Res: Impressora", "impressora"),  # Portuguese
    ("RV: Impresora", "impresora"),  # Spanish forward
    ("回复: 答复: 转发: 打印机坏了", "打印机坏了"),  # Chinese
    ("回复：打印机坏了", "打印机坏了"),  # full-width colon
    ("Re[2]: Re(3): Printer", "printer"),  # reply counters
    ("[users] Re: [users] Printer", "printer"),  # list tags between markers
    ("Re: [#4711] Printer", "printer"),
    ("ＲＥ： Printer", "printer"),  # full-width letters (NFKC)
    ("STRASSE", "strasse"),
    ("Straße", "strasse"),  # casefold, not lower
    ("Re: Result: numbers", "result: numbers"),  # "Res" only with its own colon
    ("Trip report", "trip report"),  # "Tr" only as "TR:"
    ("Re:", ""),
    ("", ""),
    (None, ""),
])
def test_normalize_subject(subject: str | None, expected: str) -> None:
    assert normalize_subject(subject) == expected


@pytest.mark.parametrize("subject", ["", "Re:", "RE: Fwd:", "(no subject)", "Re: test",
                                     "AW: Hallo", "???", "Re: ...", "[list]"])
def test_generic_subjects_never_join(subject: str) -> None:
    assert is_generic_subject(normalize_subject(subject))


def test_specific_subject_is_not_generic() -> None:
    assert not is_generic_subject(normalize_subject("Re: Invoice 2026-0042 overdue"))


# -- tickets and configuration --------------------------------------------------------------


def test_ticket_default_named_and_absent() -> None:
    default = re.compile(DEFAULT_TICKET_PATTERN)
    assert ticket_of("Re: [#4711] Printer", default) == "4711"
    assert ticket_of("Printer #4711", default) is None
    assert ticket_of(None, default) is None
    named = re.compile(r"(?:prefix)?\[(?P<ticket>[A-Z]+-\d+)\]")
    assert ticket_of("AW: [HELP-12] Drucker", named) == "HELP-12"


def rules_from(support: Any) -> ThreadRules:
    return thread_rules_from_config(config_from_dict({"support": support}, path=CONFIG_PATH))


def test_rules_from_config_defaults_and_values() -> None:
    assert thread_rules_from_config(config_from_dict({})) == ThreadRules()
    rules = rules_from({"ticket_pattern": r"Ticket#(\d+)", "subject_window_days": 3,
                        "auto_reply_subjects": ["x"]})  # other [support] keys are not ours
    assert rules.ticket_pattern.pattern == r"Ticket#(\d+)"
    assert rules.subject_window_days == 3
    assert ThreadRules().subject_window_days == DEFAULT_SUBJECT_WINDOW_DAYS


@pytest.mark.parametrize(("support", "words"), [
    ({"ticket_pattern": "[#(\\d+"}, ["ticket_pattern", "not a valid regular expression"]),
    ({"ticket_pattern": r"\[#\d+\]"}, ["ticket_pattern", "capturing group"]),
    ({"ticket_pattern": ""}, ["ticket_pattern", "non-empty string"]),
    ({"ticket_pattern": 42}, ["ticket_pattern", "non-empty string"]),
    ({"subject_window_days": -1}, ["subject_window_days", "whole number"]),
    ({"subject_window_days": True}, ["subject_window_days"]),
    ({"subject_window_days": "14"}, ["subject_window_days"]),
    ({"subject_window_days": 100_000}, ["subject_window_days"]),
    ("not a table", ["[support] must be a table"]),
])
def test_rules_config_errors_name_file_and_key(support: Any, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        rules_from(support)
    text = str(err.value)
    assert str(CONFIG_PATH) in text
    for word in words:
        assert word in text


# -- the rules ------------------------------------------------------------------------------


def test_ticket_wins_over_references_and_sets_ticket(sink: MemorySink) -> None:
    d = doc("<b@x>", "Re: [#77] Printer", refs=("<a@x>",))
    assert ingest(sink, "support", d) == ["ticket:77"]
    assert d["popvault"]["thread"]["ticket"] == "77"
    assert d["popvault"]["thread"]["subject_normalized"] == "printer"


def test_custom_ticket_pattern(sink: MemorySink) -> None:
    rules = rules_from({"ticket_pattern": r"\(Case (\d+)\)"})
    assert ingest(sink, "support", doc("<a@x>", "Re: (Case 9) Printer"), rules=rules) == [
        "ticket:9"]
    assert ingest(sink, "support", doc("<b@x>", "Re: [#9] Printer", day=2), rules=rules) == [
        "<b@x>"]


def test_references_root_is_order_independent(sink: MemorySink) -> None:
    child = doc("<c@x>", "Re: Re: Plan", refs=("<a@x>", "<b@x>"), irt=("<b@x>",), day=3)
    parent = doc("<b@x>", "Re: Plan", refs=("<a@x>",), irt=("<a@x>",), day=2)
    root = doc("<a@x>", "Plan", day=1)
    assert ingest(sink, "support", child) == ["<a@x>"]
    assert ingest(sink, "support", parent) == ["<a@x>"]
    assert ingest(sink, "support", root) == ["<a@x>"]
    assert set(stored(sink).values()) == {"<a@x>"}


def test_references_root_with_ticket_joins_either_order(sink: MemorySink) -> None:
    # The root is tagged, the reply lacks the tag but has References.
    late_child = doc("<c@x>", "Re: Printer", refs=("<a@x>",), day=2)
    ingest(sink, "support", late_child)
    ingest(sink, "support", doc("<a@x>", "[#5] Printer", day=1))
    assert set(stored(sink).values()) == {"ticket:5"}
    assert ingest(sink, "support", doc("<d@x>", "Re: Printer", refs=("<a@x>",), day=3)) == [
        "ticket:5"]


def test_in_reply_to_parent_known(sink: MemorySink) -> None:
    ingest(sink, "support", doc("<a@x>", "Plan", day=1))
    assert ingest(sink, "support", doc("<b@x>", "Re: Plan", irt=("<a@x>",), day=2)) == [
        "<a@x>"]
    assert ingest(sink, "support", doc("<c@x>", "Re: Plan", irt=("<b@x>",), day=3)) == [
        "<a@x>"]


def test_child_before_parent_is_joined_when_parent_arrives(sink: MemorySink) -> None:
    # Chain G <- P <- C, arriving C, P, G; G is tagged, so everything ends on the ticket.
    assert ingest(sink, "support", doc("<c@x>", "Re: Plan", irt=("<p@x>",), day=3)) == [
        "<p@x>"]  # provisional
    assert ingest(sink, "support", doc("<p@x>", "Re: Plan", irt=("<g@x>",), day=2)) == [
        "<g@x>"]
    assert set(stored(sink).values()) == {"<g@x>"}  # the child followed its parent
    assert ingest(sink, "support", doc("<g@x>", "[#3] Plan", day=1)) == ["ticket:3"]
    assert set(stored(sink).values()) == {"ticket:3"}


def test_parents_in_the_same_batch_resolve_first(sink: MemorySink) -> None:
    batch = [doc("<c@x>", "Re: Plan", irt=("<p@x>",), day=3),
             doc("<p@x>", "Re: Plan", irt=("<g@x>",), day=2),
             doc("<g@x>", "[#8] Plan", day=1)]
    assert ingest(sink, "support", *batch) == ["ticket:8"] * 3


def test_reference_loop_terminates(sink: MemorySink) -> None:
    a = doc("<a@x>", "Loop", irt=("<b@x>",))
    b = doc("<b@x>", "Loop", irt=("<a@x>",))
    convs = ingest(sink, "support", a, b)
    assert len(set(convs)) == 1


def test_subject_joins_newest_in_window_same_account(sink: MemorySink) -> None:
    assert ingest(sink, "support", doc("<a@x>", "Printer jam", day=1)) == ["<a@x>"]
    assert ingest(sink, "support", doc("<b@x>", "Re: printer  JAM", day=5)) == ["<a@x>"]
    # Outside the window of both: a new conversation.
    assert ingest(sink, "support", doc("<z@x>", "Printer jam", day=28)) == ["<z@x>"]
    # Same subject, other account: never joins.
    assert ingest(sink, "sales", doc("<s@x>", "Printer jam", day=2)) == ["<s@x>"]
    # Day 5 (13 days before) and day 28 (10 days after) both match: the newest wins.
    assert ingest(sink, "support", doc("<m@x>", "AW: Printer jam", day=18)) == ["<z@x>"]


def test_subject_window_is_configurable_and_zero_disables(sink: MemorySink) -> None:
    ingest(sink, "support", doc("<a@x>", "Printer jam", day=1))
    narrow = rules_from({"subject_window_days": 2})
    assert ingest(sink, "support", doc("<b@x>", "Printer jam", day=5), rules=narrow) == [
        "<b@x>"]
    off = rules_from({"subject_window_days": 0})
    assert ingest(sink, "support", doc("<c@x>", "Printer jam", day=2), rules=off) == ["<c@x>"]


def test_subject_earlier_in_batch_joins(sink: MemorySink) -> None:
    assert ingest(sink, "support", doc("<a@x>", "Printer jam", day=3),
                  doc("<b@x>", "Re: Printer jam", day=1)) == ["<a@x>", "<a@x>"]


def test_generic_subject_never_joins(sink: MemorySink) -> None:
    ingest(sink, "support", doc("<a@x>", "Re:", day=1))
    assert ingest(sink, "support", doc("<b@x>", "RE:", day=1)) == ["<b@x>"]
    assert ingest(sink, "support", doc("<c@x>", "test", day=1),
                  doc("<d@x>", "Re: test", day=1)) == ["<c@x>", "<d@x>"]


def test_subject_rule_only_without_threading_headers(sink: MemorySink) -> None:
    ingest(sink, "support", doc("<a@x>", "Printer jam", day=1))
    assert ingest(sink, "support", doc("<b@x>", "Re: Printer jam", irt=("<q@x>",), day=2)) == [
        "<q@x>"]


def test_without_message_id_uses_the_message_key(sink: MemorySink) -> None:
    d = doc(None, "(no subject)", key="abc123")
    assert ingest(sink, "support", d) == ["key:abc123"]
    assert d["popvault"]["thread"]["subject_normalized"] == "(no subject)"
    assert "ticket" not in d["popvault"]["thread"]


def test_missing_subject_stores_empty_normalized_subject(sink: MemorySink) -> None:
    d = doc("<a@x>", None)
    assert ingest(sink, "support", d) == ["<a@x>"]
    assert d["popvault"]["thread"]["subject_normalized"] == ""


def test_unavailable_sink_fails_resolution(sink: MemorySink) -> None:
    from ingest.errors import SinkError

    sink.unavailable = True
    with pytest.raises(SinkError) as err:
        ingest(sink, "support", doc("<b@x>", "Re: Plan", irt=("<a@x>",)))
    assert err.value.transient


def test_long_in_batch_chain_resolves(sink: MemorySink) -> None:
    # A full pipeline batch (200) that is one In-Reply-To chain, newest first: the recursion
    # through in-batch parents stays far from Python's limit.
    chain = [doc(f"<m{i}@x>", "Re: Long", irt=(f"<m{i - 1}@x>",) if i else (), day=1,
                 key=f"k{i}") for i in range(200)]
    assert set(ingest(sink, "support", *reversed(chain))) == {"<m0@x>"}
