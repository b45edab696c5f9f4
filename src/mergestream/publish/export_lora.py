"""The merged model as a PEFT LoRA adapter: the truncated SVD of each linear weight's task vector.

    export_lora(state, "merged-adapter/", rank=16)       # or energy=0.9, or neither: exact
    PeftModel.from_pretrained(base_model, "merged-adapter/")

For every linear weight (the tensors OPCM projects: 2-D `weight`s that are not embeddings) whose
merged task vector τ is not zero, the adapter stores the best rank-r approximation of τ
(Eckart–Young): with τ = U·diag(σ)·Vᵀ, B = U_r·diag(√σ_r) and A = diag(√σ_r)·V_rᵀ, so that
B·A = τ_r at scaling 1 (lora_alpha = r for every module). The rank is fixed, or per module the
smallest that keeps a fraction `energy` of ‖τ‖² (then `rank_pattern` / `alpha_pattern` carry the
ranks), or, with neither, each module's exact rank: every singular triplet above the rank rule
(`linalg.rank_rtol`), so B·A = τ to round-off ("exact" in the model card). The model card gives,
per module, the rank and the fraction of ‖τ‖ retained.

A weight the state keeps as factors (`step/forms.py`) is exported from its thin SVD
(`methods/lowrank.to_lora`): exactly at its rank k, or truncated to `rank` (or to the energy
target) from its k singular values, without ever forming the m×n matrix.

Nothing that changed is lost silently: a changed bias of an adapted layer goes into lora_B's bias
(`lora_bias`); every other changed tensor (norms, embeddings, heads, biases of other layers) is
saved whole through `modules_to_save` (its module's parameters, merged), or, with
`drop_other=True`, listed in the card and the returned report as dropped.

Layers that store their weight as (in, out), GPT-2's `Conv1D`, need `fan_in_fan_out`; it is taken
from the LoRA adapters in the ledger (or given). The adapter is an export like the full model's
(`destination.publish_export`): the same rules for OUT (new, empty or an earlier export of either
kind; another folder only with `overwrite`), built beside OUT and switched into place whole, with
the export marker listing its files. The factors and the tensors saved whole are held in
memory until the file is written (the adapter is small next to the model, unless many large
tensors changed outside the linear layers).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import ConfigError, MergestreamError
from ..io.lora import ADAPTER_CONFIG, PEFT_PREFIX
from ..io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from ..methods.classify import default_is_linear_weight
from ..methods.linalg import rank_rtol, resolved_rank
from ..methods.lowrank import ThinSVD, to_lora
from ..store.generation import Readable, StateView
from .destination import publish_export
from .export import check_output_finite

ADAPTER_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
ADAPTER_EXPORT_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, CARD_FILE)


@dataclass(frozen=True)
class LowRankFactors:
    """τ ≈ B·A at rank `rank`; `retained` = ‖B·A‖ / ‖τ‖ (1 when τ has rank ≤ `rank`)."""

    b: torch.Tensor
    a: torch.Tensor
    rank: int
    retained: float


def truncated_factors(
    task_vector: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> LowRankFactors:
    """Balanced factors of the best rank-r approximation of a 2-D `task_vector` (float64).

    At most one of `rank` (capped at the matrix's smaller side) and `energy` (the smallest rank
    keeping that fraction of ‖τ‖², in (0, 1]) chooses r; with neither, r is τ's rank under the
    rank rule (the factors are exact to round-off)."""
    if rank is not None and energy is not None:
        raise ConfigError("give either a rank or an energy target for the LoRA export, not both")
    tau = task_vector.to(torch.float64)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    r = _chosen_rank(s, rank, energy, rank_rtol(*tau.shape))
    root = s[:r].sqrt()
    return LowRankFactors(
        b=u[:, :r] * root, a=root[:, None] * vh[:r], rank=r, retained=_retained(s, r)
    )


def factored_lora(
    task_vector: ThinSVD, rank: int | None = None, energy: float | None = None
) -> LowRankFactors:
    """`truncated_factors` of a task vector kept as a thin SVD: the same rank rule on its
    singular values, the factors from `lowrank.to_lora`, never an m×n matrix."""
    if rank is not None and energy is not None:
        raise ConfigError("give either a rank or an energy target for the LoRA export, not both")
    r = _chosen_rank(task_vector.sigma, rank, energy, None)
    b, a = to_lora(task_vector, r)
    return LowRankFactors(b=b, a=a, rank=b.shape[1], retained=_retained(task_vector.sigma, r))


def _chosen_rank(
    s: torch.Tensor, rank: int | None, energy: float | None, rtol: float | None
) -> int:
    """r from descending singular values `s`: `rank` (capped), the `energy` target, or with
    neither the rank rule (`rtol`; None: every value of `s` is a direction already). At least 1."""
    if rank is not None:
        return max(1, min(rank, s.numel()))
    if energy is not None:
        squares = s.square()
        kept = torch.cumsum(squares, 0)
        # the first r with kept[r-1] ≥ energy·total (small slack: float64 sums of σ²)
        r = int((kept < energy * float(squares.sum()) * (1 - 1e-12)).sum()) + 1
        return min(max(r, 1), s.numel())
    exact = s.numel() if rtol is None else resolved_rank(s, rtol)
    return max(1, min(exact, s.numel()))


def _retained(s: torch.Tensor, r: int) -> float:
    """‖τ_r‖ / ‖τ‖ from the singular values (1 for τ = 0)."""
    squares = s.square()
    total = float(squares.sum())
    return math.sqrt(float(squares[:r].sum()) / total) if total > 0 else 1.0


@dataclass
class ModuleExport:
    module: str
    rank: int
    retained: float
    bias: bool = False


@dataclass
class LoraExport:
    """What `export_lora` wrote: LoRA modules, modules saved whole, tensors dropped."""

    path: Path
    modules: list[ModuleExport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False


def export_lora(
    state: Readable,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    drop_other: bool = False,
    fan_in_fan_out: bool | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    verify_base: bool = False,
) -> LoraExport:
    """Write the state's merge as a PEFT LoRA adapter folder `out` (see the module docstring).

    `out` follows the rules of every export (`destination.publish_export`): new, empty or an
    earlier export (of a full model or an adapter), another folder only with `overwrite`, never
    the state or the base; the folder is switched in whole and records what it holds in its
    export marker. `dtype` is that of every floating-point tensor written; by default the LoRA
    factors (and lora_B biases) are float32 and the tensors saved whole keep the base's dtype.
    With neither `rank` nor `energy` every module is exported at its exact rank."""
    if rank is not None and energy is not None:
        raise ConfigError("give either a rank or an energy target for the LoRA export, not both")
    if rank is not None and rank < 1:
        raise ConfigError(f"LoRA export rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"LoRA export energy must be in (0, 1], got {energy}")
    out = Path(out)
    reports: list[LoraExport] = []
    with state.reading(verify_base) as view:

        def build(directory: Path) -> list[str]:
            # Computed once OUT was accepted: a refused OUT costs no SVDs.
            report, tensors, lora_bias = _adapter_tensors(
                view, out, rank, energy, drop_other, fan_in_fan_out, dtype
            )
            config = _adapter_config(view, report, lora_bias)
            card = _model_card(view, report, rank, energy)
            _save_tensors(directory / ADAPTER_FILE, tensors)
            (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            (directory / CARD_FILE).write_text(card)
            reports.append(report)
            return sorted(ADAPTER_EXPORT_FILES)

        written = set(ADAPTER_EXPORT_FILES)
        publish_export(view, out, written, build, overwrite=overwrite, kind="lora")
    return reports[0]


def _adapter_tensors(
    view: StateView,
    out: Path,
    rank: int | None,
    energy: float | None,
    drop_other: bool,
    fan_in_fan_out: bool | None,
    dtype: torch.dtype | None,
) -> tuple[LoraExport, dict[str, torch.Tensor], bool]:
    """The adapter's tensors in their output dtype, what they hold, and whether lora_B has
    biases."""
    if fan_in_fan_out is None:
        fan_in_fan_out = _ledger_fan_in_fan_out(view.ledger)
    infos = view.info_by_name
    base = view.base
    report = LoraExport(path=out, fan_in_fan_out=fan_in_fan_out)
    factor_dtype = dtype or torch.float32
    tensors: dict[str, torch.Tensor] = {}
    changed_other: dict[str, torch.Tensor] = {}  # name -> τ, saved whole or dropped
    changed_bias: dict[str, torch.Tensor] = {}
    factors: dict[str, LowRankFactors] = {}
    for info in view.infos:
        name = info.name
        linear = len(info.shape) == 2 and default_is_linear_weight(name)
        svd = view.task_vector_factors(info)
        if svd is not None:  # kept as factors: exported from them, never formed
            if svd.k == 0:
                continue
            if linear:
                svd = ThinSVD(svd.v, svd.sigma, svd.u) if fan_in_fan_out else svd
                factors[name.removesuffix(".weight")] = factored_lora(svd, rank, energy)
                continue
        tau = view.task_vector(info)
        if not bool(tau.any()):
            continue
        if linear:
            matrix = tau.t() if fan_in_fan_out else tau  # B·A is (out, in)
            factors[name.removesuffix(".weight")] = truncated_factors(matrix, rank, energy)
        elif name.endswith(".bias"):
            changed_bias[name.removesuffix(".bias")] = tau
        else:
            changed_other[name] = tau
    # A changed bias of a LoRA module goes into lora_B's bias; any other changed bias is
    # another tensor of its module.
    lora_bias = any(module in factors for module in changed_bias)
    for module, bias in changed_bias.items():
        if module not in factors:
            changed_other[module + ".bias"] = bias
    for module, f in factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.a.to(factor_dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.b.to(factor_dtype).contiguous()
        has_bias = module in changed_bias
        if lora_bias:
            bias = changed_bias.get(module)
            if bias is None:
                bias = torch.zeros(f.b.shape[0], dtype=torch.float64)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.bias"] = bias.to(factor_dtype)
        report.modules.append(ModuleExport(module, f.rank, f.retained, has_bias))
    saved_whole = _modules_of(changed_other)
    if drop_other:
        report.dropped = sorted(changed_other)
    else:
        report.modules_to_save = saved_whole
        # PEFT saves and loads such a module's parameters together: the unchanged ones too.
        for name in base.names():
            if name.rpartition(".")[0] in saved_whole and name in infos:
                merged = base.get(name).to(torch.float64)
                if name in changed_other:
                    merged += changed_other[name]
                # as a full model's export would: in `dtype`, or else the base's
                tensors[f"{PEFT_PREFIX}{name}"] = merged.to(dtype or base.spec(name).dtype)
    if not tensors:
        raise MergestreamError(
            f"{out}: the merged model equals the base (every task vector is zero); there is "
            "no adapter to write"
        )
    for name, tensor in tensors.items():
        check_output_finite(name, tensor)
    return report, tensors, lora_bias


def _ledger_fan_in_fan_out(ledger: list[dict[str, Any]]) -> bool:
    """Whether the merged LoRA adapters stored their layers' weights as (in, out)."""
    flags = {bool(e["adapter"]["fan_in_fan_out"]) for e in ledger if e.get("adapter")}
    if len(flags) > 1:
        raise ConfigError(
            "the merged LoRA adapters disagree on fan_in_fan_out; pass fan_in_fan_out to say how "
            "the base's linear layers store their weights"
        )
    return flags.pop() if flags else False


