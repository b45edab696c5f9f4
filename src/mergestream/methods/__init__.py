"""Continual merge methods; importing this package registers every built-in method."""

from . import average, magmax, opcm, task_arithmetic, ties  # noqa: F401  (registers)
from .average import Average, AverageConfig
from .base import ContinualMethod, MethodConfig, TensorInfo, TensorUpdate
from .magmax import MagMax, MagMaxConfig
from .opcm import OPCM, OPCMConfig, opcm_project
from .registry import METHODS, get_method, register_method
from .task_arithmetic import TaskArithmetic, TaskArithmeticConfig
from .ties import Ties, TiesConfig, ties_combine

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
]
