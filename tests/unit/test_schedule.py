"""Scheduler decisions without Redis: settings, jitter, due times, backoff, next poll."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from ingest.config import config_from_dict
from ingest.errors import AuthError, ConnectError, LoginDelay
from workers import keys
from workers.health import settings_hash
from workers.limits import MAX_BACKOFF_S, backoff_s
from workers.schedule import (
    MIN_TASKS_PER_ROUND,
    ScheduleConfig,
    batch_size,
    first_due_ms,
    jittered_interval_ms,
    next_poll,
    parse_worker_settings,
)

pytestmark = pytest.mark.unit


def _config(extra: dict[str, Any] | None = None, **account: Any) -> Any:
    acc = {"id": "a1", "host": "pop.example.com", "username": "u", "password_env": "PW",
           **account}
    return config_from_dict({"accounts": [acc], "broker": {"url": "redis://x/0"},
                             **(extra or {})})


def test_defaults_respect_time_limit_order() -> None:
    s = parse_worker_settings(_config()).schedule
    assert s.task_soft_time_limit_s < s.task_time_limit_s < s.visibility_timeout_s


def test_schedule_table_is_read() -> None:
    settings = parse_worker_settings(_config({
        "schedule": {"sweep_interval_s": 2, "jitter_fraction": 0.5, "max_backlog": 7},
        "hosts": [{"host": "POP.Example.com", "max_connections": 2}],
        "metrics": {"port": 9808},
    }))
    assert settings.schedule.sweep_interval_s == 2.0
    assert settings.schedule.jitter_fraction == 0.5
    assert settings.schedule.max_backlog == 7
    assert settings.max_connections("pop.example.COM") == 2
    assert settings.max_connections("other.example.com") == 4
    assert settings.metrics_port == 9808


@pytest.mark.parametrize("table, words", [
    ({"schedule": {"task_soft_time_limit_s": 100, "task_time_limit_s": 90}}, "soft"),
    ({"schedule": {"task_time_limit_s": 5000, "visibility_timeout_s": 4000}}, "visibility"),
    ({"schedule": {"sweep_interval": 5}}, "unknown key 'sweep_interval'"),
    ({"schedule": {"max_backlog": 1.5}}, "expected an integer"),
    ({"schedule": {"jitter_fraction": True}}, "expected a number"),
    ({"hosts": [{"max_connections": 2}]}, "'host' is required"),
    ({"hosts": [{"host": "h", "max_connections": 0}]}, "at least 1"),
    ({"hosts": [{"host": "h"}, {"host": "H"}]}, "appears twice"),
    ({"hosts": [{"host": "h", "max_conn": 3}]}, "unknown key 'max_conn'"),
    ({"metrics": {"port": 70000}}, "1-65535"),
    ({"schedule": {"poll_batch": 0}}, "at least 1"),
    ({"schedule": {"poll_batch_handoff_s": 60, "task_soft_time_limit_s": 100,
                   "task_time_limit_s": 200}}, "poll_batch_handoff_s"),
])
def test_bad_settings_name_the_key(table: dict[str, Any], words: str) -> None:
    from ingest.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        parse_worker_settings(_config(table))


def test_jitter_stays_within_fraction() -> None:
    rng = random.Random(1)
    values = [jittered_interval_ms(300, 0.1, rng) for _ in range(2000)]
    assert min(values) >= 300_000
    assert max(values) <= 330_000
    assert max(values) - min(values) > 20_000  # actually spread


def test_first_due_spreads_new_accounts_but_not_beyond_interval() -> None:
    rng = random.Random(2)
    now = 1_000_000
    spread = [first_due_ms(now, 300, 60, rng) - now for _ in range(1000)]
    assert min(spread) >= 0 and max(spread) <= 60_000
    short = [first_due_ms(now, 5, 60, rng) - now for _ in range(1000)]
    assert max(short) <= 5_000
    assert {first_due_ms(now, 300, 0, rng) for _ in range(10)} == {now}


def test_backoff_doubles_and_is_capped() -> None:
    assert backoff_s(300, 0) == 300
    assert backoff_s(300, 1) == 600
    assert backoff_s(300, 3) == 2400
    assert backoff_s(300, 10) == MAX_BACKOFF_S
    assert backoff_s(300, 10_000) == MAX_BACKOFF_S
    assert backoff_s(30_000, 5, cap_s=3600) == 30_000  # never below the interval


def test_next_poll_after_success_is_interval_plus_jitter() -> None:
    s = ScheduleConfig(jitter_fraction=0.1)
    plan = next_poll(300, None, False, 0, s, random.Random(3))
    assert not plan.failed and plan.reason == "ok"
    assert 300 <= plan.delay_s <= 330


def test_next_poll_soon_when_messages_pending() -> None:
    s = ScheduleConfig(more_pending_delay_s=5)
    plan = next_poll(300, None, True, 0, s)
    assert plan == replace(plan, delay_s=5.0, failed=False, reason="more_pending")


def test_login_delay_waits_what_the_server_asked_and_is_no_failure() -> None:
    s = ScheduleConfig()
    plan = next_poll(300, LoginDelay("too soon", delay_s=900), False, 2, s)
    assert plan.delay_s == 900 and not plan.failed and plan.reason == "login_delay"


def test_failures_back_off_exponentially() -> None:
    s = ScheduleConfig(jitter_fraction=0.0, max_backoff_s=3600)
    err = ConnectError("refused")
    delays = [next_poll(60, err, False, n, s).delay_s for n in range(8)]
    assert delays == [120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert next_poll(60, AuthError("no"), False, 0, s).failed


def test_keys_are_prefixed_and_distinct() -> None:
    built = [keys.due(), keys.paused(), keys.account_lock("a"), keys.host_slots("H.example"),
             keys.health("a"), keys.sweep_stats()]
    assert all(k.startswith("popvault:") for k in built)
    assert len(set(built)) == len(built)
    assert keys.host_slots("POP.EXAMPLE.COM") == keys.host_slots("pop.example.com")


def test_settings_hash_tracks_connection_settings_only() -> None:
    base = _config().accounts[0]
    assert settings_hash(base) == settings_hash(_config().accounts[0])
    assert settings_hash(base) != settings_hash(_config(username="v").accounts[0])
    assert settings_hash(base) != settings_hash(_config(password_env="PW2").accounts[0])
    assert settings_hash(base) == settings_hash(_config(interval_s=60).accounts[0])


@pytest.mark.parametrize("claimed, most, expected", [
    (0, 16, 1), (1, 16, 1), (MIN_TASKS_PER_ROUND, 16, 1), (MIN_TASKS_PER_ROUND + 1, 16, 1),
    (2 * MIN_TASKS_PER_ROUND, 16, 2),
    (300, 16, 16), (500, 16, 16), (500, 1, 1), (100, 4, 4),
])
def test_batches_are_bounded_and_a_round_makes_enough_tasks(claimed: int, most: int,
                                                            expected: int) -> None:
    size = batch_size(claimed, most)
    assert size == expected
    if claimed:
        tasks = -(-claimed // size)
        assert tasks >= min(claimed, MIN_TASKS_PER_ROUND) or size == most
