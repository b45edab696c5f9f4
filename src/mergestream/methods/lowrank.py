"""Running sums kept as low-rank factors: the merge of LoRA task vectors without m×n matrices.

A LoRA adapter's task vector for a weight is τ = s·B·A (B: m×r, A: r×n; `io/lora.py`). Every
method here combines task vectors linearly or through an SVD, so after t adapters the running
sum S has rank at most the sum of their ranks, and S = L Rᵀ (L: m×k, R: n×k) holds it in
(m + n)·k numbers instead of m·n. These functions compute each method's step on factors with
the dense kernel's result to float64 round-off (methods/opcm.py, task_arithmetic.py,
average.py, iso_c.py, tsv_m.py), in O((m + n)·k² + k³) time and O((m + n)·k) memory per
matrix: nothing here forms an m×n matrix except `densify`. Pure functions on float64 tensors.

Two forms of one matrix (`LowRank`):
- `Factors(left, right)`: S = L Rᵀ with any k, 0 included (the zero matrix); the columns need
  not be independent (an adapter's B with a zero column, an adapter given twice).
- `ThinSVD(u, sigma, v)`: S = U diag(σ) Vᵀ, U and V with orthonormal columns, σ descending and
  above the rank rule. Every step returns this form, so the next step starts from the
  decomposition instead of recomputing it (OPCM's projection needs it; a prepared step is
  this form too).

The rank rule is the dense side's (`linalg.rank_rtol`, NumPy's `matrix_rank` tolerance): a
singular value σ <= max(m, n)·eps·σ_max (or σ = 0) is not a direction of S and is dropped, so a
rank-deficient or repeated adapter leaves k at the true rank and never produces a NaN (no step
divides by a singular value).

How a step stays small: with S = U Σ Vᵀ and the incoming τ = U_τ Σ_τ V_τᵀ, the columns of U_τ
are split into their part in span(U) and an orthonormal remainder Q_u (likewise V_τ against
V, remainder Q_v), so S, τ and anything built from their coefficients live in
[U Q_u] · (small core) · [V Q_v]ᵀ; the new sum is the SVD of the (k + r) x (k + r) core,
rotated back. Its cost is a few products of m×(k + r) and n×(k + r) matrices and one
(k + r)³ SVD; `opcm_step_cost` writes it down beside the dense step's.

When the factored form stops paying: see `DENSE_RANK_FRACTION`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .linalg import COMPUTE_DTYPE, rank_rtol, resolved_rank, split_index

Partials = dict[str, float]  # a step's partial sums of one tensor (`base.TensorUpdate.partials`)

# The switch rule: a matrix's running sum is kept as factors while k <= DENSE_RANK_FRACTION ·
# min(m, n) and goes dense beyond. Measured by benchmarks/lowrank_switch.py on LLaMA-7B shapes
# (BENCHMARKS.md, "Low-rank streams: where factors stop paying"; 2026-12-03, one core): the
# factored OPCM step is faster than the dense one at every k <= min(m, n) (8.8-12.4x at
# min(m, n)/2, 1.3-1.8x at full rank), so time never calls for the switch; the state's bytes,
# (m + n)·k against m·n, cross at k = m·n/(m + n) >= min(m, n)/2. At 1/2 the factored state is
# never larger than the dense one, for any shape, and its step is still about 10x faster.
DENSE_RANK_FRACTION = 0.5


@dataclass(frozen=True)
class Factors:
    """S = left · rightᵀ (left: m×k, right: n×k, float64, k >= 0)."""

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        _check_pair("Factors", self.left, self.right)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])

    @property
    def k(self) -> int:
        """The number of factor columns (an upper bound on the rank)."""
        return self.left.shape[1]

    @classmethod
    def zeros(cls, shape: tuple[int, int], device: torch.device | str = "cpu") -> Factors:
        m, n = shape
        empty = torch.zeros(m, 0, dtype=COMPUTE_DTYPE, device=device)
        return cls(empty, torch.zeros(n, 0, dtype=COMPUTE_DTYPE, device=device))

    @classmethod
    def from_lora(
        cls, b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, transpose: bool = False
    ) -> Factors:
        """τ = scale · B·A (m×n), or its transpose (an embedding LoRA, `fan_in_fan_out`), from
        the factors as an adapter stores them: B (out×r) and A (r×in), in any float dtype."""
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"LoRA factors need B (out x r) and A (r x in), got B {list(b.shape)} and "
                f"A {list(a.shape)}"
            )
        left = b.to(COMPUTE_DTYPE) * scale
        right = a.to(COMPUTE_DTYPE).mT
        # (s·B·A)ᵀ = Aᵀ · (s·B)ᵀ: the same two factors, swapped.
        return cls(right, left) if transpose else cls(left, right)


@dataclass(frozen=True)
class ThinSVD:
    """S = u · diag(sigma) · vᵀ: u (m×k) and v (n×k) with orthonormal columns, sigma (k,)
    descending, every value above the rank rule (k is the rank of S)."""

    u: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        _check_pair("ThinSVD", self.u, self.v)
        if self.sigma.shape != (self.u.shape[1],):
            raise ValueError(
                f"ThinSVD needs one singular value per column, got {list(self.sigma.shape)} "
                f"for {self.u.shape[1]} columns"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[0])

    @property
    def k(self) -> int:
        """The rank of S."""
        return self.u.shape[1]

    @property
    def left(self) -> torch.Tensor:
        return self.u * self.sigma

    @property
    def right(self) -> torch.Tensor:
        return self.v

    def factors(self) -> Factors:
        return Factors(self.left, self.right)

    def truncated(self, rank: int) -> ThinSVD:
        """The best rank-`rank` approximation (Eckart–Young): the top triplets."""
        return ThinSVD(self.u[:, :rank], self.sigma[:rank], self.v[:, :rank])

    @classmethod
    def zeros(cls, shape: tuple[int, int], device: torch.device | str = "cpu") -> ThinSVD:
        m, n = shape
        return cls(
            torch.zeros(m, 0, dtype=COMPUTE_DTYPE, device=device),
            torch.zeros(0, dtype=COMPUTE_DTYPE, device=device),
            torch.zeros(n, 0, dtype=COMPUTE_DTYPE, device=device),
        )


LowRank = Factors | ThinSVD


def device_of(x: LowRank | None) -> torch.device:
    """Where a matrix's factors live (the CPU for None), for the zero matrices a step adds."""
    return x.left.device if x is not None else torch.device("cpu")


