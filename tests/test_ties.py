"""Continual TIES: step 1 m = c·τ_1; step t: m ← m + c·TIES(m, τ_t), m = merged − base."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import (
    SHAPES,
    assert_close,
    assert_merged_model,
    check_cli,
    check_listed,
    check_resume,
    floating,
    make_stream,
    task_vector,
    write_models,
)

import mergestream.methods.ties as ties_module
from mergestream import ConfigError, MergeState, merge
from mergestream.methods import Ties, ties_combine
from mergestream.synthetic import make_base


def reference(base, models, scaling_factor=0.3, threshold=20.0, merge_func="sum", scope="model"):
    """Continual TIES on whole flattened vectors, written plainly after the reference's
    topk_values_mask / resolve_sign / disjoint_merge. m is kept as float32 between steps, as the
    state stores it. Returns, per step, (m as float64, kept/changed counts, number of entries)."""
    c = scaling_factor
    names = floating(base)
    groups = [names] if scope == "model" else [[n] for n in names]
    m, history = None, []
    for model in models:
        tau = task_vector(base, model)
        if m is None:
            m = {n: (c * tau[n]).float() for n in names}
            history.append(({n: v.double() for n, v in m.items()}, None))
            continue
        new, counts = {}, torch.zeros(3, dtype=torch.int64)
        for group in groups:
            a = torch.cat([m[n].double().reshape(-1) for n in group])
            b = torch.cat([tau[n].reshape(-1) for n in group])
            v = torch.stack([a, b])
            d = v.shape[1]
            k = d - int(d * (threshold / 100))
            if k > 0:
                kth = v.abs().kthvalue(k, dim=1, keepdim=True).values
            else:
                kth = torch.zeros(2, 1, dtype=v.dtype)
            kept = v.abs() >= kth
            v = v * kept
            sign = torch.sign(v.sum(0))
            sign[sign == 0] = torch.sign(sign.sum())
            agree = torch.where(sign > 0, v > 0, v < 0)
            chosen = v * agree
            if merge_func == "sum":
                combined = chosen.sum(0)
            elif merge_func == "mean":
                combined = chosen.sum(0) / (chosen != 0).sum(0).clamp(min=1)
            else:
                combined = chosen.abs().max(0).values * sign
            counts += torch.stack([kept[0].sum(), kept[1].sum(), agree.any(0).sum()])
            flat = a + c * combined
            offset = 0
            for n in group:
                size = m[n].numel()
                new[n] = flat[offset : offset + size].reshape(m[n].shape).float()
                offset += size
        m = new
        entries = sum(t.numel() for t in m.values())
        history.append(({n: t.double() for n, t in m.items()}, (counts.tolist(), entries)))
    return history


def check_against_reference(base, models, **params):
    history = reference(base, models, **params)
    state = MergeState.in_memory(base, "ties", **params)
    for model, (expected, counts) in zip(models, history, strict=True):
        state.add(model, allow_duplicate=True)
        assert_close(dict(state.task_vectors()), expected)
        if counts is not None:
            (kept_m, kept_t, changed), entries = counts
            s = state.scalars
            # Counts are exact: the same entries are kept and merged as in the reference.
            assert s["last_kept_merged_fraction"] == kept_m / entries
            assert s["last_kept_task_fraction"] == kept_t / entries
            assert s["last_changed_fraction"] == changed / entries
    return state, history


def quantized_stream(count, seed, zero_fraction=0.0):
    """Dyadic weights and task vectors with few distinct magnitudes: many entries tie at the
    trim threshold (sums stay exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: (torch.randint(-64, 64, s, generator=g) / 256).float() for n, s in SHAPES.items()}
    base["embeddings.position_ids"] = torch.arange(8).unsqueeze(0)
    models = []
    for _ in range(count):
        model = dict(base)
        for n, s in SHAPES.items():
            delta = torch.randint(-8, 9, s, generator=g) / 64
            delta = delta * (torch.rand(s, generator=g) >= zero_fraction)
            model[n] = base[n] + delta.float()
        models.append(model)
    return base, models


