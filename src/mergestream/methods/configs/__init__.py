"""Every built-in method's config, without torch: what `mergestream methods` lists.

One module per method, beside its kernel one folder up (`methods/opcm.py` computes with
`configs/opcm.py`'s `OPCMConfig`). A config names its method and summarises it
(`MethodConfig.method`, `.summary`), so this listing imports no kernel; a test checks that it
says what the registered classes say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, describe_config
from .average import AverageConfig
from .dop import DOPConfig
from .iso_c import IsoCConfig
from .magmax import MagMaxConfig
from .opcm import OPCMConfig
from .task_arithmetic import TaskArithmeticConfig
from .ties import TiesConfig
from .tsv_m import TsvMConfig

BUILTIN_CONFIGS: tuple[type[MethodConfig], ...] = (
    AverageConfig,
    DOPConfig,
    IsoCConfig,
    MagMaxConfig,
    OPCMConfig,
    TaskArithmeticConfig,
    TiesConfig,
    TsvMConfig,
)


@dataclass(frozen=True)
class MethodDescription:
    name: str
    summary: str
    parameters: list[tuple[str, str, Any, str]]  # (name, type, default, help)
    factored: bool = False  # keeps a LoRA stream's matrices as low-rank factors


def describe_methods() -> list[MethodDescription]:
    """Every built-in method, sorted by name, with its parameters (`describe_config`)."""
    return [
        MethodDescription(
            config.method, config.summary, describe_config(config), config.factored
        )
        for config in sorted(BUILTIN_CONFIGS, key=lambda c: c.method)
    ]
