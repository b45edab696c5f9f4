"""What an `add` would do, worked out from file headers alone (`mergestream plan`, `add --dry-run`).

The plan validates the checkpoint against the base (names, shapes, dtypes, name mapping), counts
tensors by what the method will do with them, and estimates peak memory and disk use. It reads no
tensor data, hashes nothing and writes nothing.

Memory estimate: the process as it is now (interpreter, torch, open headers) plus the largest
working set of the step. Tensors below the engine's streaming limit are merged whole, several
consecutive ones at once (one per worker plus one read ahead), each holding its float64 task
vector and its state (as read, in float64, and the new one) and, for a projected weight, a few
k x k matrices (k the smaller side) and one row block. Larger tensors are streamed alone by row
blocks: a few blocks of about `engine.ROW_BLOCK_ELEMENTS` entries, plus the n x n matrices of a
projected weight. The constants were checked against `benchmarks/memory_llama.py`.

The plan also says in which form the step will leave each tensor (`forms.py`: factored with its
rank bound, zero, or dense) and what that costs: the new generation's bytes from the forms, and
the step's compute from the ranks with OPCM's cost model (`lowrank.opcm_step_cost`, which the
other factored methods follow closely: the same splits and core SVDs), turned into seconds at
the float64 rate measured here on a small product. Reading and writing files come on top.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..io.lora import LoraSource
from ..io.mapping import MappedSource
from ..io.safetensors_stream import dtype_name
from ..io.source import TensorSource
from ..methods.base import ContinualMethod, TensorInfo
from ..methods.lowrank import opcm_step_cost
from ..progress import format_size
from ..store.generation import StateView
from ..store.ledger import tensor_roles
from ..store.manifest import DENSE, FACTORED, ZERO, TensorForm
from . import engine
from .forms import form_counts, incoming, plan_forms, previous_forms

# n x n float64 matrices alive while a weight is projected (Gram, Sᵀτ, eigenvectors, the
# solver's workspace, the removal matrix)
GRAM_BUFFERS = 6
EXPORT_BUFFERS = (2, 1)  # the state read, in float64, and the task vector


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Plan:
    checkpoint: str
    step: int
    tensors: dict[str, int]  # projected / added / copied (from the base)
    incoming_dtypes: dict[str, int]
    mapping: dict[str, Any]
    taken_from_base: int
    ignored: int
    checkpoint_bytes: int
    largest_tensor: str
    peak_memory_bytes: int
    runtime_bytes: int
    state_generation_bytes: int
    disk_needed_bytes: int
    disk_free_bytes: int | None
    export_bytes: int
    export_peak_memory_bytes: int
    warnings: list[str] = field(default_factory=list)
    # A LoRA adapter: its ranks and options, and base tensor -> how the adapter changes it.
    adapter: dict[str, Any] = field(default_factory=dict)
    # The forms after the step: how many tensors have each, and per matrix (2-D tensor) its
    # form and rank bound now and after ("factored 4 -> 8", "zero", "dense", ...).
    forms: dict[str, int] = field(default_factory=dict)
    matrices: dict[str, str] = field(default_factory=dict)
    factored_method: bool = True  # whether the method can keep factors at all
    state_bytes: int = 0  # the current generation's files
    step_flops: float = 0.0  # the cost model's operations for the step
    step_seconds: float = 0.0  # at `flops_per_second`, measured here
    flops_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def working_set(info: TensorInfo, state_size: int, first_step: bool) -> int:
    """Bytes alive at once while one tensor is merged whole (see the module docstring)."""
    n = math.prod(info.shape)
    total = 8 * n  # the float64 task vector
    if state_size != 8:
        total += state_size * n  # the new state, a rounded copy
    if not first_step:
        total += state_size * n + (8 * n if state_size != 8 else 0)  # the old state, in float64
        if info.projected and len(info.shape) == 2:
            total += GRAM_BUFFERS * 8 * min(info.shape) ** 2
            total += 8 * min(n, 8 << 20)  # one row block of S·Z
    return total


def stored_bytes(info: TensorInfo, form: TensorForm, state_size: int) -> int:
    """Bytes of one tensor's state in a generation: dense in the state's precision, factored
    as U, σ, V of its width in float64, zero as nothing."""
    if form.kind == FACTORED:
        return 8 * (sum(info.shape) * form.width + form.width)
    if form.kind == ZERO:
        return 0
    return math.prod(info.shape) * state_size


def factored_working_set(info: TensorInfo, form: TensorForm) -> int:
    """Bytes alive while a factored tensor is folded: a few copies of its bases and the core."""
    return 8 * (4 * sum(info.shape) * form.width + 4 * form.width**2)


def step_flops(
    info: TensorInfo,
    before: TensorForm,
    after: TensorForm,
    rank_in: int,
    method: ContinualMethod,
    first_step: bool,
) -> float:
    """Operations of one tensor's fold (`lowrank.opcm_step_cost` for matrices, a few per entry
    for elementwise rules and for a first step, which only stores the task vector)."""
    numel = math.prod(info.shape)
    if after.kind == ZERO:
        return 0.0
    if len(info.shape) != 2 or (first_step and after.kind == DENSE):
        return 10.0 * numel
    m, n = info.shape
    if after.kind == FACTORED:
        k = before.rank if before.kind == FACTORED else 0
        return opcm_step_cost(m, n, k, max(after.width - k, 0)).factored_flops
    if info.projected or method.factored:  # a decomposition of the dense matrix
        return opcm_step_cost(m, n, min(m, n), rank_in).dense_flops
    return 10.0 * numel


def measured_flops_per_second() -> float:
    """The float64 rate of this process's matrix products, from a few small ones."""
    a = torch.randn(384, 384, dtype=torch.float64)
    a @ a  # warm
    started = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 384**3 / max(time.perf_counter() - started, 1e-9)


