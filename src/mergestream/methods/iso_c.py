"""Continual Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025), applied
at every step to the pair (merged task vector, incoming task vector).

Step 1: θ = θ0 + c·τ_1. Step t: with m = θ − θ0 (the merged task vector so far, which already
carries the previous steps' c), θ ← θ0 + c·ISO(m, τ_t), where, per tensor,
  - a 2-D tensor: X = m + τ_t = U Σ Vᵀ (thin SVD), and ISO = mean(σ)·U Vᵀ: every singular value
    of the sum replaced by their mean (min(rows, cols) values, zeros included);
  - any other tensor (biases, norms, conv kernels, 1-D embeddings): the average (m + τ_t)/2.
c = `scaling_factor` (default 1.0, the reference's shipped setting).

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
of `add`). A 2-D tensor whose sum is rank deficient has a non-unique U Vᵀ (the reference's
result then depends on its SVD routine too); both use the SVD's own choice.

Every 2-D tensor needs its whole SVD, so 2-D tensors are held whole even above the engine's
row-streaming size; the averaged ones stream by row blocks.
"""

from __future__ import annotations

import torch

from .base import COMPUTE_DTYPE
from .configs.iso_c import IsoCConfig
from .ops import average
from .pairwise import PairwiseMerge


def iso_c_combine(merged: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Iso-C of two task vectors of one tensor (float64): the flattened-spectrum sum of a 2-D
    pair, the average of any other pair. A new tensor."""
    if merged.ndim != 2:
        return average(merged, task)
    merged, task = merged.to(COMPUTE_DTYPE), task.to(COMPUTE_DTYPE)
    total = merged + task
    if total.numel() == 0:
        return total
    u, sigma, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * sigma.mean()) @ vh


class IsoC(PairwiseMerge):
    config_class = IsoCConfig
    combine = staticmethod(iso_c_combine)
