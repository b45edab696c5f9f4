"""Option values shared by the library and the command line, importable without torch (the
command line builds its parser and answers `--help` and `status` before torch is loaded)."""

from __future__ import annotations

# Base tensors a checkpoint lacks: refuse, or take them from the base (unchanged).
MISSING_POLICIES = ("error", "base")
# Checkpoint tensors the base lacks: refuse, or leave them out.
EXTRA_POLICIES = ("error", "ignore")
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
STATE_DTYPE_NAMES = ("float32", "float64")