@pytest.fixture
def small_memory(monkeypatch):
    """Force the multi-pass selection: few entries kept aside, few bits per histogram pass."""
    monkeypatch.setattr(ties_module, "PENDING_LIMIT", 40)
    monkeypatch.setattr(ties_module, "DIGIT_BITS", 5)
    passes = []
    original = ties_module.global_ties_selection

    def spy(tensors, threshold):
        result = original(tensors, threshold)
        passes.append(result[3])
        return result

    monkeypatch.setattr(ties_module, "global_ties_selection", spy)
    return passes


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_global_agrees_with_whole_model_reference(merge_func):
    base, models = make_stream()
    state, history = check_against_reference(
        base, models, scaling_factor=0.3, threshold=20.0, merge_func=merge_func
    )
    assert_merged_model(state.state_dict(), base, history[-1][0])


@pytest.mark.parametrize("threshold", [5.0, 50.0, 99.5, 100.0])
def test_global_agrees_at_other_thresholds(threshold):
    base, models = make_stream(4)
    check_against_reference(base, models, scaling_factor=0.5, threshold=threshold)


def test_global_is_exact_when_the_selection_takes_many_passes(small_memory):
    base, models = make_stream(4)
    check_against_reference(base, models, scaling_factor=0.3, threshold=20.0)
    assert len(small_memory) == 3 and min(small_memory) > 2


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("limited", [False, True])
def test_global_is_exact_with_many_equal_magnitudes(zero_fraction, limited, request):
    if limited:
        request.getfixturevalue("small_memory")
    base, models = quantized_stream(4, seed=11, zero_fraction=zero_fraction)
    check_against_reference(base, models, scaling_factor=0.3, threshold=20.0)


@pytest.mark.parametrize(("limit", "digits"), [(1 << 21, 16), (50, 16), (50, 4), (7, 3), (0, 5)])
@pytest.mark.parametrize("quantized", [False, True])
def test_selection_finds_the_exact_kth_magnitudes(monkeypatch, limit, digits, quantized):
    monkeypatch.setattr(ties_module, "PENDING_LIMIT", limit)
    monkeypatch.setattr(ties_module, "DIGIT_BITS", digits)
    g = torch.Generator().manual_seed(limit + digits)
    ms, taus = [], []
    for size in (1, 300, 7, 129, 64, 2):
        m = torch.randn(size, generator=g).float()
        tau = torch.randn(size, generator=g, dtype=torch.float64) * 1e-3
        if quantized:
            m, tau = (m * 4).round() / 4, (tau * 4e3).round() / 4e3
        ms.append(m)
        taus.append(tau)
    a, b = torch.cat(ms).double(), torch.cat(taus)
    for threshold in (20.0, 0.5, 50.0, 99.9, 100.0):
        got = ties_module.global_ties_selection(lambda: iter(zip(ms, taus, strict=True)), threshold)
        d = a.numel()
        k = d - int(d * (threshold / 100))
        t_a = float(a.abs().kthvalue(k).values) if k > 0 else 0.0
        t_b = float(b.abs().kthvalue(k).values) if k > 0 else 0.0
        signs = torch.sign(torch.where(a.abs() >= t_a, a, 0) + torch.where(b.abs() >= t_b, b, 0))
        assert got[:3] == (t_a, t_b, float(torch.sign(signs.sum())))


def test_tensor_scope_agrees_with_per_tensor_reference():
    base, models = make_stream()
    check_against_reference(base, models, scaling_factor=0.3, threshold=20.0, scope="tensor")
    base, models = quantized_stream(3, seed=5, zero_fraction=0.3)
    check_against_reference(base, models, scaling_factor=0.4, threshold=30.0, scope="tensor")


def test_tensor_scope_needs_no_preparation_pass():
    def no_pass():
        raise AssertionError("a preparation pass was made")

    assert Ties(scope="tensor").prepare_step(2, {}, no_pass) == {}
    assert Ties().prepare_step(1, {}, no_pass) == {}


