"""A committed generation as its readers see it: state tensors, the task vectors they give,
and `StateView`, the whole state held still for a reader (an export, a plan).

The merged model is the base plus the method's task vector, computed per tensor from the
stored state (`ContinualMethod.task_vector`); rows of the state give rows of the task vector,
so a tensor too large to hold twice is read a row block at a time.

Each tensor is read in its form (`step/forms.py`): a factored one as its thin SVD (`factors`),
or, for a reader that wants the dense tensor, as U·Σ·Vᵀ formed once (by row blocks where asked);
a zero one as zeros. Its task vector is the method's `task_vector_factored` of the factors,
formed the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..io.source import TensorSource
from ..methods.base import COMPUTE_DTYPE, ContinualMethod, TensorInfo
from ..methods.lowrank import ThinSVD
from .manifest import DENSE, DENSE_FORM, FACTORED, ZERO, TensorForm, read_forms
from .storage import Storage


def use_generation(
    storage: Storage, manifest: Mapping[str, Any], state_names: tuple[str, ...]
) -> None:
    """Tell `storage` the part files of `manifest`'s generation (and of its preparation, when
    it belongs to that generation), so reads are checked against their records."""
    generation = manifest["generation"]
    if generation is None:
        return
    storage.use_parts(generation, state_names, manifest.get("parts"))
    prepared = manifest.get("prepared")
    if isinstance(prepared, dict) and prepared.get("generation") == generation:
        storage.use_parts(generation, (), prepared.get("parts") or [])


class GenerationReader:
    """Reads the generation `manifest` names from `storage` (nothing at step 0)."""

    def __init__(
        self, storage: Storage, method: ContinualMethod, manifest: Mapping[str, Any]
    ) -> None:
        self._storage = storage
        self._method = method
        self._generation: int | None = manifest["generation"]
        self._scalars = dict(manifest["scalars"])
        self._forms = read_forms(manifest)
        # The last factored task vector formed: a large tensor exported by row blocks reads
        # and scales its factors once, not once per block.
        self._last: tuple[str, ThinSVD] | None = None

    def form(self, name: str) -> TensorForm:
        """How tensor `name` is stored in this generation (dense at step 0)."""
        return self._forms.get(name, DENSE_FORM)

    def factors(self, name: str) -> ThinSVD | None:
        """A factored tensor's state as its thin SVD (float64); None for a zero tensor."""
        form = self.form(name)
        if form.kind == ZERO:
            return None
        if form.kind != FACTORED or self._generation is None:
            raise ValueError(f"tensor {name!r} is stored dense, not as factors")
        (state_name,) = self._method.state_names
        return self._storage.read_factors(self._generation, state_name, name, form.rank)

    def state(self, name: str, shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """The method's stored state for one tensor (e.g. OPCM's {"sum": S}); {} at step 0. A
        factored or zero tensor (whose `shape` must then be given) is formed dense."""
        if self._generation is None:
            return {}
        form = self.form(name)
        if form.kind == ZERO:
            assert shape is not None, "a zero tensor is formed from its shape"
            (state_name,) = self._method.state_names
            return {state_name: torch.zeros(shape, dtype=self._method.state_dtype)}
        if form.kind == FACTORED:
            assert shape is not None, "a factored tensor is formed from its shape"
            return self.state_rows(name, 0, shape[0], shape)
        return {
            s: self._storage.read(self._generation, s, name) for s in self._method.state_names
        }

    def state_rows(
        self, name: str, start: int, stop: int, shape: tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """Rows `start:stop` of `state(name)` (first dimension), reading only those (of a
        factored tensor: rows of U·Σ times Vᵀ)."""
        if self._generation is None:
            return {}
        form = self.form(name)
        if form.kind == DENSE:
            return {
                s: self._storage.read_rows(self._generation, s, name, start, stop)
                for s in self._method.state_names
            }
        assert shape is not None, "a factored or zero tensor is formed from its shape"
        dtype = self._method.state_dtype
        svd = self.factors(name)
        (state_name,) = self._method.state_names
        if svd is None:
            return {state_name: torch.zeros((stop - start, *shape[1:]), dtype=dtype)}
        return {state_name: _rows(svd, start, stop).to(dtype)}

    def task_vector(self, info: TensorInfo) -> torch.Tensor:
        """Merged minus base for one tensor, float64 (zero at step 0)."""
        if self._generation is None:
            return torch.zeros(info.shape, dtype=COMPUTE_DTYPE)
        if self.form(info.name).kind == FACTORED:
            return self.task_vector_rows(info, 0, info.shape[0])
        return self._method.task_vector(info, self.state(info.name, info.shape), self._scalars)

    def task_vector_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of `task_vector(info)`."""
        block = info.rows(start, stop)
        if self._generation is None:
            return torch.zeros(block.shape, dtype=COMPUTE_DTYPE)
        merged = self.task_vector_factors(info)
        if merged is not None:
            return _rows(merged, start, stop)
        return self._method.task_vector(
            block, self.state_rows(info.name, start, stop, info.shape), self._scalars
        )

    def task_vector_factors(self, info: TensorInfo) -> ThinSVD | None:
        """A factored tensor's task vector as a thin SVD (`task_vector_factored`); None for a
        tensor stored dense or zero."""
        if self._generation is None or self.form(info.name).kind != FACTORED:
            return None
        if self._last is not None and self._last[0] == info.name:
            return self._last[1]
        svd = self.factors(info.name)
        assert svd is not None
        merged = self._method.task_vector_factored(info, svd, self._scalars)
        self._last = (info.name, merged)
        return merged


def _rows(svd: ThinSVD, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of U·diag(σ)·Vᵀ (float64): the only m×n product a reader forms."""
    return (svd.u[start:stop] * svd.sigma) @ svd.v.mT


TaskVectorFn = Callable[[TensorInfo], torch.Tensor]
TaskVectorRowsFn = Callable[[TensorInfo, int, int], torch.Tensor]
TaskVectorFactorsFn = Callable[[TensorInfo], ThinSVD | None]


def _no_factors(info: TensorInfo) -> ThinSVD | None:
    return None


@dataclass(frozen=True)
class StateView:
    """One generation of a merge state, read under its lock (`MergeState.reading()`).

    `task_vector(info)` is the merged model minus the base for one tensor (float64);
    `task_vector_rows(info, start, stop)` its rows `start:stop`, reading only those;
    `task_vector_factors(info)` the task vector of a tensor kept as factors as a thin SVD (None
    for any other tensor), which a reader that can use factors takes instead of forming it."""

    where: str  # the state directory, or "<memory>"
    state_dir: Path | None
    manifest: Mapping[str, Any]
    base: TensorSource
    base_dir: Path | None  # the base's folder (config, tokenizer), when it has one
    infos: list[TensorInfo]
    task_vector: TaskVectorFn
    task_vector_rows: TaskVectorRowsFn
    task_vector_factors: TaskVectorFactorsFn = _no_factors

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def ledger(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self.manifest["ledger"]]

    @property
    def base_path(self) -> str:
        """The base as the state records it (a path, or a description for one in memory)."""
        return str(self.manifest["base"]["path"])

    @property
    def info_by_name(self) -> dict[str, TensorInfo]:
        return {info.name: info for info in self.infos}

    def task_vectors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged - base) in float64 for every merged tensor, one at a time."""
        for info in self.infos:
            yield info.name, self.task_vector(info)


class Readable(Protocol):
    """Anything that can hold a state still for a reader: a `MergeState`."""

    def reading(self, verify_base: bool = False) -> contextlib.AbstractContextManager[StateView]:
        ...
