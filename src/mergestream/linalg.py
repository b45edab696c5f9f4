"""Exact decompositions used by the merge kernels (pure tensor functions).

OPCM needs every singular value of the running sum S (for the split) and every singular pair (for
the diagonal of the projection). For a tall m x n matrix (m >= n) the right singular vectors and
the squared singular values are the eigenpairs of the n x n Gram matrix SᵀS, and the left ones
follow as u_i = S v_i / σ_i. An `eigh` of the Gram matrix costs a fraction of an SVD, and the
projection can be written with S and V alone, so U is never formed (see methods/opcm.py).

Squaring S squares its condition number κ: in float64 the Gram route's singular vectors carry
errors of about eps·κ² where an SVD's carry eps·κ. So `gram` checks κ from its own eigenvalues and
redoes the (rare) matrices with κ > GRAM_MAX_CONDITION by SVD, keeping errors below ~1e-8
relative either way. The `svd` decomposition always takes the thin SVD (about twice the cost).
Singular values below a tolerance relative to σ_1 are treated as exact zeros (null space of S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Decomposition = Literal["gram", "svd"]

# Relative size below which a singular value counts as zero, per decomposition. For Gram it is
# the square root of the eigenvalue solver's relative accuracy (with margin); for SVD the usual
# matrix-rank tolerance.
_EPS64 = torch.finfo(torch.float64).eps
GRAM_MAX_CONDITION = 1e4


@dataclass(frozen=True)
class RightSingular:
    """Singular values (descending) and right singular vectors of a tall matrix."""

    sigma: torch.Tensor  # (n,), descending, exact zeros for unresolved/null directions
    v: torch.Tensor  # (n, n), columns are right singular vectors
    rank: int  # number of nonzero entries of sigma


def right_singular(s: torch.Tensor, method: Decomposition = "gram") -> RightSingular:
    """σ and V of a tall matrix `s` (m >= n), in the dtype of `s` (use float64)."""
    m, n = s.shape
    if m < n:
        raise ValueError(f"right_singular expects a tall matrix, got {m}x{n}")
    if method == "gram":
        eigenvalues, v = torch.linalg.eigh(s.mT @ s)
        eigenvalues, v = eigenvalues.flip(0), v.flip(1)
        sigma = eigenvalues.clamp_min(0).sqrt()
        if n and bool(sigma[-1] * GRAM_MAX_CONDITION < sigma[0]):
            return right_singular(s, "svd")  # ill-conditioned: the Gram route is not accurate
        rtol = 0.0  # well-conditioned: every singular value is resolved
    elif method == "svd":
        _, sigma, vh = torch.linalg.svd(s, full_matrices=False)
        v = vh.mT
        rtol = max(m, n) * _EPS64
    else:
        raise ValueError(f"unknown decomposition {method!r}")
    top = sigma[0] if n else s.new_zeros(())
    resolved = sigma > rtol * top
    rank = int(resolved.sum())
    sigma = torch.where(resolved, sigma, torch.zeros_like(sigma))
    return RightSingular(sigma=sigma, v=v, rank=rank)


def split_index(sigma: torch.Tensor, alpha: float) -> int:
    """OPCM's split k: the 0-based index of the first i with (σ_1+…+σ_{i+1})/Σσ > alpha.

    0 when no index qualifies or when all σ are zero (the reference's argmax over an all-False
    mask returns 0 too). The running fraction is clamped at 1: rounding can push the last
    cumulative sum a hair above the total, which would make alpha = 1 select the last index
    instead of none.
    """
    total = sigma.sum()
    if not bool(total > 0):
        return 0
    above = torch.nonzero((sigma.cumsum(0) / total).clamp_max(1.0) > alpha)
    return int(above[0, 0]) if above.numel() else 0
