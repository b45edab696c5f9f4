"""Data loss, silent corruption and leaks that careful use turned up, each reproduced with real
files (and real processes and a real full file system where those are involved):

- a huge finite value that overflows the step's norms is refused before anything is committed;
- a base with NaN/Inf is refused by init;
- bit rot in the state is caught by its checksums, on every read and by `status --verify`;
- a full disk gives one clear line and leaves the state, and an export's target, untouched;
- an export is switched in whole (never a mixture of two steps, even when killed), keeps files
  it does not own, refuses other people's directories and the base's own directory;
- every file a commit or export promises is fsync'd;
- manifests missing fields, read-only states, dtype mismatches, a base rewritten in place,
  sentence-transformers folders, `import mergestream` and the command line's start-up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import mounted_tmpfs, tree_digest
from safetensors.torch import load_file, save_file

import mergestream
from mergestream import CheckpointError, MergeState, MergestreamError, StateError
from mergestream.cli import main
from mergestream.store.manifest import FORMAT_VERSION
from mergestream.store.storage import write_json_atomic
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

SHAPES = transformer_shapes(layers=1, hidden=8, intermediate=12, vocab=20, positions=4)
WEIGHT = "encoder.layer.0.intermediate.dense.weight"
SRC = str(Path(mergestream.__file__).resolve().parent.parent)


def save_model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "bert"}\n')
    return directory


@pytest.fixture
def stream(tmp_path: Path):
    base = make_base(SHAPES, seed=1)
    tuned = [apply(base, make_task_vector(base, seed=s)) for s in (2, 3, 4)]
    paths = [tmp_path / f"tuned-{i}.safetensors" for i in range(len(tuned))]
    for path, tensors in zip(paths, tuned, strict=True):
        save_file(tensors, str(path))
    return {
        "tmp": tmp_path,
        "base": base,
        "base_dir": save_model(tmp_path / "base", base),
        "tuned": tuned,
        "paths": paths,
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-m", "mergestream", *args], capture_output=True, text=True, env=env
    )


# ----------------------------------------------------------------- 1. results must be finite


def test_a_huge_finite_value_is_refused_before_commit(stream, capsys):
    tmp = stream["tmp"]
    state = tmp / "state"
    base64 = {k: v.double() if v.is_floating_point() else v for k, v in stream["base"].items()}
    save_model(tmp / "base64", base64)
    first = apply(base64, make_task_vector(base64, seed=2))
    save_file(first, str(tmp / "first.safetensors"))
    assert main(["init", str(state), "--base", str(tmp / "base64"), "--quiet"]) == 0
    assert main(["add", str(state), str(tmp / "first.safetensors"), "--quiet"]) == 0
    huge = apply(base64, make_task_vector(base64, seed=3))
    huge[WEIGHT][1, 2] = 1e300  # finite, but its square overflows float64
    bad = tmp / "huge.safetensors"
    save_file(huge, str(bad))
    before = tree_digest(state)
    capsys.readouterr()
    assert main(["add", str(state), str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and WEIGHT in err and "values this large" in err
    assert "unchanged" in err
    assert "Traceback" not in err
    assert tree_digest(state) == before
    opened = MergeState.open(state)
    assert all(torch.isfinite(torch.tensor(v)) for v in opened.scalars.values())
    assert opened.step == 1
    second = apply(base64, make_task_vector(base64, seed=4))
    save_file(second, str(tmp / "second.safetensors"))
    assert main(["add", str(state), str(tmp / "second.safetensors"), "--quiet"]) == 0
    merged = MergeState.open(state).state_dict()
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())


def test_a_value_that_overflows_the_state_dtype_is_refused(stream):
    """1e39 fits float64 but not a float32 state: the rounded state would be infinite."""
    state = MergeState.in_memory(stream["base"], "task_arithmetic")
    state.add(stream["tuned"][0])
    bad = dict(stream["tuned"][1])
    bad[WEIGHT] = bad[WEIGHT].double()
    bad[WEIGHT][0, 0] = 1e39
    with pytest.raises(CheckpointError, match="non-finite state 'sum'.*cannot be merged"):
        state.add(bad)
    assert state.step == 1


def test_an_export_that_overflows_its_dtype_is_refused(stream):
    state = MergeState.create(stream["tmp"] / "s", stream["base_dir"], "task_arithmetic")
    big = {k: v.clone() for k, v in stream["tuned"][0].items()}
    big[WEIGHT][0, 0] = 3e38
    save_file(big, str(stream["tmp"] / "big.safetensors"))
    state.add(stream["tmp"] / "big.safetensors")
    with pytest.raises(MergestreamError, match=f"{WEIGHT}.*not finite in float16"):
        state.export(stream["tmp"] / "out", dtype=torch.float16)
    assert not (stream["tmp"] / "out").exists()
    assert not [p for p in stream["tmp"].iterdir() if p.name.startswith(".out.")]


# ------------------------------------------------------------------------------ 2. bad bases


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_init_refuses_a_non_finite_base(stream, capsys, value):
    base = dict(stream["base"])
    base[WEIGHT] = base[WEIGHT].clone()
    base[WEIGHT][2, 3] = value
    base_dir = save_model(stream["tmp"] / "bad-base", base)
    state = stream["tmp"] / "deep" / "state"
    capsys.readouterr()
    assert main(["init", str(state), "--base", str(base_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the base" in err and WEIGHT in err and str(base_dir) in err
    columns = base[WEIGHT].shape[1]
    assert f"flat index {2 * columns + 3}" in err
    assert not state.exists()
    with pytest.raises(CheckpointError, match="the base"):
        MergeState.in_memory(base, "opcm")


# --------------------------------------------------------------------------- 3. bit rot


@pytest.fixture
def committed(stream):
    state = stream["tmp"] / "state"
    assert main(["init", str(state), "--base", str(stream["base_dir"]), "--quiet"]) == 0
    for path in stream["paths"][:2]:
        assert main(["add", str(state), str(path), "--quiet"]) == 0
    (gen,) = state.glob("gen-*/sum.safetensors")
    return state, gen


def tensor_offset(path: Path, name: str) -> int:
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    return 8 + header_len + header[name]["data_offsets"][0]


def flip_exponent_bit(path: Path, name: str) -> None:
    """Flip the top exponent bit of the tensor's first float64 entry (little-endian)."""
    offset = tensor_offset(path, name) + 7
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["exponent", "zeros"])
def test_bit_rot_in_the_state_is_refused_by_add_export_and_verify(stream, committed, damage):
    state, gen = committed
    if damage == "exponent":
        flip_exponent_bit(gen, WEIGHT)
    else:
        with open(gen, "r+b") as f:
            f.seek(tensor_offset(gen, WEIGHT))
            f.write(bytes(64))
    before = tree_digest(state)
    result = run_cli("add", str(state), str(stream["paths"][2]), "--quiet")
    assert result.returncode == 2, result.stderr
    assert "does not match the checksum" in result.stderr and WEIGHT in result.stderr
    assert str(gen) in result.stderr and "Traceback" not in result.stderr
    assert tree_digest(state) == before
    out = stream["tmp"] / "out"
    with pytest.raises(StateError, match="does not match the checksum"):
        MergeState.open(state).export(out)
    assert not out.exists()
    quick = run_cli("status", str(state))
    assert quick.returncode == 0  # sizes and headers are intact: only --verify reads the data
    verified = run_cli("status", str(state), "--verify")
    assert verified.returncode == 1
    assert "DAMAGED" in verified.stdout and WEIGHT in verified.stdout