def _check_pair(what: str, left: torch.Tensor, right: torch.Tensor) -> None:
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(
            f"{what} needs an m x k and an n x k matrix, got {list(left.shape)} and "
            f"{list(right.shape)}"
        )
    if left.dtype != COMPUTE_DTYPE or right.dtype != COMPUTE_DTYPE:
        raise ValueError(f"{what} holds float64 factors, got {left.dtype} and {right.dtype}")


# ----------------------------------------------------------------------------- decompositions


def thin_svd(x: LowRank, rtol: float | None = None) -> ThinSVD:
    """S's singular triplets, dropping σ <= rtol·σ_max and σ = 0 (`rtol` defaults to the rank
    rule of the dense side, `linalg.rank_rtol(m, n)`).

    From factors: thin QRs L = Q_L R_L and R = Q_R R_R, then the SVD of the small core
    R_L R_Rᵀ = W Σ Zᵀ, so S = (Q_L W) Σ (Q_R Z)ᵀ. Householder QR keeps Q orthonormal whatever
    the columns (a zero column, a repeated one), and the rank-deficient directions show up as
    negligible σ of the core, which the rule drops. A `ThinSVD` is returned as it is (cut
    further when `rtol` is given)."""
    m, n = x.shape
    tol = rank_rtol(m, n) if rtol is None else rtol
    if isinstance(x, ThinSVD):
        return x if rtol is None else x.truncated(resolved_rank(x.sigma, tol))
    if x.k == 0:
        return ThinSVD.zeros((m, n), x.left.device)
    q_left, r_left = torch.linalg.qr(x.left)
    q_right, r_right = torch.linalg.qr(x.right)
    w, sigma, zh = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
    rank = resolved_rank(sigma, tol)
    return ThinSVD(q_left @ w[:, :rank], sigma[:rank], q_right @ zh[:rank].mT)


