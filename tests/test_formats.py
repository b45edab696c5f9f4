"""Checkpoints in every accepted layout and dtype merge to the same result; name mismatches are
refused with a suggestion, or mapped exactly as the options say; reads stay lazy."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergestream import CheckpointError, MergeState
from mergestream.cli import main
from mergestream.io.checkpoint import SafetensorsSource, TorchSource
from mergestream.io.open import open_checkpoint
from mergestream.io.safetensors_stream import SafetensorsFile
from mergestream.store.hashing import content_hash
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

SHAPES = transformer_shapes(layers=1, hidden=8, intermediate=12, vocab=20, positions=4)


class Recorder:
    """A Progress that remembers what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, label: str, total_items: int, total_bytes: int) -> None:
        self.events.append(("start", label, total_items, total_bytes))

    def advance(self, items: int, nbytes: int) -> None:
        self.events.append(("advance", items, nbytes))

    def finish(self) -> None:
        self.events.append(("finish",))

    def phases(self) -> dict[str, tuple[int, int, int, int]]:
        """label -> (declared items, declared bytes, items advanced, bytes advanced)."""
        out, label = {}, None
        for event in self.events:
            if event[0] == "start":
                label = event[1]
                out[label] = [event[2], event[3], 0, 0]
            elif event[0] == "advance":
                out[label][2] += event[1]
                out[label][3] += event[2]
        return {k: tuple(v) for k, v in out.items()}


@pytest.fixture
def models():
    base = make_base(SHAPES, seed=1)
    return base, [apply(base, make_task_vector(base, seed=s)) for s in (2, 3)]


def write_dir(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], kind: str) -> Path:
    """HF-style shards (3) + index, as safetensors or torch .bin."""
    directory.mkdir(parents=True)
    names = list(tensors)
    parts = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        if kind == "safetensors":
            shard = f"model-{i:05d}-of-00003.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / shard))
        else:
            shard = f"pytorch_model-{i:05d}-of-00003.bin"
            torch.save({n: tensors[n] for n in part}, directory / shard)
        weight_map.update({n: shard for n in part})
    index = (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def reference(base: dict, checkpoints: list[dict], tmp: Path) -> dict[str, torch.Tensor]:
    """Merge from plain single-file safetensors directories."""
    base_dir = write_dir(tmp / "ref-base", base)
    state = MergeState.create(tmp / "ref-state", base_dir)
    for i, ckpt in enumerate(checkpoints):
        state.add(write_dir(tmp / f"ref-{i}", ckpt))
    return state.state_dict()


def merged(base_path: Path, checkpoint_paths: list[Path], state_dir: Path, **options):
    state = MergeState.create(state_dir, base_path)
    for path in checkpoint_paths:
        state.add(path, **options)
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize(
    "layout", ["file", "dir", "sharded", "bin", "pt", "bin-dir", "bin-sharded", "wrapped-pt"]
)
def test_every_layout_merges_identically(models, tmp_path, layout):
    base, ckpts = models
    expected = reference(base, ckpts, tmp_path)

    def place(tensors: dict, name: str) -> Path:
        root = tmp_path / layout / name
        if layout == "file":
            root.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(root.with_suffix(".safetensors")))
            return root.with_suffix(".safetensors")
        if layout == "dir":
            return write_dir(root, tensors)
        if layout == "sharded":
            return write_sharded(root, tensors, "safetensors")
        if layout == "bin-sharded":
            return write_sharded(root, tensors, "torch")
        if layout == "bin-dir":
            root.mkdir(parents=True)
            torch.save(tensors, root / "pytorch_model.bin")
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        path = root.with_suffix(".pt" if layout in ("pt", "wrapped-pt") else ".bin")
        torch.save({"epoch": 3, "state_dict": tensors} if layout == "wrapped-pt" else tensors, path)
        return path

    base_path = place(base, "base")
    paths = [place(c, f"ckpt{i}") for i, c in enumerate(ckpts)]
    state = merged(base_path, paths, tmp_path / layout / "state")
    assert_same(state.state_dict(), expected)
    assert state.ledger[0]["sha256"] == content_hash(open_checkpoint(paths[0]))


