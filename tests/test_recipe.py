"""`mergestream run recipe.yaml`: a whole merge from one file, stored in the state and the model
card, safe to run again; compared with an in-memory merge of the same checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES, tree_digest
from safetensors.torch import load_file, save_file

from mergestream import MergeState, MergestreamError, merge
from mergestream.cli import main
from mergestream.errors import ConfigError
from mergestream.recipe import run_recipe
from mergestream.synthetic import write_stream
from mergestream.watch.commands import config_options

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))

RECIPE = """\
base: zoo/base
method: task_arithmetic
params:
  scaling_factor: 0.4
state: merged.state
checkpoints:
  - zoo/model-03
  - zoo/model-0[12]
export:
  out: merged
  dtype: bfloat16
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_stream(tmp_path / "zoo", models=3, seed=9, shapes=TINY_SHAPES)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def test_run_merges_in_the_recipes_order_and_exports(project):
    result = subprocess.run(
        [sys.executable, "-m", "mergestream", "run", str(project / "recipe.yaml"), "--quiet"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    zoo = project / "zoo"
    order = [zoo / "model-03", zoo / "model-01", zoo / "model-02"]  # the glob in name order
    expected = merge(
        zoo / "base", order, "task_arithmetic", scaling_factor=0.4, dtype=torch.bfloat16
    )
    exported = load_file(str(project / "merged" / "model.safetensors"))
    assert set(exported) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    state = MergeState.open(project / "merged.state")
    assert [Path(e["path"]) for e in state.ledger] == [p.resolve() for p in order]
    assert (project / "merged.state" / "recipe.yaml").read_text() == RECIPE
    card = (project / "merged" / "README.md").read_text()
    assert "## Recipe" in card and RECIPE.strip() in card


def test_running_again_adds_nothing_and_a_longer_list_continues(project):
    run_recipe(project / "recipe.yaml", quiet=True)
    state_dir = project / "merged.state"
    ledger = MergeState.open(state_dir).ledger
    run_recipe(project / "recipe.yaml", quiet=True)
    assert MergeState.open(state_dir).ledger == ledger
    # The card gets the recipe once per export, not appended again and again.
    assert (project / "merged" / "README.md").read_text().count("## Recipe") == 1


def test_a_recipe_that_contradicts_the_state_is_refused(project):
    run_recipe(project / "recipe.yaml", quiet=True)
    reordered = RECIPE.replace("  - zoo/model-03\n  - zoo/model-0[12]", "  - zoo/model-0*")
    (project / "recipe.yaml").write_text(reordered)
    with pytest.raises(MergestreamError, match="not the start of the recipe"):
        run_recipe(project / "recipe.yaml", quiet=True)
    (project / "recipe.yaml").write_text(
        RECIPE.replace("scaling_factor: 0.4", "scaling_factor: 0.5")
    )
    with pytest.raises(MergestreamError, match="use a new state"):
        run_recipe(project / "recipe.yaml", quiet=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("checkpoints:", "checkpoint:"), "unknown key 'checkpoint'"),
        (("zoo/model-03", "zoo/model-99"), "model-99"),
        (("zoo/model-0[12]", "zoo/nothing-*"), "matches nothing"),
        (("dtype: bfloat16", "dtype: int8"), "dtype"),
    ],
)
def test_bad_recipes_are_refused_before_anything_is_written(project, change, message):
    (project / "recipe.yaml").write_text(RECIPE.replace(*change))
    with pytest.raises(ConfigError, match=message):
        run_recipe(project / "recipe.yaml", quiet=True)
    assert not (project / "merged.state").exists()


# --------------------------------------------------------------------------------------
# The export target is checked before the first step


def _run_flags(capsys) -> set[str]:
    """The long options `mergestream run` accepts, from its help."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    return set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))


def _cli_error(argv: list[str], capsys) -> str:
    """stderr of a `mergestream` command that must fail with status 2, as one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergestream: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("out", "prepare", "reason"),
    [
        ("merged", "user-folder", "is not empty (notes.txt)"),
        ("zoo/base", None, "the base model's directory"),
        ("merged.state", None, "the state directory"),
        ("merged.state/inside", None, "into the state directory"),
        (".", None, "the state directory"),  # the recipe's own folder holds the state
    ],
)
def test_an_export_target_export_would_refuse_stops_the_run_before_anything_is_written(
    project, capsys, out, prepare, reason
):
    if prepare == "user-folder":
        (project / out).mkdir()
        (project / out / "notes.txt").write_text("mine")
    recipe = project / "recipe.yaml"
    recipe.write_text(RECIPE.replace("  out: merged", f"  out: {out}"))
    before = tree_digest(project)
    err = _cli_error(["run", str(recipe), "--quiet"], capsys)
    # Named: the recipe and the line of its export, why, and that nothing was merged.
    assert err.startswith(
        f"mergestream: error: {recipe}:9: the export target is refused, so nothing was merged: "
    ), err
    assert reason in err
    # Every flag the message suggests is one `run` takes.
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= _run_flags(capsys)
    assert tree_digest(project) == before  # no state, no export, nothing else


