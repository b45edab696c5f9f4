"""Run FusionBench's own OPCM on local CLIP vision model directories, timing every step.

This script runs INSIDE the reference's virtual environment (fusion-bench, transformers 4.x); it
imports nothing from mergestream. `opcm_vs_fusionbench.py` starts it as a subprocess:

    python _fusionbench_runner.py --base DIR --model NAME=DIR [--model ...] --out DIR
        [--alpha 0.5] [--dtype float32|float64] [--algorithm clip|general] [--device cpu]

It builds a `CLIPVisionModelPool` over the directories ("_pretrained_" = base), instantiates the
reference's real algorithm class with `shuffle_order=False` (so the order is the one given) and
runs it the way FusionBench's program does (`on_run_start`, `run(modelpool)`, `on_run_end`).
Step boundaries are taken from timestamps of the pool's `load_model` calls (each step starts by
loading its model), the end of the last step from the return of `run`; the reference's own
profiler durations are recorded too. The peak RSS of each step is read from /proc/self/status
(VmHWM, reset at every boundary through /proc/self/clear_refs). The merged model is written to
OUT/model.safetensors (timed as the export) and the measurements to OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

T_PROCESS = time.perf_counter()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log


def peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(match.group(1)) / 1024 if match else None
    except OSError:
        return None


_HIGHEST = [0.0]  # the process's peak RSS over every interval closed so far


def reset_peak_rss() -> bool:
    """Start a new peak-RSS interval. Resetting VmHWM also resets what the kernel reports as the
    process's ru_maxrss, so the highest value seen is kept here (see `process_peak_rss_mib`)."""
    _HIGHEST[0] = max(_HIGHEST[0], peak_rss_mib() or 0.0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_mib() -> float:
    return max(_HIGHEST[0], peak_rss_mib() or 0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="FusionBench OPCM, timed")
    parser.add_argument("--base", required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--algorithm", choices=["clip", "general"], default="clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:
        torch.set_default_dtype(dtype)

    import inspect
    import types
    from importlib.metadata import version

    import lightning as L
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    t_imported = time.perf_counter()
    names, dirs = [], {}
    for item in args.model:
        name, _, path = item.partition("=")
        names.append(name)
        dirs[name] = path

    # Make sure the checkpoints load exactly (no missing or unexpected keys) before timing:
    # transformers fills missing weights with random values and only warns.
    _, loading = CLIPVisionModel.from_pretrained(args.base, output_loading_info=True)
    problems = {k: v for k, v in loading.items() if v}
    if problems:
        raise SystemExit(f"{args.base}: does not load as CLIPVisionModel: {problems}")

    def entry(path: str):
        if dtype == torch.float32:
            return path  # the plain form, as FusionBench's own configs write it
        return {
            "_target_": "transformers.CLIPVisionModel.from_pretrained",
            "pretrained_model_name_or_path": path,
            "torch_dtype": args.dtype,
        }

    models = {"_pretrained_": entry(args.base), **{n: entry(dirs[n]) for n in names}}
    modelpool = CLIPVisionModelPool(DictConfig(models))

    # (model, wall time, CPU time, peak RSS since the previous mark)
    marks: list[tuple[str, float, float, float | None]] = []
    original_load = modelpool.load_model

    def timed_load(name, *a, **kw):  # noqa: ANN001, ANN202
        marks.append((str(name), time.perf_counter(), time.process_time(), peak_rss_mib()))
        reset_peak_rss()
        model = original_load(name, *a, **kw)
        got = next(model.parameters()).dtype
        if got != dtype:
            raise SystemExit(f"{name}: loaded as {got}, expected {dtype}")
        return model

    modelpool.load_model = timed_load

    cls = OPCMForCLIP if args.algorithm == "clip" else OPCM
    algorithm = cls(
        alpha=args.alpha,
        shuffle_order=False,
        seed=None,
        save_on_every_step=False,
        evaluate_on_every_step=False,
    )
    fabric = L.Fabric(accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1)
    fabric.launch()
    algorithm.fabric = fabric
    # OPCMForCLIP reads the program's task pool (for per-step evaluation, disabled here).
    algorithm._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    source = inspect.getsource(cls.merge_linear_weights)
    zero_diagonal = "diagonal().fill_(0)" in source

    reset_peak_rss()
    t_run = time.perf_counter()
    algorithm.on_run_start()
    merged = algorithm.run(modelpool)
    t_ran = time.perf_counter()
    algorithm.on_run_end()
    marks.append(("<end>", t_ran, time.process_time(), peak_rss_mib()))

    reset_peak_rss()
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in merged.state_dict().items()}
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    t_saved = time.perf_counter()
    export_rss = peak_rss_mib()

    # marks[0] is the pretrained model; marks[i] (i >= 1) starts step i.
    if [m[0] for m in marks[:-1]] != ["_pretrained_", *names]:
        raise SystemExit(f"unexpected load order: {[m[0] for m in marks]}")
    steps = []
    for i in range(1, len(marks) - 1):
        steps.append(
            {
                "step": i,
                "model": marks[i][0],
                "seconds": marks[i + 1][1] - marks[i][1],
                "cpu_seconds": marks[i + 1][2] - marks[i][2],
                "peak_rss_mib": marks[i + 1][3],
            }
        )
    profiler = {k: [float(x) for x in v] for k, v in algorithm.profiler.recorded_durations.items()}
    result = {
        "implementation": "fusion-bench",
        "fusion_bench_version": version("fusion-bench"),
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "algorithm": f"{cls.__module__}.{cls.__qualname__}",
        "zero_diagonal": zero_diagonal,
        "alpha": args.alpha,
        "dtype": args.dtype,
        "device": str(fabric.device),
        "threads": torch.get_num_threads(),
        "order": names,
        "import_seconds": t_imported - T_PROCESS,
        "setup_seconds": marks[1][1] - marks[0][1],  # loading the pretrained model
        "setup_peak_rss_mib": marks[1][3],
        "steps": steps,
        "run_seconds": t_ran - t_run,
        "export_seconds": t_saved - t_ran,
        "export_peak_rss_mib": export_rss,
        "profiler": profiler,
        "process_seconds": time.perf_counter() - T_PROCESS,
        "peak_rss_mib": process_peak_rss_mib(),
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
