"""Continual Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025), applied
at every step to the pair (merged task vector, incoming task vector).

Step 1: θ = θ0 + c·τ_1. Step t: with m = θ − θ0 (the merged task vector so far, which already
carries the previous steps' c), θ ← θ0 + c·ISO(m, τ_t), where, per tensor,
  - a 2-D tensor: X = m + τ_t = U Σ Vᵀ (thin SVD), and ISO = mean(σ)·U_ρ V_ρᵀ over the ρ
    directions of X: every nonzero singular value replaced by their mean;
  - any other tensor (biases, norms, conv kernels, 1-D embeddings): the average (m + τ_t)/2.
c = `scaling_factor` (default 1.0, the reference's shipped setting).

The σ = 0 rule: a singular triplet with σ <= rank_rtol·σ_max (max(rows, cols)·eps·σ_max, NumPy's
`matrix_rank` tolerance; `linalg.rank_rtol`), or under the round-off of an m stored in float32
(eps/2·‖m‖_F, `linalg.stored_rtol`), is not a direction of X, so it takes no part: it
is left out of U_ρ V_ρᵀ and out of the mean, as OPCM leaves such directions out of its diagonal
rule. The reference takes all min(rows, cols) triplets and the mean over all of them, zeros
included; where X has full rank the two are the same rule (the parity tests). Where X is rank
deficient (a sum of LoRA task vectors: rank at most the sum of the ranks) the reference's null
directions are whatever vectors its SVD routine returns for σ = 0, so its result changes
completely under round-off (by 115-122 % of its norm for a 16×24 sum of rank 5 perturbed by
1e-15 relative), and its mean shrinks with the matrix size; here the result is
mean(σ)·U_ρ V_ρᵀ, stable under round-off, and exactly what the low-rank path
(`methods/lowrank.py`) computes from factors.

Which tensors take part: every floating-point tensor of the checkpoint, and every 2-D one is
flattened, embedding tables included, exactly as the reference, which walks all parameters and
decides by shape alone (so CLIP's `class_embedding` is averaged and `position_embedding.weight`
is flattened). The reference leaves a model's buffers at the pretrained values; a
floating-point buffer stored in a checkpoint is merged here like a parameter (integer buffers
are copied from the base, as everywhere).

State: m itself (float32 per tensor by default, like the reference's float32 model; the SVD and
all arithmetic run in float64). Scalars: `merged_norm` (‖m‖) and `last_task_norm` (‖τ_t‖).

Reference: the NUFILT repository's `fusion_bench/method/nufilt/iso.py` (`ContinualISOForCLIP`
with its `iso_c`, the function of FusionBench's `isotropic_merging/iso_utils.py`), config
`config/method/nufilt/iso.yaml`. Differences: float64 arithmetic on the stored float32 m where
the reference recomputes m = θ − θ0 in float32; no shuffling or seeding (the order is the order
of `add`); the σ = 0 rule above.

Every 2-D tensor needs its whole SVD, so 2-D tensors are held whole even above the engine's
row-streaming size; the averaged ones stream by row blocks.
"""

from __future__ import annotations

import torch

from . import lowrank
from .base import COMPUTE_DTYPE
from .configs.iso_c import IsoCConfig
from .linalg import resolved_rank, stored_rtol
from .ops import average
from .pairwise import PairwiseMerge


def iso_c_combine(merged: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Iso-C of two task vectors of one tensor (float64): the flattened-spectrum sum of a 2-D
    pair (its σ = 0 directions left out, see the module docstring), the average of any other
    pair. A new tensor."""
    if merged.ndim != 2:
        return average(merged, task)
    stored = merged, task  # as held: a float32 m's round-off is not a direction
    merged, task = merged.to(COMPUTE_DTYPE), task.to(COMPUTE_DTYPE)
    total = merged + task
    if total.numel() == 0:
        return total
    u, sigma, vh = torch.linalg.svd(total, full_matrices=False)
    rank = resolved_rank(sigma, stored_rtol(*total.shape, float(sigma[0]), *stored))
    if rank == 0:
        return torch.zeros_like(total)
    return (u[:, :rank] * sigma[:rank].mean()) @ vh[:rank]


class IsoC(PairwiseMerge):
    config_class = IsoCConfig
    combine = staticmethod(iso_c_combine)
    combine_factored = staticmethod(lowrank.iso_c_combine)
