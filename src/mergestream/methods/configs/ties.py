"""Continual TIES's config (`methods/ties.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import MethodConfig, param, require_finite

MergeFunc = Literal["sum", "mean", "max"]


@dataclass(frozen=True)
class TiesConfig(MethodConfig):
    method = "ties"
    paper = (
        "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)"
    )
    paper_url = "https://arxiv.org/abs/2306.01708"
    summary = "TIES (trim, elect sign, disjoint merge) of the merged and the incoming task vector"

    scaling_factor: float = param(
        0.3, "c: each step adds c·TIES(merged task vector, incoming task vector)"
    )
    threshold: float = param(
        20.0, "top-k percent: each vector keeps its entries of largest magnitude (0 < k <= 100)"
    )
    scope: Literal["model", "tensor"] = param(
        "model",
        "model: top-k and majority sign over the whole model (exact; extra read passes); "
        "tensor: within each tensor (one pass, as mergekit and PEFT)",
    )
    merge_func: MergeFunc = param(
        "sum", "how agreeing entries combine: sum, mean, or max (largest magnitude)"
    )

    def validate(self) -> None:
        require_finite("scaling_factor", self.scaling_factor)
        if not 0.0 < self.threshold <= 100.0:
            raise ValueError(f"threshold is a percentage in (0, 100], got {self.threshold}")
