"""The corpus generator: deterministic, and it builds what it says it builds."""

from __future__ import annotations

import re

import pytest

from ingest.dedup import message_key, split_message
from ingest.document import parse_date
from tests import corpus


@pytest.mark.parametrize("mix", ["default", "duplicates", "hostile", "benchmark"])
def test_same_seed_same_bytes(mix: str) -> None:
    n = 12 if mix == "benchmark" else 40
    assert corpus.generate_mail(11, n, mix=mix) == corpus.generate_mail(11, n, mix=mix)
    assert corpus.generate_mail(11, n, mix=mix) != corpus.generate_mail(12, n, mix=mix)


@pytest.mark.parametrize("mix", ["default", "duplicates", "hostile"])
def test_expected_distinct_keys_hold(mix: str) -> None:
    built = corpus.generate_corpus(3, 60, mix=mix)
    assert len(built) == 60
    assert len({message_key(raw) for raw in built.messages}) == built.expected_distinct_keys


def test_duplicates_mix_really_has_duplicates() -> None:
    built = corpus.generate_corpus(3, 60, mix="duplicates")
    assert built.expected_distinct_keys < 60


def test_unique_message_ids_and_2026_dates() -> None:
    ids = []
    for raw in corpus.generate_mail(5, 90):
        head = split_message(raw)[0].decode("utf-8", "replace")
        mid = re.search(r"^Message-ID: (.*)$", head, re.M | re.I)
        if mid:
            ids.append(mid.group(1).strip())
        date = re.search(r"^Date: (.*)$", head, re.M)
        if date:
            stamp = parse_date(date.group(1))
            assert stamp is not None and stamp.startswith("2026-")
    assert len(ids) == len(set(ids)) > 70


def test_pairs_are_what_they_claim() -> None:
    first, second = corpus.same_message_two_deliveries()
    assert b"Delivered-To" in first and first != second
    one, two = corpus.same_message_id_different_content()
    assert split_message(one)[0] == split_message(two)[0]
    assert split_message(one)[1] != split_message(two)[1]


def test_benchmark_mix_proportions() -> None:
    built = corpus.benchmark_mix(1, 100)
    kinds = [name.split("#")[0] for name in built.names]
    assert 55 <= kinds.count("text") <= 85
    assert 12 <= kinds.count("attachments") <= 38
    assert kinds.count("large") <= 12
    for name, raw in zip(built.names, built.messages, strict=True):
        if name.startswith("large"):
            assert len(raw) > 1_000_000
        if name.startswith("text"):
            assert 2_000 <= len(raw) <= 25_000


def test_big_attachment_is_at_least_20_mib() -> None:
    assert len(corpus.big_attachment()) >= 20 * 1024 * 1024


def test_hostile_builders_contain_their_hostility() -> None:
    cases = corpus.special_cases()
    assert b"\x00" in cases["nul_bytes"]
    assert max(len(line) for line in cases["long_lines"].split(b"\r\n")) >= 10_000
    assert b"\r\n.hidden" in cases["dot_lines"]
    assert cases["nested_multipart_bomb"].count(b"multipart/mixed") > 1000
    assert b"Message-ID" not in cases["missing_message_id"]
    assert cases["empty"] == b""
