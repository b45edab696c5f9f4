"""One merge step: stream every tensor of an incoming checkpoint through a method's kernel.

For each floating-point tensor of the base, in storage order, the engine reads the base tensor,
the incoming tensor and the method's state tensors, computes the task vector in float64, calls
the method's pure `update`, hands the new state to a writer and accumulates the method's partial
sums. Only a few tensors are alive at any time. Validation that needs no tensor data (names,
shapes, dtypes) runs before anything is computed; problems found during the pass (NaN/Inf)
raise before the caller commits, so a failed step never changes stored state.

Tensors of at least `STREAM_MIN_ELEMENTS` entries (embeddings, output heads) are not held
whole: the method folds them by blocks of rows read from the files and written straight into
the new state (`ContinualMethod.update_rows`), one such tensor at a time with every core. The
peak memory of a step is then set by the block size and the smaller tensors in flight, not by
the largest tensor of the model.

Each tensor is folded in the form planned for it before the step (`forms.py`): a factored one
through the method's `update_factored`, from the previous thin SVD and the input's factors
(never by row blocks: factors are small), a zero one not at all (its partial sums are the zero
tensors'), a dense one through `update`, whatever form its previous state had (the reader forms
a factored or zero state dense).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..io.open import check_compatible
from ..io.safetensors_stream import dtype_name
from ..io.source import TensorSource, tensor_location
from ..methods.base import (
    COMPUTE_DTYPE,
    ContinualMethod,
    Scalars,
    StepTensor,
    TensorInfo,
)
from ..methods.classify import LinearRule
from ..methods.lowrank import Factors, ThinSVD
from ..methods.lowrank import squared_norm as factors_squared_norm
from ..progress import NoProgress, Progress
from ..store.manifest import DENSE, DENSE_FORM, ZERO, TensorForm
from .runtime import (
    default_workers,
    ordered_map,
    resolve_device,
    single_threaded_kernels,
    warm_cuda_linalg,
    worker_stream,
)

StateReader = Callable[[TensorInfo], Mapping[str, torch.Tensor]]
StateWriter = Callable[[TensorInfo, Mapping[str, torch.Tensor]], None]
StateRowReader = Callable[[TensorInfo, int, int], Mapping[str, torch.Tensor]]
StateRowWriter = Callable[[TensorInfo, int, Mapping[str, torch.Tensor]], None]
# A factored tensor's previous state (None where it was zero) and its new one, per state kind.
FactorReader = Callable[[TensorInfo], ThinSVD | None]
FactorWriter = Callable[[TensorInfo, Mapping[str, ThinSVD]], None]

# Tensors this large (4 Mi entries, 32 MiB in float64) are folded by row blocks of about
# ROW_BLOCK_ELEMENTS entries. Smaller tensors are processed whole and in parallel. Both sizes
# are fixed, so a step's result does not depend on the machine.
STREAM_MIN_ELEMENTS = 1 << 22
ROW_BLOCK_ELEMENTS = 1 << 22


def tensor_infos(base: TensorSource, rule: LinearRule) -> list[TensorInfo]:
    """The merged (floating-point) tensors of the base, in storage order."""
    infos = []
    for name in base.names():
        spec = base.spec(name)
        if spec.dtype.is_floating_point:
            infos.append(TensorInfo(name, spec.shape, spec.dtype, rule.is_linear(name, spec)))
    return infos


def load_task_vector(
    info: TensorInfo, base: TensorSource, checkpoint: TensorSource, device: torch.device
) -> torch.Tensor:
    """incoming - base for one tensor, float64 on `device`; refuses NaN/Inf in the input.

    The result is the only float64 buffer of the tensor's size: the base is subtracted from the
    incoming tensor in place, chunk by chunk (see `add_chunked`).
    """
    own_task_vector = getattr(checkpoint, "task_vector", None)
    if own_task_vector is not None:  # a source that computes τ itself (a LoRA adapter: s·B·A)
        task_vector = own_task_vector(info.name, device)
        _check_finite(task_vector, checkpoint, info.name)
        return task_vector
    incoming = checkpoint.get(info.name).to(
        device=device, dtype=COMPUTE_DTYPE, memory_format=torch.contiguous_format, copy=True
    )
    _check_finite(incoming, checkpoint, info.name)
    return add_chunked(incoming, base.get(info.name).to(device), alpha=-1)


def load_task_rows(
    info: TensorInfo,
    base: TensorSource,
    checkpoint: TensorSource,
    start: int,
    stop: int,
    device: torch.device,
) -> torch.Tensor:
    """Rows `start:stop` of `load_task_vector`'s result, reading only those rows."""
    own_task_rows = getattr(checkpoint, "task_rows", None)
    if own_task_rows is not None:  # a source that computes τ itself (see load_task_vector)
        rows = own_task_rows(info.name, start, stop, device)
        _check_finite(rows, checkpoint, info.name, rows=(start, stop), row_numel=_row_numel(info))
        return rows
    incoming = checkpoint.get_rows(info.name, start, stop).to(
        device=device, dtype=COMPUTE_DTYPE, memory_format=torch.contiguous_format, copy=True
    )
    _check_finite(incoming, checkpoint, info.name, rows=(start, stop), row_numel=_row_numel(info))
    return incoming.sub_(base.get_rows(info.name, start, stop).to(device))


