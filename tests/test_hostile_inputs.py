"""Damaged and hostile checkpoint files: refused before anything is merged, with a message that
names the file (and the tensor) in mergestream's words, never quoting bytes of the file, and
never opening a file outside the checkpoint's folder."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch._weights_only_unpickler as weights_only_unpickler
from safetensors.torch import load_file, save_file

from mergestream import CheckpointError, MergeState
from mergestream.cli import main
from mergestream.io.open import open_checkpoint

# Wording of torch's own errors that must not reach the user: torch's advice to retry with
# weights_only=False, and its opcode dumps (which quote bytes of the file).
TORCH_WORDING = (
    "weights_only=False",
    "set to `False`",
    "WeightsUnpickler",
    "Unsupported operand",
    "add_safe_globals",
)


def refusal(path: Path | str, match: str) -> str:
    """Open the checkpoint; assert it is refused with `match` and the path; return the message."""
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for wording in TORCH_WORDING:
        assert wording not in message
    return message


def state_dict_files() -> dict[str, dict]:
    """What training code saves with torch.save: float32, bfloat16, views sharing one storage
    (a slice and a transpose), and a state dict nested under "state_dict"."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator)
    flat = {
        "layer.weight": weight,
        "layer.bias": torch.randn(4, generator=generator),
        "half.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
    }
    shared = {"full": weight, "tail_rows": weight[2:], "transposed": weight.t()}
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    module.register_buffer("position_ids", torch.arange(5))
    odd = {
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(3, generator=generator).half(),
        "double": torch.randn(2, generator=generator).double(),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
    }
    return {
        "float32+bf16": flat,
        "shared-views": shared,
        "nested": {"state_dict": flat, "epoch": 3},
        "module-state-dict": module.state_dict(),  # an OrderedDict with _metadata, int buffer
        "empty-0d-fp16-fp64-parameter": odd,
        # a training checkpoint: the model beside optimizer state that shares no storage with it
        "with-optimizer": {"model": flat, "optimizer": {"state": {0: {"m": torch.ones(3)}}}},
    }


def rewrite_zip(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a torch.save archive record by record; `change(name, data)` returns the new data,
    or None to leave the record out."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)


# ------------------------------------------------------------- torch .bin: records and extents


@pytest.mark.parametrize("kind", list(state_dict_files()))
def test_torch_save_files_pass_the_checks_and_read_exactly(tmp_path, kind):
    saved = state_dict_files()[kind]
    path = tmp_path / "model.bin"
    torch.save(saved, path)
    expected = torch.load(path, weights_only=True)
    expected = expected.get("state_dict", expected.get("model", expected))
    source = open_checkpoint(path)
    assert source.names() == list(expected)
    for name, tensor in expected.items():
        got = source.get(name)
        assert got.dtype == tensor.dtype
        assert torch.equal(got, tensor), name
    source.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncated_storage_record_is_refused_naming_file_and_tensor(tmp_path, dtype):
    path, cut = tmp_path / "good.bin", tmp_path / "cut.bin"
    tensors = {"a.weight": torch.randn(3, 4).to(dtype), "b.weight": torch.randn(5).to(dtype)}
    torch.save(tensors, path)
    # the first storage record loses its last bytes; everything else is intact
    rewrite_zip(path, cut, lambda name, data: data[:-6] if name.endswith("data/0") else data)
    # torch's memory-mapped load does not notice (this is why the check exists) ...
    mapped = torch.load(cut, mmap=True, weights_only=True)
    assert mapped["a.weight"].shape == (3, 4)
    # ... mergestream refuses before reading anything
    message = refusal(cut, "truncated PyTorch checkpoint")
    record_bytes = 12 * tensors["a.weight"].element_size()
    assert "'a.weight'" in message
    assert f"holds {record_bytes - 6} bytes" in message and f"declares {record_bytes}" in message


def test_storage_record_longer_than_declared_is_refused(tmp_path):
    path, padded = tmp_path / "good.bin", tmp_path / "padded.bin"
    torch.save({"w": torch.ones(4)}, path)
    rewrite_zip(path, padded, lambda name, data: data + b"\0" * 8 if "data/0" in name else data)
    message = refusal(padded, "corrupt PyTorch checkpoint")
    assert "'w'" in message and "holds 24 bytes" in message and "declares 16" in message


def test_missing_storage_record_is_refused(tmp_path):
    path, stripped = tmp_path / "good.bin", tmp_path / "stripped.bin"
    torch.save({"w": torch.ones(4), "v": torch.zeros(2)}, path)
    rewrite_zip(path, stripped, lambda name, data: None if name.endswith("data/1") else data)
    message = refusal(stripped, "missing from the zip archive")
    assert "'v'" in message


def test_compressed_storage_record_is_refused(tmp_path):
    path, packed = tmp_path / "good.bin", tmp_path / "packed.bin"
    torch.save({"w": torch.zeros(64)}, path)
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(packed, "w") as new:
        for info in old.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith("data/0") else zipfile.ZIP_STORED
            new.writestr(info.filename, old.read(info), compress_type=kind)
    message = refusal(packed, "is compressed")
    assert "'w'" in message


class LyingPickler(pickle.Pickler):
    """Pickles tensors as torch.save does, but declares `numel` elements for every storage."""

    def __init__(self, file: io.BytesIO, numel: int) -> None:
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, torch.storage.TypedStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
        return None


def test_tensor_reaching_beyond_its_storage_is_refused(tmp_path):
    """A record whose size matches what the pickle declares, but a tensor whose shape needs more
    bytes than that: caught from the pickle's own numbers, before any data is read."""
    path, lying = tmp_path / "good.bin", tmp_path / "lying.bin"
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"w": weight}, path)
    buffer = io.BytesIO()
    LyingPickler(buffer, numel=6).dump({"w": weight})

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("data.pkl"):
            return buffer.getvalue()
        return data[:24] if name.endswith("data/0") else data

    rewrite_zip(path, lying, change)
    message = refusal(lying, "reaches beyond its storage")
    assert "'w'" in message and "24 bytes" in message


