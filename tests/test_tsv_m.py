"""Continual TSV-M: step 1 m = c·τ_1; step t: m ← c·TSV(m, τ_t), TSV = the top half of each
one's singular triplets side by side, the singular vectors orthogonalised (2-D tensors), the
average of any other pair."""

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
from mergestream.methods import TsvM, tsv_m_combine


def top_triplets(x: torch.Tensor, k: int):
    """The k largest singular triplets of x from the eigenpairs of XᵀX (no SVD)."""
    eigenvalues, vectors = torch.linalg.eigh(x.mT @ x)
    order = eigenvalues.argsort(descending=True)[:k]
    sigma = eigenvalues[order].clamp_min(0).sqrt()
    v = vectors[:, order]
    return (x @ v) / sigma, sigma, v


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gram)
    return (vectors / values.sqrt()) @ vectors.mT


def tsv_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TSV-M of a 2-D pair, written from the definition: the orthogonal polar factor of the
    stacked left vectors, M (MᵀM)^(-1/2), and of the stacked right ones (the empty slot of an odd
    rank carries σ = 0, so it is left out)."""
    k = min(a.shape) // 2
    if k == 0:
        return torch.zeros_like(a)
    (ua, sa, va), (ub, sb, vb) = top_triplets(a, k), top_triplets(b, k)
    left = torch.cat([ua, ub], dim=1)
    right = torch.cat([va, vb], dim=1)
    left = left @ inverse_sqrt(left.mT @ left)
    right = right @ inverse_sqrt(right.mT @ right)
    return (left * torch.cat([sa, sb])) @ right.mT


def reference(base, models, c=1.0, stored=torch.float32):
    """The continual TSV-M, whole model, float64 (see `pairwise_history`)."""
    return pairwise_history(base, models, tsv_reference, c, stored)


# The truncation of each step follows the previous step's singular subspaces, so round-off
# differences between the two computations grow by about 10x a step over these six steps (to
# 2e-9 with float64 state); 1e-8 and, with the float32 state, 1e-6 leave room for that.
@pytest.mark.parametrize(
    ("c", "state_dtype", "rtol"),
    [(1.0, "float64", 1e-8), (0.6, "float64", 1e-8), (1.0, None, 1e-6)],
)
def test_equals_the_reference_at_every_step(c, state_dtype, rtol):
    base, models = make_stream()
    stored = torch.float64 if state_dtype == "float64" else torch.float32
    history = reference(base, models, c, stored)
    state = MergeState.in_memory(base, "tsv_m", state_dtype=state_dtype, scaling_factor=c)
    for model, expected in zip(models, history, strict=True):
        state.add(model)
        assert_close(dict(state.task_vectors()), expected, rtol=rtol)
    assert_merged_model(state.state_dict(), base, history[-1], rtol=rtol)


def test_step_one_is_base_plus_scaled_task_vector():
    base, models = make_stream(1)
    merged = merge(base, models, "tsv_m", scaling_factor=0.5)
    expected = {n: 0.5 * v for n, v in task_vector(base, models[0]).items()}
    assert_merged_model(merged, base, expected)


def test_shapes_odd_ranks_and_a_single_row():
    g = torch.Generator().manual_seed(1)
    for shape in [(7, 5), (5, 7), (6, 6), (9, 4)]:
        a = torch.randn(shape, generator=g, dtype=torch.float64)
        b = torch.randn(shape, generator=g, dtype=torch.float64)
        got = tsv_m_combine(a, b)
        assert torch.allclose(got, tsv_reference(a, b), rtol=1e-9, atol=1e-12), shape
        # The kept singular values survive: the result's spectrum is theirs (orthogonal factors).
        k = min(shape) // 2
        expected = torch.cat([torch.linalg.svdvals(a)[:k], torch.linalg.svdvals(b)[:k]])
        sigma = torch.linalg.svdvals(got)[: 2 * k]
        assert torch.allclose(sigma, expected.sort(descending=True).values, rtol=1e-9), shape
    # A dimension of 1 keeps no triplet (k = 0): the reference's quirk, reproduced.
    row = torch.randn(1, 6, generator=g, dtype=torch.float64)
    assert torch.equal(tsv_m_combine(row, row), torch.zeros(1, 6, dtype=torch.float64))
    vector = torch.randn(6, generator=g, dtype=torch.float64)
    assert torch.equal(tsv_m_combine(vector, -vector), torch.zeros(6, dtype=torch.float64))


def tsv_of_directions(a: torch.Tensor, b: torch.Tensor, rank_a: int, rank_b: int):
    """TSV-M from the definition over each input's own directions: its top `rank` triplets,
    the stacked vectors orthogonalised as M (MᵀM)^(-1/2)."""
    (ua, sa, va), (ub, sb, vb) = top_triplets(a, rank_a), top_triplets(b, rank_b)
    left, right = torch.cat([ua, ub], dim=1), torch.cat([va, vb], dim=1)
    left = left @ inverse_sqrt(left.mT @ left)
    right = right @ inverse_sqrt(right.mT @ right)
    return (left * torch.cat([sa, sb])) @ right.mT


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_rank_deficient_inputs_keep_their_own_directions(shape):
    """The σ = 0 rule: inputs of rank 3 and 2 (below the budget k = 8) give their 3 and 2
    triplets, and the result does not move under round-off (with the top 8 of all triplets,
    the null-space vectors the SVD returns for σ = 0 would bend the polar factors)."""
    g = torch.Generator().manual_seed(6)
    merged, task = low_rank(shape, 3, g), low_rank(shape, 2, g)
    got = tsv_m_combine(merged, task)
    expected = tsv_of_directions(merged, task, 3, 2)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.norm()))
    for _ in range(3):
        moved = tsv_m_combine(round_off(merged, g), round_off(task, g)) - got
        assert float(moved.norm()) < 1e-8 * float(got.norm())
    # exactly dependent vectors (an input equal to the merge so far): TSV(m, m) = m
    same = tsv_m_combine(merged, merged)
    assert torch.allclose(same, merged, rtol=0, atol=1e-12 * float(merged.norm()))


def test_tensor_roles_follow_the_shape_rule():
    check_roles_follow_the_shape_rule("tsv_m")


def test_streaming_holds_matrices_whole(monkeypatch):
    check_streaming_keeps_matrices_whole(
        monkeypatch, "tsv_m", {}, held_whole=lambda name, shape: len(shape) == 2
    )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "tsv_m", scaling_factor=0.9)


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    status = check_cli(tmp_path, base_dir, paths, "tsv_m", {"scaling_factor": "0.8"}, capsys)
    assert status["method"]["params"] == {"scaling_factor": 0.8}


def test_listed_with_parameters(capsys):
    check_listed(capsys, "tsv_m")


def test_default_and_invalid_scaling_factor():
    assert TsvM().config.scaling_factor == 1.0
    with pytest.raises(ConfigError, match="scaling_factor"):
        TsvM(scaling_factor=float("inf"))
    with pytest.raises(ConfigError, match="unknown parameter"):
        TsvM(threshold=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_equals_the_cpu():
    check_gpu_equals_cpu("tsv_m", {})



def test_a_float32_state_of_a_low_rank_stream_keeps_its_round_off_out():
    from mergestream.methods.tsv_m import tsv_m_combine

    check_float32_round_off_is_left_out(tsv_m_combine)
