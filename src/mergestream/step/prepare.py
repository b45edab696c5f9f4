"""Prepared generations: the next step's expensive part, computed before its checkpoint lands.

Most of an OPCM step is spent decomposing each projected weight's running sum S, which is known
as soon as the previous step is committed. `MergeState.prepare` computes those decompositions
(the method's `prepare_tensor`) in idle time and stores them with the current generation, so a
step that finds them only projects with matrix products.

Stored beside the generation's own files, as part files of their own
(`gen-000007/prepared-v.safetensors`, one per prepared quantity), and recorded in the manifest:

    "prepared": {"generation": 7, "key": "<sha256>", "regime": {...}, "parts": [...]}

The key covers everything the factors depend on: the generation's part records (their
checksums), the method and its parameters, the state's precision, and the regime the kernels
run in (device, and whether they run single-threaded: a multi-threaded LAPACK call may round
differently). A step uses the factors only when the key equals the one it computes for itself;
otherwise (a stale record, another device or worker count) it decomposes as usual. Factors that
fail their checksums on read are not trusted either: the step recomputes them. A step with
prepared factors gives the same bits as one without; tests check it with `torch.equal`.

Tensors kept as factors (`forms.py`) are not prepared: their state already is the thin SVD
U·diag(σ)·Vᵀ a step starts from, so a factored step has nothing to decompose ahead of time.
Zero tensors have nothing to decompose either.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import StateError
from ..io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from ..methods.base import COMPUTE_DTYPE, PREPARED_PREFIX, ContinualMethod, TensorInfo
from ..progress import NoProgress, Progress
from ..store.atomic import fsync_dir
from ..store.manifest import (
    DENSE,
    DENSE_FORM,
    TensorForm,
    check_parts,
    generation_dir_name,
    read_forms,
)
from ..store.storage import DamagedPart, DiskStorage, Storage, writing
from .engine import is_streamed
from .runtime import default_workers, ordered_map, resolve_device, single_threaded_kernels

PREPARED_FILE = "prepared-{}.safetensors"


class DamagedPreparationWarning(UserWarning):
    """A step found its preparation damaged and computed the factors itself instead."""


def kernel_regime(device: torch.device | str, workers: int | None) -> dict[str, Any]:
    """How the step's kernels will run (see the module docstring): the engine runs whole
    tensors single-threaded when several workers share the CPU."""
    resolved = resolve_device(device)
    count = default_workers(resolved) if workers is None else workers
    single = count > 1 and resolved.type == "cpu"
    return {
        "device": resolved.type,
        "single_threaded": single,
        "threads": 1 if single else torch.get_num_threads(),
    }


def prepare_key(manifest: Mapping[str, Any], regime: Mapping[str, Any]) -> str:
    """What prepared factors of the manifest's current generation depend on, hashed."""
    basis = {
        "generation": manifest["generation"],
        "parts": manifest.get("parts"),
        "method": manifest["method"],
        "state_dtype": manifest["state_dtype"],
        "regime": dict(regime),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def usable_parts(manifest: Mapping[str, Any], regime: Mapping[str, Any]) -> list[dict] | None:
    """The prepared parts a step in `regime` may use, or None (none, or stale)."""
    prepared = manifest.get("prepared")
    if not isinstance(prepared, dict) or prepared.get("generation") != manifest["generation"]:
        return None
    if prepared.get("key") != prepare_key(manifest, regime):
        return None
    parts = prepared.get("parts")
    return parts if isinstance(parts, list) else None


def prepare_targets(
    method: ContinualMethod, infos: list[TensorInfo], forms: Mapping[str, TensorForm]
) -> list[TensorInfo]:
    """Tensors with prepared quantities: those the method prepares and that a step holds whole
    (tensors folded by row blocks decompose from block sums inside their own pass), stored
    dense: a factored tensor's state already is its SVD (U, σ, V), and a zero one has none."""
    return [
        info
        for info in infos
        if method.prepared_shapes(info)
        and not (is_streamed(info) and method.streams_rows(info))
        and forms.get(info.name, DENSE_FORM).kind == DENSE
    ]


def write_prepared(
    directory: Path,
    method: ContinualMethod,
    targets: list[TensorInfo],
    compute: Callable[[TensorInfo], Mapping[str, torch.Tensor]],
    *,
    map_in_order: Callable[
        [Callable[[TensorInfo], Mapping[str, torch.Tensor]], list[TensorInfo]], Any
    ],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Compute every target's prepared quantities (`map_in_order(compute, targets)`, in
    storage order) and write them as part files into the generation `directory`, each under a
    temporary name renamed into place once complete and fsync'd. Returns the part records.
    On failure nothing it wrote stays; a full disk is a `StateError` saying so."""
    specs: dict[str, list[tuple[str, TensorSpec]]] = {n: [] for n in method.prepared_names}
    for info in targets:
        for name, shape in method.prepared_shapes(info).items():
            specs[name].append((info.name, TensorSpec(COMPUTE_DTYPE, shape)))
    needed = sum(spec.nbytes for pairs in specs.values() for _, spec in pairs)
    with writing(directory, needed, "the prepared factors"):
        return _write_files(
            directory, specs, targets, compute, map_in_order, progress or NoProgress()
        )


def _write_files(
    directory: Path,
    specs: Mapping[str, list[tuple[str, TensorSpec]]],
    targets: list[TensorInfo],
    compute: Callable[[TensorInfo], Mapping[str, torch.Tensor]],
    map_in_order: Callable[..., Any],
    progress: Progress,
) -> list[dict[str, Any]]:
    writers: dict[str, StreamingSafetensorsWriter] = {}
    finals = {n: directory / PREPARED_FILE.format(n) for n in specs}
    temporary = {n: path.with_name(path.name + ".tmp") for n, path in finals.items()}
    replaced: list[Path] = []  # final names this call has written
    try:
        for name, pairs in specs.items():
            writers[name] = StreamingSafetensorsWriter(
                temporary[name],
                pairs,
                metadata={"format": "mergestream-prepared", "quantity": name},
            )
        progress.start("prepare", len(targets), 0)
        try:
            for info, quantities in zip(targets, map_in_order(compute, targets), strict=True):
                for name, tensor in quantities.items():
                    writers[name].write(info.name, tensor.to("cpu", COMPUTE_DTYPE).contiguous())
                progress.advance(1, 0)
        finally:
            progress.finish()
        for writer in writers.values():
            writer.close()
        parts = []
        for name, writer in writers.items():
            os.replace(writer.path, finals[name])
            replaced.append(finals[name])
            parts.append(
                {
                    "file": f"{directory.name}/{finals[name].name}",
                    "state": f"prepared.{name}",
                    **writer.checksums(),
                }
            )
        fsync_dir(directory)
    except BaseException:
        # Nothing of a failed preparation stays (a full disk may be why it failed); an
        # earlier preparation's files are kept unless this one already replaced them.
        for writer in writers.values():
            writer.abort()
        # a writer that failed while being made (no room for its file) has a file too
        for path in [*temporary.values(), *replaced]:
            path.unlink(missing_ok=True)
        raise
    return parts


def prepared_reader(
    storage: Storage,
    manifest: Mapping[str, Any],
    method: ContinualMethod,
    state_dir: Path | None,
    device: torch.device | str,
    workers: int | None,
    dropped: list[str],
) -> Callable[[str], dict[str, torch.Tensor]]:
    """For a step run on `device` with `workers`: tensor name -> its prepared quantities
    ({} where none are usable: none prepared, stale, or damaged). The first damage found (a
    missing file, a header or a tensor that fails its checksum) goes into `dropped`; the step
    recomputes what it lacks, with the same result."""
    parts = usable_parts(manifest, kernel_regime(device, workers))
    if parts is None or state_dir is None:
        return lambda name: {}
    damage = check_parts(state_dir, parts)  # files and headers: cheap, before the step
    if damage:
        dropped.append(damage[0])
        return lambda name: {}
    generation = manifest["generation"]
    holders = {(part["state"], tensor) for part in parts for tensor in part.get("crc32") or {}}

    def read(name: str) -> dict[str, torch.Tensor]:
        quantities = {}
        for quantity in method.prepared_names:
            kind = f"prepared.{quantity}"
            if (kind, name) not in holders:
                return {}
            try:
                quantities[PREPARED_PREFIX + quantity] = storage.read(generation, kind, name)
            except StateError as err:  # a tensor failed its checksum, say
                if not dropped:
                    damaged = isinstance(err, DamagedPart)
                    dropped.append(f"{err.path}: {err.problem}" if damaged else str(err))
                return {}
        return quantities

    return read


def tell_dropped_preparation(dropped: list[str]) -> None:
    """One line for a damaged preparation that a step did not use (the command line prints
    warnings of a step as one line each). It is a cache: nothing to restore."""
    if dropped:
        warnings.warn(
            f"{dropped[0]}: the prepared factors are damaged, so this step did not use them "
            "and computed them anew (the merge is not affected)",
            DamagedPreparationWarning,
            stacklevel=2,
        )


def prepare_generation(
    storage: DiskStorage,
    manifest: Mapping[str, Any],
    method: ContinualMethod,
    infos: list[TensorInfo],
    read_state: Callable[[str], Mapping[str, torch.Tensor]],
    *,
    check_base: Callable[[], object],
    device: torch.device | str,
    workers: int | None,
    progress: Progress | None,
) -> tuple[int, dict[str, Any] | None]:
    """Compute and commit the preparation of `manifest`'s generation (see the module
    docstring); the caller holds the state's exclusive lock. `check_base` refuses a changed
    base, called once there is something to prepare. Returns
    how many tensors were prepared and the committed manifest, or (0, None) when there is
    nothing to prepare or a valid preparation is already stored."""
    resolved = resolve_device(device)
    count = default_workers(resolved) if workers is None else workers
    generation = manifest["generation"]
    if generation is None or not method.prepared_names:
        return 0, None
    regime = kernel_regime(resolved, count)
    usable = usable_parts(manifest, regime)
    if usable is not None and not check_parts(storage.path, usable):
        return 0, None  # prepared already; a damaged preparation is computed again
    targets = prepare_targets(method, infos, read_forms(manifest))
    if not targets:
        return 0, None  # every decomposable tensor is factored (or zero): nothing to compute
    check_base()

    def compute(info: TensorInfo) -> Mapping[str, torch.Tensor]:
        state = {k: v.to(resolved) for k, v in read_state(info.name).items()}
        return method.prepare_tensor(info, state)

    def map_in_order(fn, items):  # noqa: ANN001, ANN202 - as the engine runs kernels
        with single_threaded_kernels(count > 1 and resolved.type == "cpu"):
            yield from ordered_map(fn, items, count)

    parts = write_prepared(
        storage.path / generation_dir_name(generation),
        method,
        targets,
        compute,
        map_in_order=map_in_order,
        progress=progress,
    )
    committed = json.loads(json.dumps(manifest))
    committed["prepared"] = {
        "generation": generation,
        "key": prepare_key(committed, regime),
        "regime": regime,
        "tensors": len(targets),
        "parts": parts,
    }
    try:
        storage.commit(committed)
    except BaseException:
        storage.discard_files([part["file"] for part in parts])
        raise
    return len(targets), committed