def compress(x: LowRank) -> ThinSVD:
    """x re-orthonormalised to its true rank (the rank rule): the canonical form the steps
    keep. Never more columns than the rank, never a NaN."""
    return thin_svd(x)


def _extend(
    basis: torch.Tensor, x: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the orthonormal columns x against an orthonormal `basis`:
    x = basis · coeff + q · rq (to round-off), q orthonormal and orthogonal to `basis`.

    Parts of x outside the basis smaller than `tol` are round-off of a vector that lies in the
    basis (an adapter repeated, a direction already in the sum) and are dropped, so they do not
    add columns. Two passes of Gram-Schmidt make the remainder orthogonal to the basis
    ("twice is enough"); the remainder's weak directions can still lean into the basis by
    eps·‖remainder‖/σ, so q is projected once more and re-orthonormalised, which moves q·rq by
    round-off only."""
    coeff = basis.mT @ x
    if x.shape[1] == 0:
        return coeff, x, x.new_zeros(0, 0)
    rest = x - basis @ coeff
    again = basis.mT @ rest
    rest -= basis @ again
    coeff += again
    q, r = torch.linalg.qr(rest)
    w, s, zh = torch.linalg.svd(r, full_matrices=False)
    kept = int((s > tol).sum())
    q, rq = q @ w[:, :kept], s[:kept, None] * zh[:kept]
    q = q - basis @ (basis.mT @ q)
    q, t = torch.linalg.qr(q)
    return coeff, q, t @ rq


@dataclass(frozen=True)
class _Joint:
    """S and τ in one pair of orthonormal bases: S = U Σ Vᵀ, τ = [U Q_u] T [V Q_v]ᵀ."""

    s: ThinSVD
    tau: ThinSVD
    q_u: torch.Tensor
    q_v: torch.Tensor
    task_core: torch.Tensor  # T: (k + ku) x (k + kv)

    @classmethod
    def of(cls, s: ThinSVD, tau: ThinSVD) -> _Joint:
        tol = rank_rtol(*s.shape)
        coeff_u, q_u, r_u = _extend(s.u, tau.u, tol)
        coeff_v, q_v, r_v = _extend(s.v, tau.v, tol)
        task_core = (torch.cat([coeff_u, r_u]) * tau.sigma) @ torch.cat([coeff_v, r_v]).mT
        return cls(s, tau, q_u, q_v, task_core)

    def in_s_basis(self) -> torch.Tensor:
        """P = Uᵀ τ V (k×k): τ's coefficients in S's singular bases."""
        return self.task_core[: self.s.k, : self.s.k]

    def sum(self, sum_core: torch.Tensor, task_weight: float) -> ThinSVD:
        """The thin SVD of U·sum_core·Vᵀ + task_weight·τ (sum_core: k×k)."""
        k = self.s.k
        core = self.task_core * task_weight
        core[:k, :k] += sum_core
        w, sigma, zh = torch.linalg.svd(core, full_matrices=False)
        rank = resolved_rank(sigma, rank_rtol(*self.s.shape))
        # [U Q_u] W without the concatenated copy: U W[:k] + Q_u W[k:]
        u = torch.addmm(self.q_u @ w[k:, :rank], self.s.u, w[:k, :rank])
        v = torch.addmm(self.q_v @ zh[:rank, k:].mT, self.s.v, zh[:rank, :k].mT)
        return ThinSVD(u, sigma[:rank], v)


# ----------------------------------------------------------------------------- small algebra


def densify(x: LowRank) -> torch.Tensor:
    """The m×n matrix (the one function here that forms it)."""
    return x.left @ x.right.mT


def squared_norm(x: LowRank) -> float:
    """‖S‖² (Frobenius): Σσ² of a `ThinSVD`; of factors, ‖R_L R_Rᵀ‖² from their thin QRs,
    which keeps the accuracy of the dense sum of squares where L Rᵀ cancels (the Gram form
    trace((LᵀL)(RᵀR)) would square the cancellation)."""
    if isinstance(x, ThinSVD):
        return float(x.sigma.square().sum())
    if x.k == 0:
        return 0.0
    r_left = torch.linalg.qr(x.left, mode="r").R
    r_right = torch.linalg.qr(x.right, mode="r").R
    return float((r_left @ r_right.mT).square().sum())


def inner(a: LowRank, b: LowRank) -> float:
    """⟨A, B⟩ = Σ A_ij B_ij = trace((L_Aᵀ L_B)(R_Aᵀ R_B)ᵀ), from k×k products only."""
    if a.shape != b.shape:
        raise ValueError(f"inner needs two matrices of one shape, got {a.shape} and {b.shape}")
    return float(((a.left.mT @ b.left) * (a.right.mT @ b.right)).sum())


def scaled(x: LowRank, c: float) -> ThinSVD:
    """c·S in canonical form (a negative c flips the left vectors; c = 0 is rank 0)."""
    s = thin_svd(x)
    if c == 0.0:
        return ThinSVD.zeros(s.shape, s.u.device)
    return ThinSVD(s.u if c > 0 else -s.u, s.sigma * abs(c), s.v)


def add(a: LowRank, b: LowRank, a_weight: float = 1.0, b_weight: float = 1.0) -> ThinSVD:
    """a_weight·A + b_weight·B, compressed to its true rank (factors concatenate; the shared
    directions merge in the core)."""
    if a.shape != b.shape:
        raise ValueError(f"add needs two matrices of one shape, got {a.shape} and {b.shape}")
    s, tau = thin_svd(a), thin_svd(b)
    return _Joint.of(s, tau).sum(torch.diag(s.sigma * a_weight), b_weight)


def to_lora(x: LowRank, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m×k'), A (k'×n) with B·A = S: exactly, at k' = the true rank, when `rank` is None;
    else the best approximation of rank k' = min(rank, true rank) (Eckart–Young, from the
    core's SVD). Balanced as the dense LoRA export's factors: B = U√σ, A = √σ Vᵀ."""
    s = thin_svd(x)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"a LoRA rank is at least 1, got {rank}")
        s = s.truncated(min(rank, s.k))
    root = s.sigma.sqrt()
    return s.u * root, root[:, None] * s.v.mT


