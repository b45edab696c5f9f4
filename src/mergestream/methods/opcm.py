"""OPCM: orthogonal projection + adaptive scaling (Tang et al., arXiv 2501.09522).

State: the unscaled running sum S of projected task vectors (float64 per tensor by default, since
OPCM amplifies round-off at every step; float32 on request) and three scalars:
`norm_sum` (Σ‖τ_i‖ over the models so far, global norms), `scale` (λ) and `merged_norm` (‖S‖).
The merged model is θ0 + S/λ, with λ = ‖S‖ / mean‖τ_i‖, so it always sits at the mean task-vector
distance from the base. Step 1 stores S = τ_1 and λ = 1. Each later step projects the task vector
of every linear weight away from the dominant singular subspace of S (the top-left k×k block of its
coefficients in S's singular bases, and, with `zero_diagonal`, every diagonal coefficient too),
adds all other tensors unprojected, and recomputes λ from scratch.

A running sum stored in float32 carries round-off in every entry: singular values at or below
eps₃₂/2·‖S‖_F (`linalg.round_off_floor`) are that round-off, not directions of S, and take no
part in the projection (a float64 sum keeps the float64 rule, the reference's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .base import (
    COMPUTE_DTYPE,
    PREPARED_PREFIX,
    ContinualMethod,
    RowBlocks,
    Scalars,
    TensorInfo,
    TensorUpdate,
)
from .configs.opcm import OPCMConfig
from .linalg import (
    Decomposition,
    RightSingular,
    above_round_off,
    r_factor,
    right_singular,
    right_singular_from_gram,
    right_singular_from_r,
    round_off_floor,
    split_index,
    stored_round_off_floor,
)
from .lowrank import Factors, ThinSVD, device_of, opcm_step, scaled
from .ops import squared_norm


def opcm_project(
    running_sum: torch.Tensor,
    task_vector: torch.Tensor,
    alpha: float,
    zero_diagonal: bool = True,
    decomposition: Decomposition = "gram",
) -> torch.Tensor:
    """Project a linear weight's task vector τ against the running sum S (both 2-D, float64).

    With S = U Σ Vᵀ and coefficients P = Uᵀ τ V, OPCM zeroes the top-left k×k block of P (k from
    `alpha`, see `split_index`) and, with `zero_diagonal`, every P_ii, then maps back: τ' = U P Vᵀ.
    Written without U: the removed part is U_r R V_rᵀ with U_r = S V_r Σ_r⁻¹, so
        τ' = τ − S · V_r Σ_r⁻¹ R V_rᵀ,   R_ij = P_ij on the zeroed entries, else 0,
    where P_ij = v_iᵀ (Sᵀτ) v_j / σ_i. Only the n×n Gram-side quantities are formed (n the
    smaller dimension). Directions with σ_i = 0 carry no inner product with S, so their diagonal
    entries are left alone; with S = 0 nothing is removed. Returns a new tensor.
    """
    projected = task_vector.clone()
    project_in_place(running_sum, projected, alpha, zero_diagonal, decomposition)
    return projected


# Rows of S·Z formed at once while subtracting the removed part: bounds the temporary to about
# 64 MB of float64 whatever the matrix size.
_BLOCK_ELEMENTS = 8 << 20


def project_in_place(
    running_sum: torch.Tensor,
    task_vector: torch.Tensor,
    alpha: float,
    zero_diagonal: bool = True,
    decomposition: Decomposition = "gram",
    decomposed: RightSingular | None = None,
) -> float:
    """`opcm_project` that overwrites `task_vector` with τ' and returns ‖τ − τ'‖² (the squared
    norm of what the projection removed). Peak extra memory: n×n matrices and one row block.
    `decomposed` is `decompose_running_sum(running_sum, decomposition)` when it was computed
    ahead of time (a prepared generation); the result is the same bits either way."""
    if running_sum.shape != task_vector.shape or running_sum.ndim != 2:
        raise ValueError(
            f"opcm_project needs two matrices of one shape, got {tuple(running_sum.shape)} "
            f"and {tuple(task_vector.shape)}"
        )
    # The rule is symmetric under transposition, so work with the tall orientation.
    transposed = running_sum.shape[0] < running_sum.shape[1]
    s = running_sum.mT if transposed else running_sum
    tau = task_vector.mT if transposed else task_vector

    if decomposed is None:
        decomposed = right_singular(s, decomposition)
    z = removal_matrix(decomposed, s.mT @ tau, alpha, zero_diagonal)
    if z is None:
        return 0.0
    removed_sq = 0.0
    rows = max(1, _BLOCK_ELEMENTS // max(1, s.shape[1]))
    for start in range(0, s.shape[0], rows):
        removed = s[start : start + rows] @ z
        removed_sq += squared_norm(removed)
        tau[start : start + rows] -= removed
    return removed_sq


def decompose_running_sum(
    running_sum: torch.Tensor, decomposition: Decomposition = "gram"
) -> RightSingular:
    """The singular values and right singular vectors of S in its tall orientation: what a
    step's projection of this weight needs, computable before the next task vector arrives."""
    tall = running_sum.mT if running_sum.shape[0] < running_sum.shape[1] else running_sum
    return right_singular(tall, decomposition)


