"""Name -> method class, for configs, the command line and saved states."""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import ConfigError
from .base import ContinualMethod

METHODS: dict[str, type[ContinualMethod]] = {}

M = TypeVar("M", bound=type[ContinualMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **params: Any) -> ContinualMethod:
    """An instance of the method called `name`, configured from `params`."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(**params)
