"""Progress reporting for long passes: a bar on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, label: str, total_items: int, total_bytes: int) -> None: ...

    def advance(self, items: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total_items: int, total_bytes: int) -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


def format_size(nbytes: float) -> str:
    """ "1.5 GB" (decimal units, as disks and downloads count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


class TerminalProgress:
    """One self-overwriting line: label, bar, tensors done, bytes/s, elapsed time."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._label = ""
        self._total_items = self._total_bytes = self._items = self._bytes = 0
        self._t0 = self._last = 0.0

    def start(self, label: str, total_items: int, total_bytes: int) -> None:
        self._label, self._total_items, self._total_bytes = label, total_items, total_bytes
        self._items = self._bytes = 0
        self._t0 = self._last = time.monotonic()
        self._draw()

    def advance(self, items: int, nbytes: int) -> None:
        self._items += items
        self._bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.min_interval or self._items >= self._total_items:
            self._last = now
            self._draw()

    def finish(self) -> None:
        self._draw()
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self) -> None:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        if self._total_bytes:
            fraction = min(self._bytes / self._total_bytes, 1.0)
        else:
            fraction = self._items / self._total_items if self._total_items else 1.0
        width = 24
        filled = int(width * fraction)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r{self._label} [{bar}] {self._items}/{self._total_items} tensors "
            f"{format_size(self._bytes / elapsed)}/s {elapsed:.1f}s"
        )
        self.stream.flush()


def default_progress(quiet: bool = False) -> Progress:
    """A terminal bar when stderr is a TTY and not quiet; otherwise nothing."""
    if quiet or not sys.stderr.isatty():
        return NoProgress()
    return TerminalProgress()
