"""The on-disk merge state: persistence, resumability across processes, refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergestream import CheckpointError, ConfigError, MergeState, StateError, merge
from mergestream.methods import OPCM


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under `path` (to prove a refused step changed nothing)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def test_six_in_one_process_equals_three_plus_three_in_a_new_process(tiny_stream, tmp_path):
    base, checkpoints = tiny_stream
    whole = MergeState.create(tmp_path / "whole", base, method=OPCM(alpha=0.5))
    for checkpoint in checkpoints:
        whole.add(checkpoint)
    whole.export(tmp_path / "out-whole")

    split = MergeState.create(tmp_path / "split", base, method=OPCM(alpha=0.5))
    for checkpoint in checkpoints[:3]:
        split.add(checkpoint)
    script = (
        "import sys; from mergestream import MergeState\n"
        "state = MergeState.open(sys.argv[1])\n"
        "for c in sys.argv[3:]: state.add(c)\n"
        "state.export(sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "split"), str(tmp_path / "out-split")]
        + [str(c) for c in checkpoints[3:]],
        check=True,
    )
    whole_bytes = (tmp_path / "out-whole" / "model.safetensors").read_bytes()
    split_bytes = (tmp_path / "out-split" / "model.safetensors").read_bytes()
    assert whole_bytes == split_bytes

    # the in-memory API gives the same tensors bit for bit
    in_memory = merge(base, checkpoints, OPCM(alpha=0.5))
    exported = load_file(str(tmp_path / "out-whole" / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor, in_memory[name]), name


def test_state_records_method_params_ledger_and_scalars(tiny_stream, tmp_path):
    base, checkpoints = tiny_stream
    state = MergeState.create(tmp_path / "s", base, "opcm", alpha=0.3, zero_diagonal=False)
    state.add(checkpoints[0])
    state.add(checkpoints[1])
    reopened = MergeState.open(tmp_path / "s")
    info = reopened.status()
    assert info["method"] == {
        "name": "opcm",
        "params": {
            "alpha": 0.3,
            "zero_diagonal": False,
            "decomposition": "gram",
            "project_include": None,
            "project_exclude": None,
            "adaptive_scaling": True,
        },
    }
    assert info["step"] == 2
    assert [e["path"] for e in info["ledger"]] == [str(c.resolve()) for c in checkpoints[:2]]
    digest = hashlib.sha256((checkpoints[0] / "model.safetensors").read_bytes()).hexdigest()
    assert info["ledger"][0]["sha256"] == digest
    assert info["scalars"]["scale"] > 1.0
    assert info["tensors"] == {"projected": 12, "added": 24, "copied": 1}
    # only the current generation of state tensors is kept
    assert [p.name for p in (tmp_path / "s").glob("gen-*")] == ["gen-000002"]


def test_export_at_step_zero_is_the_base(tiny_stream, tmp_path):
    base, _ = tiny_stream
    state = MergeState.create(tmp_path / "s", base)
    out = state.export(tmp_path / "out")
    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def _rewrite(source: Path, target: Path, edit) -> Path:
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("encoder.layer.1.output.dense.bias"),
            "'encoder.layer.1.output.dense.bias' of the base is missing",
        ),
        (lambda t: t.update({"extra.weight": torch.zeros(2)}), "'extra.weight' is not in the base"),
        (
            lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": torch.zeros(3, 3)}),
            "'encoder.layer.0.intermediate.dense.weight' has shape [3, 3], the base has [24, 16]",
        ),
    ],
)
def test_mismatched_checkpoint_is_refused_and_state_untouched(tiny_stream, tmp_path, edit, message):
    base, checkpoints = tiny_stream
    state = MergeState.create(tmp_path / "s", base)
    state.add(checkpoints[0])
    before = tree_digest(tmp_path / "s")
    bad = _rewrite(checkpoints[1], tmp_path / "bad", edit)
    with pytest.raises(
        CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")
    ) as err:
        state.add(bad)
    assert str(bad) in str(err.value)
    assert tree_digest(tmp_path / "s") == before
    state.add(checkpoints[1])  # the state is still usable
    assert state.step == 2


def test_nan_in_incoming_tensor_is_refused_and_state_untouched(tiny_stream, tmp_path):
    base, checkpoints = tiny_stream

    def poison(tensors):
        tensors["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")

    bad = _rewrite(checkpoints[1], tmp_path / "bad", poison)
    state = MergeState.create(tmp_path / "s", base)
    state.add(checkpoints[0])
    before = tree_digest(tmp_path / "s")
    with pytest.raises(
        CheckpointError, match="'encoder.layer.1.output.dense.weight' contains 1 NaN"
    ):
        state.add(bad)
    assert tree_digest(tmp_path / "s") == before
    assert not list((tmp_path / "s").glob("gen-000002"))


def test_duplicate_checkpoint_is_refused_unless_allowed(tiny_stream, tmp_path):
    base, checkpoints = tiny_stream
    state = MergeState.create(tmp_path / "s", base)
    state.add(checkpoints[0])
    with pytest.raises(StateError, match="already merged at step 1"):
        state.add(checkpoints[0])
    state.add(checkpoints[0], allow_duplicate=True)
    assert state.step == 2


def test_create_refuses_a_non_empty_directory_and_unknown_params(tiny_stream, tmp_path):
    base, _ = tiny_stream
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "file").write_text("x")
    with pytest.raises(StateError, match="not an empty directory"):
        MergeState.create(tmp_path / "s", base)
    with pytest.raises(ConfigError, match="unknown parameter 'alpah'; valid parameters: alpha"):
        MergeState.create(tmp_path / "t", base, "opcm", alpah=0.5)
    with pytest.raises(ConfigError, match="alpha must be within"):
        MergeState.create(tmp_path / "t", base, "opcm", alpha=1.5)


def test_open_refuses_an_incompatible_format_version(tiny_stream, tmp_path):
    base, _ = tiny_stream
    MergeState.create(tmp_path / "s", base)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="format version 99"):
        MergeState.open(tmp_path / "s")
