"""Base retention: what the base LLM could already do, scored on every merged model.

Two measures, neither touched by any instruction task:

- the perplexity of held-out general text: passages of Jane Austen's six novels (Debian
  ``r-cran-janeaustenr``; no LLM task reads them);
- :data:`GENERAL_PROMPTS`, general instruction prompts with known short answers (capitals,
  opposites, plurals, days and months, one-digit sums, everyday facts), scored by whether the
  normalised answer appears in the model's greedy reply
  (:func:`mergestream.bench.scoring.contains_answer`).

A merge that wins the tasks but breaks the model shows here. This module does not import torch.
"""

from __future__ import annotations

import os
import random
from typing import Any

# Held-out text: passages this long (characters), this many, drawn with a fixed seed.
PASSAGES = 48
PASSAGE_CHARS = 400

_CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("England", "London"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Australia", "Canberra"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Turkey", "Ankara"),
)
_OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("old", "young"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("wet", "dry"),
    ("rich", "poor"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("true", "false"),
    ("win", "lose"),
    ("left", "right"),
)
_PLURALS = (
    ("mouse", "mice"),
    ("child", "children"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("goose", "geese"),
    ("person", "people"),
    ("box", "boxes"),
    ("city", "cities"),
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_FACTS = (
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("What color is a ripe banana?", "yellow"),
    ("What planet do we live on?", "Earth"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What do bees make?", "honey"),
    ("How many legs does a spider have?", "eight"),
    ("How many days are in a week?", "seven"),
    ("How many months are in a year?", "twelve"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("What is the fastest land animal?", "cheetah"),
    ("Which star is at the centre of our solar system?", "Sun"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
)
_NUMBER_WORDS = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    "eighteen",
]


def general_prompts() -> list[tuple[str, str]]:
    """The fixed general prompts with their short answers (120 of them)."""
    prompts = [(f"What is the capital of {c}?", a) for c, a in _CAPITALS]
    prompts += [(f"What is the opposite of {w}?", a) for w, a in _OPPOSITES]
    prompts += [(f"What is the plural of {w}?", a) for w, a in _PLURALS]
    prompts += [(f"What day comes after {d}?", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    prompts += [
        (f"What month comes after {m}?", _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)
    ]
    rng = random.Random("general_prompts")
    sums = set()
    while len(sums) < 21:
        sums.add((rng.randrange(1, 10), rng.randrange(1, 10)))
    # Answers as digits; a reply in words ("seven") is accepted by giving both forms below.
    prompts += [(f"What is {a} plus {b}?", str(a + b)) for a, b in sorted(sums)]
    prompts += list(_FACTS)
    return prompts


def accepted_answers(answer: str) -> list[str]:
    """The forms of ``answer`` a reply may use: a number also in words, and the reverse."""
    forms = [answer]
    if answer.isdigit() and int(answer) < len(_NUMBER_WORDS):
        forms.append(_NUMBER_WORDS[int(answer)])
    if answer in _NUMBER_WORDS:
        forms.append(str(_NUMBER_WORDS.index(answer)))
    return forms


def heldout_passages(
    cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> list[str]:
    """:data:`PASSAGES` seeded passages of Jane Austen's novels, each at most
    :data:`PASSAGE_CHARS` characters."""
    from mergestream.bench.tasks import _austen_book, ensure_sources

    roots = ensure_sources(["austen_book"], cache_dir, fetch=fetch)
    _, _, data = _austen_book(roots)
    texts = sorted({t for t, _ in data if 100 <= len(t) <= PASSAGE_CHARS})
    return random.Random("heldout_passages").sample(texts, min(PASSAGES, len(texts)))


def retention_set(
    cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> dict[str, Any]:
    """The held-out passages and the general prompts, as plain data (stored in a zoo)."""
    return {
        "texts": heldout_passages(cache_dir, fetch=fetch),
        "prompts": [list(p) for p in general_prompts()],
    }
