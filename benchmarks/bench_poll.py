"""Benchmark: one mailbox fetched over implicit TLS by popvault, mpop and getmail6.

Prints msg/s, MB/s and peak RSS (whole process tree) for each, popvault with pipelining on
and off, and the ratio popvault ÷ mpop. Not a test: it prints figures. Needs the test stack
(``python -m tests.harness up``); run ``python -m benchmarks.bench_poll [--messages N]``.

popvault does more than the peers: it archives (hash + zstd + fsync), parses with mail-parser
in a process pool and indexes documents and receipts in Elasticsearch; mpop and getmail6 only
write a Maildir.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.measure import Run, measure
from tests import corpus
from tests.harness import dovecot, settings

REPO = Path(__file__).resolve().parents[1]


def make_mailbox(s: settings.Settings, name: str, password: str,
                 messages: list[bytes]) -> None:
    """A fresh Dovecot user holding ``messages`` (Maildir stores LF; Dovecot serves CRLF)."""
    md = dovecot.add_user(s, name, password)
    uid, gid = dovecot.mail_ids()
    stamp = int(time.time())
    for i, raw in enumerate(messages):
        path = md / "new" / f"{stamp}.M{i}P{os.getpid()}.bench"
        path.write_bytes(raw.replace(b"\r\n", b"\n"))
        if os.geteuid() == 0:
            os.chown(path, uid, gid)


def popvault_run(s: settings.Settings, user: str, password: str, work: Path,
                 pipelining: bool) -> Run:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = work / f"{prefix}.toml"
    config.write_text(f'''
[archive]
path = "{work / prefix}"

[elasticsearch]
url = "{s.es_url}"
index_prefix = "{prefix}"

[[accounts]]
id = "bench"
host = "127.0.0.1"
port = {s.pop3s_port}
username = "{user}"
password_env = "BENCH_POP_PASSWORD"
ca_file = "{s.ca_file}"
pipelining = {"true" if pipelining else "false"}
''')
    env = {**os.environ, "BENCH_POP_PASSWORD": password}
    subprocess.run([sys.executable, "-m", "ingest", "schemas", "install", "-c", str(config)],
                   env=env, check=True, capture_output=True)
    run = measure([sys.executable, "-m", "ingest", "poll", "--json", "-c", str(config)],
                  env=env, cwd=REPO)
    if run.returncode != 0:
        raise SystemExit(f"popvault failed: {run.stdout}\n{run.stderr}")
    report = json.loads(run.stdout)["accounts"][0]
    print(f"  popvault report: new={report['new']} joined={report['joined']} "
          f"failed={report['failed']} parse_failed={report['parse_failed']}", file=sys.stderr)
    subprocess.run(["curl", "-s", "-XDELETE", f"{s.es_url}/{prefix}-*"], capture_output=True,
                   check=False)
    return run


def mpop_run(s: settings.Settings, user: str, password: str, work: Path) -> Run:
    maildir = work / "mpop-maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rc = work / "mpoprc"
    rc.write_text(f"""account bench
host 127.0.0.1
port {s.pop3s_port}
tls on
tls_starttls off
tls_trust_file {s.ca_file}
user {user}
passwordeval echo {password}
delivery maildir {maildir}
keep on
uidls_file {work / 'mpop-uidls'}
""")
    rc.chmod(0o600)
    run = measure(["mpop", "-q", "-C", str(rc), "bench"])
    if run.returncode != 0:
        raise SystemExit(f"mpop failed: {run.stderr}")
    return run


def getmail_run(s: settings.Settings, user: str, password: str, work: Path) -> Run | None:
    if not shutil.which("getmail"):
        return None
    maildir = work / "getmail-maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    gdir = work / "getmail"
    gdir.mkdir()
    (gdir / "getmailrc").write_text(f"""[retriever]
type = SimplePOP3SSLRetriever
server = 127.0.0.1
port = {s.pop3s_port}
username = {user}
password = {password}
ssl_ca_certs = {s.ca_file}

[destination]
type = Maildir
path = {maildir}/

[options]
read_all = true
delete = false
verbose = 0
""")
    cmd = ["getmail", f"--getmaildir={gdir}", "--rcfile=getmailrc"]
    if os.geteuid() == 0:  # getmail6 refuses to deliver as root: run it as the mail user
        uid, gid = dovecot.mail_ids()
        work.chmod(0o755)
        for path in (maildir, gdir, *maildir.iterdir(), *gdir.iterdir()):
            os.chown(path, uid, gid)
        cmd = ["runuser", "-u", pwd.getpwuid(uid).pw_name, "--", *cmd]
    run = measure(cmd)
    if run.returncode != 0:
        print(f"getmail6 failed: {run.stderr[-500:]}", file=sys.stderr)
        return None
    return run


def line(name: str, run: Run, n: int, total_bytes: int) -> str:
    return (f"{name:<28} {n / run.seconds:8.1f} msg/s {total_bytes / run.seconds / 1e6:7.1f} MB/s"
            f" {run.seconds:7.1f} s   peak RSS {run.peak_rss_bytes / 1e6:5.0f} MB"
            f" (PSS {run.peak_pss_bytes / 1e6:4.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--big-mb", type=int, default=0,
                        help="add one message with an attachment of this many MB (RSS check)")
    args = parser.parse_args()
    s = settings.load()
    mail = corpus.benchmark_mix(args.seed, args.messages).messages
    if args.big_mb:
        mail.append(corpus.big_attachment(args.big_mb * 1024 * 1024, seed=args.seed))
    served_bytes = sum(len(m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) for m in mail)
    print(f"mailbox: {len(mail)} messages, {served_bytes / 1e6:.1f} MB as served, "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    user, password = f"bench{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    make_mailbox(s, user, password, mail)
    results: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="popvault-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_peers:
            results["mpop (fetch only)"] = mpop_run(s, user, password, work)
            got = getmail_run(s, user, password, work)
            if got:
                results["getmail6 (fetch only)"] = got
        results["popvault, pipelining on"] = popvault_run(s, user, password, work, True)
        results["popvault, pipelining off"] = popvault_run(s, user, password, work, False)
    dovecot.remove_user(s, user)
    print()
    for name, run in results.items():
        print(line(name, run, len(mail), served_bytes))
    if "mpop (fetch only)" in results:
        ratio = results["mpop (fetch only)"].seconds / results["popvault, pipelining on"].seconds
        print(f"ratio popvault ÷ mpop (msg/s): {ratio:.2f}")


if __name__ == "__main__":
    main()
