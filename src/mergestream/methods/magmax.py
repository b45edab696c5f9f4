"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude.

A running fold: the state keeps, for every entry, the task-vector value of largest magnitude seen
so far (in the state's precision, float32 by default). The merged model is θ0 + c·τ_max,
c = `scaling_factor` (default 0.5, the official 8-task setting).

The result does not depend on the order of the models, to the bit. Each incoming task vector is
first rounded to the state's precision, and the comparison is then made between two values of
that one precision: comparing the float64 incoming value with the rounded stored one would let
the later of two near-equal magnitudes win. Equal magnitudes are settled by sign, not by arrival:
the positive value (+0 over -0) is kept. This rule is a maximum under a total order of the
rounded values, so any order of the same models keeps the same values. (The official release
lets the later model win ties; ties between distinct fine-tuned weights are vanishingly rare.)

Scalars: `merged_norm` (‖c·τ_max‖), `last_task_norm` (‖τ_t‖) and `last_replaced_fraction`
(share of entries whose kept value now comes from model t).
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
from .configs.magmax import MagMaxConfig
from .ops import squared_norm


def replaces(incoming: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Where `incoming` takes the place of `kept` (both of one dtype): a larger magnitude, or an
    equal magnitude with a positive sign against a negative one. Symmetric in its arguments up
    to identical values, so the fold's result does not depend on the order of the models."""
    incoming_abs, kept_abs = incoming.abs(), kept.abs()
    positive_over_negative = torch.signbit(kept) & ~torch.signbit(incoming)
    return (incoming_abs > kept_abs) | ((incoming_abs == kept_abs) & positive_over_negative)


class MagMax(ContinualMethod):
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
        incoming = self.stored(task_vector)
        if step == 1:
            new_max = incoming
            replaced = float(task_vector.numel())
        else:
            kept = self.stored(state["max"])
            take = replaces(incoming, kept)
            new_max = torch.where(take, incoming, kept)
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
