"""What the watcher decided about each inbox entry, kept in the state folder (`watch.json`), and
the lock (`watch.lock`) that keeps a second watcher off the same state.

The state's ledger is the truth about what was merged; the journal is what makes a restart cheap
and polite: an entry whose files are unchanged (same fingerprint) is not hashed or tried again,
and a refused checkpoint is left alone, with its reason, until its files change (or the options
that fit checkpoints to the base do). The journal is replaced atomically, so a watcher killed at
any instant leaves the old or the new one.

Since the ledger and the inbox hold everything the journal knows, a journal found unreadable is
moved aside (`watch.json.corrupt-<time>`) and rebuilt: checkpoints the ledger holds are recognised
again by their content, refused ones are tried and refused again.
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
        """Read the journal of the state in `state_dir` (the caller holds `watcher_lock`). An
        unreadable one is moved aside and the journal starts empty; `recovered` then says where
        it went and why."""
        self.path = state_dir / JOURNAL
        self.entries: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, str] = {}
        self.recovered: tuple[Path, str] | None = None
        if not self.path.exists():
            return
        try:
            data = parse_journal(self.path)
        except JournalUnreadable as err:
            aside = self.path.with_name(f"{JOURNAL}.corrupt-{_stamp()}")
            try:
                os.replace(self.path, aside)
            except OSError as move_err:
                raise StateError(
                    f"{self.path}: unreadable watch journal ({err}), and it cannot be moved "
                    f"aside ({move_err.strerror or move_err}); remove it: the watcher rebuilds it "
                    "from the ledger and the inbox"
                ) from None
            self.recovered = (aside, str(err))
            return
        self.entries = data["checkpoints"]
        self.waiting = data["waiting"]

    def decided(
        self, name: str, fingerprint: Fingerprint, fitting: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The recorded outcome for `name` if its files are the ones it was decided on (and, for
        a refusal, if it was refused with these `fitting` options)."""
        entry = self.entries.get(name)
        if entry is None or [list(row) for row in fingerprint] != entry.get("fingerprint"):
            return None
        if entry.get("outcome") == REFUSED and entry.get("fitting") != fitting:
            return None  # other options might fit it to the base: try again
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


class JournalUnreadable(Exception):
    """watch.json cannot be read or is not a journal; the message says what is wrong."""


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def parse_journal(path: Path) -> dict[str, Any]:
    """The journal at `path`, checked: its `checkpoints` a mapping of names to entries, its
    `waiting` a mapping of names to reasons. Raises `JournalUnreadable` otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise JournalUnreadable(str(err)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JournalUnreadable("not a mergestream watch journal")
    checkpoints = data.get("checkpoints", {})
    waiting = data.get("waiting", {})
    if not isinstance(checkpoints, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("outcome"), str) for e in checkpoints.values()
    ):
        raise JournalUnreadable("its 'checkpoints' are not a mapping of names to entries")
    if not isinstance(waiting, dict) or not all(isinstance(w, str) for w in waiting.values()):
        raise JournalUnreadable("its 'waiting' is not a mapping of names to reasons")
    return {**data, "checkpoints": dict(checkpoints), "waiting": dict(waiting)}


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
    path = state_dir / JOURNAL
    if not path.exists():
        return None  # no watcher ever ran on this state
    try:
        data = parse_journal(path)
    except JournalUnreadable as err:
        return {
            "waiting": {},
            "refused": {},
            "problem": f"{path}: unreadable watch journal ({err}); the merged state does not "
            "depend on it: the next `mergestream watch` moves it aside and rebuilds it from the "
            "ledger and the inbox",
        }
    refused = {
        name: entry.get("reason", "")
        for name, entry in data.get("checkpoints", {}).items()
        if entry.get("outcome") == REFUSED
    }
    return {"waiting": dict(data.get("waiting", {})), "refused": refused}


def watch_status_lines(summary: dict[str, Any]) -> list[str]:
    if summary.get("problem"):
        return ["watch:   the journal cannot be read (see health)"]
    lines = [f"watch:   {len(summary['waiting'])} waiting, {len(summary['refused'])} refused"]
    lines += [f"  waiting {name}: {why}" for name, why in summary["waiting"].items()]
    lines += [f"  refused {name}: {why}" for name, why in summary["refused"].items()]
    return lines
