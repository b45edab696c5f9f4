"""The running average's config (`methods/average.py`): no parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig


@dataclass(frozen=True)
class AverageConfig(MethodConfig):
    """The running average has no parameters."""

    method = "average"
    factored = True  # LoRA streams are kept as low-rank factors (`methods/lowrank.py`)
    paper = (
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
        "increasing inference time (Wortsman et al., ICML 2022)"
    )
    paper_url = "https://arxiv.org/abs/2203.05482"
    summary = "running mean of all models (base + mean task vector; order-independent)"