def test_damaged_header_is_refused_at_open(committed):
    state, gen = committed
    data = bytearray(gen.read_bytes())
    index = data.index(b'"F64"')
    data[index + 2] = ord("3")  # F64 -> F34 would be refused by the parser; F32 parses
    data[index + 2 : index + 4] = b"32"
    gen.write_bytes(bytes(data))
    with pytest.raises(StateError, match="damaged|unreadable"):
        MergeState.open(state).state_dict()
    assert run_cli("status", str(state)).returncode == 1


def test_status_is_not_healthy_without_its_generation_file(committed):
    state, gen = committed
    gen.unlink()
    result = run_cli("status", str(state))
    assert result.returncode == 1
    assert "DAMAGED" in result.stdout and "missing" in result.stdout
    as_json = json.loads(run_cli("status", str(state), "--json").stdout)
    assert as_json["health"]["ok"] is False


def test_row_streamed_tensors_are_verified(stream, tmp_path, monkeypatch):
    """Tensors folded by row blocks are checked when their last block is read."""
    import mergestream.step.engine as engine

    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 64)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 40)
    state = MergeState.create(tmp_path / "s", stream["base_dir"], "opcm")
    for path in stream["paths"][:2]:
        state.add(path)
    (gen,) = (tmp_path / "s").glob("gen-*/sum.safetensors")
    flip_exponent_bit(gen, WEIGHT)
    with pytest.raises(StateError, match="does not match the checksum"):
        MergeState.open(tmp_path / "s").add(stream["paths"][2])


