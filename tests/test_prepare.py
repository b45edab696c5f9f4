"""Prepared generations (`mergestream prepare`, `watch --prepare`): the next step's OPCM
decompositions computed ahead of time give the same state, bit for bit, as a step without them;
they are used only when valid, and a stale or damaged preparation is recomputed, never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergestream
import mergestream.methods.opcm as opcm
from mergestream import MergeState
from mergestream.cli import main
from mergestream.step.prepare import DamagedPreparationWarning
from mergestream.store.manifest import seal_manifest
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

SHAPES = transformer_shapes(layers=2, hidden=16, intermediate=24, vocab=30, positions=8)
SRC = str(Path(mergestream.__file__).resolve().parent.parent)


@pytest.fixture
def stream(tmp_path: Path):
    base = make_base(SHAPES, seed=1, dtype=torch.float64)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(4):
        path = tmp_path / f"tuned-{i}.safetensors"
        save_file(apply(base, make_task_vector(base, seed=20 + i)), str(path))
        paths.append(path)
    return tmp_path, tmp_path / "base.safetensors", paths


def state_files(state_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (sums,) = state_dir.glob("gen-*/sum.safetensors")
    return load_file(str(sums))


class DecompositionCounter:
    """Counts the decompositions OPCM computes itself (not taken from a preparation)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        real = opcm.right_singular

        def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(opcm, "right_singular", counting)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_steps_equal_unprepared_ones_bit_for_bit(stream, monkeypatch, workers):
    tmp, base, paths = stream
    plain = MergeState.create(tmp / "plain", base, "opcm")
    prepared = MergeState.create(tmp / "prepared", base, "opcm")
    counter = DecompositionCounter(monkeypatch)
    projected = sum(i.projected for i in prepared.infos)
    for step, path in enumerate(paths, start=1):
        plain.add(path, workers=workers)
        done = prepared.prepare(workers=workers)
        assert done == (0 if step == 1 else projected)
        before = counter.calls
        prepared.add(path, workers=workers)
        assert counter.calls == before, "the step decomposed although it was prepared"
    plain_state, prepared_state = state_files(tmp / "plain"), state_files(tmp / "prepared")
    assert plain_state.keys() == prepared_state.keys()
    for name in plain_state:
        assert torch.equal(plain_state[name], prepared_state[name]), name
    assert plain.scalars == prepared.scalars
    merged_plain, merged_prepared = plain.state_dict(), prepared.state_dict()
    for name in merged_plain:
        assert torch.equal(merged_plain[name], merged_prepared[name]), name


def test_prepared_steps_are_bit_identical_on_wider_matrices(tmp_path, monkeypatch):
    """Matrices large enough for the BLAS to block its products: a V computed in the step and a
    V read back from disk must enter them with one layout, or the bits differ (they did, by
    1e-18, for 4:1 MLP weights before V was made contiguous)."""
    shapes = transformer_shapes(layers=1, hidden=96, intermediate=384, vocab=30, positions=8)
    base = make_base(shapes, seed=3, dtype=torch.float64)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(3):
        path = tmp_path / f"t{i}.safetensors"
        save_file(apply(base, make_task_vector(base, seed=40 + i)), str(path))
        paths.append(path)
    plain = MergeState.create(tmp_path / "plain", tmp_path / "base.safetensors", "opcm")
    prepared = MergeState.create(tmp_path / "prepared", tmp_path / "base.safetensors", "opcm")
    for path in paths:
        plain.add(path)
        prepared.prepare()
        prepared.add(path)
    for name, tensor in state_files(tmp_path / "plain").items():
        assert torch.equal(state_files(tmp_path / "prepared")[name], tensor), name


def test_prepare_is_idempotent_and_dropped_by_the_next_step(stream):
    tmp, base, paths = stream
    state = MergeState.create(tmp / "s", base, "opcm")
    assert state.prepare() == 0  # step 0: nothing to decompose
    state.add(paths[0])
    assert state.prepare() > 0  # step 2 projects against S = τ_1
    state.add(paths[1])
    assert state.prepare() > 0
    assert state.prepare() == 0  # already prepared
    manifest = json.loads((tmp / "s" / "manifest.json").read_text())
    assert manifest["prepared"]["generation"] == manifest["generation"]
    files = sorted(p.name for p in (tmp / "s").glob("gen-*/*"))
    assert files == ["prepared-sigma.safetensors", "prepared-v.safetensors", "sum.safetensors"]
    state.add(paths[2])
    manifest = json.loads((tmp / "s" / "manifest.json").read_text())
    assert "prepared" not in manifest
    assert sorted(p.name for p in (tmp / "s").glob("gen-*/*")) == ["sum.safetensors"]


def test_a_preparation_for_other_workers_is_not_used(stream, monkeypatch):
    """Kernels run single-threaded with several workers and multi-threaded with one: the
    factors could round differently, so a preparation is only used for the same regime."""
    tmp, base, paths = stream
    state = MergeState.create(tmp / "s", base, "opcm")
    for path in paths[:2]:
        state.add(path, workers=2)
    assert state.prepare(workers=1) > 0
    counter = DecompositionCounter(monkeypatch)
    state.add(paths[2], workers=2)
    assert counter.calls > 0
    reference = MergeState.create(tmp / "r", base, "opcm")
    for path in paths[:3]:
        reference.add(path, workers=2)
    for name, tensor in state_files(tmp / "r").items():
        assert torch.equal(state_files(tmp / "s")[name], tensor), name


