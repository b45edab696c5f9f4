"""Tables and plots of a benchmark results file (see `run.py` for its schema)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .protocol import mean_std


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """ACC and BWT (mean ± std over task orders) and mean final per-task accuracy per method."""
    tasks: list[str] = results["meta"]["tasks"]
    header = ["method", "ACC (%)", "BWT (%)", *tasks, "merge s/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference = results["reference"]
    for label in ("pretrained", "individual"):
        per_task = reference[label]
        mean = sum(per_task[t] for t in tasks) / len(tasks)
        cells = [label if label == "pretrained" else "individual fine-tuned", _pct(mean), "–"]
        lines.append("| " + " | ".join(cells + [_pct(per_task[t]) for t in tasks] + ["–"]) + " |")
    for label, entry in results["methods"].items():
        accs = [run["acc"] for run in entry["runs"]]
        bwts = [run["bwt"] for run in entry["runs"] if run.get("bwt") is not None]
        acc = f"{_pm(*mean_std(accs))} (n={len(accs)})"
        bwt = f"{_pm(*mean_std(bwts))} (n={len(bwts)})" if bwts else "–"
        per_task = [
            sum(run["final"][t] for run in entry["runs"]) / len(entry["runs"]) for t in tasks
        ]
        seconds = f"{merge_seconds_per_step(entry):.2f}"
        lines.append("| " + " | ".join([label, acc, bwt, *map(_pct, per_task), seconds]) + " |")
    return "\n".join(lines) + "\n"


def merge_seconds_per_step(entry: Mapping[str, Any]) -> float:
    """Mean time of one merge step (`MergeState.add`) over a method's runs."""
    runs = entry["runs"]
    return sum(run["merge_seconds"] / len(run["order"]) for run in runs) / len(runs)


def evaluation_timing(results: Mapping[str, Any]) -> str:
    """One sentence: the task evaluations and retention scorings the run made or read from
    its score record, and their mean time (the record's times are those of the run that made
    the scores). Empty when nothing was timed."""
    meta = results["meta"]
    parts = []
    for kind, count, seconds, recorded, recorded_seconds in (
        (
            "task evaluations",
            meta.get("evaluations", 0),
            meta.get("evaluation_seconds", 0.0),
            meta.get("recorded_evaluations_timed", 0),
            meta.get("recorded_evaluation_seconds", 0.0),
        ),
        (
            "base-retention scorings",
            meta.get("retentions", 0),
            meta.get("retention_seconds", 0.0),
            meta.get("recorded_retentions_timed", 0),
            meta.get("recorded_retention_seconds", 0.0),
        ),
    ):
        total = count + recorded
        if total:
            mean = (seconds + recorded_seconds) / total
            source = f", {recorded} of them timed by an earlier run" if recorded else ""
            parts.append(f"{total} {kind}{source}: {mean:.1f} s each")
    return "; ".join(parts) + "." if parts else ""


