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
`approx-gram` (opt-in, approximate) trusts the Gram route at any κ: singular values below
sqrt(n·eps)·σ_1, which the Gram matrix cannot resolve, become zeros, and the vectors of the
small ones carry errors up to eps·κ². Singular values below a tolerance relative to σ_1 are
treated as exact zeros (null space of S).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

Decomposition = Literal["gram", "svd", "approx-gram"]

# Every kernel computes in float64, whatever the stored precision (`base.STATE_DTYPE`).
COMPUTE_DTYPE = torch.float64

# Relative size below which a singular value counts as zero, per decomposition. For Gram it is
# the square root of the eigenvalue solver's relative accuracy (with margin); for SVD the usual
# matrix-rank tolerance (`rank_rtol`).
_EPS64 = torch.finfo(torch.float64).eps
GRAM_MAX_CONDITION = 1e4


def rank_rtol(rows: int, cols: int) -> float:
    """The rank rule of every SVD-grade decomposition in the project: a singular value σ of a
    rows x cols float64 matrix with σ <= rank_rtol · σ_max (or σ = 0) is not a direction of
    the matrix. max(rows, cols)·eps is NumPy's `matrix_rank` default: a backward-stable SVD
    returns the singular values of a matrix within about that of the input, so anything
    smaller cannot be told apart from round-off. OPCM's diagonal rule, Iso-C's spectrum,
    TSV-M's triplets and the low-rank factors (`methods/lowrank.py`) all use it (raised by
    `round_off_floor` for inputs held in float32: OPCM's running sum, Iso-C's and TSV-M's
    states)."""
    return max(rows, cols, 1) * _EPS64


def held_below_float64(dtype: torch.dtype) -> bool:
    """Whether a tensor held in `dtype` was rounded more coarsely than float64 (float32, a
    half type): only then does its storage round-off raise the rank rule."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > _EPS64


def round_off_floor(dtype: torch.dtype, frobenius_norm: float) -> float:
    """The largest singular value the storage round-off of a tensor held in `dtype` with
    Frobenius norm `frobenius_norm` can have: each entry was rounded by at most eps/2 of
    itself, so the error matrix has spectral norm at most eps/2·‖x‖_F. Zero for float64 (and
    anything at least as precise): the rank rule then stays the references' one."""
    if not held_below_float64(dtype):
        return 0.0
    return torch.finfo(dtype).eps / 2 * frobenius_norm


def stored_round_off_floor(x: torch.Tensor) -> float:
    """`round_off_floor` of the tensor `x` as it is held. Zero, and no pass over `x`, for a
    tensor held in float64 (or an integer one)."""
    if not held_below_float64(x.dtype):
        return 0.0
    return round_off_floor(x.dtype, float(torch.linalg.vector_norm(x, dtype=COMPUTE_DTYPE)))


def stored_rtol(rows: int, cols: int, sigma_max: float, *inputs: torch.Tensor) -> float:
    """`rank_rtol`, raised to cover the round-off of `inputs` held below float64 (a float32
    state, see `round_off_floor`): a direction of the matrix made from them with σ under that
    cannot be told apart from it. Without this a rank-deficient running sum stored in float32
    (a LoRA stream) shows float32 noise as hundreds of directions of σ ≈ 1e-7·σ_max. Inputs
    in float64 add nothing: the rule is then `rank_rtol`, the references' parity rule."""
    floor = sum(stored_round_off_floor(x) for x in inputs)
    base = rank_rtol(rows, cols)
    return max(base, floor / sigma_max) if sigma_max > 0 else base


def above_round_off(decomposed: RightSingular, floor: float) -> RightSingular:
    """`decomposed` with every singular value at or below `floor` (`round_off_floor` of the
    stored matrix) set to exactly 0, as unresolved: those directions are the storage's
    round-off, not the matrix's. The same object when nothing changes (a float64 input)."""
    if floor <= 0.0 or decomposed.rank == 0:
        return decomposed
    kept = decomposed.sigma > floor
    rank = int(kept.sum())
    if rank == decomposed.rank:
        return decomposed
    sigma = torch.where(kept, decomposed.sigma, torch.zeros_like(decomposed.sigma))
    return RightSingular(sigma=sigma, v=decomposed.v, rank=rank)


def resolved_rank(sigma: torch.Tensor, rtol: float) -> int:
    """How many of the descending singular values `sigma` exceed rtol·σ_max (0 when all are
    zero): the rank under the rule of `rank_rtol`."""
    if sigma.numel() == 0:
        return 0
    return int((sigma > rtol * sigma[0]).sum())


