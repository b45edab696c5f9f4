"""The benchmark on a user's own tasks and encoder: two CSV tasks, a tiny BERT built offline from
a config (CLS pooling, as its sentence-transformers config says), `mergestream finetune` and
`mergestream bench --suite` end to end, a zoo of checkpoints fine-tuned elsewhere, and the
pooling and checkpoint-matching helpers."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergestream.bench import encoder as E  # noqa: E402
from mergestream.bench import finetune as FT  # noqa: E402
from mergestream.bench.checkpoints import fit_checkpoint  # noqa: E402
from mergestream.bench.run import load_zoo, run_benchmark  # noqa: E402
from mergestream.bench.suite import SuiteError, load_suite  # noqa: E402
from mergestream.cli import main  # noqa: E402

POOLS = {
    "negative": ["bad", "awful", "poor", "dull", "weak"],
    "positive": ["good", "great", "lovely", "fine", "superb"],
}
TOPICS = {
    0: ["goal", "match", "team", "coach", "league"],
    1: ["bread", "soup", "cheese", "salad", "pasta"],
    2: ["song", "band", "guitar", "album", "drums"],
}
TOPIC_NAMES = {0: "sports", 1: "food", 2: "music"}
NOUNS = ["film", "plot", "cast", "story", "ending", "thing"]
TEMPLATE_WORDS = ["a", "review", "this", "is", "about", "text", "the", "was", "and"]


def _words() -> list[str]:
    words = {w for pool in POOLS.values() for w in pool} | set(POOLS)
    words |= {w for pool in TOPICS.values() for w in pool} | set(TOPIC_NAMES.values())
    return sorted(words | set(NOUNS) | set(TEMPLATE_WORDS))


def build_tiny_encoder(folder: Path, pooling: str = "cls", hidden: int = 32) -> Path:
    """A two-layer BERT with random weights and a word-level vocabulary, saved as a
    sentence-transformers folder whose pooling config says ``pooling``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + _words())}
    tokenizer = BertTokenizer(vocab=vocab)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    E.save_pooling(folder, pooling, hidden)
    return folder


def _line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _sentiment_rows(rng: random.Random) -> list[dict[str, object]]:
    rows, seen = [], set()
    while len(rows) < 96:
        label = ("negative", "positive")[len(rows) % 2]
        adj, adj2 = rng.sample(POOLS[label], 2)
        text = f"the {rng.choice(NOUNS)} was {adj} and {adj2}"
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label, "movie": f"movie{len(rows) // 2 % 24}"})
    return rows


def _topic_rows(rng: random.Random) -> list[dict[str, object]]:
    rows, seen = [], set()
    while len(rows) < 90:
        code = len(rows) % 3
        text = " ".join(rng.sample(TOPICS[code], 3) + [rng.choice(NOUNS)])
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": code})
    return rows


