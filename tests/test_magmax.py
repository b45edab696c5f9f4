"""MagMax: per entry, the task-vector value of largest magnitude (the positive one among equal
magnitudes), times c; the same bits whatever the order of the models."""

from __future__ import annotations

import itertools

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


def batch_reference(base, models, c, state_dtype=torch.float32):
    """The batch form: stack every task vector rounded to the state's precision, take the
    largest |τ| per entry (the positive value among equal magnitudes), scale by c."""
    out = {}
    for n in floating(base):
        stack = torch.stack([(m[n].double() - base[n].double()).to(state_dtype) for m in models])
        magnitude = stack.abs()
        is_max = magnitude == magnitude.max(0, keepdim=True).values
        largest = torch.where(is_max, stack, torch.full_like(stack, -torch.inf)).max(0).values
        out[n] = c * largest.double()
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


def test_equal_magnitudes_keep_the_positive_value_in_either_order():
    """Equal magnitudes, opposite signs (exactly representable values, so the comparison is a true
    tie): the positive value is kept, whichever model came first."""
    base = {"w": torch.tensor([[0.5, -0.25], [1.0, 0.0]]), "n": torch.tensor([3, 4])}
    first = {"w": base["w"] + torch.tensor([[0.125, -0.25], [0.0625, 0.5]]), "n": base["n"]}
    second = {"w": base["w"] + torch.tensor([[-0.125, 0.25], [0.03125, -0.5]]), "n": base["n"]}
    expected = torch.tensor([[0.125, 0.25], [0.0625, 0.5]])
    for order in ([first, second], [second, first]):
        merged = merge(base, order, "magmax", scaling_factor=1.0)
        assert torch.equal(merged["w"] - base["w"], expected)
        assert torch.equal(merged["n"], base["n"])


def near_equal_stream(seed: int) -> tuple[dict, list[dict]]:
    """A float64 base and three models whose task vectors, entry by entry, have magnitudes that
    differ only below float32 precision (relative 1e-10), with mixed signs, plus entries where
    one model is clearly largest."""
    generator = torch.Generator().manual_seed(seed)
    shape = (24, 16)
    base = {"w": torch.randn(shape, generator=generator, dtype=torch.float64)}
    tau = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-2
    signs = [torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0) for _ in "abc"]
    factors = [1.0, 1.0 + 1e-10, 1.0 - 1e-10]
    models = []
    for sign, factor in zip(signs, factors, strict=True):
        models.append({"w": base["w"] + sign.double() * tau * factor})
    # a block of entries where the third model is clearly largest, so the rule is not vacuous
    models[2]["w"][:4] = base["w"][:4] + 3 * tau[:4]
    return base, models


@pytest.mark.parametrize("state_dtype", ["float32", "float64"])
@pytest.mark.parametrize("count", [2, 3])
def test_every_order_gives_the_same_bits(state_dtype, count):
    base, models = near_equal_stream(seed=11)
    models = models[:count]
    results = []
    for order in itertools.permutations(models):
        state = MergeState.in_memory(base, "magmax", state_dtype=state_dtype, scaling_factor=1.0)
        for model in order:
            state.add(model)
        kept = state.state_tensors("w")["max"]
        assert kept.dtype == getattr(torch, state_dtype)
        results.append((kept, state.state_dict()["w"]))
    for kept, merged in results[1:]:
        assert torch.equal(kept, results[0][0])
        assert torch.equal(merged, results[0][1])
    # and it is the batch form of the same rule, computed independently
    expected = batch_reference(base, models, 1.0, getattr(torch, state_dtype))["w"]
    assert torch.equal(results[0][0].double(), expected)


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
    # entries where model 2's rounded value beats model 1's: larger magnitude, or equal and
    # positive against negative
    replaced = 0
    for n in taus[0]:
        second, first = taus[1][n].float(), taus[0][n].float()
        larger = second.abs() > first.abs()
        positive_tie = (second.abs() == first.abs()) & (second > first)
        replaced += int((larger | positive_tie).sum())
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
