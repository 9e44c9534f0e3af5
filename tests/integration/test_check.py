"""check_account step by step against the real Dovecot."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.check import CheckStatus, CheckStep, check_account
from ingest.config import AccountConfig, config_from_dict

pytestmark = pytest.mark.integration

SECRET = "Chk-distinctive-Pw-5531"


def make_account(tmp_path: Path, mailbox: Any, **overrides: Any) -> AccountConfig:
    data = mailbox.account_config(**overrides)
    cfg = config_from_dict({"archive": {"path": str(tmp_path / "archive")}, "accounts": [data]})
    return cfg.accounts[0]


def names(steps: list[CheckStep]) -> list[str]:
    return [s.name for s in steps]


def assert_no_secret(steps: list[CheckStep], secret: str) -> None:
    assert secret not in json.dumps([s.to_dict() for s in steps])


@pytest.fixture
def mailbox(mailbox_factory: Callable[..., Any]) -> Any:
    box = mailbox_factory(password=SECRET)
    box.deliver_many([b"Subject: a\n\nx\n", b"Subject: b\n\ny\n"])
    return box


def test_all_ok_over_tls(tmp_path: Path, mailbox: Any) -> None:
    steps = check_account(make_account(tmp_path, mailbox))
    assert names(steps) == ["dns", "tcp", "tls", "greeting", "capa", "auth", "stat", "uidl"]
    assert all(s.status is CheckStatus.OK for s in steps), steps
    by = {s.name: s for s in steps}
    assert "certificate verified" in by["tls"].detail and "CN=localhost" in by["tls"].detail
    assert "PIPELINING" in by["capa"].detail
    assert "PLAIN" in by["auth"].detail
    assert by["stat"].detail.startswith("2 messages")
    assert by["uidl"].detail == "UIDL supported (2 ids)"
    assert_no_secret(steps, SECRET)
    assert mailbox.count() == 2


def test_starttls_has_stls_step(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, security="starttls", port=stack.pop3_port)
    steps = check_account(acc)
    assert names(steps) == ["dns", "tcp", "greeting", "capa", "stls", "auth", "stat", "uidl"]
    assert all(s.status is CheckStatus.OK for s in steps), steps
    assert "STLS" in steps[3].detail


def test_untrusted_ca_fails_at_tls(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    steps = check_account(make_account(tmp_path, mailbox, ca_file=str(stack.other_ca_file)))
    assert names(steps) == ["dns", "tcp", "tls"]
    last = steps[-1]
    assert last.status is CheckStatus.FAIL
    assert "not trusted" in last.detail
    assert last.advice and "not signed by a CA you trust" in last.advice
    assert str(stack.other_ca_file) in last.advice


def test_verify_off_warns(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    acc = make_account(tmp_path, mailbox, ca_file=str(stack.other_ca_file), verify=False)
    steps = check_account(acc)
    assert steps[2].name == "tls" and steps[2].status is CheckStatus.WARN
    assert "NOT verified" in steps[2].detail
    assert steps[-1].name == "uidl"


def test_refused_port_advice(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    with socket.socket() as sock:
        sock.bind((stack.host, 0))
        closed = sock.getsockname()[1]
    steps = check_account(make_account(tmp_path, mailbox, port=closed))
    assert names(steps) == ["dns", "tcp"]
    assert steps[-1].status is CheckStatus.FAIL
    assert steps[-1].advice and "starttls" in steps[-1].advice


def test_unknown_host(tmp_path: Path, mailbox: Any) -> None:
    steps = check_account(make_account(tmp_path, mailbox, host="no-such-host.invalid"))
    assert names(steps) == ["dns"] and steps[0].status is CheckStatus.FAIL
    assert "cannot resolve" in steps[0].detail


def test_wrong_password_fails_at_auth(tmp_path: Path, mailbox_factory: Callable[..., Any],
                                      mailbox: Any) -> None:
    other = mailbox_factory(password="not-" + SECRET)
    acc = make_account(tmp_path, mailbox)
    acc_wrong = make_account(tmp_path, mailbox,
                             password_env=other.account_config()["password_env"])
    steps = check_account(acc_wrong)
    assert steps[-1].name == "auth" and steps[-1].status is CheckStatus.FAIL
    assert "rejected" in steps[-1].detail
    assert steps[-1].advice and "password" in steps[-1].advice
    assert_no_secret(steps, SECRET)
    assert_no_secret(steps, "not-" + SECRET)
    assert check_account(acc)[-1].status is CheckStatus.OK


def test_plaintext_warns_or_refuses(tmp_path: Path, mailbox: Any, stack: Any) -> None:
    refused = make_account(tmp_path, mailbox, security="none", port=stack.pop3_port,
                           auth="user")
    steps = check_account(refused)
    assert steps[-1].name == "auth" and steps[-1].status is CheckStatus.FAIL
    assert steps[-1].advice and "allow_plaintext_auth" in steps[-1].advice
    allowed = make_account(tmp_path, mailbox, security="none", port=stack.pop3_port,
                           auth="user", allow_plaintext_auth=True)
    steps = check_account(allowed)
    auth = {s.name: s for s in steps}["auth"]
    assert auth.status is CheckStatus.WARN and "unencrypted" in auth.detail
    assert steps[-1].name == "uidl"
