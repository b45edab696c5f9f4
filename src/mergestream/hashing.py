"""Content hashes for the ledger and the base fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .io.checkpoint import TensorSource

CHUNK = 8 << 20


def sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_tensors(source: TensorSource) -> str:
    """Hash of names, dtypes, shapes and bytes, for sources that are not files."""
    digest = hashlib.sha256()
    for name in source.names():
        tensor = source.get(name).detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def content_hash(source: TensorSource) -> str:
    files = source.files()
    return sha256_files(files) if files else sha256_tensors(source)


def file_stamps(files: list[Path]) -> list[dict[str, object]]:
    """Cheap identity of files (name, size, mtime) to notice when a base changed on disk."""
    stamps = []
    for path in files:
        st = path.stat()
        stamps.append({"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stamps
