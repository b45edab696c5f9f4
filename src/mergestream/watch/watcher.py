"""The watch loop: find complete checkpoints in an inbox, merge each once, publish, run a hook.

One pass of the loop inspects the inbox (see `inbox`), takes the checkpoints that are complete and
settled and that the journal has not decided on yet, and for each, in arrival or name order:
`MergeState.add` (its checks and atomic commit), then the export switched in atomically (see
`publish`), then the `--then` command. A checkpoint `add` refuses (corrupt file, shapes that do
not fit the base, NaN) is recorded with its reason and left alone until its files change; one
whose content is already in the ledger is recorded as a duplicate. Between passes the loop sleeps
until the filesystem reports a change (watchdog, inotify) or `poll` seconds pass.

SIGINT and SIGTERM stop the loop with exit status 0: between steps it simply ends; during a step
the step is abandoned (the state's commit is atomic, so the state stays at its last step, and an
export in progress is only ever under a temporary name). A `--once` run that refused a checkpoint
exits with status 3 (`EXIT_REFUSED`), so that cron and CI can tell.

The `--then` command runs in a process group of its own; when the watcher stops (signal, error or
the end of a `--once` run) it ends whatever is left of those groups: SIGTERM, then SIGKILL after
`HOOK_GRACE` seconds. A hook's processes never outlive the watcher that started them (unless the
watcher itself is killed with SIGKILL, which leaves it no time to act).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ..errors import MergestreamError, StateError, warnings_as_lines
from ..options import EXPORT_DTYPES, EXTRA_POLICIES, MISSING_POLICIES
from .inbox import Inspection, Settler, inspect_entry, inspect_inbox
from .journal import DUPLICATE, MERGED, REFUSED, Journal, now_iso, watcher_lock
from .versions import Publisher

ORDERS = ("arrival", "name")
LOG_DIR = "watch-logs"
EXIT_REFUSED = 3  # `--once` refused at least one checkpoint
HOOK_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for what is left of a --then command


@dataclass
class WatchOptions:
    """Everything `mergestream watch` takes (the command-line flags and the YAML config keys)."""

    state: Path
    inbox: Path
    export: Path | None = None
    keep: int = 3
    then: str | None = None
    then_strict: bool = False
    order: str = "arrival"
    settle: float = 5.0
    poll: float = 2.0
    once: bool = False
    log_json: bool = False
    polling: bool = False  # never use inotify (e.g. on network filesystems)
    dtype: str | None = None
    max_shard_size: str = "5GB"
    device: str = "cpu"
    workers: int | None = None
    prepare: bool = False  # prepare the next step's decompositions while waiting
    export_lora: int | None = None  # publish a PEFT LoRA adapter of this rank instead
    # Fitting each checkpoint to the base, as `add` does (see `MergeState.add`).
    strip_prefix: str | None = None
    add_prefix: str | None = None
    missing: str = "error"
    extra: str = "error"
    force_base: bool = False
    allow_zero: bool = False  # merge a checkpoint equal to the base (a zero task vector)

    def fitting(self) -> dict[str, Any]:
        """The options passed to every `add` that decide whether a checkpoint is accepted."""
        return {
            "strip_prefix": self.strip_prefix,
            "add_prefix": self.add_prefix,
            "missing": self.missing,
            "extra": self.extra,
            "force_base": self.force_base,
            "allow_zero": self.allow_zero,
        }

    def check(self) -> None:
        if self.order not in ORDERS:
            raise MergestreamError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        for name in ("settle", "poll"):
            if getattr(self, name) < 0:
                raise MergestreamError(f"{name} must be at least 0 seconds")
        if self.keep < 1:
            raise MergestreamError(f"keep must be at least 1, got {self.keep}")
        for name, allowed in (
            ("missing", MISSING_POLICIES),
            ("extra", EXTRA_POLICIES),
            ("dtype", (None, *EXPORT_DTYPES)),
        ):
            if getattr(self, name) not in allowed:
                raise MergestreamError(
                    f"{name} must be one of {', '.join(a for a in allowed if a)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.export_lora is not None:
            if self.export is None:
                raise MergestreamError(
                    "export-lora publishes an adapter to the --export folder: give --export OUT"
                )
            if self.export_lora < 1:
                raise MergestreamError(
                    f"export-lora rank must be at least 1, got {self.export_lora}"
                )
        if not self.inbox.is_dir():
            raise MergestreamError(f"{self.inbox}: the inbox folder does not exist")
        inbox, state = self.inbox.resolve(), self.state.resolve()
        if state == inbox or inbox in state.parents:
            raise MergestreamError(f"{self.state}: the state cannot be inside the inbox")
        if self.export is not None:
            out = Path(os.path.abspath(self.export))
            for folder, what in ((inbox, "inbox"), (state, "state")):
                if out.parent.resolve() == folder or folder in out.parent.resolve().parents:
                    raise MergestreamError(
                        f"{self.export}: the published model cannot be inside the {what} folder"
                    )


class EventLog:
    """One line per event: readable text, or a JSON object (`--log-json`) with the event's name,
    the time and its fields."""

    def __init__(self, json_lines: bool, stream: TextIO | None = None):
        self.json_lines = json_lines
        self.stream = stream or sys.stdout

    def __call__(self, event: str, message: str, **fields: Any) -> None:
        if self.json_lines:
            line = json.dumps({"time": now_iso(), "event": event, **fields, "message": message})
        else:
            line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=self.stream, flush=True)


class _Stop(BaseException):
    """Raised by the signal handler to abandon the step in flight."""


def start_notifier(inbox: Path, wake: threading.Event) -> Any | None:
    """A watchdog observer that sets `wake` on any change under `inbox`, or None (polling)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event: object) -> None:
            wake.set()

    observer = Observer()
    try:
        observer.schedule(Wake(), str(inbox), recursive=True)
        observer.daemon = True
        observer.start()
    except OSError:  # e.g. the inotify watch limit
        return None
    return observer


