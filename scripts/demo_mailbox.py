"""A demo POP3 account for ``scripts/quickstart --demo``: prints it as shell ``export`` lines.

Uses the test harness's private Dovecot (loopback, implicit TLS with the harness CA): user
``demo`` with ~50 generated messages from ``tests/corpus.py``. Only Dovecot is needed, not the
harness's Redis or Elasticsearch. A harness stack that is already up is reused and left as it
is: its Dovecot is not restarted or reconfigured, only the ``demo`` user is (re)created. That
stack may belong to another checkout on this machine (the ports are the same), so when this
checkout's ``.stack`` has no Dovecot answering, a running harness Dovecot is looked for first.

Each run delivers new messages (the corpus seed is the time): re-delivering the same messages
under new UIDLs would look like a UIDL reset of the ``demo`` account, which popvault refuses
to ingest without ``--accept-uidl-reset``.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import corpus  # noqa: E402
from tests.harness import dovecot  # noqa: E402
from tests.harness import mailbox as mailbox_mod  # noqa: E402
from tests.harness.proc import HarnessError  # noqa: E402
from tests.harness.settings import Settings, load  # noqa: E402
from tests.harness.tls import ensure_tls  # noqa: E402

DEMO_USER = "demo"
DEMO_MESSAGES = 50
CONF_SUFFIX = "/dovecot/dovecot.conf"


def running_harness_dirs() -> list[Path]:
    """Stack directories of running harness Dovecots (``dovecot -c <stack>/dovecot/...``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"dovecot") or b"-c" not in argv:
            continue
        i = argv.index(b"-c")
        conf = argv[i + 1].decode(errors="replace") if i + 1 < len(argv) else ""
        if conf.endswith(CONF_SUFFIX):
            found.append(Path(conf[: -len(CONF_SUFFIX)]))
    return found


def find_stack() -> tuple[Settings, str]:
    """Settings of a harness Dovecot to use, and how it was found."""
    own = load()
    if own.ca_file.exists() and dovecot.ready(own):
        return own, "reused"
    for directory in running_harness_dirs():
        other = dataclasses.replace(own, dir=directory)
        if other.dir != own.dir and other.ca_file.exists() and dovecot.ready(other):
            return other, f"reused from {directory}"
    ensure_tls(own)
    return own, dovecot.start(own)


def main() -> int:
    try:
        s, how = find_stack()
        password = "demo-" + secrets.token_urlsafe(12)
        dovecot.add_user(s, DEMO_USER, password)
        box = mailbox_mod.Mailbox(s, DEMO_USER, password, lambda _k, _v: None)
        box.deliver_many(corpus.generate_mail(time.time_ns() // 1000, DEMO_MESSAGES))
    except (HarnessError, OSError) as exc:
        print(f"demo_mailbox: {exc}", file=sys.stderr)
        return 1
    print(f"demo_mailbox: Dovecot {how} on {s.host}:{s.pop3s_port}; user {DEMO_USER!r} "
          f"has {box.count()} messages", file=sys.stderr)
    values = {
        "POPVAULT_POP_HOST": s.host,
        "POPVAULT_POP_PORT": str(s.pop3s_port),
        "POPVAULT_POP_SECURITY": "tls",
        "POPVAULT_POP_USER": DEMO_USER,
        "POPVAULT_POP_PASSWORD": password,
        "POPVAULT_POP_CA_FILE": str(s.ca_file),
    }
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
