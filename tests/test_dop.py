"""DOP: step 1 the first model unchanged; step t: each linear weight optimised from the average of
the merged and the incoming weight against both task vectors' truncated singular subspaces
(MGDA/EMA-weighted Adam, or the exact minimiser for fixed weights); other tensors averaged."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import (
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
from pairwise_helpers import check_gpu_equals_cpu, check_streaming_keeps_matrices_whole

from mergestream import ConfigError, MergeState, merge
from mergestream.methods import DOP
from mergestream.methods.classify import default_is_linear_weight
from mergestream.methods.dop import min_norm_weight, split_rank

DEFAULTS = {
    "lr": 1e-4,
    "num_steps": 200,
    "mgda": True,
    "alpha": 0.8,
    "ema": True,
    "ema_beta": 0.999,
    "svd_epsilon": 0.99999,
    "svd_proj_space": "uv",
}


def is_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and default_is_linear_weight(name)


def subspace(task: torch.Tensor, epsilon: float):
    """The reference's truncated SVD: full matrices, cut where Σσ reaches `epsilon`."""
    u, s, vh = torch.linalg.svd(task, full_matrices=True)
    ratio = s.cumsum(0) / s.sum()
    k = int(torch.searchsorted(ratio, torch.tensor(epsilon, dtype=ratio.dtype)))
    return u[:, :k], s[:k], vh.T[:, :k]


def loss_of(delta, u, s, v, space):
    loss_u = torch.linalg.matrix_norm(torch.diag(s) @ u.T @ delta, ord="fro") ** 2
    loss_v = torch.linalg.matrix_norm(delta @ v @ torch.diag(s), ord="fro") ** 2
    return {"uv": loss_u + loss_v, "u": loss_u, "v": loss_v}[space]


def optimise_weight(pretrained, finetuned, cfg, log):
    """One weight, as the reference does it, in float64 with autograd and torch's Adam, in weight
    space (W, not W − θ0)."""
    merged = torch.nn.Parameter(sum(finetuned) / len(finetuned))
    subspaces = [subspace(w - pretrained, cfg["svd_epsilon"]) for w in finetuned]
    optimizer = torch.optim.Adam([merged], lr=cfg["lr"])
    ema_weights = [cfg["alpha"], 1 - cfg["alpha"]]
    weights = ema_weights
    for _ in range(cfg["num_steps"]):
        if cfg["mgda"]:
            grads, losses = [], []
            for w, (u, s, v) in zip(finetuned, subspaces, strict=True):
                loss = loss_of(merged - w, u, s, v, cfg["svd_proj_space"])
                optimizer.zero_grad()
                loss.backward()
                losses.append(float(loss.detach()))
                grads.append(merged.grad.detach().clone() / losses[-1])
            v11, v12, v22 = (float((a * b).sum()) for a, b in [(grads[0], grads[0]),
                                                               (grads[0], grads[1]),
                                                               (grads[1], grads[1])])  # fmt: skip
            if v12 >= v11:
                gamma = 0.999
            elif v12 >= v22:
                gamma = 0.001
            else:
                gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
            weights = [gamma, 1 - gamma]
            if cfg["ema"]:
                ema_weights = [
                    cfg["ema_beta"] * e + (1 - cfg["ema_beta"]) * w
                    for e, w in zip(ema_weights, weights, strict=True)
                ]
                weights = ema_weights
        total = sum(
            weight * loss_of(merged - w, u, s, v, cfg["svd_proj_space"])
            for weight, w, (u, s, v) in zip(weights, finetuned, subspaces, strict=True)
        )
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    log.append(weights[0])
    return merged.detach()


def reference(base, models, stored=torch.float32, keep_base=(), **params):
    """DOP over the whole model, written after the reference's loop; m rounded to `stored`
    between steps. Returns (m after every step, mean final weight of the merged model's loss
    per step)."""
    cfg = {**DEFAULTS, **params}
    names = floating(base)
    m, history, weights = None, [], []
    for model in models:
        tau = task_vector(base, model)
        log: list[float] = []
        if m is None:
            new = dict(tau)
        else:
            new = {}
            for n in names:
                pretrained = base[n].double()
                if any(k in n for k in keep_base):
                    new[n] = torch.zeros_like(tau[n])
                elif is_linear(n, base[n]):
                    finetuned = [pretrained + m[n], model[n].double()]
                    new[n] = optimise_weight(pretrained, finetuned, cfg, log) - pretrained
                else:
                    new[n] = (m[n] + tau[n]) / 2
        m = {n: v.to(stored).double() for n, v in new.items()}
        history.append(m)
        weights.append(sum(log) / len(log) if log else None)
    return history, weights


