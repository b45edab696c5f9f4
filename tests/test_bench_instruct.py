"""The causal-LM benchmark's instruction tasks and scoring: parsers on small fixtures of their
sources, the balanced split, the suite's model kind, and the pure scoring functions."""

from __future__ import annotations

import collections
import math
import re
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")

from mergestream.bench import scoring  # noqa: E402
from mergestream.bench.instruct import (  # noqa: E402
    LLM_TASK_NAMES,
    InstructData,
    builtin_instruct,
    number_words,
    roman,
    split_instruct,
    transliterate,
)
from mergestream.bench.retention import accepted_answers, general_prompts  # noqa: E402
from mergestream.bench.splits import SplitConfig  # noqa: E402
from mergestream.bench.suite import SuiteError, parse_suite  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def _from_roman(text: str) -> int:
    """An independent reading of a Roman numeral: add each letter, subtract it when a larger
    one follows."""
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for i, letter in enumerate(text):
        value = values[letter]
        later = values[text[i + 1]] if i + 1 < len(text) else 0
        total += -value if value < later else value
    return total


def _from_words(text: str) -> int:
    """An independent reading of English number words (as `number_words` writes them)."""
    units = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    teens = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen"]
    teens += ["seventeen", "eighteen", "nineteen"]
    small = {w: i for i, w in enumerate(units + teens)}
    decades = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    tens = {w: 10 * (i + 2) for i, w in enumerate(decades)}
    total = current = 0
    for word in text.replace("-", " ").split():
        if word in small:
            current += small[word]
        elif word in tens:
            current += tens[word]
        elif word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = (total + current) * 1000, 0
        else:
            raise ValueError(word)
    return total + current


def test_roman_numerals_read_back_to_every_number() -> None:
    for number in range(1, 4000):
        text = roman(number)
        assert _from_roman(text) == number
        assert re.fullmatch(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})", text)


def test_number_words_read_back() -> None:
    for number in [*range(0, 1200), 20000, 99999, 100001, 987654]:
        assert _from_words(number_words(number)) == number


def test_transliteration_is_letter_by_letter_and_latin() -> None:
    data = builtin_instruct("llm_translit", FIXTURES, fetch=False)
    assert data.examples
    for word, answer, _ in data.examples:
        assert answer == "".join(transliterate(c) for c in word)
        assert answer.isascii() and answer.isalpha() and answer.islower()


@pytest.mark.parametrize("name", LLM_TASK_NAMES)
def test_every_task_parses_from_its_fixture(name: str) -> None:
    data = builtin_instruct(name, FIXTURES, fetch=False)
    assert data.examples, name
    assert data.scoring in ("choice", "exact")
    assert all(0 <= stratum < len(data.strata) for _, _, stratum in data.examples)
    if data.scoring == "choice":
        assert data.options == data.strata
        assert all(answer == data.options[s] for _, answer, s in data.examples)
    else:
        assert data.options == []
    assert all(text.strip() and answer.strip() for text, answer, _ in data.examples)


def test_task_answers_follow_from_their_sources() -> None:
    lemma = builtin_instruct("llm_verb_lemma", FIXTURES, fetch=False)
    lines = (FIXTURES / "debian/wordnet-base/usr/share/wordnet/verb.exc").read_text().split("\n")
    pairs = {tuple(line.split()) for line in lines if len(line.split()) == 2}
    assert {(t, a) for t, a, _ in lemma.examples} <= pairs
    authors = builtin_instruct("llm_fortune_author", FIXTURES, fetch=False)
    assert all(text.endswith(f"-- {answer}") for text, answer, _ in authors.examples)
    arithmetic = builtin_instruct("llm_arithmetic", FIXTURES, fetch=False)
    for text, answer, stratum in arithmetic.examples[:200]:
        a, op, b = text.split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert stratum == (0 if op == "+" else 1) and int(answer) >= 0
    script = builtin_instruct("llm_script", FIXTURES, fetch=False)
    for text, answer, _ in script.examples[::97]:
        assert all(unicodedata.name(c).startswith(answer.upper()) for c in text)
    words = set((FIXTURES / "debian/wamerican/usr/share/dict/american-english").read_text().split())
    for text, answer, _ in builtin_instruct("llm_is_word", FIXTURES, fetch=False).examples:
        assert (text in words) == (answer == "yes")


