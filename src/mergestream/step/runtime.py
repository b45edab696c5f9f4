"""Where and how a step's kernels run: the device, the kernel threads, CUDA streams.

A step's bits depend on how its kernels run (a float64 reduction rounds differently with another
thread count), so everything that decides it lives here, and every pass that must give a step's
bits (the step itself, its preparation ahead of time, a task of a distributed step) runs its
kernels through these functions.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ConfigError
from ..methods.base import COMPUTE_DTYPE


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device, refusing clearly one that this machine does not have."""
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is available to torch here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available to torch here")
    return resolved


def default_workers(device: torch.device) -> int:
    """One worker per available CPU core (at most 8) on the CPU; one elsewhere.

    On a CUDA GPU more workers (`workers=N`) each run on a stream of their own. A
    decomposition of one weight there is bound by its kernel launches and host-side steps, not
    by the chip, so independent tensors on separate streams overlap: 12 float64 thin SVDs of
    3072 x 768 took 82 ms each one after another on an H100, 29 ms each from 4 threads with a
    stream apiece and 19 ms from 12. It stays opt-in until a whole step is measured that way."""
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


_WARMED_CUDA_LINALG: set[int] = set()


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def warm_cuda_linalg(device: torch.device) -> None:
    """Run each decomposition once on this thread before worker threads use them: torch loads
    its CUDA linear-algebra library lazily at the first call, and two threads making that first
    call together fail with "lazy wrapper should be called at most once" (pytorch#90613)."""
    index = _cuda_index(device)
    if index in _WARMED_CUDA_LINALG:
        return
    probe = torch.eye(2, dtype=COMPUTE_DTYPE, device=device)
    torch.linalg.eigh(probe)
    torch.linalg.svd(probe, full_matrices=False)
    torch.linalg.qr(probe)
    torch.cuda.synchronize(device)
    _WARMED_CUDA_LINALG.add(index)


_THREAD_STREAMS = threading.local()


@contextlib.contextmanager
def worker_stream(device: torch.device) -> Iterator[None]:
    """Run the block on this thread's own stream of the CUDA `device` and wait for it at the
    end. Streams are kept per thread, so a worker reuses its stream."""
    streams = getattr(_THREAD_STREAMS, "by_device", None)
    if streams is None:
        streams = _THREAD_STREAMS.by_device = {}
    index = _cuda_index(device)
    stream = streams.get(index)
    if stream is None:
        stream = streams[index] = torch.cuda.Stream(device=index)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


@contextlib.contextmanager
def single_threaded_kernels(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ordered_map(fn, items, workers: int):  # noqa: ANN001, ANN202
    """map(fn, items) in order; with workers > 1, a bounded window runs ahead on threads
    (torch releases the GIL inside its kernels). Partial sums stay in storage order, so results
    are bitwise identical whatever the worker count."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    # OpenMP keeps its thread count per thread, so each worker sets its own to one: otherwise
    # every worker's kernels spread over all cores and the workers oversubscribe them.
    with ThreadPoolExecutor(
        max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        window = []
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > workers:
                yield window.pop(0).result()
        for future in window:
            yield future.result()