def load_task_factors(
    info: TensorInfo, checkpoint: TensorSource, device: torch.device
) -> Factors | None:
    """The task vector of a tensor planned factored, as factors on `device` (None where the
    input leaves it unchanged); refuses NaN/Inf in the factors."""
    unchanged = getattr(checkpoint, "leaves_unchanged", None)
    if unchanged is not None and unchanged(info.name):
        return None
    task_factors = getattr(checkpoint, "task_factors", None)
    factors = task_factors(info.name, device) if task_factors is not None else None
    if factors is None:
        raise RuntimeError(
            f"{checkpoint.description}: tensor {info.name!r} was planned as factors, but the "
            "input gives it as a full tensor"
        )
    for factor in factors:
        _check_finite(factor, checkpoint, info.name)
    return Factors(*factors)


def check_all_finite(source: TensorSource, infos: list[TensorInfo], role: str) -> None:
    """Refuse a source with NaN/Inf in any floating-point tensor (`role` says what it is, e.g.
    "the base"), reading one tensor, or one row block of a large tensor, at a time."""
    for info in infos:
        blocks = row_blocks(info.shape) if is_streamed(info) else [None]
        for block in blocks:
            data = source.get(info.name) if block is None else source.get_rows(info.name, *block)
            try:
                _check_finite(data, source, info.name, rows=block, row_numel=_row_numel(info))
            except CheckpointError as err:
                raise CheckpointError(f"{role}: {err}") from None


def _check_finite(
    incoming: torch.Tensor,
    checkpoint: TensorSource,
    name: str,
    rows: tuple[int, int] | None = None,
    row_numel: int = 0,
) -> None:
    """Refuse NaN/Inf, naming the file, the tensor and the first bad entry's flat index.
    `rows` says which rows of the tensor `incoming` holds, when it is not the whole tensor."""
    flat = incoming.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if not bool(torch.isfinite(flat[start : start + CHUNK_ELEMENTS]).all()):
            nan = int(torch.isnan(flat).sum())
            inf = int(torch.isinf(flat).sum())
            offset = rows[0] * row_numel if rows else 0
            first = offset + int((~torch.isfinite(flat)).nonzero()[0])
            where = f" in rows {rows[0]}:{rows[1]}" if rows else ""
            raise CheckpointError(
                f"{tensor_location(checkpoint, name)}: tensor {name!r} contains "
                f"{nan} NaN and {inf} infinite values{where} (first at flat index {first}); "
                "a checkpoint with non-finite weights cannot be merged"
            )


CHUNK_ELEMENTS = 1 << 22  # 32 MB of float64

# A factored tensor's new rank, reported with its partial sums (the manifest records it) and
# taken out of them before they are summed (`take_ranks`).
RANK_PARTIAL = "engine.rank"