def check_against_reference(base, models, rtol, state_dtype=None, **params):
    stored = torch.float64 if state_dtype == "float64" else torch.float32
    history, weights = reference(base, models, stored, **params)
    state = MergeState.in_memory(base, "dop", state_dtype=state_dtype, **params)
    for step, (model, expected, weight) in enumerate(zip(models, history, weights, strict=True)):
        state.add(model, allow_duplicate=True)
        assert_close(dict(state.task_vectors()), expected, rtol=rtol)
        if step:
            assert state.scalars["last_mean_merged_weight"] == pytest.approx(weight, rel=1e-9)
    assert_merged_model(state.state_dict(), base, history[-1], rtol=rtol)


def test_equals_the_reference_at_its_shipped_defaults():
    base, models = make_stream(3)
    check_against_reference(base, models, rtol=1e-10, state_dtype="float64")


@pytest.mark.parametrize(
    "params",
    [
        {"mgda": False},
        {"ema": False},
        {"svd_proj_space": "u", "svd_epsilon": 0.7},
        {"svd_proj_space": "v", "lr": 1e-3},
        {"alpha": 0.3, "ema_beta": 0.9, "svd_epsilon": 0.5},
    ],
)
def test_equals_the_reference_for_other_settings(params):
    base, models = make_stream(3)
    check_against_reference(base, models, rtol=1e-10, state_dtype="float64", num_steps=20, **params)


def test_equals_the_reference_with_float32_state():
    base, models = make_stream(3)
    check_against_reference(base, models, rtol=1e-6, num_steps=20)


def test_step_one_is_the_first_model_unchanged():
    base, models = make_stream(1)
    assert_merged_model(merge(base, models, "dop"), base, task_vector(base, models[0]))


def test_non_linear_tensors_are_averaged_unless_kept_at_the_base():
    """The reference never merges a parameter held by a non-leaf module (CLIP's
    class_embedding): the first model's value at step 1, the base's afterwards. Here such
    tensors are averaged like every other non-linear tensor; `keep_base` reproduces the
    reference for the tensors it names."""
    base, models = make_stream(3)
    name = "embeddings.position_embeddings.weight"
    taus = [task_vector(base, m)[name] for m in models]
    averaged = merge(base, models, "dop", dtype=torch.float64, num_steps=5)
    expected = ((taus[0].float().double() + taus[1]) / 2).float().double()
    expected = ((expected + taus[2]) / 2).float().double()
    assert torch.allclose(averaged[name] - base[name].double(), expected, rtol=1e-6, atol=1e-9)

    state = MergeState.in_memory(base, "dop", keep_base="position_embeddings", num_steps=5)
    state.add(models[0])
    first = dict(state.task_vectors())
    assert torch.allclose(first[name], taus[0], rtol=1e-6, atol=1e-9)
    for model in models[1:]:
        state.add(model)
        merged = dict(state.task_vectors())
        assert torch.equal(merged[name], torch.zeros_like(merged[name]))
        word = "embeddings.word_embeddings.weight"  # not named: still averaged
        assert float(merged[word].abs().max()) > 0
    history, _ = reference(base, models, keep_base=("position_embeddings",), num_steps=5)
    assert_close(dict(state.task_vectors()), history[-1], rtol=1e-6)


def test_same_inputs_give_the_same_model_bit_for_bit():
    base, models = make_stream(3)
    first = merge(base, models, "dop", num_steps=30)
    second = merge(base, models, "dop", num_steps=30)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_split_rank_keeps_the_ratios_strictly_below_epsilon():
    """Σσ energy, and the singular value that reaches the threshold is not kept (the
    reference's searchsorted); an all-zero spectrum keeps nothing."""
    g = torch.Generator().manual_seed(3)
    sigma = torch.rand(9, generator=g, dtype=torch.float64).sort(descending=True).values
    ratios = (sigma.cumsum(0) / sigma.sum()).tolist()
    for epsilon in [0.0, 0.3, ratios[2], 0.9, 0.99999, 1.0]:
        assert split_rank(sigma, epsilon) == sum(r < epsilon for r in ratios), epsilon
    assert split_rank(torch.zeros(4, dtype=torch.float64), 0.9) == 0


def test_min_norm_weight_is_the_min_norm_point_of_two_vectors():
    g = torch.Generator().manual_seed(4)
    grid = torch.linspace(0.001, 0.999, 99801, dtype=torch.float64)
    for _ in range(20):
        a, b = torch.randn(2, 5, generator=g, dtype=torch.float64)
        gamma = min_norm_weight(float(a @ a), float(a @ b), float(b @ b))
        norms = ((grid[:, None] * a + (1 - grid[:, None]) * b) ** 2).sum(1)
        assert abs(gamma - float(grid[norms.argmin()])) <= 2e-5


def test_a_model_equal_to_the_base_gives_finite_weights():
    """A zero task vector keeps no singular triplet, so its loss and gradient are zero: the
    reference divides 0 by 0 there; here its normalised gradient is zero, MGDA puts γ = 0.001 on
    the merged model and the EMA moves towards it."""
    base, models = make_stream(1)
    state = MergeState.in_memory(base, "dop", state_dtype="float64")
    state.add(models[0])
    state.add(dict(base), allow_zero=True)
    merged = dict(state.task_vectors())
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    ema = 0.8
    for _ in range(200):
        ema = 0.999 * ema + 0.001 * 0.001
    assert state.scalars["last_mean_merged_weight"] == pytest.approx(ema, rel=1e-12)


