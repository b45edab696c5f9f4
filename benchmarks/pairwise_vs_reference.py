"""Parity of DOP, Iso-C and TSV-M with the reference implementations on a tiny CLIP vision stream
(opt-in: it needs a Python environment with the reference code).

    python benchmarks/pairwise_vs_reference.py --reference-python /path/to/venv/bin/python

The reference environment holds fusion-bench==0.2.33 with transformers<5 (and the torch it runs
on); `_pairwise_reference_runner.py` runs inside it (see its docstring for what it runs). This
side builds the tiny CLIP-ViT-shaped zoo of `clip_zoo.py` (hidden 64, 2 layers; `--models`
fine-tuned variants) in a temporary folder, merges it with mergestream (in memory, float64
state, the reference's settings; DOP with `keep_base=class_embedding$`, the reference's
treatment of that non-leaf parameter), runs the reference in float32 (its precision) and in
float64, and reports for each the relative difference of the merged task vectors,
‖Δ‖/‖τ_ref‖ per tensor (max) and over the whole model. With `--check` it exits 1 when a float64
comparison exceeds `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import clip_zoo  # noqa: E402

from mergestream import MergeState  # noqa: E402

PARAMS = {
    "dop": {"keep_base": "class_embedding$"},
    "iso_c": {"scaling_factor": 1.0},
    "tsv_m": {"scaling_factor": 1.0},
}


def _differences(ours: dict, reference: dict, base: dict) -> dict:
    worst, worst_name, num, den = 0.0, None, 0.0, 0.0
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        want = reference[name].double() - tensor.double()
        got = ours[name].double() - tensor.double()
        error = float((got - want).norm())
        scale = float(want.norm())
        num += error**2
        den += scale**2
        relative = error / scale if scale else (0.0 if error == 0 else math.inf)
        if relative > worst:
            worst, worst_name = relative, name
    return {
        "max_tensor_relative": worst,
        "worst_tensor": worst_name,
        "model_relative": math.sqrt(num / den) if den else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", required=True)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--methods", default="iso_c,tsv_m,dop")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict = {"models": args.models, "config": clip_zoo.TINY, "comparisons": {}}
    failed = False
    with tempfile.TemporaryDirectory() as work:
        spec = clip_zoo.ZooSpec(config=dict(clip_zoo.TINY), models=args.models)
        zoo = clip_zoo.build_zoo(spec, Path(work), log=lambda _: None)
        base = load_file(str(zoo.base / "model.safetensors"))
        for method in args.methods.split(","):
            state = MergeState.in_memory(zoo.base, method, state_dtype="float64", **PARAMS[method])
            for path in zoo.models:
                state.add(path)
            ours = state.state_dict(torch.float64)
            for dtype in args.dtypes.split(","):
                out = Path(work) / f"{method}-{dtype}.safetensors"
                command = [
                    args.reference_python,
                    str(HERE / "_pairwise_reference_runner.py"),
                    "--method",
                    method,
                    "--base",
                    str(zoo.base),
                    "--out",
                    str(out),
                    "--dtype",
                    dtype,
                ]
                for path in zoo.models:
                    command += ["--model", str(path)]
                subprocess.run(command, check=True)
                comparison = _differences(ours, load_file(str(out)), base)
                results["comparisons"][f"{method} vs reference {dtype}"] = comparison
                print(f"{method:6s} vs reference {dtype}: {json.dumps(comparison)}", flush=True)
                if dtype == "float64" and comparison["max_tensor_relative"] > args.tolerance:
                    failed = True
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    raise SystemExit(main())
