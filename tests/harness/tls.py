"""Test PKI made with the openssl CLI (no Python dependency): a CA, a localhost server
certificate it signs, and an unrelated second CA for "untrusted certificate" tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness.proc import which
from tests.harness.settings import Settings

DAYS = "3650"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([which("openssl"), *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_ca(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", DAYS,
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def ensure_tls(s: Settings) -> None:
    """Create the PKI once; later runs reuse it so a running Dovecot keeps matching."""
    d = s.tls_dir
    wanted = [d / n for n in ("ca.pem", "server.pem", "server.key", "other-ca.pem")]
    if all(p.exists() for p in wanted):
        return
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca", "popvault test CA")
    _make_ca(d, "other-ca", "popvault unrelated CA")
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", DAYS, "-sha256", "-extfile", "server.ext",
             "-out", "server.pem", cwd=d)
    for p in d.iterdir():
        os.chmod(p, 0o600 if p.suffix == ".key" else 0o644)
