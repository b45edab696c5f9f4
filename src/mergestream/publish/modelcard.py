"""The provenance of an exported model: a model card (README.md) and safetensors metadata.

Both say the same thing: which tool and version made the model, with which method and parameters,
from which base, and which checkpoints were merged in which order (with their content hashes and
any name mapping they needed), so that anyone holding the same files can check or redo the merge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._version import __version__
from ..methods.registry import METHODS


def provenance_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    """String key/values for the `__metadata__` of every exported safetensors file."""
    return {
        "format": "pt",  # transformers refuses safetensors files without it
        "mergestream_version": __version__,
        "mergestream_method": json.dumps(manifest["method"], sort_keys=True),
        "mergestream_step": str(manifest["step"]),
        "mergestream_scalars": json.dumps(manifest["scalars"], sort_keys=True),
        "mergestream_base": json.dumps(
            {"path": manifest["base"]["path"], "sha256": manifest["base"]["sha256"]}
        ),
        "mergestream_inputs": json.dumps(
            [_input_record(e) for e in manifest["ledger"]], sort_keys=True
        ),
    }


def _input_record(entry: Mapping[str, Any]) -> dict[str, Any]:
    record = {"step": entry["step"], "path": entry["path"], "sha256": entry["sha256"]}
    if entry.get("mapping"):
        record["mapping"] = entry["mapping"]
    return record


def _paper_line(name: str) -> list[str]:
    """The paper a method comes from, as its config names it (none for a method without)."""
    cls = METHODS.get(name)
    config = getattr(cls, "config_class", None)
    title, url = getattr(config, "paper", ""), getattr(config, "paper_url", "")
    if not title:
        return []
    return [f"- paper: [{title}]({url})" if url else f"- paper: {title}"]


def _code(value: Any) -> str:
    return "`" + str(value).replace("`", "'") + "`"


def render_model_card(
    manifest: Mapping[str, Any],
    weight_files: list[str],
    dtype: str,
    copied_files: list[str],
) -> str:
    method = manifest["method"]
    ledger = manifest["ledger"]
    params = method["params"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- mergestream",
        f"- {method['name']}",
        "---",
        "",
        "# Merged model",
        "",
        f"This model was produced by mergestream {__version__}: {len(ledger)} fine-tuned "
        f"checkpoint{'s' if len(ledger) != 1 else ''} of one base model, folded in one at a "
        f"time with the continual merge method {_code(method['name'])}.",
        "",
        "## Method",
        "",
        f"- method: {_code(method['name'])}",
        *_paper_line(method["name"]),
    ]
    for key, value in params.items():
        lines.append(f"- {key}: {_code(json.dumps(value))}")
    for key, value in manifest["scalars"].items():
        lines.append(f"- scalar {key}: {_code(f'{value:.9g}')}")
    base = manifest["base"]
    lines += [
        "",
        "## Base model",
        "",
        f"- path: {_code(base['path'])}",
        f"- sha256: {_code(base['sha256'])}",
        "",
        "## Merged checkpoints, in order",
        "",
    ]
    if ledger:
        lines += ["| step | checkpoint | sha256 | name mapping | added |", "|---|---|---|---|---|"]
        for entry in ledger:
            mapping = ", ".join(f"{k}={v}" for k, v in (entry.get("mapping") or {}).items())
            lines.append(
                f"| {entry['step']} | {_code(entry['path'])} | {_code(entry['sha256'])} | "
                f"{mapping or '-'} | {entry.get('added', '')} |"
            )
    else:
        lines.append("None yet: the weights are the base's.")
    lines += [
        "",
        "## Files",
        "",
        f"- weights ({dtype}): " + ", ".join(_code(f) for f in weight_files),
    ]
    if copied_files:
        lines.append("- copied from the base: " + ", ".join(_code(f) for f in copied_files))
    lines += [
        "",
        "Every safetensors file carries the same provenance in its header metadata "
        "(`mergestream_*` keys).",
        "",
    ]
    return "\n".join(lines)
