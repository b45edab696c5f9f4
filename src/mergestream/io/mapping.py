"""Fitting a checkpoint's tensor names to the base's, only where the user says how.

Checkpoints do not always use the base's names: a training wrapper may put `model.` or `module.`
in front of every name, a checkpoint may hold only the part that was fine-tuned (a vision tower,
the top layers), or carry a task head the base lacks. Guessing would risk a silent mis-merge, so
a mismatch is refused, with a message that suggests the option fitting what it sees; the options
then say exactly what to do, and the ledger records them:

- `strip_prefix` / `add_prefix`: rename (strip first, then add; names without the stripped prefix
  are kept as they are);
- `missing="base"`: floating-point tensors of the base absent from the checkpoint count as
  unchanged from the base (a zero task vector);
- `extra="ignore"`: tensors the base lacks are left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..options import EXTRA_POLICIES, MISSING_POLICIES
from .safetensors_stream import TensorSpec
from .source import TensorSource, tensor_location


@dataclass(frozen=True)
class NameMapping:
    """How a checkpoint's names map onto the base's (the default maps nothing)."""

    strip_prefix: str | None = None
    add_prefix: str | None = None
    missing: str = "error"
    extra: str = "error"

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise ConfigError(
                f"missing: expected one of {', '.join(MISSING_POLICIES)}, got {self.missing!r}"
            )
        if self.extra not in EXTRA_POLICIES:
            raise ConfigError(
                f"extra: expected one of {', '.join(EXTRA_POLICIES)}, got {self.extra!r}"
            )
        for label, prefix in (("strip_prefix", self.strip_prefix), ("add_prefix", self.add_prefix)):
            if prefix is not None and not prefix:
                raise ConfigError(f"{label} must not be empty")

    @property
    def is_identity(self) -> bool:
        return self == NameMapping()

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the default (what the ledger records)."""
        default = NameMapping()
        return {
            key: getattr(self, key)
            for key in ("strip_prefix", "add_prefix", "missing", "extra")
            if getattr(self, key) != getattr(default, key)
        }

    def rename(self, name: str) -> str:
        if self.strip_prefix and name.startswith(self.strip_prefix):
            name = name[len(self.strip_prefix) :]
        if self.add_prefix:
            name = self.add_prefix + name
        return name


class MappedSource:
    """A checkpoint seen through a `NameMapping`, in the base's names (a `TensorSource`)."""

    def __init__(self, source: TensorSource, mapping: NameMapping, base: TensorSource):
        self._source = source
        self._base = base
        self.mapping = mapping
        self.description = source.description
        self._original: dict[str, str] = {}
        base_names = set(base.names())
        self.ignored: list[str] = []
        for original in source.names():
            name = mapping.rename(original)
            if name in self._original:
                raise CheckpointError(
                    f"{source.description}: tensors {self._original[name]!r} and {original!r} "
                    f"both map to {name!r} under {mapping.to_dict()}"
                )
            if mapping.extra == "ignore" and name not in base_names:
                self.ignored.append(original)
                continue
            self._original[name] = original
        self.filled: list[str] = []
        if mapping.missing == "base":
            self.filled = [
                n
                for n in base.names()
                if n not in self._original and base.spec(n).dtype.is_floating_point
            ]
        self._filled = set(self.filled)

    def names(self) -> list[str]:
        return list(self._original) + self.filled

    def spec(self, name: str) -> TensorSpec:
        if name in self._filled:
            return self._base.spec(name)
        return self._source.spec(self._original[name])

    def get(self, name: str) -> torch.Tensor:
        if name in self._filled:
            return self._base.get(name)
        return self._source.get(self._original[name])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._filled:
            return self._base.get_rows(name, start, stop)
        return self._source.get_rows(self._original[name], start, stop)

    def files(self) -> list[Path]:
        return self._source.files()

    def leaves_unchanged(self, name: str) -> bool:
        """Whether tensor `name` is the base's own (absent from the checkpoint, `missing`)."""
        return name in self._filled

    def file_of(self, name: str) -> str:
        if name in self._filled:
            return f"{tensor_location(self._base, name)} (the base; absent from the checkpoint)"
        original = self._original[name]
        where = tensor_location(self._source, original)
        return where if original == name else f"{where} (as {original!r})"

    def close(self) -> None:
        self._source.close()

    def summary(self) -> dict[str, Any]:
        """What the mapping did, for the ledger."""
        out: dict[str, Any] = dict(self.mapping.to_dict())
        if self.mapping.missing == "base":
            out["taken_from_base"] = len(self.filled)
        if self.mapping.extra == "ignore":
            out["ignored"] = len(self.ignored)
        return out


def apply_mapping(source: TensorSource, mapping: NameMapping, base: TensorSource) -> TensorSource:
    return source if mapping.is_identity else MappedSource(source, mapping, base)


# ------------------------------------------------------------------------------ diagnosis


def _dot_prefixes(name: str) -> Iterable[str]:
    """ "a.b.c" -> "a.", "a.b." (the prefixes that end at a dot)."""
    for i, char in enumerate(name):
        if char == "." and i + 1 < len(name):
            yield name[: i + 1]


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first.rfind(".", 0, i) + 1] if "." in first[:i] else ""


def mismatch_hint(
    base_names: Iterable[str], checkpoint_names: Iterable[str], buffers: Iterable[str] = ()
) -> str:
    """A suggestion for a checkpoint whose names do not match the base's floating-point ones
    (`base_names`; `buffers` are the base's other tensors, which a checkpoint may or may not
    hold), or "" when no option explains the difference."""
    base = set(base_names)
    known = base.union(buffers)
    incoming = set(checkpoint_names)
    strip: Counter[str] = Counter()
    for name in incoming - known:
        for prefix in _dot_prefixes(name):
            if name[len(prefix) :] in known:
                strip[prefix] += 1
    add: Counter[str] = Counter()
    for name in base - incoming:
        for prefix in _dot_prefixes(name):
            if name[len(prefix) :] in incoming:
                add[prefix] += 1
    hints = []
    mapped = incoming
    if strip and (not add or strip.most_common(1)[0][1] >= add.most_common(1)[0][1]):
        prefix, count = strip.most_common(1)[0]
        hints.append(
            f"{count} of its names are the base's with {prefix!r} in front: pass "
            f"strip_prefix={prefix!r} (--strip-prefix {prefix})"
        )
        mapped = {n[len(prefix) :] if n.startswith(prefix) else n for n in incoming}
    elif add:
        prefix, count = add.most_common(1)[0]
        hints.append(
            f"{count} of the base's names are its names with {prefix!r} in front: pass "
            f"add_prefix={prefix!r} (--add-prefix {prefix})"
        )
        mapped = {prefix + n for n in incoming}
    present = sorted(mapped & base)
    absent = base - mapped
    if present and absent:
        under = _common_prefix(present)
        hints.append(
            f"it holds {len(present)} of the base's {len(base)} floating-point tensors"
            + (f" (all under {under!r})" if under else "")
            + "; if the others are unchanged from the base, pass missing='base' (--missing base)"
        )
    extra = mapped - known
    if extra and present:
        hints.append(
            f"{len(extra)} of its tensors are not in the base; to leave them out (e.g. a task "
            "head the base lacks), pass extra='ignore' (--extra ignore)"
        )
    return "; ".join(hints)
