"""A deterministic CLIP-ViT-B/32-shaped model zoo: a "pretrained" vision tower plus fine-tuned
variants with synthetic task vectors, written as Hugging Face model directories.

No weights are downloaded. Tensor names and shapes come from a local
`transformers.CLIPVisionConfig` (ViT-B/32 by default: hidden 768, 12 layers, 12 heads, MLP 3072,
patch 32, image 224; 87.5M parameters) instantiated on the meta device; every value is drawn
here from seeded generators, so the zoo is the same whatever the transformers version.

Files use the Hub's layout for `CLIPVisionModel` (`vision_model.` prefix, `model.safetensors`
plus `config.json`), which transformers 4.x and 5.x both load without missing keys.

Task vectors (fine-tuned minus pretrained), per tensor, scaled to a relative norm
‖τ‖/‖θ0‖ drawn per task from `rel_norm` (a few percent):
- 2-D weights of linear layers: a low-rank part shared by all tasks (same subspace, task-specific
  mixing), a task-specific low-rank part with decaying spectrum, and dense noise;
- every other tensor (biases, norms, patch kernel, position embedding): dense noise;
- `class_embedding`: zero (the reference implementation never merges it, so it is left out of
  every comparison by construction).

    python benchmarks/clip_zoo.py --models 8          # build (or reuse) and print the paths
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

ZOO_FORMAT = 1
DEFAULT_ROOT = Path(
    os.environ.get("MERGESTREAM_BENCH_CACHE", Path.home() / ".cache" / "mergestream" / "bench")
)
# ViT-B/32 (the vision tower of openai/clip-vit-base-patch32).
VIT_B32 = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 32,
    "image_size": 224,
}
# A tiny tower of the same structure, for smoke tests.
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "patch_size": 32,
    "image_size": 64,
}
PREFIX = "vision_model."
CLASS_EMBEDDING = "vision_model.embeddings.class_embedding"


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo's content. Model i depends on the spec and i only, so
    zoos that differ in `models` alone share one directory (built up as needed)."""

    config: dict = field(default_factory=lambda: dict(VIT_B32))
    models: int = 8
    seed: int = 0
    rel_norm: tuple[float, float] = (0.02, 0.05)  # per-task ‖τ‖/‖θ0‖, uniform in this range
    task_rank: int = 16  # rank of each task's own low-rank part
    shared_rank: int = 8  # rank of the subspace all tasks share
    shared_energy: float = 0.3  # fractions of ‖τ‖² of a linear weight ...
    noise_energy: float = 0.1  # ... (the task-specific part takes the rest)

    def content(self) -> dict:
        out = asdict(self)
        out.pop("models")
        out["rel_norm"] = list(self.rel_norm)
        return {"format": ZOO_FORMAT, **out}

    def key(self) -> str:
        text = json.dumps(self.content(), sort_keys=True)
        return f"{zlib.crc32(text.encode()):08x}"


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    models: list[Path]
    spec: ZooSpec

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.models]


def clip_vision_config(overrides: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**overrides)


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names (Hub layout) and shapes of a CLIPVisionModel's state dict, no memory allocated."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(clip_vision_config(config))
    shapes = {}
    for name, tensor in model.state_dict().items():
        full = name if name.startswith(PREFIX) else PREFIX + name
        shapes[full] = tuple(tensor.shape)
    return shapes


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """2-D weights of CLIP's nn.Linear layers (attention projections and MLP)."""
    return len(shape) == 2 and name.endswith(".weight") and "embedding" not in name


def _generator(seed: int, *parts: object) -> torch.Generator:
    key = ":".join(str(p) for p in (seed, *parts))
    return torch.Generator().manual_seed(zlib.crc32(key.encode()) + (seed << 32))


