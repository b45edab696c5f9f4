"""A step in this process: the engine folds every tensor and writes the new generation."""

from __future__ import annotations

from typing import Any

from .engine import StepStats, run_step
from .tasks import StepRequest


class LocalBackend:
    """Runs a step with this process's engine (`engine.run_step`), on `request.device` with
    `request.workers` threads: the default backend, and the only one that merges LoRA
    adapters (from their factors) and states or checkpoints held in memory."""

    local = True

    def run(self, request: StepRequest) -> tuple[StepStats, list[dict[str, Any]]]:
        """The step into a new generation of `request.storage` (removed on failure); returns
        the step's statistics and the generation's parts for the manifest."""
        method = request.method
        writer = request.storage.begin(
            request.generation,
            method.state_names,
            request.infos,
            method.state_dtype,
            request.forms,
        )
        try:
            stats = run_step(
                method,
                request.step,
                request.scalars,
                request.infos,
                request.base,
                request.checkpoint,
                request.read_state,
                writer.put,
                read_state_rows=request.read_state_rows,
                write_state_rows=writer.put_rows,
                device=request.device,
                workers=request.workers,
                progress=request.progress,
                allow_zero=request.allow_zero,
                forms=request.forms,
                read_factors=request.read_factors,
                write_factors=writer.put_factors,
            )
            writer.close()
            return stats, writer.parts()
        except BaseException:
            writer.abort()
            raise
