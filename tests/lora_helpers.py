"""Tiny transformers models and real PEFT LoRA adapters, built offline for the LoRA tests.

Everything is float64 so that PEFT's `merge_and_unload()` (base + scaling·B·A, rounded once)
is an independent reference for the task vectors mergestream computes from the factors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


@dataclass(frozen=True)
class Family:
    """A model shape: how to build it from a config, and LoRA configs that exercise it."""

    name: str
    build: Callable[[], torch.nn.Module]
    model_class: type
    lora_configs: tuple[Callable[[], LoraConfig], ...]


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


BERT = Family(
    "bert",
    _bert,
    transformers.BertModel,
    (
        # rank_pattern and alpha_pattern, a LoRA bias, a module saved whole
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*encoder.*\.(query|value|dense)$",
            rank_pattern={"value": 2, "intermediate.dense": 3},
            alpha_pattern={"query": 5},
            lora_bias=True,
            modules_to_save=["pooler"],
            init_lora_weights=False,
        ),
        lambda: LoraConfig(
            r=3, lora_alpha=6, target_modules=["key", "value"], init_lora_weights=False
        ),
    ),
)
LLAMA = Family(
    "llama",
    _llama,
    transformers.LlamaForCausalLM,
    (
        # rsLoRA, an embedding LoRA (PEFT then saves the embedding layer too), lm_head whole
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
        lambda: LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["k_proj", "o_proj", "down_proj", "gate_proj"],
            rank_pattern={"down_proj": 5},
            init_lora_weights=False,
        ),
    ),
)
GPT2 = Family(
    "gpt2",
    _gpt2,
    transformers.GPT2LMHeadModel,
    (
        # Conv1D layers: weights stored (in, out), fan_in_fan_out
        lambda: LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
        lambda: LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["c_proj"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
    ),
)
FAMILIES = (BERT, LLAMA, GPT2)


def save_base(family: Family, folder: Path, seed: int = 0) -> Path:
    """A float64 base model of `family`, saved as an HF folder."""
    torch.manual_seed(seed)
    model = family.build().to(torch.float64)
    model.save_pretrained(folder)
    return folder


def load_base(family: Family, base_dir: Path) -> torch.nn.Module:
    return family.model_class.from_pretrained(base_dir, dtype=torch.float64)


def make_adapter(
    family: Family,
    base_dir: Path,
    out: Path,
    config: LoraConfig,
    seed: int,
    merged_out: Path | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Train-free adapter: random factors (init_lora_weights=False) and, for modules saved
    whole, the base's tensors plus noise. With `merged_out`, also save PEFT's own
    `merge_and_unload()` of it as a full float64 model (the reference)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(load_base(family, base_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))
            elif "lora_B" in name and name.endswith(".bias"):
                param.copy_(torch.randn_like(param))
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    if merged_out is not None:
        peft_model.merge_and_unload().save_pretrained(merged_out)
    return out


def load_adapter_model(family: Family, base_dir: Path, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(load_base(family, base_dir), adapter_dir)


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class Zoo:
    """A base, its adapters and PEFT's merge_and_unload() of each, for one model family."""

    def __init__(self, family: Family, root: Path):
        self.family = family
        self.base = save_base(family, root / "base")
        self.adapters: list[Path] = []
        self.merged: list[Path] = []
        for i, config in enumerate(family.lora_configs):
            self.adapters.append(
                make_adapter(
                    family,
                    self.base,
                    root / f"adapter{i}",
                    config(),
                    seed=10 + i,
                    merged_out=root / f"merged{i}",
                    # GPT-2's second adapter is saved as a PyTorch .bin
                    safe_serialization=not (family is GPT2 and i == 1),
                )
            )
            self.merged.append(root / f"merged{i}")
        # A fully fine-tuned model, to mix with the adapters.
        torch.manual_seed(99)
        full = {k: v + 0.01 * torch.randn_like(v) for k, v in state_dict_of(self.base).items()}
        self.full = root / "full"
        self.full.mkdir()
        save_file(full, str(self.full / "model.safetensors"))