def test_a_continued_run_checks_its_export_before_merging_more(project):
    (project / "recipe.yaml").write_text(RECIPE.replace("  - zoo/model-0[12]\n", ""))
    run_recipe(project / "recipe.yaml", quiet=True)
    state_dir = project / "merged.state"
    ledger = MergeState.open(state_dir).ledger
    (project / "recipe.yaml").write_text(RECIPE.replace("  out: merged", "  out: zoo/base"))
    with pytest.raises(MergestreamError, match="so nothing was merged: .*the base model's"):
        run_recipe(project / "recipe.yaml", quiet=True)
    assert MergeState.open(state_dir).ledger == ledger


@pytest.mark.parametrize("how", ["recipe", "flag"])
def test_overwrite_in_the_recipe_or_as_a_flag_exports_into_a_user_folder(project, capsys, how):
    (project / "merged").mkdir()
    (project / "merged" / "notes.txt").write_text("mine")
    recipe = project / "recipe.yaml"
    argv = ["run", str(recipe), "--quiet"]
    if how == "recipe":
        recipe.write_text(RECIPE + "  overwrite: true\n")
    else:
        argv.append("--overwrite")
    assert main(argv) == 0, capsys.readouterr().err
    assert (project / "merged" / "notes.txt").read_text() == "mine"  # kept
    assert MergeState.open(project / "merged.state").step == 3
    exported = load_file(str(project / "merged" / "model.safetensors"))
    assert set(exported) == set(load_file(str(project / "zoo" / "base" / "model.safetensors")))


def test_overwrite_without_an_export_is_refused(project):
    recipe = project / "recipe.yaml"
    recipe.write_text(RECIPE[: RECIPE.index("export:")])
    with pytest.raises(ConfigError, match=f"{re.escape(str(recipe))}: --overwrite applies"):
        run_recipe(recipe, quiet=True, options={"overwrite": True})


# --------------------------------------------------------------------------------------
# Every recipe error names the file; keys given twice


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("scaling_factor: 0.4", "scaling_factr: 0.4"), ":4: unknown parameter 'scaling_factr'"),
        (("method: task_arithmetic", "method: averaging"), ":2: unknown method 'averaging'"),
        (
            (
                "method: task_arithmetic\nparams:\n  scaling_factor: 0.4",
                "method: opcm\nparams: {alpah: 0.5}",
            ),
            ":3: unknown parameter 'alpah'",
        ),
        (("scaling_factor: 0.4", "scaling_factor: lots"), ":3: scaling_factor: expected float"),
        (("state: merged.state", "state: merged.state\nstate_dtype: float8"), ":6: state_dtype"),
        (("state: merged.state", "state: merged.state\nmissing: maybe"), ":6: missing must be"),
        (("state: merged.state", "state: merged.state\nforce_base: yes please"), ":6: force_b"),
        (
            ("state: merged.state", "state: merged.state\nmethod: opcm"),
            ":6: 'method' is given twice (first on line 2)",
        ),
        (
            ("  dtype: bfloat16", "  dtype: bfloat16\n  dtype: float32"),
            ":12: 'dtype' is given twice (first on line 11)",
        ),
        (("  dtype: bfloat16", "  overwrite: 1"), ":11: overwrite must be true or false"),
        (("  dtype: bfloat16", "  max_shard_size: lots"), ":11: max_shard_size: expected"),
        (("  dtype: bfloat16", "  colour: red"), ":11: unknown export key 'colour'"),
        (("checkpoints:", "checkpoint:"), ":6: unknown key 'checkpoint'"),
        (("base: zoo/base", "base: zoo/bass"), ":1: base 'zoo/bass' does not exist"),
        (("  - zoo/model-03", "  - zoo/model-99"), ":6: checkpoint 'zoo/model-99' does not"),
    ],
)
def test_every_recipe_error_names_file_and_line_before_anything_is_written(
    project, change, message
):
    recipe = project / "recipe.yaml"
    recipe.write_text(RECIPE.replace(*change))
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, quiet=True)
    assert str(info.value).startswith(f"{recipe}{message}"), str(info.value)
    assert not (project / "merged.state").exists()


def test_a_key_given_twice_in_a_watch_config_names_file_and_line(tmp_path):
    config = tmp_path / "watch.yaml"
    config.write_text("state: s\ninbox: in\nkeep: 3\nsettle: 1\nkeep: 5\n")
    with pytest.raises(ConfigError) as info:
        config_options(config)
    assert str(info.value) == (
        f"{config}:5: 'keep' is given twice (first on line 3); give each key once"
    )


