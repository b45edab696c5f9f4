"""What the watcher decided about each inbox entry, kept in the state folder (`watch.json`), and
the lock (`watch.lock`) that keeps a second watcher off the same state.

The state's ledger is the truth about what was merged; the journal is what makes a restart cheap
and polite: an entry whose files are unchanged (same fingerprint) is not hashed or tried again,
and a refused checkpoint is left alone, with its reason, until its files change. The journal is
replaced atomically, so a watcher killed at any instant leaves the old or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import StateError
from .inbox import Fingerprint

JOURNAL = "watch.json"
LOCK = "watch.lock"
FORMAT = "mergestream-watch"
FORMAT_VERSION = 1

MERGED = "merged"
DUPLICATE = "duplicate"
REFUSED = "refused"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` by JSON `data`: written beside it, fsync'd, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """The watcher's record of inbox entries: {name: {fingerprint, outcome, ...}} and what waits."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / JOURNAL
        self.entries: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, str] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                raise StateError(f"{self.path}: unreadable watch journal ({err})") from None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise StateError(f"{self.path}: not a mergestream watch journal")
            self.entries = dict(data.get("checkpoints", {}))
            self.waiting = dict(data.get("waiting", {}))

    def decided(self, name: str, fingerprint: Fingerprint) -> dict[str, Any] | None:
        """The recorded outcome for `name` if its files are the ones it was decided on."""
        entry = self.entries.get(name)
        if entry is None or [list(row) for row in fingerprint] != entry.get("fingerprint"):
            return None
        return entry

    def record(self, name: str, fingerprint: Fingerprint, outcome: str, **fields: Any) -> None:
        self.entries[name] = {
            "outcome": outcome,
            "fingerprint": [list(row) for row in fingerprint],
            "at": now_iso(),
            **fields,
        }
        self.save()

    def set_waiting(self, waiting: dict[str, str]) -> bool:
        """Record the checkpoints that are not complete yet; True if that changed."""
        if waiting == self.waiting:
            return False
        self.waiting = dict(waiting)
        self.save()
        return True

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "updated": now_iso(),
                "checkpoints": self.entries,
                "waiting": self.waiting,
            },
        )


def read_journal(state_dir: Path) -> dict[str, Any] | None:
    """The journal as plain data, or None when no watcher ever ran on this state."""
    path = state_dir / JOURNAL
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


@contextlib.contextmanager
def watcher_lock(state_dir: Path) -> Iterator[None]:
    """Hold `watch.lock` (flock, exclusive) for as long as the watcher runs; refuse clearly if
    another watcher holds it. The kernel drops the lock when the process dies, however it dies."""
    path = state_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise StateError(
                f"{state_dir}: another watcher (pid {holder}) is already watching this state; "
                "stop it (SIGINT or SIGTERM) before starting another"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def watch_summary(state_dir: Path) -> dict[str, Any] | None:
    """What `mergestream status` shows of a watcher's journal: what waits, what was refused."""
    data = read_journal(state_dir)
    if data is None:
        return None
    refused = {
        name: entry.get("reason", "")
        for name, entry in data.get("checkpoints", {}).items()
        if entry.get("outcome") == REFUSED
    }
    return {"waiting": dict(data.get("waiting", {})), "refused": refused}


def watch_status_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"watch:   {len(summary['waiting'])} waiting, {len(summary['refused'])} refused"]
    lines += [f"  waiting {name}: {why}" for name, why in summary["waiting"].items()]
    lines += [f"  refused {name}: {why}" for name, why in summary["refused"].items()]
    return lines
