"""Continual Iso-C's config (`methods/iso_c.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param, require_finite
from .pairwise import PairwiseConfig


@dataclass(frozen=True)
class IsoCConfig(PairwiseConfig):
    method = "iso_c"
    factored = True  # LoRA streams are kept as low-rank factors (`methods/lowrank.py`)
    paper = (
        "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
        "(Marczak et al., ICML 2025)"
    )
    paper_url = "https://arxiv.org/abs/2502.04959"
    summary = (
        "continual Iso-C: SVD of merged + incoming task vector with a flat spectrum over its "
        "nonzero singular values (σ <= max(m,n)·eps·σ_max left out; 2-D tensors), average "
        "elsewhere, times c"
    )

    scaling_factor: float = param(
        1.0, "c: merged = base + c·ISO(merged task vector, incoming task vector)"
    )

    def validate(self) -> None:
        require_finite("scaling_factor", self.scaling_factor)
