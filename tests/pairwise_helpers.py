"""Shared checks for the methods that merge the pair (merged task vector, incoming task vector)
with whole-matrix decompositions (DOP, Iso-C, TSV-M): the engine's row streaming leaves their
matrices whole and streams everything else, and the result is the same."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from baseline_helpers import make_stream

from mergestream import MergeState, merge
from mergestream.step import engine

# With these limits every 2-D tensor of the test models and the MLP's 24-entry bias reach the
# streaming size (the bias in blocks of 10 entries, the matrices in blocks of one row).
SMALL_STREAM = 20
SMALL_BLOCK = 10


def check_streaming_keeps_matrices_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict,
    held_whole: Callable[[str, tuple[int, ...]], bool],
) -> None:
    """Under small streaming limits: the tensors `held_whole` names are read whole, every other
    large tensor by row blocks, and the merged model equals the one of the default limits."""
    base, models = make_stream(4)
    expected = merge(base, models, method, dtype=torch.float64, **params)

    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", SMALL_STREAM)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", SMALL_BLOCK)
    streamed_names: set[str] = set()
    whole_names: set[str] = set()
    load_rows, load_whole = engine.load_task_rows, engine.load_task_vector

    def spy_rows(info, *args, **kwargs):  # noqa: ANN001, ANN202
        streamed_names.add(info.name)
        return load_rows(info, *args, **kwargs)

    def spy_whole(info, *args, **kwargs):  # noqa: ANN001, ANN202
        whole_names.add(info.name)
        return load_whole(info, *args, **kwargs)

    monkeypatch.setattr(engine, "load_task_rows", spy_rows)
    monkeypatch.setattr(engine, "load_task_vector", spy_whole)
    got = merge(base, models, method, dtype=torch.float64, **params)

    large = {n for n, t in base.items() if t.is_floating_point() and t.numel() >= SMALL_STREAM}
    assert large, "the test models must reach the streaming size"
    want_whole = {n for n in large if held_whole(n, tuple(base[n].shape))}
    assert want_whole and want_whole != large, "both paths must be exercised"
    assert streamed_names == large - want_whole
    assert want_whole <= whole_names
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            delta = tensor - base[name].double()
            error = float((got[name] - base[name].double() - delta).norm())
            assert error <= 1e-12 * max(float(delta.norm()), 1e-30), name
        else:
            assert torch.equal(got[name], tensor), name


def check_gpu_equals_cpu(method: str, params: dict) -> None:
    """`--device cuda` gives the CPU's merge to round-off (float64 state)."""
    base, models = make_stream(3)
    common = {"dtype": torch.float64, "state_dtype": "float64", **params}
    cpu = merge(base, models, method, **common)
    gpu = merge(base, models, method, device="cuda", **common)
    for name, tensor in cpu.items():
        if not tensor.is_floating_point():
            assert torch.equal(gpu[name], tensor), name
            continue
        scale = float((tensor - base[name].double()).norm())
        assert float((gpu[name] - tensor).norm()) <= 1e-9 * max(scale, 1e-30), name


def check_roles_follow_the_shape_rule(method: str) -> None:
    """`status --tensors` roles: every floating 2-D tensor is a matrix of the method (embedding
    tables included, as its reference decides by shape), the rest is merged elementwise; the
    default rule (OPCM's) leaves embedding tables out."""
    base, _ = make_stream(1)
    roles = MergeState.in_memory(base, method).classification()
    default = MergeState.in_memory(base, "opcm").classification()
    embeddings = [
        n for n, t in base.items() if "embeddings" in n and t.ndim == 2 and t.is_floating_point()
    ]
    assert embeddings
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            assert roles[name] == "copied", name
        else:
            assert roles[name] == ("projected" if tensor.ndim == 2 else "added"), name
    assert all(default[n] == "added" for n in embeddings)


def low_rank(shape: tuple[int, int], rank: int, g: torch.Generator) -> torch.Tensor:
    """A random float64 matrix of `shape` and rank `rank` (a sum of LoRA-like task vectors)."""
    return torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[1], generator=g, dtype=torch.float64
    )


def round_off(x: torch.Tensor, g: torch.Generator, size: float = 1e-15) -> torch.Tensor:
    """x plus noise of `size`·‖x‖ (a few units of float64 round-off per entry)."""
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x + noise * (size * x.norm() / noise.norm())


def check_float32_round_off_is_left_out(
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """A rank-deficient m stored in float32 (the default state) carries float32 round-off in
    every entry; its singular values (about 1e-7 of the largest) are not directions of m, so
    `combine` gives the float64 state's result to float32 precision, not a spectrum spread
    over noise."""
    from mergestream.methods.linalg import rank_rtol, stored_rtol

    gen = torch.Generator().manual_seed(7)
    merged, task = (
        torch.randn(40, 3, generator=gen, dtype=torch.float64)
        @ torch.randn(3, 30, generator=gen, dtype=torch.float64)
        for _ in range(2)
    )
    exact = combine(merged, task)
    stored = combine(merged.float(), task)
    assert torch.linalg.matrix_rank(exact).item() <= 6
    assert (stored - exact).norm() / exact.norm() < 1e-5
    # The float64 rule alone would count the round-off as directions; the stored rule does not.
    sigma = torch.linalg.svdvals(merged.float().double() + task)
    assert (sigma > rank_rtol(40, 30) * sigma[0]).sum() > 6
    assert (sigma > stored_rtol(40, 30, float(sigma[0]), merged.float()) * sigma[0]).sum() == 6
    assert stored_rtol(40, 30, float(sigma[0]), merged, task) == rank_rtol(40, 30)
