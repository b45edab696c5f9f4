"""An OPCM stream of LoRA adapters on LLaMA-7B shapes: the factored state against the dense one.

A bf16 base with the tensor names and shapes of LLaMA-7B (hidden 4096, MLP 11008, 32 layers of
q/k/v/o/gate/up/down, vocab 32000; 6.7B parameters, 13.5 GB) is written on disk from a seeded
generator, one tensor at a time, as an HF folder of one shard per layer with an index; nothing
is downloaded. Adapters are written as PEFT adapter folders (`adapter_config.json`,
`adapter_model.safetensors` with float32 lora_A/lora_B on all seven projections, random
factors: A ~ N(0, 1/in), B ~ N(0, 0.01²), lora_alpha = 2r). The same adapters go, one step
each, into a state created with the default (factored) and, with `--dense`, into one created
with `lowrank=False` (`init --dense`): every step's wall-clock time of `MergeState.add` (which
includes hashing the adapter and checking the base), the engine's own time, the bytes of the
state's current generation and the largest rank are reported side by side, in one run.

`--layers N` cuts the model to its first N layers (the embeddings and the head kept), for the
dense path, whose steps cost O(m·n²) per matrix and whose float64 state of the whole model
(52 GB) does not fit here: the per-layer numbers of a slice extrapolate to 32 layers (each layer
is the same seven matrices, folded one after the other). `--stop-after-switch` ends the factored
run after the first step in which a matrix went dense by the switch rule
(`lowrank.DENSE_RANK_FRACTION`).

    python benchmarks/lowrank_llama7b.py                                # 32 layers, 8 x rank 16
    python benchmarks/lowrank_llama7b.py --layers 1 --adapters 2 --dense
    python benchmarks/lowrank_llama7b.py --layers 1 --rank 64 --adapters 16 --plan-next

Results go to WORK/results-*.json and stdout. Disk: the base (13.5 GB for 32 layers), the
adapters (r·(m + n)·4 bytes per matrix), two generations of each state while a step runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from mergestream import MergeState
from mergestream.io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from mergestream.methods import lowrank
from mergestream.synthetic import llama_shapes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_base(folder: Path, shapes: dict[str, tuple[int, ...]], layers: int) -> None:
    """The bf16 base, one shard per layer (and one for the embeddings, norm and head)."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(layer, []).append(name)
    weight_map = {}
    for index, (group, names) in enumerate(groups.items(), 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        specs = [(n, TensorSpec(torch.bfloat16, shapes[n])) for n in names]
        with StreamingSafetensorsWriter(folder / file, specs, {"format": "pt"}) as writer:
            for name in names:
                if name.endswith("norm.weight"):
                    tensor = torch.ones(shapes[name], dtype=torch.bfloat16)
                else:
                    tensor = (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)
                writer.write(name, tensor)
                weight_map[name] = file
        print(f"  base shard {index}/{len(groups)} ({group})", flush=True)
    index_data = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shapes["model.layers.0.self_attn.q_proj.weight"][0],
        "num_hidden_layers": layers,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))


def write_adapter(
    folder: Path, base: Path, shapes: dict[str, tuple[int, ...]], rank: int, seed: int
) -> Path:
    """A PEFT LoRA adapter folder: rank `rank` on all seven projections of every layer."""
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1000 + seed)
    targets = [n for n in shapes if n.rsplit(".", 2)[-2] in PROJECTIONS]
    specs = []
    for name in targets:
        out_dim, in_dim = shapes[name]
        module = "base_model.model." + name.removesuffix(".weight")
        specs.append((module + ".lora_A.weight", TensorSpec(torch.float32, (rank, in_dim))))
        specs.append((module + ".lora_B.weight", TensorSpec(torch.float32, (out_dim, rank))))
    with StreamingSafetensorsWriter(
        folder / "adapter_model.safetensors", specs, {"format": "pt"}
    ) as writer:
        for key, spec in specs:
            rows, cols = spec.shape
            if key.endswith("lora_A.weight"):
                tensor = torch.randn(rows, cols, generator=g) / cols**0.5
            else:
                tensor = torch.randn(rows, cols, generator=g) * 0.01
            writer.write(key, tensor)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": str(base.resolve()),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def largest_rank(state: MergeState) -> tuple[int, int, int]:
    """(largest factored rank, factored matrices, dense matrices) of the state now."""
    ranks, dense = [], 0
    for info in state.infos:
        form = state.state_form(info.name)
        if form.kind == "factored":
            ranks.append(form.rank)
        elif form.kind == "dense" and len(info.shape) == 2:
            dense += 1
    return max(ranks, default=0), len(ranks), dense


