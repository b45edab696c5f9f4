"""Continual Iso-C: step 1 m = c·τ_1; step t: m ← c·ISO(m, τ_t), ISO = the sum of a 2-D pair with
every singular value replaced by their mean, the average of any other pair."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import (
    assert_close,
    assert_merged_model,
    check_cli,
    check_listed,
    check_resume,
    make_stream,
    pairwise_history,
    task_vector,
    write_models,
)
from pairwise_helpers import (
    check_float32_round_off_is_left_out,
    check_gpu_equals_cpu,
    check_roles_follow_the_shape_rule,
    check_streaming_keeps_matrices_whole,
    low_rank,
    round_off,
)

from mergestream import ConfigError, MergeState, merge
from mergestream.methods import IsoC, iso_c_combine


def flattened_spectrum(x: torch.Tensor) -> torch.Tensor:
    """mean(σ)·U Vᵀ of x, written through the Gram matrix of its smaller side rather than an
    SVD: with G = XᵀX = V Σ² Vᵀ (tall x), U Vᵀ = X V Σ⁻¹ Vᵀ."""
    tall = x.shape[0] >= x.shape[1]
    a = x if tall else x.mT
    eigenvalues, v = torch.linalg.eigh(a.mT @ a)
    sigma = eigenvalues.clamp_min(0).sqrt()
    polar = a @ (v / sigma) @ v.mT
    out = sigma.mean() * polar
    return out if tall else out.mT


def reference(base, models, c=1.0, stored=torch.float32):
    """The continual Iso-C of the reference, whole model, float64 (see `pairwise_history`)."""
    return pairwise_history(base, models, lambda m, tau: flattened_spectrum(m + tau), c, stored)


@pytest.mark.parametrize(
    ("c", "state_dtype", "rtol"),
    [(1.0, "float64", 1e-10), (0.7, "float64", 1e-10), (1.0, None, 1e-6)],
)
def test_equals_the_reference_at_every_step(c, state_dtype, rtol):
    base, models = make_stream()
    stored = torch.float64 if state_dtype == "float64" else torch.float32
    history = reference(base, models, c, stored)
    state = MergeState.in_memory(base, "iso_c", state_dtype=state_dtype, scaling_factor=c)
    for model, expected in zip(models, history, strict=True):
        state.add(model)
        assert_close(dict(state.task_vectors()), expected, rtol=rtol)
    assert_merged_model(state.state_dict(), base, history[-1], rtol=rtol)


def test_step_one_is_base_plus_scaled_task_vector():
    base, models = make_stream(1)
    merged = merge(base, models, "iso_c", scaling_factor=0.4)
    expected = {n: 0.4 * v for n, v in task_vector(base, models[0]).items()}
    assert_merged_model(merged, base, expected)


def test_every_two_dimensional_tensor_gets_a_flat_spectrum():
    """Embedding tables too (the reference decides by shape); 1-D tensors are averaged."""
    base, models = make_stream(2)
    state = MergeState.in_memory(base, "iso_c", state_dtype="float64", scaling_factor=1.0)
    for model in models:
        state.add(model)
    merged = dict(state.task_vectors())
    taus = [task_vector(base, m) for m in models]
    assert any("embeddings" in n and merged[n].ndim == 2 for n in merged)
    for name, tensor in merged.items():
        total = taus[0][name] + taus[1][name]
        if tensor.ndim == 2:
            sigma = torch.linalg.svdvals(tensor)
            expected = torch.linalg.svdvals(total).mean()
            assert torch.allclose(sigma, expected.expand_as(sigma), rtol=1e-10), name
        else:
            assert torch.allclose(tensor, total / 2, rtol=1e-12, atol=0), name


def test_combine_of_a_wide_and_a_degenerate_pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(3, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(iso_c_combine(a, b), flattened_spectrum(a + b), rtol=1e-10)
    row = torch.randn(1, 5, generator=g, dtype=torch.float64)  # one σ: the sum itself
    assert torch.allclose(iso_c_combine(row, row), 2 * row, rtol=1e-12)
    assert iso_c_combine(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def flattened_on_range(x: torch.Tensor, rank: int) -> torch.Tensor:
    """mean(σ)·U Vᵀ over the top `rank` singular pairs of x, from the eigenpairs of XᵀX."""
    eigenvalues, v = torch.linalg.eigh(x.mT @ x)
    sigma, v = eigenvalues[-rank:].sqrt(), v[:, -rank:]
    return sigma.mean() * (x @ (v / sigma)) @ v.mT


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_a_rank_deficient_sum_keeps_its_own_directions(shape):
    """The σ = 0 rule: a sum of rank 5 gets mean(σ) over its 5 directions only, and the result
    does not move under round-off (with all min(rows, cols) triplets, the 11 null directions
    would be whatever the SVD returns for σ = 0)."""
    g = torch.Generator().manual_seed(5)
    merged, task = low_rank(shape, 3, g), low_rank(shape, 2, g)
    got = iso_c_combine(merged, task)
    expected = flattened_on_range(merged + task, 5)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.norm()))
    sigma = torch.linalg.svdvals(got)
    assert torch.allclose(sigma[:5], sigma[:5].mean().expand(5), rtol=1e-10)
    assert float(sigma[5]) < 1e-12 * float(sigma[0])
    for _ in range(3):
        moved = iso_c_combine(round_off(merged, g), round_off(task, g)) - got
        assert float(moved.norm()) < 1e-8 * float(got.norm())


def test_tensor_roles_follow_the_shape_rule():
    check_roles_follow_the_shape_rule("iso_c")


def test_streaming_holds_matrices_whole(monkeypatch):
    check_streaming_keeps_matrices_whole(
        monkeypatch, "iso_c", {}, held_whole=lambda name, shape: len(shape) == 2
    )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "iso_c", scaling_factor=0.9)


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    status = check_cli(tmp_path, base_dir, paths, "iso_c", {"scaling_factor": "0.8"}, capsys)
    assert status["method"]["params"] == {"scaling_factor": 0.8}


def test_listed_with_parameters(capsys):
    check_listed(capsys, "iso_c")


def test_default_and_invalid_scaling_factor():
    assert IsoC().config.scaling_factor == 1.0
    with pytest.raises(ConfigError, match="scaling_factor"):
        IsoC(scaling_factor=float("nan"))
    with pytest.raises(ConfigError, match="scaling_factor"):
        MergeState.in_memory(make_stream(1)[0], "iso_c", scaling_factor="big")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_equals_the_cpu():
    check_gpu_equals_cpu("iso_c", {})



def test_a_float32_state_of_a_low_rank_stream_keeps_its_round_off_out():
    from mergestream.methods.iso_c import iso_c_combine

    check_float32_round_off_is_left_out(iso_c_combine)
