"""Configuration: the TOML contract, and errors that name file, account and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import config_from_dict, load_config, resolve_secret
from ingest.errors import ConfigError


def _account(**over: object) -> dict[str, object]:
    acc: dict[str, object] = {"id": "support", "host": "pop.example.com",
                              "username": "support@example.com", "password_env": "PV_TEST_PW"}
    acc.update(over)
    return acc


def test_full_contract_parses(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg_file = tmp_path / "popvault.toml"
    cfg_file.write_text(f'''
[archive]
path = "{tmp_path / 'arch'}"

[elasticsearch]
url = "http://127.0.0.1:9200"
index_prefix = "popvault"

[[accounts]]
id = "support"
host = "127.0.0.1"
port = 995
security = "tls"
username = "support@example.com"
password_env = "SUPPORT_POP_PASSWORD"
ca_file = "{ca}"
auth = "auto"
allow_plaintext_auth = false
on_archived = "delete_after_days:30"
max_message_bytes = 52428800
''')
    cfg = load_config(cfg_file)
    acc = cfg.account("support")
    assert acc.port == 995 and acc.security == "tls" and acc.ca_file == ca
    assert acc.on_archived.action == "delete_after_days" and acc.on_archived.days == 30
    assert acc.verify is True
    assert cfg.elasticsearch is not None and cfg.elasticsearch.index_prefix == "popvault"
    assert cfg.archive_path == tmp_path / "arch"


def test_starttls_defaults_to_port_110() -> None:
    cfg = config_from_dict({"accounts": [_account(security="starttls")]})
    assert cfg.accounts[0].port == 110


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"security": "ssl"}, "security"),
        ({"port": 70000}, "port"),
        ({"on_archived": "delete_later"}, "on_archived"),
        ({"auth": "kerberos"}, "auth"),
        ({"max_message_bytes": -1}, "max_message_bytes"),
        ({"hots": "typo"}, "hots"),
        ({"password": "hunter2"}, "password"),
        ({"port": "995"}, "port"),
        ({"verify": "yes"}, "verify"),
    ],
)
def test_errors_name_file_account_and_key(tmp_path: Path, override: dict[str, object],
                                          key: str) -> None:
    path = tmp_path / "bad.toml"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"accounts": [_account(**override)]}, path=path)
    text = str(info.value)
    assert str(path) in text and "'support'" in text and repr(key) in text
    assert "hunter2" not in text


def test_duplicate_and_missing_ids() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        config_from_dict({"accounts": [_account(), _account()]})
    with pytest.raises(ConfigError, match="'id'"):
        config_from_dict({"accounts": [_account(id="bad id!")]})


def test_missing_password_source_and_xoauth2_token() -> None:
    acc = _account()
    del acc["password_env"]
    with pytest.raises(ConfigError, match="password_env"):
        config_from_dict({"accounts": [acc]})
    with pytest.raises(ConfigError, match="token"):
        config_from_dict({"accounts": [_account(auth="xoauth2")]})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[archive\npath=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_secrets_resolve_without_leaking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PV_TEST_PW", "s3cret-value")
    cfg = config_from_dict({"accounts": [_account()]})
    acc = cfg.accounts[0]
    assert resolve_secret(acc.password, what="password") == "s3cret-value"
    assert "s3cret-value" not in repr(acc) and "s3cret-value" not in repr(cfg)
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    by_file = _account(password_file=str(pw_file))
    del by_file["password_env"]
    cfg = config_from_dict({"accounts": [by_file]})
    assert resolve_secret(cfg.accounts[0].password, what="password") == "from-file"
    by_cmd = _account(password_command="echo from-cmd")
    del by_cmd["password_env"]
    cfg = config_from_dict({"accounts": [by_cmd]})
    assert resolve_secret(cfg.accounts[0].password, what="password") == "from-cmd"
    monkeypatch.delenv("PV_TEST_PW")
    with pytest.raises(ConfigError, match="PV_TEST_PW is not set"):
        resolve_secret(acc.password, what="password", account_id="support")
