"""MergeState: a base, a method, and everything merged so far, persisted between steps.

    state = MergeState.create("state/", "base-model/", method=OPCM(alpha=0.5))
    state.add("finetuned-1/")          # one step per checkpoint, committed atomically
    state.export("merged/")            # base + merged task vector as an HF model directory

The same object works in memory (`MergeState.in_memory`) for the one-call `merge()` API; the
numerics are identical. State tensors are stored in the method's state precision (float64 for
OPCM, float32 for the baselines, unless `state_dtype` says otherwise).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import CheckpointError, ConfigError, MergestreamError, StateError
from .export import (
    DEFAULT_MAX_SHARD_SIZE,
    MARKER,
    copy_model_files,
    export_weight_names,
    merged_tensors,
    model_files,
    output_specs,
    plan_output_dir,
    write_json_file,
    write_model,
)
from .io.lora import LoraAdapter, LoraSource, base_identity, refuse_adapter_as_base
from .io.mapping import MappedSource, NameMapping, apply_mapping
from .io.open import CheckpointLike, config_dir, open_checkpoint
from .io.safetensors_stream import dtype_name
from .io.source import TensorSource
from .methods import ContinualMethod, TensorInfo, get_method
from .methods.base import COMPUTE_DTYPE, PREPARED_PREFIX, STATE_DTYPES
from .modelcard import provenance_metadata, render_model_card
from .progress import Progress
from .step.backends import choose_backend
from .step.engine import (
    StepStats,
    check_all_finite,
    check_compatible,
    tensor_infos,
    zero_task_vector_error,
)
from .step.merged_adapter import MergedAdapterWarning, merged_adapter_note, merged_adapter_warning
from .step.plan import Plan, plan_add
from .step.prepare import (
    DamagedPreparationWarning,
    kernel_regime,
    prepare_key,
    prepare_targets,
    usable_parts,
    write_prepared,
)
from .step.runtime import default_workers, ordered_map, resolve_device, single_threaded_kernels
from .step.tasks import Executor, StepRequest
from .store.atomic import publish_directory
from .store.hashing import content_hash, file_stamps, header_fingerprint
from .store.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    check_format,
    check_parts,
    generation_dir_name,
    model_identity,
    new_state_id,
    state_status,
    summary,
)
from .store.storage import (
    DamagedPart,
    DiskStorage,
    MemoryStorage,
    Storage,
    fsync_dir,
    no_space_message,
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _resolve_method(method: ContinualMethod | str, params: Mapping[str, Any]) -> ContinualMethod:
    if isinstance(method, ContinualMethod):
        if params:
            raise TypeError("pass parameters either in the method object or as keywords, not both")
        return method
    return get_method(method, **params)


class MergeState:
    """A continual merge in progress (see the module docstring)."""

    def __init__(self, storage: Storage, base: TensorSource, base_dir: Path | None):
        self._storage = storage
        self._manifest = storage.load_manifest()
        check_format(self._manifest, self._where)
        self.method = _method_of(self._manifest, self._where)
        self.method.state_dtype = STATE_DTYPES[self._manifest["state_dtype"]]
        self._use_generation()
        self._base = base
        self._base_dir = base_dir
        self._infos = tensor_infos(base, self.method.config.linear_rule())
        self._info_by_name = {i.name: i for i in self._infos}

    # ---------------------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        path: str | Path,
        base: str | Path,
        method: ContinualMethod | str = "opcm",
        *,
        state_dtype: str | None = None,
        progress: Progress | None = None,
        **params: Any,
    ) -> MergeState:
        """Start a new state in directory `path` (created; must be empty or absent).

        `state_dtype` ("float32" or "float64") is the precision of stored state tensors; by
        default the method's own choice (float64 for OPCM, float32 for the baselines).
        """
        path = Path(path)
        resolved_method = _resolve_method(method, params)
        base_source = refuse_adapter_as_base(open_checkpoint(base))
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StateError(f"{path}: exists and is not an empty directory")
        base_path = Path(base).resolve()
        manifest = cls._new_manifest(
            resolved_method, base_source, str(base_path), state_dtype, progress
        )
        created = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        storage = DiskStorage(path)
        try:
            storage.commit(manifest)
            # The new directories' entries, so a crash cannot make the new state vanish.
            for directory in (path, *path.parents)[: len(created) + 1]:
                fsync_dir(directory)
        except BaseException:
            for directory in created:  # innermost first: nothing half-made is left behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(storage, base_source, config_dir(base_path))

    @classmethod
    def open(cls, path: str | Path) -> MergeState:
        """Open an existing state directory."""
        storage = DiskStorage(Path(path))
        manifest = storage.load_manifest()
        check_format(manifest, path)  # before anything else reads the manifest
        base_path = Path(manifest["base"]["path"])
        try:
            base_source = open_checkpoint(base_path)
        except CheckpointError as err:
            raise StateError(f"{path}: the state's base cannot be opened: {err}") from err
        return cls(storage, base_source, config_dir(base_path))

    @classmethod
    def in_memory(
        cls,
        base: CheckpointLike,
        method: ContinualMethod | str = "opcm",
        *,
        state_dtype: str | None = None,
        **params: Any,
    ) -> MergeState:
        """A state that lives in memory only (nothing is written to disk)."""
        resolved_method = _resolve_method(method, params)
        base_source = refuse_adapter_as_base(open_checkpoint(base))
        check_all_finite(
            base_source, tensor_infos(base_source, resolved_method.config.linear_rule()), "the base"
        )
        storage = MemoryStorage()
        storage.commit(
            cls._new_manifest(
                resolved_method, base_source, base_source.description, state_dtype, hash_base=False
            )
        )
        return cls(storage, base_source, config_dir(base))

    @classmethod
    def planned(
        cls,
        path: str | Path,
        base: str | Path,
        method: ContinualMethod | str = "opcm",
        *,
        state_dtype: str | None = None,
        **params: Any,
    ) -> MergeState:
        """The state `create(path, base, method, ...)` would start, held in memory: made from
        the base's headers alone (nothing is hashed or written), so that a caller can check
        what it will do before the long work starts, e.g. `check_export` before a first step.
        Raises what `create` would raise for the path, the method or the base."""
        path = Path(path)
        resolved_method = _resolve_method(method, params)
        base_source = refuse_adapter_as_base(open_checkpoint(base))
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StateError(f"{path}: exists and is not an empty directory")
        base_path = Path(base).resolve()
        manifest = cls._new_manifest(
            resolved_method, base_source, str(base_path), state_dtype, hash_base=False
        )
        return cls(_PlannedStorage(path, manifest), base_source, config_dir(base_path))

    @staticmethod
    def _new_manifest(
        method: ContinualMethod,
        base: TensorSource,
        base_description: str,
        state_dtype: str | None,
        progress: Progress | None = None,
        *,
        hash_base: bool = True,
    ) -> dict[str, Any]:
        """A step-0 manifest, after checking the base (finite values, like any checkpoint). An
        in-memory state skips hashing the base: it holds the base open for its whole life, so
        there is no later run to compare it with."""
        infos = tensor_infos(base, method.config.linear_rule())
        if hash_base:
            check_all_finite(base, infos, "the base")
        if state_dtype is None:
            state_dtype = next(
                k for k, v in STATE_DTYPES.items() if v == method.default_state_dtype
            )
        elif state_dtype not in STATE_DTYPES:
            raise ConfigError(
                f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}"
            )
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mergestream_version": __version__,
            "id": new_state_id(),  # tells this state from any other, even at the same path
            "created": _now(),
            "method": {"name": method.name, "params": method.config.to_dict()},
            "state_dtype": state_dtype,
            "base": {
                "path": base_description,
                "sha256": content_hash(base, progress) if hash_base else None,
                "headers_sha256": header_fingerprint(base.files()),
                "files": file_stamps(base.files()),
            },
            "tensors": _roles(base, infos),
            "step": 0,
            "generation": None,
            "scalars": method.initial_scalars(),
            "ledger": [],
        }

    # ----------------------------------------------------------------------------- queries

    @property
    def _path(self) -> Path | None:
        """The state directory (None for a state in memory)."""
        path = getattr(self._storage, "path", None)
        return Path(path) if path is not None else None

    @property
    def _where(self) -> str:
        return str(self._path) if self._path is not None else "<memory>"

    @property
    def step(self) -> int:
        return int(self._manifest["step"])

    @property
    def scalars(self) -> dict[str, float]:
        return dict(self._manifest["scalars"])

    @property
    def ledger(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._manifest["ledger"]]

    @property
    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    @property
    def identity(self) -> dict[str, Any]:
        """What the merged model is made from now: the state's identity, step, generation and
        the generation's checksums (`manifest.model_identity`)."""
        return model_identity(self._manifest)

    def status(self, verify: bool = False) -> dict[str, Any]:
        """Everything `mergestream status` shows, as plain data (see `state_status`)."""
        info = state_status(self._path, self._manifest, verify) if self._path else {}
        info.setdefault("tensors", _roles(self._base, self._infos))
        if self._path is None:
            info.update(summary(self._manifest))
            info["health"] = {"ok": True, "problems": [], "verified": False}
        return info

    def classification(self) -> dict[str, str]:
        """Tensor name -> "projected" | "added" | "copied" under the state's method config."""
        out = {}
        for name in self._base.names():
            info = self._info_by_name.get(name)
            out[name] = "copied" if info is None else "projected" if info.projected else "added"
        return out

    # ------------------------------------------------------------------------------ adding

    def add(
        self,
        checkpoint: CheckpointLike,
        *,
        allow_duplicate: bool = False,
        strip_prefix: str | None = None,
        add_prefix: str | None = None,
        missing: str = "error",
        extra: str = "error",
        device: torch.device | str = "cpu",
        workers: int | None = None,
        progress: Progress | None = None,
        verify_base: bool = False,
        backend: str | Executor | None = None,
        force_base: bool = False,
        allow_zero: bool = False,
    ) -> StepStats:
        """Merge one checkpoint as the next step and commit it atomically.

        The checkpoint must hold the base's floating-point tensors under the base's names, or be
        mapped onto them with `strip_prefix` / `add_prefix` (renaming), `missing="base"` (absent
        tensors are unchanged from the base) and `extra="ignore"` (tensors the base lacks are
        left out); the ledger records the mapping. Anything wrong with the checkpoint raises
        before the state changes. The base is checked against its recorded fingerprint (file
        headers); `verify_base` hashes its whole content as well.

        A PEFT LoRA adapter folder is merged from its factors (`io.lora`); `force_base` merges
        one whose `base_model_name_or_path` does not name this state's base.

        A checkpoint whose task vector is zero in every tensor (the base itself) is refused
        unless `allow_zero`: it would still count as a task and scale the merge down. A full
        checkpoint that looks like a LoRA adapter merged into the base (low rank plus round-off,
        `merged_adapter.py`) is merged with a warning and a ledger note: the adapter is exact.

        `backend="ray"` (or an executor such as `step.ray_backend.RayBackend(...)`) folds the
        step's tensors in tasks on a cluster instead of in this process (`step/backends.py`),
        with the same results to the bit; it needs a state on disk and a checkpoint given by
        path.
        """
        mapping = NameMapping(strip_prefix, add_prefix, missing, extra)
        runner = choose_backend(
            backend,
            state_on_disk=not isinstance(self._storage, MemoryStorage),
            checkpoint_is_path=not isinstance(checkpoint, Mapping),
        )
        with self._storage.lock(exclusive=True), contextlib.ExitStack() as cleanup:
            self._reload_manifest()
            base_stamps = self._check_base_unchanged(verify=verify_base)
            raw, source = self._open_input(checkpoint, mapping, force_base)
            cleanup.callback(raw.close)
            if not runner.local and isinstance(raw, LoraAdapter):
                raise ConfigError(
                    f"{source.description}: backend {backend!r} merges full checkpoints; a LoRA "
                    "adapter is merged by the local engine (from its factors, which keeps the "
                    "step cheap): leave out --backend"
                )
            # An in-memory merge that allows duplicates has no use for the hash: skip the read.
            in_memory = isinstance(self._storage, MemoryStorage)
            digest = None if in_memory and allow_duplicate else content_hash(raw, progress)
            if not allow_duplicate:
                for entry in self._manifest["ledger"]:
                    if entry["sha256"] == digest:
                        latest = entry["step"] == self.step
                        raise StateError(
                            f"{source.description}: identical content was already merged at "
                            f"step {entry['step']} ({entry['path']})"
                            + (
                                ", the latest step (an add of it that was interrupted had "
                                "completed)"
                                if latest
                                else ""
                            )
                            + "; pass allow_duplicate (--allow-duplicate) to merge it again"
                        )
            if not allow_zero and digest is not None and digest == self._manifest["base"]["sha256"]:
                raise zero_task_vector_error(source)  # the base's own files: refused at once
            adapter_note = (
                None
                if isinstance(source, LoraSource)
                else merged_adapter_note(self._base, source, self._infos)
            )
            step = self.step + 1
            generation = (self._manifest["generation"] or 0) + 1
            method = self.method

            def discard_on_failure(kind: type[BaseException] | None, *_: object) -> bool:
                # Whatever fails from here to the commit (a full disk at the manifest, an
                # interrupt), the new generation's files go with it: on the disk that just ran
                # out they may be gigabytes.
                if kind is not None:
                    self._storage.discard(generation)
                return False

            cleanup.push(discard_on_failure)

            # Prepared factors only save a local step time (they give the same bits); a
            # distributed step recomputes in its tasks, and its driver may lack the device.
            dropped: list[str] = []  # what was wrong with a damaged preparation
            prepared = (
                self._prepared_reader(device, workers, dropped)
                if runner.local
                else (lambda name: {})
            )
            cleanup.callback(_tell_dropped_preparation, dropped)

            def read_state(info: TensorInfo) -> dict[str, torch.Tensor]:
                # still the previous generation here, with its prepared factors if usable
                return {**self.state_tensors(info.name), **prepared(info.name)}

            def read_state_rows(info: TensorInfo, start: int, stop: int) -> dict[str, torch.Tensor]:
                return self.state_rows(info.name, start, stop)

            stats, parts = runner.run(
                StepRequest(
                    method=method,
                    step=step,
                    scalars=self.scalars,
                    infos=self._infos,
                    base=self._base,
                    checkpoint=source,
                    storage=self._storage,
                    generation=generation,
                    previous_generation=self._manifest["generation"],
                    previous_parts=self._manifest.get("parts"),
                    read_state=read_state,
                    read_state_rows=read_state_rows,
                    base_path=self._manifest["base"]["path"],
                    checkpoint_path=_describe(checkpoint, source),
                    mapping=mapping,
                    device=device,
                    workers=workers,
                    progress=progress,
                    allow_zero=allow_zero,
                )
            )
            manifest = json.loads(json.dumps(self._manifest))
            manifest["format_version"] = FORMAT_VERSION
            manifest["mergestream_version"] = __version__
            manifest["step"] = step
            manifest["generation"] = generation
            manifest["parts"] = parts
            manifest.pop("prepared", None)  # it belonged to the previous generation
            manifest["scalars"] = stats.scalars
            manifest["updated"] = _now()
            if base_stamps is not None:
                manifest["base"]["files"] = base_stamps
            entry = {
                "step": step,
                "path": _describe(checkpoint, source),
                "size": sum(p.stat().st_size for p in source.files()),
                "sha256": digest,
                "added": _now(),
                "seconds": round(stats.seconds, 3),
                "scalars": stats.scalars,
            }
            if isinstance(source, MappedSource):
                entry["mapping"] = source.summary()
            notes = _dtype_notes(self._infos, source)
            if adapter_note is not None:
                notes.append(f"looks like a merged LoRA adapter ({adapter_note})")
            if notes:
                entry["notes"] = notes
            if isinstance(source, LoraSource):
                entry["adapter"] = source.summary()
            manifest["ledger"].append(entry)
            self._storage.commit(manifest)
            self._manifest = manifest
            if adapter_note is not None:
                warnings.warn(
                    merged_adapter_warning(source.description, adapter_note),
                    MergedAdapterWarning,
                    stacklevel=2,
                )
            return stats

    def plan(
        self,
        checkpoint: CheckpointLike,
        *,
        strip_prefix: str | None = None,
        add_prefix: str | None = None,
        missing: str = "error",
        extra: str = "error",
        force_base: bool = False,
    ) -> Plan:
        """What `add` would do with these arguments, from headers alone; writes nothing.
        Raises the error `add` would raise for a checkpoint that does not fit the base."""
        self._reload_manifest()
        raw, source = self._open_input(
            checkpoint, NameMapping(strip_prefix, add_prefix, missing, extra), force_base
        )
        try:
            return plan_add(
                state_path=self._path,
                step=self.step,
                base=self._base,
                infos=self._infos,
                classification=self.classification(),
                source=source,
                state_names=self.method.state_names,
                state_dtype=self.method.state_dtype,
                streams_rows=self.method.streams_rows,
                workers=default_workers(torch.device("cpu")),
                ledger=self.ledger,
                checkpoint_path=_describe(checkpoint, raw),
            )
        finally:
            raw.close()

    def _reload_manifest(self) -> None:
        """Read the manifest again (another process may have added since this object opened)."""
        self._manifest = self._storage.load_manifest()
        check_format(self._manifest, self._where)
        self._use_generation()

    def _use_generation(self) -> None:
        generation = self._manifest["generation"]
        if generation is not None:
            self._storage.use_parts(
                generation, self.method.state_names, self._manifest.get("parts")
            )
            prepared = self._manifest.get("prepared")
            if isinstance(prepared, dict) and prepared.get("generation") == generation:
                self._storage.use_parts(generation, (), prepared.get("parts") or [])

    def _prepared_reader(
        self, device: torch.device | str, workers: int | None, dropped: list[str]
    ) -> Callable[[str], dict[str, torch.Tensor]]:
        """For a step run on `device` with `workers`: tensor name -> its prepared quantities
        ({} where none are usable: none prepared, stale, or damaged). The first damage found
        (a missing file, a header or a tensor that fails its checksum) goes into `dropped`;
        the step recomputes what it lacks, with the same result."""
        parts = usable_parts(self._manifest, kernel_regime(device, workers))
        if parts is None or self._path is None:
            return lambda name: {}
        damage = check_parts(self._path, parts)  # files and headers: cheap, before the step
        if damage:
            dropped.append(damage[0])
            return lambda name: {}
        generation = self._manifest["generation"]
        holders = {(part["state"], tensor) for part in parts for tensor in part.get("crc32") or {}}

        def read(name: str) -> dict[str, torch.Tensor]:
            quantities = {}
            for quantity in self.method.prepared_names:
                kind = f"prepared.{quantity}"
                if (kind, name) not in holders:
                    return {}
                try:
                    quantities[PREPARED_PREFIX + quantity] = self._storage.read(
                        generation, kind, name
                    )
                except StateError as err:  # a tensor failed its checksum, say
                    if not dropped:
                        damaged = isinstance(err, DamagedPart)
                        dropped.append(f"{err.path}: {err.problem}" if damaged else str(err))
                    return {}
            return quantities

        return read

    def prepare(
        self,
        *,
        device: torch.device | str = "cpu",
        workers: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Compute the next step's per-tensor preparations now (OPCM: the decompositions of
        the running sums; `prepare.py`) and store them with the current generation, so that
        the next `add` with the same `device` and `workers` only projects. Its result is the
        same, bit for bit, as without. Returns how many tensors were prepared (0 when there is
        nothing to prepare, or a valid preparation is already stored)."""
        if self._path is None:
            raise StateError(
                "prepare stores its results with a state on disk; this one is in memory"
            )
        resolved = resolve_device(device)
        count = default_workers(resolved) if workers is None else workers
        with self._storage.lock(exclusive=True):
            self._reload_manifest()
            generation = self._manifest["generation"]
            if generation is None or not self.method.prepared_names:
                return 0
            regime = kernel_regime(resolved, count)
            usable = usable_parts(self._manifest, regime)
            if usable is not None and not check_parts(self._path, usable):
                return 0  # prepared already; a damaged preparation is computed again
            self._check_base_unchanged()
            targets = prepare_targets(self.method, self._infos)

            def compute(info: TensorInfo) -> Mapping[str, torch.Tensor]:
                state = {k: v.to(resolved) for k, v in self.state_tensors(info.name).items()}
                return self.method.prepare_tensor(info, state)

            def map_in_order(fn, items):  # noqa: ANN001, ANN202 - as the engine runs kernels
                with single_threaded_kernels(count > 1 and resolved.type == "cpu"):
                    yield from ordered_map(fn, items, count)

            parts = write_prepared(
                self._path / generation_dir_name(generation),
                self.method,
                targets,
                compute,
                map_in_order=map_in_order,
                progress=progress,
            )
            manifest = json.loads(json.dumps(self._manifest))
            manifest["prepared"] = {
                "generation": generation,
                "key": prepare_key(manifest, regime),
                "regime": regime,
                "tensors": len(targets),
                "parts": parts,
            }
            assert isinstance(self._storage, DiskStorage)  # a state on disk, checked above
            try:
                self._storage.commit(manifest)
            except BaseException:
                self._storage.discard_files([part["file"] for part in parts])
                raise
            self._manifest = manifest
            self._use_generation()
            return len(targets)

    def _open_input(
        self, checkpoint: CheckpointLike, mapping: NameMapping, force_base: bool = False
    ) -> tuple[TensorSource, TensorSource]:
        """(the checkpoint as stored, the checkpoint in the base's names), checked against the
        base from headers alone, so a misfit is refused before anything is read or hashed."""
        raw = open_checkpoint(checkpoint)
        try:
            if isinstance(raw, LoraAdapter):  # task vectors from its factors, in base names
                identity = base_identity(self._manifest["base"]["path"], self._base_dir)
                source = raw.bind(self._base, mapping, identity, force_base)
            else:
                source = apply_mapping(raw, mapping, self._base)
            check_compatible(self._base, source)
        except BaseException:
            raw.close()
            raise
        return raw, source

    def _check_base_unchanged(self, verify: bool = False) -> list[dict[str, object]] | None:
        """Refuse to go on if the base's content changed since the state was created.

        Every call compares the base files' headers (safetensors headers, zip directories) with
        the fingerprint recorded at init; when they, or the files' sizes and modification
        times, differ, or `verify` asks for it, the full content hash decides. Returns the base
        files' current stamps when they differ from the recorded ones but the content is the
        same (e.g. the files were copied), so the next commit can record them."""
        recorded = self._manifest["base"]
        files = self._base.files()
        if not files:
            return None
        try:
            stamps = file_stamps(files)
            headers = header_fingerprint(files)
        except (OSError, CheckpointError) as err:
            raise StateError(
                f"the base at {recorded['path']} cannot be read any more ({err})"
            ) from None
        recorded_headers = recorded.get("headers_sha256")
        same_headers = recorded_headers is None or headers == recorded_headers
        if recorded["sha256"] is None or (
            stamps == recorded["files"] and same_headers and not verify
        ):
            return None
        if content_hash(self._base) != recorded["sha256"]:
            raise StateError(
                f"the base at {recorded['path']} has changed since this state was created "
                f"(its content hash is no longer the recorded {recorded['sha256'][:16]}...); "
                "merging into or exporting from a different base would be wrong. Restore the "
                "original base files, or start a new state for the new base"
            )
        return None if stamps == recorded["files"] else stamps

    # ----------------------------------------------------------------------------- results

    def _task_vector(self, info: TensorInfo) -> torch.Tensor:
        generation = self._manifest["generation"]
        if generation is None:
            return torch.zeros(info.shape, dtype=COMPUTE_DTYPE)
        state = {s: self._storage.read(generation, s, info.name) for s in self.method.state_names}
        return self.method.task_vector(info, state, self.scalars)

    def _task_vector_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        block = info.rows(start, stop)
        if self._manifest["generation"] is None:
            return torch.zeros(block.shape, dtype=COMPUTE_DTYPE)
        return self.method.task_vector(block, self.state_rows(info.name, start, stop), self.scalars)

    def state_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The method's stored state for one tensor (e.g. OPCM's {"sum": S}); {} at step 0."""
        generation = self._manifest["generation"]
        if generation is None:
            return {}
        return {s: self._storage.read(generation, s, name) for s in self.method.state_names}

    def state_rows(self, name: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows `start:stop` of `state_tensors(name)` (first dimension), reading only those."""
        generation = self._manifest["generation"]
        if generation is None:
            return {}
        return {
            s: self._storage.read_rows(generation, s, name, start, stop)
            for s in self.method.state_names
        }

    def task_vectors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged - base) in float64 for every floating-point tensor, one at a time."""
        for info in self._infos:
            yield info.name, self._task_vector(info)

    def merged_tensors(
        self, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every tensor of the base, one at a time."""
        yield from merged_tensors(self._base, self._info_by_name, self._task_vector, dtype)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The whole merged model in memory (small models and tests)."""
        return dict(self.merged_tensors(dtype))

    def export(
        self,
        out: str | Path,
        *,
        dtype: torch.dtype | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        progress: Progress | None = None,
        overwrite: bool = False,
        verify_base: bool = False,
    ) -> Path:
        """Write the merged model to directory `out` as HF-style safetensors (one file, or shards
        of at most `max_shard_size` with an index), the base's config/tokenizer files and a
        model card with provenance, so `transformers.AutoModel.from_pretrained(out)` loads it.

        Floating-point tensors are written in `dtype`, or the base's dtype by default. The
        export is built beside `out` and switched in whole (`store/atomic.py`): a reader of `out`
        sees the previous export or the new one, never a mixture. `out` must be new, empty or
        an earlier export; a directory holding other files is refused unless `overwrite`, and
        even then only the files an export writes are replaced. Files of `out` that an export
        does not write are kept.
        """
        out = Path(out)
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_base_unchanged(verify=verify_base)
            written = self._export_files(dtype, max_shard_size)
            needed = sum(s.nbytes for _, s in output_specs(self._base, self._info_by_name, dtype))

            def build(directory: Path) -> list[str]:
                files = write_model(
                    directory,
                    self._base,
                    self._info_by_name,
                    self._task_vector,
                    dtype,
                    provenance_metadata(self._manifest),
                    max_shard_size,
                    progress,
                    task_vector_rows=self._task_vector_rows,
                )
                copied = copy_model_files(self._base_dir, directory)
                dtypes = {dtype_name(dtype or i.dtype) for i in self._infos}
                weights = [f for f in files if f.endswith(".safetensors")]
                card = render_model_card(self._manifest, weights, "/".join(sorted(dtypes)), copied)
                (directory / "README.md").write_text(card)
                return [*files, *copied, "README.md"]

            self.publish_export(
                out, written, build, overwrite=overwrite, kind="model", needed=needed
            )
        return out

    def publish_export(
        self,
        out: Path,
        written: set[str],
        build: Callable[[Path], list[str]],
        *,
        overwrite: bool,
        kind: str,
        needed: int | None = None,
    ) -> None:
        """Publish an export of this state (a full model, or an adapter) as directory `out`,
        under the rules every export shares; the caller holds the state still (`reading()`).

        `out` may not be, hold or lie in the state or the base's files, and must be new, empty
        or an earlier export of either kind (its marker lists the files it wrote, which are
        replaced); another non-empty directory is refused unless `overwrite`. `written` names in
        advance the files `build` may write, `build(directory)` writes them into a fresh
        directory beside `out` and returns them; the marker listing them is added and the
        directory switched in whole. On any failure `out` is as it was; `needed` (bytes) goes
        into the message when the disk is full."""
        self._check_export_target(out)
        keep = plan_output_dir(out, overwrite, {*written, MARKER})

        def build_with_marker(directory: Path) -> None:
            files = build(directory)
            marker = {
                "format": "mergestream-export",
                "kind": kind,
                "mergestream_version": __version__,
                "state": self._where,
                "step": self.step,
                "files": sorted(set(files)),
            }
            write_json_file(directory / MARKER, marker)

        try:
            publish_directory(out, build_with_marker, keep)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MergestreamError(
                    no_space_message(out.parent, "the export", needed) + f"; {out} is unchanged"
                ) from None
            raise MergestreamError(
                f"{out}: cannot write the export ({err.strerror or err}); {out} is unchanged"
            ) from None

    @contextlib.contextmanager
    def reading(self, verify_base: bool = False) -> Iterator[TensorSource]:
        """Hold the state still for a reader outside this class (the LoRA export): a shared
        lock, the manifest read again, the base checked unchanged (its whole content hashed with
        `verify_base`). Yields the base."""
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_base_unchanged(verify=verify_base)
            yield self._base

    def _check_export_target(self, out: Path) -> None:
        """Refuse an `out` whose replacement would touch the state or the base's files: `out`
        may be none of them nor hold one, and may not lie inside the state directory."""
        target = Path(os.path.realpath(out))
        state_dir = Path(os.path.realpath(self._path)) if self._path is not None else None
        if state_dir is not None and state_dir in target.parents:
            raise MergestreamError(f"{out}: cannot export into the state directory")
        protected: list[tuple[Path, str]] = []
        if state_dir is not None:
            protected.append((state_dir, "the state directory"))
        if self._base_dir is not None:
            protected.append((Path(os.path.realpath(self._base_dir)), "the base model's directory"))
        for file in self._base.files():
            protected.append((Path(os.path.realpath(file.parent)), "the base model's directory"))
            protected.append((Path(os.path.realpath(file)), f"the base's file {file}"))
        for path, what in protected:
            if target == path or target in path.parents:
                raise MergestreamError(
                    f"{out}: cannot export there: it would replace {what}; choose another "
                    "output directory"
                )

    def check_export(
        self,
        out: str | Path,
        *,
        dtype: torch.dtype | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
    ) -> None:
        """Refuse `out` for every reason `export` would refuse it, from paths and headers
        alone, writing nothing: a long run checks where it will publish before its first step
        rather than after the merge."""
        out = Path(out)
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_export_target(out)
            plan_output_dir(out, overwrite, {*self._export_files(dtype, max_shard_size), MARKER})

    def _export_files(self, dtype: torch.dtype | None, max_shard_size: int | str) -> set[str]:
        """The files `export` writes, its marker aside: the weights (one file or the shards
        and their index), the model card and the base's config and tokenizer files."""
        weight_names = export_weight_names(self._base, self._info_by_name, dtype, max_shard_size)
        return {*weight_names, "README.md", *model_files(self._base_dir)}


class _PlannedStorage(MemoryStorage):
    """The storage of a state not created yet (`MergeState.planned`): the manifest `create`
    would commit, in memory, and the directory the state will have, so the checks that
    protect the state directory see it."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.path = path
        self.commit(manifest)


def _method_of(manifest: Mapping[str, Any], where: str) -> ContinualMethod:
    """The manifest's method; one that cannot be set up is named as the manifest's fault."""
    method = manifest["method"]
    try:
        return get_method(method["name"], **method["params"])
    except ConfigError as err:
        file = where if where.startswith("<") else Path(where) / MANIFEST
        raise StateError(
            f"{file}: the state's method cannot be set up from it ({err}); it was changed "
            "outside mergestream, or written by one that knows other methods (it was written "
            f"by mergestream {manifest.get('mergestream_version', '?')}, this is {__version__})"
        ) from None


def _tell_dropped_preparation(dropped: list[str]) -> None:
    """One line for a damaged preparation that a step did not use (the command line prints
    warnings of a step as one line each). It is a cache: nothing to restore."""
    if dropped:
        warnings.warn(
            f"{dropped[0]}: the prepared factors are damaged, so this step did not use them "
            "and computed them anew (the merge is not affected)",
            DamagedPreparationWarning,
            stacklevel=2,
        )


def _dtype_notes(infos: list[TensorInfo], source: TensorSource) -> list[str]:
    """Ledger notes for tensors whose dtype differs from the base's. They are accepted: every
    method computes in float64, and the export writes the base's dtype (or --dtype)."""
    counts: dict[tuple[str, str], int] = {}
    for info in infos:
        incoming = source.spec(info.name).dtype
        if incoming != info.dtype:
            key = (dtype_name(incoming), dtype_name(info.dtype))
            counts[key] = counts.get(key, 0) + 1
    return [
        f"{n} {theirs} tensors merged into a {ours} base (computed in float64)"
        for (theirs, ours), n in sorted(counts.items())
    ]


def _roles(base: TensorSource, infos: list[TensorInfo]) -> dict[str, int]:
    """How many base tensors are projected, added or copied (recorded at init, so `status`
    can show it without opening the base)."""
    by_name = {i.name: i for i in infos}
    roles = {"projected": 0, "added": 0, "copied": 0}
    for name in base.names():
        info = by_name.get(name)
        roles["copied" if info is None else "projected" if info.projected else "added"] += 1
    return roles


def _describe(checkpoint: CheckpointLike, source: TensorSource) -> str:
    if isinstance(checkpoint, Mapping):
        return source.description
    return str(Path(checkpoint).resolve())


def merge(
    base: CheckpointLike,
    checkpoints: list[CheckpointLike],
    method: ContinualMethod | str = "opcm",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    state_dtype: str | None = None,
    allow_zero: bool = False,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge `checkpoints` into `base` in the given order and return the merged state dict.

    Paths or in-memory state dicts are accepted. Nothing is written to disk. A checkpoint equal
    to the base is refused unless `allow_zero` (see `MergeState.add`).
    """
    state = MergeState.in_memory(base, method, state_dtype=state_dtype, **params)
    for checkpoint in checkpoints:
        state.add(checkpoint, allow_duplicate=True, device=device, allow_zero=allow_zero)
    return state.state_dict(dtype)