def test_sources_report_files_and_specs(models, tmp_path):
    base, _ = models
    sharded = open_checkpoint(write_sharded(tmp_path / "s", base, "safetensors"))
    assert isinstance(sharded, SafetensorsSource) and len(sharded.files()) == 3
    binary = open_checkpoint(write_sharded(tmp_path / "b", base, "torch"))
    assert isinstance(binary, TorchSource) and len(binary.files()) == 3
    for source in (sharded, binary):
        assert sorted(source.names()) == sorted(base)
        for name, tensor in base.items():
            assert source.spec(name).shape == tuple(tensor.shape)
            assert torch.equal(source.get(name), tensor)
        source.close()


def test_legacy_torch_format_is_refused_clearly(models, tmp_path):
    path = tmp_path / "old.bin"
    torch.save(models[0], path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="zip format") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_torch_file_without_a_state_dict(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no state dict.*'epoch'"):
        open_checkpoint(path)


def test_ambiguous_directory_is_refused(models, tmp_path):
    directory = tmp_path / "two"
    directory.mkdir()
    save_file(models[0], str(directory / "a.safetensors"))
    save_file(models[0], str(directory / "b.safetensors"))
    with pytest.raises(CheckpointError, match="ambiguous"):
        open_checkpoint(directory)


# ------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("ckpt_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_checkpoints_into_a_float32_base(models, tmp_path, ckpt_dtype):
    base, ckpts = models
    cast = [
        {k: v.to(ckpt_dtype) if v.is_floating_point() else v for k, v in c.items()} for c in ckpts
    ]
    state = MergeState.create(tmp_path / "state", write_dir(tmp_path / "base", base))
    for i, c in enumerate(cast):
        state.add(write_dir(tmp_path / f"c{i}", c))
    out = state.state_dict()
    assert all(out[n].dtype == base[n].dtype for n in base)
    # identical to merging the upcast checkpoints in memory
    upcast = [{k: v.to(base[k].dtype) for k, v in c.items()} for c in cast]
    memory = MergeState.in_memory(base)
    for c in upcast:
        memory.add(c)
    assert_same(out, memory.state_dict())


def test_bf16_base_exports_bf16_unless_told(models, tmp_path):
    base, ckpts = models
    base16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.items()}
    ck16 = [
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in c.items()}
        for c in ckpts
    ]
    state = MergeState.create(tmp_path / "state", write_dir(tmp_path / "base", base16))
    state.add(write_dir(tmp_path / "c0", ck16[0]))
    with SafetensorsFile(state.export(tmp_path / "out") / "model.safetensors") as f:
        assert {str(f.spec(n).dtype) for n in f.names()} == {"torch.bfloat16", "torch.int64"}
    with SafetensorsFile(
        state.export(tmp_path / "out32", dtype=torch.float32) / "model.safetensors"
    ) as f:
        assert {str(f.spec(n).dtype) for n in f.names()} == {"torch.float32", "torch.int64"}


def test_integer_buffers_come_from_the_base(models, tmp_path):
    base, ckpts = models
    odd = dict(ckpts[0])
    odd["embeddings.position_ids"] = odd["embeddings.position_ids"] + 7
    state = MergeState.create(tmp_path / "state", write_dir(tmp_path / "base", base))
    state.add(write_dir(tmp_path / "c", odd))
    assert torch.equal(
        state.state_dict()["embeddings.position_ids"], base["embeddings.position_ids"]
    )


# ------------------------------------------------------------------------------ name mapping


