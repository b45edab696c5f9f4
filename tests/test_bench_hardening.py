"""`bench` on the folders users really have: adapters trained on the suite's own encoder, BERT
folders with their pooler weights, results files without the machine's paths, no matplotlib,
and progress on long runs. Everything runs on a tiny two-layer BERT built offline and checkpoints
made from it by perturbation (no fine-tuning), so each test takes seconds."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergestream.bench.run import run_benchmark, select_methods  # noqa: E402
from mergestream.bench.suite import load_suite  # noqa: E402

WORDS = {
    "negative": ["bad", "awful", "poor", "dull"],
    "positive": ["good", "great", "lovely", "fine"],
    "sports": ["goal", "match", "team", "coach"],
    "food": ["bread", "soup", "cheese", "pasta"],
}
FILLER = ["the", "a", "was", "and", "review", "text", "about", "this", "is", "film"]
TASKS = {"sentiment": ("negative", "positive"), "topics": ("sports", "food")}
QUICK = {"orders": 2, "matrix_orders": 1, "alphas": (), "log": lambda _: None}


def build_encoder(folder: Path, *, pooler: bool) -> Path:
    """A two-layer BERT with random weights and a word vocabulary; with ``pooler`` saved as a
    plain ``BertModel.save_pretrained`` writes it (``pooler.dense.*`` included)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for ws in WORDS.values() for w in ws} | set(WORDS) | set(FILLER))
    vocab = {w: i for i, w in enumerate(specials + words)}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def perturbed_copy(encoder: Path, out: Path, seed: int) -> Path:
    """``encoder``'s folder with every weight moved a little: a checkpoint 'fine-tuned
    elsewhere', in the encoder's own tensor names."""
    shutil.copytree(encoder, out)
    tensors = load_file(str(encoder / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_suite(root: Path, checkpoints: dict[str, str] | None = None) -> Path:
    """Two CSV tasks on ``root/encoder``; ``checkpoints`` gives tasks a `checkpoint:`."""
    rng = random.Random(0)
    lines = ["encoder: encoder", "max_length: 16", "split:", "  n_test: 12", "tasks:"]
    for name, classes in TASKS.items():
        rows = []
        for i in range(40):
            label = classes[i % 2]
            text = " ".join(rng.sample(WORDS[label], 2) + rng.sample(FILLER, 2))
            rows.append({"text": text, "label": label})
        path = root / "data" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        lines += [f"  - name: {name}", f"    data: data/{name}.csv"]
        lines += ['    templates: ["a {} text.", "this is {}."]']
        if checkpoints and name in checkpoints:
            lines.append(f"    checkpoint: {checkpoints[name]}")
    suite = root / "suite.yaml"
    suite.write_text("\n".join(lines) + "\n")
    return suite


@pytest.fixture
def pooler_project(tmp_path: Path) -> Path:
    """A suite on an encoder folder with pooler weights, and a folder of checkpoints
    fine-tuned elsewhere (also with their poolers), one per task."""
    encoder = build_encoder(tmp_path / "encoder", pooler=True)
    for seed, name in enumerate(TASKS, start=1):
        perturbed_copy(encoder, tmp_path / "ckpts" / name, seed)
    write_suite(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------
# An encoder folder with BERT's pooler weights


def test_an_encoder_folder_with_pooler_weights_is_benchmarked(pooler_project: Path) -> None:
    lines: list[str] = []
    suite = load_suite(pooler_project / "suite.yaml")
    methods = select_methods(["average", "opcm"])
    results = run_benchmark(
        pooler_project / "ckpts", suite=suite, methods=methods, **{**QUICK, "log": lines.append}
    )
    assert set(results["reference"]["individual"]) == set(TASKS)
    for entry in results["methods"].values():
        assert 0.0 <= entry["runs"][0]["acc"] <= 1.0
    ignored = [line for line in lines if line.startswith("ignored")]
    assert ignored == [
        "ignored 2 tensors the encoder does not use (merged, not scored): "
        "pooler.dense.bias, pooler.dense.weight"
    ]


def test_the_evaluator_ignores_unused_tensors_but_not_missing_ones(tmp_path: Path) -> None:
    from mergestream.bench import encoder as E

    folder = build_encoder(tmp_path / "encoder", pooler=True)
    model, tokenizer = E.load_encoder(folder)
    evaluator = E.Evaluator(model, tokenizer)
    weights = load_file(str(folder / "model.safetensors"))
    assert evaluator.load_state_dict(weights) == ("pooler.dense.bias", "pooler.dense.weight")
    del weights["encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(KeyError, match="attention.self.query.weight"):
        evaluator.load_state_dict(weights)
