"""`mergestream run recipe.yaml`: a whole merge from one file, stored in the state and the model
card, safe to run again; compared with an in-memory merge of the same checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES
from safetensors.torch import load_file

from mergestream import MergeState, MergestreamError, merge
from mergestream.errors import ConfigError
from mergestream.synthetic import write_stream
from mergestream.watch.recipe import run_recipe

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
