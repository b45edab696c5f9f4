"""`bench` on the folders users really have: adapters trained on the suite's own encoder, BERT
folders with their pooler weights, results files without the machine's paths, no matplotlib,
and progress on long runs. Everything runs on a tiny two-layer BERT built offline and checkpoints
made from it by perturbation (no fine-tuning), so each test takes seconds."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergestream.bench.run import run_benchmark, select_methods  # noqa: E402
from mergestream.bench.suite import load_suite  # noqa: E402
from mergestream.cli import main  # noqa: E402

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
def plain_project(tmp_path: Path) -> Path:
    """A suite on an encoder folder without a pooler: `sentiment`'s checkpoint in the zoo
    folder, `topics`' elsewhere, given by the suite's `checkpoint:`."""
    encoder = build_encoder(tmp_path / "encoder", pooler=False)
    perturbed_copy(encoder, tmp_path / "zoo" / "sentiment", seed=1)
    perturbed_copy(encoder, tmp_path / "elsewhere" / "topics", seed=2)
    write_suite(tmp_path, {"topics": "elsewhere/topics"})
    return tmp_path


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
    methods = select_methods(["average", "OPCM (alpha=0.5)"])
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


# --------------------------------------------------------------------------------------
# Adapters trained on the suite's own encoder


def make_adapter(encoder: Path, out: Path, seed: int, base_name: str | None) -> Path:
    """A PEFT LoRA adapter (rank 2, query and value) on ``encoder`` with non-zero factors,
    whose config names ``base_name`` as its base (None: no name)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(encoder, add_pooling_layer=False)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    peft_model.save_pretrained(out)
    config_file = out / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(saved))
    return out


@pytest.fixture
def adapter_project(tmp_path: Path) -> Path:
    """A zoo that `finetune` started (its `pretrained/` is the suite's encoder) and, for every
    task, an adapter trained elsewhere on the suite's encoder folder, named by its path."""
    pytest.importorskip("peft")
    encoder = build_encoder(tmp_path / "encoder", pooler=False)
    shutil.copytree(encoder, tmp_path / "zoo" / "pretrained")
    for seed, name in enumerate(TASKS, start=1):
        make_adapter(encoder, tmp_path / "adapters" / name, seed, str(encoder))
    write_suite(tmp_path, {name: f"adapters/{name}" for name in TASKS})
    return tmp_path


def test_an_adapter_trained_on_the_suite_encoder_is_merged(adapter_project: Path) -> None:
    """The zoo's `pretrained/` is the benchmark's base, the adapters name the suite's encoder
    folder: the same model, so they are merged (each changes its own 4 weights)."""
    from mergestream.bench.run import load_zoo

    suite = load_suite(adapter_project / "suite.yaml")
    zoo = load_zoo(adapter_project / "zoo", suite=suite)
    base = load_file(str(adapter_project / "zoo" / "pretrained" / "model.safetensors"))
    for task in TASKS:
        individual = zoo.individual_state_dict(task)
        changed = sorted(n for n, v in individual.items() if not torch.equal(v, base[n]))
        assert len(changed) == 4 and all(".query." in n or ".value." in n for n in changed)
    results = run_benchmark(adapter_project / "zoo", suite=suite, **QUICK)
    assert set(results["reference"]["individual"]) == set(TASKS)
    assert results["methods"]["average"]["runs"][0]["order"]