def test_empty_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")
    refusal(path, "the file is empty")
    refusal(tmp_path, "the file is empty")  # found in a directory: the file is still named


def test_truncated_zip(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    refusal(path, "truncated or corrupt zip archive")


def test_not_a_zip_at_all(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"SeCrEt42 this is not a checkpoint" * 10)
    message = refusal(path, "not a zip archive")
    assert "SeCrEt42" not in message


def test_garbage_data_pkl(tmp_path):
    path, garbage = tmp_path / "good.bin", tmp_path / "garbage.bin"
    torch.save({"w": torch.ones(3)}, path)
    rewrite_zip(
        path,
        garbage,
        lambda name, data: b"\x80\x02garbage\xff\xfe" * 4 if name.endswith("data.pkl") else data,
    )
    refusal(garbage, "its data.pkl is not a valid pickle of tensors")


def test_zip_without_data_pkl(tmp_path):
    path, other = tmp_path / "good.bin", tmp_path / "other.bin"
    torch.save({"w": torch.ones(3)}, path)
    rewrite_zip(path, other, lambda name, data: None if name.endswith("data.pkl") else data)
    refusal(other, "has no .*data.pkl record")


CALLS: list[str] = []


def record_call(what: str) -> None:
    """What an object in a hostile pickle would run if it were ever unpickled."""
    CALLS.append(what)


class RunsCodeWhenLoaded:
    def __reduce__(self):
        return (record_call, ("unpickled",))


def test_pickle_asking_for_an_object_is_refused_in_our_words(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "payload": RunsCodeWhenLoaded()}, path)
    CALLS.clear()
    message = refusal(path, "never unpickles arbitrary objects")
    assert "test_hostile_inputs.record_call" in message
    assert CALLS == []


def test_plain_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "payload": RunsCodeWhenLoaded()}, protocol=4))
    CALLS.clear()
    refusal(path, "it is a plain pickle, not the zip archive")
    assert CALLS == []


