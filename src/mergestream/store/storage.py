"""Where a merge state's tensors live between steps: a directory on disk, or memory.

Disk layout of a state directory:
    manifest.json          method, params, base, step, scalars, ledger, current generation and
                           its parts: every file of the generation with its size, the SHA-256 of
                           its header and the CRC-32 of each tensor; and a SHA-256 of the rest
                           of itself (`manifest.seal_manifest`), so a hand edit is refused
    gen-000003/sum.safetensors   part files of the generation (the local engine writes one per
                           state tensor kind, in the base's names)
    gen-000003/factors-sum.safetensors   the same kind's tensors kept as factors (format 3):
                           NAME.u, NAME.sigma, NAME.v of each, zero-padded to the planned width
                           (`step/forms.py`); tensors whose form is zero have no bytes at all
    lock                   held (flock) by a running add; shared by readers

A step writes generation g+1 beside g, fsyncs it, then replaces manifest.json by an atomic rename
(fsync'd before and after). A crash at any instant therefore leaves the old manifest pointing at
intact old tensors, or the new manifest pointing at complete new ones. Stale generations are
removed after the rename; a step that fails removes its new generation before it returns
(`discard`), and what a killed step left is removed by the next one.

Readers go through the manifest's parts only, so a generation may be made of any number of part
files, each holding some tensors of one state kind (written by several processes, say); each
read is checked against the recorded checksums.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CheckpointError, StateError
from ..io.safetensors_stream import SafetensorsFile, StreamingSafetensorsWriter, TensorSpec
from ..methods.base import COMPUTE_DTYPE, TensorInfo
from ..methods.lowrank import ThinSVD
from .atomic import fsync_dir
from .manifest import (
    DENSE,
    FACTORED,
    LOCK,
    MANIFEST,
    TensorForm,
    check_part_header,
    generation_dir_name,
    load_manifest,
    seal_manifest,
    state_lock,
)

# Factor part files hold a state kind's factored tensors: "factors-<state>.safetensors", and in
# the storage's index of parts the key FACTORS + state.
FACTORS = "factors-"
FACTOR_SUFFIXES = (".u", ".sigma", ".v")


def part_key(part: Mapping[str, Any]) -> str:
    """What a part record holds: its state kind, or FACTORS + the kind for a factor part."""
    state = str(part["state"])
    return FACTORS + state if part.get("form") == FACTORED else state


def factor_specs(info: TensorInfo, width: int) -> list[tuple[str, TensorSpec]]:
    """The three tensors a factored tensor of width `width` is stored as (float64)."""
    m, n = info.shape
    shapes = ((m, width), (width,), (n, width))
    return [
        (info.name + suffix, TensorSpec(COMPUTE_DTYPE, shape))
        for suffix, shape in zip(FACTOR_SUFFIXES, shapes, strict=True)
    ]


def padded(factors: ThinSVD, width: int, name: str) -> tuple[torch.Tensor, ...]:
    """U, σ, V with zero columns (and zero σ) up to `width`, on the CPU."""
    if factors.k > width:
        raise RuntimeError(
            f"tensor {name!r}: its factored state has rank {factors.k}, more than the width "
            f"{width} planned for it"
        )
    out = []
    for tensor in (factors.u, factors.sigma, factors.v):
        full = tensor.new_zeros((*tensor.shape[:-1], width), device="cpu")
        full[..., : factors.k] = tensor
        out.append(full)
    return tuple(out)


class DamagedPart(StateError):
    """A file of the state is missing or fails its recorded checks: `path` and `problem` say
    which and how (the message adds what to do, which depends on what the file holds)."""

    def __init__(self, path: Path, problem: str, advice: str):
        super().__init__(f"{path}: {problem}; {advice}")
        self.path = path
        self.problem = problem


class GenerationWriter(Protocol):
    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def put_factors(self, info: TensorInfo, factors: Mapping[str, ThinSVD]) -> None:
        """One tensor's state kept as factors (its form planned `factored`), per state kind."""
        ...

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Rows `start:start + len` of one tensor's state (a tensor streamed by row blocks)."""
        ...

    def close(self) -> None: ...

    def parts(self) -> list[dict[str, Any]]:
        """The files written and their checksums, for the manifest (after `close`)."""
        ...

    def abort(self) -> None: ...


