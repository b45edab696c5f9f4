"""OPCM against an independent whole-model reference, and the properties the method promises."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import memory_stream

from mergestream import ConfigError, MergeState, merge
from mergestream.io.safetensors_stream import TensorSpec
from mergestream.methods import OPCM, opcm_project
from mergestream.methods.classify import LinearRule
from mergestream.methods.linalg import right_singular, split_index

# ----------------------------------------------------------------------------- the reference
# Written plainly from the spec, whole model in memory, full SVD, everything float64.


def reference_split(sigma: torch.Tensor, alpha: float) -> int:
    total = float(sigma.sum())
    if total == 0.0:
        return 0
    n = len(sigma)
    for i in range(n):
        # the last running fraction is exactly 1 by definition (no rounding above it)
        fraction = 1.0 if i == n - 1 else float(sigma[: i + 1].sum()) / total
        if fraction > alpha:
            return i
    return 0


def reference_project(s: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool):
    u, sigma, vh = torch.linalg.svd(s, full_matrices=True)
    v = vh.T
    k = reference_split(sigma, alpha)
    p = u.T @ tau @ v
    if zero_diagonal:
        for i in range(min(p.shape)):
            p[i, i] = 0.0
    p[:k, :k] = 0.0
    return u @ p @ v.T


def global_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors.values()))


def reference_opcm(base, models, alpha=0.5, zero_diagonal=True):
    """Merged task vectors (merged - base) after all models, float64."""
    float_names = [k for k, v in base.items() if v.is_floating_point()]
    rule = LinearRule()
    linear = {
        k for k in float_names if rule.is_linear(k, TensorSpec(base[k].dtype, tuple(base[k].shape)))
    }
    taus = [{k: m[k].double() - base[k].double() for k in float_names} for m in models]
    running = {k: v.clone() for k, v in taus[0].items()}
    norms = [global_norm(taus[0])]
    scale = 1.0
    for tau in taus[1:]:
        norms.append(global_norm(tau))
        for k in float_names:
            if k in linear:
                running[k] = running[k] + reference_project(
                    running[k], tau[k], alpha, zero_diagonal
                )
            else:
                running[k] = running[k] + tau[k]
        scale = global_norm(running) / (sum(norms) / len(norms))
    return {k: v / scale for k, v in running.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("zero_diagonal", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("models", [2, 3, 6])
def test_engine_matches_reference(alpha: float, zero_diagonal: bool, models: int) -> None:
    base, checkpoints = memory_stream(models, seed=1)
    merged = merge(
        base, checkpoints, OPCM(alpha=alpha, zero_diagonal=zero_diagonal), dtype=torch.float64
    )
    expected = reference_opcm(base, checkpoints, alpha, zero_diagonal)
    assert set(expected) < set(merged)
    for name, tv in expected.items():
        got = merged[name] - base[name].double()
        assert relative_error(got, tv) <= 1e-5, name
    # integer buffers are copied from the base untouched
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])


@pytest.mark.parametrize("decomposition", ["gram", "svd", "approx-gram"])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (40, 13), (13, 40)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_projection_kernel_matches_full_svd(shape, alpha, zero_diagonal, decomposition) -> None:
    g = torch.Generator().manual_seed(hash((shape, alpha)) % 2**31)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    expected = reference_project(s, tau, alpha, zero_diagonal)
    got = opcm_project(s, tau, alpha, zero_diagonal, decomposition)
    assert relative_error(got, expected) <= 1e-10


def test_projection_is_orthogonal_to_running_sum_with_zero_diagonal() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(30, 20, generator=g, dtype=torch.float64)
    tau = torch.randn(30, 20, generator=g, dtype=torch.float64)
    projected = opcm_project(s, tau, 0.5, zero_diagonal=True)
    assert abs(float((projected * s).sum())) <= 1e-10 * float(s.norm() * tau.norm())
    # the paper variant keeps the diagonal and is generally NOT orthogonal
    kept = opcm_project(s, tau, 0.5, zero_diagonal=False)
    assert abs(float((kept * s).sum())) > 1e-3 * float(s.norm() * tau.norm())


def test_split_index_follows_the_cumulative_fraction() -> None:
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # fractions .4 .7 .9 1.0
    assert split_index(sigma, 0.0) == 0
    assert split_index(sigma, 0.4) == 1  # strictly greater than alpha
    assert split_index(sigma, 0.5) == 1
    assert split_index(sigma, 0.7) == 2
    assert split_index(sigma, 0.95) == 3
    assert split_index(sigma, 1.0) == 0  # no index qualifies
    assert split_index(torch.zeros(3, dtype=torch.float64), 0.5) == 0


def test_rank_deficient_running_sum_keeps_null_directions() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 8, generator=g, dtype=torch.float64
    )
    tau = torch.randn(12, 8, generator=g, dtype=torch.float64)
    for decomposition in ("gram", "svd", "approx-gram"):
        assert right_singular(s, decomposition).rank == 2
        projected = opcm_project(s, tau, 0.5, True, decomposition)
        assert torch.isfinite(projected).all()
        assert abs(float((projected * s).sum())) <= 1e-9 * float(s.norm() * tau.norm())
    # a zero running sum leaves the task vector unchanged
    assert torch.equal(
        opcm_project(torch.zeros(4, 3, dtype=torch.float64), tau[:4, :3], 0.5), tau[:4, :3]
    )


def test_approx_gram_trades_accuracy_only_where_the_sum_is_ill_conditioned() -> None:
    g = torch.Generator().manual_seed(11)
    m, n = 60, 12
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    tau = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1

    well = q1 @ torch.diag(torch.logspace(0, -2, n, dtype=torch.float64)) @ q2.T  # κ = 100
    assert torch.equal(
        opcm_project(well, tau, 0.5, True, "approx-gram"),
        opcm_project(well, tau, 0.5, True, "gram"),
    )

    ill = q1 @ torch.diag(torch.logspace(0, -7, n, dtype=torch.float64)) @ q2.T  # κ = 1e7
    exact = opcm_project(ill, tau, 0.5, True, "svd")
    assert relative_error(opcm_project(ill, tau, 0.5, True, "gram"), exact) <= 1e-10
    # The Gram route squares κ: its error here is about 4e-5, far above the exact routes'.
    error = relative_error(opcm_project(ill, tau, 0.5, True, "approx-gram"), exact)
    assert 1e-8 < error < 1e-3


@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_merged_distance_equals_mean_task_vector_norm_after_every_step(zero_diagonal) -> None:
    base, checkpoints = memory_stream(5, seed=2)
    state = MergeState.in_memory(base, OPCM(alpha=0.5, zero_diagonal=zero_diagonal))
    norms = []
    for checkpoint in checkpoints:
        state.add(checkpoint)
        norms.append(
            global_norm(
                {
                    k: checkpoint[k].double() - base[k].double()
                    for k in base
                    if base[k].is_floating_point()
                }
            )
        )
        merged_distance = global_norm(dict(state.task_vectors()))
        assert merged_distance == pytest.approx(sum(norms) / len(norms), rel=1e-6)


def test_each_projected_update_is_orthogonal_to_the_previous_sum() -> None:
    base, checkpoints = memory_stream(4, seed=4)
    state = MergeState.in_memory(base, OPCM(alpha=0.5, zero_diagonal=True))
    state.add(checkpoints[0])
    projected = [i for i in state.infos if i.projected]
    assert projected
    for checkpoint in checkpoints[1:]:
        before = {i.name: state.state_tensors(i.name)["sum"].double() for i in projected}
        state.add(checkpoint)
        for info in projected:
            update = state.state_tensors(info.name)["sum"].double() - before[info.name]
            cosine = float((update * before[info.name]).sum()) / float(
                update.norm() * before[info.name].norm()
            )
            # float32 storage of the sum bounds how orthogonal the stored update can be
            assert abs(cosine) < 1e-5, info.name


def test_one_model_in_gives_that_model_out() -> None:
    base, checkpoints = memory_stream(1, seed=5)
    merged = merge(base, checkpoints)
    for name, tensor in checkpoints[0].items():
        assert merged[name].dtype == tensor.dtype
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-7)


def test_all_zero_task_vectors_give_the_base_without_nan() -> None:
    base, _ = memory_stream(0, seed=6)
    same = {k: v.clone() for k, v in base.items()}
    merged = merge(base, [same, same, same], allow_zero=True)
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name
    # a zero task vector after real ones is fine too
    _, checkpoints = memory_stream(2, seed=6)
    merged = merge(base, [checkpoints[0], same, checkpoints[1]], allow_zero=True)
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_scalars_are_recorded() -> None:
    base, checkpoints = memory_stream(3, seed=7)
    state = MergeState.in_memory(base, "opcm", alpha=0.5)
    for checkpoint in checkpoints:
        state.add(checkpoint)
    scalars = state.scalars
    assert scalars["scale"] > 1.0  # three nearly orthogonal task vectors: the sum is longer
    assert 0.0 < scalars["last_removed_fraction"] < 1.0
    assert scalars["merged_norm"] / scalars["scale"] == pytest.approx(scalars["norm_sum"] / 3)


def test_float32_state_is_an_explicit_lower_precision_option() -> None:
    base, checkpoints = memory_stream(6, seed=1)
    expected = reference_opcm(base, checkpoints, 0.5, True)
    errors = {}
    for state_dtype in ("float64", "float32"):
        merged = merge(base, checkpoints, "opcm", dtype=torch.float64, state_dtype=state_dtype)
        errors[state_dtype] = max(
            relative_error(merged[k] - base[k].double(), v) for k, v in expected.items()
        )
    assert errors["float64"] <= 1e-5
    # float32 storage of the running sum is amplified by the projection at every step
    assert errors["float64"] < errors["float32"] <= 1e-3


def test_ablations_scaling_only_and_projection_only() -> None:
    base, checkpoints = memory_stream(4, seed=8)
    floats = [k for k in base if base[k].is_floating_point()]
    taus = [{k: c[k].double() - base[k].double() for k in floats} for c in checkpoints]
    # nothing projected: task arithmetic rescaled to the mean task-vector distance
    scaling_only = merge(base, checkpoints, "opcm", dtype=torch.float64, project_exclude=".")
    total = {k: sum(t[k] for t in taus) for k in floats}
    mean_norm = sum(global_norm(t) for t in taus) / len(taus)
    for k in floats:
        expected = total[k] * mean_norm / global_norm(total)
        assert relative_error(scaling_only[k] - base[k].double(), expected) <= 1e-6, k
    # projection without the scaling: merged = base + S
    projection_only = merge(base, checkpoints, "opcm", dtype=torch.float64, adaptive_scaling=False)
    reference = reference_opcm(base, checkpoints, 0.5, True)
    running_sum_norm = global_norm({k: projection_only[k] - base[k].double() for k in floats})
    assert running_sum_norm > 1.2 * mean_norm  # unscaled: longer than any single task vector
    ratio = running_sum_norm / global_norm(reference)
    for k in floats:
        got = projection_only[k] - base[k].double()
        assert relative_error(got, reference[k] * ratio) <= 1e-5, k


def test_unavailable_device_is_refused_clearly() -> None:
    base, checkpoints = memory_stream(1, seed=9)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        merge(base, checkpoints, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_gpu_kernels_match_cpu(zero_diagonal) -> None:
    base, checkpoints = memory_stream(5, seed=10)
    method = OPCM(alpha=0.5, zero_diagonal=zero_diagonal)
    on_cpu = merge(base, checkpoints, method, dtype=torch.float64)
    on_gpu = merge(base, checkpoints, method, dtype=torch.float64, device="cuda")
    for name, tensor in on_cpu.items():
        if tensor.is_floating_point():
            delta = on_gpu[name] - base[name].double()
            assert relative_error(delta, tensor - base[name].double()) <= 1e-8, name


# ------------------------------------------------- a float32 state of a low-rank (LoRA) stream


def _low_rank_stream(models: int, rank: int = 3, seed: int = 11):
    """A base of two linear weights and `models` checkpoints that each move it by a rank-`rank`
    update (what merging LoRA adapters into a model gives): the running sum stays rank
    deficient, so a float32 copy of it is the sum plus round-off in every entry."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.mlp.weight": (48, 32), "blocks.0.attn.weight": (32, 32)}
    base = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}

    def update(m: int, n: int) -> torch.Tensor:
        a = torch.randn(m, rank, generator=gen, dtype=torch.float64)
        return 1e-2 * a @ torch.randn(rank, n, generator=gen, dtype=torch.float64)

    return base, [{k: v + update(*v.shape) for k, v in base.items()} for _ in range(models)]


