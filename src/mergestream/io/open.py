"""Opening any checkpoint: the one function that knows every input format.

A path is a PEFT LoRA adapter folder (`lora.py`), or weight files: a `.safetensors` file, a
PyTorch `.bin`/`.pt`/`.pth` state dict, an HF model directory or a shard index
(`checkpoint.py`); an in-memory state dict is wrapped as it is (`source.MemorySource`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX, TORCH_INDEX, open_weight_files
from .lora import is_adapter_dir, open_adapter
from .source import MemorySource, TensorSource

CheckpointLike = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def open_checkpoint(checkpoint: CheckpointLike) -> TensorSource:
    """Open a checkpoint path (file or HF model directory) or wrap an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return MemorySource(checkpoint)
    path = Path(checkpoint)
    if is_adapter_dir(path):  # a PEFT LoRA adapter: fitted to the base by MergeState
        return open_adapter(path)
    return open_weight_files(path)


def config_dir(checkpoint: CheckpointLike) -> Path | None:
    """The HF model directory holding config/tokenizer files, if the checkpoint is one."""
    if isinstance(checkpoint, Mapping):
        return None
    path = Path(checkpoint)
    if path.is_dir():
        return path
    if path.name in (SAFETENSORS_INDEX, TORCH_INDEX):
        return path.parent
    return None