def test_format_1_states_are_still_read(committed, stream):
    """A state written before checksums existed opens, adds (becoming format 2) and exports."""
    state, _ = committed
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["parts"]
    del manifest["checksum"]  # format 1 manifests carried none
    (state / "manifest.json").write_text(json.dumps(manifest))
    old = MergeState.open(state).state_dict()
    reference = MergeState.in_memory(stream["base"], "opcm")
    for tensors in stream["tuned"][:2]:
        reference.add(tensors)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(old[name], tensor), name
    status = json.loads(run_cli("status", str(state), "--json").stdout)
    assert status["health"] == {
        "ok": True,
        "problems": [],
        "verified": False,
        "checksums": False,
    }
    MergeState.open(state).add(stream["paths"][2])
    upgraded = json.loads((state / "manifest.json").read_text())
    assert upgraded["format_version"] == FORMAT_VERSION and upgraded["parts"]


# ------------------------------------------------------------------------------ 5. full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB file system (tmpfs), unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def big_stream(tmp_path: Path):
    """A base whose float64 OPCM generation (about 0.6 MiB) fits a 1 MiB disk once."""
    shapes = transformer_shapes(layers=1, hidden=96, intermediate=192, vocab=64, positions=8)
    base = make_base(shapes, seed=5)
    base_dir = save_model(tmp_path / "big-base", base)
    paths = []
    for seed in (6, 7):
        path = tmp_path / f"big-{seed}.safetensors"
        save_file(apply(base, make_task_vector(base, seed=seed)), str(path))
        paths.append(path)
    return base_dir, paths


def test_full_disk_during_add_is_one_clear_line(tmp_path, small_disk):
    base_dir, paths = big_stream(tmp_path)
    state = small_disk / "state"
    first = run_cli("init", str(state), "--base", str(base_dir), "--quiet")
    assert first.returncode == 0, first.stderr
    assert run_cli("add", str(state), str(paths[0]), "--quiet").returncode == 0
    before = tree_digest(state)
    plan = run_cli("plan", str(state), str(paths[1]))
    assert "free" in plan.stdout and "warning" in plan.stdout.lower(), plan.stdout
    result = run_cli("add", str(state), str(paths[1]), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mergestream: error: no space left on {small_disk}")
    assert "bytes needed" in lines[0] and "free" in lines[0] and "unchanged" in lines[0]
    assert tree_digest(state) == before, "a failed add left files behind"
    assert not (state / "manifest.json.tmp").exists()


def test_full_disk_during_export_leaves_out_untouched(tmp_path, small_disk):
    base_dir, paths = big_stream(tmp_path)
    state = MergeState.create(tmp_path / "state", base_dir, "opcm")
    state.add(paths[0])
    out = small_disk / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        f.write(bytes(900 << 10))
    with pytest.raises(MergestreamError, match=f"no space left on {small_disk}") as raised:
        state.export(out, overwrite=True)
    assert "bytes needed" in str(raised.value) and "unchanged" in str(raised.value)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_manifest_write_on_a_full_disk_leaves_no_temporary(small_disk):
    target = small_disk / "manifest.json"
    write_json_atomic(target, {"version": 1})
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as f:
        while True:
            f.write(bytes(64 << 10))
    with pytest.raises(OSError) as raised:
        write_json_atomic(target, {"version": 2, "padding": "x" * (256 << 10)})
    assert raised.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"version": 1}
    assert not (small_disk / "manifest.json.tmp").exists()


