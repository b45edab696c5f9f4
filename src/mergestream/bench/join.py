"""One report from benchmark runs that shared the methods between them (`mergestream bench-join`).

Two processes with disjoint ``--methods`` (one per core, or one per machine) each write a
``results.json``. Joining them must not redo anything: a method's merges can take minutes a
step (TIES, TSV-M and DOP on an LLM), so the joined report takes every method's runs as its
process measured them. Joining is only meaningful for runs of the same protocol on the same
zoo, so everything that defines the protocol must agree, and so must the scores every process
made of its own (the base, the individual models, the base's retention): a disagreement there
means the parts did not score with the same test sets or code, and the join refuses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergestream.errors import ConfigError

from .run import DEFAULT_METHODS, OPTIONAL_METHODS

# The entries of `meta` that define the protocol: equal in every part.
PROTOCOL_KEYS = (
    "zoo",
    "suite",
    "pooling",
    "checkpoints",
    "tasks",
    "orders",
    "matrix_orders",
    "matrix_diagonal_only",
    "matrix_rows",
    "kind",
    "full_checkpoints",
    "seed",
    "state",
)
# The counts and times of `meta`: the joined run's are the parts' sums.
SUMMED_KEYS = (
    "evaluations",
    "evaluations_reused",
    "evaluations_from_record",
    "evaluation_seconds",
    "retentions",
    "retention_seconds",
    "recorded_evaluations_timed",
    "recorded_evaluation_seconds",
    "recorded_retentions_timed",
    "recorded_retention_seconds",
    "seconds",
)
# Perplexities are sums of float32 log-probabilities: a process with other threads may round
# them differently. Task accuracies are counts over the same test sets and must be equal; the
# general prompts' accuracy, compared with this tolerance too, moves by 1/n or not at all.
RETENTION_RTOL = 1e-5


class JoinError(ConfigError):
    """Benchmark results that cannot be joined into one report."""


def results_file(path: Path) -> Path:
    """A part's results file: ``path`` is a ``results.json`` or the report folder holding one."""
    return path / "results.json" if path.is_dir() else path


def load_part(path: Path) -> dict[str, Any]:
    """A part's results (``path`` as for `results_file`)."""
    file = results_file(path)
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError:
        raise JoinError(f"{file}: no such file (a report folder holds results.json)") from None
    except json.JSONDecodeError as err:
        raise JoinError(f"{file}: not a results file ({err})") from None
    if not isinstance(results, dict) or not {"meta", "reference", "methods"} <= results.keys():
        raise JoinError(f"{file}: not a bench results file (no meta, reference and methods)")
    return results


def _table_rank(label: str) -> int:
    labels = [spec.label for spec in DEFAULT_METHODS + OPTIONAL_METHODS]
    return labels.index(label) if label in labels else len(labels)


def _same_reference(first: Mapping[str, Any], other: Mapping[str, Any], where: str) -> None:
    for kind in ("pretrained", "individual"):
        for task, accuracy in first[kind].items():
            theirs = other[kind].get(task)
            if theirs != accuracy:
                raise JoinError(
                    f"{where}: {kind} accuracy of {task} is {theirs}, the first part's is "
                    f"{accuracy}: the parts did not score the same test sets with the same code"
                )
    mine = first.get("pretrained_retention") or {}
    theirs = other.get("pretrained_retention") or {}
    if mine.keys() != theirs.keys():
        raise JoinError(f"{where}: base retention scored as {sorted(theirs)}, not {sorted(mine)}")
    for key, value in mine.items():
        if not math.isclose(value, theirs[key], rel_tol=RETENTION_RTOL):
            raise JoinError(
                f"{where}: base retention {key} is {theirs[key]}, the first part's is {value}"
            )


def join_results(parts: Sequence[Mapping[str, Any]], names: Sequence[str] = ()) -> dict[str, Any]:
    """The results of one run holding every part's methods, in the order of the tables.

    ``names`` name the parts in errors (their files). Refuses parts of different protocols,
    different reference scores, a method in two parts, or two alpha sweeps."""
    if len(parts) < 2:
        raise JoinError("joining needs at least two results")
    names = list(names) or [f"part {i + 1}" for i in range(len(parts))]
    first = parts[0]
    for part, name in zip(parts[1:], names[1:], strict=True):
        for key in PROTOCOL_KEYS:
            if part["meta"].get(key) != first["meta"].get(key):
                raise JoinError(
                    f"{name}: {key} is {part['meta'].get(key)!r}, {names[0]} has "
                    f"{first['meta'].get(key)!r}: only runs of one protocol join"
                )
        _same_reference(first["reference"], part["reference"], name)

    methods: dict[str, tuple[int, str, Any]] = {}
    for index, (part, name) in enumerate(zip(parts, names, strict=True)):
        for label, entry in part["methods"].items():
            if label in methods:
                raise JoinError(f"{label!r} is in both {methods[label][1]} and {name}")
            methods[label] = (index, name, entry)
    ordered = sorted(methods, key=lambda label: (_table_rank(label), methods[label][0]))

    sweeps = [
        (name, p["alpha_sweep"])
        for p, name in zip(parts, names, strict=True)
        if p.get("alpha_sweep")
    ]
    if len(sweeps) > 1:
        raise JoinError(f"{sweeps[0][0]} and {sweeps[1][0]} both ran the alpha sweep")

    meta: dict[str, Any] = {key: first["meta"].get(key) for key in PROTOCOL_KEYS}
    meta["date"] = max(str(p["meta"].get("date", "")) for p in parts)
    machines = {str(p["meta"].get("machine", "")) for p in parts}
    meta["machine"] = machines.pop() if len(machines) == 1 else "; ".join(sorted(machines))
    versions = [p["meta"].get("versions") for p in parts]
    if all(v == versions[0] for v in versions):
        meta["versions"] = versions[0]
    for key in SUMMED_KEYS:
        meta[key] = round(sum(p["meta"].get(key, 0) for p in parts), 1)
    # Each part as it ran: when, where, with what, which methods.
    meta["joined"] = [
        {
            "file": name,
            "date": p["meta"].get("date"),
            "machine": p["meta"].get("machine"),
            "versions": p["meta"].get("versions"),
            "seconds": p["meta"].get("seconds"),
            "methods": list(p["methods"]),
        }
        for p, name in zip(parts, names, strict=True)
    ]
    return {
        "meta": meta,
        "reference": first["reference"],
        "methods": {label: methods[label][2] for label in ordered},
        "alpha_sweep": sweeps[0][1] if sweeps else None,
    }
