"""Small per-account state kept beside the archive (flags that must survive a restart).

Only facts that the index cannot hold belong here: a UIDL-reset flag that stops the next poll
from ingesting a renumbered mailbox again. Written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ingest.errors import ArchiveError


@dataclass
class AccountState:
    account_id: str
    uidl_reset_flagged_at: str | None = None
    uidl_reset_detail: str | None = None
    notes: list[str] = field(default_factory=list)


def _state_path(archive_root: Path, account_id: str) -> Path:
    return archive_root / "state" / "accounts" / f"{account_id}.json"


def load_state(archive_root: Path, account_id: str) -> AccountState:
    path = _state_path(archive_root, account_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return AccountState(account_id=account_id)
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"cannot read account state {path}: {exc}",
                           account_id=account_id) from None
    return AccountState(**{k: v for k, v in data.items() if k in AccountState.__annotations__})


def save_state(archive_root: Path, state: AccountState) -> None:
    path = _state_path(archive_root, state.account_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(state), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ArchiveError(f"cannot write account state {path}: {exc.strerror}",
                           account_id=state.account_id) from None
