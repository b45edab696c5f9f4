"""Run a merge step's tasks on a Ray cluster (`pip install mergestream[ray]`).

    state.add("finetuned/", backend="ray")                       # the cluster Ray finds
    state.add("finetuned/", backend=RayBackend(address="10.0.0.1:6379", cpus_per_task=4))

What a task does is `tasks.py`, how the driver reduces the results `backends.py`; this module only
submits tasks and collects results. Tasks carry paths and tensor names: every node must see the
state directory, the base and the checkpoint at the same paths (a shared filesystem), and have
mergestream installed. Ray retries a task whose worker process died (`max_retries`); a task that
fails for good fails the step, cancels the others, and leaves the state at its previous step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ConfigError, MergestreamError
from .tasks import StepJob, TaskResult, TaskSpec, run_task

try:
    import ray
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ConfigError(
        "--backend ray needs Ray: pip install 'mergestream[ray]' (on every node of the cluster)"
    ) from err


def _task(job: StepJob, task: TaskSpec) -> TaskResult:
    return run_task(job, task)


_remote_task = ray.remote(_task)


class RayBackend:
    """Submits a step's tasks to Ray: costliest first, `cpus_per_task` CPUs each (and one GPU
    each for a CUDA device), retried up to `max_retries` times when their process dies.

    `address`: "auto", "HOST:PORT" or a "ray://" address; None uses the Ray of this process if
    it is already initialised, else what `ray.init()` finds (RAY_ADDRESS, a cluster started on
    this machine, or a new local one). Extra `init_options` go to `ray.init`, extra
    `task_options` to each task's `.options` (a `runtime_env`, a `scheduling_strategy`...)."""

    def __init__(
        self,
        address: str | None = None,
        cpus_per_task: float = 1,
        max_retries: int = 3,
        init_options: dict[str, Any] | None = None,
        task_options: dict[str, Any] | None = None,
    ) -> None:
        if cpus_per_task <= 0:
            raise ConfigError(f"--ray-cpus-per-task must be positive, got {cpus_per_task}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be at least 0, got {max_retries}")
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.max_retries = max_retries
        self.init_options = dict(init_options or {})
        self.task_options = dict(task_options or {})

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, **self.init_options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = self.address or "the default Ray cluster"
            raise MergestreamError(f"cannot connect to Ray at {where}: {err}") from None

    def slots(self, device: str) -> int:
        self._connect()
        resources = ray.cluster_resources()
        if device.startswith("cuda"):
            gpus = int(resources.get("GPU", 0))
            if gpus < 1:
                raise ConfigError("--device cuda with --backend ray: the cluster has no GPUs")
            return gpus
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_task))

    def run(self, job: StepJob, tasks: Sequence[TaskSpec]) -> Iterator[TaskResult]:
        self._connect()
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_task,
            "max_retries": self.max_retries,
            "retry_exceptions": False,  # a task's own error (bad input) is final, not retried
        }
        if job.device.startswith("cuda"):
            options["num_gpus"] = 1
        options.update(self.task_options)
        job_ref = ray.put(job)
        # Submitted costliest first: Ray starts tasks in submission order as slots free up.
        pending = {_remote_task.options(**options).remote(job_ref, t): t for t in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, MergestreamError):  # a clear message already
                            raise cause from None
                        raise MergestreamError(
                            f"task {task.part} of step {job.step} ({len(task.names)} tensors, "
                            f"first {task.names[0]!r}) failed: {err}"
                        ) from None
                    except ray.exceptions.RayError as err:
                        raise MergestreamError(
                            f"task {task.part} of step {job.step} ({len(task.names)} tensors, "
                            f"first {task.names[0]!r}) failed after {self.max_retries} retries: "
                            f"{type(err).__name__}: {err}"
                        ) from None
        finally:
            if pending:  # a failure: stop the others before their generation is removed
                for ref in pending:
                    ray.cancel(ref, force=True)
                ray.wait(list(pending), num_returns=len(pending), timeout=30)
