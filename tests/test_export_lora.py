"""`export --as-lora`: the merge as a PEFT adapter, checked by loading it with PEFT.

The reference is computed here, independently: the truncated SVD of each linear weight's merged
task vector (from `MergeState.task_vectors()`), and base + τ for tensors saved whole. PEFT loads
the adapter onto a float64 base and `merge_and_unload()` gives the weights compared with it. With
float64 factors the only differences are float64 round-off (≤1e-12 relative); with the default
float32 factors, float32 rounding of A and B (≤1e-6 relative).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES, tree_digest
from lora_helpers import FAMILIES, Zoo, load_adapter_model, state_dict_of
from safetensors.torch import load_file

import mergestream
from mergestream.cli import main
from mergestream.errors import MergestreamError
from mergestream.io.lora import PEFT_PREFIX
from mergestream.io.safetensors_stream import StreamingSafetensorsWriter
from mergestream.methods.classify import default_is_linear_weight
from mergestream.publish.destination import MARKER
from mergestream.publish.export_lora import export_lora, truncated_factors
from mergestream.state import MergeState
from mergestream.synthetic import write_stream

SRC = str(Path(mergestream.__file__).resolve().parent.parent)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def merged(request, tmp_path_factory) -> tuple[Zoo, Path]:
    """An OPCM state holding two adapters and a full fine-tune of one family."""
    root = tmp_path_factory.mktemp(f"export_{request.param.name}")
    zoo = Zoo(request.param, root)
    state = MergeState.create(root / "state", zoo.base, "opcm")
    for item in (zoo.adapters[0], zoo.full, zoo.adapters[1]):
        state.add(item)
    return zoo, root / "state"


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _loaded_weights(zoo: Zoo, out: Path) -> dict[str, torch.Tensor]:
    model = load_adapter_model(zoo.family, zoo.base, out).merge_and_unload()
    return {k: v.to(torch.float64) for k, v in model.state_dict().items()}


def _check_export(zoo: Zoo, state_dir: Path, out: Path, tolerance: float) -> None:
    state = MergeState.open(state_dir)
    report_modules = {m["module"]: m for m in _card_modules(out)}
    config = json.loads((out / "adapter_config.json").read_text())
    fan_in_fan_out = config["fan_in_fan_out"]
    weights = _loaded_weights(zoo, out)
    base = state_dict_of(zoo.base)
    for name, tau in state.task_vectors():
        module = name.rpartition(".")[0]
        got = weights[name] - base[name]
        if name in report_modules_weights(report_modules):
            matrix = tau.t() if fan_in_fan_out else tau
            rank = report_modules[module]["rank"]
            expected = _truncated(matrix, rank)
            expected = expected.t() if fan_in_fan_out else expected
            retained = float(expected.norm() / tau.norm())
            assert report_modules[module]["retained"] == pytest.approx(retained, abs=1e-6)
        else:
            expected = tau  # saved whole (modules_to_save) or carried by lora_B's bias
        if expected.norm() == 0:
            assert torch.equal(got, expected), name
        else:
            assert _relative_error(got, expected) <= tolerance, name


def report_modules_weights(modules: dict[str, dict]) -> set[str]:
    return {m + ".weight" for m in modules}


def _card_modules(out: Path) -> list[dict]:
    """The per-module table of the model card: module, rank, retained fraction."""
    rows = []
    for line in (out / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            rows.append({"module": cells[0], "rank": int(cells[1]), "retained": float(cells[2])})
    return rows


def test_exported_adapter_loads_and_is_the_truncated_svd(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    report = export_lora(MergeState.open(state_dir), out, rank=2, dtype=torch.float64)
    assert report.modules and all(m.rank == 2 for m in report.modules)
    # The full fine-tune changed norms and embeddings too: they are saved whole, not dropped.
    assert report.modules_to_save and not report.dropped
    _check_export(zoo, state_dir, out, tolerance=1e-12)


def test_default_float32_factors(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    export_lora(MergeState.open(state_dir), out, rank=3)
    _check_export(zoo, state_dir, out, tolerance=1e-6)


def test_energy_target_picks_the_smallest_rank_per_module(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    state = MergeState.open(state_dir)
    report = export_lora(state, out, energy=0.8, dtype=torch.float64)
    taus = dict(state.task_vectors())
    for m in report.modules:
        s = torch.linalg.svdvals(taus[m.module + ".weight"])
        kept = torch.cumsum(s.square(), 0) / s.square().sum()
        assert kept[m.rank - 1] >= 0.8 - 1e-12
        assert m.rank == 1 or kept[m.rank - 2] < 0.8
    assert len({m.rank for m in report.modules}) > 1  # ranks differ: rank_pattern is exercised
    _check_export(zoo, state_dir, out, tolerance=1e-12)


def test_drop_other_lists_what_it_leaves_out(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    state = MergeState.open(state_dir)
    report = export_lora(state, out, rank=2, drop_other=True, dtype=torch.float64)
    lora_modules = {m.module for m in report.modules}
    expected_dropped = sorted(
        name
        for name, tau in state.task_vectors()
        if bool(tau.any())
        and not (len(tau.shape) == 2 and default_is_linear_weight(name))
        and name.rpartition(".")[0] not in lora_modules
    )
    assert report.dropped == expected_dropped and expected_dropped
    assert not report.modules_to_save
    card = (out / "README.md").read_text()
    assert all(name in card for name in expected_dropped)
    weights = _loaded_weights(zoo, out)
    base = state_dict_of(zoo.base)
    for name in expected_dropped:
        assert torch.equal(weights[name], base[name].to(torch.float64)), name


def test_truncated_factors_are_balanced_and_exact_at_full_rank() -> None:
    torch.manual_seed(0)
    tau = torch.randn(7, 5, dtype=torch.float64)
    full = truncated_factors(tau, rank=10)
    assert full.rank == 5 and full.retained == pytest.approx(1.0, abs=1e-15)
    assert _relative_error(full.b @ full.a, tau) <= 1e-14
    two = truncated_factors(tau, rank=2)
    assert torch.allclose(two.b.norm(dim=0), two.a.norm(dim=1), rtol=1e-12)
    assert _relative_error(two.b @ two.a, _truncated(tau, 2)) <= 1e-14


def test_cli_export_as_lora(merged, tmp_path, capsys) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    assert main(["export", str(state_dir), str(out), "--as-lora", "2"]) == 0
    assert "wrote a LoRA adapter" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "| module | rank | ‖τ‖ retained |" in card
    _check_export(zoo, state_dir, out, tolerance=1e-6)
    # OUT is an earlier export now: the next one replaces it.
    assert main(["export", str(state_dir), str(out), "--as-lora", "1", "--quiet"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    _check_export(zoo, state_dir, out, tolerance=1e-6)


def test_refuses_a_merge_that_changed_nothing(merged, tmp_path) -> None:
    zoo, _ = merged
    state = MergeState.create(tmp_path / "state", zoo.base, "opcm")
    with pytest.raises(MergestreamError, match="equals the base"):
        export_lora(state, tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()


# An adapter export is an export like the full model's: destination rules, marker, atomic switch,
# file modes, dtype. A tiny synthetic float32 stream (no PEFT model needed): its embeddings and
# norms change, so the adapter has tensors saved whole (modules_to_save).

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """root/state: an OPCM state of two models merged into root/zoo/base."""
    root = tmp_path_factory.mktemp("synthetic_lora")
    base_dir, models = write_stream(root / "zoo", models=2, seed=5, shapes=TINY_SHAPES)
    state = MergeState.create(root / "state", base_dir, "opcm")
    for model in models:
        state.add(model)
    return root


@pytest.fixture
def synthetic(synthetic_root) -> MergeState:
    return MergeState.open(synthetic_root / "state")


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _hidden_siblings(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_adapter_export_has_an_export_marker_listing_its_files(synthetic, tmp_path) -> None:
    out = tmp_path / "adapter"
    export_lora(synthetic, out, rank=2)
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "mergestream-export" and marker["kind"] == "lora"
    assert marker["files"] == ADAPTER_FILES and marker["step"] == 2
    assert _files(out) == sorted([*ADAPTER_FILES, MARKER])


def test_an_earlier_adapter_export_is_replaced_and_other_folders_need_overwrite(
    synthetic, tmp_path
) -> None:
    out = tmp_path / "adapter"
    export_lora(synthetic, out, rank=2)
    (out / "notes.txt").write_text("mine")
    export_lora(synthetic, out, rank=1)  # an earlier export: replaced, the user's file kept
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert (out / "notes.txt").read_text() == "mine"

    # A folder that no export wrote (a PEFT adapter saved by hand): refused as it is ...
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text("{}")
    (foreign / "results.csv").write_text("acc\n0.9\n")
    before = tree_digest(foreign)
    with pytest.raises(MergestreamError, match="not written by mergestream export.*--overwrite"):
        export_lora(synthetic, foreign, rank=2)
    assert tree_digest(foreign) == before
    # ... and replaced with overwrite, the files an export does not write kept.
    export_lora(synthetic, foreign, rank=2, overwrite=True)
    assert json.loads((foreign / "adapter_config.json").read_text())["r"] == 2
    assert (foreign / "results.csv").read_text() == "acc\n0.9\n"
    assert _hidden_siblings(out) == [] and _hidden_siblings(foreign) == []


def test_full_and_adapter_exports_replace_each_other(synthetic, tmp_path) -> None:
    out = tmp_path / "out"
    export_lora(synthetic, out, rank=2)
    synthetic.export(out)  # the adapter is an earlier export: accepted, its files replaced
    assert _files(out) == sorted(["README.md", "model.safetensors", MARKER])
    assert json.loads((out / MARKER).read_text())["kind"] == "model"
    export_lora(synthetic, out, rank=2)  # and the other way round
    assert _files(out) == sorted([*ADAPTER_FILES, MARKER])


def test_adapter_export_refuses_the_state_and_the_base(synthetic, synthetic_root) -> None:
    state_dir, base_dir = synthetic_root / "state", synthetic_root / "zoo" / "base"
    with pytest.raises(MergestreamError, match="state directory"):
        export_lora(synthetic, state_dir / "adapter", rank=2)
    with pytest.raises(MergestreamError, match="base model's directory"):
        export_lora(synthetic, base_dir, rank=2, overwrite=True)  # not even with overwrite
    assert not (state_dir / "adapter").exists()
    assert not (base_dir / "adapter_config.json").exists()


def test_adapter_export_files_are_world_readable(synthetic, tmp_path) -> None:
    out = tmp_path / "adapter"
    previous = os.umask(0o022)
    try:
        export_lora(synthetic, out, rank=2)
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in _files(out)}
    assert modes == dict.fromkeys(sorted([*ADAPTER_FILES, MARKER]), 0o644)


def test_dtype_applies_to_the_tensors_saved_whole(synthetic, tmp_path) -> None:
    merged = synthetic.state_dict(torch.bfloat16)
    report = export_lora(synthetic, tmp_path / "bf16", rank=2, dtype=torch.bfloat16)
    assert report.modules_to_save  # embeddings and norms changed
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    whole = {n.removeprefix(PEFT_PREFIX): t for n, t in tensors.items() if "lora_" not in n}
    assert whole and all(torch.equal(t, merged[n]) for n, t in whole.items())
    # By default the factors are float32 and the tensors saved whole keep the base's dtype.
    export_lora(synthetic, tmp_path / "default", rank=2)
    tensors = load_file(str(tmp_path / "default" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_a_failed_adapter_export_leaves_out_as_it_was(synthetic, tmp_path, monkeypatch) -> None:
    out = tmp_path / "adapter"
    export_lora(synthetic, out, rank=2)
    before = tree_digest(out)

    def interrupted(self, name, tensor):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(StreamingSafetensorsWriter, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_lora(synthetic, out, rank=1)
    assert tree_digest(out) == before and _hidden_siblings(out) == []

    def disk_full(path, content):  # the marker, the last file written
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("mergestream.publish.destination.write_json_file", disk_full)
        with pytest.raises(MergestreamError, match="is unchanged"):
            export_lora(synthetic, out, rank=1)
    assert tree_digest(out) == before and _hidden_siblings(out) == []


KILLED_EXPORT = r"""
import sys, time
from pathlib import Path
import mergestream.publish.export_lora as export_lora
from mergestream.state import MergeState

