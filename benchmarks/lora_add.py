"""Time `add` of a LoRA adapter against `add` of the equivalent full checkpoint, and against PEFT's
`merge_and_unload()` + save + `add` (what users had to do before adapters were read directly).

A LLaMA-shaped float32 model is built from a config (random weights; nothing is downloaded) and
saved as the base; PEFT makes rank-R adapters on every attention and MLP projection with random
factors (`init_lora_weights=False`). Each route merges the same two inputs into a fresh OPCM
state; step 2 is the one that projects. Times are wall-clock seconds of `MergeState.add` (which
includes hashing the input), and, for the PEFT route, of loading the base, applying the adapter,
`merge_and_unload()` and `save_pretrained` of the full model.

    python benchmarks/lora_add.py                   # hidden 1024, 4 layers, rank 8
    python benchmarks/lora_add.py --rank 32 --layers 8

Needs `peft` and `transformers` (`pip install mergestream[lora,bench]`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("cache/lora_add"))
    args = parser.parse_args()

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from mergestream import MergeState

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    base_dir = work / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(base_dir)

    def load_base() -> torch.nn.Module:
        return transformers.LlamaForCausalLM.from_pretrained(base_dir)

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = []
    for i in range(2):
        torch.manual_seed(1 + i)
        lora = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False
        )
        peft_model = get_peft_model(load_base(), lora)
        with torch.no_grad():  # modest updates, as fine-tuning makes
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        peft_model.save_pretrained(work / f"adapter{i}")
        adapters.append(work / f"adapter{i}")

    # The PEFT route: a full model per adapter, then add.
    peft_seconds, fulls = [], []
    for i, adapter in enumerate(adapters):
        started = time.perf_counter()
        merged = PeftModel.from_pretrained(load_base(), adapter).merge_and_unload()
        merged.save_pretrained(work / f"full{i}")
        peft_seconds.append(time.perf_counter() - started)
        fulls.append(work / f"full{i}")
        del merged

    def run(route: str, inputs: list[Path]) -> list[float]:
        state = MergeState.create(work / f"state_{route}", base_dir, "opcm")
        seconds = []
        for item in inputs:
            started = time.perf_counter()
            state.add(item)
            seconds.append(time.perf_counter() - started)
        shutil.rmtree(work / f"state_{route}")
        return seconds

    adapter_add = run("adapter", adapters)
    full_add = run("full", fulls)
    params = sum(p.numel() for p in load_base().parameters())
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "model": {
            "parameters": params,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": args.vocab,
        },
        "rank": args.rank,
        "adapter_bytes": folder_size(adapters[0]),
        "full_bytes": folder_size(fulls[0]),
        "add_adapter_s": [round(s, 2) for s in adapter_add],
        "add_full_s": [round(s, 2) for s in full_add],
        "peft_merge_and_save_s": [round(s, 2) for s in peft_seconds],
        "peft_route_s": [round(a + b, 2) for a, b in zip(peft_seconds, full_add, strict=True)],
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
