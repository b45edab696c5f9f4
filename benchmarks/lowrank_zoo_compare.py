"""Factored against dense sums on a zoo of LoRA adapters: two `mergestream bench` results of the
same zoo, tasks, orders and methods, one with the default state (adapters' sums kept as factors)
and one with `--dense-state` (every sum a dense tensor), printed side by side.

    mergestream bench ZOO --tasks T1,...,T8 --methods M1,... --orders 1 --matrix-orders 1 \\
        --matrix-diagonal --no-sweep --out OUT-factored
    mergestream bench ZOO ... --dense-state --state-dtype float64 --out OUT-dense
    python benchmarks/lowrank_zoo_compare.py OUT-factored/results.json OUT-dense/results.json

For each method: ACC and BWT from both runs, the largest difference of any task's accuracy
between them (final models and the accuracy matrix), and the mean merge step time of each run.
Exits non-zero when the two runs are not the same protocol (zoo, tasks, orders, methods) or a
method the factored form holds scores differently: for those the two forms give the same
merged model to float64 round-off, so a differing score is a defect, not noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mergestream.methods.configs import describe_methods

# The methods whose sums the state keeps as factors (methods/lowrank.py); the others keep
# every tensor dense in both runs, and differ only by the dense dtype they were given.
FACTORED_METHODS = {m.name for m in describe_methods() if m.factored}


def _scores(run: dict[str, Any]) -> list[float]:
    values = list(run["final"].values())
    for row in run.get("matrix") or []:
        values.extend(a for a in row if a is not None)
    return values


def compare(factored: dict[str, Any], dense: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """One row per method, and whether every factored method scored the same in both."""
    for key in ("tasks", "orders", "matrix_orders", "matrix_diagonal_only", "seed"):
        if factored["meta"].get(key) != dense["meta"].get(key):
            raise SystemExit(f"the runs differ in {key}: not the same protocol")
    if factored["methods"].keys() != dense["methods"].keys():
        raise SystemExit("the runs have different methods")
    rows, same = [], True
    for label, ours in factored["methods"].items():
        theirs = dense["methods"][label]
        runs_f, runs_d = ours["runs"], theirs["runs"]
        if [r["order"] for r in runs_f] != [r["order"] for r in runs_d]:
            raise SystemExit(f"{label}: the runs merged other task orders")
        diff = max(
            abs(a - b)
            for rf, rd in zip(runs_f, runs_d, strict=True)
            for a, b in zip(_scores(rf), _scores(rd), strict=True)
        )
        steps = len(runs_f[0]["order"])

        def mean(runs: list[dict[str, Any]], key: str) -> float | None:
            values = [r[key] for r in runs if key in r]
            return sum(values) / len(values) if values else None

        row = {
            "label": label,
            "method": ours["method"],
            "acc": (mean(runs_f, "acc"), mean(runs_d, "acc")),
            "bwt": (mean(runs_f, "bwt"), mean(runs_d, "bwt")),
            "max_diff": diff,
            "step_seconds": (
                mean(runs_f, "merge_seconds") / steps,
                mean(runs_d, "merge_seconds") / steps,
            ),
        }
        rows.append(row)
        if ours["method"] in FACTORED_METHODS and diff != 0.0:
            same = False
    return rows, same


def markdown(rows: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    lines = [
        "| method | sums | ACC factored | ACC dense | BWT factored | BWT dense "
        "| largest score difference | s / step factored | s / step dense | dense / factored |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        form = "factors" if r["method"] in FACTORED_METHODS else "dense in both"
        f_s, d_s = r["step_seconds"]
        lines.append(
            f"| {r['label']} | {form} | {pct(r['acc'][0])} | {pct(r['acc'][1])} "
            f"| {pct(r['bwt'][0])} | {pct(r['bwt'][1])} | {100 * r['max_diff']:.2f} "
            f"| {f_s:.2f} | {d_s:.2f} | {d_s / f_s:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("factored", type=Path, help="results.json of the default run")
    parser.add_argument("dense", type=Path, help="results.json of the --dense-state run")
    args = parser.parse_args(argv)
    factored = json.loads(args.factored.read_text())
    dense = json.loads(args.dense.read_text())
    if dense["meta"].get("state", {}).get("lowrank", True):
        print(f"warning: {args.dense} was not run with --dense-state", file=sys.stderr)
    rows, same = compare(factored, dense)
    print(markdown(rows))
    if not same:
        print("a method held as factors scored differently from its dense run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
