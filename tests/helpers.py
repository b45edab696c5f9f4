"""Builders of tiny synthetic models shared by the tests."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

# Shapes with both orientations of 2-D linear weights (16x24 and 24x16), square ones, biases,
# norms, an embedding table (2-D, never projected) and an integer buffer.
TINY_SHAPES = transformer_shapes(layers=2, hidden=16, intermediate=24, vocab=30, positions=8)


def memory_stream(models: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(base, [fine-tuned state dicts]) built in memory."""
    base = make_base(TINY_SHAPES, seed=seed, dtype=dtype)
    return base, [
        apply(base, make_task_vector(base, seed=seed * 100 + i + 1)) for i in range(models)
    ]


def tree_digest(root: Path) -> str:
    """One hash over every path below `root` and every file's bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` (tmpfs; mounting needs root, the test is skipped
    otherwise) at `mount`, unmounted afterwards: full-disk tests on a real disk."""
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def load_benchmark_script(name: str):  # noqa: ANN201
    """The script `benchmarks/<name>.py`, loaded as a module (the scripts are not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
