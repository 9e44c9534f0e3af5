"""Retention configuration, periods, rule matching (first match wins) and holds."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from ingest.config import config_from_dict
from ingest.errors import ConfigError
from ingest.holds import HoldError, HoldStore
from ingest.retention import (
    DEFAULT_RULE,
    RetentionPolicy,
    first_rule,
    parse_duration,
    parse_retention,
    plan_retention,
)
from ingest.sinks.lifecycle import DocInfo, MemoryLifecycle
from ingest.sinks.memory import MemorySink

CONFIG_PATH = Path("/etc/popvault/test.toml")


def policy_of(retention: dict[str, Any]) -> RetentionPolicy:
    config = config_from_dict({"retention": retention}, path=CONFIG_PATH)
    policy = parse_retention(config)
    assert policy is not None
    return policy


RULES: dict[str, Any] = {
    "default": "10y",
    "rules": [
        {"name": "finance", "keep": "7y", "match": {"from_domain": "Bank.test"}},
        {"name": "support", "keep": "90d", "match": {"account": ["support", "helpdesk"]}},
        {"name": "legal", "keep": "forever", "match": {"address": "counsel@law.test",
                                                        "to_domain": "@law.test"}},
        {"name": "invoices", "keep": "1y", "match": {"query": "subject:invoice"}},
    ],
}


def doc(key: str = "k", *, accounts: tuple[str, ...] = ("work",),
        sender: str = "x@other.test", to: tuple[str, ...] = ("y@other.test",)) -> DocInfo:
    return DocInfo(message_key=key, timestamp="2020-01-01T00:00:00Z", raw_sha256=None,
                   accounts=accounts, from_addresses=(sender,), to_addresses=to)


# -- configuration ----------------------------------------------------------------------------


def test_parses_rules_in_order() -> None:
    policy = policy_of(RULES)
    assert [r.name for r in policy.rules] == ["finance", "support", "legal", "invoices"]
    assert policy.rules[0].match.from_domains == frozenset({"bank.test"})
    assert policy.rules[1].match.accounts == frozenset({"support", "helpdesk"})
    assert policy.rules[2].keep is None
    assert policy.rules[2].match.to_domains == frozenset({"law.test"})
    assert policy.default is not None and policy.default.months == 120


def test_no_retention_table_means_no_policy() -> None:
    assert parse_retention(config_from_dict({}, path=CONFIG_PATH)) is None


def test_keep_forever_default() -> None:
    assert policy_of({"keep_forever": True}).default is None


@pytest.mark.parametrize(("retention", "needle"), [
    ({}, "[retention]: key 'default': required"),
    ({"default": "10y", "keep_forever": True}, "key 'default': give either"),
    ({"default": "ten years"}, "[retention]: key 'default': 'ten years' is not a duration"),
    ({"default": "1y", "color": 1}, "key 'color': unknown key"),
    ({"default": "1y", "rules": [{"keep": "1y", "match": {"account": "a"}}]},
     "[[retention.rules]] entry 1: key 'name': required"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "7x", "match": {"account": "a"}}]},
     "rule 'fin': key 'keep': '7x' is not a duration"),
    ({"default": "1y", "rules": [{"name": "fin", "match": {"account": "a"}}]},
     "rule 'fin': key 'keep': required"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "1y", "match": {}}]},
     "rule 'fin': key 'match': give at least one"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "1y", "match": {"acount": "a"}}]},
     "rule 'fin': key 'match.acount': unknown key"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "1y",
                                  "match": {"query": "subject:\"open"}}]},
     "rule 'fin': key 'match.query': unclosed quote"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "1y",
                                  "match": {"from_domain": "a@b.test"}}]},
     "rule 'fin': key 'match.from_domain': 'a@b.test' is not a domain"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": "1y",
                                  "match": {"address": "nobody"}}]},
     "rule 'fin': key 'match.address': 'nobody' is not an address"),
    ({"default": "1y", "rules": [{"name": "fin", "keep": 7, "match": {"account": "a"}}]},
     "rule 'fin': key 'keep': expected a duration string"),
    ({"default": "1y", "rules": [{"name": "a", "keep": "1y", "match": {"account": "x"}},
                                 {"name": "a", "keep": "2y", "match": {"account": "y"}}]},
     "rule 'a': key 'name': already used"),
    ({"default": "1y", "batch_size": 0}, "key 'batch_size'"),
])
def test_errors_name_file_rule_and_key(retention: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_of(retention)
    assert str(CONFIG_PATH) in str(info.value)
    assert needle in str(info.value)


# -- periods ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "start", "end"), [
    ("7y", dt.datetime(2019, 3, 1, tzinfo=dt.UTC), dt.datetime(2026, 3, 1, tzinfo=dt.UTC)),
    ("1y", dt.datetime(2024, 2, 29, tzinfo=dt.UTC), dt.datetime(2025, 2, 28, tzinfo=dt.UTC)),
    ("1m", dt.datetime(2026, 1, 31, tzinfo=dt.UTC), dt.datetime(2026, 2, 28, tzinfo=dt.UTC)),
    ("90d", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, tzinfo=dt.UTC)),
    ("2w", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 15, tzinfo=dt.UTC)),
])
def test_durations_are_calendar_arithmetic(text: str, start: dt.datetime,
                                           end: dt.datetime) -> None:
    assert parse_duration(text).after(start) == end


@pytest.mark.parametrize("text", ["", "0d", "7", "y", "-1y", "1.5y", "7 years"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- matching ---------------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    policy = policy_of(RULES)
    hits = {"subject:invoice": {"inv"}}
    # A bank message in the support account matches finance and support: finance is first.
    both = doc("b", accounts=("support",), sender="teller@bank.test")
    assert first_rule(policy, both, hits)[0] == "finance"
    assert first_rule(policy, doc("s", accounts=("helpdesk",)), hits)[0] == "support"
    assert first_rule(policy, doc("inv"), hits)[0] == "invoices"
    assert first_rule(policy, doc("other"), hits)[0] == DEFAULT_RULE


def test_match_keys_are_anded() -> None:
    policy = policy_of(RULES)
    hits: dict[str, set[str]] = {"subject:invoice": set()}
    only_address = doc("l1", sender="counsel@law.test", to=("x@elsewhere.test",))
    assert first_rule(policy, only_address, hits)[0] == DEFAULT_RULE
    both = doc("l2", sender="counsel@law.test", to=("clerk@law.test",))
    assert first_rule(policy, both, hits)[0] == "legal"


def test_domain_match_is_exact_not_suffix() -> None:
    policy = policy_of(RULES)
    sub = doc("d", sender="x@evil-bank.test")
    assert first_rule(policy, sub, {"subject:invoice": set()})[0] == DEFAULT_RULE


# -- plan over the memory sink ----------------------------------------------------------------


def _memory_doc(when: str, subject: str, sender: str) -> dict[str, Any]:
    return {"@timestamp": when, "email": {"subject": subject, "from": {"address": [sender]}},
            "popvault": {"raw_sha256": "0" * 64, "accounts": ["work"]}}


def test_plan_counts_expired_held_and_undated(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.documents = {
        "old-invoice": _memory_doc("2020-01-01T00:00:00Z", "invoice 1", "a@x.test"),
        "held-invoice": _memory_doc("2020-02-01T00:00:00Z", "invoice 2", "carol@x.test"),
        "new-invoice": _memory_doc("2026-05-01T00:00:00Z", "invoice 3", "a@x.test"),
        "old-other": _memory_doc("2010-01-01T00:00:00Z", "hello", "a@x.test"),
        "undated": {"email": {"subject": "no date"}, "popvault": {"accounts": ["work"]}},
    }
    store = HoldStore(tmp_path)
    store.add("CASE-1", "from:carol@x.test", actor="t")
    policy = policy_of(RULES)
    plan = plan_retention(policy, MemoryLifecycle(sink), store.active(),
                          now=dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    by_rule = {t.rule: t for t in plan.tallies}
    assert sorted(plan.keys()) == ["old-invoice", "old-other"]
    assert plan.held_keys == {"held-invoice": ["CASE-1"]}
    assert (by_rule["invoices"].matched, by_rule["invoices"].expired,
            by_rule["invoices"].held) == (3, 1, 1)
    assert by_rule[DEFAULT_RULE].expired == 1
    assert by_rule[DEFAULT_RULE].oldest == "2010-01-01T00:00:00Z"
    assert plan.undated == 1 and plan.documents == 5
    assert json.loads(json.dumps(plan.to_dict()))["expired"] == 2


# -- holds ------------------------------------------------------------------------------------


def test_holds_add_list_release_and_history(tmp_path: Path) -> None:
    store = HoldStore(tmp_path)
    store.add("CASE-1", "from:a@x.test", actor="alice", note="matter 7")
    with pytest.raises(HoldError, match="already active"):
        store.add("CASE-1", "from:b@x.test", actor="alice")
    with pytest.raises(HoldError, match="not valid search syntax"):
        store.add("CASE-2", 'subject:"open', actor="alice")
    with pytest.raises(HoldError, match="hold name"):
        store.add("has space", "x", actor="alice")
    released = store.release("CASE-1", actor="bob")
    assert released.released_by == "bob" and not released.active
    assert store.active() == []
    assert [h.name for h in store.all()] == ["CASE-1"]
    with pytest.raises(HoldError, match="no active hold"):
        store.release("CASE-1", actor="bob")
    store.add("CASE-1", "from:c@x.test", actor="carol")  # a released name may be reused
    assert [h.query for h in store.active()] == ["from:c@x.test"]
    assert not list(tmp_path.glob(".holds-*"))  # no temporary files left behind


def test_damaged_holds_file_stops_retention(tmp_path: Path) -> None:
    (tmp_path / "holds.json").write_text("{not json")
    with pytest.raises(Exception, match="damaged"):
        HoldStore(tmp_path).active()
