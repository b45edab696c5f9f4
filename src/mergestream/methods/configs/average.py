"""The running average's config (`methods/average.py`): no parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig


@dataclass(frozen=True)
class AverageConfig(MethodConfig):
    """The running average has no parameters."""

    method = "average"
    summary = "running mean of all models (base + mean task vector; order-independent)"
