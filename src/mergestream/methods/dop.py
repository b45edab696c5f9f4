"""DOP: continual merging by dual orthogonal projections ("Continual Model Merging without Data:
Dual Projections for Balancing Stability and Plasticity", NeurIPS 2025).

Step 1: the first model unchanged (m = τ_1, no scaling). Step t ≥ 2, with m the merged task vector
so far and τ = τ_t, for every linear weight (the rule of `classify.py`, as OPCM): let
Aᵢ = UᵢΣᵢ and Bᵢ = VᵢΣᵢ come from the thin SVD of Xᵢ ∈ {m, τ}, truncated to its first k singular
triplets, k the number of leading cumulative ratios Σ_{j≤i}σⱼ / Σσ strictly below `svd_epsilon`
(the reference's `searchsorted`, so the singular value that reaches the threshold is not kept;
energy is Σσ, not Σσ²). Then, from X = (m + τ)/2, minimise

    L(X) = Σᵢ wᵢ Lᵢ(X),   Lᵢ(X) = ‖Aᵢᵀ(X − Xᵢ)‖² + ‖(X − Xᵢ)Bᵢ‖²

(`svd_proj_space`: `uv` both terms, `u` the first, `v` the second) with `num_steps` Adam steps
(torch's Adam: lr `lr`, betas 0.9/0.999, eps 1e-8, bias-corrected), the gradients written out
analytically, ∇Lᵢ = 2(AᵢAᵢᵀΔᵢ + ΔᵢBᵢBᵢᵀ). The weights at each Adam step:
  - `mgda` (default): the two-task min-norm (MGDA) solution for the gradients each divided by
    its loss (gᵢ/Lᵢ): with v₁₁, v₁₂, v₂₂ their inner products, γ = 0.999 if v₁₂ ≥ v₁₁, else
    0.001 if v₁₂ ≥ v₂₂, else (v₂₂ − v₁₂)/(v₁₁ + v₂₂ − 2v₁₂); w = (γ, 1 − γ); with `ema` (default)
    the weights used are the running w̄ ← β·w̄ + (1 − β)·w, β = `ema_beta`, from w̄ = (α, 1 − α)
    at the start of every tensor (α = `alpha`);
  - without `mgda`: fixed w = (α, 1 − α).
Every other tensor is the average (m + τ)/2. The merged model is θ0 + m.

`solver=exact` (beyond the reference) minimises L for the fixed weights (α, 1 − α) exactly: the
minimiser solves the Sylvester equation P X + X Q = Σᵢ wᵢ(PᵢXᵢ + XᵢQᵢ), P = Σ wᵢAᵢAᵢᵀ,
Q = Σ wᵢBᵢBᵢᵀ, solved with an eigendecomposition of P and of Q. Directions the objective does
not see (p_a + q_b zero to round-off) keep the starting point's value, the minimiser nearest to
it. `mgda`, `ema`, `lr` and `num_steps` are then unused.

Defaults are the reference's shipped configuration (`fusion_bench_config/method/dop/dop.yaml`:
lr 1e-4, 200 steps, mgda, alpha 0.8, ema, ema_beta 0.999, svd_epsilon 0.99999, uv), not its
class's keyword defaults (ema_beta 0.99, svd_epsilon 1.0, alpha unset).

Precision and determinism: everything runs in float64 (the reference: float32 with autograd), so
that the 200 Adam steps of a tensor are a fixed sequence of float64 operations on its inputs: the
same inputs give the same merged model, with no seed (the reference seeds its run from the clock).
The optimisation is per tensor, so it runs in the engine's workers (and on the GPU with
`--device cuda`). The iterate is the merged task vector rather than the weight (the reference
optimises W = θ0 + X); the loss and every Adam step depend on differences only, so the two
agree up to rounding. State: m (float32 per tensor by default, the reference's model precision).

Reference: FusionBench 0.2.33 `fusion_bench/method/dop/dop.py` (`ContinualDOPForCLIP`) with
`dop/min_norm_solvers.py` and `dop/utils.py`. Choices and differences:
  - Tensors: the reference optimises the weights of `nn.Linear` modules, averages the other
    parameters of every leaf module, and never touches a parameter held directly by a non-leaf
    module (CLIP's `class_embedding`): at step 1 it is the first model's, from step 2 on the
    pretrained value. Here every non-linear floating-point tensor is averaged, `class_embedding`
    included; `keep_base=REGEX` reproduces the reference for the tensors it matches (the first
    model's value at step 1, the base from step 2). GPT-2's `Conv1D` weights count as linear here
    (the objective is symmetric under transposition); the reference averages them.
  - A loss of exactly 0 (no kept singular triplet, or X on the target already) has a zero
    gradient; its normalised gradient is taken as 0, where the reference divides 0 by 0 and the
    weights become NaN. The reference's min-norm routine fails when the optimal norm is 1e8 or
    more (its starting bound); here γ is used whatever the norm.
  - The reference's float32 rank split compares float32 ratios with the float32 rounding of
    `svd_epsilon`; here both are float64, which can move k by one at an exact boundary.
Linear weights are held whole (SVDs and the optimisation need the whole matrix); the averaged
tensors stream by row blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    TensorInfo,
    TensorUpdate,
)
from .configs.dop import DOPConfig, ProjSpace
from .ops import dot, squared_norm

# torch.optim.Adam's defaults, which the reference uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def split_rank(sigma: torch.Tensor, epsilon: float) -> int:
    """How many leading singular values DOP keeps: the number of cumulative ratios Σσ_{≤i}/Σσ
    strictly below `epsilon` (an all-zero spectrum keeps none)."""
    total = sigma.sum()
    if sigma.numel() == 0 or float(total) == 0.0:
        return 0
    ratio = sigma.cumsum(0) / total
    bound = torch.tensor([min(epsilon, 1.0)], dtype=ratio.dtype, device=ratio.device)
    return int(torch.searchsorted(ratio, bound)[0])


@dataclass
class _Subspace:
    """One task's quadratic Lᵢ(X) = ‖Aᵀ(X − T)‖² + ‖(X − T)B‖², A = U_kΣ_k, B = V_kΣ_k.

    Each side is applied either through its factor (2·rows·cols·k flops) or through the Gram
    matrix AAᵀ / BBᵀ when that is cheaper; the choice depends on shapes and k only."""

    target: torch.Tensor
    left: torch.Tensor | None  # A (m x k), or AAᵀ (m x m) when `left_gram`
    right: torch.Tensor | None  # B (n x k), or BBᵀ (n x n) when `right_gram`
    left_gram: bool
    right_gram: bool
    rank: int

    @classmethod
    def of(cls, target: torch.Tensor, epsilon: float, space: ProjSpace) -> _Subspace:
        rows, cols = target.shape
        u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
        k = split_rank(sigma, epsilon)
        left = right = None
        left_gram = right_gram = False
        if "u" in space:
            left = u[:, :k] * sigma[:k]
            left_gram = rows < 2 * k
            if left_gram:
                left = left @ left.mT
        if "v" in space:
            right = vh[:k].mT * sigma[:k]
            right_gram = cols < 2 * k
            if right_gram:
                right = right @ right.mT
        return cls(target, left, right, left_gram, right_gram, k)

    def left_gram_matrix(self) -> torch.Tensor | None:
        if self.left is None:
            return None
        return self.left if self.left_gram else self.left @ self.left.mT

    def right_gram_matrix(self) -> torch.Tensor | None:
        if self.right is None:
            return None
        return self.right if self.right_gram else self.right @ self.right.mT

    def loss_and_gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Lᵢ(x) and ∇Lᵢ(x)."""
        delta = x - self.target
        half_grad = torch.zeros_like(delta)
        loss = 0.0
        if self.left is not None:
            if self.left_gram:
                applied = self.left @ delta
                loss += float(torch.dot(delta.reshape(-1), applied.reshape(-1)))
                half_grad += applied
            else:
                coefficients = self.left.mT @ delta
                loss += squared_norm(coefficients)
                half_grad.addmm_(self.left, coefficients)
        if self.right is not None:
            if self.right_gram:
                applied = delta @ self.right
                loss += float(torch.dot(delta.reshape(-1), applied.reshape(-1)))
                half_grad += applied
            else:
                coefficients = delta @ self.right
                loss += squared_norm(coefficients)
                half_grad.addmm_(coefficients, self.right.mT)
        return loss, half_grad.mul_(2.0)