class Storage(Protocol):
    def load_manifest(self) -> dict[str, Any]: ...

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor: ...

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor: ...

    def read_factors(
        self, generation: int, state_name: str, tensor_name: str, rank: int
    ) -> ThinSVD:
        """A factored tensor's state, cut to its recorded `rank`."""
        ...

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
        forms: Mapping[str, TensorForm] | None = None,
    ) -> GenerationWriter:
        """A writer of `generation`: each tensor in its form (`forms`, absent: dense)."""
        ...

    def use_parts(
        self, generation: int, state_names: tuple[str, ...], parts: list[dict[str, Any]] | None
    ) -> None:
        """Which files hold `generation` (the manifest's `parts`; None for a format-1 state)."""
        ...

    def commit(self, manifest: dict[str, Any]) -> None: ...

    def discard(self, generation: int) -> None:
        """Remove what a step that failed wrote for `generation`, unless the committed manifest
        names it (the failure came after the commit: it is then the state's generation)."""
        ...

    def lock(self, exclusive: bool) -> contextlib.AbstractContextManager[None]: ...


# ------------------------------------------------------------------------------------ memory


# A generation in memory: state kind (or FACTORS + kind) -> tensor name -> tensor (or ThinSVD).
_MemoryGeneration = dict[str, dict[str, Any]]


class _MemoryWriter:
    def __init__(self, target: _MemoryGeneration):
        self.target = target

    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        for state_name, tensor in tensors.items():
            self.target.setdefault(state_name, {})[info.name] = tensor.clone()

    def put_factors(self, info: TensorInfo, factors: Mapping[str, ThinSVD]) -> None:
        for state_name, svd in factors.items():
            u, sigma, v = (t.to("cpu", copy=True) for t in (svd.u, svd.sigma, svd.v))
            self.target.setdefault(FACTORS + state_name, {})[info.name] = ThinSVD(u, sigma, v)

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        for state_name, rows in tensors.items():
            by_name = self.target.setdefault(state_name, {})
            full = by_name.get(info.name)
            if full is None:
                full = by_name[info.name] = torch.empty(info.shape, dtype=rows.dtype)
            full[start : start + rows.shape[0]].copy_(rows)

    def close(self) -> None:
        pass

    def parts(self) -> list[dict[str, Any]]:
        return []

    def abort(self) -> None:
        self.target.clear()


class MemoryStorage:
    """State kept in memory (the one-call `merge()` API); same numerics as disk."""

    def __init__(self) -> None:
        self.manifest: dict[str, Any] = {}
        self.generations: dict[int, _MemoryGeneration] = {}

    def load_manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.manifest))

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor:
        # A copy, as a disk read gives: methods may update what they read in place.
        return self.generations[generation][state_name][tensor_name].clone()

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor:
        return self.generations[generation][state_name][tensor_name][start:stop].clone()

    def read_factors(
        self, generation: int, state_name: str, tensor_name: str, rank: int
    ) -> ThinSVD:
        svd = self.generations[generation][FACTORS + state_name][tensor_name]
        return ThinSVD(svd.u[:, :rank].clone(), svd.sigma[:rank].clone(), svd.v[:, :rank].clone())

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
        forms: Mapping[str, TensorForm] | None = None,
    ) -> GenerationWriter:
        self.generations[generation] = {}
        return _MemoryWriter(self.generations[generation])

    def use_parts(
        self, generation: int, state_names: tuple[str, ...], parts: list[dict[str, Any]] | None
    ) -> None:
        pass

    def commit(self, manifest: dict[str, Any]) -> None:
        self.manifest = json.loads(json.dumps(manifest))
        current = manifest.get("generation")
        for generation in list(self.generations):
            if generation != current:
                del self.generations[generation]

    def discard(self, generation: int) -> None:
        if self.manifest.get("generation") != generation:
            self.generations.pop(generation, None)

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        yield


# -------------------------------------------------------------------------------------- disk


