"""Running average of the models (as in stochastic weight averaging): θ ← ((t−1)·θ + θ_t)/t.

Step 1 gives the first model itself; after t models the merged model is the plain mean of the
models, i.e. θ0 + mean τ_i, whatever the order. State: the running mean task vector (float32 per
tensor), updated with the same rule, ((t−1)·mean + τ_t)/t, in float64. No parameters.
Scalars: `merged_norm` (‖mean τ‖ over the whole model) and `last_task_norm` (‖τ_t‖).
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
from .configs.average import AverageConfig
from .lowrank import Factors, ThinSVD, average_step, device_of
from .ops import squared_norm


class Average(ContinualMethod):
    config_class = AverageConfig
    state_names = ("mean",)
    keeps_zero = True

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        if step == 1:
            new_mean = self.stored(task_vector)
        else:
            previous = state["mean"].to(COMPUTE_DTYPE)
            new_mean = self.stored(((step - 1) * previous + task_vector) / step)
        return TensorUpdate(
            state={"mean": new_mean},
            partials={
                "task_norm_sq": squared_norm(task_vector),
                "mean_norm_sq": squared_norm(new_mean.to(COMPUTE_DTYPE)),
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
        """`update` on factors (`lowrank.average_step`). A zero mean at step t > 1 is a zero
        matrix, not a first step: the new mean is τ/t; an unchanged tensor gives mean·(t−1)/t."""
        if state is None and task is None:
            return None, {"task_norm_sq": 0.0, "mean_norm_sq": 0.0}
        shape = (info.shape[0], info.shape[1])
        tau = task if task is not None else Factors.zeros(shape, device_of(state))
        if state is None and step > 1:
            state = ThinSVD.zeros(shape, tau.left.device)
        return average_step(step, state, tau)

    def task_vector_factored(
        self, info: TensorInfo, state: ThinSVD, scalars: Scalars
    ) -> ThinSVD:
        return state

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        return {
            "merged_norm": math.sqrt(partials.get("mean_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
        }

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return state["mean"].to(COMPUTE_DTYPE)