def _first_block(info: TensorInfo) -> TensorInfo:
    """The largest row block the engine cuts a streamed tensor into (its first)."""
    start, stop = engine.row_blocks(info.shape)[0]
    return info.rows(start, stop)


def streamed_working_set(info: TensorInfo, state_size: int, first_step: bool) -> int:
    """Bytes alive at once while one tensor is streamed by row blocks."""
    block = _first_block(info)
    # A block held as a whole tensor (no projection), twice: a block being read while the
    # previous one's buffers are still being freed.
    total = 2 * working_set(dataclasses.replace(block, projected=False), state_size, first_step)
    if info.projected and len(info.shape) == 2 and not first_step:
        rows_z = 8 * math.prod(block.shape)  # a block of S·Z
        total += rows_z + GRAM_BUFFERS * 8 * info.shape[1] ** 2  # and the n x n matrices
    return total


def export_working_set(info: TensorInfo, state_size: int) -> int:
    """Bytes alive at once while export computes one tensor (a row block of a large one)."""
    f64, states = EXPORT_BUFFERS
    n = math.prod(_first_block(info).shape if engine.is_streamed(info) else info.shape)
    return n * (8 * f64 + state_size * states)


def plan_add(
    view: StateView,
    method: ContinualMethod,
    source: TensorSource,
    checkpoint_path: str,
    workers: int,
) -> Plan:
    """The plan for merging `source` (already mapped and checked against the base) into the
    state `view` holds still, with `method` on `workers` threads."""
    step, base, infos, ledger = view.step, view.base, view.infos, view.ledger
    counts = tensor_roles(base, infos)
    dtypes: dict[str, int] = {}
    for info in infos:
        name = dtype_name(source.spec(info.name).dtype)
        dtypes[name] = dtypes.get(name, 0) + 1
    state_size = method.state_dtype.itemsize * len(method.state_names)
    before = previous_forms(view.manifest, infos)
    after = plan_forms(method, infos, before, source)
    peak_tensor, peak, export_peak = "", 0, 0
    generation_bytes = 0
    flops = 0.0
    matrices = {}
    # Whole tensors between two streamed ones run `workers` at a time with one more read
    # ahead: the peak of such a run is its largest sum over that many consecutive tensors.
    window: list[tuple[int, str]] = []
    for info in infos:
        form = after[info.name]
        generation_bytes += stored_bytes(info, form, state_size)
        came = incoming(source, info.name)
        flops += step_flops(info, before[info.name], form, came.rank, method, step == 0)
        if len(info.shape) == 2:
            matrices[info.name] = _form_change(before[info.name], form)
        export_peak = max(export_peak, export_working_set(info, state_size))
        if form.kind != DENSE:
            need = factored_working_set(info, form) if form.kind == FACTORED else 0
            window = [*window, (need, info.name)][-(workers + 1) :]
            need, name = sum(n for n, _ in window), max(window)[1]
        elif engine.is_streamed(info) and method.streams_rows(info):
            window = []  # the engine finishes the run before it streams a tensor
            need, name = streamed_working_set(info, state_size, first_step=step == 0), info.name
        else:
            window = [*window, (working_set(info, state_size, first_step=step == 0), info.name)]
            window = window[-(workers + 1) :]
            need, name = sum(n for n, _ in window), max(window)[1]
        if need > peak:
            peak_tensor, peak = name, need
    runtime = current_rss()
    # While the step runs, the previous generation and the new one are both on disk.
    disk_needed = generation_bytes
    state_path = view.state_dir
    disk_free = shutil.disk_usage(state_path).free if state_path is not None else None
    warnings = []
    if disk_free is not None and disk_free < disk_needed:
        warnings.append(
            f"the state's file system has {format_size(disk_free)} free, the new generation needs "
            f"{format_size(disk_needed)}"
        )
    files = source.files()
    size = sum(p.stat().st_size for p in files)
    for entry in ledger:
        if files and entry.get("path") == checkpoint_path and entry.get("size") == size:
            warnings.append(
                f"a checkpoint at this path with the same size was merged at step "
                f"{entry['step']}; add refuses it if its content hash matches "
                "(pass --allow-duplicate to merge it again)"
            )
    mapped = source if isinstance(source, MappedSource) else None
    rate = measured_flops_per_second() * max(1, workers)
    return Plan(
        checkpoint=checkpoint_path,
        step=step + 1,
        tensors=counts,
        incoming_dtypes=dtypes,
        mapping=mapped.mapping.to_dict() if mapped else {},
        taken_from_base=len(mapped.filled) if mapped else 0,
        ignored=len(mapped.ignored) if mapped else 0,
        checkpoint_bytes=size,
        largest_tensor=peak_tensor,
        peak_memory_bytes=runtime + peak,
        runtime_bytes=runtime,
        state_generation_bytes=generation_bytes,
        disk_needed_bytes=disk_needed,
        disk_free_bytes=disk_free,
        export_bytes=sum(base.spec(n).nbytes for n in base.names()),
        export_peak_memory_bytes=runtime + export_peak,
        warnings=warnings,
        adapter=_adapter_plan(source),
        forms=form_counts(after),
        matrices=matrices,
        factored_method=method.factored,
        state_bytes=_current_bytes(view.manifest),
        step_flops=flops,
        step_seconds=flops / rate,
        flops_per_second=rate,
    )


