"""Legal holds: named search queries whose matches retention must never expire.

Stored with the archive in ``<archive>/holds.json`` (not in the index), because retention runs
against the archive and a hold must outlive an index rebuild. Every change is a locked
read-modify-write (``holds.lock``) followed by an atomic replace (temporary file, ``fsync``,
``os.replace``, ``fsync`` of the directory), so a crash leaves the old file or the new one.

A hold is a *query*, evaluated when retention applies, not a list of messages: a message that
arrives after the hold was placed is covered too. Released holds stay in the file (with who and
when) as history; only active ones protect anything. Each add and release is also recorded in
the audit trail (:mod:`ingest.audit`) by the caller that has an actor.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ingest.errors import ArchiveError, ConfigError
from ingest.filelock import exclusive_lock
from ingest.searchquery import QuerySyntaxError, parse_query

HOLDS_FILE = "holds.json"
LOCK_FILE = "holds.lock"
FILE_VERSION = 1
"""Format version in the file; a newer one is refused rather than misread."""
HOLD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
"""Hold names appear in commands, audit entries and reports: no spaces, no shell surprises."""


class HoldError(ConfigError):
    """Raised for a hold command that cannot be done (unknown name, duplicate, bad query)."""


@dataclass(frozen=True)
class Hold:
    name: str
    query: str
    note: str | None
    created_at: str
    created_by: str
    released_at: str | None = None
    released_by: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hold:
        return cls(name=str(data["name"]), query=str(data["query"]), note=data.get("note"),
                   created_at=str(data["created_at"]), created_by=str(data["created_by"]),
                   released_at=data.get("released_at"), released_by=data.get("released_by"))


def _utc_now() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.isoformat(timespec="seconds").replace("+00:00", "Z")


def check_query(query: str) -> None:
    """Raise HoldError when ``query`` is not valid popvault search syntax."""
    try:
        parse_query(query)
    except QuerySyntaxError as exc:
        raise HoldError(f"hold query {query!r} is not valid search syntax: {exc}") from None


class HoldStore:
    """The holds of one archive (see the module docstring)."""

    def __init__(self, archive_path: Path) -> None:
        self.dir = Path(archive_path)
        self.path = self.dir / HOLDS_FILE
        self.lock_path = self.dir / LOCK_FILE

    def __repr__(self) -> str:
        return f"HoldStore(path={str(self.path)!r})"

    def all(self) -> list[Hold]:
        """Every hold, active and released, in creation order."""
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ArchiveError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
            version = int(data.get("version", 0))
            if version > FILE_VERSION:
                raise ArchiveError(f"{self.path} has format version {version}, newer than this "
                                   f"popvault understands ({FILE_VERSION}): upgrade popvault")
            return [Hold.from_dict(h) for h in data["holds"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # A damaged holds file must stop retention, never be read as "no holds".
            raise ArchiveError(f"{self.path} is damaged ({type(exc).__name__}: {exc}); "
                               "restore it from a backup before retention runs again") from None

    def active(self) -> list[Hold]:
        return [h for h in self.all() if h.active]

    def add(self, name: str, query: str, *, actor: str, note: str | None = None,
            now: str | None = None) -> Hold:
        """Place a new hold. Raises HoldError for a bad name or query, or an active duplicate."""
        if not HOLD_NAME_RE.match(name):
            raise HoldError(f"hold name {name!r}: use 1-128 letters, digits, '_', '.', ':', "
                            "'-', starting with a letter or digit")
        check_query(query)
        with self._locked():
            holds = self.all()
            if any(h.name == name and h.active for h in holds):
                raise HoldError(f"a hold named {name!r} is already active; release it first "
                                "or choose another name")
            hold = Hold(name=name, query=query, note=note, created_at=now or _utc_now(),
                        created_by=actor)
            self._write([*holds, hold])
        return hold

    def release(self, name: str, *, actor: str, now: str | None = None) -> Hold:
        """Release the active hold ``name``; it stays in the file as history."""
        with self._locked():
            holds = self.all()
            for i, hold in enumerate(holds):
                if hold.name == name and hold.active:
                    released = replace(hold, released_at=now or _utc_now(), released_by=actor)
                    holds[i] = released
                    self._write(holds)
                    return released
        raise HoldError(f"no active hold named {name!r} (see `popvault hold list`)")

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.lock_path)

    def _write(self, holds: list[Hold]) -> None:
        body = {"version": FILE_VERSION,
                "holds": [{k: v for k, v in h.to_dict().items() if k != "active"}
                          for h in holds]}
        data = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".holds-", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            tmp = None
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ArchiveError(f"cannot write {self.path}: {exc.strerror}") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
