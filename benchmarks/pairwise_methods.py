"""Time per merge step of DOP, Iso-C and TSV-M beside OPCM's on a MiniLM-shaped stream, and how far
DOP's exact solver lands from its reference Adam optimisation.

    python benchmarks/pairwise_methods.py --layers 6 --models 3 --json pairwise.json

The stream is synthetic (`mergestream.synthetic`: all-MiniLM-L6-v2's tensor names and shapes,
hidden 384, MLP 1536, vocabulary 30522; task vectors low-rank plus dense noise), in memory, so
only the merge itself is timed: one `MergeState.add` per model, the same engine as `mergestream
add`. Reported per method: the mean time of steps 2.. (step 1 only stores the first task vector),
and for DOP the relative distance ‖X_exact − X_adam‖ / ‖X_adam − X_start‖ over the linear
weights after the last step (X_start: the average both start from) and the mean final weight of
the merged model's loss (`last_mean_merged_weight`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mergestream import MergeState  # noqa: E402
from mergestream.bench.run import machine_description  # noqa: E402
from mergestream.methods.classify import default_is_linear_weight  # noqa: E402
from mergestream.methods.dop import _Subspace  # noqa: E402
from mergestream.synthetic import (  # noqa: E402
    apply,
    make_base,
    make_task_vector,
    transformer_shapes,
)

METHODS = {
    "opcm": {},
    "iso_c": {},
    "tsv_m": {},
    "dop/exact": {"solver": "exact"},
    "dop/adam": {},
    "dop/adam-fixed": {"mgda": False},
}


def run(layers: int, models: int, methods: list[str], threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    shapes = transformer_shapes(
        layers=layers, hidden=384, intermediate=1536, vocab=30522, positions=512
    )
    base = make_base(shapes, seed=0)
    stream = [apply(base, make_task_vector(base, seed=i + 1)) for i in range(models)]
    results: dict = {
        "machine": machine_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layers": layers,
        "models": models,
        "methods": {},
    }
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for label in methods:
        params = METHODS[label]
        method = label.split("/")[0]
        state = MergeState.in_memory(base, method, **params)
        seconds = []
        for model in stream:
            started = time.perf_counter()
            state.add(model, allow_duplicate=True)
            seconds.append(time.perf_counter() - started)
        later = seconds[1:]
        results["methods"][label] = {
            "step_seconds": [round(s, 3) for s in seconds],
            "mean_later_step_seconds": round(sum(later) / len(later), 3),
            "scalars": state.scalars,
        }
        merged[label] = dict(state.task_vectors())
        print(f"{label:24s} steps 2..: {sum(later) / len(later):8.2f} s", file=sys.stderr)
    if "dop/exact" in merged and models == 2:
        results["dop"] = compare_dop(base, stream, merged)
    return results


def compare_dop(base, stream, merged) -> dict:
    """After one DOP step: the fixed-weight objective (0.8, 0.2) at the start, at each result, and
    each result's distance to the exact minimiser relative to its distance from the start."""
    taus = [
        {n: m[n].double() - base[n].double() for n in base if base[n].is_floating_point()}
        for m in stream
    ]
    linear = [n for n in base if base[n].ndim == 2 and default_is_linear_weight(n)]
    subspaces = {n: tuple(_Subspace.of(t[n], 0.99999, "uv") for t in taus) for n in linear}

    def objective(x: dict) -> float:
        return sum(
            w * task.loss_and_gradient(x[n])[0]
            for n in linear
            for w, task in zip((0.8, 0.2), subspaces[n], strict=True)
        )

    start = {n: (taus[0][n] + taus[1][n]) / 2 for n in linear}
    exact = merged["dop/exact"]
    out = {"objective_at_start": objective(start)}
    for label, result in merged.items():
        if not label.startswith("dop/"):
            continue
        out[f"objective {label}"] = objective(result)
        if label != "dop/exact":
            num = sum(float((exact[n] - result[n]).square().sum()) for n in linear)
            den = sum(float((result[n] - start[n]).square().sum()) for n in linear)
            out[f"distance to exact / move, {label}"] = math.sqrt(num / den) if den else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = run(args.layers, args.models, args.methods.split(","), args.threads)
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
