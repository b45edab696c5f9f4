"""Give freed tensor memory back to the operating system at once (glibc).

glibc serves a large allocation with its own memory mapping, returned to the system when freed,
but only up to a threshold that it raises each time such a mapping is freed (up to 32 MiB on
64-bit). After the first few tensors, allocations of up to 32 MiB (a row block is 32 MiB in
float64) come from the heaps of the threads that made them instead, and what is freed there
stays resident: a step of a TinyLlama-shaped model peaked anywhere between 690 and 1000 MiB
from one step to the next for the same work (BENCHMARKS.md). Fixing the threshold at 1 MiB
keeps every tensor-sized allocation on its own mapping, so resident memory follows the live
tensors (the same steps: 607 MiB each, for a few percent more time spent mapping pages).

The command line calls `return_freed_memory_to_os` at start-up. It changes the whole process's
allocator, so the library leaves the choice to the program that embeds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# From glibc's <malloc.h>.
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD_BYTES = 1 << 20
# glibc's own variable for the same setting; when the user has set it, theirs stands.
ENVIRONMENT_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


def return_freed_memory_to_os(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Serve allocations of `threshold_bytes` and more from their own mappings, returned to the
    system when freed. True when glibc took the setting; False elsewhere (another C library or
    system, or MALLOC_MMAP_THRESHOLD_ already set in the environment), changing nothing."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    if ENVIRONMENT_VARIABLE in os.environ:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