class Watcher:
    def __init__(self, options: WatchOptions, log: EventLog):
        self.options = options
        self.log = log
        self._stop = False
        self._busy = False  # a step (add, export, hook) is in flight: a signal abandons it
        self._wake = threading.Event()
        self._arrival: dict[str, int] = {}  # name -> when it became ready (a counter)
        self._retry_later: set[str] = set()
        self._first_scan = True
        self._refused = 0  # checkpoints refused by this run
        self._hooks: dict[int, subprocess.Popen[bytes]] = {}  # process group -> its leader

    # ------------------------------------------------------------------------------ running

    def run(self) -> int:
        options = self.options
        options.check()
        from ..state import MergeState  # torch is imported only when a command needs it

        self.state = MergeState.open(options.state)
        self.state_dir = Path(options.state)
        with watcher_lock(self.state_dir):
            self.journal = Journal(self.state_dir)
            self.publisher = (
                Publisher(
                    options.export, options.keep, self.state.identity["state"], self.state_dir
                )
                if options.export is not None
                else None
            )
            previous = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            observer = None if options.polling else start_notifier(options.inbox, self._wake)
            try:
                self.log(
                    "start",
                    f"watching {options.inbox} for {options.state} (step {self.state.step}; "
                    f"{'inotify' if observer else 'polling every ' + str(options.poll) + 's'}"
                    f"{', publishing to ' + str(options.export) if options.export else ''})",
                    state=str(options.state),
                    inbox=str(options.inbox),
                    step=self.state.step,
                    notifier="inotify" if observer else "polling",
                )
                if self.journal.recovered is not None:
                    aside, why = self.journal.recovered
                    self.log(
                        "journal-rebuilt",
                        f"{self.journal.path}: unreadable watch journal ({why}); moved it to "
                        f"{aside.name}, rebuilding it from the ledger and the inbox",
                        moved_to=str(aside),
                        reason=why,
                    )
                if self.publisher is not None:
                    self.publisher.clean_partials()
                    self._catch_up()
                self._loop()
            except _Stop:
                pass
            finally:
                # Still under this watcher's handlers: a second signal cannot cut this short.
                self._end_hooks()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                if observer is not None:
                    observer.stop()
            self.log(
                "stop",
                f"stopped at step {self.state.step}"
                + (" (signal)" if self._stop else "")
                + (f"; refused {self._refused} checkpoints" if self._refused else ""),
                step=self.state.step,
                refused=self._refused,
            )
        return EXIT_REFUSED if options.once and self._refused else 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        self._wake.set()
        if self._busy:
            self._busy = False
            raise _Stop(signum)

    def _busy_call(self, fn: Callable[[], Any]) -> Any:
        """Run one part of a step so that a signal abandons it rather than waiting for it."""
        if self._stop:
            raise _Stop()
        self._busy = True
        try:
            return fn()
        finally:
            self._busy = False

    def _loop(self) -> None:
        options = self.options
        settler = Settler(options.settle)
        fitting = options.fitting()
        while not self._stop:
            self._wake.clear()
            now = time.monotonic()
            inspections = inspect_inbox(options.inbox)
            ready = set(settler.settled(inspections, now, time.time()))
            pending, waiting = [], {}
            for item in inspections:
                if not item.complete:
                    waiting[item.name] = item.missing
                elif item.name not in ready:
                    waiting[item.name] = f"complete, settling ({options.settle:g}s unchanged)"
                elif self.journal.decided(item.name, item.fingerprint, fitting) is None:
                    pending.append(item)
            self._note_waiting(waiting)
            for item in self._ordered(pending):
                if self._stop:
                    return
                self._process(item)
            if options.prepare and not self._stop:
                self._prepare()  # idle now: nothing is pending (a --once run prepares too)
            upcoming = settler.next_check(time.monotonic())
            if options.once and upcoming is None and not self._retry_later:
                return
            timeout = options.poll if upcoming is None else min(options.poll, upcoming + 0.01)
            self._retry_later.clear()
            self._wake.wait(timeout)

    def _prepare(self) -> None:
        """Idle time: prepare the next step (nothing to do when it is prepared already)."""
        started = time.monotonic()
        try:
            count = self._busy_call(
                lambda: self.state.prepare(device=self.options.device, workers=self.options.workers)
            )
        except (MergestreamError, OSError) as err:
            self.log("error", f"preparing the next step failed: {err}")
            return
        if count:
            seconds = round(time.monotonic() - started, 3)
            self.log(
                "prepared",
                f"prepared step {self.state.step + 1}: {count} decompositions in {seconds:.2f}s",
                step=self.state.step + 1,
                tensors=count,
                seconds=seconds,
            )

    def _note_waiting(self, waiting: dict[str, str]) -> None:
        """Record what waits; log each new or changed reason (all of them on the first scan)."""
        first, self._first_scan = self._first_scan, False
        before = {} if first else dict(self.journal.waiting)
        if not self.journal.set_waiting(waiting) and not first:
            return
        for name, why in waiting.items():
            if before.get(name) != why:
                self.log("waiting", f"waiting for {name}: {why}", checkpoint=name, reason=why)

    def _ordered(self, pending: list[Inspection]) -> list[Inspection]:
        """Name order, or the order in which checkpoints became ready (ties: older files first)."""
        if self.options.order == "name":
            return sorted(pending, key=lambda i: i.name)
        for item in sorted(pending, key=lambda i: (i.newest_mtime, i.name)):
            self._arrival.setdefault(item.name, len(self._arrival))
        return sorted(pending, key=lambda i: self._arrival[i.name])

    # ------------------------------------------------------------------------------ one step

    def _process(self, item: Inspection) -> None:
        fresh = inspect_entry(item.path)
        if not fresh.complete or fresh.fingerprint != item.fingerprint:
            return  # it changed since the scan: it settles again first
        if self._record_if_merged(item, only_same_path=True):
            return
        self.log("adding", f"merging {item.name}", checkpoint=item.name)
        options = self.options
        error: Exception | None = None
        started = time.monotonic()
        try:
            with warnings_as_lines() as warned:
                self._busy_call(
                    lambda: self.state.add(
                        item.path,
                        device=options.device,
                        workers=options.workers,
                        **options.fitting(),
                    )
                )
        except Exception as err:  # noqa: BLE001 - whatever a checkpoint does, watching goes on
            error = err
        else:
            for line in warned:
                self.log("warning", f"warning: {item.name}: {line}", checkpoint=item.name)
        if error is not None:
            self._refuse_or_fail(item, error)
            return
        entry = self.state.ledger[-1]
        self.journal.record(
            item.name, item.fingerprint, MERGED, step=entry["step"], sha256=entry["sha256"]
        )
        self.log(
            "merged",
            f"step {entry['step']}: merged {item.name} in {time.monotonic() - started:.2f}s",
            checkpoint=item.name,
            step=entry["step"],
            sha256=entry["sha256"],
            seconds=round(time.monotonic() - started, 3),
        )
        self._after_step(entry["step"], entry["sha256"], item.path)

    def _record_if_merged(self, item: Inspection, *, only_same_path: bool) -> bool:
        """If the ledger holds this checkpoint's content, record it (merged or duplicate) and
        return True. With `only_same_path`, hash only if the ledger has an entry for this path
        (a restart after a step that committed but was not journaled); hashing every arrival
        twice would double the time to read it."""
        ledger = self.state.ledger
        resolved = str(item.path.resolve())
        if only_same_path and not any(e["path"] == resolved for e in ledger):
            return False
        try:
            digest = _content_hash(item.path)
        except Exception:  # noqa: BLE001 - unreadable: `add` gives the real reason
            return False
        for entry in ledger:
            if entry["sha256"] == digest:
                same = entry["path"] == resolved
                self.journal.record(
                    item.name,
                    item.fingerprint,
                    MERGED if same else DUPLICATE,
                    step=entry["step"],
                    sha256=digest,
                )
                self.log(
                    "skipped",
                    f"{item.name}: "
                    + (
                        f"already merged at step {entry['step']}"
                        if same
                        else f"same content as {entry['path']}, merged at step {entry['step']}"
                    ),
                    checkpoint=item.name,
                    step=entry["step"],
                    duplicate=not same,
                )
                return True
        return False

    def _refuse_or_fail(self, item: Inspection, error: Exception) -> None:
        if isinstance(error, StateError):
            if self._record_if_merged(item, only_same_path=False):
                return
            if "another mergestream process" in str(error):
                self._retry_later.add(item.name)
                self.log("busy", f"{item.name}: {error}; trying again", checkpoint=item.name)
                return
            raise error  # the state itself is in trouble (its base changed, a full disk)
        reason = str(error) if isinstance(error, MergestreamError) else _describe(error)
        self.journal.record(
            item.name, item.fingerprint, REFUSED, reason=reason, fitting=self.options.fitting()
        )
        self._refused += 1
        self.log(
            "refused",
            f"refused {item.name}: {reason} (left alone until its files or the fitting options "
            "change)",
            checkpoint=item.name,
            reason=reason,
        )

    def _catch_up(self) -> None:
        """Publish the state's latest step if an earlier run stopped before publishing it (or
        published it with other settings)."""
        assert self.publisher is not None
        ledger = self.state.ledger
        if not ledger:
            return
        with self.state.reading():
            model = self.state.identity
        if self.publisher.is_current(model, self._export_settings()):
            return
        last = ledger[-1]
        self._after_step(last["step"], last["sha256"], Path(last["path"]))

    def _export_settings(self) -> dict[str, Any]:
        """What, besides the merged model, makes one published version differ from another."""
        options = self.options
        if options.export_lora is not None:
            return {"kind": "lora", "rank": options.export_lora, "dtype": options.dtype}
        return {"kind": "model", "dtype": options.dtype, "max_shard_size": options.max_shard_size}

    def _write_export(self, folder: Path) -> None:
        options = self.options
        if options.export_lora is None:
            self.state.export(
                folder, dtype=_dtype(options.dtype), max_shard_size=options.max_shard_size
            )
            return
        from ..publish.export_lora import export_lora

        dtype = _dtype(options.dtype)
        kwargs = {} if dtype is None else {"dtype": dtype}
        export_lora(self.state, folder, rank=options.export_lora, **kwargs)

    def _publish(self) -> Path:
        """Export the state as it is now into a new version (or find it published already)."""
        assert self.publisher is not None
        # Held still (a shared lock) from naming the version to the end of its export.
        with self.state.reading():
            return self.publisher.publish(
                self.state.identity, self._export_settings(), self._write_export
            )

    def _after_step(self, step: int, sha256: str | None, checkpoint: Path) -> None:
        version = None
        if self.publisher is not None:
            options = self.options
            started = time.monotonic()
            try:
                version = self._busy_call(self._publish)
            except (MergestreamError, OSError) as err:
                self.log("error", f"step {step}: publishing failed: {err}", step=step)
                return
            self.log(
                "published",
                f"step {step}: published {options.export} -> {version.name} "
                f"in {time.monotonic() - started:.2f}s",
                step=step,
                export=str(version),
                seconds=round(time.monotonic() - started, 3),
            )
        if self.options.then:
            self._run_then(step, version, checkpoint)

    def _run_then(self, step: int, version: Path | None, checkpoint: Path) -> None:
        command = self.options.then
        assert command
        logs = self.state_dir / LOG_DIR
        logs.mkdir(exist_ok=True)
        log_path = logs / f"step-{step:06d}.log"
        env = {
            **os.environ,
            "MERGESTREAM_STEP": str(step),
            "MERGESTREAM_EXPORT": str(version) if version is not None else "",
            "MERGESTREAM_CHECKPOINT": str(checkpoint.resolve()),
            "MERGESTREAM_STATE": str(self.state_dir.resolve()),
        }

        started = time.monotonic()
        with open(log_path, "wb") as out:
            # A group of its own, so that the watcher can end every process the command starts;
            # started outside `_busy_call`, so a signal cannot strike before it is recorded.
            process = subprocess.Popen(
                command,
                shell=True,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._hooks[process.pid] = process
        try:
            code = self._busy_call(process.wait)
        except BaseException:
            end_process_group(process.pid, process)
            raise
        self._forget_finished_hooks()
        seconds = round(time.monotonic() - started, 3)
        if code == 0:
            self.log(
                "then",
                f"step {step}: --then finished in {seconds:.2f}s (output in {log_path})",
                step=step,
                exit_code=0,
                log=str(log_path),
                seconds=seconds,
            )
            return
        self.log(
            "then-failed",
            f"step {step}: --then failed with exit status {code} (output in {log_path})",
            step=step,
            exit_code=code,
            log=str(log_path),
            seconds=seconds,
        )
        if self.options.then_strict:
            raise MergestreamError(
                f"--then failed with exit status {code} after step {step} (output in "
                f"{log_path}); stopping because of --then-strict"
            )

    def _forget_finished_hooks(self) -> None:
        """Stop tracking the hook groups with no process left (what a hook left running in the
        background stays tracked, and is ended when the watcher stops)."""
        for pgid, leader in list(self._hooks.items()):
            if leader.poll() is not None and not _group_alive(pgid):
                del self._hooks[pgid]

    def _end_hooks(self) -> None:
        while self._hooks:
            pgid, leader = self._hooks.popitem()
            end_process_group(pgid, leader)


def end_process_group(
    pgid: int, leader: subprocess.Popen[bytes] | None = None, grace: float = HOOK_GRACE
) -> None:
    """End every process of group `pgid`: SIGTERM, then SIGKILL to what is left after `grace`
    seconds. `leader`, the watcher's own child, is reaped, so it does not linger as a zombie."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        if leader is not None:
            leader.poll()
        if not _group_alive(pgid):
            break
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.05)
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=grace)


def _group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a process that is not a zombie (a zombie has ended and
    only waits for its parent; where /proc is missing, any member counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended while we looked
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _content_hash(path: Path) -> str:
    """The content hash the ledger records for the checkpoint at `path`."""
    from ..io.open import open_checkpoint
    from ..store.hashing import content_hash

    source = open_checkpoint(path)
    try:
        return content_hash(source)
    finally:
        source.close()


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise MergestreamError(f"dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_watch(options: WatchOptions, log: EventLog | None = None) -> int:
    """Watch until stopped (or, with `once`, until what is in the inbox is done)."""
    return Watcher(options, log or EventLog(options.log_json)).run()
