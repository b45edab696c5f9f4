"""Run the reference implementations of continual DOP, Iso-C and TSV-M on local CLIP vision model
directories and write the merged model.

This script runs INSIDE the reference's virtual environment (fusion-bench 0.2.33, transformers
4.x); it imports nothing from mergestream. `pairwise_vs_reference.py` starts it:

    python _pairwise_reference_runner.py --method dop|iso_c|tsv_m --base DIR --model DIR
        [--model DIR ...] --out FILE [--dtype float32|float64] [--seed 0]

- dop: FusionBench's `ContinualDOPForCLIP` at the values of its shipped `dop.yaml`, driven step
  by step the way its `run` does (step 1: the first model; then `_layer_wise_optimize` on
  ["merged", incoming]) without the task pool, shuffling or saving; torch seeded with `--seed`.
- iso_c / tsv_m: the NUFILT repository's continual loop (`ContinualISOForCLIP`,
  `ContinualTSVMForCLIP`, config scaling_factor 1), which is not packaged: at every step the
  pair (merged − pretrained, incoming − pretrained) goes through FusionBench's own `iso_c`
  (`isotropic_merging/iso_utils.py`, the same function as NUFILT's copy) or
  `compute_and_sum_svd_mem_reduction` (`task_singular_vector/utils/TSVM_utils.py`), and every
  parameter becomes pretrained + c·result.
The merged state dict is written to FILE (safetensors).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPVisionModel  # noqa: E402

# The values of fusion_bench_config/method/dop/dop.yaml.
DOP_SHIPPED = {
    "lr": 1e-4,
    "num_steps": 200,
    "mgda": True,
    "alpha": 0.8,
    "ema": True,
    "ema_beta": 0.999,
    "svd_epsilon": 0.99999,
    "svd_proj_space": "uv",
}


def load(path: str, dtype: torch.dtype) -> torch.nn.Module:
    return CLIPVisionModel.from_pretrained(path).to(dtype)


def run_dop(base: str, models: list[str], dtype: torch.dtype, seed: int) -> torch.nn.Module:
    import lightning as L
    from fusion_bench.method.dop.dop import ContinualDOPForCLIP

    algorithm = ContinualDOPForCLIP(
        seed=seed,
        shuffle_order=False,
        save_on_every_step=False,
        evaluate_on_every_step=False,
        **DOP_SHIPPED,
    )
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(seed)
    pretrained = load(base, dtype)
    merged = load(models[0], dtype)
    for index, path in enumerate(models[1:], start=1):
        merged = algorithm._layer_wise_optimize(
            model_names=["merged", "incoming"],
            pretrained_model=_copy(pretrained),
            finetuned_models={"merged": merged, "incoming": load(path, dtype)},
            model_idx=index,
        )
    return merged


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    from copy import deepcopy

    return deepcopy(model)


def run_pairwise(method: str, base: str, models: list[str], dtype: torch.dtype):
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub

    if method == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c as combine
    else:
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction as combine,
        )
    scaling_factor = 1.0  # config/method/nufilt/{iso,tsvm}.yaml
    pretrained = load(base, dtype)
    merged = _copy(pretrained)
    with torch.no_grad():
        for index, path in enumerate(models):
            task = load(path, dtype)
            task_vector = state_dict_sub(task.state_dict(), pretrained.state_dict())
            if index == 0:
                result = task_vector
            else:
                merged_tv = state_dict_sub(merged.state_dict(), pretrained.state_dict())
                result = combine([merged_tv, task_vector], accelerator="cpu")
            for name, parameter in task.named_parameters():
                if not parameter.requires_grad:
                    continue
                new = pretrained.get_parameter(name) + scaling_factor * result[name]
                merged.get_parameter(name).data = new
    return merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["dop", "iso_c", "tsv_m"], required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.method == "dop":
        merged = run_dop(args.base, args.model, dtype, args.seed)
    else:
        merged = run_pairwise(args.method, args.base, args.model, dtype)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, args.out)


if __name__ == "__main__":
    main()
