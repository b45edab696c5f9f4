"""Continual task arithmetic: θ ← θ + c·τ_t, starting from the base θ0.

After t models the merged model is θ0 + c·Σ τ_i, whatever the order. State: the unscaled running
sum Σ τ_i (float32 per tensor); the scaling factor c is applied when the merged task vector is
read, so the stored sum does not depend on it. Scalars: `merged_norm` (‖c·Σ τ_i‖ over the whole
model) and `last_task_norm` (‖τ_t‖).

The default c = 0.3 is what the continual-merging paper used for 8 tasks (0.1 for 14 and 20).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    TensorInfo,
    TensorUpdate,
)
from .configs.task_arithmetic import TaskArithmeticConfig
from .lowrank import Factors, ThinSVD, device_of, scaled, task_arithmetic_step
from .ops import squared_norm


class TaskArithmetic(ContinualMethod):
    config_class = TaskArithmeticConfig
    state_names = ("sum",)
    keeps_zero = True
    config: TaskArithmeticConfig

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        if step == 1:
            new_sum = self.stored(task_vector)
        else:
            new_sum = self.stored(state["sum"].to(COMPUTE_DTYPE) + task_vector)
        return TensorUpdate(
            state={"sum": new_sum},
            partials={
                "task_norm_sq": squared_norm(task_vector),
                "sum_norm_sq": squared_norm(new_sum.to(COMPUTE_DTYPE)),
            },
        )

    def update_factored(
        self,
        info: TensorInfo,
        step: int,
        state: ThinSVD | None,
        task: Factors | None,
        scalars: Scalars,
    ) -> tuple[ThinSVD | None, Scalars]:
        if state is None and task is None:
            return None, {"task_norm_sq": 0.0, "sum_norm_sq": 0.0}
        shape = (info.shape[0], info.shape[1])
        tau = task if task is not None else Factors.zeros(shape, device_of(state))
        return task_arithmetic_step(step, state, tau)

    def task_vector_factored(
        self, info: TensorInfo, state: ThinSVD, scalars: Scalars
    ) -> ThinSVD:
        return scaled(state, self.config.scaling_factor)

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        return {
            "merged_norm": abs(self.config.scaling_factor)
            * math.sqrt(partials.get("sum_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
        }

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return self.config.scaling_factor * state["sum"].to(COMPUTE_DTYPE)
