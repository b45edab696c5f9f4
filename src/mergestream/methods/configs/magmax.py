"""MagMax's config (`methods/magmax.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, param, require_finite


@dataclass(frozen=True)
class MagMaxConfig(MethodConfig):
    method = "magmax"
    paper = (
        "MagMax: Leveraging Model Merging for Seamless Continual Learning (Marczak et al., ECCV "
        "2024)"
    )
    paper_url = "https://arxiv.org/abs/2407.06322"
    summary = "per entry, the task-vector value of largest magnitude so far, times c"

    scaling_factor: float = param(0.5, "c: merged = base + c·(largest-magnitude task vector)")

    def validate(self) -> None:
        require_finite("scaling_factor", self.scaling_factor)
