"""The shared shape of pairwise continual methods (continual Iso-C, continual TSV-M): at every
step a combination of the pair (merged task vector m, incoming task vector τ_t), times c.

Step 1: m = c·τ_1. Step t: m ← c·combine(m, τ_t), tensor by tensor. The state is m itself;
the scalars are `merged_norm` (‖m‖) and `last_task_norm` (‖τ_t‖). A subclass names its
`combine` (a pure function of two float64 tensors) and its config, which has `scaling_factor`.
2-D tensors need their whole SVD, so they are held whole even above the engine's row-streaming
size; the other tensors (averaged elementwise) stream by row blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch

from .base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    TensorInfo,
    TensorUpdate,
)
from .lowrank import Combine, Factors, ThinSVD, device_of, pairwise_step
from .ops import squared_norm


class PairwiseMerge(ContinualMethod):
    """Base of the pairwise methods (see the module docstring); not registered itself."""

    state_names = ("merged",)
    combine: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    # The same combination of a 2-D pair, on factors (`lowrank.iso_c_combine`, ...).
    combine_factored: ClassVar[Combine]
    # c·combine(0, 0) = 0 for both pairwise rules (the SVD of a zero matrix has no direction),
    # and c·0 = 0 at step 1.
    keeps_zero = True

    def streams_rows(self, info: TensorInfo) -> bool:
        return len(info.shape) != 2  # the SVD needs the whole matrix

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        c = self.config.scaling_factor  # type: ignore[attr-defined]
        task_norm_sq = squared_norm(task_vector)
        if step == 1:
            new_merged = self.stored(task_vector.mul_(c))
        else:
            new_merged = self.stored(c * type(self).combine(state["merged"], task_vector))
        return TensorUpdate(
            state={"merged": new_merged},
            partials={
                "task_norm_sq": task_norm_sq,
                "merged_norm_sq": squared_norm(new_merged.to(COMPUTE_DTYPE)),
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
        """`update` on factors (`lowrank.pairwise_step`). A zero merge at step t > 1 is a zero
        matrix, not a first step: the result is c·combine(0, τ); an unchanged tensor gives
        c·combine(m, 0), as the dense kernel computes it."""
        if state is None and task is None:
            return None, {"task_norm_sq": 0.0, "merged_norm_sq": 0.0}
        shape = (info.shape[0], info.shape[1])
        tau = task if task is not None else Factors.zeros(shape, device_of(state))
        if state is None and step > 1:
            state = ThinSVD.zeros(shape, tau.left.device)
        c = self.config.scaling_factor  # type: ignore[attr-defined]
        return pairwise_step(step, state, tau, c, type(self).combine_factored)

    def task_vector_factored(
        self, info: TensorInfo, state: ThinSVD, scalars: Scalars
    ) -> ThinSVD:
        return state

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        return {
            "merged_norm": math.sqrt(partials.get("merged_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
        }

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return state["merged"].to(COMPUTE_DTYPE)
