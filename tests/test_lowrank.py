"""The low-rank path (methods/lowrank.py) against the dense kernels of methods/: every step on
factors must give the dense step's result to float64 round-off, keep k at the true rank, and
never form an m×n matrix."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mergestream.io.lora import low_rank_delta
from mergestream.methods import OPCM, Average, IsoC, TaskArithmetic, TsvM, opcm_project
from mergestream.methods import lowrank as lr
from mergestream.methods.base import TensorInfo
from mergestream.methods.linalg import rank_rtol
from mergestream.publish.export_lora import truncated_factors

F64 = torch.float64
TOL = 1e-10  # the promise: the dense result to float64 round-off, per tensor
SHAPES = [(12, 20), (20, 12), (16, 16)]


def adapter(shape, rank, g, scale=0.5, zero_column=None) -> lr.Factors:
    """A random LoRA task vector scale·B·A of the given rank (B's column `zero_column` zeroed)."""
    m, n = shape
    b = torch.randn(m, rank, generator=g, dtype=F64)
    a = torch.randn(rank, n, generator=g, dtype=F64)
    if zero_column is not None:
        b[:, zero_column] = 0
    return lr.Factors.from_lora(b, a, scale)


def rel(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """‖got − expected‖ / ‖expected‖ (or / `scale` where the expected value may be ~0)."""
    denominator = scale if scale is not None else float(expected.norm())
    return float((got - expected).norm()) / max(denominator, 1e-300)


def true_rank(x: torch.Tensor) -> int:
    """The rank of a dense matrix under the rank rule, from its full SVD."""
    sigma = torch.linalg.svdvals(x)
    return int((sigma > rank_rtol(*x.shape) * sigma[0]).sum()) if sigma.numel() else 0


def check_canonical(s: lr.ThinSVD) -> None:
    """Orthonormal bases, positive descending σ, no NaN."""
    eye = torch.eye(s.k, dtype=F64)
    assert torch.isfinite(s.u).all() and torch.isfinite(s.v).all()
    assert torch.allclose(s.u.mT @ s.u, eye, atol=1e-12)
    assert torch.allclose(s.v.mT @ s.v, eye, atol=1e-12)
    assert bool((s.sigma > 0).all()) and bool((s.sigma[:-1] >= s.sigma[1:]).all())


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


# ----------------------------------------------------------------------------- decompositions


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", [(3,), (2, 5), (7, 9, 6)])  # k up to and past min(m, n)
def test_thin_svd_is_the_dense_svd(shape, ranks):
    g = torch.Generator().manual_seed(sum(shape) + len(ranks))
    parts = [adapter(shape, r, g) for r in ranks]
    factors = lr.Factors(
        torch.cat([p.left for p in parts], 1), torch.cat([p.right for p in parts], 1)
    )
    dense = lr.densify(factors)
    expected_rank = min(sum(ranks), *shape)
    s = lr.thin_svd(factors)
    check_canonical(s)
    assert s.k == expected_rank == true_rank(dense)
    assert rel(s.sigma, torch.linalg.svdvals(dense)[: s.k]) < TOL
    assert rel(lr.densify(s), dense) < TOL
    # a larger rtol drops the small triplets, as the dense rule would with that tolerance
    cut = lr.thin_svd(factors, rtol=float(s.sigma[1] / s.sigma[0]))
    assert cut.k == 1 and rel(lr.densify(cut), lr.densify(s.truncated(1))) < TOL


def test_compress_keeps_the_true_rank_and_never_makes_nan():
    g = torch.Generator().manual_seed(3)
    shape = (14, 9)
    deficient = adapter(shape, 4, g, zero_column=2)  # B with a zero column: rank 3
    twice = lr.Factors(
        torch.cat([deficient.left, deficient.left], 1),
        torch.cat([deficient.right, deficient.right], 1),
    )
    for factors, rank in [(deficient, 3), (twice, 3), (lr.Factors.zeros(shape), 0)]:
        s = lr.compress(factors)
        check_canonical(s)
        assert s.k == rank == true_rank(lr.densify(factors))
        assert rel(lr.densify(s), lr.densify(factors), scale=1.0) < TOL
    zero = lr.Factors(torch.zeros(14, 5, dtype=F64), torch.randn(9, 5, generator=g, dtype=F64))
    assert lr.compress(zero).k == 0


def test_factors_from_an_adapter_are_its_task_vector():
    g = torch.Generator().manual_seed(4)
    b = torch.randn(10, 3, generator=g, dtype=torch.float32)
    a = torch.randn(3, 7, generator=g, dtype=torch.float32)
    for transpose in (False, True):
        factors = lr.Factors.from_lora(b, a, 0.75, transpose)
        expected = low_rank_delta(a.to(F64), b.to(F64), 0.75, transpose)
        assert factors.shape == tuple(expected.shape)
        assert rel(lr.densify(factors), expected) < 1e-15
    with pytest.raises(ValueError, match="B .out x r. and A .r x in."):
        lr.Factors.from_lora(b, a.mT)
    with pytest.raises(ValueError, match="float64"):
        lr.Factors(b, a.mT)


def test_norms_and_inner_products_from_factors():
    g = torch.Generator().manual_seed(5)
    x, y = adapter((15, 11), 4, g), adapter((15, 11), 6, g)
    dx, dy = lr.densify(x), lr.densify(y)
    assert math.isclose(lr.squared_norm(x), float(dx.square().sum()), rel_tol=TOL)
    assert math.isclose(lr.squared_norm(lr.compress(y)), float(dy.square().sum()), rel_tol=TOL)
    assert math.isclose(lr.inner(x, y), float((dx * dy).sum()), rel_tol=TOL)
    # cancellation: x + (−x + small) keeps the small part's norm to round-off of ‖x‖
    small = lr.scaled(y, 1e-6)
    near = lr.Factors(
        torch.cat([x.left, -x.left, small.left], 1), torch.cat([x.right, x.right, small.right], 1)
    )
    assert math.isclose(lr.squared_norm(near), lr.squared_norm(small), rel_tol=1e-8)
    assert lr.squared_norm(lr.Factors.zeros((3, 4))) == 0.0


def test_to_lora_exact_and_truncated():
    g = torch.Generator().manual_seed(6)
    x = lr.add(adapter((18, 13), 3, g), adapter((18, 13), 4, g))
    b, a = lr.to_lora(x)
    assert b.shape == (18, 7) and a.shape == (7, 13)
    assert rel(b @ a, lr.densify(x)) < TOL
    for rank in (2, 5, 30):
        b, a = lr.to_lora(x, rank)
        expected = truncated_factors(lr.densify(x), rank=rank)
        assert b.shape[1] == min(rank, 7)
        assert rel(b @ a, expected.b @ expected.a) < TOL
        assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-12)  # balanced
    with pytest.raises(ValueError, match="at least 1"):
        lr.to_lora(x, 0)
    b, a = lr.to_lora(lr.Factors.zeros((5, 4)))
    assert b.shape == (5, 0) and a.shape == (0, 4)


# ----------------------------------------------------------------------------- OPCM


def dense_opcm_stream(taus, alpha, zero_diagonal, projected=True):
    """Every step of OPCM.update (the dense kernel) on one matrix, float64 state."""
    method = OPCM(alpha=alpha, zero_diagonal=zero_diagonal)
    info = TensorInfo("w", tuple(taus[0].shape), F64, projected)
    state, out = None, []
    for step, tau in enumerate(taus, 1):
        # private copies, as the engine hands them over: the kernel works in place
        given = {"sum": state.clone()} if state is not None else {}
        update = method.update(info, step, given, tau.clone(), {})
        state = update.state["sum"]
        projected_tau = (
            opcm_project(out[-1][0], tau, alpha, zero_diagonal) if step > 1 and projected else tau
        )
        out.append((state, update.partials, projected_tau))
    return out


def check_opcm_stream(factors, alpha, zero_diagonal, projected=True):
    taus = [lr.densify(f) for f in factors]
    dense = dense_opcm_stream(taus, alpha, zero_diagonal, projected)
    running = None
    for step, (f, tau, (dense_sum, partials, dense_projected)) in enumerate(
        zip(factors, taus, dense, strict=True), 1
    ):
        result = lr.opcm_step(step, running, f, alpha, zero_diagonal, projected)
        running = result.sum
        check_canonical(running)
        assert running.k == true_rank(dense_sum), step
        assert rel(lr.densify(running), dense_sum) < TOL, step
        tau_sq = float(tau.square().sum())
        assert rel(lr.densify(result.projected()), dense_projected, math.sqrt(tau_sq)) < TOL
        for key, value in result.partials().items():
            assert math.isclose(value, partials[key], rel_tol=TOL, abs_tol=TOL * tau_sq), key
        assert math.isclose(
            result.projected_norm_sq, float(dense_projected.square().sum()), abs_tol=TOL * tau_sq
        )
    return running


@pytest.mark.parametrize("zero_diagonal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_opcm_stream_equals_the_dense_kernel(zero_diagonal, shape, alpha):
    g = torch.Generator().manual_seed(10 + sum(shape))
    factors = [adapter(shape, r, g, scale=s) for r, s in [(2, 1.0), (3, 0.7), (1, 2.0), (4, 0.3)]]
    final = check_opcm_stream(factors, alpha, zero_diagonal)
    assert final.k == 10


@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_opcm_stream_reaching_full_rank(zero_diagonal):
    """Ranks 4 + 5 + 6 + 3 on a 10 x 14 matrix: k reaches min(m, n) = 10 and stays there."""
    g = torch.Generator().manual_seed(11)
    factors = [adapter((10, 14), r, g) for r in (4, 5, 6, 3)]
    assert check_opcm_stream(factors, 0.5, zero_diagonal).k == 10


def test_opcm_of_a_tensor_that_is_not_projected():
    g = torch.Generator().manual_seed(12)
    factors = [adapter((9, 13), r, g) for r in (2, 3, 2)]
    check_opcm_stream(factors, 0.5, True, projected=False)


@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_opcm_with_a_rank_deficient_and_a_repeated_adapter(zero_diagonal):
    g = torch.Generator().manual_seed(13)
    first = adapter((16, 12), 3, g)
    deficient = adapter((16, 12), 4, g, zero_column=1)
    factors = [first, deficient, first, adapter((16, 12), 2, g), deficient]
    final = check_opcm_stream(factors, 0.5, zero_diagonal)
    assert final.k <= 3 + 3 + 2


def test_opcm_on_a_zero_sum_and_a_zero_adapter():
    g = torch.Generator().manual_seed(14)
    zero = lr.Factors.zeros((8, 11))
    # S = 0 at step 2 (nothing removed), then a zero adapter on a nonzero sum
    check_opcm_stream([zero, adapter((8, 11), 3, g), zero, adapter((8, 11), 2, g)], 0.5, True)


def test_opcm_step_refuses_mismatched_shapes():
    g = torch.Generator().manual_seed(15)
    with pytest.raises(ValueError, match="one shape"):
        lr.opcm_step(2, adapter((5, 6), 2, g), adapter((6, 5), 2, g), 0.5)


# ----------------------------------------------------------------------------- other methods


def dense_stream(method, taus, state_name):
    method.state_dtype = F64
    info = TensorInfo("w", tuple(taus[0].shape), F64, True)
    state, out = None, []
    for step, tau in enumerate(taus, 1):
        given = {state_name: state.clone()} if state is not None else {}
        update = method.update(info, step, given, tau.clone(), {})
        state = update.state[state_name]
        out.append((state, update.partials))
    return out


def check_stream(factors, method, state_name, step_fn):
    taus = [lr.densify(f) for f in factors]
    running = None
    for step, (f, tau, (expected, partials)) in enumerate(
        zip(factors, taus, dense_stream(method, taus, state_name), strict=True), 1
    ):
        running, got = step_fn(step, running, f)
        check_canonical(running)
        assert running.k == true_rank(expected), step
        assert rel(lr.densify(running), expected) < TOL, step
        assert got.keys() == partials.keys()
        for key, value in got.items():
            assert math.isclose(value, partials[key], rel_tol=TOL), key
        assert math.isclose(partials["task_norm_sq"], float(tau.square().sum()), rel_tol=1e-12)


def stream_of_adapters(shape, seed, repeat=True):
    g = torch.Generator().manual_seed(seed)
    factors = [adapter(shape, r, g) for r in (3, 2, 4)]
    factors.append(adapter(shape, 3, g, zero_column=0))
    if repeat:
        factors.append(factors[1])
    return factors


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_and_average_equal_the_dense_kernels(shape):
    factors = stream_of_adapters(shape, 20)
    check_stream(factors, TaskArithmetic(), "sum", lr.task_arithmetic_step)
    check_stream(factors, Average(), "mean", lr.average_step)


@pytest.mark.parametrize("shape", [*SHAPES, (7, 30)])
@pytest.mark.parametrize("c", [1.0, 0.7])
def test_iso_c_and_tsv_m_equal_the_dense_kernels(shape, c):
    factors = stream_of_adapters(shape, 30)
    for method, combine in [(IsoC, lr.iso_c_combine), (TsvM, lr.tsv_m_combine)]:
        check_stream(
            factors,
            method(scaling_factor=c),
            "merged",
            lambda step, merged, f, combine=combine: lr.pairwise_step(step, merged, f, c, combine),
        )


def test_tsv_m_truncates_to_half_the_smaller_side():
    """Ranks past min(m, n)/2 = 3: both sides are cut to their top 3 triplets, as densely."""
    g = torch.Generator().manual_seed(31)
    a, b = adapter((6, 9), 5, g), adapter((6, 9), 4, g)
    got = lr.tsv_m_combine(a, b)
    expected = TsvM.combine(lr.densify(a), lr.densify(b))
    assert rel(lr.densify(got), expected) < TOL and got.k == true_rank(expected)


def test_pairwise_combine_of_an_input_with_itself():
    g = torch.Generator().manual_seed(32)
    x = adapter((12, 10), 3, g)
    assert rel(lr.densify(lr.tsv_m_combine(x, x)), lr.densify(x)) < TOL  # TSV(m, m) = m
    iso = lr.iso_c_combine(x, x)
    assert iso.k == 3 and rel(iso.sigma, lr.thin_svd(x).sigma.mean().expand(3) * 2) < TOL


# ----------------------------------------------------------------------------- memory


def test_no_step_forms_an_m_by_n_matrix():
    """Every tensor any operation returns is far below m·n (here m·n = 60 000, k <= 12)."""
    g = torch.Generator().manual_seed(40)
    shape = (200, 300)
    factors = [adapter(shape, r, g) for r in (3, 4, 5)]
    with LargestTensor() as watch:
        opcm, ta, mean, iso, tsv = None, None, None, None, None
        for step, f in enumerate(factors, 1):
            opcm = lr.opcm_step(step, opcm, f, 0.5).sum
            ta, _ = lr.task_arithmetic_step(step, ta, f)
            mean, _ = lr.average_step(step, mean, f)
            iso, _ = lr.pairwise_step(step, iso, f, 1.0, lr.iso_c_combine)
            tsv, _ = lr.pairwise_step(step, tsv, f, 1.0, lr.tsv_m_combine)
        lr.to_lora(opcm, 4)
        lr.squared_norm(lr.Factors(opcm.left, opcm.right))
    assert 0 < watch.largest <= 300 * 24  # the largest: an n×(k + r) basis
    with LargestTensor() as watch:
        lr.densify(opcm)
    assert watch.largest == 200 * 300  # the one function that forms it


# ----------------------------------------------------------------------------- cost model


def test_cost_model_and_switch_rule():
    small, large = lr.opcm_step_cost(4096, 4096, 16), lr.opcm_step_cost(4096, 4096, 4096)
    assert small.dense_bytes == large.dense_bytes == 8 * 4096 * 4096
    assert small.factored_bytes == 8 * (8192 * 16 + 16)
    assert small.factored_flops < small.dense_flops / 100
    assert large.factored_flops > small.factored_flops * 1000
    edge = int(lr.DENSE_RANK_FRACTION * 4096)
    assert lr.factored_pays((4096, 11008), edge) and not lr.factored_pays((11008, 4096), edge + 1)
