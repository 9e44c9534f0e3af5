"""CLI: ``python -m tests.harness up|down|status|env``."""

from __future__ import annotations

import sys

from tests.harness import stack
from tests.harness.proc import HarnessError

USAGE = "usage: python -m tests.harness up|down|status|env"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status", "env"):
        print(USAGE, file=sys.stderr)
        return 2
    cmd = argv[0]
    try:
        if cmd == "up":
            stack.up(log=lambda m: print(f"[harness] {m}", flush=True))
        elif cmd == "down":
            stack.down(log=lambda m: print(f"[harness] {m}", flush=True))
        elif cmd == "status":
            print("\n".join(stack.status()))
        else:
            print("\n".join(stack.env_lines()))
    except HarnessError as exc:
        print(f"[harness] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
