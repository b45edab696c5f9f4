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

The σ = 0 rule: a singular triplet with σ <= rank_rtol·σ_max (max(rows, cols)·eps·σ_max, NumPy's
`matrix_rank` tolerance; `linalg.rank_rtol`), or under the round-off of an input stored in
float32 (eps/2·‖x‖_F, `linalg.stored_rtol`), is not a direction of its matrix and takes no part,
as OPCM leaves such directions out of its diagonal rule. So each of m and τ_t gives its top
min(k, rank) triplets, and the polar factors are those of the kept vectors on their own range
(P Qᵀ over the singular values of U, or of Vᵀ, above the same tolerance: the partial isometry).
The reference keeps the top k of all triplets, so on a rank-deficient input (a LoRA task vector
has rank r, a few against k = min(rows, cols)/2) it lays in null-space vectors with σ = 0: they
add nothing themselves, but they are whatever the SVD routine returns for σ = 0 and they bend
the polar factor of the real directions, so its result moves under round-off (by 63-76 % of
its norm for a 16×24 pair of ranks 3 and 2 perturbed by 1e-15 relative). Where
both inputs have rank >= k (full-rank task vectors) the two rules give the same result (the
parity tests); where the kept vectors are exactly dependent (an input equal to the merge so
far) the partial isometry gives TSV(m, m) = m where the reference's polar factor is not unique.
The low-rank path (`methods/lowrank.py`) computes the same from factors.

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
shuffling or seeding; the σ = 0 rule above.

2-D tensors are held whole (their SVDs need the whole matrix); the averaged ones stream.
"""

from __future__ import annotations

import torch

from . import lowrank
from .base import COMPUTE_DTYPE
from .configs.tsv_m import TsvMConfig
from .linalg import polar_on_range, resolved_rank, stored_rtol
from .ops import average
from .pairwise import PairwiseMerge


def tsv_m_combine(merged: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """TSV-M of two task vectors of one tensor (float64): the merged singular triplets of a 2-D
    pair (see the module docstring), the average of any other pair. A new tensor."""
    if merged.ndim != 2:
        return average(merged, task)
    stored = merged, task  # as held: a float32 input's round-off is not a direction
    merged, task = merged.to(COMPUTE_DTYPE), task.to(COMPUTE_DTYPE)
    rows, cols = merged.shape
    keep = min(rows, cols) // 2
    if keep == 0:
        return merged.new_zeros(rows, cols)
    us, sigmas, vhs = [], [], []
    for x, held in zip((merged, task), stored, strict=True):
        ui, si, vhi = torch.linalg.svd(x, full_matrices=False)
        sigma_max = float(si[0]) if si.numel() else 0.0
        kept = min(keep, resolved_rank(si, stored_rtol(rows, cols, sigma_max, held)))
        us.append(ui[:, :kept])
        sigmas.append(si[:kept])
        vhs.append(vhi[:kept])
    sigma = torch.cat(sigmas)
    if sigma.numel() == 0:
        return merged.new_zeros(rows, cols)
    return (polar_on_range(torch.cat(us, dim=1)) * sigma) @ polar_on_range(torch.cat(vhs))


class TsvM(PairwiseMerge):
    config_class = TsvMConfig
    combine = staticmethod(tsv_m_combine)
    combine_factored = staticmethod(lowrank.tsv_m_combine)
