"""Progress reporting for long passes: a bar on a terminal, silence elsewhere; and for counted
loops (:class:`Ticker`), a live line on a terminal or a periodic line in a log."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
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


# Seconds between the plain progress lines of a Ticker whose stream is not a terminal.
LINE_INTERVAL = 30.0


def format_duration(seconds: float) -> str:
    """ "42s", "3m05s", "1h12m"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Ticker:
    """Progress of a counted loop (training steps, evaluations): done/total, what the caller
    adds (a loss), the rate and the time left.

    On a terminal it is one line that rewrites itself; elsewhere (a log file, CI) it writes a
    plain line every :data:`LINE_INTERVAL` seconds, so a log shows that a long run is alive
    and when it will end without filling up with a line per step.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "step",
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.interval = 0.2 if self.terminal else LINE_INTERVAL
        self.clock = clock
        self._t0 = self._last = clock()
        self._width = 0  # of the terminal line drawn last, to blank what a shorter one leaves

    def line(self, done: int, detail: str = "") -> str:
        elapsed = self.clock() - self._t0
        parts = [f"{self.label}: {self.unit} {done}/{self.total}"]
        if detail:
            parts.append(detail)
        if done and elapsed > 0:
            per_item = elapsed / done
            if per_item >= 1:
                parts.append(f"{per_item:.2f} s/{self.unit}")
            else:
                parts.append(f"{1 / per_item:.1f} {self.unit}s/s")
            if done < self.total:
                parts.append(f"{format_duration(per_item * (self.total - done))} left")
        return ", ".join(parts)

    def update(self, done: int, detail: str = "") -> None:
        now = self.clock()
        if now - self._last < self.interval and not (self.terminal and done >= self.total):
            return
        self._last = now
        text = self.line(done, detail)
        if self.terminal:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the terminal line, so what is printed next starts on its own."""
        if self.terminal and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
