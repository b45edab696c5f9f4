"""Where a step runs, behind one `run(request) -> (stats, parts)` for every backend.

`MergeState.add` builds a `tasks.StepRequest` and hands it to the backend `choose_backend`
picks: this process's engine (`local.LocalBackend`), or a step spread over tasks
(`DistributedBackend`), run by an executor (`ray_backend.RayBackend` on a cluster,
`tasks.SerialExecutor` in this process). Either returns the step's statistics and the new
generation's parts; the caller commits them, as it does for any step.

The distributed driver adds the tasks' partial sums up in storage order
(`engine.finish_step_scalars`), whatever order the tasks finished in, so the step's scalars, and
every stored tensor, are the same bits as the local engine's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import ConfigError, MergestreamError
from ..methods.base import STATE_DTYPES, Scalars, TensorInfo
from ..progress import NoProgress, Progress
from ..store.hashing import header_fingerprint
from ..store.storage import DiskStorage
from .engine import (
    StepStats,
    current_streaming,
    finish_step_scalars,
    prepare_step_scalars,
    take_ranks,
    tensor_nbytes,
)
from .local import LocalBackend
from .runtime import default_workers
from .tasks import Executor, StepJob, StepRequest, TaskResult, TaskSpec, job_forms, plan_tasks


class Backend(Protocol):
    """Runs one step (see the module docstring). `local`: whether it runs in this process
    (which alone reaches states and checkpoints held in memory, and LoRA adapters)."""

    local: bool

    def run(self, request: StepRequest) -> tuple[StepStats, list[dict[str, Any]]]: ...


class DistributedBackend:
    """A step's tensors folded by an executor's tasks (`tasks.py`), reduced here."""

    local = False

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def run(self, request: StepRequest) -> tuple[StepStats, list[dict[str, Any]]]:
        """The step with its tensors folded by the executor's tasks; returns the step's statistics
        and the generation's parts for the manifest (the caller commits). On any failure the new
        generation's directory is removed and the state stays at its previous step.

        A method's preparation passes (TIES's whole-model top-k) run here, in the driver, reading
        one tensor or one row block at a time: their memory is bounded by constants, not by the
        model, and they read the model once or a few times more.

        Tasks run their kernels with this process's thread counts (`StepJob.threads`, `workers`
        as in `run_step`): that is what makes their results the local engine's bits.
        """
        started = time.perf_counter()
        method, step, infos = request.method, request.step, request.infos
        storage, executor = request.storage, self.executor
        assert isinstance(storage, DiskStorage)  # checked by `choose_backend`
        device = str(request.device)
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ConfigError(f"device {device!r}: {err}") from None
        step_scalars = prepare_step_scalars(
            method,
            step,
            request.scalars,
            infos,
            request.base,
            request.checkpoint,
            request.read_state,
            read_state_rows=request.read_state_rows,
            device="cpu",
        )
        job = StepJob(
            state_path=str(Path(storage.path).resolve()),
            generation=request.generation,
            previous_generation=request.previous_generation,
            previous_parts=request.previous_parts,
            method=method.name,
            params=method.config.to_dict(),
            state_dtype=next(k for k, v in STATE_DTYPES.items() if v == method.state_dtype),
            step=step,
            step_scalars=step_scalars,
            base_path=request.base_path,
            checkpoint_path=request.checkpoint_path,
            mapping=request.mapping,
            device=device,
            attempt=os.urandom(4).hex(),
            threads=torch.get_num_threads(),
            workers=request.workers or default_workers(torch.device(device)),
            task_cpus=max(1, int(getattr(executor, "cpus_per_task", 1))),
            base_headers=header_fingerprint(request.base.files()),
            checkpoint_headers=header_fingerprint(request.checkpoint.files()),
            streaming=current_streaming(),
            previous_forms=job_forms(request.previous_forms),
            forms=job_forms(request.forms),
        )
        tasks = plan_tasks(infos, method, executor.slots(device), request.forms)
        progress = request.progress or NoProgress()
        directory = storage.begin_parts(request.generation)
        try:
            progress.start(f"step {step}", len(infos), sum(tensor_nbytes(i) for i in infos))
            try:
                results = list(_collect(executor.run(job, tasks), infos, progress))
            finally:
                progress.finish()
            by_name = _partials_by_name(results, infos, tasks)
            ranks = take_ranks(list(by_name.items()))
            new_scalars = finish_step_scalars(
                method,
                request.checkpoint,
                step,
                request.scalars,
                [by_name[i.name] for i in infos],
                allow_zero=request.allow_zero,
            )
            parts = sorted((p for r in results for p in r.parts), key=lambda p: p["file"])
            _remove_strays(directory, parts)
            storage.seal_parts(directory)
        except BaseException:
            storage.discard_parts(directory)
            raise
        stats = StepStats(
            step=step,
            scalars=new_scalars,
            seconds=time.perf_counter() - started,
            tensors=len(infos),
            projected=sum(i.projected for i in infos),
            ranks=ranks,
        )
        return stats, parts


def _collect(
    results: Iterable[TaskResult], infos: list[TensorInfo], progress: Progress
) -> Iterator[TaskResult]:
    by_name = {i.name: i for i in infos}
    for result in results:
        done = [by_name[name] for name, _ in result.partials if name in by_name]
        progress.advance(len(done), sum(tensor_nbytes(i) for i in done))
        yield result


def _partials_by_name(
    results: list[TaskResult], infos: list[TensorInfo], tasks: Sequence[TaskSpec]
) -> dict[str, Scalars]:
    """Each tensor's partial sums; refuses results that miss or repeat a tensor."""
    by_name: dict[str, Scalars] = {}
    for result in results:
        for name, partials in result.partials:
            if name in by_name:
                raise MergestreamError(f"tensor {name!r} was folded by two tasks of the step")
            by_name[name] = partials
    missing = [i.name for i in infos if i.name not in by_name]
    if missing or len(results) != len(tasks):
        raise MergestreamError(
            f"the step's tasks returned {len(results)} of {len(tasks)} results"
            + (f"; tensor {missing[0]!r} was not folded" if missing else "")
        )
    return by_name


