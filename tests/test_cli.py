"""The command line end to end on tiny models in a temporary directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergestream import MergeState
from mergestream.cli import main


def test_init_add_status_export(tiny_stream, tmp_path, capsys):
    base, checkpoints = tiny_stream
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(base), "--param", "alpha=0.4"]) == 0
    assert "12 projected" in capsys.readouterr().out
    assert main(["add", str(state), *map(str, checkpoints[:3])]) == 0
    out = capsys.readouterr().out
    assert out.count("step ") == 3 and "scale=" in out

    assert main(["status", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["step"] == 3
    assert status["method"]["params"]["alpha"] == 0.4
    assert len(status["ledger"]) == 3

    assert main(["status", str(state), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "projected encoder.layer.0.attention.self.query.weight" in text
    assert "copied    embeddings.position_ids" in text

    assert main(["export", str(state), str(tmp_path / "merged"), "--quiet"]) == 0
    exported = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = MergeState.open(state).state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)

    assert (
        main(["export", str(state), str(tmp_path / "half"), "--dtype", "bfloat16", "--quiet"]) == 0
    )
    half = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert half["encoder.layer.0.output.dense.weight"].dtype == torch.bfloat16
    assert half["embeddings.position_ids"].dtype == torch.int64


def test_errors_are_one_line_without_traceback(tiny_stream, tmp_path, capsys):
    base, _ = tiny_stream
    assert main(["init", str(tmp_path / "s"), "--base", str(base), "--param", "beta=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'beta'; valid parameters: alpha, zero_diagonal" in err
    assert "Traceback" not in err
    assert main(["add", str(tmp_path / "missing"), str(base)]) == 2
    assert "not a merge state" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "t"), "--base", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_methods_lists_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "opcm:" in out
    assert "alpha (float, default 0.5)" in out
    assert "decomposition (gram|svd|approx-gram, default 'gram')" in out


def test_console_script_runs_as_a_module(tiny_stream, tmp_path):
    base, checkpoints = tiny_stream
    state = tmp_path / "s"
    run = [sys.executable, "-m", "mergestream"]
    subprocess.run([*run, "init", str(state), "--base", str(base)], check=True)
    result = subprocess.run(
        [*run, "add", str(state), str(checkpoints[0])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "step 1: merged" in result.stdout
    assert result.stderr == ""  # not a terminal: no progress bar


@pytest.mark.parametrize("models", [3])
def test_demo_runs(tmp_path, capsys, models):
    assert main(["demo", "--dir", str(tmp_path), "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and (tmp_path / "merged" / "model.safetensors").is_file()