@dataclass(frozen=True)
class RightSingular:
    """Singular values (descending) and right singular vectors of a tall matrix."""

    sigma: torch.Tensor  # (n,), descending, exact zeros for unresolved/null directions
    v: torch.Tensor  # (n, n), columns are right singular vectors
    rank: int  # number of nonzero entries of sigma


def polar_on_range(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P S Qᵀ (thin SVD) on the range of x: the pairs
    with S <= rank_rtol·S_max are left out, because there P and Q are whatever the SVD routine
    returns (the partial isometry of x; for x of full rank, its orthogonal polar factor)."""
    p, sigma, qh = torch.linalg.svd(x, full_matrices=False)
    rank = resolved_rank(sigma, rank_rtol(*x.shape))
    return p[:, :rank] @ qh[:rank]


def right_singular(s: torch.Tensor, method: Decomposition = "gram") -> RightSingular:
    """σ and V of a tall matrix `s` (m >= n), in the dtype of `s` (use float64)."""
    m, n = s.shape
    if m < n:
        raise ValueError(f"right_singular expects a tall matrix, got {m}x{n}")
    if method == "gram":
        decomposed = right_singular_from_gram(s.mT @ s)
        # None: ill-conditioned, the Gram route is not accurate enough; take the SVD.
        return decomposed if decomposed is not None else right_singular(s, "svd")
    if method == "approx-gram":
        approximate = right_singular_from_gram(s.mT @ s, max_condition=None)
        assert approximate is not None  # no condition check: always decomposed
        return approximate
    if method == "svd":
        _, sigma, vh = torch.linalg.svd(s, full_matrices=False)
        return _resolved(sigma, vh.mT, rtol=rank_rtol(m, n))
    raise ValueError(f"unknown decomposition {method!r}")


def right_singular_from_gram(
    gram: torch.Tensor, max_condition: float | None = GRAM_MAX_CONDITION
) -> RightSingular | None:
    """σ and V from the Gram matrix SᵀS alone; None when S's condition number exceeds
    `max_condition` (the caller then needs an SVD-grade route). With `max_condition=None`
    every S is decomposed this way (approximate when ill-conditioned; see the module)."""
    n = gram.shape[0]
    eigenvalues, v = torch.linalg.eigh(gram)
    eigenvalues, v = eigenvalues.flip(0), v.flip(1)
    sigma = eigenvalues.clamp_min(0).sqrt()
    if max_condition is None:
        # eigh resolves eigenvalues down to about n·eps·λ_1, so σ down to sqrt(n·eps)·σ_1.
        return _resolved(sigma, v, rtol=math.sqrt(max(n, 1) * _EPS64))
    if n and bool(sigma[-1] * max_condition < sigma[0]):
        return None
    return _resolved(sigma, v, rtol=0.0)  # well-conditioned: every singular value is resolved


def right_singular_from_r(r: torch.Tensor, rows: int) -> RightSingular:
    """σ and V of a tall matrix with `rows` rows from the R factor of its QR decomposition
    (S = QR has S's singular values and right singular vectors), as accurate as an SVD of S."""
    _, sigma, vh = torch.linalg.svd(r, full_matrices=False)
    return _resolved(sigma, vh.mT, rtol=rank_rtol(rows, r.shape[1]))


def r_factor(blocks: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    """The n x n R factor of the QR decomposition of the row blocks stacked (a tall-skinny QR:
    each block is folded into the R so far, so only one block and R are ever in memory).
    Householder QR is backward stable, so R carries errors of about eps·‖S‖, like an SVD."""
    r: torch.Tensor | None = None
    for block in blocks:
        stacked = block if r is None else torch.cat([r, block])
        r = torch.linalg.qr(stacked, mode="r").R
    if r is None:
        raise ValueError("r_factor needs at least one block")
    if r.shape[0] < n:  # fewer rows than columns so far: pad R to square with zero rows
        r = torch.cat([r, r.new_zeros(n - r.shape[0], n)])
    return r


def _resolved(sigma: torch.Tensor, v: torch.Tensor, rtol: float) -> RightSingular:
    """Singular values below rtol·σ_1 become exact zeros (null or unresolved directions)."""
    top = sigma[0] if sigma.numel() else sigma.new_zeros(())
    resolved = sigma > rtol * top
    rank = int(resolved.sum())
    sigma = torch.where(resolved, sigma, torch.zeros_like(sigma))
    # Contiguous, whatever view the solver returned (eigh's columns are flipped, the SVD's V is
    # a transpose): the products with V then round the same as with a V read back from disk
    # (a prepared generation), so prepared and unprepared steps agree bit for bit.
    return RightSingular(sigma=sigma.contiguous(), v=v.contiguous(), rank=rank)


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
