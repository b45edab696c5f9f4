"""Step time of OPCM on a Ray cluster against the local engine, and the cost of one matrix.

    python benchmarks/scale_ray.py scale        # local vs Ray with 1 and 2 workers, same stream
    python benchmarks/scale_ray.py overhead     # Ray's fixed cost per step and per task
    python benchmarks/scale_ray.py matrices     # one exact OPCM projection per LLaMA shape

`scale` writes a LLaMA-shaped float32 stream (base + 2 models; 4 layers, hidden 1024, MLP 2816,
vocab 8192: about 62M parameters) into a work directory (default
`~/.cache/mergestream/bench/scale_ray/`, or under `MERGESTREAM_BENCH_CACHE`) and times step 2
(the first step that projects) in fresh processes, in interleaved rounds:
  local-1    the local engine with one thread (`workers=1`, torch threads 1)
  local      the local engine as `mergestream add` runs it (one worker per core)
  ray-1      a local Ray cluster with 1 CPU: one task at a time, 1 thread each
  ray-2      a local Ray cluster with 2 CPUs: two tasks at a time, 1 thread each
Ray runs start their cluster (`ray.init(num_cpus=N)`) before the clock starts. Every run's
merged weights are compared with local-1's: the Ray runs must give the same bits (their drivers
use one thread, as local-1 does). `local` may differ in the last bits of its row-streamed
tensors (the output head), whose float64 reductions it runs on every core.

`overhead` times steps of a tiny model (every tensor a few KiB) locally and on Ray, so the
difference is Ray's cost: per step, and per task (the step's tasks run one at a time on 1 CPU).

`matrices` times `project_in_place` (OPCM's exact projection: the Gram matrix's eigenvectors and
three products) on random float64 matrices of the given shapes with the given threads, and fits
t = a·m·n² + b·n³ (n the smaller side) to extrapolate to shapes too large to run here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"layers": 4, "hidden": 1024, "intermediate": 2816, "kv": 256, "vocab": 8192}
TINY = {"layers": 2, "hidden": 32, "intermediate": 64, "kv": 16, "vocab": 128}


def write_models(work: Path, shapes: dict[str, int], models: int = 2) -> tuple[Path, list[Path]]:
    import torch

    from mergestream.synthetic import llama_shapes, write_stream

    marker = work / "done.json"
    if marker.exists() and json.loads(marker.read_text()) == {**shapes, "models": models}:
        return work / "base", [work / f"model-{i + 1:02d}" for i in range(models)]
    return_value = write_stream(work, models, shapes=llama_shapes(**shapes), dtype=torch.float32)
    marker.write_text(json.dumps({**shapes, "models": models}))
    return return_value


def run_mode(mode: str, work: Path, state_dir: Path, steps: int) -> dict:
    """One measured run in this (fresh) process; returns step times and a digest."""
    import hashlib

    import torch

    from mergestream import MergeState

    base, paths = work / "base", sorted(work.glob("model-*"))
    backend = None
    workers = None
    if mode in ("local-1", "ray-1", "ray-2"):
        torch.set_num_threads(1)
        workers = 1
    if mode.startswith("ray"):
        import ray

        from mergestream.step.ray_backend import RayBackend

        ray.init(num_cpus=int(mode[-1]), include_dashboard=False, log_to_driver=False)
        ray.get(ray.remote(lambda: None).remote())  # workers up before the clock starts
        backend = RayBackend(cpus_per_task=1)
    state = MergeState.create(state_dir, base, "opcm")
    seconds = []
    for path in paths[:steps]:
        started = time.perf_counter()
        state.add(path, backend=backend, workers=workers)
        seconds.append(time.perf_counter() - started)
    digest = hashlib.sha256()
    for name, tensor in state.task_vectors():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return {"mode": mode, "seconds": seconds, "sha256": digest.hexdigest()}


def in_subprocess(mode: str, work: Path, steps: int) -> dict:
    state_dir = work / f"state-{mode}"
    subprocess.run(["rm", "-rf", str(state_dir)], check=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, __file__, "_run", mode, str(work), str(state_dir), str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    subprocess.run(["rm", "-rf", str(state_dir)], check=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}"


def cmd_scale(args: argparse.Namespace) -> None:
    work = Path(args.work)
    write_models(work, SHAPES)
    modes = ("local-1", "local", "ray-1", "ray-2")
    # Rounds interleave the modes, so a change of the machine's load hits every mode alike;
    # the fastest round of each is its least disturbed run.
    rounds = [{m: in_subprocess(m, work, 2) for m in modes} for _ in range(args.rounds)]
    print(f"# {time.strftime('%Y-%m-%d')} {machine()}; OPCM step 2, shapes {SHAPES}")
    reference = rounds[0]["local-1"]["sha256"]
    best = {m: min(r[m]["seconds"][1] for r in rounds) for m in modes}
    for mode in modes:
        times = sorted(r[mode]["seconds"][1] for r in rounds)
        same = all(r[mode]["sha256"] == reference for r in rounds)
        print(
            f"{mode:8s} step 2: best {best[mode]:6.2f} s, median {times[len(times) // 2]:6.2f} s "
            f"of {len(times)}; x{best['local-1'] / best[mode]:.2f} vs local-1 (best); "
            f"{'same bits as' if same else 'other bits than'} local-1"
        )


def cmd_overhead(args: argparse.Namespace) -> None:
    work = Path(args.work) / "tiny"
    write_models(work, TINY, models=4)
    local = in_subprocess("local-1", work, 4)
    remote = in_subprocess("ray-1", work, 4)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    tasks = subprocess.run(
        [sys.executable, __file__, "_tasks", str(work)], env=env, capture_output=True, text=True
    ).stdout.strip()
    per_step = [r - loc for r, loc in zip(remote["seconds"][1:], local["seconds"][1:], strict=True)]
    mean = sum(per_step) / len(per_step)
    print(f"# {time.strftime('%Y-%m-%d')} {machine()}; tiny model {TINY}, {tasks} tasks per step")
    print(f"local-1 steps 2-4: {[round(s, 3) for s in local['seconds'][1:]]} s")
    print(f"ray-1   steps 2-4: {[round(s, 3) for s in remote['seconds'][1:]]} s")
    print(f"Ray's cost: {mean:.3f} s per step, {mean / int(tasks) * 1000:.1f} ms per task")


def cmd_matrices(args: argparse.Namespace) -> None:
    import torch

    from mergestream.methods.opcm import project_in_place

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        s = torch.randn(m, n, generator=g, dtype=torch.float64)
        tau = torch.randn(m, n, generator=g, dtype=torch.float64)
        started = time.perf_counter()
        project_in_place(s, tau, 0.5)
        seconds = time.perf_counter() - started
        big, small = max(m, n), min(m, n)
        rows.append((m, n, big, small, seconds))
        print(f"{m}x{n}: {seconds:.2f} s ({args.threads} threads)", flush=True)
        del s, tau
    if len(rows) >= 2:
        import numpy as np

        design = np.array([[b * s * s, s**3] for _, _, b, s, _ in rows], dtype=float)
        times = np.array([t for *_, t in rows])
        (a, c), *_ = np.linalg.lstsq(design, times, rcond=None)
        print(f"fit: t = {a:.3e}·m·n² + {c:.3e}·n³ s")
        for m, n in ((4096, 4096), (4096, 11008), (8192, 8192), (8192, 28672)):
            big, small = max(m, n), min(m, n)
            print(f"  {m}x{n}: {a * big * small * small + c * small**3:.1f} s (from the fit)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        _, _, mode, work, state_dir, steps = sys.argv
        print(json.dumps(run_mode(mode, Path(work), Path(state_dir), int(steps))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_tasks":
        from mergestream import MergeState
        from mergestream.step.tasks import plan_tasks

        work = Path(sys.argv[2])
        state = MergeState.create(work / "plan-state", work / "base", "opcm")
        print(len(plan_tasks(state.infos, state.method, 1)))
        subprocess.run(["rm", "-rf", str(work / "plan-state")], check=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = os.environ.get("MERGESTREAM_BENCH_CACHE", str(Path.home() / ".cache/mergestream/bench"))
    parser.add_argument("--work", default=str(Path(cache) / "scale_ray"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scale")
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=cmd_scale)
    sub.add_parser("overhead").set_defaults(func=cmd_overhead)
    p = sub.add_parser("matrices")
    p.add_argument("--shapes", default="2048x2048,2048x5504,4096x4096,4096x11008")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_matrices)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
