"""Continual task arithmetic's config (`methods/task_arithmetic.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, param, require_finite


@dataclass(frozen=True)
class TaskArithmeticConfig(MethodConfig):
    method = "task_arithmetic"
    factored = True  # LoRA streams are kept as low-rank factors (`methods/lowrank.py`)
    paper = (
        "Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023)"
    )
    paper_url = "https://arxiv.org/abs/2212.04089"
    summary = "base + c · sum of all task vectors (order-independent)"

    scaling_factor: float = param(
        0.3, "c: merged = base + c·Σ task vectors (0.3 suits ~8 models, 0.1 suits 14-20)"
    )

    def validate(self) -> None:
        require_finite("scaling_factor", self.scaling_factor)