def test_an_adapter_named_after_another_base_needs_force_base(
    adapter_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = adapter_project / "adapters" / "topics"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-bert"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    suite_file = adapter_project / "suite.yaml"
    line = next(
        i for i, text in enumerate(suite_file.read_text().splitlines(), 1) if "name: topics" in text
    )
    args = ["bench", str(adapter_project / "zoo"), "--suite", str(suite_file), "--quiet"]
    args += ["--orders", "1", "--matrix-orders", "0", "--no-sweep", "--methods", "average"]
    args += ["--out", str(tmp_path / "report")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mergestream: error: {suite_file}:{line}: task 'topics': adapter ")
    assert "was trained on base 'someone/another-bert', and the encoder is " in err
    assert "pass --force-base" in err and "\n" not in err
    assert main([*args, "--force-base"]) == 0  # the flag the message names exists
    assert (tmp_path / "report" / "results.json").is_file()


def test_the_default_encoder_answers_to_its_hub_names(tmp_path: Path) -> None:
    from mergestream.bench.run import encoder_names

    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("tasks:\n  - builtin: rt_sentiment\n")
    encoder = build_encoder(tmp_path / "zoo" / "pretrained", pooler=False)
    names = encoder_names(tmp_path / "zoo", encoder, load_suite(suite_file))
    assert str(encoder) in names and "pretrained" in names
    assert "sentence-transformers/all-MiniLM-L6-v2" in names


# --------------------------------------------------------------------------------------
# Results files without the machine's folders


def _quick_bench_args(project: Path, out: Path) -> list[str]:
    """One order with its accuracy matrix (so a plot is due), one method, no sweep."""
    args = ["bench", str(project / "zoo"), "--suite", str(project / "suite.yaml"), "--quiet"]
    args += ["--orders", "1", "--matrix-orders", "1", "--no-sweep", "--methods", "average"]
    return [*args, "--out", str(out)]


def test_results_record_paths_relative_to_the_zoo_and_the_suite(plain_project: Path) -> None:
    # `sentiment` is the zoo's own folder, `topics` the suite's `checkpoint: elsewhere/topics`.
    out = plain_project / "report"
    assert main(_quick_bench_args(plain_project, out)) == 0
    written = (out / "results.json").read_text()
    meta = json.loads(written)["meta"]
    assert (meta["zoo"], meta["suite"]) == ("zoo", "suite.yaml")
    assert meta["checkpoints"] == {"sentiment": "sentiment", "topics": "elsewhere/topics"}
    assert str(plain_project) not in written  # no folder of this machine anywhere
    absolute = plain_project / "report-absolute"
    assert main([*_quick_bench_args(plain_project, absolute), "--absolute-paths"]) == 0
    meta = json.loads((absolute / "results.json").read_text())["meta"]
    assert meta["zoo"] == str(plain_project / "zoo")
    assert meta["suite"] == str(plain_project / "suite.yaml")
    assert meta["checkpoints"] == {
        "sentiment": str(plain_project / "zoo" / "sentiment"),
        "topics": str(plain_project / "elsewhere" / "topics"),
    }


# --------------------------------------------------------------------------------------
# Without matplotlib


def test_without_matplotlib_the_tables_are_written_and_plots_skipped(
    plain_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as when not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = plain_project / "report"
    args = [a for a in _quick_bench_args(plain_project, out) if a != "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    notice = "matplotlib is not installed: tables only, plots need mergestream[bench]"
    # Said before the first evaluation, not after hours of benchmark.
    assert captured.err.index(notice) < captured.err.index("pretrained ACC")
    assert "plots skipped: plots need mergestream[bench]" in captured.out
    # the tables and the score record (kept for `--resume`), no image
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "scores.jsonl"]
    assert "| average |" in (out / "results.md").read_text()


# --------------------------------------------------------------------------------------
# Progress on long runs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bench_with_progress(project: Path, stream: io.StringIO, **kwargs) -> dict:
    suite = load_suite(project / "suite.yaml")
    methods = select_methods(["average", "OPCM (alpha=0.5)"])
    log = lambda line: stream.write(line + "\n")  # noqa: E731 - the log shares the stream
    return run_benchmark(
        project / "zoo",
        suite=suite,
        methods=methods,
        orders=3,
        matrix_orders=2,
        alphas=(0.5,),
        sweep_orders=2,
        log=log,
        progress=stream,
        **kwargs,
    )


def test_progress_lines_in_a_log_count_every_evaluation(
    plain_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergestream import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line per evaluation, for the test
    stream = io.StringIO()
    results = _bench_with_progress(plain_project, stream)
    meta = results["meta"]
    total = meta["evaluations"] + meta["evaluations_reused"]
    # 2 tasks: 2·2 reference scores; per method 2 matrix orders of 3 and 1 final of 2; a sweep
    # of 2 orders of 2.
    assert total == 4 + 2 * (2 * 3 + 2) + 2 * 2 == 24
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("bench:")]
    assert "\r" not in stream.getvalue()  # plain lines, not a redrawn one
    assert [int(line.split()[2].split("/")[0].rstrip(",")) for line in lines] == list(
        range(1, total + 1)
    )
    assert all(f"/{total}" in line for line in lines)
    assert lines[0].startswith("bench: evaluation 1/24, pretrained and individual models, ")
    assert lines[0].endswith(" left")
    assert "evaluations/s" in lines[0] or " s/evaluation" in lines[0]  # the rate
    assert any(", opcm, order 3/3, " in line for line in lines)
    assert any("OPCM alpha sweep, alpha 0.5" in line for line in lines)
    assert not lines[-1].endswith(" left")  # all done


def test_progress_on_a_terminal_is_one_line_that_log_lines_never_join(
    plain_project: Path,
) -> None:
    stream = _Terminal()
    _bench_with_progress(plain_project, stream)
    text = stream.getvalue()
    assert "\rbench: evaluation " in text and "evaluation 24/24" in text
    for line in text.split("\n"):
        # A log line starts its own line: the live line was ended before it was written.
        for marker in ("pretrained ACC", "[2/2] OPCM", "alpha 0.5: ACC"):
            if marker in line:
                assert line.startswith(marker), line
    assert text.endswith("\n")


def test_planned_evaluations_match_a_diagonal_run() -> None:
    from mergestream.bench.run import planned_evaluations

    # 3 tasks: 6 reference; per method 1 diagonal matrix order (2 + 3) and 2 finals of 3
    assert planned_evaluations(3, 2, 3, 1, True, 0, 3) == 6 + 2 * (5 + 6)
    assert planned_evaluations(3, 1, 2, 5, False, 2, 3) == 6 + 2 * 6 + 2 * 2 * 3


def test_bench_without_transformers_or_a_zoo_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", str(tmp_path / "no-zoo"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"mergestream: error: {tmp_path / 'no-zoo'}: no such zoo folder\n"
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["bench", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "mergestream: error: bench needs transformers: pip install 'mergestream[bench]'\n"
    )
