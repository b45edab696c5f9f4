"""Name -> method class, for configs, the command line and saved states.

The built-in methods are listed here, once; `register_method` adds others (a plugin, a
benchmark's own rule) under their `name`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import ConfigError
from .average import Average
from .base import ContinualMethod
from .dop import DOP
from .iso_c import IsoC
from .magmax import MagMax
from .opcm import OPCM
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv_m import TsvM

BUILTIN_METHODS: tuple[type[ContinualMethod], ...] = (
    Average,
    DOP,
    IsoC,
    MagMax,
    OPCM,
    TaskArithmetic,
    Ties,
    TsvM,
)

METHODS: dict[str, type[ContinualMethod]] = {}

M = TypeVar("M", bound=type[ContinualMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


for _method in BUILTIN_METHODS:
    register_method(_method)


def get_method(name: str, **params: Any) -> ContinualMethod:
    """An instance of the method called `name`, configured from `params`."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(**params)