def _remove_strays(directory: Path, parts: list[dict[str, Any]]) -> None:
    """Remove files of the new generation that no part names: the temporary files of task
    attempts whose process died (their task ran again and wrote its own)."""
    named = {Path(p["file"]).name for p in parts}
    for item in directory.iterdir():
        if item.name not in named:
            item.unlink()


def choose_backend(backend: object, *, state_on_disk: bool, checkpoint_is_path: bool) -> Backend:
    """The backend of `add(backend=...)`: this process's engine for None or "local", else the
    executor's (see `resolve_executor`). Refuses what a cluster cannot reach: a state or a
    checkpoint that lives in memory."""
    if backend is None or backend == "local":
        return LocalBackend()
    if not state_on_disk:
        raise ConfigError(
            f"backend {backend!r} needs a state on disk (its tasks write the new generation "
            "into the state directory); this state lives in memory"
        )
    if not checkpoint_is_path:
        raise ConfigError(
            f"backend {backend!r} needs the checkpoint as a path that every node can read; "
            "an in-memory state dict cannot be sent to its tasks"
        )
    return DistributedBackend(resolve_executor(backend))


def resolve_executor(backend: object, **options: Any) -> Executor:
    """An executor from `add(backend=...)`: an executor object, or "ray" (options go to
    `RayBackend`, which imports Ray); "local" or None mean this process's engine and never get
    here. The one place that knows the backends by name."""
    if backend == "ray":
        from .ray_backend import RayBackend  # Ray is imported only when asked for

        return RayBackend(**options)
    if isinstance(backend, str):
        raise MergestreamError(f"unknown backend {backend!r}; available: local, ray")
    if options:
        raise TypeError("backend options go with backend='ray', not with a backend object")
    if not (hasattr(backend, "run") and hasattr(backend, "slots")):
        raise TypeError(f"backend must be 'local', 'ray' or an executor, got {backend!r}")
    return backend  # type: ignore[return-value]
