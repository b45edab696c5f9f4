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
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import CheckpointError, ConfigError, StateError
from .io.lora import refuse_adapter_as_base
from .io.mapping import NameMapping
from .io.open import CheckpointLike, FittedCheckpoint, config_dir, open_checkpoint, open_fitted
from .io.source import TensorSource
from .methods import ContinualMethod, TensorInfo, get_method
from .methods.base import STATE_DTYPES
from .methods.lowrank import ThinSVD
from .options import DEFAULT_MAX_SHARD_SIZE
from .progress import Progress
from .publish.export import check_export, export_model, merged_tensors
from .step.backends import choose_backend
from .step.engine import StepStats, check_all_finite, tensor_infos, zero_task_vector_error
from .step.forms import plan_forms, previous_forms, with_ranks
from .step.merged_adapter import MergedAdapterWarning, merged_adapter_note, merged_adapter_warning
from .step.plan import Plan, plan_add, stored_bytes
from .step.prepare import prepare_generation, prepared_reader, tell_dropped_preparation
from .step.runtime import default_workers
from .step.tasks import Executor, StepRequest
from .store.generation import GenerationReader, StateView, use_generation
from .store.hashing import check_base_unchanged, content_hash
from .store.ledger import (
    dtype_notes,
    new_manifest,
    next_manifest,
    refuse_merged_before,
    step_entry,
    tensor_roles,
)
from .store.manifest import (
    FACTORED,
    MANIFEST,
    TensorForm,
    check_format,
    forms_record,
    model_identity,
    state_status,
    summary,
)
from .store.storage import DiskStorage, MemoryStorage, Storage


def _first_manifest(
    base: CheckpointLike,
    method: ContinualMethod | str,
    params: Mapping[str, Any],
    state_dtype: str | None,
    path: Path | None = None,
    *,
    check_values: bool = False,
    progress: Progress | None = None,
    lowrank: bool = True,
) -> tuple[TensorSource, dict[str, Any]]:
    """The base, opened, and the step-0 manifest of a state at `path` (absent or empty; None
    for one in memory). `check_values` refuses NaN/Inf in the base (as in any checkpoint);
    with a `path` and `check_values` the base's content is hashed too, so later runs can tell
    it unchanged (a state in memory holds its base open for its whole life)."""
    if isinstance(method, ContinualMethod):
        if params:
            raise TypeError("pass parameters either in the method object or as keywords, not both")
    else:
        method = get_method(method, **params)
    source = refuse_adapter_as_base(open_checkpoint(base))
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StateError(f"{path}: exists and is not an empty directory")
    infos = tensor_infos(source, method.config.linear_rule())
    if check_values:
        check_all_finite(source, infos, "the base")
    hashed = path is not None and check_values
    digest = content_hash(source, progress) if hashed else None
    where = str(Path(base).resolve()) if path is not None else source.description  # type: ignore[arg-type]
    return source, new_manifest(method, source, infos, where, state_dtype, digest, lowrank)


