"""Continual merge methods; importing this package registers every built-in method."""

from . import (  # noqa: F401  (registers)
    average,
    dop,
    iso_c,
    magmax,
    opcm,
    task_arithmetic,
    ties,
    tsv_m,
)
from .average import Average, AverageConfig
from .base import ContinualMethod, MethodConfig, TensorInfo, TensorUpdate
from .dop import DOP, DOPConfig
from .iso_c import IsoC, IsoCConfig, iso_c_combine
from .magmax import MagMax, MagMaxConfig
from .opcm import OPCM, OPCMConfig, opcm_project
from .registry import METHODS, get_method, register_method
from .task_arithmetic import TaskArithmetic, TaskArithmeticConfig
from .ties import Ties, TiesConfig, ties_combine
from .tsv_m import TsvM, TsvMConfig, tsv_m_combine

__all__ = [
    "METHODS",
    "OPCM",
    "Average",
    "AverageConfig",
    "ContinualMethod",
    "MagMax",
    "MagMaxConfig",
    "MethodConfig",
    "OPCMConfig",
    "TaskArithmetic",
    "TaskArithmeticConfig",
    "TensorInfo",
    "TensorUpdate",
    "Ties",
    "TiesConfig",
    "get_method",
    "opcm_project",
    "register_method",
    "ties_combine",
    # continual DOP, Iso-C and TSV-M
    "DOP",
    "DOPConfig",
    "IsoC",
    "IsoCConfig",
    "TsvM",
    "TsvMConfig",
    "iso_c_combine",
    "tsv_m_combine",
]
