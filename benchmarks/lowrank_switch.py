"""Where factors stop paying: one OPCM step on one matrix, on factors (methods/lowrank.py)
against the dense kernel (methods/opcm.py), for LLaMA-7B shapes and running sums of rank k up
to min(m, n), side by side in one run.

Per shape, the dense step is timed once: `OPCM.update` of a projected weight at step 2 (SᵀS,
Sᵀτ, the Gram eigh, the thin SVD its condition check falls back to when S is rank deficient,
S·Z, the new sum and the norms) with τ = s·B·A formed as the adapter reader forms it. Its cost
does not depend on k while k < min(m, n): S is then rank deficient and always takes that path
(the running sum of an adapter stream is). The factored step (`lowrank.opcm_step`) is timed at
every k of the sweep, on a running sum of rank k held as U, σ, V (the form every step leaves)
and the same incoming adapter of rank r. Reported: wall seconds (best of --repeats for k <= 512,
one run above) and the CPU seconds of the process (less sensitive to other jobs on a shared
machine), the ratios dense/factored, and the state's bytes (U, σ, V against the m×n float64
sum). The crossing points choose `lowrank.DENSE_RANK_FRACTION`.

    python benchmarks/lowrank_switch.py                          # the three shapes, k up to min
    python benchmarks/lowrank_switch.py --shapes 4096x4096 --ranks 16,256,1024

Random data, seeded; nothing is read or written but benchmarks/results/lowrank_switch.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from mergestream.methods import OPCM
from mergestream.methods import lowrank as lr
from mergestream.methods.base import TensorInfo

F64 = torch.float64
REPO = Path(__file__).resolve().parent.parent
LLAMA_7B = ["4096x4096", "11008x4096", "4096x11008"]  # q/k/v/o, gate/up, down
SWEEP = [16, 512, 1024, 2048, 4096]


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "-uno") else "")


def timed(step, repeats: int) -> tuple[float, float]:  # noqa: ANN001 - no-argument callable
    """Wall and CPU seconds (all threads of this process) of the fastest of `repeats` runs. On
    a shared machine the wall time grows with the other jobs' load; the CPU time much less."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def dense_step(m: int, n: int, rank: int, b: torch.Tensor, a: torch.Tensor, scale: float):
    """The dense OPCM step on an m×n running sum of rank `rank`, as a callable."""
    g = torch.Generator().manual_seed(1)
    running_sum = torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(
        rank, n, generator=g, dtype=F64
    )
    method = OPCM()
    info = TensorInfo("w", (m, n), torch.bfloat16, projected=True)

    def step() -> None:
        tau = (b @ a).mul_(scale)  # as io/lora.py forms the adapter's task vector
        method.update(info, 2, {"sum": running_sum.clone()}, tau, {})

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(LLAMA_7B), help="MxN,MxN,...")
    parser.add_argument("--ranks", default=",".join(map(str, SWEEP)), help="k of the sweep")
    parser.add_argument("--adapter-rank", type=int, default=16, help="r of the incoming adapter")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine, OpenMP threads stall at every barrier of "
        "LAPACK's small steps while another job holds a core, up to 100x slower)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lowrank_switch.json")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    sweep = [int(k) for k in args.ranks.split(",")]
    r = args.adapter_rank
    torch.set_num_threads(args.threads)

    header = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit(),
        "load_average_start": os.getloadavg(),
        "adapter_rank": r,
    }
    print(json.dumps(header, indent=1), flush=True)

    # Orthonormal bases once per dimension (the first k columns serve every k of the sweep).
    g = torch.Generator().manual_seed(0)
    top = max(sweep)
    bases = {
        d: torch.linalg.qr(torch.randn(d, min(d, top), generator=g, dtype=F64)).Q
        for d in sorted({d for shape in shapes for d in shape})
    }
    # Warm the BLAS/LAPACK threads and solvers of both paths before the first timing.
    m0, n0 = shapes[0]
    warm_b, warm_a = torch.ones(m0, 2, dtype=F64), torch.ones(2, n0, dtype=F64)
    warm = lr.ThinSVD(bases[m0][:, :8], torch.ones(8, dtype=F64), bases[n0][:, :8])
    lr.opcm_step(2, warm, lr.Factors.from_lora(warm_b, warm_a), 0.5)
    dense_step(256, 384, 16, warm_b[:256], warm_a[:, :384], 1.0)()

    rows = []
    for m, n in shapes:
        b = torch.randn(m, r, generator=g, dtype=F64) * 0.01
        a = torch.randn(r, n, generator=g, dtype=F64) / n**0.5
        scale = 2.0  # lora_alpha 2r
        dense_seconds, dense_cpu = timed(dense_step(m, n, 256, b, a, scale), 1)
        print(f"{m}x{n}: dense step {dense_seconds:.2f} s (CPU {dense_cpu:.2f} s)", flush=True)
        task = lr.Factors.from_lora(b, a, scale)
        for k in [k for k in sweep if k <= min(m, n)]:
            sigma = torch.linspace(1.0, 0.1, k, dtype=F64)
            running = lr.ThinSVD(bases[m][:, :k], sigma, bases[n][:, :k])
            seconds, cpu = timed(
                lambda running=running, task=task: lr.opcm_step(2, running, task, 0.5),
                args.repeats if k <= 512 else 1,
            )
            cost = lr.opcm_step_cost(m, n, k, r)
            row = {
                "shape": [m, n],
                "k": k,
                "k_fraction": k / min(m, n),
                "factored_s": seconds,
                "dense_s": dense_seconds,
                "dense_over_factored": dense_seconds / seconds,
                "factored_cpu_s": cpu,
                "dense_cpu_s": dense_cpu,
                "dense_over_factored_cpu": dense_cpu / cpu,
                "factored_bytes": cost.factored_bytes,
                "dense_bytes": cost.dense_bytes,
                "model_flops_ratio": cost.dense_flops / cost.factored_flops,
            }
            rows.append(row)
            print(
                f"  k={k:5d} ({k / min(m, n):.2f} min): factored {seconds:8.3f} s, "
                f"dense/factored {row['dense_over_factored']:8.1f}x "
                f"(CPU {cpu:8.3f} s, {row['dense_over_factored_cpu']:.1f}x), "
                f"bytes {cost.factored_bytes / cost.dense_bytes:.3f} of dense, "
                f"cost model {row['model_flops_ratio']:.1f}x",
                flush=True,
            )
    header["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**header, "rows": rows}, indent=1))

    print(
        "\n| shape | k | k / min(m,n) | factored (s) | dense (s) | dense / factored | "
        "CPU s, factored | CPU s, dense | CPU ratio | state bytes, factored / dense |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        m, n = row["shape"]
        print(
            f"| {m}×{n} | {row['k']} | {row['k_fraction']:.2f} | {row['factored_s']:.3f} | "
            f"{row['dense_s']:.1f} | {row['dense_over_factored']:.1f}x | "
            f"{row['factored_cpu_s']:.3f} | {row['dense_cpu_s']:.1f} | "
            f"{row['dense_over_factored_cpu']:.1f}x | "
            f"{row['factored_bytes'] / row['dense_bytes']:.3f} |"
        )
    print(f"\nload average at the end: {header['load_average_end']}; results in {args.out}")


if __name__ == "__main__":
    main()