state_dir, out, flag = sys.argv[1:]
save = export_lora._save_tensors

def save_then_hang(path, tensors):
    save(path, tensors)
    Path(flag).touch()  # the new adapter file is complete in the staging folder
    time.sleep(120)

export_lora._save_tensors = save_then_hang
export_lora.export_lora(MergeState.open(state_dir), out, rank=1)
"""


def test_a_killed_adapter_export_leaves_out_as_it_was(synthetic, synthetic_root, tmp_path) -> None:
    out = tmp_path / "adapter"
    export_lora(synthetic, out, rank=2)
    before = tree_digest(out)
    flag = tmp_path / "written"
    state_dir = str(synthetic_root / "state")
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, state_dir, str(out), str(flag)],
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, "the export ended before it was killed"
            assert time.monotonic() < deadline, "the export never wrote its adapter file"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert tree_digest(out) == before
    assert len(_hidden_siblings(out)) == 1  # the killed export's staging folder
    export_lora(synthetic, out, rank=1)  # the next export removes it
    assert _hidden_siblings(out) == []
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_cli_export_as_lora_overwrite_and_dtype(synthetic_root, tmp_path, capsys) -> None:
    state_dir = str(synthetic_root / "state")
    out = tmp_path / "folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", state_dir, str(out), "--as-lora", "2", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "not written by mergestream export" in error and "Traceback" not in error
    assert _files(out) == ["notes.txt"]
    args = ["export", state_dir, str(out), "--as-lora", "2", "--overwrite", "--dtype", "bfloat16"]
    assert main([*args, "--quiet"]) == 0
    assert _files(out) == sorted([*ADAPTER_FILES, MARKER, "notes.txt"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
