"""Login logic against a scripted channel: mechanism choice, exchanges, errors, no secrets."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ingest.config import AccountConfig, config_from_dict
from ingest.errors import (
    AuthError,
    LoginDelay,
    MailboxInUse,
    PlaintextRefused,
    PopvaultError,
    ProtocolError,
    ServerPermFail,
    ServerTempFail,
)
from ingest.pop3.auth import apop_digest, authenticate, choose_mechanism, xoauth2_blob
from ingest.pop3.protocol import Capabilities, Reply, parse_capabilities, parse_reply

pytestmark = pytest.mark.unit

SECRET = "Zq7-distinctive-P@ss-41"
TOKEN = "eyJ0eXAi" + "T" * 5000  # longer than any line cap a client might have
TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"


class Script:
    """A channel that answers from a list and records what was sent (logged form too)."""

    def __init__(self, replies: list[bytes], *, encrypted: bool = True) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []
        self.shown: list[str] = []
        self._encrypted = encrypted

    @property
    def encrypted(self) -> bool:
        return self._encrypted

    def send_line(self, line: bytes, *, redacted: str | None = None) -> None:
        self.sent.append(line)
        self.shown.append(redacted if redacted is not None else line.decode())
        logging.getLogger("popvault.pop3").debug("C: %s", self.shown[-1])

    def read_reply(self) -> Reply:
        return parse_reply(self.replies.pop(0))


def account(tmp_path: Path, **over: Any) -> AccountConfig:
    acc = {"id": "acct", "host": "pop.example.net", "username": "alice",
           "password_env": "POPVAULT_TEST_UNUSED", **over}
    if over.get("auth") == "xoauth2":
        acc["token_env"] = "POPVAULT_TEST_UNUSED_TOKEN"
    cfg = config_from_dict({"archive": {"path": str(tmp_path)}, "accounts": [acc]})
    return cfg.accounts[0]


CAPS_ALL = parse_capabilities([b"USER", b"SASL PLAIN XOAUTH2", b"UIDL", b"PIPELINING"])
CAPS_USER = parse_capabilities([b"USER", b"UIDL"])
CAPS_NONE = parse_capabilities([b"UIDL"])
UNKNOWN = Capabilities.unknown()


@pytest.mark.parametrize(
    ("caps", "ts", "encrypted", "allow", "expect"),
    [
        (CAPS_ALL, None, True, False, "plain"),
        (CAPS_USER, None, True, False, "user"),
        (UNKNOWN, None, True, False, "user"),
        (CAPS_NONE, TIMESTAMP, True, False, "apop"),
        (CAPS_ALL, TIMESTAMP, False, False, "apop"),  # plaintext link: only APOP may go
        (CAPS_ALL, None, False, True, "plain"),
    ],
)
def test_choose_auto(caps: Capabilities, ts: bytes | None, encrypted: bool, allow: bool,
                     expect: str) -> None:
    assert choose_mechanism("auto", caps, ts, encrypted=encrypted,
                            allow_plaintext=allow) == expect


def test_choose_refuses() -> None:
    with pytest.raises(PlaintextRefused, match="unencrypted"):
        choose_mechanism("auto", CAPS_ALL, None, encrypted=False, allow_plaintext=False)
    with pytest.raises(PlaintextRefused):
        choose_mechanism("xoauth2", CAPS_ALL, None, encrypted=False, allow_plaintext=False)
    with pytest.raises(AuthError, match="no login mechanism"):
        choose_mechanism("auto", CAPS_NONE, None, encrypted=True, allow_plaintext=False)
    assert choose_mechanism("apop", CAPS_NONE, TIMESTAMP, encrypted=False,
                            allow_plaintext=False) == "apop"


@pytest.mark.parametrize("mech", ["user", "plain", "xoauth2", "auto"])
def test_plaintext_refused_before_anything_is_sent(tmp_path: Path, mech: str) -> None:
    ch = Script([], encrypted=False)
    with pytest.raises(PlaintextRefused):
        authenticate(ch, account(tmp_path, auth=mech), caps=CAPS_ALL, apop_timestamp=None,
                     password=SECRET, token=TOKEN)
    assert ch.sent == []


def test_user_pass(tmp_path: Path) -> None:
    ch = Script([b"+OK", b"+OK logged in"])
    mech = authenticate(ch, account(tmp_path, auth="user"), caps=CAPS_USER,
                        apop_timestamp=None, password=SECRET, token=None)
    assert mech == "user"
    assert ch.sent == [b"USER alice", b"PASS " + SECRET.encode()]
    assert ch.shown[1] == "PASS ***"


def test_user_pass_rejected(tmp_path: Path) -> None:
    ch = Script([b"+OK", b"-ERR [AUTH] Authentication failed."])
    with pytest.raises(AuthError) as info:
        authenticate(ch, account(tmp_path, auth="user"), caps=CAPS_USER,
                     apop_timestamp=None, password=SECRET, token=None)
    exc = info.value
    assert type(exc) is AuthError
    assert "rejected the user name or password" in exc.message
    assert exc.server_reply == "-ERR [AUTH] Authentication failed."
    assert exc.account_id == "acct"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"-ERR [IN-USE] Mailbox is locked", MailboxInUse),
        (b"-ERR [LOGIN-DELAY] too soon", LoginDelay),
        (b"-ERR [SYS/TEMP] backend down", ServerTempFail),
        (b"-ERR [SYS/PERM] account disabled", ServerPermFail),
        (b"-ERR [AUTH] bad", AuthError),
        (b"-ERR nope", AuthError),
    ],
)
def test_codes_on_login(tmp_path: Path, line: bytes, kind: type[PopvaultError]) -> None:
    caps = parse_capabilities([b"USER", b"LOGIN-DELAY 300"])
    ch = Script([b"+OK", line])
    with pytest.raises(kind) as info:
        authenticate(ch, account(tmp_path, auth="user"), caps=caps, apop_timestamp=None,
                     password=SECRET, token=None)
    assert type(info.value) is kind
    if isinstance(info.value, LoginDelay):
        assert info.value.delay_s == 300


def test_apop_rfc1939_example(tmp_path: Path) -> None:
    assert apop_digest(TIMESTAMP, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"
    ch = Script([b"+OK maildrop has 1 message"], encrypted=False)
    mech = authenticate(ch, account(tmp_path, auth="apop"), caps=UNKNOWN,
                        apop_timestamp=TIMESTAMP, password="tanstaaf", token=None)
    assert mech == "apop"
    assert ch.sent == [b"APOP alice c4c9334bac560ecc979e58001b3e22fb"]
    assert "c4c9" not in ch.shown[0]


def test_apop_without_timestamp(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="no APOP timestamp"):
        authenticate(Script([]), account(tmp_path, auth="apop"), caps=UNKNOWN,
                     apop_timestamp=None, password=SECRET, token=None)


def test_auth_plain_continuation(tmp_path: Path) -> None:
    ch = Script([b"+ ", b"+OK Logged in."])
    authenticate(ch, account(tmp_path, auth="plain"), caps=CAPS_ALL, apop_timestamp=None,
                 password=SECRET, token=None)
    assert ch.sent[0] == b"AUTH PLAIN"
    assert base64.b64decode(ch.sent[1]) == b"\0alice\0" + SECRET.encode()
    assert ch.shown[1] == "***"


def test_auth_plain_refused_mechanism(tmp_path: Path) -> None:
    ch = Script([b"-ERR Unsupported authentication mechanism."])
    with pytest.raises(AuthError, match="does not accept"):
        authenticate(ch, account(tmp_path, auth="plain"), caps=CAPS_ALL, apop_timestamp=None,
                     password=SECRET, token=None)
    assert ch.sent == [b"AUTH PLAIN"]


def test_auth_plain_premature_ok_is_protocol_error(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="before receiving"):
        authenticate(Script([b"+OK"]), account(tmp_path, auth="plain"), caps=CAPS_ALL,
                     apop_timestamp=None, password=SECRET, token=None)


def test_xoauth2_long_token(tmp_path: Path) -> None:
    ch = Script([b"+ ", b"+OK"])
    authenticate(ch, account(tmp_path, auth="xoauth2"), caps=CAPS_ALL, apop_timestamp=None,
                 password=None, token=TOKEN)
    assert ch.sent[0] == b"AUTH XOAUTH2"
    assert len(ch.sent[1]) > 6000
    assert base64.b64decode(ch.sent[1]) == f"user=alice\x01auth=Bearer {TOKEN}\x01\x01".encode()
    assert ch.sent[1] == xoauth2_blob("alice", TOKEN)


def test_xoauth2_error_challenge(tmp_path: Path) -> None:
    err = {"status": "401", "schemes": "bearer",
           "scope": "https://outlook.office.com/POP.AccessAsUser.All"}
    challenge = b"+ " + base64.b64encode(json.dumps(err).encode())
    ch = Script([b"+ ", challenge, b"-ERR Authentication failure: unknown user name or bad "
                 b"password."])
    with pytest.raises(AuthError) as info:
        authenticate(ch, account(tmp_path, auth="xoauth2"), caps=CAPS_ALL,
                     apop_timestamp=None, password=None, token=TOKEN)
    assert ch.sent[-1] == b""  # the challenge was answered with an empty line
    assert "status 401" in info.value.message
    assert "OAuth2 token" in info.value.message


def test_secrets_never_leak(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Provoke every failure we can; the secret must not appear anywhere we show."""
    caplog.set_level(logging.DEBUG, logger="popvault.pop3")
    echo = f"-ERR bad password {SECRET} for alice token {TOKEN[:40]}".encode()
    cases: list[tuple[str, list[bytes], bool, bytes | None]] = [
        ("user", [b"+OK", echo], True, None),
        ("user", [b"-ERR [SYS/TEMP] " + SECRET.encode()], True, None),
        ("plain", [b"+ ", echo], True, None),
        ("plain", [echo], True, None),
        ("apop", [echo], False, TIMESTAMP),
        ("xoauth2", [b"+ ", echo], True, None),
        ("xoauth2", [b"+ ", b"+ bm90IGpzb24=", echo], True, None),
        ("user", [], False, None),
        ("auto", [b"+ ", b"-ERR [IN-USE] " + SECRET.encode()], True, None),
    ]
    errors: list[PopvaultError] = []
    for mech, replies, encrypted, ts in cases:
        with pytest.raises(PopvaultError) as info:
            authenticate(Script(replies, encrypted=encrypted), account(tmp_path, auth=mech),
                         caps=CAPS_ALL, apop_timestamp=ts, password=SECRET, token=TOKEN)
        errors.append(info.value)
    for exc in errors:
        for text in (str(exc), repr(exc), json.dumps(exc.to_dict())):
            assert SECRET not in text
            assert TOKEN[:40] not in text
    assert SECRET not in caplog.text and TOKEN[:40] not in caplog.text
    assert len(errors) == len(cases)
