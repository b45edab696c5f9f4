"""Peak memory of `mergestream add` and `export` on LLaMA-shaped bf16 checkpoints.

Synthetic checkpoints with the tensor names and shapes of a LLaMA model (TinyLlama-1.1B's by
default: 22 layers, hidden 2048, MLP 5632, grouped KV 256, vocab 32000; about 1.1B parameters,
2.2 GB in bf16) are generated on the fly, one at a time, into a work directory (default
`cache/memory_llama/`, not committed), and merged one by one. Every `init`, `add` and `export`
runs as a fresh `python -m mergestream` process that reports its own peak resident set size
(`VmHWM`, the high-water mark of its address space, read from /proc when it exits), so the
number covers everything the process ever held, mapped file pages included. (`wait4`'s
`ru_maxrss` is not used: Linux carries the parent's high-water mark into a child across fork and
exec, so it would report the larger of the two.) Checkpoints are generated in separate processes.

    python benchmarks/memory_llama.py                      # 1.1B, 3 models, exports after 1 and 3
    python benchmarks/memory_llama.py --preset tinyllama-1l --models 20 --export-after 2,20

With two or more later steps it also reports the least-squares slope of the step time and of the
peak over steps 2..N (flat memory: a slope near 0 MiB per step).

Disk: the base and one fine-tuned checkpoint (2.2 GB each in bf16 for 1.1B) plus two generations
of OPCM's float64 state while a step runs (8.8 GB each), and the export (2.2 GB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from mergestream.synthetic import llama_shapes

REPO = Path(__file__).resolve().parent.parent

# Runs the command line in the measured process and reports that process's own peak RSS.
MEASURED = """
import runpy, sys
{prelude}
sys.argv = ["mergestream", *sys.argv[1:]]
try:
    runpy.run_module("mergestream", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"VMHWM_KB {{hwm}}", file=sys.stderr)
"""

# `--method io-floor`: the lightest possible method (a float32 running sum of task vectors, no
# temporaries of its own), registered in the measured process. What an add costs with it is the
# floor set by the streaming machinery: reading, the float64 task vector, writing the new state.
IO_FLOOR_METHOD = """
from dataclasses import dataclass
import torch
from mergestream.methods.base import ContinualMethod, TensorUpdate
from mergestream.methods.config import MethodConfig
from mergestream.methods.registry import register_method

@dataclass(frozen=True)
class RunningSumConfig(MethodConfig):
    pass

@register_method
class RunningSum(ContinualMethod):
    name = "bench-running-sum"
    summary = "benchmark only: float32 sum of task vectors"
    config_class = RunningSumConfig
    state_names = ("sum",)

    def update(self, info, step, state, task_vector, scalars):
        new = task_vector.to(torch.float32)
        if step > 1:
            new += state["sum"]
        return TensorUpdate(state={"sum": new})

    def finish_step(self, step, scalars, partials):
        return {}

    def task_vector(self, info, state, scalars):
        return state["sum"].to(torch.float64)
"""

PRESETS = {
    # TinyLlama-1.1B: the shapes of a real ~1B LLaMA.
    "tinyllama-1.1b": dict(layers=22, hidden=2048, intermediate=5632, kv=256, vocab=32000),
    # The same widths and vocabulary with 4 layers: identical largest tensors, so the same
    # per-tensor working set, at a fifth of the time per step (for long streams).
    "tinyllama-4l": dict(layers=4, hidden=2048, intermediate=5632, kv=256, vocab=32000),
    # One layer: still the same largest tensors; for 20-model runs of the flat-memory check.
    "tinyllama-1l": dict(layers=1, hidden=2048, intermediate=5632, kv=256, vocab=32000),
    # Seconds, for checking the script itself.
    "toy": dict(layers=2, hidden=64, intermediate=160, kv=32, vocab=500),
}


def llama_config(layers: int, hidden: int, intermediate: int, kv: int, vocab: int) -> dict:
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv // 64 if kv >= 64 else 1,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(directory: Path, shapes: dict, make, config: dict, shard: str) -> None:
    """Write an HF-style sharded bf16 checkpoint, one tensor in memory at a time."""
    import torch

    from mergestream.io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
    from mergestream.publish.export import plan_shards, shard_file_names

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [(n, TensorSpec(torch.bfloat16, s)) for n, s in shapes.items()]
    shards = plan_shards(specs, int(float(shard.removesuffix("GB")) * 1e9))
    names = shard_file_names(len(shards))
    for file_name, members in zip(names, shards, strict=True):
        with StreamingSafetensorsWriter(
            tmp / file_name, [(n, TensorSpec(torch.bfloat16, shapes[n])) for n in members]
        ) as writer:
            for name in members:
                writer.write(name, make(name, shapes[name]).to(torch.bfloat16))
    if len(names) > 1:
        weight_map = {n: f for f, members in zip(names, shards, strict=True) for n in members}
        index = {"metadata": {"total_size": sum(s.nbytes for _, s in specs)}}
        index["weight_map"] = weight_map
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def make_base(seed: int):
    import torch

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * 0.02

    return make


def make_finetuned(base_dir: Path, seed: int):
    """Base + a low-rank-plus-noise task vector, reading the base tensor by tensor."""
    import torch

    from mergestream.io.safetensors_stream import SafetensorsFile

    files = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        handle = SafetensorsFile(path)
        for name in handle.names():
            files[name] = handle

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        base = files[name].read(name).to(torch.float32)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(shape) == 2:
            rank = 8
            a = torch.randn(shape[0], rank, generator=g)
            b = torch.randn(rank, shape[1], generator=g)
            delta = (a @ b) / math.sqrt(rank) * 2e-3
            delta += torch.randn(shape, generator=g) * 2e-4
        else:
            delta = torch.randn(shape, generator=g) * 1e-3
        return base.add_(delta)

    return make


def run_measured(args: list[str], env: dict[str, str], prelude: str = "") -> dict:
    """Run `mergestream ARGS` in a fresh process; its wall time, output and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED.format(prelude=prelude), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"mergestream {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    hwm = [line for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB ")]
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(int(hwm[-1].split()[1]) / 1024, 1),
        "output": proc.stdout.strip(),
    }