@contextlib.contextmanager
def writing(directory: Path, needed: int | None = None, what: str = "the state") -> Iterator[None]:
    """Turn an OS error while writing new files of a state (a full disk, a quota, permissions)
    into a plain error that says the committed state is not affected."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StateError(
                no_space_message(directory, what, needed)
                + "; the state is unchanged since its last completed step"
            ) from None
        raise StateError(
            f"{directory}: cannot write {'the new state' if what == 'the state' else what} "
            f"({err.strerror or err}); the state is unchanged since its last completed step"
        ) from None


def no_space_message(path: Path, what: str, needed: int | None) -> str:
    """ "no space left on DEVICE while writing WHAT: N bytes needed, M free" for a path."""
    device, free = _device_and_free(path)
    need = f"{needed} bytes needed, " if needed is not None else ""
    return f"no space left on {device} while writing {what}: {need}{free} free"


def _device_and_free(path: Path) -> tuple[str, str]:
    """The mount point holding `path` (its nearest existing ancestor) and its free bytes."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount = existing.resolve()
    with contextlib.suppress(OSError):
        dev = mount.stat().st_dev
        while mount != mount.parent and mount.parent.stat().st_dev == dev:
            mount = mount.parent
    try:
        free = str(shutil.disk_usage(existing).free)
    except OSError:
        free = "an unknown number of bytes"
    return str(mount), free