# --------------------------------------------------------------------------------------
# add's fitting options, for every checkpoint


def _prefixed(source: Path, target: Path, drop: str) -> Path:
    """`source`'s checkpoint under 'model.' names, with a tensor the base lacks and without
    `drop`."""
    tensors = load_file(str(source / "model.safetensors"))
    del tensors[drop]
    fitted = {f"model.{name}": tensor for name, tensor in tensors.items()}
    fitted["model.lm_head.weight"] = torch.ones(3, 16)
    target.mkdir(parents=True)
    save_file(fitted, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize("how", ["recipe", "flags"])
def test_fitting_options_apply_to_every_checkpoint(project, capsys, how):
    zoo = project / "zoo"
    drop = "encoder.layer.0.output.LayerNorm.bias"
    for i in (1, 2, 3):
        _prefixed(zoo / f"model-0{i}", project / "hub" / f"model-0{i}", drop)
    recipe = project / "recipe.yaml"
    text = RECIPE.replace("zoo/model-", "hub/model-")
    recipe.write_text(text)
    # Without the options: refused, naming only what `run` takes.
    err = _cli_error(["run", str(recipe), "--quiet"], capsys)
    assert "strip_prefix='model.' (--strip-prefix model.)" in err
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= _run_flags(capsys)
    argv = ["run", str(recipe), "--quiet"]
    if how == "recipe":
        recipe.write_text(text + "strip_prefix: model.\nmissing: base\nextra: ignore\n")
    else:
        argv += ["--strip-prefix", "model.", "--missing", "base", "--extra", "ignore"]
    assert main(argv) == 0, capsys.readouterr().err
    base = load_file(str(zoo / "base" / "model.safetensors"))
    plain = []
    for i in (3, 1, 2):
        tensors = load_file(str(zoo / f"model-0{i}" / "model.safetensors"))
        tensors[drop] = base[drop]  # missing: base
        plain.append(tensors)
    expected = merge(base, plain, "task_arithmetic", scaling_factor=0.4, dtype=torch.bfloat16)
    exported = load_file(str(project / "merged" / "model.safetensors"))
    assert set(exported) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    for entry in MergeState.open(project / "merged.state").ledger:
        assert entry["mapping"], entry  # the ledger says how each checkpoint was fitted


def _adapter(folder: Path, base_name: str) -> Path:
    """A rank-2 LoRA adapter on the tiny base's query weights, made for `base_name`."""
    folder.mkdir()
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["query"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(3)
    factors = {}
    for layer in (0, 1):
        module = f"base_model.model.encoder.layer.{layer}.attention.self.query"
        factors[f"{module}.lora_A.weight"] = torch.randn(2, 16, generator=generator)
        factors[f"{module}.lora_B.weight"] = torch.randn(16, 2, generator=generator)
    save_file(factors, str(folder / "adapter_model.safetensors"))
    return folder


def test_force_base_in_the_recipe_merges_an_adapter_named_after_another_base(project, capsys):
    _adapter(project / "adapter", "someone/other-model")
    recipe = project / "recipe.yaml"
    text = RECIPE.replace("  - zoo/model-0[12]\n", "  - adapter\n")
    recipe.write_text(text)
    err = _cli_error(["run", str(recipe), "--quiet"], capsys)
    assert "pass force_base (--force-base)" in err
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= _run_flags(capsys)
    recipe.write_text(text + "force_base: true\n")
    run_recipe(recipe, quiet=True)
    state = MergeState.open(project / "merged.state")
    assert [Path(e["path"]).name for e in state.ledger] == ["model-03", "adapter"]


def test_identical_content_twice_needs_allow_duplicate(project, capsys):
    shutil.copytree(project / "zoo" / "model-03", project / "zoo" / "copy-of-03")
    recipe = project / "recipe.yaml"
    text = RECIPE.replace("  - zoo/model-0[12]\n", "  - zoo/copy-of-03\n")
    recipe.write_text(text)
    err = _cli_error(["run", str(recipe), "--quiet"], capsys)
    assert "(--allow-duplicate)" in err
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= _run_flags(capsys)
    recipe.write_text(text + "allow_duplicate: true\n")
    run_recipe(recipe, quiet=True)
    assert MergeState.open(project / "merged.state").step == 2


def test_the_base_as_a_checkpoint_needs_allow_zero(project, capsys):
    recipe = project / "recipe.yaml"
    text = RECIPE.replace("  - zoo/model-0[12]\n", "  - zoo/base\n")
    recipe.write_text(text)
    err = _cli_error(["run", str(recipe), "--quiet"], capsys)
    assert "(--allow-zero)" in err
    assert set(re.findall(r"--[a-z][a-z-]+", err)) <= _run_flags(capsys)
    assert main(["run", str(recipe), "--quiet", "--allow-zero"]) == 0
    assert MergeState.open(project / "merged.state").step == 2
