"""MagMax: per entry, the task-vector value of largest magnitude (later wins ties), times c."""

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

from mergestream import ConfigError, MergeState, merge
from mergestream.methods import MagMax


def batch_reference(base, models, c):
    """The batch form: stack every task vector, take the largest |τ| per entry (the last model
    among equals), scale by c."""
    out = {}
    for n in floating(base):
        stack = torch.stack([m[n].double() - base[n].double() for m in models])
        magnitude = stack.abs()
        is_max = magnitude == magnitude.max(0, keepdim=True).values
        last = len(models) - 1 - is_max.flip(0).to(torch.int64).argmax(0, keepdim=True)
        out[n] = c * stack.gather(0, last).squeeze(0)
    return out


@pytest.mark.parametrize("c", [0.5, 1.0, 0.25])
def test_equals_the_batch_form_at_every_step(c):
    base, models = make_stream()
    state = MergeState.in_memory(base, "magmax", scaling_factor=c)
    for t, model in enumerate(models, start=1):
        state.add(model)
        assert_close(dict(state.task_vectors()), batch_reference(base, models[:t], c))
    assert_merged_model(state.state_dict(), base, batch_reference(base, models, c))


def test_default_scaling_factor_is_0_5():
    assert MagMax().config.scaling_factor == 0.5


def test_ties_go_to_the_later_model():
    """Equal magnitudes, opposite signs: the later model's value is kept (exactly representable
    values, so the comparison is a true tie)."""
    base = {"w": torch.tensor([[0.5, -0.25], [1.0, 0.0]]), "n": torch.tensor([3, 4])}
    first = {"w": base["w"] + torch.tensor([[0.125, -0.25], [0.0625, 0.5]]), "n": base["n"]}
    second = {"w": base["w"] + torch.tensor([[-0.125, 0.25], [0.03125, -0.5]]), "n": base["n"]}
    merged = merge(base, [first, second], "magmax", scaling_factor=1.0)
    assert torch.equal(merged["w"] - base["w"], torch.tensor([[-0.125, 0.25], [0.0625, -0.5]]))
    assert torch.equal(merged["n"], base["n"])
    merged = merge(base, [second, first], "magmax", scaling_factor=1.0)
    assert torch.equal(merged["w"] - base["w"], torch.tensor([[0.125, -0.25], [0.0625, 0.5]]))


def test_one_model_gives_base_plus_scaled_task_vector():
    base, models = make_stream(1)
    merged = merge(base, models, "magmax")
    assert_merged_model(merged, base, {n: 0.5 * v for n, v in task_vector(base, models[0]).items()})


def test_merging_a_model_again_changes_nothing():
    base, models = make_stream(4)
    once = merged_task_vectors(base, models, "magmax")
    again = merged_task_vectors(base, models + [models[1]], "magmax")
    assert_close(again, once, rtol=0)


def test_scalars():
    base, models = make_stream(2)
    state = MergeState.in_memory(base, "magmax", scaling_factor=0.5)
    state.add(models[0])
    assert state.scalars["last_replaced_fraction"] == 1.0
    state.add(models[1])
    taus = [task_vector(base, m) for m in models]
    replaced = sum(
        int((taus[1][n].abs() >= taus[0][n].float().double().abs()).sum()) for n in taus[0]
    )
    entries = sum(v.numel() for v in taus[0].values())
    assert state.scalars["last_replaced_fraction"] == replaced / entries
    expected = batch_reference(base, models, 0.5)
    norm = sum(float(v.square().sum()) for v in expected.values()) ** 0.5
    assert state.scalars["merged_norm"] == pytest.approx(norm, rel=1e-6)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    base_dir, paths = write_models(tmp_path / "models")
    check_resume(tmp_path, base_dir, paths, "magmax")


def test_command_line(tmp_path, capsys):
    base_dir, paths = write_models(tmp_path / "models", count=3)
    status = check_cli(tmp_path, base_dir, paths, "magmax", {"scaling_factor": "0.8"}, capsys)
    assert status["method"]["params"] == {"scaling_factor": 0.8}


def test_listed_with_parameters(capsys):
    check_listed(capsys, "magmax")


def test_invalid_scaling_factor():
    with pytest.raises(ConfigError, match="scaling_factor"):
        MagMax(scaling_factor=float("inf"))