def run(
    label: str,
    path: Path,
    base: Path,
    adapters: list[Path],
    lowrank_state: bool,
    stop_after_switch: bool,
    peek: Path | None = None,
) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    state = MergeState.create(path, base, "opcm", lowrank=lowrank_state)
    init_seconds = time.perf_counter() - started
    print(f"{label}: init {init_seconds:.1f}s", flush=True)
    steps = []
    for adapter in adapters:
        plan = state.plan(adapter)
        started = time.perf_counter()
        stats = state.add(adapter)
        wall = time.perf_counter() - started
        generation = next(path.glob("gen-*"))
        rank, factored, dense = largest_rank(state)
        steps.append(
            {
                "step": stats.step,
                "wall_seconds": round(wall, 3),
                "engine_seconds": round(stats.seconds, 3),
                "state_bytes": folder_bytes(generation),
                "largest_rank": rank,
                "factored_matrices": factored,
                "dense_matrices": dense,
                "planned_seconds": round(plan.step_seconds, 3),
                "planned_bytes": plan.state_generation_bytes,
            }
        )
        print(f"{label}: {json.dumps(steps[-1])}", flush=True)
        if stop_after_switch and lowrank_state and dense:
            break
    out = {"init_seconds": round(init_seconds, 1), "steps": steps}
    if peek is not None:  # what the plan says of one more adapter (nothing is added)
        plan = state.plan(peek)
        out["next_plan"] = {
            "forms": plan.forms,
            "matrices": sorted(set(plan.matrices.values())),
            "planned_seconds": round(plan.step_seconds, 1),
            "planned_bytes": plan.state_generation_bytes,
        }
        print(f"{label}: next step planned {json.dumps(out['next_plan'])}", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--dense", action="store_true", help="also run the dense-only state")
    parser.add_argument("--stop-after-switch", action="store_true")
    parser.add_argument(
        "--plan-next", action="store_true", help="plan one more adapter after the run (no add)"
    )
    parser.add_argument("--work", type=Path, default=Path("cache/lowrank_llama7b"))
    args = parser.parse_args()

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.hidden, args.vocab)
    work = args.work
    base = work / f"base-{args.layers}l"
    print(f"writing the base ({sum(torch.Size(s).numel() for s in shapes.values()) / 1e9:.2f}B)")
    write_base(base, shapes, args.layers)
    adapters = [
        write_adapter(work / f"adapter-{args.layers}l-r{args.rank}-{i}", base, shapes, args.rank, i)
        for i in range(args.adapters + args.plan_next)
    ]
    peek = adapters.pop() if args.plan_next else None
    results = {
        "date": dt.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "args": {k: str(v) for k, v in vars(args).items()},
        "dense_rank_fraction": lowrank.DENSE_RANK_FRACTION,
        "base_bytes": folder_bytes(base),
        "adapter_bytes": folder_bytes(adapters[0]),
        "factored": run(
            "factored", work / "state-f", base, adapters, True, args.stop_after_switch, peek
        ),
    }
    if args.dense:
        results["dense"] = run("dense", work / "state-d", base, adapters, False, False)
        pairs = zip(results["factored"]["steps"], results["dense"]["steps"], strict=False)
        results["ratios"] = [
            {
                "step": f["step"],
                "time_dense_over_factored": round(d["wall_seconds"] / f["wall_seconds"], 1),
                "bytes_dense_over_factored": round(d["state_bytes"] / f["state_bytes"], 1),
            }
            for f, d in pairs
        ]
        print(json.dumps(results["ratios"]))
    out = work / f"results-{args.layers}l-r{args.rank}-n{args.adapters}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