SUITE = """\
encoder: encoder
max_length: 16
split:
  n_test: 20
  max_train: null
finetune:
  steps: 24
  lr: 5.0e-3
  batch_size: 16
tasks:
  - name: sentiment
    data: data/sentiment.csv
    group_column: movie
    templates: ["a {} review.", "this review is {}."]
  - name: topics
    data: data/topics.csv
    class_names: {0: sports, 1: food, 2: music}
    templates: ["a text about {}.", "this is about {}."]
    balance: true
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user-bench")
    build_tiny_encoder(root / "encoder")
    rng = random.Random(0)
    _write_csv(root / "data" / "sentiment.csv", _sentiment_rows(rng))
    _write_csv(root / "data" / "topics.csv", _topic_rows(rng))
    (root / "suite.yaml").write_text(SUITE)
    return root


@pytest.fixture(scope="module")
def zoo(project: Path) -> Path:
    out = project / "zoo"
    assert main(["finetune", str(project / "suite.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


def test_finetune_builds_a_zoo_from_the_suite(project: Path, zoo: Path) -> None:
    meta = json.loads((zoo / "zoo.json").read_text())
    assert meta["pooling"] == "cls" and meta["tasks"] == ["sentiment", "topics"]
    assert E.pooling_of(zoo / "pretrained") == "cls"
    assert (zoo / "suite.yaml").read_text() == SUITE
    movie = {}
    with open(project / "data" / "sentiment.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            movie[row["text"]] = row["movie"]
    for name in ("sentiment", "topics"):
        info = json.loads((zoo / name / "finetune.json").read_text())
        assert info["pooling"] == "cls" and info["recipe"]["steps"] == 24
        assert info["finetuned_test_accuracy"] > info["pretrained_test_accuracy"], name
        test = json.loads((zoo / name / "test.json").read_text())
        counts = [0] * len(info["class_names"])
        for _, y in test:
            counts[y] += 1
        assert info["split"]["test_class_counts"] == counts == info["test_class_counts"]
        assert info["split"]["n_test"] == len(test) <= 20
    topics = json.loads((zoo / "topics" / "finetune.json").read_text())
    assert topics["class_names"] == ["sports", "food", "music"]
    assert topics["test_class_counts"] == [7, 7, 6]  # balanced: 20 over 3 classes
    assert topics["n_train"] == 90 - 20  # no cap: every other example trains
    sentiment = json.loads((zoo / "sentiment" / "finetune.json").read_text())
    test_texts = {t for t, _ in json.loads((zoo / "sentiment" / "test.json").read_text())}
    test_movies = {movie[t] for t in test_texts}
    train_movies = {m for t, m in movie.items() if t not in test_texts}
    assert test_movies and not test_movies & train_movies  # grouped: no movie on both sides
    assert sentiment["split"]["test_groups"] == len(test_movies)


def test_finetune_resumes_and_reports_progress(
    project: Path, zoo: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def _fail(*args, **kwargs):
        raise AssertionError("a finished task was fine-tuned again")

    monkeypatch.setattr(FT, "finetune", _fail)
    assert main(["finetune", str(project / "suite.yaml"), "--out", str(zoo)]) == 0
    err = capsys.readouterr().err
    assert "[1/2] sentiment: already in" in err and "[2/2] topics: already in" in err
    # A task whose definition changed is not silently kept.
    changed = project / "changed.yaml"
    changed.write_text(SUITE.replace('"this is about {}."', '"about {}."'))
    assert main(["finetune", str(changed), "--out", str(zoo), "--tasks", "topics"]) == 2
    err = capsys.readouterr().err
    line = _line_of(changed.read_text(), "- name: topics")
    assert f"{changed}:{line}: task 'topics'" in err and "remove that folder" in err
    # Nor benchmarked against the changed definition.
    with pytest.raises(SuiteError, match=f"{changed}:{line}: task 'topics': .* another definition"):
        load_zoo(zoo, suite=load_suite(changed))
    # A zoo keeps one encoder and pooling.
    other_pooling = project / "mean.yaml"
    other_pooling.write_text("pooling: mean\n" + SUITE)
    assert main(["finetune", str(other_pooling), "--out", str(zoo), "--quiet"]) == 2
    assert "was built with pooling 'cls', this asks for 'mean'" in capsys.readouterr().err


def test_bench_with_the_suite(project: Path, zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["bench", str(zoo), "--suite", str(project / "suite.yaml"), "--out", str(out)]
    args += ["--orders", "2", "--matrix-orders", "1", "--no-sweep", "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["tasks"] == ["sentiment", "topics"]
    assert results["meta"]["pooling"] == "cls"
    for name in ("sentiment", "topics"):
        info = json.loads((zoo / name / "finetune.json").read_text())
        # Scoring at bench time repeats what fine-tuning measured, exactly.
        assert results["reference"]["individual"][name] == info["finetuned_test_accuracy"]
        assert results["reference"]["pretrained"][name] == info["pretrained_test_accuracy"]
    assert (out / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    for entry in results["methods"].values():
        assert len(entry["runs"]) == 2 and 0.0 <= entry["runs"][0]["acc"] <= 1.0


def _as_classifier_checkpoint(src: Path, dst: Path, prefix: str) -> None:
    """``src``'s encoder saved the way a task model would be: under ``prefix``, next to a
    classifier."""
    dst.mkdir(parents=True)
    tensors = {prefix + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    hidden = tensors[prefix + "embeddings.word_embeddings.weight"].shape[1]
    tensors["classifier.weight"] = torch.zeros(2, hidden)
    tensors["classifier.bias"] = torch.zeros(2)
    save_file(tensors, str(dst / "model.safetensors"))


def test_a_zoo_of_checkpoints_fine_tuned_elsewhere(project: Path, zoo: Path) -> None:
    """The zoo's checkpoints, saved as task models elsewhere, give the same benchmark."""
    elsewhere = project / "elsewhere"
    _as_classifier_checkpoint(zoo / "sentiment", elsewhere / "sentiment", "bert.")
    _as_classifier_checkpoint(zoo / "topics", elsewhere / "ckpt-topics", "")
    suite_path = project / "elsewhere.yaml"
    suite_path.write_text(
        SUITE.replace("class_names:", "checkpoint: elsewhere/ckpt-topics\n    class_names:")
    )
    suite = load_suite(suite_path)
    kwargs = {"orders": 2, "matrix_orders": 1, "alphas": (), "log": lambda _: None}
    theirs = run_benchmark(elsewhere, suite=suite, **kwargs)
    ours = run_benchmark(zoo, **kwargs)
    assert theirs["meta"]["checkpoints"]["topics"] == "elsewhere/ckpt-topics"  # as the suite says
    assert theirs["reference"] == ours["reference"]
    for label, entry in ours["methods"].items():
        mine = theirs["methods"][label]["runs"]
        assert [r["acc"] for r in mine] == [r["acc"] for r in entry["runs"]], label
        assert mine[0]["matrix"] == entry["runs"][0]["matrix"], label