def min_norm_weight(v11: float, v12: float, v22: float) -> float:
    """γ of the min-norm point γ·g₁ + (1 − γ)·g₂ of two vectors from their inner products, with
    the reference's clipping to 0.999 / 0.001 at the ends (Sener & Koltun's two-task solver)."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return (v22 - v12) / (v11 + v22 - 2.0 * v12)


def dop_adam(
    tasks: tuple[_Subspace, _Subspace],
    start: torch.Tensor,
    *,
    lr: float,
    num_steps: int,
    mgda: bool,
    alpha: float,
    ema: bool,
    ema_beta: float,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The reference's optimisation of one weight from `start`; returns X and the weights of
    the last step."""
    x = start.clone()
    first_moment = torch.zeros_like(x)
    second_moment = torch.zeros_like(x)
    beta1, beta2 = ADAM_BETAS
    fixed = (alpha, 1.0 - alpha)
    running = fixed
    weights = fixed
    for step in range(1, num_steps + 1):
        (loss0, grad0), (loss1, grad1) = (t.loss_and_gradient(x) for t in tasks)
        if mgda:
            # Inner products of the loss-normalised gradients gᵢ/Lᵢ (a zero loss has a zero
            # gradient, whose normalised form is taken as zero).
            n0 = 1.0 / loss0 if loss0 != 0.0 else 0.0
            n1 = 1.0 / loss1 if loss1 != 0.0 else 0.0
            v11 = dot(grad0, grad0) * n0 * n0
            v12 = dot(grad0, grad1) * n0 * n1
            v22 = dot(grad1, grad1) * n1 * n1
            gamma = min_norm_weight(v11, v12, v22)
            weights = (gamma, 1.0 - gamma)
            if ema:
                running = tuple(
                    ema_beta * r + (1.0 - ema_beta) * w
                    for r, w in zip(running, weights, strict=True)
                )
                weights = running
        grad = grad0.mul_(weights[0]).add_(grad1, alpha=weights[1])
        del grad1
        first_moment.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        second_moment.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1**step)
        denominator = (second_moment.sqrt() / math.sqrt(1.0 - beta2**step)).add_(ADAM_EPS)
        x.addcdiv_(first_moment, denominator, value=-step_size)
    return x, (float(weights[0]), float(weights[1]))


