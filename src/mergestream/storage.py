"""Where a merge state's tensors live between steps: a directory on disk, or memory.

Disk layout of a state directory:
    manifest.json          method, params, base, step, scalars, ledger, current generation
    gen-000003/sum.safetensors   one file per state tensor kind (float32, the base's names)
    lock                   held (flock) by a running add; shared by readers

A step writes generation g+1 beside g, fsyncs it, then replaces manifest.json by an atomic rename
(fsync'd before and after). A crash at any instant therefore leaves the old manifest pointing at
intact old tensors, or the new manifest pointing at complete new ones. Stale generations are
removed after the rename, and leftovers of an interrupted step are removed by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import CheckpointError, StateError
from .io.safetensors_stream import SafetensorsFile, StreamingSafetensorsWriter, TensorSpec
from .methods.base import TensorInfo

MANIFEST = "manifest.json"
LOCK = "lock"


def generation_dir_name(generation: int) -> str:
    return f"gen-{generation:06d}"


class GenerationWriter(Protocol):
    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Rows `start:start + len` of one tensor's state (a tensor streamed by row blocks)."""
        ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    def load_manifest(self) -> dict[str, Any]: ...

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor: ...

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor: ...

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
    ) -> GenerationWriter: ...

    def commit(self, manifest: dict[str, Any]) -> None: ...

    def lock(self, exclusive: bool) -> contextlib.AbstractContextManager[None]: ...


# ------------------------------------------------------------------------------------ memory


class _MemoryWriter:
    def __init__(self, target: dict[str, dict[str, torch.Tensor]]):
        self.target = target

    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        for state_name, tensor in tensors.items():
            self.target.setdefault(state_name, {})[info.name] = tensor.clone()

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        for state_name, rows in tensors.items():
            by_name = self.target.setdefault(state_name, {})
            full = by_name.get(info.name)
            if full is None:
                full = by_name[info.name] = torch.empty(info.shape, dtype=rows.dtype)
            full[start : start + rows.shape[0]].copy_(rows)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.target.clear()


class MemoryStorage:
    """State kept in memory (the one-call `merge()` API); same numerics as disk."""

    def __init__(self) -> None:
        self.manifest: dict[str, Any] = {}
        self.generations: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def load_manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.manifest))

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor:
        # A copy, as a disk read gives: methods may update what they read in place.
        return self.generations[generation][state_name][tensor_name].clone()

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor:
        return self.generations[generation][state_name][tensor_name][start:stop].clone()

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
    ) -> GenerationWriter:
        self.generations[generation] = {}
        return _MemoryWriter(self.generations[generation])

    def commit(self, manifest: dict[str, Any]) -> None:
        self.manifest = json.loads(json.dumps(manifest))
        current = manifest.get("generation")
        for generation in list(self.generations):
            if generation != current:
                del self.generations[generation]

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        yield


# -------------------------------------------------------------------------------------- disk


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Turn an OS error while writing a new generation (a full disk, a quota, permissions) into
    a plain error that says the committed state is not affected."""
    try:
        yield
    except OSError as err:
        raise StateError(
            f"{directory}: cannot write the new state ({err.strerror or err}); the state is "
            "unchanged since its last completed step"
        ) from None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DiskWriter:
    def __init__(
        self,
        directory: Path,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
    ):
        self.directory = directory
        specs = [(i.name, TensorSpec(dtype, i.shape)) for i in infos]
        self.writers: dict[str, StreamingSafetensorsWriter] = {}
        try:
            for state_name in state_names:
                self.writers[state_name] = StreamingSafetensorsWriter(
                    directory / f"{state_name}.safetensors",
                    specs,
                    metadata={"format": "mergestream-state", "state": state_name},
                )
        except BaseException:
            self.abort()
            raise

    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.writers):
            raise RuntimeError(
                f"state tensors for {info.name!r}: expected {sorted(self.writers)}, "
                f"got {sorted(tensors)}"
            )
        with _writing(self.directory):
            for state_name, tensor in tensors.items():
                self.writers[state_name].write(info.name, tensor)

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.writers):
            raise RuntimeError(
                f"state tensors for {info.name!r}: expected {sorted(self.writers)}, "
                f"got {sorted(tensors)}"
            )
        with _writing(self.directory):
            for state_name, rows in tensors.items():
                self.writers[state_name].write_rows(info.name, start, rows)

    def close(self) -> None:
        with _writing(self.directory):
            for writer in self.writers.values():
                writer.close()
            fsync_dir(self.directory)
            fsync_dir(self.directory.parent)  # the new directory's entry, before the manifest

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        shutil.rmtree(self.directory, ignore_errors=True)


class DiskStorage:
    """A state directory (see the module docstring for the layout and the commit protocol)."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[tuple[int, str], SafetensorsFile] = {}

    def load_manifest(self) -> dict[str, Any]:
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StateError(
                f"{self.path}: not a merge state (no {MANIFEST}); create one with init"
            )
        try:
            return json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise StateError(f"{manifest_path}: unreadable manifest ({err})") from err

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor:
        return self._read(generation, state_name, tensor_name, None)

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor:
        return self._read(generation, state_name, tensor_name, (start, stop))

    def _read(
        self, generation: int, state_name: str, tensor_name: str, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        key = (generation, state_name)
        handle = self._handles.get(key)
        if handle is None:
            path = self.path / generation_dir_name(generation) / f"{state_name}.safetensors"
            try:
                handle = SafetensorsFile(path)
            except CheckpointError as err:
                raise StateError(f"state tensors unreadable: {err}") from None
            self._handles[key] = handle
        if tensor_name not in handle:
            raise StateError(f"{handle.path}: state {state_name!r} has no tensor {tensor_name!r}")
        try:
            if rows is None:
                return handle.read(tensor_name)
            return handle.read_rows(tensor_name, *rows)
        except CheckpointError as err:
            raise StateError(f"state tensors unreadable: {err}") from None

    def _close_handles(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
    ) -> GenerationWriter:
        directory = self.path / generation_dir_name(generation)
        with _writing(directory):
            if directory.exists():
                shutil.rmtree(directory)  # leftover of an interrupted step: never referenced
            directory.mkdir()
            return _DiskWriter(directory, state_names, infos, dtype)

    def commit(self, manifest: dict[str, Any]) -> None:
        # The lock file exists from the first commit on, so later commands never add files to a
        # state that they leave unchanged.
        os.close(os.open(self.path / LOCK, os.O_RDONLY | os.O_CREAT, 0o644))
        write_json_atomic(self.path / MANIFEST, manifest)
        self._close_handles()
        current = manifest.get("generation")
        keep = generation_dir_name(current) if current is not None else None
        for item in self.path.glob("gen-*"):
            if item.name != keep:
                shutil.rmtree(item, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        lock_path = self.path / LOCK
        if not exclusive and lock_path.exists():
            fd = os.open(lock_path, os.O_RDONLY)  # readers need no write access to the state
        else:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(
                        f"{self.path}: another mergestream process is "
                        f"{'using' if exclusive else 'adding to'} this state; "
                        "wait for it to finish and try again"
                    ) from None
                raise
            yield
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace `path` with JSON `data` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
