"""The zoo table of a causal-LM benchmark: per task, the base's and the adapter's test accuracy.

Reads each task's ``finetune.json`` in a zoo built by `mergestream finetune` (the accuracies
it measured on the task's test set before and after training, the final training loss, the
time per step) and prints a Markdown table in the suite's task order, with the mean:

    python benchmarks/llm_zoo_table.py ZOO [ZOO_RANK32 ...]

Several zoos of the same suite (rank 8, rank 32) give one column pair per zoo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def zoo_rows(zoo: Path) -> dict[str, dict[str, Any]]:
    """Task name -> its ``finetune.json``, in the order of the zoo's ``zoo.json``."""
    meta = json.loads((zoo / "zoo.json").read_text())
    rows = {}
    for task in meta["tasks"]:
        info = zoo / task / "finetune.json"
        if info.is_file():
            rows[task] = json.loads(info.read_text())
    return rows


def rank_of(info: dict[str, Any]) -> int:
    return int(info["recipe"].get("lora_rank") or 0)


def markdown(zoos: list[dict[str, dict[str, Any]]]) -> str:
    """The table; a task one zoo lacks shows dashes there, and the mean row is over the tasks
    each zoo has."""
    tasks = list(dict.fromkeys(t for rows in zoos for t in rows))
    for task in tasks:
        splits = {json.dumps(rows[task]["split"], sort_keys=True) for rows in zoos if task in rows}
        if len(splits) > 1:
            raise ValueError(f"{task}: the zoos were split differently (not one suite's zoos)")
    header = ["task", "scoring", "base"]
    for rows in zoos:
        rank = rank_of(next(iter(rows.values())))
        header += [f"rank-{rank} adapter", "final loss", "s / step"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "--:|" * (len(header) - 2)]
    base: list[float] = []
    adapters: list[list[float]] = [[] for _ in zoos]
    for task in tasks:
        first = next(rows[task] for rows in zoos if task in rows)
        before = first["pretrained_test_accuracy"]
        base.append(before)
        cells = [task, first["scoring"]["scoring"], f"{100 * before:.1f}"]
        for i, rows in enumerate(zoos):
            info = rows.get(task)
            if info is None:
                cells += ["–", "–", "–"]
                continue
            adapters[i].append(info["finetuned_test_accuracy"])
            cells += [
                f"{100 * info['finetuned_test_accuracy']:.1f}",
                f"{info['final_train_loss']:.3f}",
                f"{info['seconds_per_step']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["mean", "", f"{100 * statistics.fmean(base):.1f}"]
    for accs in adapters:
        mean += [f"{100 * statistics.fmean(accs):.1f}" if accs else "–", "", ""]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("zoos", nargs="+", type=Path, help="zoo folders of one suite")
    args = parser.parse_args(argv)
    zoos = [zoo_rows(z) for z in args.zoos]
    empty = [str(z) for z, rows in zip(args.zoos, zoos, strict=True) if not rows]
    if empty:
        print(f"no fine-tuned task in {', '.join(empty)}", file=sys.stderr)
        return 1
    try:
        print(markdown(zoos), end="")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
