"""Run a command and report wall time and the peak RSS of its whole process tree.

popvault parses in child processes, so the RSS of the parent alone would flatter it: this
samples ``/proc`` for the command and all of its descendants and keeps the largest sum.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL_S = 0.02
PSS_EVERY = 10
"""PSS is read on every tenth sample only: ``smaps_rollup`` walks every mapping (about 4 ms for
a poll's process tree), and sampling it every 20 ms took 13 % of a core from the run it
measured. RSS (``statm``) is cheap and read every time."""
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Run:
    seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    returncode: int
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree_memory(root: int, *, with_pss: bool = True) -> tuple[int, int]:
    """(sum of RSS, sum of PSS or 0) over a process and its descendants."""
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
            if with_pss:
                pss += _pss(pid)
        except (OSError, ValueError, IndexError):
            continue
        stack += _children(pid)
    return rss, pss


def _tree_rss(root: int) -> int:
    return _tree_memory(root, with_pss=False)[0]


def measure(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout_s: float = 1800) -> Run:
    """Run ``cmd`` to completion, sampling the tree's RSS every few milliseconds."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_pss
        samples = 0
        while not done.is_set():
            rss, pss = _tree_memory(proc.pid, with_pss=samples % PSS_EVERY == 0)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            samples += 1
            time.sleep(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    finally:
        done.set()
        sampler.join()
    return Run(time.monotonic() - started, peak, peak_pss, proc.returncode, stdout, stderr)