def generate(kind: str, directory: Path, preset: str, seed: int, shard: str) -> None:
    """Write the base or a fine-tuned checkpoint, in a process of its own."""
    subprocess.run(
        [sys.executable, __file__, "--generate", kind, str(directory), preset, str(seed), shard],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        check=True,
    )


def _generate_main(kind: str, directory: str, preset: str, seed: str, shard: str) -> None:
    dims = PRESETS[preset]
    directory_path = Path(directory)
    make = (
        make_base(int(seed))
        if kind == "base"
        else make_finetuned(directory_path.parent / "base", int(seed))
    )
    write_checkpoint(directory_path, llama_shapes(**dims), make, llama_config(**dims), shard)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    versions = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, safetensors; print(torch.__version__, safetensors.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": versions[0],
        "safetensors": versions[1],
        "commit": commit,
    }


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through (xs, ys)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        _generate_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument(
        "--method",
        choices=["opcm", "io-floor"],
        default="opcm",
        help="io-floor: a float32 running sum, to measure the streaming machinery alone",
    )
    parser.add_argument("--models", type=int, default=3, help="checkpoints to merge")
    parser.add_argument(
        "--export-after", default="1,3", help="comma-separated steps after which to export"
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "cache" / "memory_llama")
    parser.add_argument("--shard-size", default="1GB", help="shard size of generated inputs")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    dims = PRESETS[args.preset]
    shapes = llama_shapes(**dims)
    params = sum(math.prod(s) for s in shapes.values())
    work = args.workdir / args.preset
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    exports = {int(s) for s in args.export_after.split(",") if s.strip()}
    info = machine()
    print(f"{args.preset}: {params / 1e9:.2f}B parameters, {2 * params / 1e9:.2f} GB in bf16")
    print(json.dumps(info))

    base_dir = work / "base"
    if not (base_dir / "config.json").is_file():
        t = time.perf_counter()
        generate("base", base_dir, args.preset, 0, args.shard_size)
        print(f"generated the base in {time.perf_counter() - t:.0f}s")
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    results = {"preset": args.preset, "parameters": params, "machine": info, "runs": []}

    def record(kind: str, step: int, argv: list[str]) -> None:
        r = run_measured(argv, env, prelude)
        r.update(kind=kind, step=step)
        results["runs"].append(r)
        print(f"{kind:7s} step {step:3d}: peak RSS {r['peak_rss_mib']:8.1f} MiB in {r['seconds']}s")

    prelude = IO_FLOOR_METHOD if args.method == "io-floor" else ""
    method = ["--method", "bench-running-sum"] if args.method == "io-floor" else []
    results["method"] = args.method
    record("init", 0, ["init", str(state), "--base", str(base_dir), "--quiet", *method])
    ckpt = work / "finetuned"
    for step in range(1, args.models + 1):
        t = time.perf_counter()
        generate("finetuned", ckpt, args.preset, step, args.shard_size)
        print(f"generated checkpoint {step} in {time.perf_counter() - t:.0f}s")
        plan = run_measured(["plan", str(state), str(ckpt), "--json"], env, prelude)
        estimate = json.loads(plan["output"])[0]["peak_memory_bytes"] / 2**20
        results["runs"].append({"kind": "plan", "step": step, "estimate_mib": round(estimate)})
        record("add", step, ["add", str(state), str(ckpt), "--quiet"])
        print(f"        (plan estimated {estimate:.0f} MiB)")
        if step in exports:
            out = work / "export"
            shutil.rmtree(out, ignore_errors=True)
            record("export", step, ["export", str(state), str(out), "--quiet"])
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    later = [r for r in results["runs"] if r.get("kind") == "add" and r["step"] >= 2]
    if len(later) >= 2:
        steps = [r["step"] for r in later]
        results["slopes_over_later_adds"] = {
            "seconds_per_step": least_squares_slope(steps, [r["seconds"] for r in later]),
            "peak_rss_mib_per_step": least_squares_slope(steps, [r["peak_rss_mib"] for r in later]),
        }
        print("slopes over adds 2..N:", json.dumps(results["slopes_over_later_adds"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
