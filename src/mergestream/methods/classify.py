"""Which tensors are the 2-D weights of linear layers, decided from names and shapes alone.

OPCM projects exactly these. The rule needs no model class: a tensor is a linear weight when it
is a floating-point 2-D `weight` whose module name is not an embedding table. Embedding tables
are 2-D too (token, position, token-type, T5's relative attention bias), so they are recognised
by the module names every common architecture uses for them. Conv kernels, norms and biases are
not 2-D `weight`s of this kind and never match. GPT-2's `Conv1D` layers are linear layers with a
transposed weight; OPCM's projection is the same under transposition, so they count as linear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a spec is only read (shape, dtype): no torch here, configs use the rules
    from ..io.safetensors_stream import TensorSpec

# Matched against the last component of the module name (the part before ".weight").
EMBEDDING_MODULE = re.compile(
    r"(embed|wte|wpe|^shared$|relative_attention_bias|pos_emb|positional)", re.IGNORECASE
)


@dataclass(frozen=True)
class LinearRule:
    """The default rule, optionally widened by `include` and narrowed by `exclude` (regexes,
    searched in the full tensor name)."""

    include: str | None = None
    exclude: str | None = None

    def __post_init__(self) -> None:
        for label, pattern in (
            ("project_include", self.include),
            ("project_exclude", self.exclude),
        ):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(
                        f"{label}: invalid regular expression {pattern!r}: {err}"
                    ) from err

    def is_linear(self, name: str, spec: TensorSpec) -> bool:
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            return False
        if self.exclude is not None and re.search(self.exclude, name):
            return False
        if self.include is not None and re.search(self.include, name):
            return True
        return default_is_linear_weight(name)


@dataclass(frozen=True)
class EveryMatrixRule(LinearRule):
    """Every floating-point 2-D tensor, embedding tables included: the rule of methods that
    decide by shape alone, as the reference code of continual Iso-C and TSV-M does."""

    def is_linear(self, name: str, spec: TensorSpec) -> bool:
        return len(spec.shape) == 2 and spec.dtype.is_floating_point


def default_is_linear_weight(name: str) -> bool:
    """The name half of the default rule (the caller has checked the tensor is 2-D)."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    last_module = module.rpartition(".")[2]
    return not EMBEDDING_MODULE.search(last_module)


def classify(
    specs: Iterable[tuple[str, TensorSpec]], rule: LinearRule | None = None
) -> dict[str, str]:
    """Map each tensor name to its role: "projected", "added" (other float) or "copied"."""
    rule = rule or LinearRule()
    roles = {}
    for name, spec in specs:
        if not spec.dtype.is_floating_point:
            roles[name] = "copied"
        elif rule.is_linear(name, spec):
            roles[name] = "projected"
        else:
            roles[name] = "added"
    return roles
