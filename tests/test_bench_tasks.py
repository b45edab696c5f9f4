"""Benchmark task loaders, run on the small source fixtures (no fetching)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("yaml")
pytest.importorskip("rdata")

from mergestream.bench import sources as S  # noqa: E402
from mergestream.bench import tasks as T  # noqa: E402
from mergestream.bench.suite import load_task  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"

EXPECTED_CLASSES = {
    "rt_sentiment": ["negative", "positive"],
    "debate_party": ["Democrat", "Republican", "debate moderator"],
    "chatter_language": [
        "English",
        "Persian",
        "Italian",
        "Japanese",
        "Ukrainian",
        "Korean",
        "Spanish",
        "Chinese",
        "Portuguese",
        "Dutch",
    ],
    "fortune_topic": list(T._FORTUNE_FILES.values()),
    "wordnet_noun_supersense": list(T._NOUN_LEXFILES.values()),
    "wordnet_verb_supersense": list(T._VERB_LEXFILES.values()),
    "austen_book": [
        "Sense and Sensibility",
        "Pride and Prejudice",
        "Mansfield Park",
        "Emma",
        "Northanger Abbey",
        "Persuasion",
    ],
    "fine_food": ["bad", "great"],
}

# Examples each fixture yields after parsing and de-duplication.
FIXTURE_SIZES = {
    "rt_sentiment": 80,
    "chatter_language": 100,
    "fortune_topic": 45,
    "wordnet_noun_supersense": 48,
    "wordnet_verb_supersense": 168,
    "austen_book": 60,
}


def _load(name: str, **kw) -> T.TaskData:
    kw.setdefault("n_test", 10)
    return load_task(name, FIXTURES, fetch=False, **kw)


def test_task_names_order() -> None:
    assert tuple(EXPECTED_CLASSES) == T.TASK_NAMES


@pytest.mark.parametrize("name", T.TASK_NAMES)
def test_fixture_task_loads(name: str) -> None:
    task = _load(name, n_test=10)
    assert task.name == name
    assert task.class_names == EXPECTED_CLASSES[name]
    assert all("{}" in tpl for tpl in task.templates) and len(task.templates) >= 2
    assert len(task.test) == 10
    for split in (task.train, task.test):
        for text, y in split:
            assert isinstance(text, str) and text == text.strip() and "  " not in text
            assert 0 <= y < task.num_classes
    train_texts = {t for t, _ in task.train}
    assert not train_texts & {t for t, _ in task.test}
    assert len(train_texts) == len(task.train)
    if name in FIXTURE_SIZES:
        assert len(task.train) + len(task.test) == FIXTURE_SIZES[name]
    if name != "debate_party":  # sentence lengths leave a class out of 10 test examples
        assert sum(c > 0 for c in task.class_counts("train")) == task.num_classes


def test_split_is_seeded_and_stratified() -> None:
    a = _load("chatter_language", n_test=20)
    b = _load("chatter_language", n_test=20)
    c = _load("chatter_language", n_test=20, seed=1)
    assert a == b
    assert a.test != c.test
    assert a.class_counts("test") == [2] * 10  # 10 per language: a proportional quota
    capped = _load("chatter_language", n_test=20, max_train=40)
    assert capped.class_counts("train") == [4] * 10


def test_fine_food_keeps_source_split() -> None:
    task = _load("fine_food", n_test=4)
    assert task.class_counts("test") == [2, 2]
    assert task.class_counts("train") == [5, 5]  # all of training_data


def test_wordnet_skips_header_and_small_lexfiles() -> None:
    task = _load("wordnet_noun_supersense", n_test=5)
    texts = [t for t, _ in task.train + task.test]
    assert not any("Princeton" in t for t in texts)
    assert len(texts) == 2 * len(T._NOUN_LEXFILES)
    assert not any('"' in t for t in texts)  # example sentences are cut off


def test_austen_passages_are_three_lines() -> None:
    task = _load("austen_book", n_test=6)
    assert all(not t.upper().startswith("CHAPTER") for t, _ in task.train)
    assert all(len(t.split()) > 12 for t, _ in task.train)


def test_quota() -> None:
    assert T._quota([10, 10], 5) in ([3, 2], [2, 3])
    assert sum(T._quota([7, 3, 1], 6)) == 6
    assert T._quota([1, 100], 50) == [0, 50] or T._quota([1, 100], 50) == [1, 49]
    assert T._quota([2, 2], 10) == [2, 2]


def test_dedupe_drops_conflicts() -> None:
    data = [("a", 0), ("b", 1), ("a", 0), ("c", 0), ("c", 1)]
    assert T._dedupe(data) == [("a", 0), ("b", 1)]


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGESTREAM_CACHE", str(tmp_path / "env"))
    assert S.cache_root() == tmp_path / "env"
    assert S.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MERGESTREAM_CACHE")
    assert S.cache_root() == Path.home() / ".cache" / "mergestream" / "bench"


def test_missing_source_without_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(S, "_SYSTEM_ROOT", tmp_path / "no-system")
    with pytest.raises(S.SourceUnavailableError, match="wordnet-base"):
        T.ensure_sources(["wordnet_verb_supersense"], tmp_path, fetch=False)
    with pytest.raises(KeyError):
        T.ensure_sources(["no_such_task"], tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_source_from_local_deb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A .deb already in <cache>/debs is unpacked without any download."""
    monkeypatch.setattr(S, "_SYSTEM_ROOT", tmp_path / "no-system")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: wordnet-base\nVersion: 1:3.0-0\nArchitecture: all\n"
        "Maintainer: nobody <nobody@example.org>\nDescription: fixture\n"
    )
    src = FIXTURES / "debian" / "wordnet-base" / "usr"
    shutil.copytree(src, pkg / "usr")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    deb = cache / "debs" / "wordnet-base_3.0-0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    root = S.source_dir("wordnet-base", cache)
    assert root == cache / "debian" / "wordnet-base"
    task = load_task("wordnet_verb_supersense", cache, n_test=14, fetch=False)
    assert task == _load("wordnet_verb_supersense", n_test=14)