class _DiskWriter:
    """Writes one generation: a part file per state kind for its dense tensors and one per state
    kind for its factored tensors (`FACTORS`), the local engine's layout; tensors whose form is
    zero get no bytes. The parts and their checksums go into the manifest at commit (`parts`)."""

    def __init__(
        self,
        directory: Path,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
        file_names: Mapping[str, str] | None = None,
        forms: Mapping[str, TensorForm] | None = None,
    ):
        self.directory = directory
        self.state_names = state_names
        forms = forms or {}
        dense = [
            (i.name, TensorSpec(dtype, i.shape))
            for i in infos
            if forms.get(i.name, TensorForm()).kind == DENSE
        ]
        factored = [
            spec
            for i in infos
            if forms.get(i.name, TensorForm()).kind == FACTORED
            for spec in factor_specs(i, forms[i.name].width)
        ]
        self.widths = {
            i.name: forms[i.name].width
            for i in infos
            if forms.get(i.name, TensorForm()).kind == FACTORED
        }
        # A dense file per kind as always, unless every tensor is factored or zero.
        files = []
        if dense or not factored:
            files += [(s, dense) for s in state_names]
        if factored:
            files += [(FACTORS + s, factored) for s in state_names]
        self.needed = sum(spec.nbytes for _, specs in files for _, spec in specs)
        self.writers: dict[str, StreamingSafetensorsWriter] = {}
        try:
            with writing(self.directory, self.needed):
                for key, specs in files:
                    file_name = (file_names or {}).get(key, f"{key}.safetensors")
                    self.writers[key] = StreamingSafetensorsWriter(
                        directory / file_name,
                        specs,
                        metadata={"format": "mergestream-state", "state": key},
                    )
        except BaseException:
            self.abort()
            raise

    def _check_kinds(self, info: TensorInfo, given: Mapping[str, object]) -> None:
        if set(given) != set(self.state_names):
            raise RuntimeError(
                f"state tensors for {info.name!r}: expected {sorted(self.state_names)}, "
                f"got {sorted(given)}"
            )

    def put(self, info: TensorInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check_kinds(info, tensors)
        with writing(self.directory, self.needed):
            for state_name, tensor in tensors.items():
                self.writers[state_name].write(info.name, tensor)

    def put_factors(self, info: TensorInfo, factors: Mapping[str, ThinSVD]) -> None:
        self._check_kinds(info, factors)
        width = self.widths.get(info.name)
        if width is None:
            raise RuntimeError(f"tensor {info.name!r} was not planned as factored")
        with writing(self.directory, self.needed):
            for state_name, svd in factors.items():
                writer = self.writers[FACTORS + state_name]
                for suffix, tensor in zip(
                    FACTOR_SUFFIXES, padded(svd, width, info.name), strict=True
                ):
                    writer.write(info.name + suffix, tensor)

    def put_rows(self, info: TensorInfo, start: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check_kinds(info, tensors)
        with writing(self.directory, self.needed):
            for state_name, rows in tensors.items():
                self.writers[state_name].write_rows(info.name, start, rows)

    def close(self) -> None:
        with writing(self.directory, self.needed):
            for writer in self.writers.values():
                writer.close()
            fsync_dir(self.directory)
            fsync_dir(self.directory.parent)  # the new directory's entry, before the manifest

    def parts(self) -> list[dict[str, Any]]:
        """The manifest's record of the files written (see `DiskStorage.commit`)."""
        return [
            {
                "file": f"{self.directory.name}/{self._final_name(key, writer)}",
                **_part_kind(key),
                **writer.checksums(),
            }
            for key, writer in self.writers.items()
        ]

    def _final_name(self, key: str, writer: StreamingSafetensorsWriter) -> str:
        return writer.path.name

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        shutil.rmtree(self.directory, ignore_errors=True)


def _part_kind(key: str) -> dict[str, str]:
    """A part record's state kind (and form, for a factor file) from its writer's key."""
    if key.startswith(FACTORS):
        return {"state": key.removeprefix(FACTORS), "form": FACTORED}
    return {"state": key}


class PartWriter(_DiskWriter):
    """Writes some of a generation's tensors into part files of their own, one per state kind
    (`<state>.<part>.safetensors`): the share of one task when several processes, perhaps on
    several machines, write one generation together. Only files inside the generation's
    directory are touched. Each file is written under a temporary name private to this writer
    and renamed when complete, so a task that runs again (a retry after its process died) ends
    with one whole file of the same content, never a torn one."""

    def __init__(
        self,
        directory: Path,
        part: str,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
        forms: Mapping[str, TensorForm] | None = None,
    ):
        keys = [*state_names, *(FACTORS + s for s in state_names)]
        self.final_names = {key: f"{key}.{part}.safetensors" for key in keys}
        suffix = f".tmp-{os.getpid()}-{threading.get_ident()}"
        temporary = {key: name + suffix for key, name in self.final_names.items()}
        super().__init__(directory, state_names, infos, dtype, temporary, forms)

    def close(self) -> None:
        with writing(self.directory, self.needed):
            for key, writer in self.writers.items():
                writer.close()
                os.replace(writer.path, self.directory / self.final_names[key])
            fsync_dir(self.directory)

    def _final_name(self, key: str, writer: StreamingSafetensorsWriter) -> str:
        return self.final_names[key]

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
            with contextlib.suppress(OSError):
                writer.path.unlink()


class _RowChain:
    """A CRC-32 being chained over row blocks of one tensor read in row order."""

    __slots__ = ("crc", "next_row")

    def __init__(self) -> None:
        self.crc = 0
        self.next_row = 0


class DiskStorage:
    """A state directory (see the module docstring for the layout and the commit protocol).

    Reads are verified against the checksums the manifest records for the generation: the
    header of each part file when it is opened, and every tensor's CRC-32 as it is read (a
    tensor read by row blocks, in order, is checked when its last block arrives). A mismatch is
    a `StateError` naming the file and tensor, raised before anything is committed.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[str, SafetensorsFile] = {}
        self._parts: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
        self._chains: dict[tuple[str, str], _RowChain] = {}
        self._guard = threading.Lock()  # worker threads read state tensors concurrently

    @classmethod
    def create(cls, path: Path, manifest: dict[str, Any]) -> DiskStorage:
        """A new state directory `path` (absent or empty) holding `manifest`. The new
        directories' entries are synced too, so a crash cannot make the new state vanish; on
        failure nothing half-made is left behind."""
        created = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        storage = cls(path)
        try:
            storage.commit(manifest)
            for directory in (path, *path.parents)[: len(created) + 1]:
                fsync_dir(directory)
        except BaseException:
            for directory in created:  # innermost first
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return storage

    def load_manifest(self) -> dict[str, Any]:
        return load_manifest(self.path)

    def use_parts(
        self, generation: int, state_names: tuple[str, ...], parts: list[dict[str, Any]] | None
    ) -> None:
        """Tell the storage which files make up `generation` (from its manifest). A state of
        format 1 records no parts: its layout is one file per state kind, without checksums."""
        if parts is None:
            parts = [
                {"file": f"{generation_dir_name(generation)}/{s}.safetensors", "state": s}
                for s in state_names
            ]
        by_state: dict[str, dict[str, dict[str, Any]]] = {}
        for part in parts:
            by_state.setdefault(part_key(part), {})[part["file"]] = part
        with self._guard:
            for state_name, files in by_state.items():
                self._parts[(generation, state_name)] = files

    def read(self, generation: int, state_name: str, tensor_name: str) -> torch.Tensor:
        return self._read(generation, state_name, tensor_name, None)

    def read_rows(
        self, generation: int, state_name: str, tensor_name: str, start: int, stop: int
    ) -> torch.Tensor:
        return self._read(generation, state_name, tensor_name, (start, stop))

    def read_factors(
        self, generation: int, state_name: str, tensor_name: str, rank: int
    ) -> ThinSVD:
        u, sigma, v = (
            self._read(generation, FACTORS + state_name, tensor_name + suffix, None)
            for suffix in FACTOR_SUFFIXES
        )
        if not 0 <= rank <= sigma.shape[0]:
            raise StateError(
                f"{self.path}: tensor {tensor_name!r} of generation {generation} is recorded at "
                f"rank {rank}, its factors are {sigma.shape[0]} wide; the state is damaged"
            )
        return ThinSVD(u[:, :rank], sigma[:rank], v[:, :rank])

    def _locate(
        self, generation: int, state_name: str, tensor_name: str
    ) -> tuple[SafetensorsFile, dict[str, Any]]:
        """The open part file holding a tensor of the state, and its manifest record."""
        files = self._parts.get((generation, state_name))
        if files is None:
            raise StateError(
                f"{self.path}: generation {generation} has no files for state {state_name!r}"
            )
        for relative, part in files.items():
            crcs = part.get("crc32")
            if crcs is not None and tensor_name not in crcs:
                continue
            handle = self._open_part(relative, part)
            if tensor_name in handle:
                return handle, part
        raise StateError(
            f"{self.path}: state {state_name!r} of generation {generation} has no tensor "
            f"{tensor_name!r}; the state is damaged"
        )

    def _open_part(self, relative: str, part: dict[str, Any]) -> SafetensorsFile:
        with self._guard:
            handle = self._handles.get(relative)
            if handle is not None:
                return handle
            path = self.path / relative
            if not path.exists():
                raise DamagedPart(
                    path,
                    "this file of the state's current generation is missing",
                    "the state is damaged (restore the file, or start a new state)",
                )
            try:
                handle = SafetensorsFile(path)
            except CheckpointError as err:
                raise StateError(f"state tensors unreadable: {err}") from None
            problem = check_part_header(path, part)
            if problem is not None:
                handle.close()
                raise DamagedPart(path, problem, "the state is damaged")
            self._handles[relative] = handle
            return handle

    def _read(
        self, generation: int, state_name: str, tensor_name: str, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        handle, part = self._locate(generation, state_name, tensor_name)
        try:
            if rows is None:
                tensor = handle.read(tensor_name)
            else:
                tensor = handle.read_rows(tensor_name, *rows)
        except CheckpointError as err:
            raise StateError(f"state tensors unreadable: {err}") from None
        expected = (part.get("crc32") or {}).get(tensor_name)
        if expected is not None:
            self._verify(handle, tensor_name, tensor, rows, expected)
        return tensor

    def _verify(
        self,
        handle: SafetensorsFile,
        tensor_name: str,
        tensor: torch.Tensor,
        rows: tuple[int, int] | None,
        expected: str,
    ) -> None:
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if rows is None:
            crc = zlib.crc32(data)
        else:
            key = (str(handle.path), tensor_name)
            with self._guard:
                chain = self._chains.get(key)
                if rows[0] == 0:
                    chain = self._chains[key] = _RowChain()
                if chain is None or chain.next_row != rows[0]:
                    # Out of order: this pass cannot check the tensor (a later in-order pass
                    # will); the engine and export read blocks in order.
                    self._chains.pop(key, None)
                    return
                chain.crc = zlib.crc32(data, chain.crc)
                chain.next_row = rows[1]
                if chain.next_row < handle.spec(tensor_name).shape[0]:
                    return
                crc = chain.crc
                del self._chains[key]
        if f"{crc:08x}" != expected:
            raise DamagedPart(
                handle.path,
                f"tensor {tensor_name!r} does not match the checksum recorded when it was "
                f"written (CRC-32 {crc:08x}, recorded {expected})",
                "the file was damaged on disk. Nothing was changed; restore the state from a "
                "backup or start a new one",
            )

    def _close_handles(self) -> None:
        with self._guard:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()
            self._chains.clear()

    def begin(
        self,
        generation: int,
        state_names: tuple[str, ...],
        infos: list[TensorInfo],
        dtype: torch.dtype,
        forms: Mapping[str, TensorForm] | None = None,
    ) -> GenerationWriter:
        directory = self.path / generation_dir_name(generation)
        with writing(directory):
            if directory.exists():
                shutil.rmtree(directory)  # leftover of an interrupted step: never referenced
            directory.mkdir()
        return _DiskWriter(directory, state_names, infos, dtype, forms=forms)

    def begin_parts(self, generation: int) -> Path:
        """A fresh, empty directory for `generation`, to be filled by `PartWriter`s (of other
        processes, say); the caller records their parts and calls `seal_parts` before commit."""
        directory = self.path / generation_dir_name(generation)
        with writing(directory):
            if directory.exists():
                shutil.rmtree(directory)  # leftover of an interrupted step: never referenced
            directory.mkdir()
            fsync_dir(self.path)
        return directory

    def seal_parts(self, directory: Path) -> None:
        """Make the entries of a generation written by `PartWriter`s durable (each writer
        synced its files and their names), before the manifest that names them."""
        with writing(directory):
            fsync_dir(directory)
            fsync_dir(directory.parent)

    def discard_parts(self, directory: Path) -> None:
        """Remove a generation begun with `begin_parts` that will not be committed."""
        shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        """Close the files opened for reading (a later read opens them again)."""
        self._close_handles()

    def commit(self, manifest: dict[str, Any]) -> None:
        # The lock file exists from the first commit on, so later commands never add files to a
        # state that they leave unchanged.
        with writing(self.path):
            os.close(os.open(self.path / LOCK, os.O_RDONLY | os.O_CREAT, 0o644))
            write_json_atomic(self.path / MANIFEST, seal_manifest(manifest))
        self._close_handles()
        current = manifest.get("generation")
        if current is not None and manifest.get("parts") is not None:
            self.use_parts(current, (), manifest["parts"])
        keep = generation_dir_name(current) if current is not None else None
        for item in self.path.glob("gen-*"):
            if item.name != keep:
                shutil.rmtree(item, ignore_errors=True)

    def discard(self, generation: int) -> None:
        """Remove the directory of a `generation` that a failed step began (on a full disk it
        may hold gigabytes), unless the manifest on disk names it: a failure after the
        manifest's rename (syncing its directory) leaves the step committed."""
        try:
            committed = load_manifest(self.path).get("generation")
        except StateError:
            return  # cannot tell whether it was committed: the next step removes it if not
        if committed != generation:
            self._close_handles()
            shutil.rmtree(self.path / generation_dir_name(generation), ignore_errors=True)

    def discard_files(self, files: list[str]) -> None:
        """Remove files (relative to the state) that a failed command added to the current
        generation, unless the manifest on disk records them (see `discard`)."""
        try:
            manifest = load_manifest(self.path)
        except StateError:
            return
        prepared = manifest.get("prepared")
        records = [
            *(manifest.get("parts") or []),
            *((prepared.get("parts") or []) if isinstance(prepared, dict) else []),
        ]
        recorded = {part.get("file") for part in records if isinstance(part, dict)}
        self._close_handles()
        for relative in files:
            if relative not in recorded:
                with contextlib.suppress(OSError):
                    (self.path / relative).unlink()

    def lock(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return state_lock(self.path, exclusive)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace `path` with JSON `data` so that readers see the old or the new file, never a mix.
    On failure (a full disk) the temporary file is removed and the old file is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