def _form_change(before: TensorForm, after: TensorForm) -> str:
    """ "factored 4 -> 8" (rank now and bound after), "zero", "dense", "factored -> dense"."""

    def name(form: TensorForm, bound: bool) -> str:
        if form.kind != FACTORED:
            return form.kind
        return f"factored {'<= ' if bound else ''}{form.rank}"

    now, then = name(before, False), name(after, True)
    if before.kind == after.kind == ZERO or before.kind == after.kind == DENSE:
        return after.kind
    return f"{now} -> {then}"


def _current_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the current generation's files, as the manifest records them."""
    return sum(int(p.get("bytes", 0)) for p in manifest.get("parts") or [])


def _adapter_plan(source: TensorSource) -> dict[str, Any]:
    if not isinstance(source, LoraSource):
        return {}
    return {**source.summary(), "touched": source.touched()}


def format_plan(plan: Plan) -> str:
    t = plan.tensors
    lines = [
        f"plan: merge {plan.checkpoint} as step {plan.step} (nothing is written)",
        f"  tensors:  {t['projected']} projected, {t['added']} added, "
        f"{t['copied']} copied from the base",
        "  incoming: "
        + ", ".join(f"{n} {dtype}" for dtype, n in sorted(plan.incoming_dtypes.items()))
        + f" ({format_size(plan.checkpoint_bytes)} on disk)",
    ]
    if plan.mapping:
        lines.append(
            "  mapping:  "
            + ", ".join(f"{k}={v}" for k, v in plan.mapping.items())
            + f" ({plan.taken_from_base} tensors taken from the base, {plan.ignored} ignored)"
        )
    size = format_size
    free = plan.disk_free_bytes
    lines += [
        f"  memory:   about {size(plan.peak_memory_bytes)} at peak "
        f"({size(plan.runtime_bytes)} runtime + the working set of {plan.largest_tensor!r})",
        f"  disk:     {size(plan.disk_needed_bytes)} for the new state generation"
        + (f" ({size(free)} free)" if free is not None else "")
        + f"; an export takes {size(plan.export_bytes)}",
        f"  export:   about {size(plan.export_peak_memory_bytes)} of memory at peak",
    ]
    lines += _format_forms(plan)
    lines += _format_adapter(plan.adapter, sum(plan.tensors[k] for k in ("projected", "added")))
    lines += [f"  warning:  {w}" for w in plan.warnings]
    return "\n".join(lines)


def _format_forms(plan: Plan) -> list[str]:
    """The lines of a plan that say how the state keeps each tensor after the step."""
    f = plan.forms
    size = format_size
    lines = [
        f"  forms:    after the step {f.get(FACTORED, 0)} factored, {f.get(ZERO, 0)} zero, "
        f"{f.get(DENSE, 0)} dense tensors; the state now takes {size(plan.state_bytes)}"
        + ("" if plan.factored_method else " (this method keeps every tensor dense)"),
        f"  compute:  about {plan.step_seconds:.3g}s ({plan.step_flops:.3g} float64 operations "
        f"at {plan.flops_per_second / 1e9:.3g} GFLOP/s measured here; reading and writing "
        "files come on top)",
    ]
    lines += [f"    {how:22s} {name}" for name, how in plan.matrices.items()]
    return lines


def _format_adapter(adapter: dict[str, Any], merged_tensors: int) -> list[str]:
    """The lines of a plan that say which base tensors a LoRA adapter changes."""
    if not adapter:
        return []
    touched: dict[str, str] = adapter["touched"]
    scaling = f"alpha {adapter['lora_alpha']:g}" + (", rsLoRA" if adapter["use_rslora"] else "")
    lines = [
        f"  adapter:  LoRA rank {'/'.join(str(r) for r in adapter['ranks']) or '-'} ({scaling}) "
        f"changes {len(touched)} of the base's {merged_tensors} merged tensors; the others get "
        "a zero task vector"
    ]
    lines += [f"    {how:22s} {name}" for name, how in touched.items()]
    return lines