@pytest.mark.parametrize("damage", ["bytes", "key"])
def test_a_damaged_or_stale_preparation_is_recomputed(stream, monkeypatch, damage):
    tmp, base, paths = stream
    state = MergeState.create(tmp / "s", base, "opcm")
    reference = MergeState.create(tmp / "r", base, "opcm")
    for path in paths[:2]:
        state.add(path)
        reference.add(path)
    assert state.prepare() > 0
    if damage == "bytes":
        (factors,) = (tmp / "s").glob("gen-*/prepared-v.safetensors")
        data = bytearray(factors.read_bytes())
        data[-3] ^= 0x10  # a float64 of the last tensor's last V entry
        factors.write_bytes(bytes(data))
    else:  # a record whose key no longer matches the generation (e.g. other parameters)
        manifest_path = tmp / "s" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["prepared"]["key"] = "0" * 64
        manifest_path.write_text(json.dumps(seal_manifest(manifest)))  # as mergestream writes
    counter = DecompositionCounter(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MergeState.open(tmp / "s").add(paths[2])
    reference.add(paths[2])
    assert counter.calls > 0
    dropped = [w for w in caught if issubclass(w.category, DamagedPreparationWarning)]
    if damage == "bytes":
        assert len(dropped) == 1, [str(w.message) for w in caught]
        message = str(dropped[0].message)
        assert "prepared-v.safetensors" in message and "computed them anew" in message
        assert "restore" not in message and "backup" not in message
    else:
        assert not dropped  # stale, not damaged: nothing to tell
    for name, tensor in state_files(tmp / "r").items():
        assert torch.equal(state_files(tmp / "s")[name], tensor), name


def test_prepare_from_the_command_line_and_status(stream, capsys):
    tmp, base, paths = stream
    state = tmp / "s"
    assert main(["init", str(state), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state), *map(str, paths[:2]), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(state)]) == 0
    assert "prepared step 3" in capsys.readouterr().out
    assert main(["status", str(state)]) == 0
    out = capsys.readouterr().out
    assert "prepared: step 3" in out and "health:  ok" in out


def prepared_state(stream) -> tuple[Path, Path]:
    """A state at step 2 with step 3 prepared, through the command line; and its factors."""
    tmp, base, paths = stream
    state = tmp / "s"
    assert main(["init", str(state), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state), *map(str, paths[:2]), "--quiet"]) == 0
    assert main(["prepare", str(state), "--quiet"]) == 0
    (factors,) = state.glob("gen-*/prepared-v.safetensors")
    return state, factors


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the header still matches
    path.write_bytes(bytes(data))


def test_status_verify_reports_a_damaged_preparation(stream, capsys):
    state, factors = prepared_state(stream)
    capsys.readouterr()
    assert main(["status", str(state), "--verify"]) == 0
    assert "preparation damaged" not in capsys.readouterr().out
    flip_last_byte(factors)
    assert main(["status", str(state)]) == 0  # headers and sizes hold: only --verify sees it
    assert "preparation damaged" not in capsys.readouterr().out
    # The merge is intact, so the exit status stays 0; the damage is reported all the same.
    assert main(["status", str(state), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "preparation damaged (1 problems): the next add recomputes it" in out
    assert f"{factors}: tensor " in out and "does not match its checksum" in out
    assert "health:  ok (every tensor matches its checksum, except the preparation's" in out
    assert main(["status", str(state), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["health"]["ok"] is True
    (problem,) = info["prepared"]["problems"]
    assert problem.startswith(f"{factors}: tensor ")


def test_status_reports_a_deleted_preparation_and_prepare_computes_it_again(stream, capsys):
    state, factors = prepared_state(stream)
    factors.unlink()
    capsys.readouterr()
    assert main(["status", str(state)]) == 0
    out = capsys.readouterr().out
    assert "preparation damaged (1 problems)" in out and f"{factors}: missing" in out
    assert main(["prepare", str(state)]) == 0
    assert "prepared step 3" in capsys.readouterr().out
    assert factors.is_file()
    assert main(["status", str(state), "--verify"]) == 0
    assert "preparation damaged" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_add_drops_a_damaged_preparation_with_one_line(stream, capsys, damage):
    tmp, base, paths = stream
    state, factors = prepared_state(stream)
    if damage == "flipped":
        flip_last_byte(factors)
    else:
        factors.unlink()
    capsys.readouterr()
    assert main(["add", str(state), str(paths[2]), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mergestream: warning: {factors}: "), err
    assert "did not use them and computed them anew" in err[0]
    assert "restore" not in err[0] and "backup" not in err[0] and "UserWarning" not in err[0]
    reference = MergeState.create(tmp / "r", base, "opcm")
    for path in paths[:3]:
        reference.add(path)
    for name, tensor in state_files(tmp / "r").items():
        assert torch.equal(state_files(state)[name], tensor), name


def test_watch_prepares_while_waiting(stream):
    tmp, base, paths = stream
    state, inbox = tmp / "s", tmp / "inbox"
    inbox.mkdir()
    assert main(["init", str(state), "--base", str(base), "--quiet"]) == 0
    for path in paths[:2]:
        os.link(path, inbox / path.name)
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run(
        [sys.executable, "-m", "mergestream", "watch", str(state), str(inbox), "--once",
         "--settle", "0", "--prepare", "--log-json"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "prepared" for e in events), result.stdout
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["prepared"]["generation"] == manifest["generation"]
