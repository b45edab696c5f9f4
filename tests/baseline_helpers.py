"""Shared pieces of the baseline-method tests: a small model stream, comparisons, and the resume
and command-line checks that every method goes through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

import mergestream
from mergestream import MergeState
from mergestream.cli import main
from mergestream.synthetic import (
    apply,
    make_base,
    make_task_vector,
    transformer_shapes,
    write_stream,
)

# 2-D tensors with more rows than columns (40x16, 24x16), fewer (16x24) and square (16x16),
# 1-D tensors (biases, LayerNorm), and an integer buffer (embeddings.position_ids).
SHAPES = transformer_shapes(layers=1, hidden=16, intermediate=24, vocab=40, positions=8)
MODELS = 6

Tensors = dict[str, torch.Tensor]


def make_stream(count: int = MODELS, seed: int = 7) -> tuple[Tensors, list[Tensors]]:
    """An in-memory base and `count` fine-tuned variants of it."""
    base = make_base(SHAPES, seed=seed)
    models = [apply(base, make_task_vector(base, seed=seed * 100 + i)) for i in range(count)]
    return base, models


def write_models(directory: Path, count: int = MODELS, seed: int = 7) -> tuple[Path, list[Path]]:
    """base/ and model-XX/ directories holding model.safetensors."""
    return write_stream(directory, count, seed=seed, shapes=SHAPES)


def load(directory: Path) -> Tensors:
    return load_file(str(Path(directory) / "model.safetensors"))


def floating(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.dtype.is_floating_point]


def task_vector(base: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> Tensors:
    """model − base in float64, floating-point tensors only."""
    return {n: model[n].to(torch.float64) - base[n].to(torch.float64) for n in floating(base)}


def pairwise_history(
    base: Tensors,
    models: Sequence[Tensors],
    combine_2d,  # noqa: ANN001 - (m, τ) -> merged, for 2-D tensors
    c: float = 1.0,
    stored: torch.dtype = torch.float32,
) -> list[Tensors]:
    """A pairwise continual method (Iso-C, TSV-M) over the whole model, float64: m = c·τ_1, then
    m ← c·combine_2d(m, τ_t) for 2-D tensors and c·(m + τ_t)/2 for the others, m rounded to
    `stored` between steps (as the state keeps it). Returns m after every step."""
    names = floating(base)
    m: Tensors | None = None
    history = []
    for model in models:
        tau = task_vector(base, model)
        if m is None:
            new = {n: c * tau[n] for n in names}
        else:
            new = {
                n: c * (combine_2d(m[n], tau[n]) if tau[n].ndim == 2 else (m[n] + tau[n]) / 2)
                for n in names
            }
        m = {n: v.to(stored).double() for n, v in new.items()}
        history.append(m)
    return history


def merged_task_vectors(
    base: Tensors, models: Sequence[Tensors], method: str, **params: object
) -> Tensors:
    """merged − base (float64) after merging `models` in memory."""
    state = MergeState.in_memory(base, method, **params)
    for model in models:
        state.add(model, allow_duplicate=True)
    return dict(state.task_vectors())


def assert_close(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], rtol: float = 1e-6
) -> None:
    """Per-tensor relative agreement: ‖got − expected‖ ≤ rtol·‖expected‖."""
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name].to(torch.float64)
        assert have.shape == want.shape, name
        error = float((have - want).norm())
        scale = float(want.norm())
        assert error <= rtol * scale or (scale == 0.0 and error == 0.0), (
            f"{name}: relative error {error / scale if scale else error:.3g}"
        )


def assert_merged_model(
    merged: Tensors, base: Tensors, expected_tv: Mapping[str, torch.Tensor], rtol: float = 1e-6
) -> None:
    """The merged state dict: floating tensors ≈ base + expected, in the base's dtype and
    shapes; every other tensor (the integer buffer) copied from the base unchanged."""
    assert list(merged) == list(base)
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape, name
        if not tensor.dtype.is_floating_point:
            assert torch.equal(merged[name], tensor), name
    want = {n: (base[n].double() + expected_tv[n]).float().double() for n in expected_tv}
    for name, w in want.items():
        # One float32 rounding of the merged weights on top of the task vector's error.
        tolerance = rtol * float(expected_tv[name].norm()) + float(w.abs().max()) * 2**-23
        assert float((merged[name].double() - w).abs().max()) <= tolerance, name


def check_resume(
    tmp_path: Path, base_dir: Path, paths: Sequence[Path], method: str, **params: object
) -> None:
    """Six models in one process == three, then three more in a new process, bit for bit."""
    assert len(paths) == 6
    full = MergeState.create(tmp_path / "state-full", base_dir, method, **params)
    for path in paths:
        full.add(path)
    full.export(tmp_path / "out-full")

    part = MergeState.create(tmp_path / "state-part", base_dir, method, **params)
    for path in paths[:3]:
        part.add(path)
    script = textwrap.dedent(
        """
        import sys
        from mergestream import MergeState

        state = MergeState.open(sys.argv[1])
        for path in sys.argv[3:]:
            state.add(path)
        state.export(sys.argv[2])
        """
    )
    src = str(Path(mergestream.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "state-part"),
            str(tmp_path / "out-part"),
            *map(str, paths[3:]),
        ],
        check=True,
        env=env,
    )
    resumed = MergeState.open(tmp_path / "state-part")
    assert resumed.step == full.step == 6
    assert resumed.scalars == full.scalars
    a, b = load(tmp_path / "out-full"), load(tmp_path / "out-part")
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (tmp_path / "out-full" / "model.safetensors").read_bytes() == (
        tmp_path / "out-part" / "model.safetensors"
    ).read_bytes()


def check_cli(
    tmp_path: Path,
    base_dir: Path,
    paths: Sequence[Path],
    method: str,
    params: Mapping[str, str],
    capsys,
) -> dict:  # noqa: ANN001 - pytest fixture
    """init --method --param, add, status, export on the command line == the Python API."""
    state_dir, out = tmp_path / "cli-state", tmp_path / "cli-out"
    param_args = [arg for k, v in params.items() for arg in ("--param", f"{k}={v}")]
    assert (
        main(["init", str(state_dir), "--base", str(base_dir), "--method", method, *param_args])
        == 0
    )
    assert main(["add", str(state_dir), *map(str, paths), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", str(state_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["method"]["name"] == method
    assert status["step"] == len(paths)
    assert main(["export", str(state_dir), str(out), "--quiet"]) == 0

    api = mergestream.merge(base_dir, list(paths), method, **params)
    exported = load(out)
    assert list(exported) == list(api)
    for name, tensor in api.items():
        assert torch.equal(exported[name], tensor), name
    return status


def check_listed(capsys, method: str) -> str:  # noqa: ANN001 - pytest fixture
    """`mergestream methods` shows the method's summary and every parameter with its default."""
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    cls = mergestream.METHODS[method]
    lines = text.splitlines()
    start = lines.index(f"{method}: {cls.summary}") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("    ")), len(lines))
    block = "\n".join(lines[start:end])
    assert end - start == len(cls.config_class.__dataclass_fields__)
    for field in cls.config_class.__dataclass_fields__.values():
        assert f"    {field.name} (" in block
        assert f"default {field.default!r}): {field.metadata['help']}" in block
    return text