def _eigh_or_identity(gram: torch.Tensor | None, size: int, like: torch.Tensor):
    """Eigenvalues and vectors of a symmetric matrix; a missing side is the zero matrix, whose
    eigenvectors are taken as the identity (returned as None, nothing to rotate)."""
    if gram is None:
        return like.new_zeros(size), None
    values, vectors = torch.linalg.eigh(gram)
    return values, vectors


def dop_exact(
    tasks: tuple[_Subspace, _Subspace], start: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The minimiser of w₁L₁ + w₂L₂, w = (α, 1 − α), nearest to `start` (see the module doc)."""
    weights = (alpha, 1.0 - alpha)
    rows, cols = start.shape
    left = right = None
    residual = torch.zeros_like(start)  # −½∇L(start) = Σ wᵢ(Pᵢ(Xᵢ − s) + (Xᵢ − s)Qᵢ)
    for w, task in zip(weights, tasks, strict=True):
        p, q = task.left_gram_matrix(), task.right_gram_matrix()
        offset = task.target - start
        if p is not None:
            left = w * p if left is None else left.add_(p, alpha=w)
            residual.addmm_(p, offset, alpha=w)
        if q is not None:
            right = w * q if right is None else right.add_(q, alpha=w)
            residual.addmm_(offset, q, alpha=w)
    p_values, p_vectors = _eigh_or_identity(left, rows, start)
    q_values, q_vectors = _eigh_or_identity(right, cols, start)
    rotated = residual
    if p_vectors is not None:
        rotated = p_vectors.mT @ rotated
    if q_vectors is not None:
        rotated = rotated @ q_vectors
    denominator = p_values[:, None] + q_values[None, :]
    scale = float(p_values.abs().max()) + float(q_values.abs().max())
    tolerance = scale * torch.finfo(COMPUTE_DTYPE).eps * max(rows, cols)
    seen = denominator > tolerance
    step = torch.where(seen, rotated / torch.where(seen, denominator, 1.0), 0.0)
    if p_vectors is not None:
        step = p_vectors @ step
    if q_vectors is not None:
        step = step @ q_vectors.mT
    return start + step


class DOP(ContinualMethod):
    config_class = DOPConfig
    state_names = ("merged",)
    config: DOPConfig

    def streams_rows(self, info: TensorInfo) -> bool:
        return not info.projected  # SVDs and the optimisation need the whole matrix

    def _kept_at_base(self, name: str) -> bool:
        pattern = self.config.keep_base
        return pattern is not None and re.search(pattern, name) is not None

    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        partials = {"task_norm_sq": squared_norm(task_vector)}
        if step == 1:
            merged = task_vector
        elif self._kept_at_base(info.name):
            merged = torch.zeros_like(task_vector)
        elif info.projected and task_vector.ndim == 2 and task_vector.numel():
            previous = state["merged"].to(COMPUTE_DTYPE)
            merged, partials_more = self._optimise(previous, task_vector)
            partials.update(partials_more)
        else:
            merged = task_vector.add_(state["merged"].to(COMPUTE_DTYPE)).mul_(0.5)
        new_merged = self.stored(merged)
        partials["merged_norm_sq"] = squared_norm(new_merged.to(COMPUTE_DTYPE))
        return TensorUpdate(state={"merged": new_merged}, partials=partials)

    def _optimise(
        self, previous: torch.Tensor, task_vector: torch.Tensor
    ) -> tuple[torch.Tensor, Scalars]:
        cfg = self.config
        tasks = (
            _Subspace.of(previous, cfg.svd_epsilon, cfg.svd_proj_space),
            _Subspace.of(task_vector, cfg.svd_epsilon, cfg.svd_proj_space),
        )
        start = (previous + task_vector) / 2
        if cfg.solver == "exact":
            merged = dop_exact(tasks, start, cfg.alpha)
            weights = (cfg.alpha, 1.0 - cfg.alpha)
        else:
            merged, weights = dop_adam(
                tasks,
                start,
                lr=cfg.lr,
                num_steps=cfg.num_steps,
                mgda=cfg.mgda,
                alpha=cfg.alpha,
                ema=cfg.ema,
                ema_beta=cfg.ema_beta,
            )
        rank_fraction = sum(t.rank for t in tasks) / (2 * min(previous.shape))
        return merged, {
            "optimised": 1.0,
            "merged_weight": weights[0],
            "rank_fraction": rank_fraction,
        }

    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        out = {
            "merged_norm": math.sqrt(partials.get("merged_norm_sq", 0.0)),
            "last_task_norm": math.sqrt(partials.get("task_norm_sq", 0.0)),
        }
        optimised = partials.get("optimised", 0.0)
        if optimised:
            out["last_mean_merged_weight"] = partials["merged_weight"] / optimised
            out["last_mean_rank_fraction"] = partials["rank_fraction"] / optimised
        return out

    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        return state["merged"].to(COMPUTE_DTYPE)