def removal_matrix(
    decomposed: RightSingular, cross: torch.Tensor, alpha: float, zero_diagonal: bool
) -> torch.Tensor | None:
    """Z = V_r Σ_r⁻¹ R V_rᵀ (n x n), so that the projection removes S·Z from τ (tall
    orientation); `cross` is Sᵀτ. None when nothing is removed."""
    k = min(split_index(decomposed.sigma, alpha), decomposed.rank)
    r = decomposed.rank if zero_diagonal else k
    if r == 0:
        return None
    v = decomposed.v[:, :r]
    inv_sigma_sq = decomposed.sigma[:r].reciprocal().square()
    hv = cross @ v  # column j: (Sᵀτ) v_j
    block = v[:, :k].mT @ hv[:, :k]  # v_iᵀ Sᵀτ v_j for i, j < k
    diagonal = (v[:, k:] * hv[:, k:]).sum(0)  # v_iᵀ Sᵀτ v_i for k <= i < r
    # W = V_r Σ_r⁻¹ R, column by column: the block part, then the diagonal part.
    weights = torch.cat(
        [v[:, :k] @ (block * inv_sigma_sq[:k, None]), v[:, k:] * (diagonal * inv_sigma_sq[k:])],
        dim=1,
    )
    return weights @ v.mT


def fold_projected_rows(
    rows: RowBlocks,
    alpha: float,
    zero_diagonal: bool,
    decomposition: Decomposition,
    stored: Callable[[torch.Tensor], torch.Tensor],
) -> Scalars:
    """OPCM's update of a tall (or square) linear weight read and written by row blocks:
    S_new = S + τ − S·Z, with the same Z as `project_in_place`, and the step's partial sums.

    Pass 1 accumulates the n x n matrices SᵀS and Sᵀτ block by block; pass 2 reads the blocks
    again and writes the new sum. Only a block of S and τ and a few n x n matrices are held.
    An ill-conditioned S (or `decomposition="svd"`) takes its singular vectors from the R
    factor of a tall-skinny QR, one more pass, with the accuracy of an SVD.
    """
    n = rows.info.shape[1]
    gram = cross = None
    task_norm_sq = 0.0
    stored_dtype = COMPUTE_DTYPE
    for start, stop in rows.blocks:
        stored_block = rows.state_rows(start, stop)["sum"]
        stored_dtype = stored_block.dtype
        s_block = stored_block.to(COMPUTE_DTYPE)
        if gram is None:  # on the device the blocks come on
            gram, cross = s_block.new_zeros(n, n), s_block.new_zeros(n, n)
        tau_block = rows.task_rows(start, stop)
        task_norm_sq += squared_norm(tau_block)
        gram.addmm_(s_block.mT, s_block)
        cross.addmm_(s_block.mT, tau_block)
    assert gram is not None and cross is not None, "a streamed tensor has at least one block"
    decomposed = None
    if decomposition == "gram":
        decomposed = right_singular_from_gram(gram)
    elif decomposition == "approx-gram":
        decomposed = right_singular_from_gram(gram, max_condition=None)
    if decomposed is None:
        r = r_factor((rows.state_rows(a, b)["sum"].to(COMPUTE_DTYPE) for a, b in rows.blocks), n)
        decomposed = right_singular_from_r(r, rows.info.shape[0])
    # ‖S‖_F² is the trace of SᵀS, already summed over the blocks.
    floor = round_off_floor(stored_dtype, float(gram.diagonal().sum()) ** 0.5)
    decomposed = above_round_off(decomposed, floor)
    z = removal_matrix(decomposed, cross, alpha, zero_diagonal)
    del gram, cross
    removed_sq = sum_norm_sq = 0.0
    for start, stop in rows.blocks:
        s_block = rows.state_rows(start, stop)["sum"].to(COMPUTE_DTYPE)
        tau_block = rows.task_rows(start, stop)
        if z is not None:
            removed = s_block @ z
            removed_sq += squared_norm(removed)
            tau_block -= removed
            del removed
        new_block = stored(s_block.add_(tau_block))
        sum_norm_sq += squared_norm(new_block.to(COMPUTE_DTYPE))
        rows.write_rows(start, {"sum": new_block})
    return {
        "task_norm_sq": task_norm_sq,
        "sum_norm_sq": sum_norm_sq,
        "removed_norm_sq": removed_sq,
    }