# ----------------------------------------------------------------------------- OPCM


@dataclass(frozen=True)
class OPCMStep:
    """One matrix's OPCM step on factors: the new running sum and the step's partial sums."""

    sum: ThinSVD  # S_new = S + τ'
    task_norm_sq: float  # ‖τ‖²
    removed_norm_sq: float  # ‖τ − τ'‖²: what the projection removed
    projected_norm_sq: float  # ‖τ'‖²
    sum_norm_sq: float  # ‖S_new‖²
    # τ' = τ − U_r C V_rᵀ kept as its pieces: `projected()` forms the factors on demand.
    _task: ThinSVD
    _removal: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # U_r, C, V_r

    def partials(self) -> Partials:
        """The partial sums the dense `OPCM.update` reports for this tensor."""
        return {
            "task_norm_sq": self.task_norm_sq,
            "sum_norm_sq": self.sum_norm_sq,
            "removed_norm_sq": self.removed_norm_sq,
        }

    def projected(self) -> Factors:
        """τ' as factors: [U_τ Σ_τ, −U_r C] · [V_τ, V_r]ᵀ."""
        if self._removal is None:
            return self._task.factors()
        u, c, v = self._removal
        return Factors(torch.cat([self._task.left, -(u @ c)], 1), torch.cat([self._task.v, v], 1))