# A partial sum the engine adds to each tensor's own, and takes out again before the method
# sees the step's totals: 1 when the tensor's task vector has an entry that is not zero. A
# checkpoint whose total is 0 (the base itself, an adapter whose B factors are all zero) would
# still count as a task: OPCM's scale grows and the merge is scaled down, averages are diluted.
NONZERO_PARTIAL = "engine.task_vector_nonzero"


def zero_task_vector_error(checkpoint: TensorSource) -> CheckpointError:
    """The refusal of a checkpoint that equals the base in every merged tensor."""
    return CheckpointError(
        f"{checkpoint.description}: its task vector is zero in every tensor (it is the base, "
        "or an adapter whose B factors are all zero); merging it would still count as a task "
        "and shrink or dilute the merge (OPCM's scale grows, averages are divided by one more "
        "model). Nothing was merged; pass allow_zero (--allow-zero) to merge it anyway"
    )


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
    ranks: dict[str, int] = field(default_factory=dict)  # factored tensors' new ranks


def take_ranks(partials: list[tuple[str, Scalars]]) -> dict[str, int]:
    """Each factored tensor's new rank, taken out of its partial sums (`RANK_PARTIAL`)."""
    ranks = {}
    for name, more in partials:
        rank = more.pop(RANK_PARTIAL, None)
        if rank is not None:
            ranks[name] = int(rank)
    return ranks


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
    read_state_rows: StateRowReader | None = None,
    write_state_rows: StateRowWriter | None = None,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    progress: Progress | None = None,
    allow_zero: bool = False,
    forms: Mapping[str, TensorForm] | None = None,
    read_factors: FactorReader | None = None,
    write_factors: FactorWriter | None = None,
) -> StepStats:
    """Fold `checkpoint` into the state as step `step` (1-based); returns the new scalars.

    `read_state(info)` gives the previous state tensors of one tensor ({} at step 1);
    `write_state(info, tensors)` receives the new ones, in storage order. With
    `read_state_rows` / `write_state_rows` (the same by row ranges), large tensors are
    streamed by row blocks instead of held whole (see the module docstring).

    `workers` tensors are processed at once (default: one per CPU core, at most 8, or one on a
    GPU, where each worker gets a CUDA stream of its own). With more than one worker on the CPU
    each kernel runs single-threaded: a decomposition of one matrix scales poorly over threads,
    while independent tensors scale almost perfectly. The results do not depend on how many
    workers ran.

    A checkpoint whose task vector is zero in every tensor is refused after the pass, before
    anything is committed, unless `allow_zero` (see `NONZERO_PARTIAL`).

    `forms` are the tensors' planned forms (`forms.plan_forms`; absent: dense); tensors planned
    factored read their previous state with `read_factors` and write the new one with
    `write_factors`, tensors planned zero write nothing. `StepStats.ranks` has the new ranks.

    The step is three parts that other executors (`ray_backend.py`) reuse as they are:
    `prepare_step_scalars`, `fold_tensors` over any subset of the tensors, and
    `finish_step_scalars` over the per-tensor partial sums in storage order.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    check_compatible(base, checkpoint)
    if read_state_rows is None or write_state_rows is None:
        read_state_rows = write_state_rows = None  # every tensor is processed whole
    step_scalars = prepare_step_scalars(
        method,
        step,
        scalars,
        infos,
        base,
        checkpoint,
        read_state,
        read_state_rows=read_state_rows,
        device=device,
    )
    progress = progress or NoProgress()
    total_bytes = sum(tensor_nbytes(i) for i in infos)
    progress.start(f"step {step}", len(infos), total_bytes)
    try:
        named = [
            (info.name, more)
            for info, more in fold_tensors(
                method,
                step,
                step_scalars,
                infos,
                base,
                checkpoint,
                read_state,
                write_state,
                read_state_rows=read_state_rows,
                write_state_rows=write_state_rows,
                device=device,
                workers=workers,
                progress=progress,
                forms=forms,
                read_factors=read_factors,
                write_factors=write_factors,
            )
        ]
    finally:
        progress.finish()
    ranks = take_ranks(named)
    new_scalars = finish_step_scalars(
        method, checkpoint, step, scalars, [more for _, more in named], allow_zero=allow_zero
    )
    return StepStats(
        step=step,
        scalars=new_scalars,
        seconds=time.perf_counter() - started,
        tensors=len(infos),
        projected=sum(i.projected for i in infos),
        ranks=ranks,
    )


def prepare_step_scalars(
    method: ContinualMethod,
    step: int,
    scalars: Scalars,
    infos: list[TensorInfo],
    base: TensorSource,
    checkpoint: TensorSource,
    read_state: StateReader,
    *,
    read_state_rows: StateRowReader | None = None,
    device: torch.device | str = "cpu",
    streaming: Streaming | None = None,
) -> Scalars:
    """The scalars every tensor's `update` sees: the previous ones plus what the method's
    read-only preparation passes find (`ContinualMethod.prepare_step`; most methods make none).
    A pass reads one tensor, or one row block of a large tensor, at a time."""
    device = resolve_device(device)
    streaming = streaming or current_streaming()

    def pass_over_tensors() -> Iterator[StepTensor]:
        for info in infos:
            if not (read_state_rows is not None and streaming.streams(method, info)):
                yield StepTensor(
                    info,
                    _on_device(read_state(info), device),
                    load_task_vector(info, base, checkpoint, device),
                )
                continue
            for start, stop in streaming.row_blocks(info.shape):
                yield StepTensor(
                    info.rows(start, stop),
                    _on_device(read_state_rows(info, start, stop), device),
                    load_task_rows(info, base, checkpoint, start, stop, device),
                )

    step_scalars = dict(scalars)
    step_scalars.update(method.prepare_step(step, scalars, pass_over_tensors))
    _check_scalars_finite(method, checkpoint, step, step_scalars, "its preparation pass")
    return step_scalars


def fold_tensors(
    method: ContinualMethod,
    step: int,
    step_scalars: Scalars,
    infos: list[TensorInfo],
    base: TensorSource,
    checkpoint: TensorSource,
    read_state: StateReader,
    write_state: StateWriter,
    *,
    read_state_rows: StateRowReader | None = None,
    write_state_rows: StateRowWriter | None = None,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    progress: Progress | None = None,
    single_threaded: bool | None = None,
    streaming: Streaming | None = None,
    forms: Mapping[str, TensorForm] | None = None,
    read_factors: FactorReader | None = None,
    write_factors: FactorWriter | None = None,
) -> Iterator[tuple[TensorInfo, Scalars]]:
    """Run the method's update over `infos` (any subset of the step's tensors, in their order):
    write each tensor's new state and yield (tensor, its partial sums) in the order of `infos`.

    `step_scalars` come from `prepare_step_scalars`. Each tensor's state and partial sums depend
    only on that tensor's inputs, never on which other tensors share the call, so the tensors of
    one step may be folded by several calls (processes, machines) and give the same bits.

    Whole tensors run single-threaded kernels when `single_threaded` (default: when more than
    one worker runs on the CPU); row-streamed tensors use torch's thread count. The float64
    reductions of the kernels round differently with another thread count, so a process that
    must give another's bits sets both as that process did.

    `streaming` (default: this module's sizes now) says which tensors go by row blocks, and
    how large the blocks are.

    `forms`, `read_factors`, `write_factors`: as in `run_step`.

    Each tensor's partial sums also hold the engine's `NONZERO_PARTIAL`, and a factored
    tensor's its new rank (`RANK_PARTIAL`).
    """
    device = resolve_device(device)
    streaming = streaming or current_streaming()
    if workers is None:
        workers = default_workers(device)
    progress = progress or NoProgress()
    can_stream = read_state_rows is not None and write_state_rows is not None
    forms = forms or {}

    def form_of(info: TensorInfo) -> TensorForm:
        return forms.get(info.name, DENSE_FORM)

    def streamed(info: TensorInfo) -> _StreamedTensor | None:
        if form_of(info).kind != DENSE or not (can_stream and streaming.streams(method, info)):
            return None
        assert read_state_rows is not None and write_state_rows is not None
        return _StreamedTensor(
            info,
            streaming.row_blocks(info.shape),
            method,
            base,
            checkpoint,
            read_state_rows,
            write_state_rows,
            device,
        )

    own_streams = workers > 1 and device.type == "cuda"

    def process(info: TensorInfo) -> _Folded:
        if form_of(info).kind != DENSE:
            with worker_stream(device) if own_streams else contextlib.nullcontext():
                return fold_factored(info)
        with worker_stream(device) if own_streams else contextlib.nullcontext():
            task_vector = load_task_vector(info, base, checkpoint, device)
            state = _on_device(read_state(info), device)
            nonzero = float(bool(task_vector.any()))  # before `update`, which may reuse it
            update = method.update(info, step, state, task_vector, step_scalars)
            for key, tensor in update.state.items():
                _check_state(method, info, key, tensor, info.shape)
                _check_result_finite(checkpoint, info, f"state {key!r}", tensor, task_vector)
            _check_partials_finite(checkpoint, info, update.partials, task_vector)
            partials = {**update.partials, NONZERO_PARTIAL: nonzero}
            # Back to the host inside the worker's stream, so the caller never touches device
            # memory that another stream is still writing.
            on_host = {k: v.to("cpu") for k, v in update.state.items()}
        return _Folded(state=on_host, partials=partials)

    def fold_factored(info: TensorInfo) -> _Folded:
        form = form_of(info)
        if form.kind == ZERO:  # unchanged and zero before: no state is read or written
            new, partials = method.update_factored(info, step, None, None, step_scalars)
            if new is not None:
                raise RuntimeError(
                    f"{method.name}: the zero state of {info.name!r} did not stay zero"
                )
            return _Folded({}, {**partials, NONZERO_PARTIAL: 0.0})
        if read_factors is None or write_factors is None:
            raise RuntimeError(f"tensor {info.name!r} is planned factored without a factor store")
        task = load_task_factors(info, checkpoint, device)
        previous = read_factors(info) if step > 1 else None
        if previous is not None:
            previous = ThinSVD(*(t.to(device) for t in (previous.u, previous.sigma, previous.v)))
        nonzero = float(task is not None and factors_squared_norm(task) > 0.0)
        new, partials = method.update_factored(info, step, previous, task, step_scalars)
        if new is None:
            new = ThinSVD.zeros((info.shape[0], info.shape[1]), device)
        for key, tensor in (("u", new.u), ("sigma", new.sigma), ("v", new.v)):
            _check_result_finite(checkpoint, info, f"factor {key!r}", tensor)
        _check_partials_finite(checkpoint, info, partials, None)
        on_host = ThinSVD(new.u.to("cpu"), new.sigma.to("cpu"), new.v.to("cpu"))
        (state_name,) = method.state_names
        return _Folded(
            {},
            {**partials, NONZERO_PARTIAL: nonzero, RANK_PARTIAL: float(new.k)},
            {state_name: on_host},
        )

    if own_streams:
        warm_cuda_linalg(device)
    for segment, rows in _segments(infos, streamed):
        if rows is not None:  # one large tensor, alone, with every core
            more = method.update_rows(rows.info, step, rows, step_scalars)
            _check_partials_finite(checkpoint, rows.info, more, None)
            progress.advance(1, tensor_nbytes(rows.info))
            yield rows.info, {**more, NONZERO_PARTIAL: float(rows.nonzero)}
            continue
        if single_threaded is None:
            single_threaded = workers > 1 and device.type == "cpu"
        with single_threaded_kernels(single_threaded):
            results = ordered_map(process, segment, workers)
            for info, update in zip(segment, results, strict=True):
                if update.factors:
                    assert write_factors is not None
                    write_factors(info, update.factors)
                elif form_of(info).kind == DENSE:
                    write_state(info, {k: v.to("cpu") for k, v in update.state.items()})
                progress.advance(1, tensor_nbytes(info))
                yield info, update.partials


@dataclass
class _Folded:
    """One whole tensor folded by a worker: its new dense state, or its new factors (a
    factored tensor), and its partial sums."""

    state: dict[str, torch.Tensor]
    partials: Scalars
    factors: dict[str, ThinSVD] = field(default_factory=dict)


def finish_step_scalars(
    method: ContinualMethod,
    checkpoint: TensorSource,
    step: int,
    scalars: Scalars,
    partials: list[Scalars],
    *,
    allow_zero: bool = False,
) -> Scalars:
    """The scalars after the step, from every tensor's partial sums given in storage order.

    The sums are formed one tensor after another in that order, whoever computed the partials,
    so the step's scalars are the same bits for every executor and schedule. Refuses a task
    vector that is zero in every tensor unless `allow_zero`."""
    total: Scalars = {}
    for more in partials:
        for key, value in more.items():
            total[key] = total.get(key, 0.0) + value
    if total.pop(NONZERO_PARTIAL, None) == 0.0 and not allow_zero:
        raise zero_task_vector_error(checkpoint)
    new_scalars = method.finish_step(step, scalars, total)
    _check_scalars_finite(method, checkpoint, step, new_scalars, "the step")
    return new_scalars


def _on_device(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}


@dataclass(frozen=True)
class Streaming:
    """Which tensors a step folds by row blocks (`min_elements` entries and more) and the size
    of a block (about `block_elements` entries): values, so that every process of a step (the
    tasks of a distributed one) cuts the same blocks as the process that planned it."""

    min_elements: int
    block_elements: int

    def is_streamed(self, info: TensorInfo) -> bool:
        """Whether a tensor is large enough to be folded by row blocks (if its method can)."""
        return len(info.shape) >= 1 and _numel(info.shape) >= self.min_elements

    def streams(self, method: ContinualMethod, info: TensorInfo) -> bool:
        """Whether the engine folds this tensor by row blocks (given the state can be read
        and written by rows)."""
        return self.is_streamed(info) and method.streams_rows(info)

    def row_blocks(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """(start, stop) row ranges of about `block_elements` entries covering a tensor."""
        per_block = max(1, self.block_elements // max(1, _numel(shape[1:])))
        return [(s, min(s + per_block, shape[0])) for s in range(0, shape[0], per_block)]


def current_streaming() -> Streaming:
    """This module's streaming sizes as they are now (a test may set smaller ones)."""
    return Streaming(STREAM_MIN_ELEMENTS, ROW_BLOCK_ELEMENTS)


def is_streamed(info: TensorInfo) -> bool:
    """Whether a tensor is large enough to be folded by row blocks (if its method can)."""
    return current_streaming().is_streamed(info)


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about ROW_BLOCK_ELEMENTS entries covering a tensor."""
    return current_streaming().row_blocks(shape)


class _StreamedTensor:
    """A tensor of the step reachable by row blocks (`methods.base.RowBlocks`)."""

    def __init__(
        self,
        info: TensorInfo,
        blocks: list[tuple[int, int]],
        method: ContinualMethod,
        base: TensorSource,
        checkpoint: TensorSource,
        read_rows: StateRowReader,
        write_rows: StateRowWriter,
        device: torch.device,
    ):
        self.info = info
        self.blocks = blocks
        self._method = method
        self._base = base
        self._checkpoint = checkpoint
        self._read_rows = read_rows
        self._write_rows = write_rows
        self._device = device
        self.nonzero = False  # whether any row block read so far has a nonzero entry

    def task_rows(self, start: int, stop: int) -> torch.Tensor:
        rows = load_task_rows(self.info, self._base, self._checkpoint, start, stop, self._device)
        self.nonzero = self.nonzero or bool(rows.any())
        return rows

    def state_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        rows = self._read_rows(self.info, start, stop)
        return {k: v.to(self._device) for k, v in rows.items()}

    def write_rows(self, start: int, state: Mapping[str, torch.Tensor]) -> None:
        for key, tensor in state.items():
            rows = tensor.shape[0] if tensor.dim() else 0
            if start + rows > self.info.shape[0]:
                raise RuntimeError(
                    f"{self._method.name}: rows {start}:{start + rows} of state {key!r} of "
                    f"{self.info.name!r} are outside its {self.info.shape[0]} rows"
                )
            _check_state(self._method, self.info, key, tensor, (rows, *self.info.shape[1:]))
            _check_result_finite(
                self._checkpoint, self.info, f"state {key!r} (rows {start}:{start + rows})", tensor
            )
        self._write_rows(self.info, start, {k: v.to("cpu") for k, v in state.items()})


def _check_state(
    method: ContinualMethod,
    info: TensorInfo,
    key: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
) -> None:
    if tensor.dtype != method.state_dtype or tuple(tensor.shape) != tuple(shape):
        raise RuntimeError(
            f"{method.name}: state {key!r} of {info.name!r} must be {method.state_dtype} "
            f"{list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
        )


def _check_result_finite(
    checkpoint: TensorSource,
    info: TensorInfo,
    what: str,
    tensor: torch.Tensor,
    task_vector: torch.Tensor | None = None,
) -> None:
    """Refuse a step whose new state is not finite although its inputs were (values so large
    that the arithmetic, or the state's precision, overflows): nothing is committed."""
    if _all_finite(tensor):
        return
    raise CheckpointError(
        f"{tensor_location(checkpoint, info.name)}: merging tensor {info.name!r} gives a "
        f"non-finite {what} in {dtype_name(tensor.dtype)}{_largest(task_vector)}; values this "
        "large cannot be merged. The state is unchanged"
    )


def _check_partials_finite(
    checkpoint: TensorSource,
    info: TensorInfo,
    partials: Scalars,
    task_vector: torch.Tensor | None,
) -> None:
    """Refuse a tensor whose contribution to the step's global sums (norms) overflows."""
    for key, value in partials.items():
        if not math.isfinite(value):
            raise CheckpointError(
                f"{tensor_location(checkpoint, info.name)}: tensor {info.name!r} makes the "
                f"step's {key} {value}{_largest(task_vector)}; values this large cannot be "
                "merged. The state is unchanged"
            )


def _check_scalars_finite(
    method: ContinualMethod, checkpoint: TensorSource, step: int, scalars: Scalars, what: str
) -> None:
    bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
    if bad:
        raise CheckpointError(
            f"{checkpoint.description}: {method.name} step {step}: {what} gives non-finite "
            f"scalars {bad}; the checkpoint's values are too large to merge. The state is "
            "unchanged"
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[start : start + CHUNK_ELEMENTS]).all())
        for start in range(0, flat.numel(), CHUNK_ELEMENTS)
    )


def _largest(task_vector: torch.Tensor | None) -> str:
    if task_vector is None or task_vector.numel() == 0:
        return ""
    largest = float(task_vector.abs().max())
    return f" (its task vector's largest magnitude is {largest:.3g})"


def _segments(
    infos: list[TensorInfo], streamed: Callable[[TensorInfo], _StreamedTensor | None]
) -> Iterator[tuple[list[TensorInfo], _StreamedTensor | None]]:
    """Storage order cut into runs of whole tensors (processed in parallel) and single
    streamed tensors (processed alone), so partial sums still add up in storage order."""
    run: list[TensorInfo] = []
    for info in infos:
        rows = streamed(info)
        if rows is None:
            run.append(info)
            continue
        if run:
            yield run, None
            run = []
        yield [info], rows
    if run:
        yield run, None


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def _row_numel(info: TensorInfo) -> int:
    return _numel(info.shape[1:])


def tensor_nbytes(info: TensorInfo) -> int:
    """Bytes of one tensor in the base's dtype."""
    return _numel(info.shape) * torch.empty((), dtype=info.dtype).element_size()
