"""The causal-LM benchmark end to end on a tiny LLaMA built from a config (no download): a
causal-LM suite, `finetune` (one LoRA adapter per instruction task), the scoring against an
independent full-sequence computation, `bench` with a diagonal matrix plus whole rows, base
retention, the same stream as full checkpoints, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")
pytest.importorskip("rdata")

import torch  # noqa: E402
from helpers import load_benchmark_script  # noqa: E402
from llm_helpers import tiny_causal_lm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergestream.bench.causal_lm import LLAMA_PROJECTIONS, LMEvaluator, load_causal_lm  # noqa: E402
from mergestream.bench.finetune import build_suite_zoo, suite_recipe  # noqa: E402
from mergestream.bench.report import (  # noqa: E402
    acc_at_table,
    evaluation_timing,
    retention_table,
    step_points,
    write_report,
)
from mergestream.bench.run import load_zoo, run_benchmark, select_methods  # noqa: E402
from mergestream.bench.suite import parse_suite  # noqa: E402
from mergestream.cli import main  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
TASKS = ("llm_arithmetic", "llm_sentiment", "llm_roman", "llm_language")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread: more only add synchronisation, which a
    busy machine turns into waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("bench-llm")
    corpus = ["0123456789 + - Compute this. Answer with the number only.", "MCDXLVI"] * 20
    corpus += (FIXTURES / "debian/wamerican/usr/share/dict/american-english").read_text().split()
    base = tiny_causal_lm(root / "base", corpus)
    text = (
        f"kind: causal-lm\nmodel: {base}\nmax_length: 48\n"
        "split: {n_test: 12, max_train: 64}\n"
        "finetune: {lora_rank: 4, steps: 8, batch_size: 4, lr: 1.0e-2}\n"
        "tasks:\n" + "".join(f"  - builtin: {name}\n" for name in TASKS)
    )
    suite = parse_suite(text, root / "suite.yaml")
    build_suite_zoo(root / "zoo", suite, cache_dir=FIXTURES, fetch=False, report=lambda _: None)
    # A few of the held-out passages and general prompts: each merged model is scored on them.
    kept = json.loads((root / "zoo" / "retention.json").read_text())
    kept = {"texts": kept["texts"][:6], "prompts": kept["prompts"][:: len(kept["prompts"]) // 12]}
    (root / "zoo" / "retention.json").write_text(json.dumps(kept))
    return root / "zoo"


def test_finetune_writes_one_adapter_per_task(llm_zoo: Path) -> None:
    meta = json.loads((llm_zoo / "zoo.json").read_text())
    assert meta["kind"] == "causal-lm" and meta["tasks"] == list(TASKS)
    retention = json.loads((llm_zoo / "retention.json").read_text())
    assert 12 <= len(retention["prompts"]) < 20 and retention["texts"]
    for name in TASKS:
        folder = llm_zoo / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(LLAMA_PROJECTIONS)
        factors = load_file(str(folder / "adapter_model.safetensors"))
        # two layers, seven projections, A and B each
        assert len(factors) == 2 * 7 * 2
        assert any(t.abs().max() > 0 for k, t in factors.items() if "lora_B" in k)
        info = json.loads((folder / "finetune.json").read_text())
        scoring = json.loads((folder / "task.json").read_text())
        assert info["scoring"] == scoring and scoring["name"] == name
        assert len(json.loads((folder / "test.json").read_text())) == info["n_test"] <= 12
        curve = [loss for _, loss in info["loss_curve"]]
        assert curve[-1] < curve[0], name  # the adapter learned the answers' format


def test_the_zoo_table_script_reads_each_adapter_and_the_base(
    llm_zoo: Path, capsys
) -> None:
    script = load_benchmark_script("llm_zoo_table")
    assert script.main([str(llm_zoo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    infos = [json.loads((llm_zoo / t / "finetune.json").read_text()) for t in TASKS]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [*TASKS, "mean"]
    for line, info in zip(lines[2:], infos, strict=False):
        cells = line.strip("| ").split(" | ")
        assert float(cells[2]) == round(100 * info["pretrained_test_accuracy"], 1)
        assert float(cells[3]) == round(100 * info["finetuned_test_accuracy"], 1)
    mean = lines[-1].strip("| ").split(" | ")
    want = sum(i["finetuned_test_accuracy"] for i in infos) / len(infos)
    assert float(mean[3]) == pytest.approx(100 * want, abs=0.051)
    # Zoos split differently (not one suite's) are refused rather than put side by side.
    other = json.loads((llm_zoo / TASKS[0] / "finetune.json").read_text())
    other["split"] = {**other["split"], "n_test": other["split"]["n_test"] + 1}
    rows = script.zoo_rows(llm_zoo)
    with pytest.raises(ValueError, match="split differently"):
        script.markdown([rows, {**rows, TASKS[0]: other}])


def _naive_right(model, codec, scoring, test) -> list[bool]:
    """Each example on its own, whole sequence, no cache: the reference for the evaluator."""
    right = []
    with torch.inference_mode():
        for text, answer in test:
            rest = codec.rest(text)
            start = len(codec.prefix) + len(rest)
            if scoring.scoring == "exact":
                want = codec.answer(answer)
                logits = model(input_ids=torch.tensor([codec.prefix + rest + want])).logits[0]
                right.append(logits[start - 1 : start - 1 + len(want)].argmax(-1).tolist() == want)
                continue
            scores = []
            for option in scoring.options:
                ids = codec.answer(option)
                logits = model(input_ids=torch.tensor([codec.prefix + rest + ids])).logits[0]
                logp = torch.log_softmax(logits.double(), -1)
                scores.append(sum(float(logp[start - 1 + j, t]) for j, t in enumerate(ids)))
            right.append(scoring.options[max(range(len(scores)), key=scores.__getitem__)] == answer)
    return right


def test_the_shared_prefix_scoring_equals_whole_sequences(llm_zoo: Path) -> None:
    zoo = load_zoo(llm_zoo)
    model, tokenizer = load_causal_lm(zoo.pretrained)
    evaluator = LMEvaluator(model, tokenizer, batch_size=5, max_length=zoo.max_length)
    for name in ("llm_sentiment", "llm_language", "llm_arithmetic"):
        evaluator.load_state_dict(zoo.individual_state_dict(name))  # a trained model
        scoring, test = zoo.heads[name], zoo.test_sets[name]
        got = evaluator.predictions(test, scoring)
        assert got == _naive_right(model, evaluator.codec(scoring), scoring, test.test), name
    texts = zoo.retention["texts"][:5]
    nll = tokens = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss  # mean over tokens after the first
            nll += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert evaluator.perplexity(texts) == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_bench_with_retention_rows_and_full_checkpoints(llm_zoo: Path, tmp_path: Path) -> None:
    methods = select_methods(["average", "task_arithmetic", "OPCM (alpha=0.5)"])
    kwargs = {"methods": methods, "orders": 2, "matrix_orders": 1, "alphas": ()}
    results = run_benchmark(
        llm_zoo, diagonal_only=True, matrix_rows=[2], log=lambda _: None, **kwargs
    )
    meta = results["meta"]
    assert meta["kind"] == "causal-lm" and meta["matrix_rows"] == [2]
    pretrained = results["reference"]["pretrained_retention"]
    assert pretrained["perplexity"] > 1 and 0 <= pretrained["general_accuracy"] <= 1
    for entry in results["methods"].values():
        first = entry["runs"][0]
        matrix = first["matrix"]
        assert all(a is not None for a in matrix[1][:2])  # the whole row after 2 tasks
        assert matrix[2][:2] == [None, None] and matrix[2][2] is not None  # diagonal only
        for run in entry["runs"]:
            kept = run["retention"]
            assert math.isfinite(kept["perplexity"]) and 0 <= kept["general_accuracy"] <= 1
    points = step_points(results)["average"]
    assert [t for t, _ in points] == [1, 2, len(TASKS)]
    row = results["methods"]["average"]["runs"][0]["matrix"][1]
    assert points[1][1] == pytest.approx(sum(row[:2]) / 2)
    assert "ACC after 4 tasks" in acc_at_table(results)
    assert "| pretrained |" in retention_table(results)
    written = write_report(results, tmp_path / "report")
    text = written["markdown"].read_text()
    assert "Base retention" in text and "ACC after" in text
    assert written["accuracy_per_step"].read_bytes()[:4] == b"\x89PNG"

    full = run_benchmark(
        llm_zoo,
        full_checkpoints=tmp_path / "full",
        log=lambda _: None,
        **{**kwargs, "methods": select_methods(["task_arithmetic"]), "orders": 1},
    )
    assert full["meta"]["full_checkpoints"] is True
    zoo = load_zoo(llm_zoo)
    for name in TASKS:
        saved = load_file(str(tmp_path / "full" / name / "model.safetensors"))
        exact = zoo.individual_state_dict(name)
        assert saved.keys() == exact.keys()
        assert all(torch.equal(saved[k], exact[k]) for k in saved)  # base + τ, rounded once
    # task arithmetic does not depend on the order: the adapters' and the full checkpoints'
    # streams give the same model up to the float32 rounding of each full checkpoint
    adapter_acc = results["methods"]["task arithmetic (c=0.3)"]["runs"][0]["acc"]
    assert abs(full["methods"]["task arithmetic (c=0.3)"]["runs"][0]["acc"] - adapter_acc) < 0.1


def test_the_llm_suite_template_and_recipe(tmp_path: Path, capsys) -> None:
    path = tmp_path / "llm.yaml"
    assert main(["bench-suite", "init", "--llm", str(path)]) == 0
    suite = parse_suite(path.read_text(), path)
    assert suite.kind == "causal-lm" and len(suite.tasks) == 14
    recipe = suite_recipe(suite)
    assert recipe.lora_rank == 8 and recipe.lora_targets == LLAMA_PROJECTIONS
    assert suite_recipe(suite, lora_rank=32).effective_lora_alpha == 64
    capsys.readouterr()
    assert main(["bench", str(tmp_path), "--matrix-rows", "four"]) != 0
    assert "--matrix-rows takes step numbers" in capsys.readouterr().err


def test_a_stopped_bench_resumes_from_its_score_record(llm_zoo: Path, tmp_path: Path) -> None:
    from mergestream.bench.run import ScoreRecord

    record = tmp_path / "scores.jsonl"
    kwargs = {
        "methods": select_methods(["OPCM (alpha=0.5)"]),
        "orders": 1,
        "matrix_orders": 1,
        "diagonal_only": True,
        "alphas": (),
        "score_record": record,
        "log": lambda _: None,
    }
    first = run_benchmark(llm_zoo, **kwargs)
    ran = first["meta"]["evaluations"]
    lines = record.read_text().splitlines()
    # the header, every score run (the reused ones are not written twice), two retentions
    assert len(lines) == 1 + ran + 2 and json.loads(lines[0]).keys() == {"zoo"}

    # A run killed halfway: half the scores on record and a torn last line.
    kept = lines[: 1 + ran // 2]
    record.write_text("\n".join(kept) + "\n" + lines[1 + ran // 2][:25])
    on_record = sum('"task"' in line for line in kept)
    again = run_benchmark(llm_zoo, resume=True, **kwargs)
    assert 0 < on_record < ran and again["meta"]["evaluations_from_record"] == on_record
    assert again["meta"]["evaluations"] == ran - on_record
    assert again["reference"] == first["reference"]
    assert again["methods"] == _without_times(first["methods"], again["methods"])

    # Each score carries the time it took, so a report assembled from the record still says
    # what an evaluation costs: the sum over the two runs is the first run's.
    timed = [json.loads(line) for line in lines[1:]]
    assert all(entry["seconds"] > 0 for entry in timed)
    on_record_seconds = sum(e["seconds"] for e in timed[: ran // 2] if "task" in e)
    meta = again["meta"]
    assert meta["recorded_evaluations_timed"] == on_record
    assert meta["recorded_evaluation_seconds"] == pytest.approx(on_record_seconds, abs=0.1)

    # Everything on record: nothing is scored again; without --resume the record restarts.
    third = run_benchmark(llm_zoo, resume=True, **kwargs)
    assert third["meta"]["evaluations"] == 0 and third["reference"] == first["reference"]
    # the first run's half on record, then the second run's own evaluations
    recorded = on_record_seconds + meta["evaluation_seconds"]
    assert third["meta"]["recorded_evaluation_seconds"] == pytest.approx(recorded, abs=0.2)
    assert third["meta"]["recorded_retentions_timed"] == 2
    assert f"{ran} task evaluations, {ran} of them timed by an earlier run" in (
        evaluation_timing(third)
    )
    # The budget script prices runs from such a report too (it scored nothing itself).
    unit = load_benchmark_script("llm_budget").measured(llm_zoo, third)
    n_test = sum(len(load_zoo(llm_zoo).test_sets[t].test) for t in TASKS) / len(TASKS)
    per_example = third["meta"]["recorded_evaluation_seconds"] / (ran * n_test)
    assert unit["eval_example"] == pytest.approx(per_example)
    assert unit["retention"] == pytest.approx(third["meta"]["recorded_retention_seconds"] / 2)
    run_benchmark(llm_zoo, **kwargs)
    restarted = record.read_text().splitlines()
    assert len(restarted) == len(lines)

    # A record made for other test sets is set aside, never mixed in.
    zoo = load_zoo(llm_zoo)
    zoo.test_sets[TASKS[0]].test.pop()
    ScoreRecord(record, zoo, resume=True)
    assert (tmp_path / "scores.jsonl.other-zoo").read_text().splitlines() == restarted
    assert record.read_text().splitlines()[1:] == []


def _without_times(ran: dict, like: dict) -> dict:
    """``ran``'s method results with the merge times of ``like`` (times differ run to run)."""
    out = json.loads(json.dumps(ran))
    for label, entry in out.items():
        for run, other in zip(entry["runs"], like[label]["runs"], strict=True):
            run["merge_seconds"] = other["merge_seconds"]
    return out


