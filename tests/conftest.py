"""Shared fixtures: tiny synthetic model streams on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_SHAPES

from mergestream.synthetic import write_stream


@pytest.fixture
def tiny_stream(tmp_path: Path) -> tuple[Path, list[Path]]:
    """base/ and six fine-tuned model directories, float32 safetensors."""
    return write_stream(tmp_path / "zoo", models=6, seed=3, shapes=TINY_SHAPES)
