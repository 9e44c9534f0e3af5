"""An exclusive ``flock`` on a lock file next to the data it guards (audit, holds, retention).

The lock is taken on a separate file, never on the data itself, so readers and atomic
replaces of the data are unaffected; closing the descriptor releases it, also when the
process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ingest.errors import ArchiveError


@contextlib.contextmanager
def exclusive_lock(path: Path, *, label: str | None = None,
                   busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created ``0600``, parents too) for the block.

    A directory or file that cannot be created or opened raises
    ``ArchiveError("cannot open <label>: <reason>")``, ``label`` defaulting to the path.
    Without ``busy`` the lock is waited for; with it a lock held elsewhere raises
    ``ArchiveError(busy, transient=True)`` at once.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ArchiveError(f"cannot open {label or path}: {exc.strerror}") from None
    try:
        if busy is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArchiveError(busy, transient=True) from None
        yield
    finally:
        os.close(fd)  # closing releases the flock
