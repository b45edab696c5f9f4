"""Checkpoints fine-tuned elsewhere: how their tensor names fit the benchmark's base encoder.

A checkpoint saved from a task model (``BertForSequenceClassification``, a sentence-transformers
folder, ...) holds the encoder under a prefix (``bert.``, ``roberta.``, ``0.auto_model.``) next to
tensors the benchmark does not merge (a classifier, a pooler). :func:`fit_checkpoint` finds the
prefix that maps the checkpoint onto every tensor of the base, with equal shapes, and lists what
is left over; a checkpoint that does not hold the base's encoder is an error that says what
differs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mergestream.bench.suite import SuiteError
from mergestream.errors import CheckpointError
from mergestream.io.lora import LoraAdapter, base_identity, check_base_name, is_adapter_dir
from mergestream.io.open import open_checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointFit:
    """How a checkpoint maps onto the base: a prefix to strip and the tensors to ignore.

    ``force_base`` is set for an adapter whose base name the benchmark has already checked
    against the encoder its task uses (or was told to accept): the merge state, whose base is
    the benchmark's copy of that encoder under another path, must not check it again."""

    strip_prefix: str | None
    ignored: tuple[str, ...]
    force_base: bool = False

    @property
    def add_options(self) -> dict[str, str | bool | None]:
        """Keyword arguments of :meth:`mergestream.state.MergeState.add`."""
        options: dict[str, str | bool | None] = {
            "strip_prefix": self.strip_prefix,
            "extra": "ignore" if self.ignored else "error",
        }
        if self.force_base:
            options["force_base"] = True
        return options


def _candidate_prefixes(base_names: list[str], names: list[str]) -> list[str]:
    """Prefixes ``p`` with ``p + first_base_name`` in ``names``, shortest first."""
    probe = base_names[0]
    found = {name[: -len(probe)] for name in names if name.endswith(probe)}
    return sorted(found, key=len)


def fit_checkpoint(
    base: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    where: str = "",
    *,
    encoder_names: Sequence[str] | None = None,
    force_base: bool = False,
) -> CheckpointFit:
    """How ``checkpoint`` maps onto ``base`` (see the module docstring).

    ``where`` (e.g. ``suite.yaml:12: task 'x'``) starts the message of the :class:`SuiteError`
    raised when no prefix maps every base tensor onto a checkpoint tensor of the same shape.
    An adapter's ``base_model_name_or_path`` must name the encoder: one of ``encoder_names``
    (default: the names ``base`` answers to), unless ``force_base``.
    """
    lead = f"{where}: " if where else ""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise SuiteError(f"{lead}checkpoint {checkpoint} not found")
    if is_adapter_dir(checkpoint):
        if encoder_names is None:
            encoder_names = base_identity(str(base), Path(base) if Path(base).is_dir() else None)
        return _fit_adapter(Path(base), checkpoint, lead, encoder_names, force_base)
    base_source = open_checkpoint(Path(base))
    try:
        source = open_checkpoint(checkpoint)
    except Exception as exc:  # unreadable or not a checkpoint: say which and why
        base_source.close()
        raise SuiteError(f"{lead}cannot read checkpoint {checkpoint}: {exc}") from None
    try:
        base_names = sorted(base_source.names())
        names = source.names()
        have = set(names)
        best: tuple[int, str, list[str]] | None = None
        for prefix in _candidate_prefixes(base_names, names) or [""]:
            missing = [n for n in base_names if prefix + n not in have]
            if not missing:
                shapes = [
                    f"{n}: {tuple(source.spec(prefix + n).shape)} vs base "
                    f"{tuple(base_source.spec(n).shape)}"
                    for n in base_names
                    if source.spec(prefix + n).shape != base_source.spec(n).shape
                ]
                if shapes:
                    raise SuiteError(
                        f"{lead}checkpoint {checkpoint} does not match the base encoder {base}: "
                        f"{len(shapes)} tensors differ in shape, e.g. {'; '.join(shapes[:3])}"
                    )
                used = {prefix + n for n in base_names}
                ignored = tuple(sorted(n for n in names if n not in used))
                return CheckpointFit(prefix or None, ignored)
            if best is None or len(missing) < best[0]:
                best = (len(missing), prefix, missing)
        assert best is not None
        count, prefix, missing = best
        shown = f" under the prefix {prefix!r}" if prefix else ""
        raise SuiteError(
            f"{lead}checkpoint {checkpoint} does not match the base encoder {base}: "
            f"{count} of its {len(base_names)} tensors are missing{shown}, e.g. "
            f"{', '.join(missing[:3])} (the checkpoint has e.g. {', '.join(sorted(names)[:3])})"
        )
    finally:
        base_source.close()
        source.close()