# ------------------------------------------------------------------------ 6-8. export safety


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(out / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(str(out / shard)))
    return tensors


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_step(path: Path) -> str:
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(header_len))["__metadata__"]["mergestream_step"]


EXPORT_LOOP = r"""
import sys
from mergestream import MergeState
state = MergeState.open(sys.argv[1])
print("ready", flush=True)
while True:
    state.export(sys.argv[2], max_shard_size="1KB")
"""


def test_killed_sharded_exports_never_leave_a_mixture(stream, tmp_path):
    state_dir = tmp_path / "state"
    state = MergeState.create(state_dir, stream["base_dir"], "opcm")
    state.add(stream["paths"][0])
    out = tmp_path / "out"
    state.export(out, max_shard_size="1KB")
    step1 = fingerprint(merged_weights(out))
    assert len(list(out.glob("model-*.safetensors"))) > 2
    state.add(stream["paths"][1])
    step2 = fingerprint(state.state_dict())
    seen = set()
    env = {**os.environ, "PYTHONPATH": SRC}
    for delay in (0.05, 0.2, 0.4, 0.7):
        process = subprocess.Popen(
            [sys.executable, "-c", EXPORT_LOOP, str(state_dir), str(out)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = fingerprint(merged_weights(out))
        assert now in (step1, step2), f"a mixture after a kill at {delay}s"
        steps = {shard_step(shard) for shard in out.glob("*.safetensors")}
        assert steps == {"2" if now == step2 else "1"}, steps
        assert (out / ".mergestream-export.json").exists() and (out / "README.md").exists()
        seen.add(now)
    assert step2 in seen, "no export completed before the last kill"
    state.export(out, max_shard_size="1KB")
    assert fingerprint(merged_weights(out)) == step2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_export_refuses_a_foreign_directory_and_keeps_user_files(stream, tmp_path):
    state = MergeState.create(tmp_path / "state", stream["base_dir"], "opcm")
    state.add(stream["paths"][0])
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "README.md").write_text("my notes\n")
    (out / "sub" / "results.csv").write_text("a,b\n")
    (out / "eval.json").write_text("{}\n")
    before = tree_digest(out)
    with pytest.raises(MergestreamError, match="not written by mergestream export.*--overwrite"):
        state.export(out)
    assert tree_digest(out) == before
    state.export(out, overwrite=True)
    assert (out / "sub" / "results.csv").read_text() == "a,b\n"
    assert (out / "eval.json").read_text() == "{}\n"
    assert "mergestream" in (out / "README.md").read_text()
    # A later export owns what the first one wrote, and still keeps what it did not.
    (out / "later.txt").write_text("added after the export\n")
    state.add(stream["paths"][1])
    state.export(out)
    assert (out / "later.txt").exists() and (out / "eval.json").exists()
    assert fingerprint(merged_weights(out)) == fingerprint(state.state_dict())


def test_export_refuses_user_shards_it_would_not_replace(stream, tmp_path):
    state = MergeState.create(tmp_path / "state", stream["base_dir"], "opcm")
    out = tmp_path / "theirs"
    out.mkdir()
    save_file(stream["base"], str(out / "model-00001-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    before = tree_digest(out)
    with pytest.raises(MergestreamError, match="model-00001-of-00002.safetensors"):
        state.export(out, overwrite=True)
    assert tree_digest(out) == before


def test_export_never_writes_onto_the_base_or_the_state(stream, tmp_path):
    file_base = tmp_path / "bf"
    file_base.mkdir()
    save_file(stream["base"], str(file_base / "model.safetensors"))
    state = MergeState.create(tmp_path / "s", file_base / "model.safetensors", "opcm")
    state.add(stream["paths"][0])
    before = tree_digest(file_base)
    for target in (file_base, tmp_path, tmp_path / "s", tmp_path / "s" / "x"):
        with pytest.raises(MergestreamError, match="cannot export"):
            state.export(target, overwrite=True)
    assert tree_digest(file_base) == before
    state.export(file_base / "merged")  # inside the base's folder is fine
    assert (file_base / "merged" / "model.safetensors").exists()


# --------------------------------------------------------------------------------- 9. fsync


def test_init_and_export_fsync_what_they_promise(stream, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    state_dir = tmp_path / "new" / "state"
    state = MergeState.create(state_dir, stream["base_dir"], "opcm")
    assert str(tmp_path / "new") in synced and str(tmp_path) in synced
    state.add(stream["paths"][0])
    synced.clear()
    out = state.export(tmp_path / "out")
    # Files are fsync'd while they sit in the staging directory, which then becomes OUT.
    staged = {Path(p).name for p in synced}
    for name in ("config.json", "README.md", "model.safetensors", ".mergestream-export.json"):
        assert name in staged, name
    assert str(tmp_path) in synced  # the directory entry of the switched-in OUT
    assert (out / "config.json").read_text() == '{"model_type": "bert"}\n'


# -------------------------------------------------------------------------- smaller things


def test_a_manifest_missing_a_field_is_named(committed):
    state, _ = committed
    manifest = json.loads((state / "manifest.json").read_text())
    del manifest["method"]["name"]
    (state / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="lacks 'method.name'; it is damaged"):
        MergeState.open(state)
    result = run_cli("status", str(state))
    assert result.returncode == 2 and "lacks 'method.name'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_read_only_state_gets_a_clear_message(committed, stream):
    state, _ = committed
    result = subprocess.run(["mount", "--bind", str(state), str(state)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        added = run_cli("add", str(state), str(stream["paths"][2]), "--quiet")
        assert added.returncode == 2 and "Traceback" not in added.stderr
        assert "lock file" in added.stderr and "write access" in added.stderr
        assert run_cli("status", str(state)).returncode == 0  # reading still works
    finally:
        subprocess.run(["umount", str(state)], check=False)


def test_other_float_dtypes_are_merged_and_noted(stream, tmp_path):
    """A float16 or float64 checkpoint against a float32 base is accepted: every method
    computes in float64 and the export keeps the base's dtype; the ledger says so."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in stream["tuned"][0].items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    state = MergeState.create(tmp_path / "s", stream["base_dir"], "task_arithmetic")
    state.add(tmp_path / "half.safetensors")
    notes = state.ledger[0]["notes"]
    assert any("float16 tensors merged into a float32 base" in n for n in notes)
    reference = MergeState.in_memory(stream["base"], "task_arithmetic")
    reference.add(half)
    exported = load_file(str(state.export(tmp_path / "out") / "model.safetensors"))
    for name, tensor in reference.state_dict().items():
        assert exported[name].dtype == stream["base"][name].dtype
        assert torch.equal(exported[name], tensor), name


def test_a_base_rewritten_in_place_is_caught(stream, tmp_path):
    base_file = stream["base_dir"] / "model.safetensors"
    state = MergeState.create(tmp_path / "s", stream["base_dir"], "opcm")
    stat = base_file.stat()

    def keep_stamps() -> None:
        assert base_file.stat().st_size == stat.st_size
        os.utime(base_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # Same size and time, another header: two same-shaped tensors trade places. Caught by
    # every add, from the headers alone.
    data = bytearray(base_file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    first, second = "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"
    header[first]["data_offsets"], header[second]["data_offsets"] = (
        header[second]["data_offsets"],
        header[first]["data_offsets"],
    )
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= header_len
    data[8 : 8 + header_len] = encoded + b" " * (header_len - len(encoded))
    base_file.write_bytes(bytes(data))
    keep_stamps()
    with pytest.raises(StateError, match="has changed since this state was created"):
        MergeState.open(tmp_path / "s").add(stream["paths"][0])
    # Same header, other data: caught when the whole content is verified.
    changed = dict(stream["base"])
    changed[WEIGHT] = changed[WEIGHT] + 1
    save_file(changed, str(base_file))
    keep_stamps()
    assert state.step == 0
    with pytest.raises(StateError, match="has changed"):
        MergeState.open(tmp_path / "s").add(stream["paths"][0], verify_base=True)
    result = run_cli("add", str(tmp_path / "s"), str(stream["paths"][0]), "--verify-base")
    assert result.returncode == 2 and "has changed" in result.stderr


def test_sentence_transformers_folders_are_exported(tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    BertModel(config).save_pretrained(hf)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    word = models.Transformer(str(hf))
    pooling = models.Pooling(16, pooling_mode="max")
    base_dir = tmp_path / "st-base"
    SentenceTransformer(modules=[word, pooling, models.Normalize()]).save(str(base_dir))
    assert (base_dir / "1_Pooling" / "config.json").exists()
    state = MergeState.create(tmp_path / "s", base_dir, "opcm")
    out = state.export(tmp_path / "out")
    assert (out / "1_Pooling" / "config.json").read_text() == (
        base_dir / "1_Pooling" / "config.json"
    ).read_text()
    assert (out / "2_Normalize").is_dir() and (out / "modules.json").exists()
    sentences = ["w1 w2 w3", "w4 w5"]
    want = SentenceTransformer(str(base_dir), device="cpu").encode(sentences)
    got = SentenceTransformer(str(out), device="cpu").encode(sentences)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


def test_import_mergestream_gives_the_allocator_and_no_torch():
    code = (
        "import sys, mergestream; "
        "assert callable(mergestream.allocator.return_freed_memory_to_os); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "from mergestream import MergeState; assert 'torch' in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert result.returncode == 0, result.stderr


def test_help_and_status_do_not_import_torch(committed):
    state, _ = committed
    for args in (
        ["--help"],
        ["methods"],
        ["status", str(state)],
        ["status", str(state), "--verify"],
    ):
        code = (
            "import sys\nfrom mergestream.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        assert result.returncode == 0, (args, result.stderr)


def test_no_stale_staging_directories_pile_up(stream, tmp_path):
    state = MergeState.create(tmp_path / "s", stream["base_dir"], "opcm")
    out = tmp_path / "out"
    stale = tmp_path / ".out.mergestream-999999999-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    state.export(out)
    assert not stale.exists()
    shutil.rmtree(out)


def test_the_torch_free_method_listing_equals_the_classes():
    """`mergestream methods` lists the methods' configs; it must say what the classes say."""
    from mergestream.methods import METHODS
    from mergestream.methods.config import describe_config
    from mergestream.methods.configs import describe_methods

    described = describe_methods()
    assert described is not None, "a method file is not in the declarative form"
    assert [d.name for d in described] == sorted(METHODS)
    for d in described:
        cls = METHODS[d.name]
        assert d.summary == cls.summary
        assert d.factored == cls.factored, d.name
        assert d.parameters == describe_config(cls.config_class), d.name
        # every built-in method cites its paper (the model card shows it)
        assert cls.config_class.paper.endswith(")"), d.name
        url = cls.config_class.paper_url
        assert url == "" or url.startswith("https://arxiv.org/abs/"), d.name