class OPCM(ContinualMethod):
    config_class = OPCMConfig
    state_names = ("sum",)
    # OPCM's projection amplifies round-off of the stored sum at every step (the split and the
    # singular bases are recomputed from it), so its state is kept in float64 by default.
    default_state_dtype = torch.float64
    # The decomposition of each projected weight's running sum, computed ahead of the next step
    # (`mergestream prepare`), so that a step only projects: see `prepare_tensor`.
    prepared_names = ("v", "sigma")
    keeps_zero = True  # S = 0 plus τ = 0 is S = 0, with zero norms
    config: OPCMConfig

    def initial_scalars(self) -> Scalars:
        return {"norm_sum": 0.0, "scale": 1.0, "merged_norm": 0.0}

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        # In place throughout (the engine hands over private copies): a large tensor costs its
        # float64 sum and task vector, not a chain of full-size temporaries.
        task_norm_sq = squared_norm(task_vector)
        removed_sq = 0.0
        if step == 1:
            new_sum = self.stored(task_vector)
        else:
            running_sum = state["sum"].to(COMPUTE_DTYPE)
            if info.projected:
                cfg = self.config
                decomposed = _prepared(state)
                if decomposed is None:
                    decomposed = decompose_running_sum(running_sum, cfg.decomposition)
                    decomposed = above_round_off(decomposed, stored_round_off_floor(state["sum"]))
                removed_sq = project_in_place(
                    running_sum,
                    task_vector,
                    cfg.alpha,
                    cfg.zero_diagonal,
                    cfg.decomposition,
                    decomposed,
                )
            new_sum = self.stored(running_sum.add_(task_vector))
        return TensorUpdate(
            state={"sum": new_sum},
            partials={
                "task_norm_sq": task_norm_sq,
                "sum_norm_sq": squared_norm(new_sum.to(COMPUTE_DTYPE)),
                "removed_norm_sq": removed_sq,
            },
        )

    def prepare_tensor(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """V and σ of the running sum of a projected weight (float64), exactly as `update`
        would compute them from the same stored sum."""
        if not info.projected:
            return {}
        decomposed = decompose_running_sum(
            state["sum"].to(COMPUTE_DTYPE), self.config.decomposition
        )
        decomposed = above_round_off(decomposed, stored_round_off_floor(state["sum"]))
        return {"v": decomposed.v, "sigma": decomposed.sigma}

    def prepared_shapes(self, info: TensorInfo) -> dict[str, tuple[int, ...]]:
        if not info.projected:
            return {}
        n = min(info.shape)
        return {"v": (n, n), "sigma": (n,)}

    def streams_rows(self, info: TensorInfo) -> bool:
        # A projected weight streams in its tall orientation only: its rows are then the long
        # side, and SᵀS and Sᵀτ add up over row blocks. Wide ones are held whole.
        return not info.projected or info.shape[0] >= info.shape[1]

    def update_rows(
        self, info: TensorInfo, step: int, rows: RowBlocks, scalars: Scalars
    ) -> Scalars:
        if step == 1 or not info.projected:
            return super().update_rows(info, step, rows, scalars)  # elementwise: S + τ
        cfg = self.config
        return fold_projected_rows(
            rows, cfg.alpha, cfg.zero_diagonal, cfg.decomposition, self.stored
        )

    def update_factored(
        self,
        info: TensorInfo,
        step: int,
        state: ThinSVD | None,
        task: Factors | None,
        scalars: Scalars,
    ) -> tuple[ThinSVD | None, Scalars]:
        """`update` on factors (`lowrank.opcm_step`): a zero S removes nothing from τ, as the
        dense projection against S = 0; an unchanged tensor (τ = 0) keeps S as it is."""
        if state is None and task is None:
            return None, {"task_norm_sq": 0.0, "sum_norm_sq": 0.0, "removed_norm_sq": 0.0}
        shape = (info.shape[0], info.shape[1])
        tau = task if task is not None else Factors.zeros(shape, device_of(state))
        cfg = self.config
        result = opcm_step(step, state, tau, cfg.alpha, cfg.zero_diagonal, info.projected)
        return result.sum, result.partials()

    def task_vector_factored(
        self, info: TensorInfo, state: ThinSVD, scalars: Scalars
    ) -> ThinSVD:
        return scaled(state, 1.0 / scalars["scale"])

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        task_norm = math.sqrt(partials.get("task_norm_sq", 0.0))
        norm_sum = scalars["norm_sum"] + task_norm
        mean_norm = norm_sum / step
        merged_norm = math.sqrt(partials.get("sum_norm_sq", 0.0))
        unscaled = step == 1 or not self.config.adaptive_scaling
        if unscaled or merged_norm == 0.0 or mean_norm == 0.0:
            scale = 1.0  # first model as is; an all-zero sum has nothing to rescale
        else:
            scale = merged_norm / mean_norm
        return {
            "norm_sum": norm_sum,
            "scale": scale,
            "merged_norm": merged_norm,
            "last_task_norm": task_norm,
            "last_removed_fraction": (
                math.sqrt(partials.get("removed_norm_sq", 0.0)) / task_norm if task_norm else 0.0
            ),
        }

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return state["sum"].to(COMPUTE_DTYPE) / scalars["scale"]


def _prepared(state: Mapping[str, torch.Tensor]) -> RightSingular | None:
    """The decomposition a prepared generation holds for this tensor, if any. The rank is
    the number of nonzero singular values: `linalg` sets every unresolved one to exactly 0."""
    v, sigma = state.get(PREPARED_PREFIX + "v"), state.get(PREPARED_PREFIX + "sigma")
    if v is None or sigma is None:
        return None
    return RightSingular(sigma=sigma, v=v, rank=int((sigma != 0).sum()))
