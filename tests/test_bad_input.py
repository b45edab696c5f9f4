"""Bad input is refused with a message naming the file and the tensor, and the state directory is
byte-for-byte what it was before (every file's content, every name in the tree)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import tree_digest
from safetensors.torch import load_file, save_file

from mergestream import MergeState
from mergestream.cli import main
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

SHAPES = transformer_shapes(layers=1, hidden=8, intermediate=12, vocab=20, positions=4)
WEIGHT = "encoder.layer.0.intermediate.dense.weight"


@pytest.fixture
def case(tmp_path: Path):
    """A state with one committed step, a good next checkpoint and a way to write bad ones."""
    base = make_base(SHAPES, seed=1)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, str(base_dir / "model.safetensors"))
    first = tmp_path / "first.safetensors"
    save_file(apply(base, make_task_vector(base, seed=2)), str(first))
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(base_dir), "--quiet"]) == 0
    assert main(["add", str(state), str(first), "--quiet"]) == 0
    good = apply(base, make_task_vector(base, seed=3))
    return {"tmp": tmp_path, "state": state, "base": base, "base_dir": base_dir, "good": good}


def refused(case, checkpoint: Path | str, capsys, *extra: str) -> str:
    """Run `add`; assert it fails and leaves the state untouched; return the error message."""
    before = tree_digest(case["state"])
    capsys.readouterr()
    rc = main(["add", str(case["state"]), str(checkpoint), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("mergestream: error: ")
    assert "Traceback" not in err
    assert tree_digest(case["state"]) == before, "a refused add changed the state directory"
    return err


def still_usable(case) -> None:
    good = case["tmp"] / "good.safetensors"
    save_file(case["good"], str(good))
    assert main(["add", str(case["state"]), str(good), "--quiet"]) == 0
    assert MergeState.open(case["state"]).step == 2


def write(case, tensors: dict[str, torch.Tensor], name: str = "bad.safetensors") -> Path:
    path = case["tmp"] / name
    save_file(tensors, str(path))
    return path


def test_missing_file(case, capsys):
    path = case["tmp"] / "nowhere" / "model.safetensors"
    err = refused(case, path, capsys)
    assert str(path) in err and "no such file" in err
    still_usable(case)


def test_truncated_safetensors(case, capsys):
    path = write(case, case["good"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    err = refused(case, path, capsys)
    assert str(path) in err and "truncated" in err
    # the tensor whose bytes are cut off is named
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    assert repr(last) in err
    still_usable(case)


def test_corrupt_safetensors_header(case, capsys):
    path = write(case, case["good"])
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe\x01"
    path.write_bytes(bytes(data))
    err = refused(case, path, capsys)
    assert str(path) in err and "corrupt safetensors header" in err
    still_usable(case)


def test_not_a_safetensors_file(case, capsys):
    path = case["tmp"] / "random.safetensors"
    path.write_bytes(b"\xff" * 64)
    err = refused(case, path, capsys)
    assert str(path) in err and "not a safetensors file" in err


def test_wrong_shape(case, capsys):
    tensors = dict(case["good"])
    tensors[WEIGHT] = torch.zeros(12, 9)
    path = write(case, tensors)
    err = refused(case, path, capsys)
    assert str(path) in err and repr(WEIGHT) in err
    assert "shape [12, 9]" in err and "[12, 8]" in err
    still_usable(case)


def test_missing_tensor(case, capsys):
    tensors = dict(case["good"])
    del tensors[WEIGHT]
    path = write(case, tensors)
    err = refused(case, path, capsys)
    assert str(path) in err and repr(WEIGHT) in err and "missing" in err
    assert "--missing base" in err  # the option that would accept it is suggested
    still_usable(case)


def test_extra_tensor(case, capsys):
    tensors = dict(case["good"])
    tensors["classifier.weight"] = torch.zeros(3, 8)
    path = write(case, tensors)
    err = refused(case, path, capsys)
    assert str(path) in err and "'classifier.weight' is not in the base" in err
    assert "--extra ignore" in err
    still_usable(case)


@pytest.mark.parametrize("value, word", [(math.nan, "NaN"), (math.inf, "infinite")])
def test_non_finite_tensor(case, capsys, value, word):
    tensors = dict(case["good"])
    poisoned = tensors[WEIGHT].clone()
    poisoned[3, 4] = value
    tensors[WEIGHT] = poisoned
    path = write(case, tensors)
    err = refused(case, path, capsys)
    assert str(path) in err and repr(WEIGHT) in err
    assert f"1 {word}" in err and "flat index 28" in err
    still_usable(case)


def test_base_changed_on_disk(case, capsys):
    base_file = case["base_dir"] / "model.safetensors"
    changed = dict(load_file(str(base_file)))
    changed[WEIGHT] = changed[WEIGHT] + 1.0
    save_file(changed, str(base_file))
    path = write(case, case["good"])
    err = refused(case, path, capsys)
    assert str(case["base_dir"]) in err and "has changed since this state was created" in err
    # export refuses too: it would write base' + task vector, a model nobody asked for
    capsys.readouterr()
    assert main(["export", str(case["state"]), str(case["tmp"] / "out"), "--quiet"]) == 2
    assert "has changed" in capsys.readouterr().err


def test_base_files_touched_but_same_content(case):
    base_file = case["base_dir"] / "model.safetensors"
    data = base_file.read_bytes()
    base_file.unlink()
    base_file.write_bytes(data)  # new mtime, same bytes
    good = write(case, case["good"])
    assert main(["add", str(case["state"]), str(good), "--quiet"]) == 0
    manifest = json.loads((case["state"] / "manifest.json").read_text())
    assert manifest["base"]["files"][0]["mtime_ns"] == base_file.stat().st_mtime_ns


def test_dtype_that_cannot_be_cast(case, capsys):
    tensors = dict(case["good"])
    tensors[WEIGHT] = torch.zeros(12, 8, dtype=torch.int32)
    path = write(case, tensors)
    err = refused(case, path, capsys)
    assert str(path) in err and repr(WEIGHT) in err
    assert "int32" in err and "cannot be cast" in err and "float32" in err
    still_usable(case)


def test_unreadable_dtype_code(case, capsys):
    path = write(case, case["good"])
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    header[WEIGHT]["dtype"] = "C64"  # complex: no task vector, and no torch reader either
    header[WEIGHT]["data_offsets"][1] = header[WEIGHT]["data_offsets"][0] + 12 * 8 * 8
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len :])
    err = refused(case, path, capsys)
    assert str(path) in err and repr(WEIGHT) in err and "C64" in err


def test_state_of_an_incompatible_version(case, capsys):
    manifest_path = case["state"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest["mergestream_version"] = "9.0.0"
    manifest_path.write_text(json.dumps(manifest))
    path = write(case, case["good"])
    err = refused(case, path, capsys)
    assert str(case["state"]) in err
    assert "format version 99" in err and "9.0.0" in err and "upgrade mergestream" in err
    for command in (["status"], ["export", str(case["tmp"] / "out")]):
        capsys.readouterr()
        before = tree_digest(case["state"])
        assert main([command[0], str(case["state"]), *command[1:]]) == 2
        assert "format version 99" in capsys.readouterr().err
        assert tree_digest(case["state"]) == before


def test_sharded_checkpoint_with_a_missing_shard(case, capsys):
    directory = case["tmp"] / "sharded"
    directory.mkdir()
    names = list(case["good"])
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        weight_map.update({n: shard for n in part})
        if i == 1:
            save_file({n: case["good"][n] for n in part}, str(directory / shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    err = refused(case, directory, capsys)
    assert "model-00002-of-00002.safetensors" in err and "missing" in err


def test_duplicate_is_refused_unless_allowed(case, capsys):
    first = case["tmp"] / "first.safetensors"
    copy = case["tmp"] / "copy-of-first.safetensors"
    shutil.copy(first, copy)
    err = refused(case, copy, capsys)
    assert "identical content was already merged at step 1" in err
    assert str(first) in err and "--allow-duplicate" in err
    assert main(["add", str(case["state"]), str(copy), "--quiet", "--allow-duplicate"]) == 0
    state = MergeState.open(case["state"])
    assert state.step == 2
    assert state.ledger[0]["sha256"] == state.ledger[1]["sha256"]


def test_full_disk_while_writing_the_new_generation(case, capsys, monkeypatch):
    import errno

    from mergestream.io.safetensors_stream import StreamingSafetensorsWriter

    def no_space(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", no_space)
    err = refused(case, write(case, case["good"]), capsys)
    assert "no space left on" in err and "the state is unchanged" in err
    monkeypatch.undo()
    still_usable(case)
