"""The contract every continual merge method fulfils (its configuration: `config.py`).

A method is a pure per-tensor rule plus a tiny state schema:
- `state_names`: the per-parameter tensors it keeps (in the state's dtype, float32 unless the
  method or the user chooses float64; one per floating-point tensor of the
  base), e.g. OPCM's unscaled running sum.
- scalars: a flat dict of floats kept in the manifest (step counts, norms, scales).
- `update`: for one tensor, old state + incoming task vector -> new state, plus partial sums that
  the engine reduces over the whole model into the step's global scalars (`finish_step`).
- `task_vector`: merged minus base for one tensor, from its state and the scalars.
- `prepare_step` (optional): extra read-only passes over the model before the update pass, for
  rules that need a global quantity first (e.g. a whole-model magnitude threshold).
- `update_rows` (optional): the same fold for a tensor too large to hold whole, reading and
  writing it by blocks of rows. The default suits every elementwise rule; a rule that needs the
  whole tensor at once says so in `streams_rows`, or overrides `update_rows` (OPCM does).
- `update_factored` / `task_vector_factored` (methods with `factored`): `update` and
  `task_vector` of a 2-D tensor whose state is kept as a thin SVD and whose task vector comes as
  low-rank factors (a LoRA adapter's), computed with `lowrank.py` without an m×n matrix; the
  engine picks them for tensors planned factored (`step/forms.py`).

The engine owns all I/O, ordering, validation and atomic commits; methods never touch files.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import ConfigError
from .config import MethodConfig, build_config
from .linalg import COMPUTE_DTYPE as COMPUTE_DTYPE  # the kernels' precision, named here too
from .lowrank import Factors, ThinSVD

STATE_DTYPE = torch.float32  # default stored state precision; all arithmetic runs in float64
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

Scalars = dict[str, float]

# State keys under which a prepared generation's factors reach `update` (see `prepare_tensor`).
PREPARED_PREFIX = "prepared."


@dataclass(frozen=True)
class TensorInfo:
    """One floating-point tensor of the model, as the method sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the base checkpoint's dtype
    projected: bool  # a 2-D linear-layer weight (see classify.py)

    def rows(self, start: int, stop: int) -> TensorInfo:
        """The same tensor cut to rows `start:stop` (a block of a streamed tensor)."""
        return dataclasses.replace(self, shape=(stop - start, *self.shape[1:]))


@dataclass(frozen=True)
class StepTensor:
    """What a preparation pass sees for one tensor."""

    info: TensorInfo
    state: Mapping[str, torch.Tensor]
    task_vector: torch.Tensor  # float64, incoming minus base


class RowBlocks(Protocol):
    """One tensor of a step, reachable by blocks of rows (its first dimension): the engine hands
    this to `update_rows` for tensors too large to hold whole in float64."""

    info: TensorInfo
    blocks: list[tuple[int, int]]  # (start, stop) row ranges covering the tensor, in order

    def task_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows of the incoming task vector, float64, a private copy."""
        ...

    def state_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows of the previous state tensors ({} at step 1), private copies."""
        ...

    def write_rows(self, start: int, state: Mapping[str, torch.Tensor]) -> None:
        """Store rows of the new state tensors (every row exactly once, any order)."""
        ...


@dataclass
class TensorUpdate:
    state: dict[str, torch.Tensor]  # new state tensors, in the method's state_dtype
    partials: Scalars = dataclasses.field(default_factory=dict)  # summed over all tensors


