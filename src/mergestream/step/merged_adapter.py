"""Does a full checkpoint look like a LoRA adapter merged into the base?

PEFT's `merge_and_unload()` stores base + s·B·A rounded to the model's dtype. The task vector of
such a checkpoint is s·B·A (low rank) plus that rounding, a full-rank pattern at the dtype's
round-off level. Methods that decompose task vectors (OPCM, Iso-C, TSV-M, DOP) take the
rounding's directions for real ones, while merging the adapter folder itself is exact. `add`
calls `merged_adapter_note` to say so.

The check is cheap and errs towards silence: it reads a corner of at most `SAMPLE` rows (and
`SAMPLE` evenly spaced columns) of the first few changed weight matrices, and answers only when
every one of them is, beyond a small rank, nothing but rounding. By Eckart-Young, what is left
of a rank-r update plus rounding ε after its best rank-r approximation is at most ‖ε‖², and
rounding to nearest keeps each entry of ε within half a unit in the last place of the stored
value, so a merged adapter always passes. A real fine-tune changes its weights far above the
round-off level in every direction, so its tail holds orders of magnitude more than rounding.
"""

from __future__ import annotations

import torch

from ..io.safetensors_stream import dtype_name
from ..io.source import TensorSource
from ..methods.base import COMPUTE_DTYPE, TensorInfo
from .engine import load_task_rows


class MergedAdapterWarning(UserWarning):
    """A full checkpoint looks like a LoRA adapter merged into the base (see the module)."""


SAMPLE = 512  # rows and columns of a matrix's corner examined (a 512 x 512 SVD: ~0.1 s)
MATRICES = 3  # changed matrices that must all look like low rank plus rounding
CANDIDATES = 32  # matrices read at most while looking for changed ones
MIN_SIDE = 8  # smaller matrices (classifier heads) say nothing about rank
RANK_SHARE = 4  # a rank above 1/RANK_SHARE of the corner's smaller side is not "low"
# Rounding to nearest leaves |ε| ≤ ulp/2, at most 3 times the energy of its mean (ulp²/12);
# PEFT's float product B·A adds a little more. A real tail is orders of magnitude above this.
ROUNDING_MARGIN = 16.0
# The low-rank part must stand clearly above the rounding (100 times its amplitude), or there
# is nothing to tell apart.
SIGNAL_MARGIN = 1e4
# Round-off of float64 (and wider) checkpoints is below what the SVD itself can resolve, and
# there both routes agree anyway.
MAX_EPS = 1e-10


def merged_adapter_note(
    base: TensorSource, checkpoint: TensorSource, infos: list[TensorInfo]
) -> str | None:
    """A short note ("rank <= 4 plus float32 round-off") when `checkpoint` looks like a LoRA
    adapter merged into `base` (see `merged_adapter_rank`), else None."""
    found = merged_adapter_rank(base, checkpoint, infos)
    if found is None:
        return None
    rank, dtype = found
    return f"rank <= {rank} plus {dtype_name(dtype)} round-off"


def merged_adapter_warning(description: str, note: str) -> str:
    """What `add` says, in one line, about a checkpoint `merged_adapter_note` described."""
    return (
        f"{description}: its task vector is {note}, as in a LoRA adapter merged into the base "
        "(merge_and_unload); opcm, iso_c and tsv_m take that round-off for real directions. "
        "Merge the adapter folder itself instead: its task vector is exact"
    )


def merged_adapter_rank(
    base: TensorSource, checkpoint: TensorSource, infos: list[TensorInfo]
) -> tuple[int, torch.dtype] | None:
    """(the largest rank seen, the checkpoint's dtype) when the first (up to `MATRICES`)
    changed 2-D tensors of `checkpoint` are each a low-rank update of `base` plus the rounding
    of the checkpoint's dtype, as a merged LoRA adapter is; None when any of them is not, or
    none is found. `checkpoint` holds the base's names (after any mapping)."""
    ranks: list[int] = []
    dtypes: list[torch.dtype] = []
    read = 0
    for info in infos:
        if len(info.shape) != 2 or min(info.shape) < MIN_SIDE:
            continue
        dtype = checkpoint.spec(info.name).dtype
        if torch.finfo(dtype).eps < MAX_EPS:
            continue
        if read == CANDIDATES:
            break
        read += 1
        verdict = _corner_rank(info, base, checkpoint, dtype)
        if verdict == _UNCHANGED:
            continue
        if verdict is None:
            return None
        ranks.append(verdict)
        dtypes.append(dtype)
        if len(ranks) == MATRICES:
            break
    return (max(ranks), dtypes[0]) if ranks else None


_UNCHANGED = -1


def _corner_rank(
    info: TensorInfo, base: TensorSource, checkpoint: TensorSource, dtype: torch.dtype
) -> int | None:
    """The rank beyond which the corner's task vector is only rounding; `_UNCHANGED` when it
    is exactly zero, None when it is not low rank plus rounding."""
    rows, cols = info.shape
    stop = min(rows, SAMPLE)
    stride = -(-cols // SAMPLE)  # evenly spaced columns, at most SAMPLE of them
    tau = load_task_rows(info, base, checkpoint, 0, stop, torch.device("cpu"))[:, ::stride]
    if not bool(tau.any()):
        return _UNCHANGED
    zero = tau == 0
    if bool(zero.all(dim=1).any() or zero.all(dim=0).any()):
        # Whole rows or columns left as in the base: a sparse change (an embedding's unused
        # tokens), not the product of two dense factors.
        return None
    stored = base.get_rows(info.name, 0, stop)[:, ::stride].to(COMPUTE_DTYPE) + tau
    _, exponent = torch.frexp(stored)
    ulp = torch.ldexp(torch.full_like(stored, torch.finfo(dtype).eps), exponent - 1)
    rounding = float(ulp.square().sum()) / 12
    energy = torch.linalg.svdvals(tau).square()
    # tail[k]: what a rank-k approximation leaves (tail[len] = 0)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    if float(tail[0]) < SIGNAL_MARGIN * rounding:
        return None
    rank = int((tail > ROUNDING_MARGIN * rounding).sum())
    if rank == 0 or rank * RANK_SHARE > min(tau.shape):
        return None
    return rank
