"""Exact decompositions used by the merge kernels (pure tensor functions).

OPCM needs every singular value of the running sum S (for the split) and every singular pair (for
the diagonal of the projection). For a tall m x n matrix (m >= n) the right singular vectors and
the squared singular values are the eigenpairs of the n x n Gram matrix SᵀS, and the left ones
follow as u_i = S v_i / σ_i. An `eigh` of the Gram matrix costs a fraction of an SVD, and the
projection can be written with S and V alone, so U is never formed (see methods/opcm.py).

Squaring S squares its condition number, so this runs in float64: eigenvalue errors are about
n·eps·σ_1², i.e. singular values below ~1e-6·σ_1 are not resolved. Such directions are treated as
the null space of S (their σ is reported as 0). The `svd` decomposition resolves them down to
~eps·σ_1 at about twice the cost.
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
        rtol = 10.0 * (n * _EPS64) ** 0.5
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