def test_split_drops_ambiguous_inputs_and_balances_the_test_set() -> None:
    examples = [(f"a{i}", "x", 0) for i in range(40)] + [(f"b{i}", "y", 1) for i in range(10)]
    examples += [("same", "x", 0), ("same", "y", 1)]  # one input, two answers
    data = InstructData("Pick.", "choice", ["x", "y"], ["x", "y"], examples)
    task = split_instruct("t", data, SplitConfig(n_test=12, max_train=None, seed=1))
    texts = [t for t, _ in task.train + task.test]
    assert "same" not in texts and len(texts) == 50 and len(set(texts)) == 50
    counts = collections.Counter(a for _, a in task.test)
    assert counts == {"x": 6, "y": 6}
    again = split_instruct("t", data, SplitConfig(n_test=12, max_train=None, seed=1))
    assert again.test == task.test  # seeded


def test_a_causal_lm_suite_checks_its_tasks(tmp_path: Path) -> None:
    suite = parse_suite("kind: causal-lm\ntasks:\n  - builtin: llm_roman\n")
    spec = suite.tasks[0]
    assert (suite.kind, spec.kind, spec.split.n_test, spec.split.balance) == (
        "causal-lm",
        "causal-lm",
        200,
        True,
    )
    assert spec.summary()["kind"] == "causal-lm"
    assert "kind" not in parse_suite("tasks:\n  - builtin: rt_sentiment\n").tasks[0].summary()
    with pytest.raises(SuiteError, match="a task of the other kind"):
        parse_suite("kind: causal-lm\ntasks:\n  - builtin: rt_sentiment\n")
    with pytest.raises(SuiteError, match="unknown built-in task 'llm_roman' for a encoder"):
        parse_suite("tasks:\n  - builtin: llm_roman\n")
    with pytest.raises(SuiteError, match=r"<suite>:1: kind must be one of"):
        parse_suite("kind: gpt\ntasks:\n  - builtin: llm_roman\n")
    with pytest.raises(SuiteError, match="'pooling' is for an encoder suite"):
        parse_suite("kind: causal-lm\npooling: cls\ntasks:\n  - builtin: llm_roman\n")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(30)))
    with pytest.raises(SuiteError, match="needs an `instruction:`"):
        parse_suite(f"kind: causal-lm\ntasks:\n  - name: mine\n    data: {data}\n")
    with pytest.raises(SuiteError, match="drop 'instruction'"):
        parse_suite(f"tasks:\n  - name: mine\n    data: {data}\n    instruction: Say.\n")


def test_a_file_task_of_a_causal_lm_suite(tmp_path: Path) -> None:
    from mergestream.bench.suite import load_task_data

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 3 == 0]}\n" for i in range(60)))
    text = (
        "kind: causal-lm\nsplit: {n_test: 10}\ntasks:\n"
        f"  - name: mine\n    data: {data}\n    instruction: Which letter?\n"
    )
    task = load_task_data(parse_suite(text).tasks[0])
    assert (task.scoring, task.options, task.instruction) == ("choice", ["a", "b"], "Which letter?")
    assert collections.Counter(a for _, a in task.test) == {"a": 5, "b": 5}
    assert all(a == "ab"[int(t[1:]) % 3 == 0] for t, a in task.train + task.test)


def test_sequence_logprobs_and_greedy_matches() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    targets = torch.randint(0, 7, (3, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    got = scoring.sequence_logprobs(logits, targets, mask)
    for i in range(3):
        expected = sum(
            math.log(torch.softmax(logits[i, t].double(), -1)[targets[i, t]].item())
            for t in range(4)
            if mask[i, t]
        )
        assert got[i].item() == pytest.approx(expected, abs=1e-12)
    greedy = logits.argmax(-1)
    targets2 = greedy.clone()
    targets2[1, 3] = (greedy[1, 3] + 1) % 7  # masked out: still a match
    targets2[2, 0] = (greedy[2, 0] + 1) % 7  # a real miss
    assert scoring.greedy_matches(logits, targets2, mask).tolist() == [True, True, False]
    assert scoring.pick_options(torch.tensor([[0.1, 0.3, 0.3], [2.0, -1.0, 0.0]])).tolist() == [
        1,
        0,
    ]


def test_normalised_matching() -> None:
    assert scoring.normalise("  The Café, in PARIS! ") == "cafe in paris"
    assert scoring.contains_answer("The capital of France is Paris.", "paris")
    assert not scoring.contains_answer("Parisian food", "Paris")  # whole words only
    assert not scoring.contains_answer("anything", "")
    assert scoring.perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        scoring.perplexity(1.0, 0)


def test_general_prompts_are_many_distinct_and_answerable() -> None:
    prompts = general_prompts()
    assert len(prompts) >= 100 and len({q for q, _ in prompts}) == len(prompts)
    sums = [(q, a) for q, a in prompts if " plus " in q]
    for question, answer in sums:
        a, b = map(int, re.findall(r"\d+", question))
        assert int(answer) == a + b
        assert all(scoring.contains_answer(f"It is {f}.", f) for f in accepted_answers(answer))
    assert "seven" in accepted_answers("7") and "7" in accepted_answers("seven")
