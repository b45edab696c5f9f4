"""Continual TSV-M's config (`methods/tsv_m.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param, require_finite
from .pairwise import PairwiseConfig


@dataclass(frozen=True)
class TsvMConfig(PairwiseConfig):
    method = "tsv_m"
    factored = True  # LoRA streams are kept as low-rank factors (`methods/lowrank.py`)
    paper = (
        "Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., "
        "CVPR 2025)"
    )
    paper_url = "https://arxiv.org/abs/2412.00081"
    summary = (
        "continual TSV-M: top half of the singular triplets of the merged and the incoming "
        "task vector (those with σ <= max(m,n)·eps·σ_max left out), orthogonalised (2-D "
        "tensors), average elsewhere, times c"
    )

    scaling_factor: float = param(
        1.0, "c: merged = base + c·TSV(merged task vector, incoming task vector)"
    )

    def validate(self) -> None:
        require_finite("scaling_factor", self.scaling_factor)
