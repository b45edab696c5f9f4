"""A method's configuration, without torch: typed parameters with help text.

Every method has a frozen dataclass config (`configs/<method>.py`) whose fields are declared with
`param(default, help)`. The config also carries the method's name and one-line summary, so that
`mergestream methods` and `--help` list every method and parameter without importing a kernel
(importing torch takes a second or more). `build_config` turns loosely typed values (the command
line's strings, a recipe's YAML values, Python values) into a checked config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from ..errors import ConfigError
from .classify import LinearRule


def param(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with help text (shown by `mergestream methods`)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs: frozen dataclasses whose fields carry help text. A method's
    config also names it (`method`, the name `get_method` and the command line know it by),
    says in one line what it does (`summary`; its class, `base.ContinualMethod`, takes both)
    and names the paper it comes from (`paper`, `paper_url`: the model card cites them)."""

    # Set by each method's config, as plain class attributes: annotated here only for type
    # checkers, so that dataclasses do not count them among the config's fields.
    if TYPE_CHECKING:
        method: ClassVar[str]
        summary: ClassVar[str]
        paper: ClassVar[str]
        paper_url: ClassVar[str]
        factored: ClassVar[bool]
    paper = ""  # a method of one's own may cite nothing
    paper_url = ""
    # Whether the method keeps a LoRA stream's matrices as low-rank factors (its class
    # implements `update_factored`); the others hold every tensor dense.
    factored = False

    def validate(self) -> None:
        """Raise ValueError on an invalid combination of values."""

    def __post_init__(self) -> None:
        try:
            self.validate()
        except ValueError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def linear_rule(self) -> LinearRule:
        """Which tensors count as linear weights; methods that project override the patterns."""
        return LinearRule()


def require_finite(name: str, value: float) -> None:
    """Refuse a NaN or infinite parameter (a scaling factor, say), as `validate` does."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(field_type: Any, raw: Any, key: str) -> Any:
    origin = get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(field_type) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null", ""}):
            return None
        return _convert(options[0], raw, key)
    if origin is Literal:
        allowed = get_args(field_type)
        if raw not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {raw!r}")
        return raw
    if field_type is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if field_type in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            value = field_type(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {field_type.__name__}, got {raw!r}") from None
        if field_type is int and isinstance(raw, float) and raw != value:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        return value
    if field_type is str:
        return str(raw)
    raise TypeError(f"unsupported config field type {field_type!r} for {key}")


def build_config(config_class: type[MethodConfig], params: Mapping[str, Any]) -> MethodConfig:
    """Build a config from loosely typed values (strings from the CLI, or Python values)."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = [k for k in params if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r}; valid parameters: {', '.join(fields) or '(none)'}"
        )
    values = {k: _convert(hints[k], v, k) for k, v in params.items()}
    return config_class(**values)


def parse_param_strings(items: list[str]) -> dict[str, str]:
    """`["alpha=0.5", "zero_diagonal=true"]` -> {"alpha": "0.5", ...}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def describe_config(config_class: type[MethodConfig]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every parameter, for listings."""
    hints = typing.get_type_hints(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            type_name = "|".join(map(str, get_args(hint)))
        else:
            type_name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        rows.append((f.name, type_name, f.default, f.metadata.get("help", "")))
    return rows