def opcm_step(
    step: int,
    running_sum: LowRank | None,
    task: LowRank,
    alpha: float,
    zero_diagonal: bool = True,
    projected: bool = True,
) -> OPCMStep:
    """OPCM's update of one matrix, as `OPCM.update` computes it densely (methods/opcm.py).

    Step 1: S = τ. Step t >= 2 of a projected weight: with S = U Σ Vᵀ and P = Uᵀ τ V, the
    removed part is U C Vᵀ, C = the top-left k_α×k_α block of P (k_α = `split_index(σ, alpha)`)
    and, with `zero_diagonal`, every diagonal P_ii of S's directions (σ_i above the rank rule,
    as the dense kernel's `removal_matrix`); τ' = τ − U C Vᵀ and S_new = S + τ' =
    U (Σ − C) Vᵀ + τ. The removed part is an orthogonal projection in the Frobenius inner
    product (the u_i v_jᵀ are orthonormal), so ‖τ − τ'‖² = ‖C‖². A tensor that is not
    projected (`projected=False`) adds τ as it is. The result is that of the dense kernel's
    exact decompositions (`gram`, `svd`); `approx-gram` approximates the same."""
    tau = thin_svd(task)
    task_norm_sq = squared_norm(tau)
    if step == 1 or running_sum is None:
        return OPCMStep(tau, task_norm_sq, 0.0, task_norm_sq, task_norm_sq, tau, None)
    if running_sum.shape != tau.shape:
        raise ValueError(
            f"opcm_step needs two matrices of one shape, got {running_sum.shape} and {tau.shape}"
        )
    s = thin_svd(running_sum)
    joint = _Joint.of(s, tau)
    split = min(split_index(s.sigma, alpha), s.k)
    reach = s.k if zero_diagonal else split
    removal = torch.zeros_like(joint.in_s_basis())
    if projected and reach:
        p = joint.in_s_basis()
        removal[:split, :split] = p[:split, :split]
        rest = torch.arange(split, reach, device=p.device)
        removal[rest, rest] = p[rest, rest]
    new_sum = joint.sum(torch.diag(s.sigma) - removal, 1.0)
    projected_core = joint.task_core.clone()
    projected_core[: s.k, : s.k] -= removal
    removed = None
    if projected and reach:
        removed = (s.u[:, :reach], removal[:reach, :reach], s.v[:, :reach])
    return OPCMStep(
        sum=new_sum,
        task_norm_sq=task_norm_sq,
        removed_norm_sq=float(removal.square().sum()),
        projected_norm_sq=float(projected_core.square().sum()),
        sum_norm_sq=squared_norm(new_sum),
        _task=tau,
        _removal=removed,
    )


# ----------------------------------------------------------------------------- other methods


def task_arithmetic_step(
    step: int, running_sum: LowRank | None, task: LowRank
) -> tuple[ThinSVD, Partials]:
    """Continual task arithmetic's state update (methods/task_arithmetic.py): S ← S + τ (the
    scaling factor is applied when the merge is read). Returns S_new and the partial sums."""
    tau = thin_svd(task)
    new_sum = tau if step == 1 or running_sum is None else add(running_sum, tau)
    return new_sum, {"task_norm_sq": squared_norm(tau), "sum_norm_sq": squared_norm(new_sum)}


def average_step(step: int, mean: LowRank | None, task: LowRank) -> tuple[ThinSVD, Partials]:
    """The running average's update (methods/average.py): mean ← ((t − 1)·mean + τ)/t."""
    tau = thin_svd(task)
    first = step == 1 or mean is None
    new_mean = tau if first else add(mean, tau, (step - 1) / step, 1 / step)
    return new_mean, {"task_norm_sq": squared_norm(tau), "mean_norm_sq": squared_norm(new_mean)}


def iso_c_combine(merged: LowRank, task: LowRank) -> ThinSVD:
    """Iso-C of a 2-D pair (methods/iso_c.py): X = m + τ = U Σ Vᵀ over its ρ directions
    (the σ = 0 rule), and ISO = mean(σ)·U Vᵀ."""
    total = add(merged, task)
    if total.k == 0:
        return total
    return ThinSVD(total.u, total.sigma.mean().expand(total.k).clone(), total.v)


