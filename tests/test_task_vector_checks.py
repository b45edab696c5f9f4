"""What `add` checks about a checkpoint's task vector as a whole: one that is zero in every
tensor (the base itself, an adapter whose B factors are zero) is refused unless asked for, and
a full checkpoint that is a low-rank update plus round-off (a merged LoRA adapter) is merged
with a one-line warning that the adapter itself is the exact input."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tree_digest
from safetensors.torch import load_file, save_file

from mergestream import CheckpointError, MergeState, merge
from mergestream.cli import main
from mergestream.methods.base import TensorInfo
from mergestream.step.merged_adapter import MergedAdapterWarning, merged_adapter_rank
from mergestream.step.tasks import SerialExecutor
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes
from mergestream.watch.watcher import EventLog, WatchOptions, run_watch

SHAPES = transformer_shapes(layers=1, hidden=8, intermediate=12, vocab=20, positions=4)
ZERO = "task vector is zero in every tensor"


@pytest.fixture
def zoo(tmp_path: Path) -> dict:
    """A base folder, a fine-tune of it, and a copy of the base with other file bytes."""
    base = make_base(SHAPES, seed=1)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, str(base_dir / "model.safetensors"))
    tuned = tmp_path / "tuned.safetensors"
    save_file(apply(base, make_task_vector(base, seed=2)), str(tuned))
    # Same tensors, another file (its header carries metadata): only the step can tell.
    copy = tmp_path / "copy.safetensors"
    save_file(base, str(copy), metadata={"note": "a copy"})
    return {"tmp": tmp_path, "base": base, "base_dir": base_dir, "tuned": tuned, "copy": copy}


def init(zoo: dict, method: str = "opcm") -> Path:
    state = zoo["tmp"] / "state"
    assert main(["init", str(state), "--base", str(zoo["base_dir"]), "--method", method]) == 0
    return state


def add_refused(state: Path, checkpoint: Path, capsys) -> str:
    """Run `add`; assert it fails, says why in one line and leaves the state untouched."""
    before = tree_digest(state)
    capsys.readouterr()
    assert main(["add", str(state), str(checkpoint), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergestream: error: ") and err.count("\n") == 1, err
    assert tree_digest(state) == before, "a refused add changed the state directory"
    return err


# --------------------------------------------------------------------- a zero task vector


def test_adding_the_base_is_refused_with_the_reason_and_the_flag(zoo, capsys):
    state = init(zoo)
    link = zoo["tmp"] / "link-to-base"
    link.symlink_to(zoo["base_dir"], target_is_directory=True)
    for checkpoint in (zoo["base_dir"], link):
        err = add_refused(state, checkpoint, capsys)
        assert ZERO in err and "OPCM's scale grows" in err and "--allow-zero" in err
    # Asked for, it is merged, and is what the refusal warns of: a task that adds nothing.
    assert main(["add", str(state), str(zoo["base_dir"]), "--allow-zero", "--quiet"]) == 0
    assert main(["add", str(state), str(zoo["tuned"]), "--quiet"]) == 0
    assert MergeState.open(state).scalars["scale"] == pytest.approx(2.0)


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic", "ties", "average", "iso_c"])
def test_a_copy_of_the_base_is_refused_by_the_step_before_any_commit(zoo, capsys, method):
    """Other file bytes than the base's: the step finds the zero task vector and removes the
    generation it began, whatever the method."""
    state = init(zoo, method)
    assert main(["add", str(state), str(zoo["tuned"]), "--quiet"]) == 0
    scalars = MergeState.open(state).scalars
    err = add_refused(state, zoo["copy"], capsys)
    assert str(zoo["copy"]) in err and ZERO in err
    assert sorted(p.name for p in state.glob("gen-*")) == ["gen-000001"]
    assert MergeState.open(state).scalars == scalars


def test_opcm_without_the_refusal_halves_the_merge(zoo):
    """Why the refusal exists: merged after a real task vector, the base halves the merge."""
    state = MergeState.in_memory(zoo["base_dir"], "opcm")
    state.add(zoo["tuned"])
    before = dict(state.task_vectors())
    with pytest.raises(CheckpointError, match=ZERO):
        state.add(zoo["copy"])
    assert state.step == 1
    state.add(zoo["copy"], allow_zero=True)
    for name, tau in state.task_vectors():
        torch.testing.assert_close(tau, before[name] / 2, rtol=1e-12, atol=1e-15)


def test_merge_refuses_the_base_among_the_checkpoints_unless_allowed(zoo):
    tuned = load_file(str(zoo["tuned"]))
    with pytest.raises(CheckpointError, match=ZERO):
        merge(zoo["base"], [tuned, dict(zoo["base"])])
    merged = merge(zoo["base"], [tuned, dict(zoo["base"])], allow_zero=True)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point())


def test_a_distributed_step_refuses_a_zero_task_vector_too(zoo):
    state = MergeState.create(zoo["tmp"] / "s", zoo["base_dir"], "opcm")
    state.add(zoo["tuned"], backend=SerialExecutor())
    before = tree_digest(zoo["tmp"] / "s")
    with pytest.raises(CheckpointError, match=ZERO):
        state.add(zoo["copy"], backend=SerialExecutor())
    assert tree_digest(zoo["tmp"] / "s") == before
    state.add(zoo["copy"], backend=SerialExecutor(), allow_zero=True)
    assert state.step == 2 and state.scalars["scale"] == pytest.approx(2.0)


def test_row_streamed_tensors_count_towards_the_task_vector(zoo, monkeypatch):
    """Tensors folded by row blocks: a zero one is seen as zero, a changed one as changed."""
    import mergestream.step.engine as engine

    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 64)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 40)
    state = MergeState.in_memory(zoo["base_dir"], "opcm")
    largest = max(state.infos, key=lambda i: torch.Size(i.shape).numel())
    assert engine.is_streamed(largest) and state.method.streams_rows(largest)
    with pytest.raises(CheckpointError, match=ZERO):
        state.add(zoo["copy"])
    only_there = dict(zoo["base"])
    only_there[largest.name] = zoo["base"][largest.name].clone()
    only_there[largest.name][-1, -1] += 0.5  # in the last row block
    state.add(only_there)
    assert state.step == 1


def test_an_adapter_whose_b_factors_are_zero_is_refused(tmp_path, capsys):
    """PEFT's default initialisation (B = 0): an adapter that was never trained."""
    model = _bert_float32(tmp_path / "base")
    adapter = _adapter(model, tmp_path / "adapter", init_lora_weights=True)
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(tmp_path / "base"), "--quiet"]) == 0
    err = add_refused(state, adapter, capsys)
    assert ZERO in err and "B factors are all zero" in err