def removed_fractions(results: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per OPCM method: the mean over task orders, at each step, of the fraction of the
    incoming task vector's norm that the projection removed (`last_removed_fraction`)."""
    out = {}
    for label, entry in results["methods"].items():
        per_run = [
            [scalars.get("last_removed_fraction") for scalars in run.get("step_scalars", [])]
            for run in entry["runs"]
        ]
        if not per_run or not per_run[0] or any(f is None for r in per_run for f in r):
            continue
        steps = min(len(r) for r in per_run)
        out[label] = [sum(r[t] for r in per_run) / len(per_run) for t in range(steps)]
    return out


def removed_table(results: Mapping[str, Any]) -> str:
    """Markdown: the fraction of each incoming task vector OPCM's projection removed, by step."""
    fractions = removed_fractions(results)
    if not fractions:
        return ""
    steps = max(len(f) for f in fractions.values())
    header = ["method", *(f"step {t}" for t in range(1, steps + 1))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in fractions.items():
        cells = [f"{100 * v:.1f}" for v in values] + [""] * (steps - len(values))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def alpha_table(results: Mapping[str, Any]) -> str:
    sweep = results.get("alpha_sweep")
    if not sweep:
        return ""
    lines = ["| alpha | ACC (%) |", "|---|---|"]
    for alpha, runs in zip(sweep["alphas"], sweep["accs"], strict=True):
        lines.append(f"| {alpha:g} | {_pm(*mean_std(runs))} (n={len(runs)}) |")
    return "\n".join(lines) + "\n"


def step_points(results: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per method: ``(step, accuracy)`` for every step whose matrix row is whole in every
    order that has a matrix: the mean over those orders of the average accuracy on the tasks
    merged so far (a diagonal-only matrix has whole rows at step 1, at its ``matrix_rows``
    and at the end)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for label, entry in results["methods"].items():
        matrices = [run["matrix"] for run in entry["runs"] if run.get("matrix")]
        if not matrices:
            continue
        steps = len(matrices[0])
        found = []
        for t in range(steps):
            rows = [m[t][: t + 1] for m in matrices]
            if all(a is not None for row in rows for a in row):
                found.append((t + 1, sum(sum(row) / (t + 1) for row in rows) / len(rows)))
        points[label] = found
    return points


def acc_at_table(results: Mapping[str, Any], counts: Sequence[int] = (4, 8, 14)) -> str:
    """Markdown: per method, the mean accuracy on the tasks merged so far after ``counts``
    steps (read from the accuracy matrices), and the number of orders it is read from."""
    points = step_points(results)
    steps = len(results["meta"]["tasks"])
    counts = [c for c in counts if c <= steps]
    if not points or not counts:
        return ""
    lines = ["| method | " + " | ".join(f"ACC after {c} tasks" for c in counts) + " |"]
    lines.append("|" + "---|" * (len(counts) + 1))
    for label, found in points.items():
        at = dict(found)
        cells = [_pct(at[c]) if c in at else "–" for c in counts]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def retention_table(results: Mapping[str, Any]) -> str:
    """Markdown: base retention of every merged model (a causal-LM run): the perplexity of the
    held-out text and the accuracy on the general prompts, mean over the task orders."""
    reference = results["reference"].get("pretrained_retention")
    if reference is None:
        return ""
    lines = [
        "| method | held-out perplexity | general prompts (%) | ACC (%) |",
        "|---|---|---|---|",
    ]
    pretrained = results["reference"]["pretrained"]
    acc0 = sum(pretrained.values()) / len(pretrained)
    lines.append(
        f"| pretrained | {reference['perplexity']:.2f} | "
        f"{_pct(reference['general_accuracy'])} | {_pct(acc0)} |"
    )
    for label, entry in results["methods"].items():
        kept = [run["retention"] for run in entry["runs"] if run.get("retention")]
        if not kept:
            continue
        ppl = mean_std([r["perplexity"] for r in kept])
        general = mean_std([r["general_accuracy"] for r in kept])
        acc = mean_std([run["acc"] for run in entry["runs"]])
        lines.append(f"| {label} | {ppl[0]:.2f} ± {ppl[1]:.2f} | {_pm(*general)} | {_pm(*acc)} |")
    return "\n".join(lines) + "\n"


def step_curves(results: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per method: mean over the orders with a full matrix of the average accuracy over the
    tasks merged so far, after each step."""
    curves = {}
    for label, entry in results["methods"].items():
        # Only whole lower triangles (a diagonal-only run has no per-step curve).
        matrices = [
            run["matrix"]
            for run in entry["runs"]
            if run.get("matrix")
            and all(a is not None for t, row in enumerate(run["matrix"]) for a in row[: t + 1])
        ]
        if not matrices:
            continue
        steps = len(matrices[0])
        curve = []
        for t in range(steps):
            per_order = [sum(m[t][: t + 1]) / (t + 1) for m in matrices]
            curve.append(sum(per_order) / len(per_order))
        curves[label] = curve
    return curves


# What a report without plots says about them (matplotlib comes with the extra).
PLOTS_NEED = "plots need mergestream[bench] (pip install 'mergestream[bench]')"


def plots_available() -> bool:
    """Whether matplotlib can be imported, so that :func:`write_report` can draw plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: accuracy after each step, accuracy matrices, the alpha sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # Every whole row of the matrices: each step for a whole matrix, the chosen rows of a
    # diagonal-only one (whose first and last rows alone make no curve).
    steps = len(results["meta"]["tasks"])
    curves = {k: v for k, v in step_points(results).items() if len(v) > 2 or len(v) == steps > 1}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, found in curves.items():
            ax.plot([t for t, _ in found], [100 * a for _, a in found], marker="o", label=label)
        ax.set_xlabel("models merged")
        ax.set_ylabel("mean accuracy on the tasks merged so far (%)")
        ax.set_title("Accuracy after each merge step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "accuracy_per_step.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    with_matrix = [
        (label, next(run for run in entry["runs"] if run.get("matrix")))
        for label, entry in results["methods"].items()
        if any(run.get("matrix") for run in entry["runs"])
    ]
    if with_matrix:
        cols = min(4, len(with_matrix))
        rows = (len(with_matrix) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (label, run) in zip(axes.flat, with_matrix, strict=False):
            matrix = run["matrix"]
            grid = [[100 * a if a is not None else float("nan") for a in row] for row in matrix]
            ax.axis("on")
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("task (merge order)", fontsize=7)
            ax.set_ylabel("after step", fontsize=7)
            ax.set_xticks(range(len(matrix)))
            ax.set_yticks(range(len(matrix)))
            ax.set_yticklabels(range(1, len(matrix) + 1), fontsize=6)
            ax.set_xticklabels([t[:8] for t in run["order"]], rotation=90, fontsize=6)
        fig.suptitle("Accuracy matrix (first task order), %")
        fig.tight_layout()
        path = out_dir / "accuracy_matrix.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    sweep = results.get("alpha_sweep")
    if sweep:
        means = [100 * mean_std(runs)[0] for runs in sweep["accs"]]
        stds = [100 * mean_std(runs)[1] for runs in sweep["accs"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar(sweep["alphas"], means, yerr=stds, marker="o", capsize=3)
        ax.set_xlabel("alpha")
        ax.set_ylabel("ACC after all steps (%)")
        ax.set_title("OPCM: alpha sweep")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "alpha_sweep.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    results: Mapping[str, Any], out_dir: Path, *, plots: bool | None = None
) -> dict[str, Path]:
    """results.json, results.md and the plots into `out_dir`. Without matplotlib (``plots``
    None: when it cannot be imported; False: never) the plots are left out, not the tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = out_dir / "results.md"
    meta = results["meta"]
    text = [
        f"Benchmark run {meta.get('date', '')} on {meta.get('machine', '')}",
        "",
        markdown_table(results),
    ]
    timing = evaluation_timing(results)
    if timing:
        text += ["Time: " + timing, ""]
    at = acc_at_table(results)
    if at:
        text += [
            "ACC on the tasks merged so far, after that many steps (mean over the orders with "
            "an accuracy matrix):",
            "",
            at,
        ]
    kept = retention_table(results)
    if kept:
        text += [
            "Base retention of the final merged models (mean ± std over task orders):",
            "",
            kept,
        ]
    removed = removed_table(results)
    if removed:
        text += [
            "Share of each incoming task vector's norm removed by OPCM's projection (%, mean "
            "over task orders):",
            "",
            removed,
        ]
    sweep = alpha_table(results)
    if sweep:
        text += ["OPCM alpha sweep:", "", sweep]
    md_path.write_text("\n".join(text))
    if plots is None:
        plots = plots_available()
    drawn = write_plots(results, out_dir) if plots else []
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in drawn}}