class MergeState:
    """A continual merge in progress (see the module docstring)."""

    def __init__(self, storage: Storage, base: TensorSource, base_dir: Path | None):
        self._storage = storage
        self._manifest = storage.load_manifest()
        check_format(self._manifest, self._where)
        self.method = _method_of(self._manifest, self._where)
        self.method.state_dtype = STATE_DTYPES[self._manifest["state_dtype"]]
        use_generation(self._storage, self._manifest, self.method.state_names)
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
        lowrank: bool = True,
        **params: Any,
    ) -> MergeState:
        """Start a new state in directory `path` (created; must be empty or absent).

        `state_dtype` ("float32" or "float64") is the precision of stored state tensors; by
        default the method's own choice (float64 for OPCM, float32 for the baselines).
        With `lowrank` (the default), a method that supports it keeps the matrices of a LoRA
        stream as low-rank factors (float64) and tensors no input changed as zero
        (`step/forms.py`); `lowrank=False` keeps every tensor dense.
        """
        path = Path(path)
        source, manifest = _first_manifest(
            base,
            method,
            params,
            state_dtype,
            path,
            check_values=True,
            progress=progress,
            lowrank=lowrank,
        )
        return cls(DiskStorage.create(path, manifest), source, config_dir(Path(base).resolve()))

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
        lowrank: bool = True,
        **params: Any,
    ) -> MergeState:
        """A state that lives in memory only (nothing is written to disk). Its base is not
        hashed: the state holds it open for its whole life, so no later run compares it.
        `lowrank` as in `create`."""
        source, manifest = _first_manifest(
            base, method, params, state_dtype, check_values=True, lowrank=lowrank
        )
        storage = MemoryStorage()
        storage.commit(manifest)
        return cls(storage, source, config_dir(base))

    @classmethod
    def planned(
        cls,
        path: str | Path,
        base: str | Path,
        method: ContinualMethod | str = "opcm",
        *,
        state_dtype: str | None = None,
        lowrank: bool = True,
        **params: Any,
    ) -> MergeState:
        """The state `create(path, base, method, ...)` would start, held in memory: made from
        the base's headers alone (nothing is hashed or written), so that a caller can check
        what it will do before the long work starts, e.g. `check_export` before a first step.
        Raises what `create` would raise for the path, the method or the base."""
        path = Path(path)
        source, manifest = _first_manifest(
            base, method, params, state_dtype, path, lowrank=lowrank
        )
        return cls(_PlannedStorage(path, manifest), source, config_dir(Path(base).resolve()))

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
        info.setdefault("tensors", tensor_roles(self._base, self._infos))
        if self._path is None:
            info.update(summary(self._manifest))
            info["health"] = {"ok": True, "problems": [], "verified": False}
        return info

    def tensor_forms(self) -> dict[str, dict[str, Any]]:
        """Per merged tensor: its form now ("dense", "factored" with its rank and width, or
        "zero") and the bytes its state takes on disk."""
        forms = previous_forms(self._manifest, self._infos)  # step 0: zero (or dense) throughout
        state_size = self.method.state_dtype.itemsize * len(self.method.state_names)
        return {
            info.name: {
                **forms[info.name].to_json(),
                "bytes": stored_bytes(info, forms[info.name], state_size) if self.step else 0,
            }
            for info in self._infos
        }

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
        `step/merged_adapter.py`) is merged with a warning and a ledger note: the adapter is
        exact.

        `backend="ray"` (or an executor such as `step.ray_backend.RayBackend(...)`) folds the
        step's tensors in tasks on a cluster instead of in this process (`step/backends.py`),
        with the same results to the bit; it needs a state on disk and a checkpoint given by
        path.
        """
        mapping = NameMapping(strip_prefix, add_prefix, missing, extra)
        in_memory = isinstance(self._storage, MemoryStorage)
        runner = choose_backend(
            backend,
            state_on_disk=not in_memory,
            checkpoint_is_path=not isinstance(checkpoint, Mapping),
        )
        with self._storage.lock(exclusive=True), contextlib.ExitStack() as cleanup:
            self._reload_manifest()
            base_stamps = self._check_base_unchanged(verify=verify_base)
            fitted = self._open_fitted(checkpoint, mapping, force_base)
            cleanup.callback(fitted.close)
            # An in-memory merge that allows duplicates has no use for the hash: skip the read.
            digest = None if in_memory and allow_duplicate else content_hash(fitted.raw, progress)
            if not allow_duplicate:
                refuse_merged_before(self._manifest, digest, fitted.description)
            if not allow_zero and digest is not None and digest == self._manifest["base"]["sha256"]:
                raise zero_task_vector_error(fitted.source)  # the base's own files: at once
            adapter_note = (
                None
                if fitted.is_adapter
                else merged_adapter_note(self._base, fitted.source, self._infos)
            )
            step = self.step + 1
            generation = (self._manifest["generation"] or 0) + 1
            before = previous_forms(self._manifest, self._infos)
            forms = plan_forms(self.method, self._infos, before, fitted.source)

            def discard_on_failure(kind: type[BaseException] | None, *_: object) -> bool:
                # Whatever fails from here to the commit (a full disk at the manifest, an
                # interrupt), the new generation's files go with it: on the disk that just ran
                # out they may be gigabytes.
                if kind is not None:
                    self._storage.discard(generation)
                return False

            cleanup.push(discard_on_failure)
            stats, parts = runner.run(
                self._step_request(
                    step,
                    generation,
                    fitted,
                    mapping,
                    runner.local,
                    cleanup,
                    device=device,
                    workers=workers,
                    progress=progress,
                    allow_zero=allow_zero,
                    forms=forms,
                    previous_forms=before,
                )
            )
            notes = dtype_notes(self._infos, fitted.source)
            if adapter_note is not None:
                notes.append(f"looks like a merged LoRA adapter ({adapter_note})")
            entry = step_entry(step, fitted, digest, stats.seconds, stats.scalars, notes)
            manifest = next_manifest(
                self._manifest,
                entry,
                generation,
                parts,
                stats.scalars,
                base_stamps,
                forms_record(with_ranks(forms, stats.ranks)),
            )
            self._storage.commit(manifest)
            self._manifest = manifest
            if adapter_note is not None:
                warnings.warn(
                    merged_adapter_warning(fitted.description, adapter_note),
                    MergedAdapterWarning,
                    stacklevel=2,
                )
            return stats

    def _step_request(
        self,
        step: int,
        generation: int,
        fitted: FittedCheckpoint,
        mapping: NameMapping,
        local: bool,
        cleanup: contextlib.ExitStack,
        **options: Any,
    ) -> StepRequest:
        """What a backend needs to run the next step (`step/tasks.StepRequest`)."""
        # Prepared factors only save a local step time (they give the same bits); a
        # distributed step recomputes in its tasks, and its driver may lack the device.
        dropped: list[str] = []  # what was wrong with a damaged preparation
        prepared = (
            prepared_reader(
                self._storage,
                self._manifest,
                self.method,
                self._path,
                options["device"],
                options["workers"],
                dropped,
            )
            if local
            else (lambda name: {})
        )
        cleanup.callback(tell_dropped_preparation, dropped)
        reader = self._reader()

        def read_state(info: TensorInfo) -> dict[str, torch.Tensor]:
            # still the previous generation here, with its prepared factors if usable
            return {**reader.state(info.name, info.shape), **prepared(info.name)}

        def read_state_rows(info: TensorInfo, start: int, stop: int) -> dict[str, torch.Tensor]:
            return reader.state_rows(info.name, start, stop, info.shape)

        def read_factors(info: TensorInfo) -> ThinSVD | None:
            return reader.factors(info.name) if reader.form(info.name).kind == FACTORED else None

        return StepRequest(
            method=self.method,
            step=step,
            scalars=self.scalars,
            infos=self._infos,
            base=self._base,
            checkpoint=fitted.source,
            storage=self._storage,
            generation=generation,
            previous_generation=self._manifest["generation"],
            previous_parts=self._manifest.get("parts"),
            read_state=read_state,
            read_state_rows=read_state_rows,
            read_factors=read_factors,
            base_path=self._manifest["base"]["path"],
            checkpoint_path=fitted.path,
            mapping=mapping,
            **options,
        )

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
        fitted = self._open_fitted(
            checkpoint, NameMapping(strip_prefix, add_prefix, missing, extra), force_base
        )
        try:
            path = fitted.raw.description if isinstance(checkpoint, Mapping) else fitted.path
            workers = default_workers(torch.device("cpu"))
            return plan_add(self._view(), self.method, fitted.source, path, workers)
        finally:
            fitted.close()

    def prepare(
        self,
        *,
        device: torch.device | str = "cpu",
        workers: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Compute the next step's per-tensor preparations now (OPCM: the decompositions of
        the running sums; `step/prepare.py`) and store them with the current generation, so
        that the next `add` with the same `device` and `workers` only projects. Its result is
        the same, bit for bit, as without. Returns how many tensors were prepared (0 when there
        is nothing to prepare, or a valid preparation is already stored)."""
        if not isinstance(self._storage, DiskStorage):
            raise StateError(
                "prepare stores its results with a state on disk; this one is in memory"
            )
        with self._storage.lock(exclusive=True):
            self._reload_manifest()
            count, manifest = prepare_generation(
                self._storage,
                self._manifest,
                self.method,
                self._infos,
                self._reader().state,
                check_base=self._check_base_unchanged,
                device=device,
                workers=workers,
                progress=progress,
            )
            if manifest is not None:
                self._manifest = manifest
                use_generation(self._storage, self._manifest, self.method.state_names)
            return count

    # ------------------------------------------------------------------- reading the state

    def _open_fitted(
        self, checkpoint: CheckpointLike, mapping: NameMapping, force_base: bool = False
    ) -> FittedCheckpoint:
        return open_fitted(
            checkpoint,
            self._base,
            mapping,
            base_path=self._manifest["base"]["path"],
            base_dir=self._base_dir,
            force_base=force_base,
        )

    def _check_base_unchanged(self, verify: bool = False) -> list[dict[str, object]] | None:
        """Refuse to go on if the base changed since the state was created
        (`store.hashing.check_base_unchanged`); returns new stamps of unchanged content."""
        return check_base_unchanged(self._manifest["base"], self._base, verify)

    def _reload_manifest(self) -> None:
        """Read the manifest again (another process may have added since this object opened)."""
        self._manifest = self._storage.load_manifest()
        check_format(self._manifest, self._where)
        use_generation(self._storage, self._manifest, self.method.state_names)

    def _reader(self) -> GenerationReader:
        """The current generation as the method reads it."""
        return GenerationReader(self._storage, self.method, self._manifest)

    def state_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The method's stored state for one tensor (e.g. OPCM's {"sum": S}); {} at step 0. A
        tensor kept as factors (or zero) is formed dense (see `state_factors`)."""
        return self._reader().state(name, self._info_by_name[name].shape)

    def state_rows(self, name: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows `start:stop` of `state_tensors(name)` (first dimension), reading only those."""
        return self._reader().state_rows(name, start, stop, self._info_by_name[name].shape)

    def state_form(self, name: str) -> TensorForm:
        """How one tensor's state is kept now: dense, factored (with its rank) or zero."""
        return self._reader().form(name)

    def state_factors(self, name: str) -> ThinSVD | None:
        """A factored tensor's state as its thin SVD (None for a zero tensor)."""
        return self._reader().factors(name)

    def task_vectors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged - base) in float64 for every floating-point tensor, one at a time."""
        reader = self._reader()
        for info in self._infos:
            yield info.name, reader.task_vector(info)

    def merged_tensors(
        self, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every tensor of the base, one at a time."""
        reader = self._reader()
        yield from merged_tensors(self._base, self._info_by_name, reader.task_vector, dtype)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The whole merged model in memory (small models and tests)."""
        return dict(self.merged_tensors(dtype))

    @contextlib.contextmanager
    def reading(self, verify_base: bool = False) -> Iterator[StateView]:
        """Hold the state still for a reader outside this class (the exports in `publish/`):
        a shared lock, the manifest read again, the base checked unchanged (its whole content
        hashed with `verify_base`). Yields the state's view at that generation."""
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_base_unchanged(verify=verify_base)
            yield self._view()

    def _view(self) -> StateView:
        reader = self._reader()
        return StateView(
            where=self._where,
            state_dir=self._path,
            manifest=self._manifest,
            base=self._base,
            base_dir=self._base_dir,
            infos=list(self._infos),
            task_vector=reader.task_vector,
            task_vector_rows=reader.task_vector_rows,
            task_vector_factors=reader.task_vector_factors,
        )

    # ---------------------------------------------------------------------------- exports

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
        Floating-point tensors are written in `dtype` (the base's by default). `out` is new,
        empty or an earlier export (another folder only with `overwrite`, and then only the
        files an export writes are replaced); it is built beside and switched in whole, so a
        reader sees one export or the other (`publish/destination.py`).
        """
        out = Path(out)
        with self.reading(verify_base) as view:
            export_model(
                view,
                out,
                dtype=dtype,
                max_shard_size=max_shard_size,
                progress=progress,
                overwrite=overwrite,
            )
        return out

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
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            check_export(
                self._view(),
                Path(out),
                dtype=dtype,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
            )


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
