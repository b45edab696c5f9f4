"""`mergestream demo`: merge a tiny synthetic stream with OPCM and show what each step did."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .methods import OPCM
from .state import MergeState
from .synthetic import write_stream


def run_demo(workdir: Path | None = None, models: int = 6, seed: int = 0) -> None:
    with tempfile.TemporaryDirectory(prefix="mergestream-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        base_dir, checkpoints = write_stream(root / "zoo", models=models, seed=seed)
        print(f"built a synthetic stream in {root / 'zoo'}: base + {models} fine-tuned models")
        state = MergeState.create(root / "state", base_dir, method=OPCM(alpha=0.5))
        print(f"created state {root / 'state'} with {state.method!r}\n")
        base = load_file(str(base_dir / "model.safetensors"))
        task_vectors = [
            {
                k: v.double() - base[k].double()
                for k, v in load_file(str(c / "model.safetensors")).items()
                if v.is_floating_point()
            }
            for c in checkpoints
        ]
        print("step  |tau|     mean|tau|  lambda   removed  |merged-base|  retention of each model")
        for step, checkpoint in enumerate(checkpoints, start=1):
            stats = state.add(checkpoint)
            merged = dict(state.task_vectors())
            merged_norm = sum(float(t.square().sum()) for t in merged.values()) ** 0.5
            retention = []
            for tv in task_vectors[:step]:
                # how much of each model's own task vector the merged model still carries
                dot = sum(float((merged[k] * tv[k]).sum()) for k in tv)
                retention.append(dot / sum(float(tv[k].square().sum()) for k in tv))
            s = stats.scalars
            print(
                f"{step:4d}  {s['last_task_norm']:.4f}   {s['norm_sum'] / step:.4f}     "
                f"{s['scale']:.4f}   {100 * s['last_removed_fraction']:5.1f}%   "
                f"{merged_norm:.4f}        " + " ".join(f"{r:.2f}" for r in retention)
            )
        out = state.export(root / "merged")
        merged_file = load_file(str(out / "model.safetensors"))
        print(
            f"\nexported {len(merged_file)} tensors to {out}; |merged - base| equals the mean task "
            f"vector norm ({state.scalars['norm_sum'] / state.step:.4f}) by construction."
        )
        assert all(torch.isfinite(t).all() for t in merged_file.values() if t.is_floating_point())
