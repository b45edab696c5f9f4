"""What the manifest records: a new state's first manifest, and each step's ledger entry.

The ledger is the state's history: one entry per merged input (where it came from, its content
hash, how it was read, what the step computed), in order. It is what `status` shows, what the
model card lists, and what refuses an input merged before.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

from .._version import __version__
from ..errors import ConfigError, StateError
from ..io.open import FittedCheckpoint
from ..io.safetensors_stream import dtype_name
from ..io.source import TensorSource
from ..methods.base import STATE_DTYPES, ContinualMethod, TensorInfo
from .hashing import file_stamps, header_fingerprint
from .manifest import FORMAT, FORMAT_VERSION, new_state_id


def now() -> str:
    """The time as the manifest records it (UTC, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def state_dtype_name(method: ContinualMethod, state_dtype: str | None) -> str:
    """The state's precision as the manifest names it: `state_dtype`, or the method's own."""
    if state_dtype is None:
        return next(k for k, v in STATE_DTYPES.items() if v == method.default_state_dtype)
    if state_dtype not in STATE_DTYPES:
        raise ConfigError(
            f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}"
        )
    return state_dtype


def new_manifest(
    method: ContinualMethod,
    base: TensorSource,
    infos: list[TensorInfo],
    base_description: str,
    state_dtype: str | None,
    base_sha256: str | None,
    lowrank: bool = True,
) -> dict[str, Any]:
    """A step-0 manifest for `method` on `base` (its content hash `base_sha256`, None for a
    state that holds its base open for its whole life and has no later run to compare with).
    `lowrank`: whether the state may keep tensors factored or zero (`step/forms.py`), which
    only a method with `factored` does."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mergestream_version": __version__,
        "id": new_state_id(),  # tells this state from any other, even at the same path
        "created": now(),
        "method": {"name": method.name, "params": method.config.to_dict()},
        "state_dtype": state_dtype_name(method, state_dtype),
        "lowrank": lowrank and method.factored,
        "base": {
            "path": base_description,
            "sha256": base_sha256,
            "headers_sha256": header_fingerprint(base.files()),
            "files": file_stamps(base.files()),
        },
        "tensors": tensor_roles(base, infos),
        "step": 0,
        "generation": None,
        "scalars": method.initial_scalars(),
        "ledger": [],
    }


def tensor_roles(base: TensorSource, infos: list[TensorInfo]) -> dict[str, int]:
    """How many base tensors are projected, added or copied (recorded at init, so `status`
    can show it without opening the base)."""
    by_name = {info.name: info for info in infos}
    roles = {"projected": 0, "added": 0, "copied": 0}
    for name in base.names():
        info = by_name.get(name)
        roles["copied" if info is None else "projected" if info.projected else "added"] += 1
    return roles


def refuse_merged_before(manifest: Mapping[str, Any], digest: str | None, what: str) -> None:
    """Refuse an input whose content hash `digest` the ledger already holds."""
    step = int(manifest["step"])
    for entry in manifest["ledger"]:
        if entry["sha256"] == digest:
            latest = entry["step"] == step
            raise StateError(
                f"{what}: identical content was already merged at step {entry['step']} "
                f"({entry['path']})"
                + (
                    ", the latest step (an add of it that was interrupted had completed)"
                    if latest
                    else ""
                )
                + "; pass allow_duplicate (--allow-duplicate) to merge it again"
            )


def dtype_notes(infos: list[TensorInfo], source: TensorSource) -> list[str]:
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


def step_entry(
    step: int,
    fitted: FittedCheckpoint,
    digest: str | None,
    seconds: float,
    scalars: Mapping[str, float],
    notes: list[str],
) -> dict[str, Any]:
    """The ledger entry of a step that merged `fitted`."""
    entry: dict[str, Any] = {
        "step": step,
        "path": fitted.path,
        "size": fitted.size(),
        "sha256": digest,
        "added": now(),
        "seconds": round(seconds, 3),
        "scalars": dict(scalars),
    }
    fields = fitted.ledger_fields()
    if "mapping" in fields:
        entry["mapping"] = fields["mapping"]
    if notes:
        entry["notes"] = notes
    if "adapter" in fields:
        entry["adapter"] = fields["adapter"]
    return entry


def next_manifest(
    manifest: Mapping[str, Any],
    entry: dict[str, Any],
    generation: int,
    parts: list[dict[str, Any]],
    scalars: Mapping[str, float],
    base_stamps: list[dict[str, object]] | None,
    forms: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest after the step `entry` records: a new dict, `manifest` untouched. `forms`
    is the new generation's record of its tensors' forms (`manifest.forms_record`)."""
    out = json.loads(json.dumps(manifest))
    out["format_version"] = FORMAT_VERSION
    out["mergestream_version"] = __version__
    out["step"] = entry["step"]
    out["generation"] = generation
    out["parts"] = parts
    out["forms"] = dict(forms or {})
    out.pop("prepared", None)  # it belonged to the previous generation
    out["scalars"] = dict(scalars)
    out["updated"] = now()
    if base_stamps is not None:
        out["base"]["files"] = base_stamps
    out["ledger"].append(entry)
    return out
