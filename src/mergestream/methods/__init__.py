"""Continual merge methods; importing this package registers every built-in method."""

from . import opcm  # noqa: F401  (registers)
from .base import ContinualMethod, MethodConfig, TensorInfo, TensorUpdate
from .opcm import OPCM, OPCMConfig, opcm_project
from .registry import METHODS, get_method, register_method

__all__ = [
    "METHODS",
    "OPCM",
    "ContinualMethod",
    "MethodConfig",
    "OPCMConfig",
    "TensorInfo",
    "TensorUpdate",
    "get_method",
    "opcm_project",
    "register_method",
]
