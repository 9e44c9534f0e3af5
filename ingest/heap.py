"""glibc heap settings that keep a long poll's resident size near what it actually holds.

CPython hands large buffers (message bytes, documents, bulk bodies) to ``malloc``. glibc keeps
freed heap instead of returning it, raises its mmap threshold after large frees (so later large
buffers land on the heap too), and gives each thread its own arena. A poll frees tens of
megabytes per batch on several threads, so without these its resident size climbs to a
high-water mark it never needs again. Elsewhere (musl, macOS) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

M_ARENA_MAX = -8
"""``mallopt`` parameter number (glibc ``malloc.h``)."""
ARENAS = 2
"""Arenas for a whole process: the fetch thread and one helper rarely allocate at once."""


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.malloc_trim  # noqa: B018  (probe: glibc only)
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def limit_arenas(arenas: int = ARENAS) -> None:
    """Cap malloc arenas; call before starting threads."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Return freed heap pages to the system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