def _as_classifier_adapter(src: Path, dst: Path, base: Path) -> None:
    """``src``'s PEFT adapter re-saved as one made on a sequence-classification model: target
    modules under ``bert.``, a trained ``classifier`` in ``modules_to_save``, and the base
    named by its path."""
    dst.mkdir(parents=True)
    factors = load_file(str(src / "adapter_model.safetensors"))
    prefix = "base_model.model."
    tensors = {prefix + "bert." + k.removeprefix(prefix): v for k, v in factors.items()}
    hidden = next(v for k, v in factors.items() if "lora_A" in k).shape[1]
    tensors[prefix + "classifier.weight"] = torch.ones(2, hidden)
    tensors[prefix + "classifier.bias"] = torch.ones(2)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    config["modules_to_save"] = ["classifier"]
    (dst / "adapter_config.json").write_text(json.dumps(config))


def test_a_zoo_of_lora_adapters_and_adapters_made_elsewhere(project: Path) -> None:
    """`finetune --lora-rank` builds a zoo of adapters from the suite; the same adapters,
    saved as if made on a classification model elsewhere, give the same benchmark."""
    pytest.importorskip("peft")
    lora_zoo = project / "zoo-lora"
    args = ["finetune", str(project / "suite.yaml"), "--out", str(lora_zoo), "--quiet"]
    # LoRA on a random tiny encoder needs a larger rate than the suite's full fine-tuning.
    assert main([*args, "--lora-rank", "4", "--lr", "3e-2"]) == 0
    for name in ("sentiment", "topics"):
        config = json.loads((lora_zoo / name / "adapter_config.json").read_text())
        assert config["r"] == 4 and not (lora_zoo / name / "model.safetensors").exists()
    elsewhere = project / "elsewhere-lora"
    _as_classifier_adapter(lora_zoo / "sentiment", elsewhere / "sentiment", project / "encoder")
    _as_classifier_adapter(lora_zoo / "topics", elsewhere / "ckpt-topics", project / "encoder")
    fit = fit_checkpoint(project / "encoder", elsewhere / "sentiment")
    assert fit.strip_prefix == "bert." and fit.ignored == ("classifier.bias", "classifier.weight")
    suite_path = project / "elsewhere-lora.yaml"
    suite_path.write_text(
        SUITE.replace("class_names:", "checkpoint: elsewhere-lora/ckpt-topics\n    class_names:")
    )
    kwargs = {"orders": 2, "matrix_orders": 1, "alphas": (), "log": lambda _: None}
    theirs = run_benchmark(elsewhere, suite=load_suite(suite_path), **kwargs)
    ours = run_benchmark(lora_zoo, suite=load_suite(project / "suite.yaml"), **kwargs)
    assert theirs["reference"] == ours["reference"]
    individual = ours["reference"]["individual"]
    assert any(individual[t] > ours["reference"]["pretrained"][t] for t in individual)
    for label, entry in ours["methods"].items():
        mine = theirs["methods"][label]["runs"]
        assert [r["acc"] for r in mine] == [r["acc"] for r in entry["runs"]], label
    # An adapter whose targets the base lacks is refused with the task's line.
    broken = project / "elsewhere-lora" / "broken"
    _as_classifier_adapter(lora_zoo / "topics", broken, project / "encoder")
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 2  # the stored factors have rank 4
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SuiteError, match="adapter .*broken does not fit the base encoder"):
        fit_checkpoint(project / "encoder", broken, "here")