def test_one_model_gives_base_plus_scaled_task_vector():
    base, models = make_stream(1)
    for scope in ("model", "tensor"):
        merged = merge(base, models, "ties", scaling_factor=0.3, scope=scope)
        assert_merged_model(
            merged, base, {n: 0.3 * v for n, v in task_vector(base, models[0]).items()}
        )


def test_worked_example():
    """Four entries, everything kept (thresholds 0), majority sign +1."""
    m = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float32)
    tau = torch.tensor([3.0, 1.0, -0.5, 0.0], dtype=torch.float64)
    for func, expected in (
        ("sum", [4.0, -2.0, 0.5, 0.0]),  # entry 3: sum 0 -> majority +1 -> the positive 0.5
        ("mean", [2.0, -2.0, 0.5, 0.0]),
        ("max", [3.0, -2.0, 0.5, 0.0]),
    ):
        out, counts = ties_combine(m, tau, 0.0, 0.0, 1.0, func)
        assert out.tolist() == expected
        assert counts == {"kept_merged": 4, "kept_task": 4, "changed": 3}
    # Trimming: |x| >= threshold survives (ties at the threshold are kept).
    out, counts = ties_combine(m, tau, 1.0, 1.0, 1.0, "sum")
    assert out.tolist() == [4.0, -2.0, 0.0, 0.0]
    assert counts == {"kept_merged": 2, "kept_task": 2, "changed": 2}


def test_zero_majority_keeps_negative_values_like_the_reference():
    """Where the elected sign and the majority are both zero, torch.where(sign > 0, v > 0, v < 0)
    in the reference keeps the negative entries."""
    m = torch.tensor([2.0, -1.0], dtype=torch.float32)
    tau = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    out, _ = ties_combine(m, tau, 0.0, 0.0, 0.0, "sum")
    assert out.tolist() == [-2.0, -1.0]


def test_workers_do_not_change_the_result(tmp_path):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    states = []
    for workers in (1, 2):
        state = MergeState.create(tmp_path / f"state-{workers}", base_dir, "ties")
        for path in paths:
            state.add(path, workers=workers)
        states.append(dict(state.task_vectors()))
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name])


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "ties", threshold=30.0)


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    params = {"scaling_factor": "0.4", "threshold": "25", "scope": "model", "merge_func": "mean"}
    status = check_cli(tmp_path, base_dir, paths, "ties", params, capsys)
    assert status["method"]["params"] == {
        "scaling_factor": 0.4,
        "threshold": 25.0,
        "scope": "model",
        "merge_func": "mean",
    }
    assert 0 < status["scalars"]["last_kept_task_fraction"] < 1


def test_listed_with_parameters(capsys):
    check_listed(capsys, "ties")


def test_defaults():
    cfg = Ties().config
    assert (cfg.scaling_factor, cfg.threshold, cfg.scope, cfg.merge_func) == (
        0.3,
        20.0,
        "model",
        "sum",
    )


@pytest.mark.parametrize(
    "params",
    [
        {"threshold": 0},
        {"threshold": 150},
        {"threshold": float("nan")},
        {"scope": "layer"},
        {"merge_func": "median"},
        {"scaling_factor": float("nan")},
    ],
)
def test_invalid_parameters(params):
    with pytest.raises(ConfigError):
        Ties(**params)


def test_float16_base():
    """A half-precision base: task vectors and state still float64/float32; the merged model
    comes back in the base's dtype."""
    base = make_base(SHAPES, seed=3, dtype=torch.float16)
    _, models32 = make_stream(3, seed=3)
    models = [
        {n: t.to(base[n].dtype) if t.is_floating_point() else t for n, t in m.items()}
        for m in models32
    ]
    state, history = check_against_reference(base, models, scaling_factor=0.3)
    merged = state.state_dict()
    assert all(merged[n].dtype == torch.float16 for n in floating(base))
