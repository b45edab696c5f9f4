"""OPCM's config (`methods/opcm.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..classify import LinearRule
from ..config import MethodConfig, param


@dataclass(frozen=True)
class OPCMConfig(MethodConfig):
    method = "opcm"
    factored = True  # LoRA streams are kept as low-rank factors (`methods/lowrank.py`)
    paper = (
        "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable "
        "Continual Model Merging (Tang et al., NeurIPS 2025)"
    )
    paper_url = "https://arxiv.org/abs/2501.09522"
    summary = "orthogonal projection against the running sum + adaptive scaling (the default)"

    alpha: float = param(
        0.5, "split: the top singular directions holding this fraction of Σσ are protected (0..1)"
    )
    zero_diagonal: bool = param(
        True,
        "also remove the diagonal coefficients (current reference; exactly orthogonal to the "
        "running sum). false = the variant that produced the paper's tables",
    )
    decomposition: Literal["gram", "svd", "approx-gram"] = param(
        "gram",
        "gram: eigh of the float64 Gram matrix, SVD-grade route where ill-conditioned (exact); "
        "svd: thin SVD always; approx-gram: Gram route at any condition number (faster, "
        "approximate: see BENCHMARKS.md for its measured cost)",
    )
    project_include: str | None = param(
        None, "regex: also project 2-D tensors whose name matches (beyond the linear-weight rule)"
    )
    project_exclude: str | None = param(None, "regex: never project tensors whose name matches")
    adaptive_scaling: bool = param(
        True,
        "divide the running sum by λ = ‖S‖/mean‖τ‖; false keeps merged = base + S (an ablation)",
    )

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or math.isnan(self.alpha):
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        self.linear_rule()  # compiles the patterns, so a bad regex fails at config time

    def linear_rule(self) -> LinearRule:
        return LinearRule(include=self.project_include, exclude=self.project_exclude)
