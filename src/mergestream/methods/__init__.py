"""Continual merge methods: one file per method (its kernel), its config in `configs/`.

- `base`: the contract every method fulfils (`ContinualMethod`, `TensorInfo`, ...).
- `config`: typed configs with help text, and `configs/`: every built-in method's config. No
  torch there: `mergestream methods` and `--help` list methods from the configs alone.
- `registry`: name -> method class (`METHODS`, `get_method`), the built-in methods listed once.
- `classify`: which tensors are linear weights; `linalg`: the exact decompositions OPCM uses;
  `ops`: small tensor operations several methods share.

The names below are imported on first use, so that importing a torch-free module of this
package (a config) does not load every kernel and torch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .average import Average
    from .base import ContinualMethod, TensorInfo, TensorUpdate
    from .config import MethodConfig
    from .configs.average import AverageConfig
    from .configs.dop import DOPConfig
    from .configs.iso_c import IsoCConfig
    from .configs.magmax import MagMaxConfig
    from .configs.opcm import OPCMConfig
    from .configs.task_arithmetic import TaskArithmeticConfig
    from .configs.ties import TiesConfig
    from .configs.tsv_m import TsvMConfig
    from .dop import DOP
    from .iso_c import IsoC, iso_c_combine
    from .magmax import MagMax
    from .opcm import OPCM, opcm_project
    from .registry import METHODS, get_method, register_method
    from .task_arithmetic import TaskArithmetic
    from .ties import Ties, ties_combine
    from .tsv_m import TsvM, tsv_m_combine

_LAZY = {
    "METHODS": ".registry",
    "get_method": ".registry",
    "register_method": ".registry",
    "ContinualMethod": ".base",
    "TensorInfo": ".base",
    "TensorUpdate": ".base",
    "MethodConfig": ".config",
    "Average": ".average",
    "AverageConfig": ".configs.average",
    "DOP": ".dop",
    "DOPConfig": ".configs.dop",
    "IsoC": ".iso_c",
    "IsoCConfig": ".configs.iso_c",
    "iso_c_combine": ".iso_c",
    "MagMax": ".magmax",
    "MagMaxConfig": ".configs.magmax",
    "OPCM": ".opcm",
    "OPCMConfig": ".configs.opcm",
    "opcm_project": ".opcm",
    "TaskArithmetic": ".task_arithmetic",
    "TaskArithmeticConfig": ".configs.task_arithmetic",
    "Ties": ".ties",
    "TiesConfig": ".configs.ties",
    "ties_combine": ".ties",
    "TsvM": ".tsv_m",
    "TsvMConfig": ".configs.tsv_m",
    "tsv_m_combine": ".tsv_m",
}

__all__ = [
    "Average",
    "AverageConfig",
    "ContinualMethod",
    "DOP",
    "DOPConfig",
    "IsoC",
    "IsoCConfig",
    "METHODS",
    "MagMax",
    "MagMaxConfig",
    "MethodConfig",
    "OPCM",
    "OPCMConfig",
    "TaskArithmetic",
    "TaskArithmeticConfig",
    "TensorInfo",
    "TensorUpdate",
    "Ties",
    "TiesConfig",
    "TsvM",
    "TsvMConfig",
    "get_method",
    "iso_c_combine",
    "opcm_project",
    "register_method",
    "ties_combine",
    "tsv_m_combine",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