def load_fitted(checkpoint: str | os.PathLike[str], fit: CheckpointFit) -> dict[str, torch.Tensor]:
    """The checkpoint's encoder tensors in the base's names."""
    source = open_checkpoint(Path(checkpoint))
    try:
        prefix = fit.strip_prefix or ""
        ignored = set(fit.ignored)
        return {
            name[len(prefix) :]: source.get(name)
            for name in source.names()
            if name not in ignored and name.startswith(prefix)
        }
    finally:
        source.close()


def _fit_adapter(
    base: Path, checkpoint: Path, lead: str, encoder_names: Sequence[str], force_base: bool
) -> CheckpointFit:
    """How a PEFT LoRA adapter maps onto ``base``: the prefix its target modules carry in
    front of the base's names (an adapter made on ``BertForSequenceClassification`` targets
    ``bert.encoder...``), and its whole tensors the base lacks (a classifier) to ignore. Its
    base name is checked against ``encoder_names``, then the fit the way ``mergestream add``
    checks it (names, shapes)."""
    from mergestream.errors import MergestreamError
    from mergestream.state import MergeState

    base_source = open_checkpoint(base)
    try:
        source = open_checkpoint(checkpoint)
    except Exception as exc:
        base_source.close()
        raise SuiteError(f"{lead}cannot read adapter {checkpoint}: {exc}") from None
    try:
        assert isinstance(source, LoraAdapter)
        _check_adapter_base(source, encoder_names, force_base, lead)
        base_names = set(base_source.names())
        targets = [m + ".weight" for m in source.modules()] + list(source.full_tensors())
        prefixes = [_prefix_onto(name, base_names) for name in targets]
        found = sorted({p for p in prefixes if p is not None}, key=len)
        prefix = found[0] if found else ""
        ignored = tuple(
            sorted(n for n in source.full_tensors() if n.removeprefix(prefix) not in base_names)
        )
    finally:
        base_source.close()
        source.close()
    fit = CheckpointFit(prefix or None, ignored, force_base=True)  # the name is checked
    try:
        MergeState.in_memory(base, "task_arithmetic").plan(checkpoint, **fit.add_options)
    except MergestreamError as exc:
        raise SuiteError(
            f"{lead}adapter {checkpoint} does not fit the base encoder: {exc}"
        ) from None
    return fit


def _check_adapter_base(
    adapter: LoraAdapter, encoder_names: Sequence[str], force_base: bool, lead: str
) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` names another model than the
    encoder (matched as ``mergestream add`` matches a state's base), unless ``force_base``."""
    try:
        check_base_name(adapter, encoder_names, force_base)
    except CheckpointError:
        wanted = adapter.config.base_model_name_or_path
        said = (
            f"was trained on base {wanted!r}"
            if wanted
            else "does not say which base it was trained on (no base_model_name_or_path)"
        )
        others = f" (also known as {list(encoder_names[1:])})" if encoder_names[1:] else ""
        raise SuiteError(
            f"{lead}adapter {adapter.path} {said}, and the encoder is {encoder_names[0]!r}"
            f"{others}; pass --force-base (force_base=True) if it was trained on this encoder "
            "under another name (shapes are still checked)"
        ) from None


def _prefix_onto(name: str, base_names: set[str]) -> str | None:
    """The shortest ``p`` with ``name == p + b`` for a base tensor name ``b``."""
    parts = name.split(".")
    for cut in range(len(parts)):
        if ".".join(parts[cut:]) in base_names:
            return "".join(part + "." for part in parts[:cut])
    return None
