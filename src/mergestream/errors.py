"""Exceptions with messages meant for the person at the terminal."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


class MergestreamError(Exception):
    """Base class: anything the command line reports as a plain error, without a traceback."""


class CheckpointError(MergestreamError):
    """A checkpoint cannot be read, or does not match the base."""


class StateError(MergestreamError):
    """A merge state is missing, locked, corrupt or incompatible."""


class ConfigError(MergestreamError):
    """A method name or parameter is unknown or invalid."""


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[list[str]]:
    """Collect what mergestream warns about inside the block as plain messages (each time it is
    raised), so a front door prints one line per warning instead of Python's warning with its
    source line; `add`, `run` and `watch` use it around each step. Warnings from other packages
    are shown as Python shows them, after the block."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", module=r"mergestream(\.|$)")
        yield messages
    for warning in caught:
        if warning.category.__module__.startswith("mergestream"):
            messages.append(str(warning.message))
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
