"""How long the causal-LM benchmark takes, from the time units of a run that was measured.

Reads a zoo built by `mergestream finetune` (each task's `finetune.json`: seconds per training
step, test size) and the `results.json` of `mergestream bench` on it (time per task evaluation,
per base-retention scoring, per merge step), and prices another configuration of the same
model on the same machine: more tasks, larger test sets, more steps, orders and methods.

    python benchmarks/llm_budget.py --zoo ZOO --results OUT/results.json \\
        --tasks 14 --n-test 200 --steps 100 --orders 5 --matrix-rows 4,8

Evaluation time is taken as proportional to the number of test examples (each example is a
fixed number of tokens after the shared prefix); everything else is counted as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from mergestream.bench.run import DEFAULT_METHODS, planned_evaluations

# Methods whose final model does not depend on the task order: their later orders reuse the
# first one's evaluations (the benchmark scores the same weights once).
ORDER_FREE = ("average", "task arithmetic (c=0.3)", "MagMax (c=0.5)", "ablation: scaling only")


def measured(zoo: Path, results: dict[str, Any]) -> dict[str, float]:
    """Seconds per training step, per test example evaluated, per retention scoring, per merge
    step (mean over methods), from a measured zoo and run."""
    infos = [json.loads(p.read_text()) for p in sorted(zoo.glob("*/finetune.json"))]
    meta = results["meta"]
    n_test = statistics.fmean(i["n_test"] for i in infos)
    kept = {
        (r["retention"]["perplexity"], r["retention"]["general_accuracy"])
        for entry in results["methods"].values()
        for r in entry["runs"]
        if r.get("retention")
    }
    merges = [
        run["merge_seconds"] / len(run["order"])
        for entry in results["methods"].values()
        for run in entry["runs"]
    ]
    # A run assembled from its score record (--resume) scored little itself: count the
    # recorded scores at the time they took when they were made.
    evaluations = meta["evaluations"] + meta.get("recorded_evaluations_timed", 0)
    evaluation_seconds = meta["evaluation_seconds"] + meta.get("recorded_evaluation_seconds", 0)
    if "retentions" in meta:
        retentions = meta["retentions"] + meta.get("recorded_retentions_timed", 0)
    else:  # results written before retention scorings were counted
        retentions = len(kept) + 1
    retention_seconds = meta["retention_seconds"] + meta.get("recorded_retention_seconds", 0)
    return {
        "train_step": statistics.fmean(i["seconds_per_step"] for i in infos),
        "eval_example": evaluation_seconds / (max(1, evaluations) * n_test),
        "retention": retention_seconds / max(1, retentions),
        "merge_step": statistics.fmean(merges),
    }


def estimate(unit: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """Seconds per phase of the configuration in ``args``."""
    rows = [int(r) for r in args.matrix_rows.split(",") if r]
    methods = args.methods
    planned = planned_evaluations(
        args.tasks, methods, args.orders, args.matrix_orders, True, 0, 0, rows
    )
    reused = args.order_free * (args.orders - args.matrix_orders) * args.tasks
    evaluations = planned - reused
    distinct_finals = (methods - args.order_free) * args.orders + args.order_free + 1
    return {
        "fine-tuning": args.tasks * args.steps * unit["train_step"] * args.zoos,
        "zoo evaluations": 2 * args.tasks * args.n_test * unit["eval_example"] * args.zoos,
        "bench evaluations": evaluations * args.n_test * unit["eval_example"],
        "base retention": distinct_finals * unit["retention"],
        "merging": methods * args.orders * args.tasks * unit["merge_step"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", type=Path, required=True, help="a measured zoo")
    p.add_argument("--results", type=Path, required=True, help="bench results.json on it")
    p.add_argument("--tasks", type=int, default=14)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--steps", type=int, default=100, help="training steps (the suite's: 100)")
    p.add_argument("--zoos", type=int, default=1, help="zoos to fine-tune (rank 8, rank 32)")
    p.add_argument("--orders", type=int, default=5)
    p.add_argument("--matrix-orders", type=int, default=1)
    p.add_argument("--matrix-rows", default="4,8")
    p.add_argument("--methods", type=int, default=len(DEFAULT_METHODS))
    p.add_argument("--order-free", type=int, default=len(ORDER_FREE))
    args = p.parse_args(argv)
    unit = measured(args.zoo, json.loads(args.results.read_text()))
    print("measured: " + ", ".join(f"{k} {v:.3f} s" for k, v in unit.items()))
    phases = estimate(unit, args)
    for name, seconds in phases.items():
        print(f"{name:18s} {seconds / 60:7.1f} min")
    print(f"{'total':18s} {sum(phases.values()) / 3600:7.2f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
