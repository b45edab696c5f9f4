"""MergeState: a base, a method, and everything merged so far, persisted between steps.

    state = MergeState.create("state/", "base-model/", method=OPCM(alpha=0.5))
    state.add("finetuned-1/")          # one step per checkpoint, committed atomically
    state.export("merged/")            # base + merged task vector as an HF model directory

The same object works in memory (`MergeState.in_memory`) for the one-call `merge()` API; the
numerics are identical (state tensors are stored as float32 either way).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .engine import StepStats, check_compatible, default_workers, run_step, tensor_infos
from .errors import CheckpointError, ConfigError, MergestreamError, StateError
from .export import (
    DEFAULT_MAX_SHARD_SIZE,
    copy_model_files,
    merged_tensors,
    write_model,
)
from .hashing import content_hash, file_stamps
from .io.checkpoint import CheckpointLike, TensorSource, config_dir, open_checkpoint
from .io.lora import LoraAdapter, LoraSource, base_identity, refuse_adapter_as_base
from .io.mapping import MappedSource, NameMapping, apply_mapping
from .io.safetensors_stream import dtype_name
from .methods import ContinualMethod, TensorInfo, get_method
from .methods.base import COMPUTE_DTYPE, STATE_DTYPES
from .modelcard import provenance_metadata, render_model_card
from .plan import Plan, plan_add
from .progress import Progress
from .storage import DiskStorage, MemoryStorage, Storage, fsync_dir

FORMAT = "mergestream-state"
FORMAT_VERSION = 1


REQUIRED_KEYS = ("method", "base", "step", "generation", "scalars", "ledger")


def check_format(manifest: Any, where: object) -> None:
    """Refuse a manifest this version cannot read, before anything relies on its contents."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{where}: not a mergestream state manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StateError(
            f"{where}: state format version {version} was written by mergestream "
            f"{manifest.get('mergestream_version', '?')}; this mergestream ({__version__}) reads "
            f"version {FORMAT_VERSION} only"
            + ("; upgrade mergestream to use this state" if newer else "")
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise StateError(f"{where}: the state manifest lacks {missing[0]!r}; it is damaged")


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
        self.method = get_method(
            self._manifest["method"]["name"], **self._manifest["method"]["params"]
        )
        self.method.state_dtype = STATE_DTYPES[self._manifest["state_dtype"]]
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
        path.mkdir(parents=True, exist_ok=True)
        base_path = Path(base).resolve()
        manifest = cls._new_manifest(
            resolved_method, base_source, str(base_path), state_dtype, progress
        )
        storage = DiskStorage(path)
        storage.commit(manifest)
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
        storage = MemoryStorage()
        storage.commit(
            cls._new_manifest(
                resolved_method, base_source, base_source.description, state_dtype, hash_base=False
            )
        )
        return cls(storage, base_source, config_dir(base))

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
        """A step-0 manifest. An in-memory state skips hashing the base: it holds the base
        open for its whole life, so there is no later run to compare it with."""
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
            "created": _now(),
            "method": {"name": method.name, "params": method.config.to_dict()},
            "state_dtype": state_dtype,
            "base": {
                "path": base_description,
                "sha256": content_hash(base, progress) if hash_base else None,
                "files": file_stamps(base.files()),
            },
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

    def status(self) -> dict[str, Any]:
        """Everything `mergestream status` shows, as plain data."""
        roles = {"projected": 0, "added": 0, "copied": 0}
        for name in self._base.names():
            info = self._info_by_name.get(name)
            roles["copied" if info is None else "projected" if info.projected else "added"] += 1
        return {
            "method": self._manifest["method"],
            "base": self._manifest["base"]["path"],
            "step": self.step,
            "scalars": self.scalars,
            "tensors": roles,
            "ledger": self.ledger,
            "created": self._manifest["created"],
            "mergestream_version": self._manifest["mergestream_version"],
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
        force_base: bool = False,
    ) -> StepStats:
        """Merge one checkpoint as the next step and commit it atomically.

        The checkpoint must hold the base's floating-point tensors under the base's names, or be
        mapped onto them with `strip_prefix` / `add_prefix` (renaming), `missing="base"` (absent
        tensors are unchanged from the base) and `extra="ignore"` (tensors the base lacks are
        left out); the ledger records the mapping. Anything wrong with the checkpoint raises
        before the state changes.

        A PEFT LoRA adapter folder is merged from its factors (`io.lora`); `force_base` merges
        one whose `base_model_name_or_path` does not name this state's base.
        """
        mapping = NameMapping(strip_prefix, add_prefix, missing, extra)
        with self._storage.lock(exclusive=True), contextlib.ExitStack() as cleanup:
            self._reload_manifest()
            base_stamps = self._check_base_unchanged()
            raw, source = self._open_input(checkpoint, mapping, force_base)
            cleanup.callback(raw.close)
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
            step = self.step + 1
            generation = (self._manifest["generation"] or 0) + 1
            method = self.method

            def read_state(info: TensorInfo) -> dict[str, torch.Tensor]:
                return self.state_tensors(info.name)  # still the previous generation here

            def read_state_rows(info: TensorInfo, start: int, stop: int) -> dict[str, torch.Tensor]:
                return self.state_rows(info.name, start, stop)

            writer = self._storage.begin(
                generation, method.state_names, self._infos, method.state_dtype
            )
            try:
                stats = run_step(
                    method,
                    step,
                    self.scalars,
                    self._infos,
                    self._base,
                    source,
                    read_state,
                    writer.put,
                    read_state_rows=read_state_rows,
                    write_state_rows=writer.put_rows,
                    device=device,
                    workers=workers,
                    progress=progress,
                )
                writer.close()
            except BaseException:
                writer.abort()
                raise
            manifest = json.loads(json.dumps(self._manifest))
            manifest["step"] = step
            manifest["generation"] = generation
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
            if isinstance(source, LoraSource):
                entry["adapter"] = source.summary()
            manifest["ledger"].append(entry)
            self._storage.commit(manifest)
            self._manifest = manifest
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

    def _check_base_unchanged(self) -> list[dict[str, object]] | None:
        """Refuse to go on if the base's content changed since the state was created. Returns
        the base files' current stamps when they differ from the recorded ones but the content
        is the same (e.g. the files were copied), so the next commit can record them."""
        recorded = self._manifest["base"]
        files = self._base.files()
        if not files:
            return None
        try:
            stamps = file_stamps(files)
        except OSError as err:
            raise StateError(
                f"the base at {recorded['path']} cannot be read any more ({err})"
            ) from None
        if stamps == recorded["files"] or recorded["sha256"] is None:
            return None
        if content_hash(self._base) != recorded["sha256"]:
            raise StateError(
                f"the base at {recorded['path']} has changed since this state was created "
                f"(its content hash is no longer the recorded {recorded['sha256'][:16]}...); "
                "merging into or exporting from a different base would be wrong. Restore the "
                "original base files, or start a new state for the new base"
            )
        return stamps

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
    ) -> Path:
        """Write the merged model to directory `out` as HF-style safetensors (one file, or shards
        of at most `max_shard_size` with an index), the base's config/tokenizer files and a
        model card with provenance, so `transformers.AutoModel.from_pretrained(out)` loads it.

        Floating-point tensors are written in `dtype`, or the base's dtype by default.
        """
        out = Path(out)
        self._check_export_target(out)
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_base_unchanged()
            files = write_model(
                out,
                self._base,
                self._info_by_name,
                self._task_vector,
                dtype,
                provenance_metadata(self._manifest),
                max_shard_size,
                progress,
                task_vector_rows=self._task_vector_rows,
            )
            copied = copy_model_files(self._base_dir, out)
            dtypes = {dtype_name(dtype or i.dtype) for i in self._infos}
            card = render_model_card(self._manifest, files, "/".join(sorted(dtypes)), copied)
            (out / "README.md").write_text(card)
            fsync_dir(out)
        return out

    @contextlib.contextmanager
    def reading(self) -> Iterator[TensorSource]:
        """Hold the state still for a reader outside this class (the LoRA export): a shared
        lock, the manifest read again, the base checked unchanged. Yields the base."""
        with self._storage.lock(exclusive=False):
            self._reload_manifest()
            self._check_base_unchanged()
            yield self._base

    def _check_export_target(self, out: Path) -> None:
        target = out.resolve()
        if self._path is not None:
            state_dir = self._path.resolve()
            if target == state_dir or state_dir in target.parents:
                raise MergestreamError(f"{out}: cannot export into the state directory")
        if self._base_dir is not None and target == self._base_dir.resolve():
            raise MergestreamError(f"{out}: cannot export into the base model's directory")


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
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge `checkpoints` into `base` in the given order and return the merged state dict.

    Paths or in-memory state dicts are accepted. Nothing is written to disk.
    """
    state = MergeState.in_memory(base, method, state_dtype=state_dtype, **params)
    for checkpoint in checkpoints:
        state.add(checkpoint, allow_duplicate=True, device=device)
    return state.state_dict(dtype)