def test_a_checkpoint_of_another_model_is_refused(project: Path, tmp_path: Path) -> None:
    other = build_tiny_encoder(tmp_path / "other", hidden=16)
    body = SUITE.replace("encoder: encoder", f"encoder: {project / 'encoder'}")
    body = body.replace("group_column: movie", f"group_column: movie\n    checkpoint: {other}")
    body = body.replace("data/", f"{project / 'data'}/")
    path = tmp_path / "suite.yaml"
    path.write_text(body)
    with pytest.raises(SuiteError) as info:
        run_benchmark(tmp_path, suite=load_suite(path), orders=1, alphas=(), log=lambda _: None)
    message = str(info.value)
    line = _line_of(body, "- name: sentiment")
    assert message.startswith(f"{path}:{line}: task 'sentiment': checkpoint {other}")
    assert "differ in shape" in message and "(64, 16) vs base (64, 32)" in message


def test_eval_every_scores_each_model_once(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = E.Evaluator.accuracy

    def counting(self, task, head, state_dict=None, *, split="test"):
        calls.append(task.name)
        return real(self, task, head, state_dict, split=split)

    monkeypatch.setattr(E.Evaluator, "accuracy", counting)
    suite = load_suite(project / "suite.yaml").select(["topics"])
    recipe = FT.suite_recipe(suite, steps=4)
    results = FT.build_suite_zoo(tmp_path / "zoo", suite, recipe, eval_every=2)
    info = results["topics"]
    assert calls == ["topics"] * 3  # steps 0, 2 and 4: the pretrained and final models once
    curve = info["test_accuracy_curve"]
    assert [step for step, _ in curve] == [0, 2, 4]
    assert curve[0][1] == info["pretrained_test_accuracy"]
    assert curve[-1][1] == info["finetuned_test_accuracy"]


# --------------------------------------------------------------------------------------
# Pooling and checkpoint matching


def test_pooling_modes_match_a_direct_computation(project: Path) -> None:
    model, tok = E.load_encoder(project / "encoder")
    batch = tok(["the film was good", "a song"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        cls = E.embed_tokens(model, ids, mask, "cls")
        mean = E.embed_tokens(model, ids, mask, "mean")
    torch.testing.assert_close(cls, torch.nn.functional.normalize(hidden[:, 0], dim=-1))
    m = mask.unsqueeze(-1).float()
    manual_mean = (hidden * m).sum(1) / m.sum(1)
    torch.testing.assert_close(mean, torch.nn.functional.normalize(manual_mean, dim=-1))
    assert not torch.allclose(cls, mean)


def test_pooling_of_reads_sentence_transformers_configs(tmp_path: Path) -> None:
    assert E.pooling_of(tmp_path) == "mean"  # a plain HF folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    assert E.pooling_of(tmp_path) == "cls"
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert E.pooling_of(tmp_path) == "mean"
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ValueError, match="pool/config.json: pooling"):
        E.pooling_of(tmp_path)
    assert E.pooling_of(None) == "mean"  # the packaged MiniLM, when installed
    # A Transformer module in a sub-folder is where the weights are.
    modules[0]["path"] = "0_Transformer"
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert E.transformer_dir(tmp_path) == tmp_path / "0_Transformer"


def test_fit_checkpoint_prefixes_and_leftovers(tmp_path: Path) -> None:
    base = {"enc.w": torch.zeros(3, 2), "enc.b": torch.zeros(3)}
    save_file(base, str(tmp_path / "base.safetensors"))
    task = {"roberta." + k: v + 1 for k, v in base.items()} | {"head.w": torch.zeros(1)}
    save_file(task, str(tmp_path / "task.safetensors"))
    fit = fit_checkpoint(tmp_path / "base.safetensors", tmp_path / "task.safetensors")
    assert fit.strip_prefix == "roberta." and fit.ignored == ("head.w",)
    assert fit.add_options == {"strip_prefix": "roberta.", "extra": "ignore"}
    save_file({"enc.w": torch.zeros(3, 2)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SuiteError, match=r"here: checkpoint .* 1 of its 2 tensors are missing"):
        fit_checkpoint(tmp_path / "base.safetensors", tmp_path / "partial.safetensors", "here")


# --------------------------------------------------------------------------------------
# Encoders fine-tuning cannot work with, and progress


def _encoder_with_vocab(folder: Path, words: list[str], rows: int | None = None) -> Path:
    """A tiny BERT whose tokenizer knows ``words`` and whose embedding has ``rows`` rows
    (default: one per token)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    config = BertConfig(
        vocab_size=rows or len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def _suite_with_encoder(project: Path, tmp_path: Path, encoder: Path) -> Path:
    body = SUITE.replace("encoder: encoder", f"encoder: {encoder}")
    path = tmp_path / "suite.yaml"
    path.write_text(body.replace("data/", f"{project / 'data'}/"))
    return path


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_training(
    project: Path, tmp_path: Path, capsys
) -> None:
    words = _words()
    encoder = _encoder_with_vocab(tmp_path / "enc", words, rows=len(words))  # 5 rows short
    suite = _suite_with_encoder(project, tmp_path, encoder)
    out = tmp_path / "zoo"
    capsys.readouterr()  # what saving the encoder printed
    assert main(["finetune", str(suite), "--out", str(out), "--quiet"]) == 2
    n = len(words) + 5
    tokenizer_file = next(
        encoder / f for f in ("tokenizer.json", "vocab.txt") if (encoder / f).is_file()
    )
    assert capsys.readouterr().err == (
        f"mergestream: error: {tokenizer_file}: the tokenizer has {n} tokens (ids up "
        f"to {n - 1}), but the encoder's embedding table has {n - 5} rows (vocab_size in "
        f"{encoder / 'config.json'}); the tokenizer belongs to another model: put the "
        "tokenizer these weights were trained with in the folder\n"
    )
    assert not (out / "pretrained").exists() and not (out / "sentiment").exists()


def test_a_tokenizer_that_knows_no_class_name_warns_and_fails(
    project: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """Every word is [UNK]: both classes get one head, every gradient is zero, nothing is
    learned, and the task is not saved as fine-tuned."""
    suite = _suite_with_encoder(project, tmp_path, _encoder_with_vocab(tmp_path / "enc", []))
    out = tmp_path / "zoo"
    args = ["finetune", str(suite), "--out", str(out), "--quiet", "--tasks", "sentiment"]
    capsys.readouterr()  # what saving the encoder printed
    assert main(args) == 2
    assert (
        "sentiment: class heads are indistinguishable ('negative', 'positive'): the tokenizer "
        "knows no word of 'negative', 'positive' (all [UNK]), so their prompts are the same "
        "tokens; fine-tuning cannot tell these classes apart"
    ) in caplog.text
    line = _line_of(suite.read_text(), "- name: sentiment")
    assert capsys.readouterr().err == (
        f"mergestream: error: {suite}:{line}: task 'sentiment': fine-tuning left every weight "
        "unchanged (24 steps, loss 0.6931 -> 0.6931): its class heads are indistinguishable "
        "(see the warning above), so every gradient is zero; use an encoder whose tokenizer "
        "knows the class names, or other class names or templates; nothing was saved for "
        "this task\n"
    )
    assert not (out / "sentiment").exists()


def test_finetune_shows_step_loss_rate_and_time_left(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Written to a file (not a terminal), progress is a plain line every LINE_INTERVAL
    seconds: here every step."""
    import mergestream.progress

    monkeypatch.setattr(mergestream.progress, "LINE_INTERVAL", 0.0, raising=False)
    args = ["finetune", str(project / "suite.yaml"), "--tasks", "topics", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "zoo")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": step " in ln]
    rate = r"[\d.]+ (steps/s|s/step)"
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"\[1/1\] topics: step 1/3, loss \d\.\d{{4}}, {rate}, \d+s left", lines[0])
    assert re.fullmatch(rf"\[1/1\] topics: step 3/3, loss \d\.\d{{4}}, {rate}", lines[2])
    assert main([*args, "--out", str(tmp_path / "zoo2"), "--quiet"]) == 0
    assert ": step " not in capsys.readouterr().err
