"""Deterministic synthetic model streams: a base and fine-tuned variants with known task vectors.

Used by the demo, the tests and the benchmarks. Task vectors of linear weights are low-rank plus
noise (the structure fine-tuning produces); other floating-point tensors get small dense changes;
integer buffers never change.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def transformer_shapes(
    layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 100, positions: int = 16
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a small BERT-like encoder."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (positions, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"] = (hidden, hidden)
            shapes[f"{p}attention.self.{proj}.bias"] = (hidden,)
        shapes[f"{p}attention.output.dense.weight"] = (hidden, hidden)
        shapes[f"{p}attention.output.dense.bias"] = (hidden,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (hidden,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (hidden,)
        shapes[f"{p}intermediate.dense.weight"] = (intermediate, hidden)
        shapes[f"{p}intermediate.dense.bias"] = (intermediate,)
        shapes[f"{p}output.dense.weight"] = (hidden, intermediate)
        shapes[f"{p}output.dense.bias"] = (hidden,)
        shapes[f"{p}output.LayerNorm.weight"] = (hidden,)
        shapes[f"{p}output.LayerNorm.bias"] = (hidden,)
    return shapes


def llama_shapes(
    layers: int = 2, hidden: int = 32, intermediate: int = 64, kv: int = 16, vocab: int = 100
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a small LLaMA-like decoder (grouped-query attention with `kv`
    key/value rows, gated MLP, untied output head)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_base(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in shapes.items():
        if name.endswith("LayerNorm.weight"):
            base[name] = torch.ones(shape, dtype=dtype)
        else:
            base[name] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    base["embeddings.position_ids"] = torch.arange(
        shapes["embeddings.position_embeddings.weight"][0]
        if "embeddings.position_embeddings.weight" in shapes
        else 8
    ).unsqueeze(0)
    return base


def make_task_vector(
    base: dict[str, torch.Tensor], seed: int, rank: int = 4, scale: float = 0.02, noise: float = 0.1
) -> dict[str, torch.Tensor]:
    """A task vector: low-rank + `noise`-relative dense part on 2-D tensors, dense elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if not tensor.dtype.is_floating_point:
            continue
        if tensor.ndim == 2:
            m, n = tensor.shape
            r = min(rank, m, n)
            low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5
            dense = torch.randn(m, n, generator=g)
            delta = (low + noise * dense) * scale
        else:
            delta = torch.randn(tensor.shape, generator=g) * scale
        out[name] = delta.to(torch.float64)
    return out


def apply(
    base: dict[str, torch.Tensor], task_vector: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {
        name: (t.to(torch.float64) + task_vector[name]).to(t.dtype)
        if name in task_vector
        else t.clone()
        for name, t in base.items()
    }


def write_stream(
    directory: str | Path,
    models: int,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
    rank: int = 4,
) -> tuple[Path, list[Path]]:
    """Write base/ and model-XX/ directories (each with model.safetensors); return their paths."""
    directory = Path(directory)
    base = make_base(shapes or transformer_shapes(), seed=seed, dtype=dtype)
    base_dir = directory / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    save_file(base, str(base_dir / "model.safetensors"))
    paths = []
    for i in range(models):
        model = apply(base, make_task_vector(base, seed=seed * 1000 + i + 1, rank=rank))
        path = directory / f"model-{i + 1:02d}"
        path.mkdir(exist_ok=True)
        save_file(model, str(path / "model.safetensors"))
        paths.append(path)
    return base_dir, paths