def test_prefixed_checkpoint_is_refused_then_mapped(models, tmp_path):
    base, ckpts = models
    base_dir = write_dir(tmp_path / "base", base)
    prefixed = write_dir(tmp_path / "prefixed", {f"model.{k}": v for k, v in ckpts[0].items()})
    state = MergeState.create(tmp_path / "state", base_dir)
    with pytest.raises(CheckpointError, match=r"--strip-prefix model\.") as info:
        state.add(prefixed)
    assert "extra" not in str(info.value), "the prefixed buffer is not an extra tensor"
    assert state.step == 0
    state.add(prefixed, strip_prefix="model.")
    plain = MergeState.create(tmp_path / "plain", base_dir)
    plain.add(write_dir(tmp_path / "plain-ckpt", ckpts[0]))
    assert_same(state.state_dict(), plain.state_dict())
    assert state.ledger[0]["mapping"] == {"strip_prefix": "model."}


def test_add_prefix_through_the_cli(models, tmp_path, capsys):
    base, ckpts = models
    base_dir = write_dir(tmp_path / "base", {f"bert.{k}": v for k, v in base.items()})
    bare = write_dir(tmp_path / "bare", ckpts[0])
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(base_dir), "--quiet"]) == 0
    assert main(["add", str(state), str(bare), "--quiet"]) == 2
    assert "--add-prefix bert." in capsys.readouterr().err
    assert main(["add", str(state), str(bare), "--quiet", "--add-prefix", "bert."]) == 0
    assert main(["status", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ledger"][0]["mapping"] == {"add_prefix": "bert."}
    merged_state = MergeState.open(state).state_dict()
    plain = MergeState.in_memory(base)
    plain.add(ckpts[0])
    assert_same(merged_state, {f"bert.{k}": v for k, v in plain.state_dict().items()})


def test_subset_checkpoint_with_missing_base(models, tmp_path):
    base, ckpts = models
    tower = {k: v for k, v in ckpts[0].items() if k.startswith("encoder.")}
    base_dir = write_dir(tmp_path / "base", base)
    subset = write_dir(tmp_path / "subset", tower)
    state = MergeState.create(tmp_path / "state", base_dir)
    with pytest.raises(CheckpointError, match="all under 'encoder.layer.0.'.*--missing base"):
        state.add(subset)
    state.add(subset, missing="base")
    # the same as a full checkpoint whose other tensors equal the base's
    full = {k: tower.get(k, v) for k, v in base.items()}
    reference_state = MergeState.in_memory(base)
    reference_state.add(full)
    assert_same(state.state_dict(), reference_state.state_dict())
    absent = sum(1 for k, v in base.items() if v.is_floating_point() and k not in tower)
    assert state.ledger[0]["mapping"] == {"missing": "base", "taken_from_base": absent}


def test_extra_tensors_can_be_ignored(models, tmp_path, capsys):
    base, ckpts = models
    with_head = dict(ckpts[0], **{"classifier.weight": torch.ones(3, 8)})
    state = tmp_path / "state"
    assert (
        main(["init", str(state), "--base", str(write_dir(tmp_path / "b", base)), "--quiet"]) == 0
    )
    path = write_dir(tmp_path / "head", with_head)
    assert main(["add", str(state), str(path), "--quiet", "--extra", "ignore"]) == 0
    entry = MergeState.open(state).ledger[0]
    assert entry["mapping"] == {"extra": "ignore", "ignored": 1}


# ---------------------------------------------------------------------------------- laziness


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_full_read_does_not_grow_the_process(tmp_path, kind):
    """Reading every tensor of a 256 MB checkpoint, dropping each, keeps the resident set within
    a couple of tensors (a memory-mapped reader would keep all 256 MB resident)."""
    tensors = {f"t{i}": torch.full((8 << 20,), float(i)) for i in range(8)}  # 8 x 32 MB
    path = tmp_path / ("big.safetensors" if kind == "safetensors" else "big.bin")
    if kind == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    del tensors
    source = open_checkpoint(path)
    before = _rss_mb()
    for name in source.names():
        tensor = source.get(name)
        assert float(tensor[-1]) == float(name[1:])
        del tensor
    grown = _rss_mb() - before
    source.close()
    assert grown < 80, f"reading grew the process by {grown:.0f} MB"


def test_hashing_streams_with_progress(models, tmp_path):
    path = write_dir(tmp_path / "c", models[1][0])
    source = open_checkpoint(path)
    recorder = Recorder()
    digest = content_hash(source, recorder)
    raw = (path / "model.safetensors").read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    items, total, done_items, done_bytes = recorder.phases()["hashing"]
    assert total == done_bytes == len(raw)
    assert items == done_items == len(source.names())


def test_add_and_export_report_progress(models, tmp_path):
    base, ckpts = models
    state = MergeState.create(tmp_path / "state", write_dir(tmp_path / "base", base))
    recorder = Recorder()
    state.add(write_dir(tmp_path / "c", ckpts[0]), progress=recorder)
    state.export(tmp_path / "out", progress=recorder)
    phases = recorder.phases()
    assert set(phases) == {"hashing", "step 1", "export"}
    for label, (items, nbytes, done_items, done_bytes) in phases.items():
        assert (items, nbytes) == (done_items, done_bytes), label
    floats = sum(1 for v in base.values() if v.is_floating_point())
    assert phases["step 1"][0] == floats
    assert phases["export"][0] == len(base)


def test_cli_is_quiet_when_not_a_terminal(models, tmp_path, capsys):
    base, ckpts = models
    state = tmp_path / "state"
    main(["init", str(state), "--base", str(write_dir(tmp_path / "b", base))])
    main(["add", str(state), str(write_dir(tmp_path / "c", ckpts[0]))])
    main(["export", str(state), str(tmp_path / "out")])
    assert "\r" not in capsys.readouterr().err


# -------------------------------------------------------------------------------------- plan


def test_plan_predicts_without_writing(models, tmp_path, capsys):
    base, ckpts = models
    state = tmp_path / "state"
    main(["init", str(state), "--base", str(write_dir(tmp_path / "b", base)), "--quiet"])
    path = write_dir(tmp_path / "c", ckpts[0])
    files_before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["plan", str(state), str(path)]) == 0
    text = capsys.readouterr().out
    assert "6 projected, 14 added, 1 copied" in text and "memory:" in text and "disk:" in text
    assert main(["add", str(state), str(path), "--dry-run"]) == 0
    assert "nothing is written" in capsys.readouterr().out
    assert main(["plan", str(state), str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    # OPCM keeps its running sum in float64 (8 bytes an entry)
    generation = sum(math.prod(v.shape) * 8 for v in base.values() if v.is_floating_point())
    assert plan["state_generation_bytes"] == generation
    assert plan["peak_memory_bytes"] > plan["runtime_bytes"] > 0
    assert plan["tensors"] == {"projected": 6, "added": 14, "copied": 1}
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert after == files_before
    assert MergeState.open(state).step == 0


def test_plan_refuses_what_add_would_refuse(models, tmp_path, capsys):
    base, ckpts = models
    state = tmp_path / "state"
    main(["init", str(state), "--base", str(write_dir(tmp_path / "b", base)), "--quiet"])
    prefixed = write_dir(tmp_path / "p", {f"model.{k}": v for k, v in ckpts[0].items()})
    assert main(["plan", str(state), str(prefixed)]) == 2
    assert "--strip-prefix model." in capsys.readouterr().err
    assert main(["plan", str(state), str(prefixed), "--strip-prefix", "model."]) == 0
    assert "strip_prefix=model." in capsys.readouterr().out


def test_non_contiguous_tensors_in_memory(models):
    base, ckpts = models
    expected = MergeState.in_memory(base)
    for c in ckpts:
        expected.add(c)

    def strided(tensors):  # same values, transposed memory layout
        return {k: v.T.contiguous().T if v.ndim == 2 else v for k, v in tensors.items()}

    state = MergeState.in_memory(strided(base))
    for c in ckpts:
        state.add(strided(c))
    assert_same(state.state_dict(), expected.state_dict())
