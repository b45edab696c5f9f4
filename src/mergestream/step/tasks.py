"""What a step's tasks are and do: a step spread over many processes, one task at a time.

A distributed backend (`backends.DistributedBackend`) runs a step as tasks on an executor
(`ray_backend.RayBackend`, or `SerialExecutor` in this process); this module says what a task
is, how a step is cut into tasks, and what a task does, without importing any cluster library:

- The driver plans from file headers only (`plan_tasks`): every floating-point tensor of the
  base goes to exactly one task; the costliest tensors (row-streamed ones, the largest projected
  weights) get a task of their own and come first, small ones share a task.
- A task carries paths and tensor names (`StepJob`, `TaskSpec`), never tensor data. The process
  running it opens the base, the checkpoint and the previous generation itself (a filesystem
  shared by every machine), folds its tensors with the local engine's own code
  (`engine.fold_tensors`, with the driver's thread counts and row blocks, passed as values),
  writes its share of the new generation as part files of its own (`storage.PartWriter`:
  temporary name, fsync, rename) and returns each tensor's partial sums and the parts'
  checksums (`TaskResult`).

`StepRequest`, what `MergeState.add` asks of any backend (this process's included), is here too:
the one vocabulary every backend and its tasks share.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import StateError
from ..io.lora import LoraAdapter
from ..io.mapping import NameMapping, apply_mapping
from ..io.open import open_checkpoint
from ..io.source import TensorSource
from ..methods import ContinualMethod, TensorInfo, get_method
from ..methods.base import STATE_DTYPES, Scalars
from ..methods.lowrank import ThinSVD
from ..progress import Progress
from ..store.generation import GenerationReader
from ..store.hashing import header_fingerprint
from ..store.manifest import (
    DENSE,
    DENSE_FORM,
    FACTORED,
    TensorForm,
    forms_record,
    generation_dir_name,
    read_forms,
)
from ..store.storage import DiskStorage, PartWriter, Storage
from .engine import (
    FactorReader,
    StateReader,
    StateRowReader,
    Streaming,
    fold_tensors,
    is_streamed,
    tensor_infos,
    tensor_nbytes,
)

# The plan aims at this many tasks per slot (a slot runs one task at a time), so that slots
# that finish early pick up more work instead of idling behind a straggler.
TASKS_PER_SLOT = 4

# A test hook for fault injection: when this names a directory, each task writes a file
# "<part>.<pid>" there after folding its first tensor and waits until a file "go" appears.
PAUSE_DIR_ENV = "MERGESTREAM_TASK_PAUSE_DIR"


@dataclass
class StepRequest:
    """One step, as `MergeState.add` asks any backend to run it: fold `checkpoint` (in the base's
    names, checked against it) into the state's generation `generation`, reading the previous
    one through `read_state` / `read_state_rows`. A backend writes the new generation into
    `storage` and returns the step's statistics and the parts it wrote (`Backend.run`); the
    caller commits them."""

    method: ContinualMethod
    step: int
    scalars: Scalars
    infos: list[TensorInfo]
    base: TensorSource
    checkpoint: TensorSource
    storage: Storage
    generation: int
    previous_generation: int | None
    previous_parts: list[dict[str, Any]] | None
    read_state: StateReader
    read_state_rows: StateRowReader
    base_path: str  # as the manifest records it: the tasks of a distributed step open it again
    checkpoint_path: str  # the checkpoint's resolved path (or description, for one in memory)
    mapping: NameMapping
    device: torch.device | str = "cpu"
    workers: int | None = None
    progress: Progress | None = None
    allow_zero: bool = False
    # The new generation's planned forms (`forms.plan_forms`; absent: dense), and the previous
    # generation's factored states (None where zero) for the tensors planned factored.
    forms: dict[str, TensorForm] | None = None
    read_factors: FactorReader | None = None
    previous_forms: dict[str, TensorForm] | None = None


@dataclass(frozen=True)
class StepJob:
    """Everything a task needs besides its tensor names: paths and small metadata only."""

    state_path: str
    generation: int  # the generation being written
    previous_generation: int | None
    previous_parts: list[dict[str, Any]] | None
    method: str
    params: dict[str, Any]
    state_dtype: str
    step: int
    step_scalars: Scalars
    base_path: str
    checkpoint_path: str
    mapping: NameMapping
    device: str
    attempt: str  # distinguishes the part files of this run of the step from any other
    # Kernel threads as a local step on the driver would use them: `threads` for a tensor
    # streamed by row blocks, and one thread for whole tensors when `workers` > 1. MKL's float64
    # reductions (norms, products) round differently with another thread count, so tasks that
    # used their own would not give the local engine's bits. `task_cpus` whole tensors are
    # folded at once in a task (when they run single-threaded; that does not change the bits).
    threads: int = 1
    workers: int = 1
    task_cpus: int = 1
    # Fingerprints of the files' headers as the driver sees them (`hashing.header_fingerprint`):
    # a node that sees other files at the same paths is refused instead of merging them.
    base_headers: str | None = None
    checkpoint_headers: str | None = None
    # The engine's streaming sizes as the driver planned with them, so that every process cuts
    # tensors into the same row blocks (None: the sizes of the process running the task).
    streaming: Streaming | None = None
    # The forms of the previous generation and those planned for the new one, as the manifest
    # records them (`manifest.forms_record`): every task folds each tensor in the driver's form.
    previous_forms: dict[str, dict[str, Any]] | None = None
    forms: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class TaskSpec:
    part: str  # names the task's part files: "<state>.<part>.safetensors"
    names: tuple[str, ...]  # tensors of the base, in storage order
    cost: float  # estimated work, for ordering and reports


@dataclass
class TaskResult:
    part: str
    partials: list[tuple[str, Scalars]]  # per tensor, in the task's order
    parts: list[dict[str, Any]]  # manifest records of the files written
    seconds: float
    host: str = ""
    pid: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class Executor(Protocol):
    """Runs the tasks of one step somewhere and returns their results (any order)."""

    def slots(self, device: str) -> int:
        """How many tasks can run at once."""
        ...

    def run(self, job: StepJob, tasks: Sequence[TaskSpec]) -> Iterator[TaskResult]:
        """Run every task; yield each result as it completes. Raise if a task fails for good."""
        ...


class SerialExecutor:
    """Runs the tasks one after another in this process (the plumbing without a cluster)."""

    def slots(self, device: str) -> int:
        return 1

    def run(self, job: StepJob, tasks: Sequence[TaskSpec]) -> Iterator[TaskResult]:
        for task in tasks:
            yield run_task(job, task)


# ------------------------------------------------------------------------------------ plan


def tensor_cost(info: TensorInfo, form: TensorForm = DENSE_FORM) -> float:
    """Relative work of folding one tensor: a projected matrix costs a decomposition,
    m·n·min(m, n); a factored one products of its factors, (m + n)·w²; a zero one nothing;
    anything else is elementwise, its number of entries."""
    if form.kind == FACTORED:
        return float(sum(info.shape) * max(1, form.width) ** 2)
    if form.kind != DENSE:
        return 1.0
    numel = float(torch.Size(info.shape).numel())
    if info.projected and len(info.shape) == 2:
        return numel * min(info.shape)
    return numel


def plan_tasks(
    infos: Sequence[TensorInfo],
    method: ContinualMethod,
    slots: int,
    forms: dict[str, TensorForm] | None = None,
) -> list[TaskSpec]:
    """Tasks covering every tensor once, costliest first.

    A tensor streamed by row blocks, or one costing at least a task's share of the step (the
    total over `TASKS_PER_SLOT` tasks per slot), is a task of its own; the rest are packed, in
    descending cost, into tasks of about that share. The plan depends only on the headers and
    `slots`, never on timing; the result of the step does not depend on the plan at all."""
    forms = forms or {}
    order = {info.name: index for index, info in enumerate(infos)}
    costs = {info.name: tensor_cost(info, forms.get(info.name, DENSE_FORM)) for info in infos}
    total = sum(costs.values())
    share = total / max(1, slots * TASKS_PER_SLOT)
    by_cost = sorted(infos, key=lambda i: (-costs[i.name], order[i.name]))
    groups: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    current_cost = 0.0
    for info in by_cost:
        dense = forms.get(info.name, DENSE_FORM).kind == DENSE
        alone = costs[info.name] >= share or (
            dense and is_streamed(info) and method.streams_rows(info)
        )
        if alone:
            groups.append([info])
            continue
        current.append(info)
        current_cost += costs[info.name]
        if current_cost >= share:
            groups.append(current)
            current, current_cost = [], 0.0
    if current:
        groups.append(current)
    groups.sort(key=lambda g: -sum(costs[i.name] for i in g))
    return [
        TaskSpec(
            part=f"part-{index:05d}",
            names=tuple(i.name for i in sorted(group, key=lambda i: order[i.name])),
            cost=sum(costs[i.name] for i in group),
        )
        for index, group in enumerate(groups)
    ]


# ------------------------------------------------------------------------------------ task


def run_task(job: StepJob, task: TaskSpec) -> TaskResult:
    """Fold the task's tensors into part files of the new generation (in a worker process)."""
    started = time.perf_counter()
    state_dir = Path(job.state_path)
    directory = state_dir / generation_dir_name(job.generation)
    if not directory.is_dir():
        raise StateError(
            f"{directory}: the new generation's directory is not visible on "
            f"{socket.gethostname()}; every machine of the cluster must see the state, the "
            "base and the checkpoint at the same paths (a shared filesystem)"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_task(job, task, directory, started)
    finally:
        torch.set_num_threads(threads)


def _run_task(job: StepJob, task: TaskSpec, directory: Path, started: float) -> TaskResult:
    state_dir = directory.parent
    method = get_method(job.method, **job.params)
    method.state_dtype = STATE_DTYPES[job.state_dtype]
    base = open_checkpoint(Path(job.base_path))
    raw = open_checkpoint(Path(job.checkpoint_path))
    storage = DiskStorage(state_dir)
    try:
        _check_same_files(job, base, raw)
        if isinstance(raw, LoraAdapter):
            # Task vectors from the adapter's factors, as the driver's engine forms them. The
            # driver checked its base name against the state's base (or was told to force it),
            # and the file headers above say this node sees the same files.
            source: TensorSource = raw.bind(base, job.mapping, (), force_base=True)
        else:
            source = apply_mapping(raw, job.mapping, base)
        by_name = {i.name: i for i in tensor_infos(base, method.config.linear_rule())}
        unknown = [n for n in task.names if n not in by_name]
        if unknown:
            raise StateError(
                f"{job.base_path}: task {task.part} names tensor {unknown[0]!r}, which is not a "
                "floating-point tensor of the base here; the machines see different files"
            )
        infos = [by_name[n] for n in task.names]
        read_state, read_state_rows, read_factors = _state_readers(storage, job, method)
        forms = read_forms({"forms": job.forms})
        writer = PartWriter(
            directory,
            f"{job.attempt}.{task.part}",
            method.state_names,
            infos,
            method.state_dtype,
            forms,
        )
        try:
            partials = []
            for info, more in fold_tensors(
                method,
                job.step,
                job.step_scalars,
                infos,
                base,
                source,
                read_state,
                writer.put,
                read_state_rows=read_state_rows,
                write_state_rows=writer.put_rows,
                device=job.device,
                workers=job.task_cpus if job.workers > 1 else 1,
                single_threaded=job.workers > 1 and torch.device(job.device).type == "cpu",
                streaming=job.streaming,  # the driver's row blocks, whatever this process's
                forms=forms,
                read_factors=read_factors,
                write_factors=writer.put_factors,
            ):
                partials.append((info.name, more))
                if len(partials) == 1:
                    _pause_for_tests(task.part)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        parts = writer.parts()
        bytes_read = sum(
            tensor_nbytes(i) + source.spec(i.name).nbytes for i in infos
        ) + _state_bytes(job, infos)
    finally:
        storage.close()
        raw.close()
        base.close()
    return TaskResult(
        part=task.part,
        partials=partials,
        parts=parts,
        seconds=time.perf_counter() - started,
        host=socket.gethostname(),
        pid=os.getpid(),
        bytes_read=bytes_read,
        bytes_written=sum(int(p["bytes"]) for p in parts),
    )


def _check_same_files(job: StepJob, base: TensorSource, checkpoint: TensorSource) -> None:
    for what, path, source, expected in (
        ("base", job.base_path, base, job.base_headers),
        ("checkpoint", job.checkpoint_path, checkpoint, job.checkpoint_headers),
    ):
        if expected is not None and header_fingerprint(source.files()) != expected:
            raise StateError(
                f"{path}: the {what} seen on {socket.gethostname()} differs from the one the "
                "driver planned with (other file headers at the same path); every machine of "
                "the cluster must see the same files"
            )


def _state_readers(storage: DiskStorage, job: StepJob, method: ContinualMethod):  # noqa: ANN202
    """(read_state, read_state_rows, read_factors) over the previous generation ({} and None
    at step 1), each tensor read in its recorded form, as the driver's reader reads it."""
    previous = job.previous_generation
    if previous is not None:
        storage.use_parts(previous, method.state_names, job.previous_parts)
    reader = GenerationReader(
        storage, method, {"generation": previous, "scalars": {}, "forms": job.previous_forms}
    )

    def read_state(info: TensorInfo) -> dict[str, torch.Tensor]:
        return reader.state(info.name, info.shape)

    def read_state_rows(info: TensorInfo, start: int, stop: int) -> dict[str, torch.Tensor]:
        return reader.state_rows(info.name, start, stop, info.shape)

    def read_factors(info: TensorInfo) -> ThinSVD | None:
        return reader.factors(info.name) if reader.form(info.name).kind == FACTORED else None

    return read_state, read_state_rows, read_factors


def job_forms(forms: dict[str, TensorForm] | None) -> dict[str, dict[str, Any]] | None:
    """Forms as a `StepJob` carries them (the manifest's record)."""
    return None if forms is None else forms_record(forms)


def _state_bytes(job: StepJob, infos: list[TensorInfo]) -> int:
    """Bytes of the previous state read for these tensors (0 at the first step)."""
    if job.previous_generation is None:
        return 0
    per_entry = torch.empty((), dtype=STATE_DTYPES[job.state_dtype]).element_size()
    kinds = len(get_method(job.method, **job.params).state_names)
    return kinds * per_entry * sum(torch.Size(i.shape).numel() for i in infos)


def _pause_for_tests(part: str) -> None:
    directory = os.environ.get(PAUSE_DIR_ENV)
    if not directory:
        return
    Path(directory, f"{part}.{os.getpid()}").touch()
    while not Path(directory, "go").exists():
        time.sleep(0.05)