def tsv_m_combine(merged: LowRank, task: LowRank) -> ThinSVD:
    """TSV-M of a 2-D pair (methods/tsv_m.py): the top min(h, rank) triplets of each
    (h = min(m, n) // 2), side by side, with U and V replaced by their polar factors on their
    range: polar(U) diag(σ) polar(V)ᵀ.

    polar(U) = P_U Q_Uᵀ from the thin SVD U = P_U S_U Q_Uᵀ (P_U: m×ρ_U orthonormal), so the
    result is P_U (Q_Uᵀ diag(σ) Q_V) P_Vᵀ and its SVD is that of the small middle matrix."""
    a, b = thin_svd(merged), thin_svd(task)
    m, n = a.shape
    keep = min(m, n) // 2
    ka, kb = min(keep, a.k), min(keep, b.k)
    if ka + kb == 0:
        return ThinSVD.zeros((m, n), a.u.device)
    sigma = torch.cat([a.sigma[:ka], b.sigma[:kb]])
    p_u, qh_u = _polar_parts(torch.cat([a.u[:, :ka], b.u[:, :kb]], dim=1))
    p_v, qh_v = _polar_parts(torch.cat([a.v[:, :ka], b.v[:, :kb]], dim=1))
    w, middle, zh = torch.linalg.svd((qh_u * sigma) @ qh_v.mT, full_matrices=False)
    rank = resolved_rank(middle, rank_rtol(m, n))
    return ThinSVD(p_u @ w[:, :rank], middle[:rank], p_v @ zh[:rank].mT)


def _polar_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P and Qᵀ of x's thin SVD on its range (the rule of `linalg.polar_on_range`, whose
    product P Qᵀ this is)."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    rank = resolved_rank(s, rank_rtol(*x.shape))
    return p[:, :rank], qh[:rank]


Combine = Callable[[LowRank, LowRank], ThinSVD]


def pairwise_step(
    step: int, merged: LowRank | None, task: LowRank, c: float, combine: Combine
) -> tuple[ThinSVD, Partials]:
    """A pairwise continual method's update of a 2-D tensor (methods/pairwise.py): step 1
    m = c·τ, step t m ← c·combine(m, τ) with `iso_c_combine` or `tsv_m_combine`."""
    tau = thin_svd(task)
    new = scaled(tau if step == 1 or merged is None else combine(merged, tau), c)
    return new, {"task_norm_sq": squared_norm(tau), "merged_norm_sq": squared_norm(new)}


# ----------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class StepCost:
    """Bytes of one matrix's state and floating-point operations of one OPCM step on it."""

    factored_bytes: int  # U, σ, V of rank k, float64
    dense_bytes: int  # the m×n float64 running sum
    factored_flops: float
    dense_flops: float  # as the dense kernel runs on a rank-deficient sum (see below)


def opcm_step_cost(m: int, n: int, k: int, r: int = 16) -> StepCost:
    """Leading-order operation counts of an OPCM step on an m×n matrix whose running sum has
    rank k, for an incoming adapter of rank r (LAPACK-style counts: a Householder QR with its
    Q about 4·rows·cols², an SVD of a square c×c matrix with both bases about 22·c³).

    Factored (`opcm_step`): τ's thin SVD from its factors, the two Gram-Schmidt splits against
    U and V, the (k + r)³ core SVD and the rotation of the bases, 2·(m + n)·(k + r)².
    Dense (`opcm.project_in_place` and the sum's norm), with p = min(m, n), q = max(m, n):
    τ = B·A (2pqr), SᵀS and Sᵀτ (2·2qp²), eigh of the Gram matrix (≈9p³), the removal matrix
    (≈4p³), S·Z (2qp²); a rank-deficient S fails the Gram route's condition check, so the
    kernel also takes the thin SVD of S (≈4qp² + 22p³)."""
    p, q = min(m, n), max(m, n)
    c = k + r
    factored = (
        6 * (m + n) * r**2  # τ's thin SVD from its factors
        + 12 * (m + n) * k * r  # the splits against U and V (three projections each)
        + 22 * c**3  # the core's SVD
        + 2 * (m + n) * c**2  # the rotation of [U Q_u] and [V Q_v]
    )
    dense = 2 * p * q * r + 6 * q * p**2 + 13 * p**3 + (4 * q * p**2 + 22 * p**3)
    return StepCost(
        factored_bytes=8 * ((m + n) * k + k),
        dense_bytes=8 * m * n,
        factored_flops=float(factored),
        dense_flops=float(dense),
    )


def factored_pays(shape: tuple[int, int], k: int) -> bool:
    """The switch rule: keep a matrix's running sum as factors while its rank k is at most
    DENSE_RANK_FRACTION · min(m, n)."""
    return k <= DENSE_RANK_FRACTION * min(shape)
