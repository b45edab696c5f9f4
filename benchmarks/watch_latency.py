"""Landing-to-published latency of `mergestream watch`: the time from a checkpoint appearing in
the inbox (renamed in, whole) to the merged model being switched in at OUT.

A synthetic BERT-shaped stream (mergestream.synthetic) is written to a temporary folder; a real
`mergestream watch --log-json --export OUT` process runs on it, and this script drops one
checkpoint at a time, reading the watcher's event lines as they come (each timestamped on
arrival) to split the latency into noticing the checkpoint, merging it (`add`) and publishing
(export + link switch). Each configuration gets a fresh state.

    python benchmarks/watch_latency.py --models 5 --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

from mergestream import MergeState, __version__  # noqa: E402
from mergestream.synthetic import transformer_shapes, write_stream  # noqa: E402


class EventReader:
    """The watcher's JSON event lines, each with the monotonic time it was read."""

    def __init__(self, proc: subprocess.Popen):
        self.events: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                with self.cond:
                    self.events.append((time.monotonic(), json.loads(line)))
                    self.cond.notify_all()

    def wait(self, event: str, step: int | None = None, timeout: float = 600) -> float:
        def found():
            for t, e in self.events:
                if e["event"] == event and (step is None or e.get("step") == step):
                    return t
            return None

        with self.cond:
            self.cond.wait_for(lambda: found() is not None, timeout=timeout)
            t = found()
        if t is None:
            raise RuntimeError(f"no {event} event for step {step}")
        return t

    def first_after(self, event: str, since: float) -> float:
        return min(t for t, e in self.events if e["event"] == event and t >= since)


def run_config(work: Path, base: Path, models: list[Path], flags: list[str]) -> list[dict]:
    state, inbox = work / "state", work / "inbox"
    for path in (state, inbox, work / "out.versions"):
        shutil.rmtree(path, ignore_errors=True)
    (work / "out").unlink(missing_ok=True)
    inbox.mkdir()
    MergeState.create(state, base, method="opcm")
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergestream", "watch", str(state), str(inbox), "--log-json",
         "--export", str(work / "out"), *flags],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    reader = EventReader(proc)
    reader.wait("start")
    rows = []
    try:
        for step, model in enumerate(models, start=1):
            staging = work / f"staging-{step}"
            shutil.copytree(model, staging)
            landed = time.monotonic()
            staging.rename(inbox / f"m{step:02d}")
            published = reader.wait("published", step)
            adding = reader.first_after("adding", landed)
            merged = reader.wait("merged", step)
            rows.append(
                {
                    "notice": adding - landed,
                    "merge": merged - adding,
                    "publish": published - merged,
                    "total": published - landed,
                }
            )
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    shapes = transformer_shapes(
        layers=args.layers, hidden=args.hidden, intermediate=4 * args.hidden, vocab=8000,
        positions=512,
    )  # fmt: skip
    params = sum(math.prod(s) for s in shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, models = write_stream(work / "zoo", models=args.models, seed=1, shapes=shapes)
        size = (models[0] / "model.safetensors").stat().st_size
        configs = {
            "inotify, --settle 0": ["--settle", "0"],
            "polling every 2 s, --settle 0": ["--settle", "0", "--polling", "--poll", "2"],
        }
        print(
            f"mergestream {__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
            f"OPCM on a synthetic BERT-shaped model: {args.layers} layers, hidden {args.hidden}, "
            f"{params / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB float32 per checkpoint; "
            f"{args.models} checkpoints dropped one at a time."
        )
        print()
        print(
            "| watcher | steps | notice (s) | merge (s) | publish (s) | landing to published (s) |"
        )
        print("|---|--:|--:|--:|--:|--:|")
        for label, flags in configs.items():
            rows = run_config(work, base, models, flags)
            later = rows[1:]  # step 1 has no decomposition in OPCM
            totals = [r["total"] for r in later]

            def mean(key, rows=later):
                return statistics.mean(r[key] for r in rows)

            print(
                f"| {label} | 2-{len(rows)} | {mean('notice'):.2f} | {mean('merge'):.2f} | "
                f"{mean('publish'):.2f} | {mean('total'):.2f} "
                f"(min {min(totals):.2f}, max {max(totals):.2f}) |"
            )


if __name__ == "__main__":
    main()