def make_base(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A "pretrained" model: plausible scales per kind of tensor, float32."""
    base = {}
    for name, shape in shapes.items():
        g = _generator(seed, "base", name)
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.05 * noise
        elif name.endswith(".bias"):
            value = 0.01 * noise
        else:
            value = 0.02 * noise
        base[name] = value.to(torch.float32)
    return base


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm()
    return x / norm if norm > 0 else x


def _low_rank(g: torch.Generator, m: int, n: int, rank: int, mixing: torch.Tensor | None = None):
    rank = min(rank, m, n)
    left = torch.randn(m, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, n, generator=g, dtype=torch.float64)
    decay = torch.arange(1, rank + 1, dtype=torch.float64).rsqrt()
    core = torch.diag(decay) if mixing is None else mixing[:rank, :rank]
    return left @ core @ right


def task_vector(
    base: dict[str, torch.Tensor], spec: ZooSpec, task: int
) -> tuple[dict[str, torch.Tensor], float]:
    """The task vector of model `task` (1-based), float64, and its relative norm target."""
    g_task = _generator(spec.seed, "task", task)
    low, high = spec.rel_norm
    rel = low + (high - low) * float(torch.rand((), generator=g_task, dtype=torch.float64))
    specific_energy = 1.0 - spec.shared_energy - spec.noise_energy
    out = {}
    for name, w in base.items():
        if name == CLASS_EMBEDDING:
            out[name] = torch.zeros(w.shape, dtype=torch.float64)
            continue
        g = _generator(spec.seed, "task", task, name)
        if is_linear_weight(name, tuple(w.shape)):
            m, n = w.shape
            mixing = torch.randn(
                spec.shared_rank, spec.shared_rank, generator=g, dtype=torch.float64
            )
            # The shared subspace is drawn from a generator that ignores the task index.
            shared = _low_rank(
                _generator(spec.seed, "shared", name), m, n, spec.shared_rank, mixing
            )
            specific = _low_rank(g, m, n, spec.task_rank)
            noise = torch.randn(m, n, generator=g, dtype=torch.float64)
            direction = (
                math.sqrt(spec.shared_energy) * _unit(shared)
                + math.sqrt(specific_energy) * _unit(specific)
                + math.sqrt(spec.noise_energy) * _unit(noise)
            )
        else:
            direction = torch.randn(w.shape, generator=g, dtype=torch.float64)
        out[name] = _unit(direction) * (rel * float(w.double().norm()))
    return out, rel


def _write_model(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = clip_vision_config(config).to_dict()
    cfg.pop("transformers_version", None)
    cfg.pop("dtype", None)
    cfg.update({"architectures": ["CLIPVisionModel"], "torch_dtype": "float32"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def zoo_dir(spec: ZooSpec, root: Path | None = None) -> Path:
    return Path(root or DEFAULT_ROOT / "clip-zoo") / f"zoo-{spec.key()}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_zoo(spec: ZooSpec | None = None, root: Path | None = None, log=print) -> Zoo:
    """Build the zoo under `root` (default ~/.cache/mergestream/bench/clip-zoo), reusing every
    model already there. A model counts as present once `zoo.json` lists it (written after the
    model's files), so an interrupted build resumes cleanly."""
    spec = spec or ZooSpec()
    directory = zoo_dir(spec, root)
    names = [f"task-{i:02d}" for i in range(1, spec.models + 1)]
    zoo = Zoo(directory, directory / "base", [directory / n for n in names], spec)
    info_path = directory / "zoo.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is not None and info.get("content") != spec.content():
        raise RuntimeError(f"{directory}: zoo.json describes another zoo; remove the directory")
    done = {t["name"] for t in info["tasks"]} if info else set()
    if all(n in done for n in names):
        return zoo
    directory.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(spec.config)
    base = make_base(shapes, spec.seed)
    base_norm = math.sqrt(sum(float(t.double().square().sum()) for t in base.values()))
    if info is None:
        log(f"zoo: building {directory}")
        _write_model(directory / "base", base, spec.config)
        info = {
            "content": spec.content(),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "tensors": len(shapes),
            "linear_weights": sum(is_linear_weight(n, s) for n, s in shapes.items()),
            "base_norm": base_norm,
            "tasks": [],
        }
        _write_atomically(info_path, json.dumps(info, indent=2) + "\n")
    for i, name in enumerate(names, start=1):
        if name in done:
            continue
        tau, rel = task_vector(base, spec, i)
        model = {k: (base[k].double() + tau[k]).to(torch.float32) for k in base}
        shutil.rmtree(directory / name, ignore_errors=True)
        _write_model(directory / name, model, spec.config)
        tau_norm = math.sqrt(sum(float(t.square().sum()) for t in tau.values()))
        info["tasks"].append(
            {"name": name, "rel_norm": tau_norm / base_norm, "task_vector_norm": tau_norm}
        )
        info["tasks"].sort(key=lambda t: t["name"])
        _write_atomically(info_path, json.dumps(info, indent=2) + "\n")
        log(f"zoo: wrote {name} (‖τ‖/‖θ0‖ = {tau_norm / base_norm:.4f})")
        del tau, model
    return zoo


def zoo_info(zoo: Zoo) -> dict:
    return json.loads((zoo.root / "zoo.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="cache directory of zoos")
    parser.add_argument("--tiny", action="store_true", help="a tiny tower (smoke tests)")
    args = parser.parse_args(argv)
    spec = ZooSpec(config=dict(TINY if args.tiny else VIT_B32), models=args.models, seed=args.seed)
    zoo = build_zoo(spec, args.root)
    print(json.dumps({"base": str(zoo.base), "models": [str(p) for p in zoo.models]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
