"""Scoring of a causal LM's answers: pure functions over logits, token ids and strings.

- :func:`sequence_logprobs`: the log-likelihood of target tokens (summed per row), what
  ``choice`` tasks rank their options by.
- :func:`greedy_matches`: whether greedy decoding reproduces the target tokens exactly: at every
  target position the argmax of the logits is the target token. Teacher forcing makes this one
  forward pass instead of a decoding loop: as long as every argmax matches, the greedy prefix is
  the target prefix, so the two agree (up to exact ties in the logits).
- :func:`normalise` and :func:`contains_answer`: the match of a free generation against a short
  known answer (the base-retention prompts).
- :func:`perplexity`: from summed negative log-likelihood and token count.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata

import torch
from torch import Tensor


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Sum over positions of ``log softmax(logits)[target]`` where ``mask`` is true.

    ``logits`` [N, T, V] are the predictions for ``targets`` [N, T] (already aligned: position t
    of logits predicts targets[:, t]); returns [N] in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask.to(picked.dtype)).sum(-1)


def greedy_matches(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """[N] bool: the argmax of ``logits`` [N, T, V] equals ``targets`` [N, T] wherever ``mask``
    is true (aligned as in :func:`sequence_logprobs`)."""
    hit = logits.argmax(-1) == targets
    return (hit | ~mask.bool()).all(-1)


def pick_options(scores: Tensor) -> Tensor:
    """Index of the best option per row of ``scores`` [B, K] (the first on a tie)."""
    return scores.argmax(-1)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalise(text: str) -> str:
    """Lower case, accents and punctuation removed, articles dropped, spaces collapsed: the form
    two answers are compared in."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c)).translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(output: str, answer: str) -> bool:
    """Whether the normalised ``answer`` appears as whole words in the normalised ``output``."""
    want = normalise(answer)
    return bool(want) and f" {want} " in f" {normalise(output)} "


def perplexity(total_nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    if tokens <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(total_nll / tokens)
