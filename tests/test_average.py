"""Running average: merged = the mean of the models = base + mean τ_i."""

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

from mergestream import MergeState, merge
from mergestream.methods import Average


def reference(base, models):
    """Whole-model mean of the models, minus the base."""
    return {
        n: torch.stack([m[n].double() for m in models]).mean(0) - base[n].double()
        for n in floating(base)
    }


def test_agrees_with_whole_model_mean_at_every_step():
    base, models = make_stream()
    state = MergeState.in_memory(base, "average")
    for t, model in enumerate(models, start=1):
        state.add(model)
        assert_close(dict(state.task_vectors()), reference(base, models[:t]))
    assert_merged_model(state.state_dict(), base, reference(base, models))


def test_matches_the_running_rule_on_weights():
    """θ ← ((t−1)·θ + θ_t)/t applied to the weights themselves gives the same model."""
    base, models = make_stream()
    theta = {n: models[0][n].double() for n in floating(base)}
    for t, model in enumerate(models[1:], start=2):
        theta = {n: ((t - 1) * theta[n] + model[n].double()) / t for n in theta}
    expected = {n: theta[n] - base[n].double() for n in theta}
    assert_close(merged_task_vectors(base, models, "average"), expected)


def test_order_does_not_matter():
    base, models = make_stream()
    forward = merged_task_vectors(base, models, "average")
    shuffled = merged_task_vectors(base, [models[i] for i in (3, 5, 0, 2, 4, 1)], "average")
    assert_close(shuffled, forward)


def test_one_model_gives_that_model():
    base, models = make_stream(1)
    merged = merge(base, models, "average")
    assert_merged_model(merged, base, task_vector(base, models[0]))
    for name in floating(base):
        torch.testing.assert_close(merged[name], models[0][name], rtol=0, atol=1e-7)


def test_same_model_twice_is_that_model():
    base, models = make_stream(1)
    assert_close(merged_task_vectors(base, models * 2, "average"), task_vector(base, models[0]))


def test_has_no_parameters():
    assert Average().config.to_dict() == {}


def test_scalars():
    base, models = make_stream(3)
    state = MergeState.in_memory(base, "average")
    for model in models:
        state.add(model)
    expected = reference(base, models)
    norm = sum(float(v.square().sum()) for v in expected.values()) ** 0.5
    assert state.scalars["merged_norm"] == pytest.approx(norm, rel=1e-6)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "average")


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    status = check_cli(tmp_path, base_dir, paths, "average", {}, capsys)
    assert status["method"]["params"] == {}


def test_listed(capsys):
    check_listed(capsys, "average")