def _modules_of(names: Iterable[str]) -> list[str]:
    return sorted({n.rpartition(".")[0] for n in names})


def _adapter_config(view: StateView, report: LoraExport, lora_bias: bool) -> dict[str, Any]:
    ranks = [m.rank for m in report.modules]
    default_rank = max(set(ranks), key=ranks.count) if ranks else 1
    # Scaling 1 everywhere: lora_alpha equals each module's rank.
    pattern = {re.escape(m.module): m.rank for m in report.modules if m.rank != default_rank}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": view.base_path,
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": [m.module for m in report.modules] or None,
        "modules_to_save": report.modules_to_save or None,
        "fan_in_fan_out": report.fan_in_fan_out,
        "lora_bias": lora_bias,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def _model_card(
    view: StateView,
    report: LoraExport,
    rank: int | None,
    energy: float | None,
) -> str:
    ledger = view.ledger
    method = view.manifest["method"]
    params = ", ".join(f"{k}={v}" for k, v in method["params"].items())
    if rank is not None:
        chosen = f"rank {rank}"
    elif energy is not None:
        chosen = f"per module, {energy:g} of ‖τ‖² kept"
    else:
        chosen = "exact: each module at its rank, no truncation"
    lines = [
        "---",
        "library_name: peft",
        "tags: [mergestream, lora, merge]",
        "---",
        "",
        "# Merged LoRA adapter",
        "",
        f"Written by mergestream {__version__}: the {method['name']} merge ({params}) of "
        f"{view.step} inputs into the base `{view.base_path}`, as a LoRA adapter whose "
        f"B·A is the SVD of each linear weight's merged task vector ({chosen}).",
        "",
        "Load it with `PeftModel.from_pretrained(base_model, this_folder)`.",
        "",
        "## Modules",
        "",
        "| module | rank | ‖τ‖ retained | bias |",
        "|---|---:|---:|---|",
    ]
    for m in report.modules:
        lines.append(f"| {m.module} | {m.rank} | {m.retained:.6f} | {'yes' if m.bias else ''} |")
    lines += ["", "## Other changed tensors", ""]
    if report.modules_to_save:
        lines.append("Saved whole (`modules_to_save`): " + ", ".join(report.modules_to_save))
    if report.dropped:
        lines.append(
            "Dropped (changed by the merge, not in this adapter): " + ", ".join(report.dropped)
        )
    if not report.modules_to_save and not report.dropped:
        lines.append("None: the merge changed only the adapted layers.")
    lines += ["", "## Inputs", ""]
    for entry in ledger:
        kind = " (LoRA adapter)" if entry.get("adapter") else ""
        lines.append(f"{entry['step']}. `{entry['path']}`{kind} sha256 `{entry['sha256']}`")
    return "\n".join(lines) + "\n"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a safetensors file with the mode of every other export file.

    Not safetensors' `save_file`: from 0.8 it writes a temporary file, created 0600, and renames
    it into place, so the adapter would be readable by its owner only."""
    specs = [(name, TensorSpec(t.dtype, tuple(t.shape))) for name, t in tensors.items()]
    writer = StreamingSafetensorsWriter(path, specs, {"format": "pt"})
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
