"""The base of the pairwise methods' configs (`methods/pairwise.py`): continual Iso-C and TSV-M."""

from __future__ import annotations

from dataclasses import dataclass

from ..classify import EveryMatrixRule, LinearRule
from ..config import MethodConfig


@dataclass(frozen=True)
class PairwiseConfig(MethodConfig):
    """Base of the pairwise methods' configs."""

    def linear_rule(self) -> LinearRule:
        # Every 2-D tensor takes the SVD route, so `status --tensors` and the planners (cost,
        # memory) count embedding tables among the matrices, as `combine` treats them.
        return EveryMatrixRule()