def test_a_float32_state_of_a_low_rank_stream_keeps_its_round_off_out(monkeypatch) -> None:
    import mergestream.methods.opcm as opcm_module
    from mergestream.methods.linalg import above_round_off, round_off_floor
    from mergestream.methods.opcm import decompose_running_sum, project_in_place
    from mergestream.step import engine

    base, checkpoints = _low_rank_stream(4)
    merged = {
        dtype: merge(base, checkpoints, "opcm", dtype=torch.float64, state_dtype=dtype)
        for dtype in ("float64", "float32")
    }
    for name in base:
        exact = merged["float64"][name] - base[name]
        error = float((merged["float32"][name] - base[name] - exact).norm() / exact.norm())
        assert error < 1e-5, name  # float32 precision, not a different projection

    # Streamed by row blocks (large tensors), the floor comes from the blocks' SᵀS: the same.
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 200)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 50)
    folded = []
    fold = opcm_module.fold_projected_rows

    def spy(rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        folded.append(rows.info.name)
        return fold(rows, *args, **kwargs)

    monkeypatch.setattr(opcm_module, "fold_projected_rows", spy)
    streamed = merge(base, checkpoints, "opcm", dtype=torch.float64, state_dtype="float32")
    assert set(folded) == set(base)
    for name in base:
        exact = merged["float64"][name] - base[name]
        error = float((streamed[name] - base[name] - exact).norm() / exact.norm())
        assert error < 1e-5, name

    # Why the floor is needed: a rank-6 sum rounded to float32 has 32 singular values above
    # the float64 rule, and OPCM's diagonal rule would remove τ's parts along the 26 noise ones.
    gen = torch.Generator().manual_seed(3)
    s, tau = (
        torch.randn(48, 6, generator=gen, dtype=torch.float64)
        @ torch.randn(6, 32, generator=gen, dtype=torch.float64)
        for _ in range(2)
    )
    exact = opcm_project(s, tau, 0.5)
    rounded = s.float()
    unfloored = opcm_project(rounded.double(), tau, 0.5)
    decomposed = decompose_running_sum(rounded.double())
    assert decomposed.rank == 32
    floor = round_off_floor(torch.float32, float(rounded.double().norm()))
    floored = above_round_off(decomposed, floor)
    assert floored.rank == 6 and above_round_off(decomposed, 0.0) is decomposed
    projected = tau.clone()
    project_in_place(rounded.double(), projected, 0.5, decomposed=floored)
    assert float((unfloored - exact).norm() / exact.norm()) > 1e-3
    assert float((projected - exact).norm() / exact.norm()) < 1e-5


def test_a_float32_state_steps_the_same_prepared_or_not(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    base, checkpoints = _low_rank_stream(3, seed=12)
    save_file(base, str(tmp_path / "base.safetensors"))
    states = {
        kind: MergeState.create(
            tmp_path / kind, tmp_path / "base.safetensors", "opcm", state_dtype="float32"
        )
        for kind in ("plain", "prepared")
    }
    for i, checkpoint in enumerate(checkpoints):
        path = tmp_path / f"tuned-{i}.safetensors"
        save_file(checkpoint, str(path))
        states["plain"].add(path)
        states["prepared"].prepare()
        states["prepared"].add(path)
    sums = {
        kind: load_file(str(next((tmp_path / kind).glob("gen-*/sum.safetensors"))))
        for kind in states
    }
    assert sums["plain"].keys() == sums["prepared"].keys()
    for name, tensor in sums["plain"].items():
        assert tensor.dtype == torch.float32 or tensor.ndim < 2, name
        assert torch.equal(tensor, sums["prepared"][name]), name
