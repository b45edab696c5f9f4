"""mergestream: continual model merging in constant memory.

Fold fine-tuned checkpoints into one merged model as they arrive (OPCM and its baselines), with a
resumable on-disk state and memory that does not grow with the number or size of models.

The names below are imported on first use, so `import mergestream` (and the command line's
`--help` and `status`) does not load torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import allocator  # (light: lets users call allocator.* after import)
from ._version import __version__
from .errors import CheckpointError, ConfigError, MergestreamError, StateError

if TYPE_CHECKING:
    from .methods import METHODS, OPCM, ContinualMethod, get_method
    from .state import MergeState, merge

_LAZY = {
    "METHODS": ".methods",
    "OPCM": ".methods",
    "ContinualMethod": ".methods",
    "get_method": ".methods",
    "MergeState": ".state",
    "merge": ".state",
}

__all__ = [
    "METHODS",
    "OPCM",
    "CheckpointError",
    "ConfigError",
    "ContinualMethod",
    "MergeState",
    "MergestreamError",
    "StateError",
    "__version__",
    "allocator",
    "get_method",
    "merge",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergestream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
