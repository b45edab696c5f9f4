"""Exports are HF model directories: sharded like save_pretrained, loadable by transformers with
the exact merged tensors, with a model card and header metadata that record the provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergestream import ConfigError, MergeState, MergestreamError, __version__
from mergestream.cli import main
from mergestream.io.safetensors_stream import SafetensorsFile, TensorSpec
from mergestream.publish.export import parse_size, plan_shards
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    """A tiny random BERT saved with save_pretrained, and two fine-tuned variants."""
    root = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    model.save_pretrained(root / "base")
    base = load_file(str(root / "base" / "model.safetensors"))
    paths = []
    for seed in (1, 2):
        tuned = apply(base, make_task_vector(base, seed=seed))
        directory = root / f"tuned-{seed}"
        directory.mkdir()
        save_file(tuned, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(directory)
        paths.append(directory)
    state = MergeState.create(root / "state", root / "base", method="opcm", alpha=0.5)
    for path in paths:
        state.add(path)
    return {"root": root, "base": root / "base", "state": state, "paths": paths}


def test_sharded_export_loads_in_transformers_with_the_same_tensors(bert):
    out = bert["state"].export(bert["root"] / "sharded", max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 1 + len(shards))
    ]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not (out / "model.safetensors").exists()
    assert (out / "config.json").is_file()

    expected = bert["state"].state_dict()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in expected.values()
    )
    assert set(index["weight_map"]) == set(expected)
    for shard in shards:
        assert set(load_file(str(out / shard))) == {
            n for n, s in index["weight_map"].items() if s == shard
        }

    model = transformers.AutoModel.from_pretrained(out)
    loaded = model.state_dict()
    for name, tensor in expected.items():
        if name in loaded:
            assert torch.equal(loaded[name], tensor), name
    params = {n for n, _ in model.named_parameters()}
    assert params <= set(expected), "every parameter of the model came from the export"
    assert not torch.equal(
        loaded["encoder.layer.0.attention.self.query.weight"],
        load_file(str(bert["base"] / "model.safetensors"))[
            "encoder.layer.0.attention.self.query.weight"
        ],
    )


def test_single_file_export_loads_in_transformers(bert):
    out = bert["state"].export(bert["root"] / "single")
    assert sorted(p.name for p in out.iterdir()) == [
        ".mergestream-export.json",
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    model = transformers.AutoModel.from_pretrained(out)
    expected = bert["state"].state_dict()
    for name, tensor in model.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name]), name


def test_reexport_leaves_no_stale_weights(bert, tmp_path):
    out = tmp_path / "out"
    state = bert["state"]
    state.export(out, max_shard_size="20KB")
    state.export(out)  # now one file: the shards and the index must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    state.export(out, max_shard_size="10KB")
    names = sorted(p.name for p in out.glob("model*"))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        n for n in names if n.endswith(".safetensors")
    ]
    assert not list(out.glob("*.partial"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_model_card_and_metadata_record_provenance(bert):
    out = bert["state"].export(bert["root"] / "card", max_shard_size="20KB")
    card = (out / "README.md").read_text()
    state = bert["state"]
    assert f"mergestream {__version__}" in card
    assert "`opcm`" in card and "alpha: `0.5`" in card
    opcm_config = state.method.config
    assert f"- paper: [{opcm_config.paper}]({opcm_config.paper_url})" in card
    assert "arxiv.org/abs/2501.09522" in opcm_config.paper_url
    positions = [card.index(entry["sha256"]) for entry in state.ledger]
    assert positions == sorted(positions), "checkpoints are listed in merge order"
    for entry in state.ledger:
        assert entry["path"] in card
    assert state.status()["base"] in card

    headers = []
    for shard in sorted(out.glob("*.safetensors")):
        with SafetensorsFile(shard) as f:
            headers.append(f.metadata)
    assert all(h == headers[0] for h in headers)
    meta = headers[0]
    assert meta["format"] == "pt" and meta["mergestream_version"] == __version__
    assert json.loads(meta["mergestream_method"])["name"] == "opcm"
    assert meta["mergestream_step"] == "2"
    inputs = json.loads(meta["mergestream_inputs"])
    assert [i["sha256"] for i in inputs] == [e["sha256"] for e in state.ledger]


def test_export_dtype_option_via_cli(bert, tmp_path, capsys):
    out = tmp_path / "half"
    assert (
        main(["export", str(bert["root"] / "state"), str(out), "--dtype", "bfloat16", "--quiet"])
        == 0
    )
    tensors = load_file(str(out / "model.safetensors"))
    expected = bert["state"].state_dict(torch.bfloat16)
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert "bfloat16" in (out / "README.md").read_text()


def test_export_refuses_foreign_weights_and_its_own_inputs(bert, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(MergestreamError, match="pytorch_model.bin"):
        bert["state"].export(foreign)
    with pytest.raises(MergestreamError, match="base model's directory"):
        bert["state"].export(bert["base"])
    with pytest.raises(MergestreamError, match="state directory"):
        bert["state"].export(bert["root"] / "state" / "inside")


def test_export_of_a_new_state_is_the_base(tmp_path):
    base = make_base(transformer_shapes(layers=1, hidden=8, intermediate=12, vocab=20), seed=4)
    (tmp_path / "b").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    state = MergeState.create(tmp_path / "s", tmp_path / "b")
    out = load_file(str(state.export(tmp_path / "out") / "model.safetensors"))
    assert out.keys() == base.keys()
    assert all(torch.equal(out[k], base[k]) for k in base)
    assert "None yet" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    "text, value",
    [
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5GB", 15 * 10**8),
        ("64KiB", 65536),
        ("1000", 1000),
        (123, 123),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_plan_shards_is_greedy_and_isolates_big_tensors():
    f32 = torch.float32
    specs = [
        ("a", TensorSpec(f32, (10,))),
        ("b", TensorSpec(f32, (10,))),
        ("big", TensorSpec(f32, (100,))),
        ("c", TensorSpec(f32, (5,))),
    ]
    assert plan_shards(specs, 80) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(specs, 10**9) == [["a", "b", "big", "c"]]
