"""Continual task arithmetic: merged = base + c·Σ τ_i."""

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
    merged_task_vectors,
    task_vector,
    write_models,
)
from safetensors.torch import save_file

from mergestream import ConfigError, MergeState, get_method, merge
from mergestream.cli import main
from mergestream.methods import TaskArithmetic


def reference(base, models, c):
    """Whole-model task arithmetic, written plainly: θ = θ0 + c·Σ (θ_i − θ0)."""
    taus = [task_vector(base, m) for m in models]
    return {n: c * sum(t[n] for t in taus) for n in floating(base)}


@pytest.mark.parametrize("c", [0.3, 0.1, -0.7])
def test_agrees_with_whole_model_reference_at_every_step(c):
    base, models = make_stream()
    state = MergeState.in_memory(base, "task_arithmetic", scaling_factor=c)
    for t, model in enumerate(models, start=1):
        state.add(model)
        assert_close(dict(state.task_vectors()), reference(base, models[:t], c))
    assert_merged_model(state.state_dict(), base, reference(base, models, c))


def test_default_scaling_factor_is_0_3():
    assert TaskArithmetic().config.scaling_factor == 0.3
    base, models = make_stream(3)
    assert_close(merged_task_vectors(base, models, "task_arithmetic"), reference(base, models, 0.3))


def test_order_does_not_matter():
    base, models = make_stream()
    forward = merged_task_vectors(base, models, "task_arithmetic")
    shuffled = merged_task_vectors(base, [models[i] for i in (4, 1, 5, 0, 3, 2)], "task_arithmetic")
    assert_close(shuffled, forward)


def test_one_model_gives_base_plus_scaled_task_vector():
    base, models = make_stream(1)
    merged = merge(base, models, "task_arithmetic", scaling_factor=0.3)
    assert_merged_model(merged, base, {n: 0.3 * v for n, v in task_vector(base, models[0]).items()})
    # c = 1 gives the model back
    assert_merged_model(
        merge(base, models, "task_arithmetic", scaling_factor=1.0),
        base,
        task_vector(base, models[0]),
    )


def test_scalars():
    base, models = make_stream(2)
    state = MergeState.in_memory(base, "task_arithmetic", scaling_factor=0.5)
    for model in models:
        state.add(model)
    expected = reference(base, models, 0.5)
    norm = sum(float(v.square().sum()) for v in expected.values()) ** 0.5
    assert state.scalars["merged_norm"] == pytest.approx(norm, rel=1e-6)
    last = task_vector(base, models[-1])
    assert state.scalars["last_task_norm"] == pytest.approx(
        sum(float(v.square().sum()) for v in last.values()) ** 0.5, rel=1e-12
    )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "task_arithmetic", scaling_factor=0.2)


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    status = check_cli(
        tmp_path, base_dir, paths, "task_arithmetic", {"scaling_factor": "0.1"}, capsys
    )
    assert status["method"]["params"] == {"scaling_factor": 0.1}


def test_listed_with_parameters(capsys):
    check_listed(capsys, "task_arithmetic")


def test_invalid_scaling_factor():
    with pytest.raises(ConfigError, match="scaling_factor"):
        TaskArithmetic(scaling_factor=float("nan"))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average", "magmax"])
def test_unknown_parameter_lists_valid_ones(method, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        get_method(method, bogus=1)
    message = str(err.value)
    assert "unknown parameter 'bogus'" in message
    fields = get_method(method).config.to_dict()
    for name in fields:
        assert name in message
    if not fields:
        assert "(none)" in message
    base = {"w": torch.zeros(2, 2)}
    save_file(base, str(tmp_path / "base.safetensors"))
    code = main(
        [
            "init",
            str(tmp_path / "state"),
            "--base",
            str(tmp_path / "base.safetensors"),
            "--method",
            method,
            "--param",
            "bogus=1",
        ]
    )
    assert code == 2
    assert "valid parameters" in capsys.readouterr().err