def test_runs_that_shared_the_methods_join_into_one_report(
    llm_zoo: Path, tmp_path: Path, capsys
) -> None:
    """Two processes with disjoint --methods give the report of one run with both, their
    merges and scores taken as they ran; runs of another protocol are refused."""
    from mergestream.bench.join import JoinError, join_results, load_part

    kwargs = {
        "orders": 2,
        "matrix_orders": 1,
        "diagonal_only": True,
        "matrix_rows": [2],
        "alphas": (),
        "log": lambda _: None,
    }
    rows = ["task_arithmetic", "OPCM (alpha=0.5)"]
    both = run_benchmark(llm_zoo, methods=select_methods(rows), **kwargs)
    # The parts given in the other order than the table's: the join restores the table order.
    opcm = run_benchmark(llm_zoo, methods=select_methods(["OPCM (alpha=0.5)"]), **kwargs)
    arithmetic = run_benchmark(llm_zoo, methods=select_methods(["task_arithmetic"]), **kwargs)
    write_report(opcm, tmp_path / "p1", plots=False)
    write_report(arithmetic, tmp_path / "p2", plots=False)

    assert main(["bench-join", str(tmp_path / "p1"), str(tmp_path / "p2/results.json"),
                 "--out", str(tmp_path / "joined")]) == 0
    printed = capsys.readouterr().out
    assert "2 methods from 2 runs" in printed, printed[-300:]
    joined = load_part(tmp_path / "joined")
    assert list(joined["methods"]) == list(both["methods"]) == [
        "task arithmetic (c=0.3)",
        "OPCM (alpha=0.5)",
    ]
    assert joined["methods"] == _without_times(both["methods"], joined["methods"])
    assert joined["methods"]["OPCM (alpha=0.5)"] == opcm["methods"]["OPCM (alpha=0.5)"]
    assert joined["reference"] == both["reference"]
    evaluations = opcm["meta"]["evaluations"] + arithmetic["meta"]["evaluations"]
    assert joined["meta"]["evaluations"] == evaluations > both["meta"]["evaluations"]
    assert [part["methods"] for part in joined["meta"]["joined"]] == [
        ["OPCM (alpha=0.5)"],
        ["task arithmetic (c=0.3)"],
    ]
    assert {k: joined["meta"][k] for k in ("tasks", "orders", "matrix_rows")} == {
        k: both["meta"][k] for k in ("tasks", "orders", "matrix_rows")
    }
    report = (tmp_path / "joined/results.md").read_text()
    assert f"{evaluations} task evaluations" in report and "OPCM (alpha=0.5)" in report

    # What cannot be one run is refused, naming the part and the entry.
    other_orders = json.loads(json.dumps(arithmetic))
    other_orders["meta"]["orders"] = 3
    with pytest.raises(JoinError, match="orders is 3"):
        join_results([opcm, other_orders])
    other_scores = json.loads(json.dumps(arithmetic))
    other_scores["reference"]["individual"][TASKS[0]] += 0.5
    with pytest.raises(JoinError, match=f"individual accuracy of {TASKS[0]}"):
        join_results([opcm, other_scores], ["a.json", "b.json"])
    with pytest.raises(JoinError, match="in both"):
        join_results([opcm, opcm])
    assert main(["bench-join", str(tmp_path / "p1"), str(tmp_path / "p2"),
                 "--out", str(tmp_path / "p2")]) != 0
    assert "would be overwritten" in capsys.readouterr().err
    assert main(["bench-join", str(tmp_path / "p1"), str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "j2")]) != 0
    assert "no such file" in capsys.readouterr().err