def kronecker_minimiser(merged, task, alpha, epsilon):
    """The minimiser of α·L₁ + (1 − α)·L₂ nearest to the average, from the dense system
    (P ⊗ I + I ⊗ Qᵀ) vec(X) = vec(C) solved by a pseudo-inverse (row-major vec)."""
    rows, cols = merged.shape
    p = torch.zeros(rows, rows, dtype=torch.float64)
    q = torch.zeros(cols, cols, dtype=torch.float64)
    c = torch.zeros(rows, cols, dtype=torch.float64)
    for w, target in [(alpha, merged), (1 - alpha, task)]:
        u, s, v = subspace(target, epsilon)
        pi, qi = (u * s**2) @ u.T, (v * s**2) @ v.T
        p, q, c = p + w * pi, q + w * qi, c + w * (pi @ target + target @ qi)
    system = torch.kron(p, torch.eye(cols, dtype=torch.float64)) + torch.kron(
        torch.eye(rows, dtype=torch.float64), q.T.contiguous()
    )
    start = (merged + task) / 2
    residual = (c - p @ start - start @ q).reshape(-1)
    step = torch.linalg.pinv(system, rtol=1e-10, hermitian=True) @ residual
    return start + step.reshape(rows, cols)


@pytest.mark.parametrize("epsilon", [0.99999, 0.6])
def test_exact_solver_equals_the_dense_minimiser(epsilon):
    base, models = make_stream(3)
    params = {"solver": "exact", "alpha": 0.7, "svd_epsilon": epsilon}
    state = MergeState.in_memory(base, "dop", state_dtype="float64", **params)
    state.add(models[0])
    previous = dict(state.task_vectors())
    for model in models[1:]:
        state.add(model)
        merged = dict(state.task_vectors())
        tau = task_vector(base, model)
        for name in merged:
            if is_linear(name, base[name]):
                want = kronecker_minimiser(previous[name], tau[name], 0.7, epsilon)
            else:
                want = (previous[name] + tau[name]) / 2
            error = float((merged[name] - want).norm() / want.norm())
            assert error <= 1e-9, (name, error)
        previous = merged


def test_exact_solver_reaches_a_lower_objective_than_adam():
    base, models = make_stream(2)
    name = "encoder.layer.0.intermediate.dense.weight"
    taus = [task_vector(base, m)[name] for m in models]
    subspaces = [subspace(t, 0.99999) for t in taus]

    def objective(x):
        return sum(
            w * float(loss_of(x - t, *sub, "uv"))
            for w, t, sub in zip((0.8, 0.2), taus, subspaces, strict=True)
        )

    exact = merge(base, models, "dop", dtype=torch.float64, state_dtype="float64", solver="exact")
    adam = merge(base, models, "dop", dtype=torch.float64, state_dtype="float64", mgda=False)
    start = objective((taus[0] + taus[1]) / 2)
    at_exact = objective(exact[name] - base[name].double())
    at_adam = objective(adam[name] - base[name].double())
    assert at_exact < at_adam < start


def test_streaming_holds_linear_weights_whole(monkeypatch):
    check_streaming_keeps_matrices_whole(
        monkeypatch,
        "dop",
        {"num_steps": 5},
        held_whole=lambda name, shape: len(shape) == 2 and default_is_linear_weight(name),
    )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "dop", num_steps=20)


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    params = {"num_steps": "10", "solver": "adam", "svd_proj_space": "u"}
    status = check_cli(tmp_path, base_dir, paths, "dop", params, capsys)
    assert status["method"]["params"]["num_steps"] == 10
    assert status["method"]["params"]["svd_proj_space"] == "u"


def test_listed_with_parameters(capsys):
    check_listed(capsys, "dop")


def test_defaults_are_the_shipped_configuration():
    config = DOP().config
    assert {k: getattr(config, k) for k in DEFAULTS} == DEFAULTS
    assert config.solver == "adam" and config.keep_base is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"num_steps": -1}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"alpha": 1.5}, "alpha"),
        ({"ema_beta": -0.1}, "ema_beta"),
        ({"svd_epsilon": 1.01}, "svd_epsilon"),
        ({"svd_proj_space": "w"}, "svd_proj_space"),
        ({"solver": "lbfgs"}, "solver"),
        ({"keep_base": "("}, "keep_base"),
        ({"project_include": "["}, "project_include"),
        ({"mgda": "maybe"}, "mgda"),
    ],
)
def test_bad_parameters_are_refused_by_name(params, message):
    with pytest.raises(ConfigError, match=message):
        DOP(**params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_equals_the_cpu():
    check_gpu_equals_cpu("dop", {"num_steps": 30})
