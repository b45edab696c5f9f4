"""The three forms of a method's per-tensor state, and how a step plans them.

A stream of LoRA adapters never leaves low rank: after t adapters of rank r, the running sum of
every method that combines task vectors linearly or through an SVD has rank at most t·r. A
state therefore keeps each tensor in one of three forms, recorded per generation:

- **dense**: the m×n tensor in the state's dtype, in the generation's dense part files
  (`gen-N/sum.safetensors`, as every state before format 3 stores every tensor);
- **factored**: a 2-D tensor's state as a thin SVD S = U diag(σ) Vᵀ (`methods/lowrank.ThinSVD`),
  float64 whatever the state's dtype (the factors are small), stored as three tensors NAME.u
  (m×w), NAME.sigma (w) and NAME.v (n×w) in factor part files `factors-<state>.safetensors`
  beside the dense ones. w is the width planned before the step, the true rank k <= w comes
  out of it: the columns beyond k are zeros, and the manifest records k;
- **zero**: no bytes at all, for a tensor no input has changed yet (a bias, a norm, every
  matrix no adapter targets).

The manifest records the forms of its generation (`store/manifest.py`, format 3):

    "forms": {name: {"form": "factored", "rank": k, "width": w} | {"form": "zero"}}

and a name absent is dense. States of formats 1 and 2 are dense throughout; a state created
with `lowrank=False` (`mergestream init --dense`, recorded as `"lowrank": false`) stays dense
throughout too, which is what the tests compare the factored path against.

Forms are planned before the step, from the previous forms, the method and the incoming input's
headers alone (`plan_forms`), because the streaming writer needs every tensor's header shape
before the first byte is written. A tensor is planned

- **factored** when the method supports factors (`ContinualMethod.factored`: OPCM, task
  arithmetic, the running average, Iso-C and TSV-M), the tensor is 2-D, its previous form is
  zero or factored, the input gives it as factors (a LoRA adapter's τ = s·B·A:
  `LoraSource.task_factors`) or leaves it unchanged, and the bound w = k_previous + r_incoming
  (at most min(m, n)) passes the switch rule `lowrank.factored_pays(shape, w)`. The rule is
  decided on the bound, so it is known in advance; a matrix that fails it goes dense by itself,
  for good (its factored state is densified once, as the dense kernel's previous state);
- **zero** when its previous form is zero, the input leaves it unchanged, and the method's
  update of a zero state with a zero task vector is zero (`ContinualMethod.keeps_zero`: true
  for all five methods above; Iso-C and TSV-M combine (0, 0) into 0);
- **dense** otherwise: a full checkpoint's tensors, an adapter's tensors saved whole or its
  lora_B biases, and every tensor of TIES, MagMax and DOP, which are elementwise or solve
  per-matrix systems and stay dense everywhere.

The step then folds each tensor in its planned form (`engine.fold_tensors`): factored tensors
through `update_factored` on the previous thin SVD (never row-streamed: they are small), zero
ones not at all (their partial sums are zeros), dense ones through the dense kernel, which reads
a previous factored or zero state as the dense tensor it stands for. Every backend runs the
same code with the same planned forms, so a distributed step gives the local engine's bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..io.source import TensorSource
from ..methods.base import ContinualMethod, TensorInfo
from ..methods.lowrank import factored_pays
from ..store.manifest import (
    DENSE,
    DENSE_FORM,
    FACTORED,
    ZERO,
    ZERO_FORM,
    TensorForm,
    keeps_factors,
    read_forms,
)

UNCHANGED, FACTORS = "unchanged", "factors"


@dataclass(frozen=True)
class Incoming:
    """What the input does to one tensor, from headers alone: leaves it `unchanged`, gives its
    task vector as `factors` of `rank` columns, or as a `dense` tensor."""

    kind: str
    rank: int = 0


def incoming(checkpoint: TensorSource, name: str) -> Incoming:
    """How `checkpoint` (fitted to the base) gives tensor `name`: a LoRA adapter's untouched
    tensors and a mapped checkpoint's tensors taken from the base are unchanged, an adapter's
    LoRA-only tensors come as factors, anything else is dense."""
    unchanged = getattr(checkpoint, "leaves_unchanged", None)
    if unchanged is not None and unchanged(name):
        return Incoming(UNCHANGED)
    task_rank = getattr(checkpoint, "task_rank", None)
    rank = task_rank(name) if task_rank is not None else None
    return Incoming(FACTORS, rank) if rank is not None else Incoming(DENSE)


def previous_forms(
    manifest: Mapping[str, Any], infos: Sequence[TensorInfo]
) -> dict[str, TensorForm]:
    """Every tensor's form in the manifest's generation. Before the first step every tensor of
    a state that keeps factors is zero; a dense-only state (and any state before format 3) is
    dense throughout."""
    if manifest["generation"] is None:
        form = ZERO_FORM if keeps_factors(manifest) else DENSE_FORM
        return {info.name: form for info in infos}
    recorded = read_forms(manifest)
    return {info.name: recorded.get(info.name, DENSE_FORM) for info in infos}


def plan_forms(
    method: ContinualMethod,
    infos: Sequence[TensorInfo],
    previous: Mapping[str, TensorForm],
    checkpoint: TensorSource,
) -> dict[str, TensorForm]:
    """Every tensor's form in the generation the next step writes (the module docstring's
    rules). A factored tensor's `rank` is its bound here (= `width`); the step records the
    true rank."""
    planned = {}
    for info in infos:
        planned[info.name] = _plan_one(
            method, info, previous.get(info.name, DENSE_FORM), checkpoint
        )
    return planned


def _plan_one(
    method: ContinualMethod, info: TensorInfo, before: TensorForm, checkpoint: TensorSource
) -> TensorForm:
    if before.kind == FACTORED and before.rank == 0:
        before = ZERO_FORM  # a factored sum of rank 0 is the zero matrix
    if not method.factored or before.kind == DENSE:
        return DENSE_FORM
    came = incoming(checkpoint, info.name)
    if came.kind == DENSE:
        return DENSE_FORM
    if before.kind == ZERO and came.kind == UNCHANGED and method.keeps_zero:
        return ZERO_FORM
    if len(info.shape) != 2:
        return DENSE_FORM
    shape = (info.shape[0], info.shape[1])
    width = min(before.rank + came.rank, min(shape))
    if not factored_pays(shape, width):
        return DENSE_FORM
    return TensorForm(FACTORED, width, width)


def with_ranks(
    planned: Mapping[str, TensorForm], ranks: Mapping[str, int]
) -> dict[str, TensorForm]:
    """The planned forms with each factored tensor's true rank, as the step found it."""
    out = {}
    for name, form in planned.items():
        if form.kind == FACTORED:
            if name not in ranks:
                raise RuntimeError(f"the step reported no rank for factored tensor {name!r}")
            form = TensorForm(FACTORED, ranks[name], form.width)
        out[name] = form
    return out


def form_counts(forms: Mapping[str, TensorForm]) -> dict[str, int]:
    """How many tensors have each form."""
    counts = {DENSE: 0, FACTORED: 0, ZERO: 0}
    for form in forms.values():
        counts[form.kind] += 1
    return counts
