"""Small tensor operations that several methods share (as PEFT's `merge_utils`)."""

from __future__ import annotations

import torch

from .base import COMPUTE_DTYPE


def squared_norm(tensor: torch.Tensor) -> float:
    """Σ x² (the partial sum behind every global norm), without a temporary of the tensor's
    size: the largest tensors of a model would otherwise briefly cost a second full copy."""
    flat = tensor.reshape(-1)
    return float(torch.dot(flat, flat))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ aᵢbᵢ over every entry of two tensors of one shape."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def average(merged: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """(m + τ)/2 in float64, a new tensor: what the pairwise methods do outside 2-D tensors."""
    return (merged.to(COMPUTE_DTYPE) + task.to(COMPUTE_DTYPE)) / 2
