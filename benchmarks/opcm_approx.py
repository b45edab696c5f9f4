"""What OPCM's opt-in `approx-gram` decomposition costs in accuracy, on the real benchmark.

Runs the continual-merging protocol (`mergestream.bench`) on a zoo built by
`python -m mergestream.bench.finetune` with two methods only: OPCM at its defaults (the exact
`gram` decomposition) and OPCM with `decomposition=approx-gram`, over the same seeded task
orders. Reports, per method, the final average accuracy (ACC) and the merge time, and per order
the difference in ACC (paired, same order). For the first order it also compares the merged
task vectors tensor by tensor (relative difference of approx-gram's against the exact one's).

    python benchmarks/opcm_approx.py                      # the zoo in the benchmark cache
    python benchmarks/opcm_approx.py --zoo ZOO --orders 10 --json results.json

Merging is a small part of this benchmark's time (evaluating the encoder on every task dominates),
so the speed of the approximate path is measured where it matters, by
`opcm_vs_fusionbench.py --decomposition approx-gram` on the ViT-B/32-shaped stream.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mergestream import MergeState
from mergestream.bench.protocol import mean_std
from mergestream.bench.run import MethodSpec, machine_description, run_benchmark
from mergestream.bench.sources import cache_root

EXACT = MethodSpec("OPCM (alpha=0.5), exact gram", "opcm", {"alpha": 0.5})
APPROX = MethodSpec(
    "OPCM (alpha=0.5), approx-gram", "opcm", {"alpha": 0.5, "decomposition": "approx-gram"}
)


def task_vector_differences(zoo_root: Path, order: list[str]) -> dict[str, float]:
    """Relative difference of approx-gram's merged task vectors against the exact ones, after
    merging `order`: the largest over tensors and the global one."""
    states = {}
    for spec in (EXACT, APPROX):
        state = MergeState.in_memory(zoo_root / "pretrained", spec.method, **spec.params)
        for task in order:
            state.add(zoo_root / task, allow_duplicate=True)
        states[spec.label] = dict(state.task_vectors())
    exact, approx = states[EXACT.label], states[APPROX.label]
    worst, worst_name, diff_sq, norm_sq = 0.0, "", 0.0, 0.0
    for name, reference in exact.items():
        diff = float((approx[name] - reference).norm())
        norm = float(reference.norm())
        diff_sq, norm_sq = diff_sq + diff**2, norm_sq + norm**2
        relative = diff / norm if norm > 0 else diff
        if relative > worst:
            worst, worst_name = relative, name
    return {
        "max_relative": worst,
        "max_tensor": worst_name,
        "global_relative": math.sqrt(diff_sq / norm_sq) if norm_sq else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="default: <cache>/zoo")
    parser.add_argument("--tasks", default=None, help="comma-separated subset, in this order")
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the encoder is evaluated")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    zoo_root = args.zoo or cache_root() / "zoo"
    if not (zoo_root / "pretrained").is_dir():
        raise SystemExit(f"{zoo_root}: no zoo (build one: python -m mergestream.bench.finetune)")
    tasks = args.tasks.split(",") if args.tasks else None
    results = run_benchmark(
        zoo_root,
        tasks=tasks,
        methods=(EXACT, APPROX),
        orders=args.orders,
        matrix_orders=0,
        alphas=(),
        seed=args.seed,
        device=args.device,
        log=lambda line: print(line, flush=True),
    )
    runs = {label: results["methods"][label]["runs"] for label in (EXACT.label, APPROX.label)}
    paired = [
        b["acc"] - a["acc"] for a, b in zip(runs[EXACT.label], runs[APPROX.label], strict=True)
    ]
    # The order the benchmark merged first, as it recorded it (the zoo is not loaded again).
    differences = task_vector_differences(zoo_root, runs[EXACT.label][0]["order"])
    summary = {}
    for label, label_runs in runs.items():
        acc_mean, acc_std = mean_std([r["acc"] for r in label_runs])
        summary[label] = {
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "merge_seconds": sum(r["merge_seconds"] for r in label_runs),
        }
    paired_mean, paired_std = mean_std(paired)
    report = {
        "machine": machine_description(),
        "meta": results["meta"],
        "summary": summary,
        "paired_acc_difference": {"mean": paired_mean, "std": paired_std, "per_order": paired},
        "task_vectors_first_order": differences,
    }
    lines = [
        f"Zoo {zoo_root} ({len(results['meta']['tasks'])} tasks), {args.orders} orders, "
        f"seed {args.seed}; {report['machine']}",
        "",
        "| method | ACC (mean ± std) | merge time, all orders |",
        "|---|--:|--:|",
    ]
    for label, row in summary.items():
        lines.append(
            f"| {label} | {100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f} | "
            f"{row['merge_seconds']:.1f} s |"
        )
    lines += [
        "",
        f"Paired ACC difference (approx-gram − exact, same order): {100 * paired_mean:+.3f} ± "
        f"{100 * paired_std:.3f} points; per order "
        + ", ".join(f"{100 * d:+.2f}" for d in paired)
        + ".",
        f"Task vectors after the first order: max relative difference "
        f"{differences['max_relative']:.2e} ({differences['max_tensor']}), global "
        f"{differences['global_relative']:.2e}.",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
