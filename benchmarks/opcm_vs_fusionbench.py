"""OPCM speed, memory and agreement: mergestream against the reference (FusionBench).

One run on one machine, on a CLIP-ViT-B/32-shaped zoo (`clip_zoo.py`: a pretrained vision tower
and N fine-tuned variants with synthetic task vectors):

1. mergestream's OPCM at its defaults (`MergeState.create/add/export`, float64 state), in a fresh
   subprocess: wall time and peak RSS of every step, of the set-up and of the export;
2. the floor of one step, in a subprocess: reading the inputs (base, incoming model, a state of
   mergestream's state dtype) and writing the state, plus a bare thin float64 SVD
   (`torch.linalg.svd(full_matrices=False)`) of every projected linear weight;
3. FusionBench's OPCM at its defaults (float32), in its own virtual environment
   (`pip install fusion-bench==0.2.33`, created once and cached), run by `_fusionbench_runner.py`
   with the same order and alpha;
4. FusionBench's OPCM again in float64, and the agreement of its merged task vectors
   (merged − base) with mergestream's, tensor by tensor (`class_embedding` excluded: the
   reference never merges it); every tensor must agree within `--tolerance` (1e-5) relative.

A JSON results file is written and a markdown table printed; `--write-benchmarks-md` updates the
"## OPCM speed vs FusionBench" section of BENCHMARKS.md. `--steps 50` is the scale mode instead:
mergestream alone for 50 consecutive steps (cycling through the zoo's models), with the
least-squares slopes of per-step time and peak RSS against the step.

    python benchmarks/opcm_vs_fusionbench.py                       # 8 models, full comparison
    python benchmarks/opcm_vs_fusionbench.py --steps 50            # scale mode, mergestream only

The peak RSS of one step comes from /proc/self/status (VmHWM, reset at each step through
/proc/self/clear_refs); the peak of a whole process is the larger of its `wait4` ru_maxrss and
the highest VmHWM it saw (a VmHWM reset also resets ru_maxrss). The zoo's files
are read once before anything is timed, so every side reads from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import clip_zoo  # noqa: E402

REFERENCE_PACKAGE = "fusion-bench"
REFERENCE_VERSION = "0.2.33"
REFERENCE_CONSTRAINTS = ["torch==2.13.0", "transformers<5", "datasets<5", "huggingface-hub<1"]
RUNNER = HERE / "_fusionbench_runner.py"
SECTION = "## OPCM speed vs FusionBench"
SCALE_SECTION = "## OPCM speed over many steps"
EXCLUDED = (clip_zoo.CLASS_EMBEDDING,)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measurement


def peak_rss_mib() -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", text)
    return int(match.group(1)) / 1024 if match else None


_HIGHEST = [0.0]  # the process's peak RSS over every interval closed so far


def reset_peak_rss() -> None:
    """Start a new peak-RSS interval. Resetting VmHWM also resets what the kernel reports as the
    process's ru_maxrss, so the highest value seen is kept here (see `process_peak_rss_mib`)."""
    _HIGHEST[0] = max(_HIGHEST[0], peak_rss_mib() or 0.0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def process_peak_rss_mib() -> float:
    return max(_HIGHEST[0], peak_rss_mib() or 0.0)


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` to completion; its wall time and its own peak RSS (wait4's ru_maxrss)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{shlex.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return {
        "process_seconds": wall,
        "process_peak_rss_mib": usage.ru_maxrss / 1024,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "log": str(log_path),
    }


def worker_env(threads: int | None) -> dict:
    """Environment of mergestream's subprocesses: this checkout's src/ first on the path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if (REPO / "src" / "mergestream").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p
        )
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(name: str, params: dict, workdir: Path, threads: int | None) -> dict:
    """Run one of this file's workers in a fresh interpreter; its result plus process stats."""
    params_path = workdir / f"{name}.params.json"
    result_path = workdir / f"{name}.result.json"
    params_path.write_text(json.dumps(params, indent=2))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(params_path)]
    stats = run_measured(cmd, workdir / f"{name}.log", worker_env(threads))
    return _with_process_peak({**json.loads(result_path.read_text()), **stats})


def _with_process_peak(result: dict) -> dict:
    """The process's peak RSS: wait4's ru_maxrss only covers the time since the worker last
    reset VmHWM, so take the larger of it and the worker's own running maximum."""
    result["process_peak_rss_mib"] = max(
        result["process_peak_rss_mib"], result.get("peak_rss_mib") or 0.0
    )
    return result


# ------------------------------------------------------------------------------- workers


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def worker_mergestream(p: dict) -> dict:
    """mergestream's OPCM at its defaults: create, one `add` per model, export."""
    import torch

    import mergestream
    from mergestream import MergeState

    _set_threads(p.get("threads"))
    state_dir, export_dir = Path(p["state"]), Path(p["export"])
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(export_dir, ignore_errors=True)
    reset_peak_rss()
    t0 = time.perf_counter()
    params = {"alpha": p["alpha"]}
    if p.get("decomposition"):
        params["decomposition"] = p["decomposition"]
    state = MergeState.create(state_dir, p["base"], method="opcm", **params)
    setup = {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
    steps = []
    for i, model in enumerate(p["models"], start=1):
        reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = state.add(
            model,
            allow_duplicate=p["allow_duplicate"],
            device=p["device"],
            workers=p.get("workers"),
        )
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        steps.append(
            {
                "step": i,
                "model": Path(model).name,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "engine_seconds": stats.seconds,  # the tensor pass alone (no hashing, commit)
                "peak_rss_mib": peak_rss_mib(),
            }
        )
        print(f"step {i}: {seconds:.2f}s, peak RSS {steps[-1]['peak_rss_mib']:.0f} MiB", flush=True)
        if p.get("publish_every_step"):  # landing-to-published: the export after each step
            t0 = time.perf_counter()
            state.export(Path(p["export"]), overwrite=True)
            steps[-1]["publish_seconds"] = time.perf_counter() - t0
        if p.get("prepare") and i < len(p["models"]):  # idle time before the next lands
            t0 = time.perf_counter()
            state.prepare(device=p["device"], workers=p.get("workers"))
            steps[-1]["prepare_seconds"] = time.perf_counter() - t0
            steps[-1]["prepared_bytes"] = sum(
                f.stat().st_size for f in state_dir.glob("gen-*/prepared-*.safetensors")
            )
            steps[-1]["state_bytes"] = sum(
                f.stat().st_size for f in state_dir.glob("gen-*/sum.safetensors")
            )
    export = None
    if p.get("export_model", True):
        reset_peak_rss()
        t0 = time.perf_counter()
        state.export(export_dir)
        export = {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
    status = state.status()
    projected = [n for n, role in state.classification().items() if role == "projected"]
    return {
        "implementation": "mergestream",
        "mergestream_version": mergestream.__version__,
        "mergestream_file": mergestream.__file__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": p["device"],
        "workers": p.get("workers"),
        "decomposition": state.method.config.decomposition,
        "method": status["method"],
        "state_dtype": str(state.method.state_dtype).replace("torch.", ""),
        "tensors": status["tensors"],
        "projected_names": projected,
        "scalars": status["scalars"],
        "setup": setup,
        "steps": steps,
        "export": export,
        "peak_rss_mib": process_peak_rss_mib(),
    }


def _read_into(path: Path, buffer: memoryview) -> int:
    """Read a whole file into `buffer` (reused between files); the bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer[: min(len(buffer), 1 << 26)])
            if not n:
                return total
            total += n


def worker_floor(p: dict) -> dict:
    """What one step cannot go below: reading base + incoming + state and writing the state
    (bytes only, fsync included), and a bare thin float64 SVD of every projected weight (of the
    incoming task vector, which has the shape and kind of spectrum of the running sum), on
    mergestream's device."""
    import torch
    from safetensors.torch import load_file, save_file

    _set_threads(p.get("threads"))
    work = Path(p["work"])
    work.mkdir(parents=True, exist_ok=True)
    base_file = Path(p["base"]) / "model.safetensors"
    incoming_file = Path(p["incoming"]) / "model.safetensors"
    state_file, new_state_file = work / "state.safetensors", work / "new-state.safetensors"
    dtype = getattr(torch, p["state_dtype"])
    base = load_file(str(base_file))
    incoming = load_file(str(incoming_file))
    tau = {k: incoming[k].double() - base[k].double() for k in base if base[k].is_floating_point()}
    save_file({k: v.to(dtype) for k, v in tau.items()}, str(state_file))
    del base, incoming
    state_bytes = state_file.stat().st_size
    buffer = memoryview(bytearray(state_bytes))
    results = []
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        read = sum(_read_into(f, buffer) for f in (base_file, incoming_file, state_file))
        t1 = time.perf_counter()
        with open(new_state_file, "wb", buffering=0) as f:
            written = f.write(buffer[:state_bytes])
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        new_state_file.unlink()
        svd_seconds = 0.0
        device = torch.device(p.get("device", "cpu"))
        for name in p["projected"]:
            matrix = tau[name].to(device)  # the copy to the device is not timed
            t = time.perf_counter()
            torch.linalg.svd(matrix, full_matrices=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            svd_seconds += time.perf_counter() - t
        results.append(
            {
                "read_seconds": t1 - t0,
                "write_seconds": t2 - t1,
                "svd_seconds": svd_seconds,
                "bytes_read": read,
                "bytes_written": written,
            }
        )
    best = {k: min(r[k] for r in results) for k in ("read_seconds", "write_seconds", "svd_seconds")}
    best["io_seconds"] = best["read_seconds"] + best["write_seconds"]
    best["seconds"] = best["io_seconds"] + best["svd_seconds"]
    return {
        **best,
        "repeats": results,
        "state_dtype": p["state_dtype"],
        "projected": len(p["projected"]),
        "threads": torch.get_num_threads(),
        "state_bytes": state_bytes,
    }


def worker_compare(p: dict) -> dict:
    """Per-tensor relative difference of task vectors (merged − base), float64: mergestream's
    state against each reference merged model."""
    from safetensors import safe_open

    from mergestream import MergeState

    state = MergeState.open(p["state"])
    ours = dict(state.task_vectors())
    out = {}
    with safe_open(str(Path(p["base"]) / "model.safetensors"), "pt") as base_file:
        for label, path in p["references"].items():
            per_tensor, num, den = {}, 0.0, 0.0
            with safe_open(path, "pt") as ref_file:
                for name, tv in ours.items():
                    if name in p["exclude"]:
                        continue
                    ref = ref_file.get_tensor(name).double() - base_file.get_tensor(name).double()
                    diff = float((tv - ref).norm())
                    norm = float(ref.norm())
                    per_tensor[name] = diff / norm if norm > 0 else diff
                    num += diff**2
                    den += norm**2
            worst = max(per_tensor, key=per_tensor.get)
            out[label] = {
                "max_relative": per_tensor[worst],
                "worst_tensor": worst,
                "global_relative": math.sqrt(num / den) if den else math.sqrt(num),
                "tensors": len(per_tensor),
                "per_tensor": per_tensor,
            }
    return out


WORKERS = {"mergestream": worker_mergestream, "floor": worker_floor, "compare": worker_compare}


def worker_main(name: str, params_path: str) -> int:
    params = json.loads(Path(params_path).read_text())
    result = WORKERS[name](params)
    result_path = Path(params_path).with_name(f"{name}.result.json")
    result_path.write_text(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------ reference environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_reference_venv(venv: Path, pip_args: list[str]) -> dict:
    """Create (once) a virtual environment with fusion-bench==REFERENCE_VERSION; reuse it while
    its marker records the same version and constraints."""
    marker = venv / "mergestream-bench.json"
    wanted = {
        "package": f"{REFERENCE_PACKAGE}=={REFERENCE_VERSION}",
        "constraints": REFERENCE_CONSTRAINTS,
    }
    if marker.exists() and venv_python(venv).exists():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in wanted} == wanted:
            return recorded
    log(f"reference: creating {venv} with {wanted['package']} (a few minutes, once)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(REFERENCE_CONSTRAINTS) + "\n")
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, *pip_args, REFERENCE_CONSTRAINTS[0], wanted["package"]], check=True)
    probe = (
        "import json, importlib.metadata as m, fusion_bench.method.opcm.opcm, torch; "
        "print(json.dumps({p: m.version(p) for p in "
        "['fusion-bench', 'torch', 'transformers', 'lightning']}))"
    )
    versions = json.loads(
        subprocess.run(
            [str(venv_python(venv)), "-c", probe],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    recorded = {**wanted, "versions": versions}
    marker.write_text(json.dumps(recorded, indent=2) + "\n")
    return recorded


def run_reference(
    venv: Path, zoo: clip_zoo.Zoo, models: list[Path], out: Path, args, dtype: str
) -> dict:  # noqa: ANN001
    cmd = [
        str(venv_python(venv)),
        str(RUNNER),
        "--base",
        str(zoo.base),
        *[a for m in models for a in ("--model", f"{m.name}={m}")],
        "--out",
        str(out),
        "--alpha",
        str(args.alpha),
        "--dtype",
        dtype,
        "--algorithm",
        args.reference_algorithm,
        "--device",
        args.reference_device or args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # nothing of mergestream's on the reference's path
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    shutil.rmtree(out, ignore_errors=True)
    stats = run_measured(cmd, out.with_suffix(".log"), env)
    result = json.loads((out / "result.json").read_text())
    return _with_process_peak({**result, **stats, "merged": str(out / "model.safetensors")})


# ---------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else platform.processor() or cpu
    except OSError:
        pass
    ram = None
    try:
        match = re.search(r"MemTotal:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text())
        ram = round(int(match.group(1)) / 1024**2, 1) if match else None
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "ram_gib": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def _merge_seconds(side: dict, setup_key: str) -> float:
    """Set-up + all steps + export, measured inside the process."""
    if setup_key == "mergestream":
        export = side["export"]["seconds"] if side.get("export") else 0.0
        return side["setup"]["seconds"] + sum(s["seconds"] for s in side["steps"]) + export
    return side["setup_seconds"] + sum(s["seconds"] for s in side["steps"]) + side["export_seconds"]


def summarize(results: dict) -> dict:
    ms = results["mergestream"]
    ref = results.get("reference")
    floor = results.get("floor")
    later = [s["seconds"] for s in ms["steps"] if s["step"] >= 2]
    summary = {
        "mergestream_mean_step_seconds": _mean(later),
        "mergestream_mean_step_cpu_seconds": _mean(
            [s["cpu_seconds"] for s in ms["steps"] if s["step"] >= 2]
        ),
        "mergestream_merge_seconds": _merge_seconds(ms, "mergestream"),
        "mergestream_process_seconds": ms["process_seconds"],
        "mergestream_process_peak_rss_mib": ms["process_peak_rss_mib"],
        "mergestream_max_step_peak_rss_mib": max(s["peak_rss_mib"] or 0 for s in ms["steps"]),
    }
    if floor:
        summary["floor_step_seconds"] = floor["seconds"]
        if later:
            summary["mergestream_step_over_floor"] = _mean(later) / floor["seconds"]
    if ref:
        ref_later = [s["seconds"] for s in ref["steps"] if s["step"] >= 2]
        summary.update(
            {
                "reference_mean_step_seconds": _mean(ref_later),
                "reference_mean_step_cpu_seconds": _mean(
                    [s.get("cpu_seconds", 0.0) for s in ref["steps"] if s["step"] >= 2]
                ),
                "reference_merge_seconds": _merge_seconds(ref, "reference"),
                "reference_process_seconds": ref["process_seconds"],
                "reference_process_peak_rss_mib": ref["process_peak_rss_mib"],
                "reference_max_step_peak_rss_mib": max(
                    s["peak_rss_mib"] or 0 for s in ref["steps"]
                ),
            }
        )
        if later and ref_later:
            summary["step_time_ratio"] = _mean(later) / _mean(ref_later)
        summary["merge_time_ratio"] = (
            summary["mergestream_merge_seconds"] / summary["reference_merge_seconds"]
        )
        summary["process_time_ratio"] = ms["process_seconds"] / ref["process_seconds"]
        summary["process_peak_rss_ratio"] = ms["process_peak_rss_mib"] / ref["process_peak_rss_mib"]
    return summary


def context_lines(results: dict) -> list[str]:
    m = results["machine"]
    ms = results["mergestream"]
    zoo = results["zoo"]
    lines = [
        f"Measured {results['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, "
        f"Python {m['python']}; torch {ms['torch_version']}, {ms['threads']} threads; "
        f"mergestream {ms['mergestream_version']} ({results.get('revision') or 'unknown revision'}"
        f"), device {ms['device']}" + (f", {ms['workers']} workers." if ms.get("workers") else "."),
    ]
    ref = results.get("reference")
    if ref:
        lines.append(
            f"Reference: fusion-bench {ref['fusion_bench_version']} (`{ref['algorithm']}`, "
            f"zero_diagonal={'on' if ref['zero_diagonal'] else 'off'}, transformers "
            f"{ref['transformers_version']}, torch {ref['torch_version']}, {ref['threads']} "
            f"threads, {ref['dtype']}, device {ref['device']})."
        )
    lines.append(
        f"Zoo: {zoo['shape']} vision tower ({zoo['parameters'] / 1e6:.1f}M parameters, "
        f"{zoo['tensors']} tensors, {zoo['linear_weights']} projected linear weights), "
        f"{zoo['models']} synthetic task models (‖τ‖/‖θ0‖ "
        f"{min(zoo['rel_norms']):.3f}–{max(zoo['rel_norms']):.3f}), alpha "
        f"{results['alpha']}; mergestream state dtype {ms['state_dtype']}, decomposition "
        f"{ms.get('decomposition', 'gram')}."
    )
    lines.append(f"Command: `{results['command']}`")
    return lines


def markdown_comparison(results: dict) -> str:
    ms, ref, floor, s = (
        results["mergestream"],
        results.get("reference"),
        results.get("floor"),
        results["summary"],
    )
    out = [*context_lines(results), ""]
    out.append(
        "| step | mergestream (s) | FusionBench (s) | time ratio ms/FB "
        "| mergestream peak RSS (MiB) | FusionBench peak RSS (MiB) |"
    )
    out.append("|---|--:|--:|--:|--:|--:|")
    ref_steps = {x["step"]: x for x in ref["steps"]} if ref else {}
    ref_setup = ref["setup_seconds"] if ref else None
    out.append(
        f"| set-up (base) | {_fmt(ms['setup']['seconds'])} | {_fmt(ref_setup)} "
        f"| {_ratio(ms['setup']['seconds'], ref_setup)} "
        f"| {_fmt(ms['setup']['peak_rss_mib'], 0)} "
        f"| {_fmt(ref['setup_peak_rss_mib'] if ref else None, 0)} |"
    )
    for step in ms["steps"]:
        r = ref_steps.get(step["step"], {})
        out.append(
            f"| {step['step']} | {_fmt(step['seconds'])} | {_fmt(r.get('seconds'))} "
            f"| {_ratio(step['seconds'], r.get('seconds'))} | {_fmt(step['peak_rss_mib'], 0)} "
            f"| {_fmt(r.get('peak_rss_mib'), 0)} |"
        )
    ms_export = ms["export"]["seconds"] if ms.get("export") else None
    ref_export = ref["export_seconds"] if ref else None
    out.append(
        f"| export | {_fmt(ms_export)} | {_fmt(ref_export)} | {_ratio(ms_export, ref_export)} "
        f"| {_fmt(ms['export']['peak_rss_mib'] if ms.get('export') else None, 0)} "
        f"| {_fmt(ref['export_peak_rss_mib'] if ref else None, 0)} |"
    )
    out.append(
        f"| mean of steps ≥ 2 | {_fmt(s['mergestream_mean_step_seconds'])} "
        f"| {_fmt(s.get('reference_mean_step_seconds'))} "
        f"| {_ratio(s['mergestream_mean_step_seconds'], s.get('reference_mean_step_seconds'))} "
        "| | |"
    )
    ms_cpu, ref_cpu = (
        s.get("mergestream_mean_step_cpu_seconds"),
        s.get("reference_mean_step_cpu_seconds"),
    )
    out.append(
        f"| mean CPU seconds (user + sys) of steps ≥ 2 | {_fmt(ms_cpu)} | {_fmt(ref_cpu)} "
        f"| {_ratio(ms_cpu, ref_cpu)} | | |"
    )
    out.append(
        f"| merge total (set-up + steps + export) | {_fmt(s['mergestream_merge_seconds'])} "
        f"| {_fmt(s.get('reference_merge_seconds'))} "
        f"| {_ratio(s['mergestream_merge_seconds'], s.get('reference_merge_seconds'))} | | |"
    )
    out.append(
        f"| whole process (with imports) | {_fmt(ms['process_seconds'])} "
        f"| {_fmt(ref['process_seconds'] if ref else None)} "
        f"| {_ratio(ms['process_seconds'], ref['process_seconds'] if ref else None)} "
        f"| {_fmt(ms['process_peak_rss_mib'], 0)} "
        f"| {_fmt(ref['process_peak_rss_mib'] if ref else None, 0)} |"
    )
    out.append("")
    out.append(
        "Times are wall-clock seconds; a step is everything from taking the model to having "
        "merged it (mergestream: `MergeState.add`, which also hashes the input and commits the "
        "state to disk; FusionBench: loading the model and merging it in memory). Peak RSS of a "
        "step is the process's high-water mark during that step; of the whole process, its "
        "high-water mark over the whole run, imports included. Ratio < 1: mergestream is faster."
    )
    if floor:
        out.append("")
        out.append(
            f"Floor of one step, same run: reading base + incoming + a {floor['state_dtype']} "
            f"state and writing the state {_fmt(floor['io_seconds'])} s "
            f"(read {_fmt(floor['read_seconds'])}, write {_fmt(floor['write_seconds'])}); bare "
            f"thin float64 SVD of the {floor['projected']} projected weights "
            f"{_fmt(floor['svd_seconds'])} s; together {_fmt(floor['seconds'])} s. "
            f"mergestream's mean step (≥ 2) is {_fmt(s.get('mergestream_step_over_floor'))}× "
            f"that floor ({_fmt(s['mergestream_mean_step_seconds'] - floor['seconds'])} s above)."
        )
    agreement = results.get("agreement")
    if agreement:
        out.append("")
        for label, a in agreement["comparisons"].items():
            verdict = ""
            if label == agreement["checked"]:
                verdict = (
                    f" — {'PASS' if a['max_relative'] <= agreement['tolerance'] else 'FAIL'} "
                    f"(tolerance {agreement['tolerance']:g})"
                )
            out.append(
                f"Agreement with FusionBench {label}: task vectors (merged − base) of "
                f"{a['tensors']} tensors (class_embedding excluded), max relative difference "
                f"{a['max_relative']:.2e} ({a['worst_tensor']}), global "
                f"{a['global_relative']:.2e}{verdict}."
            )
    return "\n".join(out) + "\n"


def markdown_scale(results: dict) -> str:
    ms, s = results["mergestream"], results["summary"]
    out = [*context_lines(results), ""]
    out.append(
        f"{len(ms['steps'])} consecutive steps (models cycled, duplicates allowed). Least-squares "
        f"slope over steps ≥ 2: time {s['time_slope_seconds_per_step']:+.4f} s/step, peak RSS "
        f"{s['rss_slope_mib_per_step']:+.3f} MiB/step. Mean step {_fmt(s['mean_step_seconds'])} s "
        f"(min {_fmt(s['min_step_seconds'])}, max {_fmt(s['max_step_seconds'])}); peak RSS of "
        f"a step {_fmt(s['min_step_peak_rss_mib'], 0)}–{_fmt(s['max_step_peak_rss_mib'], 0)} "
        f"MiB; process peak {_fmt(ms['process_peak_rss_mib'], 0)} MiB."
    )
    out.append("")
    out.append("| step | seconds | peak RSS (MiB) |")
    out.append("|--:|--:|--:|")
    for step in ms["steps"]:
        out.append(
            f"| {step['step']} | {_fmt(step['seconds'])} | {_fmt(step['peak_rss_mib'], 0)} |"
        )
    return "\n".join(out) + "\n"


def update_benchmarks_md(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the section `heading` of a markdown file, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.write_text(text)


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="OPCM speed/memory/agreement: mergestream vs FusionBench on a CLIP zoo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", type=int, default=8, help="task models in the stream")
    parser.add_argument("--steps", type=int, default=None, help="scale mode: this many steps")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoo")
    parser.add_argument("--device", default="cpu", help="mergestream's device (cpu, cuda)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="mergestream's tensors in parallel (default: its own; on a GPU, streams)",
    )
    parser.add_argument(
        "--decomposition",
        choices=["gram", "svd", "approx-gram"],
        default=None,
        help="mergestream's OPCM decomposition (default: its own, gram)",
    )
    parser.add_argument(
        "--reference-device", default=None, help="FusionBench's device (default: --device)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's default)"
    )
    parser.add_argument(
        "--reference-algorithm",
        choices=["clip", "general"],
        default="clip",
        help="clip: fusion_bench.method.opcm.opcm.OPCMForCLIP; "
        "general: fusion_bench.method.opcm.opcm_general.OPCM",
    )
    parser.add_argument("--skip-reference", action="store_true", help="mergestream side only")
    parser.add_argument(
        "--skip-float64", action="store_true", help="no float64 reference run (no agreement)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--floor-repeats", type=int, default=2)
    parser.add_argument("--zoo-root", type=Path, default=None, help="cache of zoos")
    parser.add_argument("--tiny", action="store_true", help="a tiny tower (smoke tests)")
    parser.add_argument(
        "--reference-venv",
        type=Path,
        default=clip_zoo.DEFAULT_ROOT / f"fusion-bench-{REFERENCE_VERSION}-venv",
    )
    parser.add_argument(
        "--pip-args", default="", help="extra pip arguments for the reference venv (quoted)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=clip_zoo.DEFAULT_ROOT / "runs",
        help="where states and merged models go (in a subdirectory, emptied first)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep --work-dir afterwards")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--write-benchmarks-md", action="store_true")
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "PARAMS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {device}: torch {torch.__version__} sees no CUDA device here "
            f"(CUDA build: {torch.version.cuda or 'none'}); run on a machine with a GPU and a "
            "CUDA build of torch, or leave --device at cpu"
        )


def warm_page_cache(paths: list[Path]) -> None:
    for directory in paths:
        for file in sorted(directory.glob("*")):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_device(args.device)
    if args.reference_device:
        check_device(args.reference_device)
    scale = args.steps is not None
    if scale and args.steps < 1:
        raise SystemExit("--steps must be at least 1")

    config = dict(clip_zoo.TINY if args.tiny else clip_zoo.VIT_B32)
    spec = clip_zoo.ZooSpec(config=config, models=args.models, seed=args.seed)
    zoo = clip_zoo.build_zoo(spec, args.zoo_root, log=log)
    info = clip_zoo.zoo_info(zoo)
    warm_page_cache([zoo.base, *zoo.models])

    work = args.work_dir / ("opcm-scale" if scale else "opcm-vs-fusionbench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {
        "benchmark": "opcm-scale" if scale else "opcm-vs-fusionbench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "benchmarks/opcm_vs_fusionbench.py", *(argv or sys.argv[1:])]
        ),
        "machine": machine_info(),
        "revision": git_revision(),
        "alpha": args.alpha,
        "zoo": {
            "root": str(zoo.root),
            "shape": "tiny CLIP-shaped" if args.tiny else "CLIP-ViT-B/32-shaped",
            "config": config,
            "models": len(zoo.models),
            "parameters": info["parameters"],
            "tensors": info["tensors"],
            "linear_weights": info["linear_weights"],
            "base_norm": info["base_norm"],
            "rel_norms": [t["rel_norm"] for t in info["tasks"] if t["name"] in zoo.names],
        },
    }
    stream = [zoo.models[i % len(zoo.models)] for i in range(args.steps)] if scale else zoo.models
    params = {
        "base": str(zoo.base),
        "models": [str(p) for p in stream],
        "state": str(work / "mergestream-state"),
        "export": str(work / "mergestream-merged"),
        "alpha": args.alpha,
        "device": args.device,
        "threads": args.threads,
        "workers": args.workers,
        "decomposition": args.decomposition,
        "allow_duplicate": scale,
        "export_model": not scale,
    }
    log(f"mergestream: {len(stream)} steps")
    ms = run_worker("mergestream", params, work, args.threads)
    results["mergestream"] = ms
    projected = ms.pop("projected_names")
    if len(projected) != info["linear_weights"]:
        log(
            f"warning: mergestream projects {len(projected)} tensors, the zoo has "
            f"{info['linear_weights']} linear weights"
        )

    if scale:
        steps = [s for s in ms["steps"] if s["step"] >= 2] or ms["steps"]
        xs = [float(s["step"]) for s in steps]
        times = [s["seconds"] for s in steps]
        rss = [s["peak_rss_mib"] or 0.0 for s in steps]
        results["summary"] = {
            "time_slope_seconds_per_step": slope(xs, times) or 0.0,
            "rss_slope_mib_per_step": slope(xs, rss) or 0.0,
            "mean_step_seconds": _mean(times),
            "min_step_seconds": min(times),
            "max_step_seconds": max(times),
            "min_step_peak_rss_mib": min(rss),
            "max_step_peak_rss_mib": max(rss),
        }
        markdown, heading = markdown_scale(results), SCALE_SECTION
    else:
        log("floor: read/write of one step and bare SVDs")
        floor_params = {
            "base": str(zoo.base),
            "incoming": str(zoo.models[min(1, len(zoo.models) - 1)]),
            "work": str(work / "floor"),
            "state_dtype": ms["state_dtype"],
            "projected": projected,
            "repeats": args.floor_repeats,
            "threads": args.threads,
            "device": args.device,
        }
        results["floor"] = run_worker("floor", floor_params, work, args.threads)
        shutil.rmtree(work / "floor", ignore_errors=True)
        references = {}
        if not args.skip_reference:
            pip_args = shlex.split(args.pip_args)
            results["reference_env"] = ensure_reference_venv(args.reference_venv, pip_args)
            log("FusionBench: float32 (its default)")
            results["reference"] = run_reference(
                args.reference_venv, zoo, zoo.models, work / "fusionbench-float32", args, "float32"
            )
            references["float32"] = results["reference"]["merged"]
            if not args.skip_float64:
                log("FusionBench: float64 (agreement)")
                results["reference_float64"] = run_reference(
                    args.reference_venv,
                    zoo,
                    zoo.models,
                    work / "fusionbench-float64",
                    args,
                    "float64",
                )
                references["float64"] = results["reference_float64"]["merged"]
        if references:
            log("agreement: comparing task vectors")
            compared = run_worker(
                "compare",
                {
                    "state": params["state"],
                    "base": str(zoo.base),
                    "references": references,
                    "exclude": list(EXCLUDED),
                },
                work,
                args.threads,
            )
            compared = {label: compared[label] for label in references}
            checked = "float64" if "float64" in compared else None
            results["agreement"] = {
                "tolerance": args.tolerance,
                "checked": checked,
                "passed": None
                if checked is None
                else compared[checked]["max_relative"] <= args.tolerance,
                "excluded": list(EXCLUDED),
                "comparisons": {
                    k: {kk: vv for kk, vv in v.items() if kk != "per_tensor"}
                    for k, v in compared.items()
                },
                "per_tensor": {k: v["per_tensor"] for k, v in compared.items()},
            }
        results["summary"] = summarize(results)
        if "reference" in results:
            ours = bool(ms["method"]["params"].get("zero_diagonal"))
            theirs = bool(results["reference"]["zero_diagonal"])
            results["summary"]["zero_diagonal"] = {"mergestream": ours, "reference": theirs}
            if ours != theirs:
                log(
                    f"warning: zero_diagonal differs (mergestream {ours}, reference {theirs}); "
                    "the two sides do not run the same rule"
                )
        markdown, heading = markdown_comparison(results), SECTION

    out = args.out or HERE / "results" / (
        "opcm_scale.json" if scale else "opcm_vs_fusionbench.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{heading}\n\n{markdown}")
    log(f"results: {out}")
    if args.write_benchmarks_md:
        update_benchmarks_md(args.benchmarks_md, heading, markdown)
        log(f"updated {heading!r} in {args.benchmarks_md}")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    agreement = results.get("agreement")
    if agreement and agreement["passed"] is False:
        log("agreement FAILED: see the per-tensor differences in the results file")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
