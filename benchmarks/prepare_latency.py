"""Landing-to-published latency of an OPCM step, prepared vs unprepared vs FusionBench's step.

One run on one machine, on the CLIP-ViT-B/32-shaped zoo of `opcm_vs_fusionbench.py`:

1. mergestream unprepared: for each model, `add` then `export` (what `mergestream watch
   --export` does when a checkpoint lands);
2. mergestream prepared: the same, with `prepare` run after each publish, in the idle time before
   the next model lands (not counted in the latency, reported on its own), so that each `add`
   only projects (what `watch --prepare` does);
3. FusionBench's OPCM (0.2.33, float32, its defaults) over the same models, its per-step time.

The two mergestream runs must end in the same state bit for bit (checked: their exported
weights are compared with `torch.equal`). Reported: mean latency over steps 2..N (step 1 has
nothing to project), the ratio to FusionBench's step, and the disk the prepared factors take
beside the state.

    python benchmarks/prepare_latency.py [--models 8] [--write-benchmarks-md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import clip_zoo  # noqa: E402
import opcm_vs_fusionbench as harness  # noqa: E402

SECTION = "## Landing to published: prepared OPCM steps"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def later_steps(side: dict) -> list[dict]:
    return [s for s in side["steps"] if s["step"] >= 2]


def latency(side: dict) -> float:
    return mean([s["seconds"] + s.get("publish_seconds", 0.0) for s in later_steps(side)])


def identical_exports(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def markdown(results: dict) -> str:
    plain, prepared = results["unprepared"], results["prepared"]
    reference = results.get("reference")
    fb_step = (
        mean([s["seconds"] for s in reference["steps"] if s["step"] >= 2]) if reference else None
    )
    prepared_steps = later_steps(prepared)
    prepare_times = [s["prepare_seconds"] for s in prepared["steps"] if "prepare_seconds" in s]
    disk = max(s.get("prepared_bytes", 0) for s in prepared["steps"])
    state = max(s.get("state_bytes", 0) for s in prepared["steps"])

    def ratio(x: float) -> str:
        return f"{x / fb_step:.2f}x" if fb_step else "n/a"

    rows = [
        ("mergestream, unprepared (add + export)", latency(plain)),
        ("mergestream, prepared (add + export)", latency(prepared)),
    ]
    lines = [
        f"`{results['command']}`, {results['date']}, commit {results['revision']}, "
        f"{results['machine'].get('cpu', '?')}, {results['machine'].get('cores', '?')} cores, "
        f"load average at the start {results['load_average']}. {results['models']} "
        f"{results['shape']} models ({results['parameters'] / 1e6:.1f}M parameters), OPCM "
        f"alpha 0.5, means over steps 2..{results['models']}.",
        "",
        "| path | landing to published (s) | vs FusionBench's step |",
        "|---|--:|--:|",
    ]
    for label, seconds in rows:
        lines.append(f"| {label} | {seconds:.2f} | {ratio(seconds)} |")
    if fb_step:
        lines.append(
            f"| FusionBench 0.2.33 OPCM step (float32, no export) | {fb_step:.2f} | 1.00x |"
        )
    lines += [
        "",
        f"Of the prepared latency, `add` took {mean([s['seconds'] for s in prepared_steps]):.2f} s "
        f"and the export {mean([s.get('publish_seconds', 0.0) for s in prepared_steps]):.2f} s. "
        f"`prepare` itself took {mean(prepare_times):.2f} s per step, in the idle time before the "
        f"next model. The prepared factors take {disk / 2**20:.0f} MiB beside the state's "
        f"{state / 2**20:.0f} MiB running sum (V and σ of each projected weight, float64). "
        "Both mergestream runs exported bit-identical weights: "
        f"{'yes' if results['identical'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny tower (smoke tests)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--zoo-root", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergestream-prepare-bench"))
    parser.add_argument(
        "--reference-venv",
        type=Path,
        default=clip_zoo.DEFAULT_ROOT / f"fusion-bench-{harness.REFERENCE_VERSION}-venv",
    )
    parser.add_argument("--pip-args", default="")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--write-benchmarks-md", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = dict(clip_zoo.TINY if args.tiny else clip_zoo.VIT_B32)
    zoo = clip_zoo.build_zoo(
        clip_zoo.ZooSpec(config=config, models=args.models, seed=args.seed),
        args.zoo_root,
        log=harness.log,
    )
    harness.warm_page_cache([zoo.base, *zoo.models])
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {
        "benchmark": "prepare-latency",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/prepare_latency.py", *(argv or sys.argv[1:])]),
        "machine": harness.machine_info(),
        "revision": harness.git_revision(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "models": len(zoo.models),
        "shape": "tiny CLIP-shaped" if args.tiny else "CLIP-ViT-B/32-shaped",
        "parameters": clip_zoo.zoo_info(zoo)["parameters"],
    }
    for name, prepare in (("unprepared", False), ("prepared", True)):
        harness.log(f"mergestream {name}")
        params = {
            "base": str(zoo.base),
            "models": [str(p) for p in zoo.models],
            "state": str(work / f"{name}-state"),
            "export": str(work / f"{name}-merged"),
            "alpha": 0.5,
            "device": "cpu",
            "threads": None,
            "workers": None,
            "decomposition": None,
            "allow_duplicate": False,
            "export_model": False,
            "publish_every_step": True,
            "prepare": prepare,
        }
        results[name] = harness.run_worker("mergestream", params, work, None)
        results[name].pop("projected_names", None)
    results["identical"] = identical_exports(work / "unprepared-merged", work / "prepared-merged")
    if not args.skip_reference:
        results["reference_env"] = harness.ensure_reference_venv(
            args.reference_venv, shlex.split(args.pip_args)
        )
        reference_args = argparse.Namespace(
            alpha=0.5, reference_algorithm="clip", reference_device=None, device="cpu", threads=None
        )
        harness.log("FusionBench: float32 (its default)")
        results["reference"] = harness.run_reference(
            args.reference_venv, zoo, zoo.models, work / "fusionbench", reference_args, "float32"
        )
    text = markdown(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_benchmarks_md:
        harness.update_benchmarks_md(HERE.parent / "BENCHMARKS.md", SECTION, text)
    return 0 if results["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
