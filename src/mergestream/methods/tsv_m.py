"""Continual TSV-M: task-singular-vector merging (Gargiulo et al., CVPR 2025), applied at every
step to the pair (merged task vector, incoming task vector).

Step 1: θ = θ0 + c·τ_1. Step t: with m = θ − θ0 (the merged task vector so far, carrying the
previous steps' c), θ ← θ0 + c·TSV(m, τ_t), where, per tensor,
  - a 2-D tensor (r = min(rows, cols), k = floor(r/2)): the thin SVDs m = U₁Σ₁V₁ᵀ and
    τ_t = U₂Σ₂V₂ᵀ are each truncated to their top k triplets and laid side by side,
    U = [U₁[:, :k] U₂[:, :k] 0], σ = [σ₁[:k] σ₂[:k] 0], Vᵀ = [V₁ᵀ[:k]; V₂ᵀ[:k]; 0] (the zero
    column/row/value only when r is odd); U and Vᵀ are replaced by their orthogonal polar factors
    (P Qᵀ from the SVD P S Qᵀ of each), and TSV = polar(U)·diag(σ)·polar(Vᵀ);
  - any other tensor: the average (m + τ_t)/2.
c = `scaling_factor` (default 1.0, the reference's shipped setting).

Reproduced as the reference has it: a 2-D tensor with a dimension of 1 (r = 1, so k = 0) keeps
no triplet and becomes zero from step 2 on; with an odd r the smallest direction of the budget
is left empty. Which tensors take part: every floating-point tensor, every 2-D one merged by
singular vectors, embedding tables included (the reference walks all parameters and decides by
shape alone); a floating-point buffer stored in a checkpoint is merged like a parameter where the
reference would leave it at the pretrained value.

State: m itself (float32 per tensor by default, like the reference's float32 model; the SVDs
and all arithmetic run in float64). Scalars: `merged_norm` (‖m‖) and `last_task_norm` (‖τ_t‖).

Reference: the NUFILT repository's `fusion_bench/method/nufilt/tsvm.py` (`ContinualTSVMForCLIP`)
with FusionBench's `task_singular_vector/utils/TSVM_utils.py`,
`compute_and_sum_svd_mem_reduction([merged_tv, task_vector])`; config
`config/method/nufilt/tsvm.yaml`. Differences: float64 arithmetic on the stored float32 m; no
shuffling or seeding. Where the truncated singular vectors of the two are linearly dependent
(or a vector is rank deficient) the polar factors are not unique, in the reference as here.

2-D tensors are held whole (their SVDs need the whole matrix); the averaged ones stream.
"""

from __future__ import annotations

import torch

from .base import COMPUTE_DTYPE
from .configs.tsv_m import TsvMConfig
from .ops import average
from .pairwise import PairwiseMerge


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P S Qᵀ (thin SVD)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_m_combine(merged: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """TSV-M of two task vectors of one tensor (float64): the merged singular triplets of a 2-D
    pair (see the module docstring), the average of any other pair. A new tensor."""
    if merged.ndim != 2:
        return average(merged, task)
    merged, task = merged.to(COMPUTE_DTYPE), task.to(COMPUTE_DTYPE)
    rows, cols = merged.shape
    rank = min(rows, cols)
    keep = rank // 2
    if keep == 0:
        return merged.new_zeros(rows, cols)
    u = merged.new_zeros(rows, rank)
    sigma = merged.new_zeros(rank)
    vh = merged.new_zeros(rank, cols)
    for i, x in enumerate((merged, task)):
        ui, si, vhi = torch.linalg.svd(x, full_matrices=False)
        part = slice(i * keep, (i + 1) * keep)
        u[:, part] = ui[:, :keep]
        sigma[part] = si[:keep]
        vh[part, :] = vhi[:keep, :]
    return (_polar(u) * sigma) @ _polar(vh)


class TsvM(PairwiseMerge):
    config_class = TsvMConfig
    combine = staticmethod(tsv_m_combine)