def test_cli_refuses_a_truncated_record_and_keeps_the_state(tmp_path, capsys):
    base = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(tmp_path / "base.safetensors"), "--quiet"]) == 0
    good, cut = tmp_path / "good.bin", tmp_path / "cut.bin"
    torch.save({n: t + 0.1 for n, t in base.items()}, good)
    rewrite_zip(good, cut, lambda name, data: data[:-4] if name.endswith("data/0") else data)
    manifest = (state / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["add", str(state), str(cut), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and "truncated" in err and "Traceback" not in err
    assert (state / "manifest.json").read_bytes() == manifest
    assert MergeState.open(state).step == 0


# ------------------------------------------------------------------------------ torch floor


@pytest.fixture
def nothing_unpickled(monkeypatch):
    """Fail the test if anything reaches torch.load or torch's unpickler."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(weights_only_unpickler.Unpickler, "load", forbidden)


@pytest.mark.parametrize("old", ["2.1.0", "2.5.1+cu121", "2.6.0", "2.9.1"])
def test_pickles_are_refused_on_torch_before_2_10(tmp_path, monkeypatch, nothing_unpickled, old):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", old)
    message = refusal(path, f"with torch {re.escape(old)}")
    assert "CVE-2025-32434" in message and "CVE-2026-24747" in message
    assert "safetensors" in message and "2.10" in message
    # safetensors input still works on that torch
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    source = open_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(source.get("w"), torch.ones(2))
    source.close()


@pytest.mark.parametrize("new", ["2.10.0", "2.10.0a0+git1234", "2.13.0+cpu", "3.0.0"])
def test_pickles_are_read_on_torch_2_10_and_later(tmp_path, monkeypatch, new):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", new)
    source = open_checkpoint(path)
    assert torch.equal(source.get("w"), torch.ones(2))
    source.close()


# ------------------------------------------------------------------- shard index: paths


def sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], kind: str = "st") -> Path:
    """Write shards (file name -> tensors) and an honest index; return the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, tensors in shards.items():
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        if kind == "st":
            save_file(tensors, str(folder / file))
        else:
            torch.save(tensors, folder / file)
        weight_map.update(dict.fromkeys(tensors, file))
    name = "model.safetensors.index.json" if kind == "st" else "pytorch_model.bin.index.json"
    index = folder / name
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def point(index: Path, tensor: str, shard: str) -> None:
    content = json.loads(index.read_text())
    content["weight_map"][tensor] = shard
    index.write_text(json.dumps(content))


TWO_SHARDS = {
    "model-00001-of-00002.safetensors": {"a": torch.ones(3)},
    "model-00002-of-00002.safetensors": {"b": torch.full((2,), 2.0)},
}


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_shard_outside_the_folder_is_refused(tmp_path, escape):
    save_file({"b": torch.full((2,), 2.0)}, str(tmp_path / "outside.safetensors"))
    index = sharded(tmp_path / "model", TWO_SHARDS)
    point(index, "b", escape)
    message = refusal(index, "refusing shard")
    assert "'b'" in message and "inside the checkpoint's folder" in message
    refusal(tmp_path / "model", "refusing shard")  # the directory form reads the same index


def test_absolute_shard_path_is_refused_without_reading_it(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"SeCrEt42" + b"private data\n" * 4)
    index = sharded(tmp_path / "model", TWO_SHARDS)
    point(index, "b", str(secret))
    message = refusal(index, "refusing shard")
    assert "SeCrEt42" not in message
    assert str(struct.unpack("<Q", b"SeCrEt42")[0]) not in message


def test_bin_index_shard_outside_is_refused_before_unpickling(tmp_path, nothing_unpickled):
    index = sharded(
        tmp_path / "model", {"pytorch_model-00001-of-00001.bin": {"a": torch.ones(2)}}, "bin"
    )
    point(index, "a", "../../evil.bin")
    refusal(index, "refusing shard")


def test_symlinked_shards_inside_the_folder_are_allowed(tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/ holds symlinks into ../../blobs/."""
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    snapshot = tmp_path / "cache" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    weight_map = {}
    for i, (file, tensors) in enumerate(TWO_SHARDS.items()):
        save_file(tensors, str(blobs / f"blob{i}"))
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
        weight_map.update(dict.fromkeys(tensors, file))
    index = snapshot / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    source = open_checkpoint(snapshot)
    assert torch.equal(source.get("a"), torch.ones(3))
    assert torch.equal(source.get("b"), torch.full((2,), 2.0))
    source.close()


def test_shards_in_a_subfolder_are_allowed(tmp_path):
    index = sharded(tmp_path / "model", {"weights/part-1.safetensors": {"a": torch.ones(3)}})
    source = open_checkpoint(index)
    assert torch.equal(source.get("a"), torch.ones(3))
    source.close()


# -------------------------------------------------------- shard index: does it tell the truth


def test_index_placing_a_tensor_in_another_shard_is_refused(tmp_path):
    index = sharded(
        tmp_path / "model",
        {
            "s-1.safetensors": {"a": torch.ones(3), "a2": torch.ones(1)},
            "s-2.safetensors": {"b": torch.ones(2)},
        },
    )
    point(index, "a2", "s-2.safetensors")
    message = refusal(index, "does not match its shards")
    assert "tensor 'a2' in shard 's-2.safetensors', but shard 's-1.safetensors' holds it" in message


def test_index_swapping_two_tensors_is_refused_naming_both_shards(tmp_path):
    index = sharded(tmp_path / "model", TWO_SHARDS)
    point(index, "a", "model-00002-of-00002.safetensors")
    point(index, "b", "model-00001-of-00002.safetensors")
    message = refusal(index, "does not match its shards")
    assert "tensor 'a' in shard 'model-00002-of-00002.safetensors'" in message
    assert "shard 'model-00001-of-00002.safetensors' holds it" in message
    assert "and 1 more" in message  # b is misplaced too


def test_index_placing_a_tensor_in_no_listed_shard_is_refused(tmp_path):
    index = sharded(tmp_path / "model", TWO_SHARDS)
    point(index, "ghost", "model-00002-of-00002.safetensors")
    message = refusal(index, "no shard it lists holds it")
    assert "'ghost'" in message
    # b moved to shard 1: its real shard is no longer listed, so no listed shard holds it
    index = sharded(tmp_path / "model2", TWO_SHARDS)
    point(index, "b", "model-00001-of-00002.safetensors")
    message = refusal(index, "no shard it lists holds it")
    assert "tensor 'b' in shard 'model-00001-of-00002.safetensors'" in message


def test_index_leaving_out_a_tensor_is_refused(tmp_path):
    index = sharded(
        tmp_path / "model",
        {
            "s-1.safetensors": {"a": torch.ones(3)},
            "s-2.safetensors": {"b": torch.ones(2), "c": torch.ones(1)},
        },
    )
    content = json.loads(index.read_text())
    del content["weight_map"]["c"]
    index.write_text(json.dumps(content))
    message = refusal(index, "does not match its shards")
    assert "shard 's-2.safetensors' holds tensor 'c', which it does not list" in message


def test_bin_index_that_lies_is_refused(tmp_path):
    index = sharded(
        tmp_path / "model",
        {"p-1.bin": {"a": torch.ones(2)}, "p-2.bin": {"b": torch.zeros(2)}},
        "bin",
    )
    point(index, "a", "p-2.bin")
    point(index, "b", "p-1.bin")
    refusal(index, "does not match its shards")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"metadata": {}}, "no weight_map"),
        ({"weight_map": []}, "weight_map is a list"),
        ({"weight_map": {}}, "weight_map is empty"),
        ({"weight_map": {"a": 3}}, "not a file name"),
        ([1, 2], "no weight_map"),
    ],
)
def test_malformed_index_is_refused_clearly(tmp_path, content, match):
    folder = tmp_path / "model"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(content))
    refusal(index, match)


def test_index_that_is_not_text_does_not_quote_its_bytes(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": \xff\xfe}')
    message = refusal(index, "not UTF-8 text")
    assert "0xff" not in message and "\\xff" not in message


# ------------------------------------------------------------------ safetensors headers


def test_deeply_nested_header_is_a_corrupt_header(tmp_path):
    path = tmp_path / "deep.safetensors"
    header = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refusal(path, "corrupt safetensors header .*nested too deeply")


def test_header_length_bytes_are_not_quoted(tmp_path):
    """A file that is not safetensors at all (as /etc/passwd would be): the number its first 8
    bytes decode to is not printed, nor the bytes."""
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(b"SeCrEt42:x:0:0:some account:/home:/bin/sh\n" * 3)
    declared = struct.unpack("<Q", b"SeCrEt42")[0]
    message = refusal(path, "not a safetensors file")
    assert str(declared) not in message and "SeCrEt42" not in message
    # a length that fits the limit but not the file: still not quoted
    small = tmp_path / "short.safetensors"
    small.write_bytes(struct.pack("<Q", 4321) + b"{}" * 10)
    message = refusal(small, "not a safetensors file, or truncated")
    assert "4321" not in message


def test_header_that_is_not_utf8_does_not_quote_its_bytes(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"w": \xff\xfe}  '
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    message = refusal(path, "corrupt safetensors header .*not UTF-8 text")
    assert "0xff" not in message and "\\xff" not in message


def test_a_good_sharded_checkpoint_still_reads(tmp_path):
    index = sharded(tmp_path / "model", TWO_SHARDS)
    source = open_checkpoint(tmp_path / "model")
    for file, tensors in TWO_SHARDS.items():
        for name in tensors:
            assert torch.equal(source.get(name), load_file(str(tmp_path / "model" / file))[name])
    assert source.names() == ["a", "b"]
    source.close()
    assert index.is_file()