class ContinualMethod(ABC):
    """A continual merge rule; subclasses set the class variables and implement the hooks."""

    name: ClassVar[str]  # from the config's `method` unless the class sets it
    summary: ClassVar[str]  # from the config's `summary` unless the class sets it
    config_class: ClassVar[type[MethodConfig]]
    state_names: ClassVar[tuple[str, ...]]
    # Precision of stored state tensors unless the user picks another (see `state_dtype`).
    default_state_dtype: ClassVar[torch.dtype] = STATE_DTYPE
    # Whether a 2-D tensor's state can be kept as low-rank factors (`update_factored`); from
    # the config's `factored` unless the class sets it. Such a method has one state tensor.
    factored: ClassVar[bool] = False
    # Whether the update of a zero state with a zero task vector is a zero state with zero
    # partial sums, so that a tensor no input has changed needs no bytes (the "zero" form).
    keeps_zero: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("config_class")
        for attribute, source in (
            ("name", "method"),
            ("summary", "summary"),
            ("factored", "factored"),
        ):
            if attribute not in cls.__dict__ and hasattr(config, source):
                setattr(cls, attribute, getattr(config, source))

    def __init__(self, config: MethodConfig | None = None, **params: Any) -> None:
        if config is not None and params:
            raise ConfigError(f"{self.name}: pass either a config object or keyword parameters")
        if config is None:
            config = build_config(self.config_class, params)
        elif not isinstance(config, self.config_class):
            raise ConfigError(
                f"{self.name}: expected a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.state_dtype: torch.dtype = self.default_state_dtype

    def stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` rounded to the state's storage precision (what the next step will read)."""
        return tensor.to(self.state_dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({args})"

    def initial_scalars(self) -> Scalars:
        return {}

    def prepare_step(
        self, step: int, scalars: Scalars, tensors: Callable[[], Iterator[StepTensor]]
    ) -> Scalars:
        """Optional read-only passes before the update pass; returns extra scalars for `update`.

        `tensors()` starts a fresh pass each time it is called (one tensor in memory at a time).
        """
        return {}

    @abstractmethod
    def update(
        self,
        info: TensorInfo,
        step: int,
        state: Mapping[str, torch.Tensor],
        task_vector: torch.Tensor,
        scalars: Scalars,
    ) -> TensorUpdate:
        """Fold one tensor of the `step`-th model (1-based) into the state.

        `state` is empty at step 1; `task_vector` is float64; `scalars` holds the scalars before
        this step plus whatever `prepare_step` returned. `state` and `task_vector` are private
        copies that nothing reads afterwards, so the method may update them in place (large
        tensors then need no second full-size buffer).
        """

    # Per-tensor quantities a method can compute from the current state alone, ahead of the
    # next step (`MergeState.prepare`), e.g. OPCM's decompositions. They reach `update` in
    # `state` under PREPARED_PREFIX + name, and must give the same result bit for bit as
    # computing them inside `update`.
    prepared_names: ClassVar[tuple[str, ...]] = ()

    def prepare_tensor(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The prepared quantities of one tensor (a subset of `prepared_names`), float64."""
        return {}

    def prepared_shapes(self, info: TensorInfo) -> dict[str, tuple[int, ...]]:
        """The shapes `prepare_tensor` returns for this tensor, known from its info alone."""
        return {}

    def streams_rows(self, info: TensorInfo) -> bool:
        """Whether `update_rows` can fold this tensor block by block. True for the default
        (elementwise) `update_rows`; a rule that needs whole-tensor quantities returns False."""
        return True

    def update_rows(
        self, info: TensorInfo, step: int, rows: RowBlocks, scalars: Scalars
    ) -> Scalars:
        """`update` for a tensor streamed by row blocks; returns the tensor's partial sums.

        The default applies `update` to every block on its own, which is exact for elementwise
        rules (the partial sums are sums over entries, so they add up over blocks).
        """
        partials: Scalars = {}
        for start, stop in rows.blocks:
            update = self.update(
                info.rows(start, stop),
                step,
                rows.state_rows(start, stop),
                rows.task_rows(start, stop),
                scalars,
            )
            rows.write_rows(start, update.state)
            for key, value in update.partials.items():
                partials[key] = partials.get(key, 0.0) + value
        return partials

    @abstractmethod
    def finish_step(self, step: int, scalars: Scalars, partials: Scalars) -> Scalars:
        """The scalars after the step, from the previous ones and the summed partials."""

    @abstractmethod
    def task_vector(
        self, info: TensorInfo, state: Mapping[str, torch.Tensor], scalars: Scalars
    ) -> torch.Tensor:
        """Merged minus base for one tensor, float64. Must be elementwise in the state (export
        calls it on blocks of rows of large tensors, with `info.shape` the block's shape)."""

    # ------------------------------------------------------------------ low-rank form

    def update_factored(
        self,
        info: TensorInfo,
        step: int,
        state: ThinSVD | None,
        task: Factors | None,
        scalars: Scalars,
    ) -> tuple[ThinSVD | None, Scalars]:
        """`update` of a 2-D tensor kept as factors (methods with `factored`): the new state
        as a thin SVD (float64, whatever `state_dtype`) and the same partial sums, under the
        same keys, that `update` gives for the dense tensors these factors stand for.

        `state` is None where the previous state is zero (step 1, or a tensor no input has
        changed yet); `task` is None where the input leaves the tensor unchanged (a zero task
        vector). Both None (any shape): the zero state stays zero, returned as None with zero
        partial sums (see `keeps_zero`)."""
        raise NotImplementedError(f"{self.name} keeps no tensor as low-rank factors")

    def task_vector_factored(
        self, info: TensorInfo, state: ThinSVD, scalars: Scalars
    ) -> ThinSVD:
        """`task_vector` of a tensor whose state is the thin SVD `state`: merged minus base, as
        a thin SVD (float64)."""
        raise NotImplementedError(f"{self.name} keeps no tensor as low-rank factors")