def test_watch_records_the_base_in_its_inbox_as_refused_with_the_reason(zoo):
    state = init(zoo)
    inbox = zoo["tmp"] / "inbox"
    inbox.mkdir()
    (inbox / "base-again").symlink_to(zoo["base_dir"], target_is_directory=True)
    options = WatchOptions(state=state, inbox=inbox, once=True, settle=0.0, log_json=True)
    stream = io.StringIO()
    run_watch(options, EventLog(json_lines=True, stream=stream))
    outcome = json.loads((state / "watch.json").read_text())["checkpoints"]["base-again"]
    assert outcome["outcome"] == "refused" and ZERO in outcome["reason"]
    logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    (refusal,) = [e for e in logged if e["event"] == "refused"]
    assert refusal["checkpoint"] == "base-again" and ZERO in refusal["reason"]
    assert MergeState.open(state).step == 0


# ------------------------------------------------------------------ a merged LoRA adapter


def _bert_float32(folder: Path, hidden: int = 32):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
    )
    transformers.BertModel(config).save_pretrained(folder)
    # Loaded back, so that adapters made from it name this folder as their base.
    return transformers.BertModel.from_pretrained(folder, dtype=torch.float32)


def _adapter(
    model, out: Path, *, init_lora_weights: bool = False, merged: Path | None = None, seed=1
) -> Path:
    """A rank-4 adapter on query/value/dense of `model` (a copy); B scaled to a trained size.
    With `merged`, PEFT's merge_and_unload() of it is saved there in the model's dtype."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        init_lora_weights=init_lora_weights,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices
        peft_model = get_peft_model(copy.deepcopy(model), config)
    if not init_lora_weights:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
        if merged is not None:
            peft_model.merge_and_unload().save_pretrained(merged)
    return out


@pytest.fixture
def lora_zoo(tmp_path: Path) -> dict:
    model = _bert_float32(tmp_path / "base")
    adapter = _adapter(model, tmp_path / "adapter", merged=tmp_path / "merged")
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(tmp_path / "base"), "--quiet"]) == 0
    return {"tmp": tmp_path, "model": model, "adapter": adapter, "state": state}


def test_a_float32_merged_adapter_is_merged_with_one_warning_line(lora_zoo, capsys):
    merged = lora_zoo["tmp"] / "merged"
    capsys.readouterr()
    assert main(["add", str(lora_zoo["state"]), str(merged), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mergestream: warning: "), err
    assert str(merged) in err and "rank <= 4 plus float32 round-off" in err
    assert "Merge the adapter folder itself instead" in err and "warnings.warn" not in err
    # The ledger keeps it, and `status` shows it.
    (entry,) = MergeState.open(lora_zoo["state"]).ledger
    assert "looks like a merged LoRA adapter (rank <= 4 plus float32 round-off)" in entry["notes"]
    assert main(["status", str(lora_zoo["state"])]) == 0
    assert "looks like a merged LoRA adapter" in capsys.readouterr().out


def test_run_tells_a_merged_adapter_in_one_line(lora_zoo, capsys):
    pytest.importorskip("yaml")
    recipe = lora_zoo["tmp"] / "recipe.yaml"
    recipe.write_text("base: base\nstate: run.state\ncheckpoints: [merged]\n")
    capsys.readouterr()
    assert main(["run", str(recipe), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mergestream: warning: "), err
    assert "Merge the adapter folder itself instead" in err and "warnings.warn" not in err


def test_watch_logs_a_merged_adapter_as_one_warning_event(lora_zoo, capsys):
    inbox = lora_zoo["tmp"] / "inbox"
    inbox.mkdir()
    (inbox / "merged").symlink_to(lora_zoo["tmp"] / "merged", target_is_directory=True)
    options = WatchOptions(state=lora_zoo["state"], inbox=inbox, once=True, settle=0.0)
    stream = io.StringIO()
    capsys.readouterr()
    run_watch(options, EventLog(json_lines=True, stream=stream))
    logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    (warned,) = [e for e in logged if e["event"] == "warning"]
    assert warned["checkpoint"] == "merged"
    assert "Merge the adapter folder itself instead" in warned["message"]
    assert "Warning" not in capsys.readouterr().err
    assert MergeState.open(lora_zoo["state"]).step == 1


def test_the_python_api_warns_with_its_own_category(lora_zoo):
    state = MergeState.in_memory(lora_zoo["tmp"] / "base", "tsv_m")
    with pytest.warns(MergedAdapterWarning, match="merged into the base"):
        state.add(lora_zoo["tmp"] / "merged")


def test_the_adapter_itself_and_full_fine_tunes_give_no_warning(lora_zoo, capsys):
    base = load_file(str(lora_zoo["tmp"] / "base" / "model.safetensors"))
    generator = torch.Generator().manual_seed(3)

    def full(name: str, relative: float, keep=lambda n, t: True) -> Path:
        """Every tensor moved by `relative` of its spread in every direction (full rank)."""
        tensors = {
            n: t + relative * t.std() * torch.randn(t.shape, generator=generator)
            if t.is_floating_point() and t.numel() > 1 and keep(n, t)
            else t
            for n, t in base.items()
        }
        save_file(tensors, str(lora_zoo["tmp"] / name))
        return lora_zoo["tmp"] / name

    rows = dict(base)  # only a few embedding rows trained: low rank, but no round-off pattern
    embedding = "embeddings.word_embeddings.weight"
    rows[embedding] = base[embedding].clone()
    rows[embedding][[3, 7]] += 0.01
    save_file(rows, str(lora_zoo["tmp"] / "rows.safetensors"))
    checkpoints = [
        lora_zoo["adapter"],
        full("full.safetensors", 1e-2),
        full("slight.safetensors", 1e-5),  # barely moved, still far above round-off
        full("attention-only.safetensors", 1e-3, lambda n, t: "attention" in n),
        lora_zoo["tmp"] / "rows.safetensors",
    ]
    capsys.readouterr()
    for checkpoint in checkpoints:
        assert main(["add", str(lora_zoo["state"]), str(checkpoint), "--quiet"]) == 0
        assert capsys.readouterr().err == "", checkpoint
    assert not any(e.get("notes") for e in MergeState.open(lora_zoo["state"]).ledger)


def test_a_float64_merged_adapter_gives_no_warning(tmp_path, capsys):
    """In float64 both routes agree to round-off, and the SVD cannot resolve its level."""
    model = _bert_float32(tmp_path / "base").to(torch.float64)
    model.save_pretrained(tmp_path / "base")
    _adapter(model, tmp_path / "adapter", merged=tmp_path / "merged")
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(tmp_path / "base"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["add", str(state), str(tmp_path / "merged"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_detector_finds_the_rank_under_rounding_and_nothing_else(dtype):
    """On one matrix: rank 3 plus the rounding of `dtype` is found as rank 3; the same with a
    full-rank perturbation, a rank too large to be an adapter, or rounding alone is not."""
    from mergestream.io.source import MemorySource

    g = torch.Generator().manual_seed(0)
    theta = (torch.randn(96, 80, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    info = TensorInfo("w", (96, 80), dtype, True)

    def verdict(delta: torch.Tensor):
        stored = (theta.double() + delta).to(dtype)
        return merged_adapter_rank(MemorySource({"w": theta}), MemorySource({"w": stored}), [info])

    def low_rank(rank: int, size: float) -> torch.Tensor:
        b = torch.randn(96, rank, generator=g, dtype=torch.float64)
        a = torch.randn(rank, 80, generator=g, dtype=torch.float64)
        return size * (b @ a) / rank**0.5

    assert verdict(low_rank(3, 0.02)) == (3, dtype)
    noise = torch.randn(96, 80, generator=g, dtype=torch.float64)
    assert verdict(low_rank(3, 0.02) + 1e-3 * noise) is None  # a fine-tune's full-rank part
    assert verdict(low_rank(40, 0.02)) is None  # rank 40 of 80: not low
    eps = torch.finfo(dtype).eps
    assert verdict(2 * eps * theta.double().abs() * noise) is None  # rounding alone
