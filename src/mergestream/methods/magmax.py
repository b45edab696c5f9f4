"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude.

A running fold: the state keeps, for every entry, the task-vector value of largest magnitude seen
so far (float32 per tensor); an incoming value replaces it when |τ_t| ≥ |kept| (ties: the later
model wins, as in the official release). The merged model is θ0 + c·τ_max, c = `scaling_factor`
(default 0.5, the official 8-task setting). The comparison is made in float64 between the incoming
task vector and the stored float32 value. Scalars: `merged_norm` (‖c·τ_max‖), `last_task_norm`
(‖τ_t‖) and `last_replaced_fraction` (share of entries taken from model t).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    MethodConfig,
    Scalars,
    TensorInfo,
    TensorUpdate,
    param,
    squared_norm,
)
from .registry import register_method


@dataclass(frozen=True)
class MagMaxConfig(MethodConfig):
    scaling_factor: float = param(0.5, "c: merged = base + c·(largest-magnitude task vector)")

    def validate(self) -> None:
        if not math.isfinite(self.scaling_factor):
            raise ValueError(f"scaling_factor must be finite, got {self.scaling_factor}")


@register_method
class MagMax(ContinualMethod):
    name = "magmax"
    summary = "per entry, the task-vector value of largest magnitude so far, times c"
    config_class = MagMaxConfig
    state_names = ("max",)
    config: MagMaxConfig

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        if step == 1:
            new_max = self.stored(task_vector)
            replaced = float(task_vector.numel())
        else:
            kept = state["max"].to(COMPUTE_DTYPE)
            take = task_vector.abs() >= kept.abs()
            new_max = self.stored(torch.where(take, task_vector, kept))
            replaced = float(take.sum())
        return TensorUpdate(
            state={"max": new_max},
            partials={
                "task_norm_sq": squared_norm(task_vector),
                "max_norm_sq": squared_norm(new_max.to(COMPUTE_DTYPE)),
                "replaced": replaced,
                "entries": float(task_vector.numel()),
            },
        )

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        entries = partials.get("entries", 0.0)
        return {
            "merged_norm": abs(self.config.scaling_factor)
            * math.sqrt(partials.get("max_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
            "last_replaced_fraction": partials.get("replaced", 0.0) / entries if entries else 0.0,
        }

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return self.config.scaling_factor * state["max"].to(COMPUTE_DTYPE)
