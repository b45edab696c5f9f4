"""DOP's config (`methods/dop.py`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ..classify import LinearRule
from ..config import MethodConfig, param

ProjSpace = Literal["uv", "u", "v"]


@dataclass(frozen=True)
class DOPConfig(MethodConfig):
    method = "dop"
    paper = (
        "Continual Model Merging without Data: Dual Projections for Balancing Stability and "
        "Plasticity (NeurIPS 2025)"
    )
    paper_url = ""
    summary = (
        "dual orthogonal projections: each linear weight optimised against both task vectors' "
        "singular subspaces (MGDA-weighted Adam, or exact), average elsewhere"
    )

    lr: float = param(1e-4, "Adam's learning rate")
    num_steps: int = param(200, "Adam steps per linear weight")
    mgda: bool = param(
        True, "weights from the two-task MGDA min-norm solution; false: fixed (alpha, 1-alpha)"
    )
    alpha: float = param(
        0.8, "weight of the merged model's loss (fixed weights, the EMA's start, exact solver)"
    )
    ema: bool = param(True, "with mgda: use an exponential moving average of the weights")
    ema_beta: float = param(0.999, "the EMA's decay")
    svd_epsilon: float = param(
        0.99999, "energy (fraction of Σσ) kept by each task vector's truncated SVD (0..1)"
    )
    svd_proj_space: ProjSpace = param(
        "uv", "uv: both projections; u: left singular vectors only; v: right only"
    )
    solver: Literal["adam", "exact"] = param(
        "adam",
        "adam: the reference's optimisation; exact: the minimiser for the fixed weights "
        "(alpha, 1-alpha) by a Sylvester solve",
    )
    keep_base: str | None = param(
        None,
        "regex: tensors kept at the base from step 2 (the reference does this to parameters "
        "of non-leaf modules, e.g. class_embedding); default: averaged",
    )
    project_include: str | None = param(
        None, "regex: also optimise 2-D tensors whose name matches (beyond the linear rule)"
    )
    project_exclude: str | None = param(None, "regex: never optimise tensors whose name matches")

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")
        for name in ("alpha", "ema_beta", "svd_epsilon"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        self.linear_rule()
        if self.keep_base is not None:
            try:
                re.compile(self.keep_base)
            except re.error as err:
                raise ValueError(
                    f"keep_base: invalid regular expression {self.keep_base!r}: {err}"
                ) from err

    def linear_rule(self) -> LinearRule:
        return LinearRule(include=self.project_include, exclude=self.project_exclude)
