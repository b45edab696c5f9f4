"""One merge step: stream every tensor of an incoming checkpoint through a method's kernel.

For each floating-point tensor of the base, in storage order, the engine reads the base tensor,
the incoming tensor and the method's state tensors, computes the task vector in float64, calls
the method's pure `update`, hands the new state to a writer and accumulates the method's partial
sums. Only a few tensors are alive at any time. Validation that needs no tensor data (names,
shapes, dtypes) runs before anything is computed; problems found during the pass (NaN/Inf)
raise before the caller commits, so a failed step never changes stored state.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .classify import LinearRule
from .errors import CheckpointError, ConfigError
from .io.checkpoint import TensorSource, tensor_location
from .io.mapping import mismatch_hint
from .io.safetensors_stream import dtype_name
from .methods.base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    StepTensor,
    TensorInfo,
)
from .progress import NoProgress, Progress

StateReader = Callable[[TensorInfo], Mapping[str, torch.Tensor]]
StateWriter = Callable[[TensorInfo, Mapping[str, torch.Tensor]], None]


def tensor_infos(base: TensorSource, rule: LinearRule) -> list[TensorInfo]:
    """The merged (floating-point) tensors of the base, in storage order."""
    infos = []
    for name in base.names():
        spec = base.spec(name)
        if spec.dtype.is_floating_point:
            infos.append(TensorInfo(name, spec.shape, spec.dtype, rule.is_linear(name, spec)))
    return infos


def check_compatible(base: TensorSource, checkpoint: TensorSource) -> None:
    """Refuse a checkpoint whose tensors do not match the base, naming the first offender (and
    the option that would map the checkpoint onto the base, where one fits)."""
    incoming = checkpoint.names()
    incoming_set = set(incoming)
    base_names = base.names()
    base_set = set(base_names)
    float_names = [n for n in base_names if base.spec(n).dtype.is_floating_point]
    missing = [n for n in float_names if n not in incoming_set]
    extra = [n for n in incoming if n not in base_set]
    if missing or extra:

        def first(names: list[str], what: str) -> str:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return f"tensor {names[0]!r} {what}{more}"

        problems = []
        if missing:
            problems.append(first(missing, "of the base is missing"))
        if extra:
            problems.append(first(extra, "is not in the base"))
        problem = "; ".join(problems)
        buffers = base_set.difference(float_names)  # integer buffers: never merged
        hint = mismatch_hint(float_names, incoming, buffers)
        raise CheckpointError(
            f"{checkpoint.description}: {problem}" + (f". Hint: {hint}" if hint else "")
        )
    for name in float_names:
        spec = base.spec(name)
        other = checkpoint.spec(name)
        if other.shape != spec.shape:
            raise CheckpointError(
                f"{tensor_location(checkpoint, name)}: tensor {name!r} has shape "
                f"{list(other.shape)}, the base has {list(spec.shape)}"
            )
        if not other.dtype.is_floating_point:
            raise CheckpointError(
                f"{tensor_location(checkpoint, name)}: tensor {name!r} has dtype "
                f"{dtype_name(other.dtype)}, which cannot be cast to the base's "
                f"{dtype_name(spec.dtype)} for merging (integer, boolean and complex tensors "
                "carry no task vector)"
            )


def load_task_vector(
    info: TensorInfo, base: TensorSource, checkpoint: TensorSource, device: torch.device
) -> torch.Tensor:
    """incoming - base for one tensor, float64 on `device`; refuses NaN/Inf in the input.

    The result is the only float64 buffer of the tensor's size: the base is subtracted from the
    incoming tensor in place, chunk by chunk (see `add_chunked`).
    """
    incoming = checkpoint.get(info.name).to(
        device=device, dtype=COMPUTE_DTYPE, memory_format=torch.contiguous_format, copy=True
    )
    flat = incoming.view(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if not bool(torch.isfinite(flat[start : start + CHUNK_ELEMENTS]).all()):
            nan = int(torch.isnan(flat).sum())
            inf = int(torch.isinf(flat).sum())
            first = int((~torch.isfinite(flat)).nonzero()[0])
            raise CheckpointError(
                f"{tensor_location(checkpoint, info.name)}: tensor {info.name!r} contains "
                f"{nan} NaN and {inf} infinite values (first at flat index {first}); "
                "a checkpoint with non-finite weights cannot be merged"
            )
    return add_chunked(incoming, base.get(info.name).to(device), alpha=-1)


CHUNK_ELEMENTS = 1 << 22  # 32 MB of float64


def add_chunked(target: torch.Tensor, other: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """`target += alpha * other` in place, where `other` may have a narrower dtype.

    On CPU, an in-place op whose operands differ in dtype first converts the whole other operand
    to the result's dtype, a temporary as large as the target; chunks keep that temporary small.
    """
    if not target.is_contiguous():
        return target.add_(other.to(target.device), alpha=alpha)
    flat_target, flat_other = target.view(-1), other.to(target.device).reshape(-1)
    for start in range(0, flat_target.numel(), CHUNK_ELEMENTS):
        chunk = slice(start, start + CHUNK_ELEMENTS)
        flat_target[chunk].add_(flat_other[chunk], alpha=alpha)
    return target


@dataclass(frozen=True)
class StepStats:
    step: int
    scalars: Scalars
    seconds: float
    tensors: int
    projected: int


def run_step(
    method: ContinualMethod,
    step: int,
    scalars: Scalars,
    infos: list[TensorInfo],
    base: TensorSource,
    checkpoint: TensorSource,
    read_state: StateReader,
    write_state: StateWriter,
    *,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    progress: Progress | None = None,
) -> StepStats:
    """Fold `checkpoint` into the state as step `step` (1-based); returns the new scalars.

    `read_state(info)` gives the previous state tensors of one tensor ({} at step 1);
    `write_state(info, tensors)` receives the new ones, in storage order.

    `workers` tensors are processed at once (default: one per CPU core, or 1 on a GPU). With
    more than one worker each kernel runs single-threaded: a decomposition of one matrix
    scales poorly over threads, while independent tensors scale almost perfectly, and the
    results do not depend on how many workers ran.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    if workers is None:
        workers = default_workers(device)
    progress = progress or NoProgress()
    check_compatible(base, checkpoint)

    def on_device(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in state.items()}

    def pass_over_tensors() -> Iterator[StepTensor]:
        for info in infos:
            yield StepTensor(
                info,
                on_device(read_state(info)),
                load_task_vector(info, base, checkpoint, device),
            )

    step_scalars = dict(scalars)
    step_scalars.update(method.prepare_step(step, scalars, pass_over_tensors))

    def process(info: TensorInfo):  # noqa: ANN202
        task_vector = load_task_vector(info, base, checkpoint, device)
        update = method.update(info, step, on_device(read_state(info)), task_vector, step_scalars)
        for key, tensor in update.state.items():
            if tensor.dtype != method.state_dtype or tuple(tensor.shape) != info.shape:
                raise RuntimeError(
                    f"{method.name}: state {key!r} of {info.name!r} must be {method.state_dtype} "
                    f"{list(info.shape)}, got {tensor.dtype} {list(tensor.shape)}"
                )
        return update

    partials: Scalars = {}
    total_bytes = sum(_nbytes(i) for i in infos)
    progress.start(f"step {step}", len(infos), total_bytes)
    try:
        with _single_threaded_kernels(workers > 1 and device.type == "cpu"):
            for info, update in zip(infos, _ordered_map(process, infos, workers), strict=True):
                write_state(info, {k: v.to("cpu") for k, v in update.state.items()})
                for key, value in update.partials.items():
                    partials[key] = partials.get(key, 0.0) + value
                progress.advance(1, _nbytes(info))
    finally:
        progress.finish()
    new_scalars = method.finish_step(step, scalars, partials)
    return StepStats(
        step=step,
        scalars=new_scalars,
        seconds=time.perf_counter() - started,
        tensors=len(infos),
        projected=sum(i.projected for i in infos),
    )


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
    """One worker per available CPU core (at most 8); a GPU gets one stream of work."""
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


@contextlib.contextmanager
def _single_threaded_kernels(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _nbytes(info: TensorInfo) -> int:
    numel = 1
    for d in info.shape:
        numel *= d
    return numel * torch.empty((), dtype=info.dtype).element_size()


def _ordered_map(fn, items, workers: int):  # noqa: ANN001, ANN202
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
