"""Suite files: parsing, file tasks, built-in tasks through the same path, and the errors a bad
suite gets (each naming the file and the line)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")
pytest.importorskip("rdata")

from mergestream.bench import suite as S  # noqa: E402
from mergestream.bench.splits import SplitConfig, split_examples  # noqa: E402
from mergestream.bench.suite import load_task  # noqa: E402
from mergestream.cli import main  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def _line_of(text: str, marker: str) -> int:
    """1-based line of the first line of ``text`` containing ``marker``."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _reviews(n: int = 40) -> list[dict[str, object]]:
    words = {"positive": "good", "negative": "bad"}
    return [
        {
            "text": f"a {words[label]} film number {i}",
            "label": label,
            "movie": f"m{i % 8}",
        }
        for i, label in enumerate(["positive", "negative"] * (n // 2))
    ]


def _suite(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(body)
    return path


def test_file_task_from_csv(tmp_path: Path) -> None:
    rows = _reviews(40)
    _write_csv(tmp_path / "data" / "reviews.csv", rows)
    path = _suite(
        tmp_path,
        "split: {n_test: 10, max_train: null, seed: 2}\n"
        "tasks:\n"
        "  - name: reviews\n"
        "    data: data/reviews.csv\n"
        "    group_column: movie\n"
        "    templates: ['a {} review.']\n",
    )
    suite = S.load_suite(path)
    assert suite.names == ["reviews"] and suite.max_length == S.DEFAULT_MAX_LENGTH
    task = S.load_task_data(suite.tasks[0])
    assert task.class_names == ["negative", "positive"]  # sorted distinct labels
    assert task.templates == ["a {} review."]
    # The split is split_examples on the file's rows, grouped by movie.
    names = {"negative": 0, "positive": 1}
    expected = split_examples(
        "reviews",
        [(r["text"], names[r["label"]]) for r in rows],
        2,
        SplitConfig(n_test=10, max_train=None, seed=2),
        groups=[r["movie"] for r in rows],
    )
    assert task.train == expected.train and task.test == expected.test
    assert task.split_info["test_groups"] == expected.test_groups
    movie = {r["text"]: r["movie"] for r in rows}
    assert not {movie[t] for t, _ in task.train} & {movie[t] for t, _ in task.test}


def test_label_codes_mapped_to_names_and_train_test_folder(tmp_path: Path) -> None:
    rows = [{"text": f"item {i}", "label": i % 3} for i in range(30)]
    _write_csv(tmp_path / "topics" / "train.csv", rows[:24])
    (tmp_path / "topics" / "test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[24:])
    )
    path = _suite(
        tmp_path,
        "tasks:\n"
        "  - name: topics\n"
        "    data: topics/\n"
        "    class_names: {2: music, 0: sports, 1: food}\n",
    )
    task = S.load_task_data(S.load_suite(path).tasks[0])
    assert task.class_names == ["music", "sports", "food"]
    code_to_class = {2: 0, 0: 1, 1: 2}
    assert sorted(task.test) == sorted((r["text"], code_to_class[r["label"]]) for r in rows[24:])
    assert sorted(task.train) == sorted((r["text"], code_to_class[r["label"]]) for r in rows[:24])


def test_builtin_task_and_the_same_data_as_a_file_split_identically(tmp_path: Path) -> None:
    """One code path: a built-in task and its examples written to a CSV give the same split."""
    builtin = load_task("chatter_language", FIXTURES, n_test=20, fetch=False)
    rows = [{"text": t, "label": builtin.class_names[y]} for t, y in builtin.train + builtin.test]
    _write_csv(tmp_path / "chatter.csv", rows)
    names = json.dumps(builtin.class_names)
    templates = json.dumps(builtin.templates)
    path = _suite(
        tmp_path,
        f"data_cache: {FIXTURES}\n"
        "split: {n_test: 20, max_train: 5000}\n"
        "tasks:\n"
        "  - builtin: chatter_language\n"
        "  - name: chatter_language_copy\n"
        "    data: chatter.csv\n"
        f"    class_names: {names}\n"
        f"    templates: {templates}\n",
    )
    suite = S.load_suite(path)
    via_suite = S.load_task_data(suite.tasks[0], cache_dir=suite.data_cache, fetch=False)
    assert via_suite == builtin
    copy = S.load_task_data(suite.tasks[1])
    # Same examples and classes; the seed is mixed with the task's name, so compare the split
    # of the copy with split_examples under that name.
    expected = split_examples(
        "chatter_language_copy",
        [(r["text"], builtin.class_names.index(r["label"])) for r in rows],
        len(builtin.class_names),
        SplitConfig(n_test=20, max_train=5000),
    )
    assert copy.test == expected.test and copy.train == expected.train
    assert copy.class_counts("test") == builtin.class_counts("test")


def test_template_is_valid_once_its_data_exists(tmp_path: Path, capsys) -> None:
    path = tmp_path / "SUITE.yaml"
    assert main(["bench-suite", "init", str(path)]) == 0
    assert main(["bench-suite", "init", str(path)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
    _write_csv(tmp_path / "data" / "reviews.csv", _reviews(40))
    suite = S.load_suite(path)
    assert suite.names == ["my_sentiment", "rt_sentiment"]
    assert suite.finetune == {"steps": 300, "lr": 1e-4, "batch_size": 32}
    spec = suite.task("my_sentiment")
    assert spec.class_names == ("negative", "positive") and spec.split.n_test == 500
    text = path.read_text().replace("n_test: 500", "n_test: 10")
    path.write_text(text)
    assert main(["bench-suite", "check", str(path), "--tasks", "my_sentiment"]) == 0
    out = capsys.readouterr().out
    assert "my_sentiment: 30 train, 10 test" in out


# --------------------------------------------------------------------------------------
# Bad suites


def _error(tmp_path: Path, body: str, load_data: bool = False) -> str:
    with pytest.raises(S.SuiteError) as info:
        suite = S.load_suite(_suite(tmp_path, body))
        if load_data:
            for spec in suite.tasks:
                S.load_task_data(spec)
    return str(info.value)


BAD_SUITES = {
    "unknown_key": ("tasks:\n  - name: a\n    data: d.csv\n    lable_column: y\n", "lable_column"),
    "duplicate": (
        "tasks:\n  - name: a\n    data: d.csv\n  - name: a\n    data: d.csv\n",
        "- name: a\n    data: d.csv\n  - name: a",
    ),
    "template": ("tasks:\n  - name: a\n    data: d.csv\n    templates: ['no slot']\n", "templates"),
    "missing_file": ("tasks:\n  - name: a\n    data: nothing.csv\n", "data: nothing"),
    "empty_test": ("tasks:\n  - name: a\n    data: d.csv\n    n_test: 0\n", "n_test"),
    "one_class_names": ("tasks:\n  - name: a\n    data: d.csv\n    class_names: [x]\n", "class_n"),
    "builtin": ("tasks:\n  - builtin: no_such_task\n", "builtin"),
    "pooling": ("pooling: max\ntasks:\n  - builtin: rt_sentiment\n", "pooling"),
    "no_tasks": ("max_length: 32\ntasks: []\n", "tasks"),
    "type": ("split:\n  n_test: many\ntasks:\n  - builtin: rt_sentiment\n", "n_test"),
    "yaml": ("tasks:\n  - name: a\n    data: [d.csv\n", None),
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suite_names_file_and_line(tmp_path: Path, case: str) -> None:
    body, marker = BAD_SUITES[case]
    _write_csv(tmp_path / "d.csv", _reviews(10))
    message = _error(tmp_path, body)
    path = tmp_path / "suite.yaml"
    if marker is None:  # a YAML syntax error: the parser's line
        assert message.startswith(f"{path}:")
        return
    line = _line_of(body, marker.splitlines()[-1]) if case != "duplicate" else 4
    assert message.startswith(f"{path}:{line}: "), message


def test_missing_column_names_the_data_file(tmp_path: Path) -> None:
    _write_csv(tmp_path / "d.csv", [{"text": "x", "y": "a"}, {"text": "z", "y": "b"}])
    message = _error(tmp_path, "tasks:\n  - name: a\n    data: d.csv\n", load_data=True)
    assert message.startswith(f"{tmp_path / 'd.csv'}:1: no column 'label'")
    assert "text, y" in message


def test_missing_jsonl_field_names_the_line(tmp_path: Path) -> None:
    lines = ['{"text": "a", "label": 1}', "", '{"text": "b"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    message = _error(tmp_path, "tasks:\n  - name: a\n    data: d.jsonl\n", load_data=True)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:3: no field 'label'")


def test_label_not_in_class_names_names_the_row_and_the_suite_line(tmp_path: Path) -> None:
    # The first record spans lines 2-3 (a quoted newline), so the bad row is on line 5.
    (tmp_path / "d.csv").write_text(
        'text,label\n"two\nlines",good\nfine,good\nmeh,neutral\nugh,bad\n'
    )
    body = "tasks:\n  - name: a\n    data: d.csv\n    class_names: [bad, good]\n"
    message = _error(tmp_path, body, load_data=True)
    assert message.startswith(f"{tmp_path / 'd.csv'}:5: task 'a': label 'neutral'")
    assert f"{tmp_path / 'suite.yaml'}:2" in message


def test_one_class_in_the_data(tmp_path: Path) -> None:
    _write_csv(tmp_path / "d.csv", [{"text": f"t{i}", "label": "same"} for i in range(5)])
    body = "tasks:\n  - name: first\n    builtin: rt_sentiment\n  - name: a\n    data: d.csv\n"
    with pytest.raises(S.SuiteError) as info:
        S.load_task_data(S.load_suite(_suite(tmp_path, body)).tasks[1])
    assert str(info.value).startswith(f"{tmp_path / 'suite.yaml'}:4: task 'a': ")
    assert "at least two classes" in str(info.value)


def test_empty_test_file(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", _reviews(10))
    (tmp_path / "test.csv").write_text("text,label\n")
    body = "tasks:\n  - name: a\n    train: train.csv\n    test: test.csv\n"
    message = _error(tmp_path, body, load_data=True)
    assert message.startswith(f"{tmp_path / 'suite.yaml'}:2: task 'a': ")
    assert "test.csv holds no examples" in message


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    message = _error(tmp_path, "tasks:\n  - name: a\n    data: d.parquet\n", load_data=True)
    assert "pip install pyarrow" in message and str(tmp_path / "d.parquet") in message


def test_parquet_with_pyarrow(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = _reviews(20)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    task = S.load_task_data(
        S.load_suite(
            _suite(tmp_path, "split: {n_test: 6}\ntasks:\n  - name: a\n    data: d.parquet\n")
        ).tasks[0]
    )
    assert len(task.test) == 6 and len(task.train) + len(task.test) == 20
    read = sorted(e[0] for e in [*task.train, *task.test])
    assert read == sorted(r["text"] for r in rows)


def test_builtin_rejects_data_keys_and_wrong_class_count(tmp_path: Path) -> None:
    body = "tasks:\n  - builtin: rt_sentiment\n    text_column: t\n"
    assert _error(tmp_path, body).startswith(f"{tmp_path / 'suite.yaml'}:3: ")
    body = f"data_cache: {FIXTURES}\ntasks:\n  - builtin: rt_sentiment\n"
    body += "    class_names: [a, b, c]\n"
    suite = S.load_suite(_suite(tmp_path, body))
    with pytest.raises(S.SuiteError, match="has 2 classes"):
        S.load_task_data(suite.tasks[0], cache_dir=suite.data_cache, fetch=False)


def test_unquoted_exponent_learning_rate(tmp_path: Path) -> None:
    body = "finetune: {lr: 3e-4, steps: 10}\ntasks:\n  - builtin: rt_sentiment\n"
    assert S.load_suite(_suite(tmp_path, body)).finetune == {"lr": 3e-4, "steps": 10}


def test_latin1_csv_names_the_file_and_line(tmp_path: Path, capsys) -> None:
    rows = "".join(f"a good film number {i},positive\nbad one {i},negative\n" for i in range(6))
    data = ("text,label\n" + rows + "un film très bon,positive\n").encode("latin-1")
    (tmp_path / "d.csv").write_bytes(data)
    path = _suite(tmp_path, "tasks:\n  - name: a\n    data: d.csv\n")
    message = _error(tmp_path, path.read_text(), load_data=True)
    assert message == (
        f"{tmp_path / 'd.csv'}:14: not UTF-8 (byte 0xe8 at column 11); re-save the file as UTF-8"
    )
    # The same line through the command, without a traceback.
    assert main(["bench-suite", "check", str(path)]) == 2
    assert capsys.readouterr().err == f"mergestream: error: {message}\n"


def test_latin1_jsonl_and_suite_file_name_the_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)]
    lines.append('{"text": "caf\xe9", "label": 1}')
    (tmp_path / "d.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    message = _error(tmp_path, "tasks:\n  - name: a\n    data: d.jsonl\n", load_data=True)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:5: not UTF-8 (byte 0xe9")
    suite = tmp_path / "latin.yaml"
    suite.write_bytes("# caf\xe9\ntasks:\n  - builtin: rt_sentiment\n".encode("latin-1"))
    with pytest.raises(S.SuiteError, match=f"^{suite}:1: not UTF-8 .*re-save the file as UTF-8"):
        S.load_suite(suite)


def test_a_csv_field_longer_than_the_csv_modules_default_limit(tmp_path: Path) -> None:
    long_text = "a long good document " * 10_000  # 210000 characters, over 131072
    rows = [*_reviews(20), {"text": long_text, "label": "positive", "movie": "m0"}]
    _write_csv(tmp_path / "d.csv", rows)
    path = _suite(tmp_path, "split: {n_test: 6}\ntasks:\n  - name: a\n    data: d.csv\n")
    task = S.load_task_data(S.load_suite(path).tasks[0])
    texts = {t for t, _ in task.train + task.test}
    assert len(texts) == 21 and long_text.strip() in texts


def test_a_quote_never_closed_is_not_taken_as_the_rest_of_the_file(tmp_path: Path) -> None:
    body = "".join(f"good film {i},positive\nbad film {i},negative\n" for i in range(5))
    (tmp_path / "d.csv").write_text(f'text,label\n{body}"an open quote,positive\n{body}')
    message = _error(tmp_path, "tasks:\n  - name: a\n    data: d.csv\n", load_data=True)
    assert message.startswith(f"{tmp_path / 'd.csv'}:12: a quoted field opened on this line")
    assert "never closed" in message


def test_a_label_only_in_the_test_file_fails_check(tmp_path: Path, capsys) -> None:
    _write_csv(tmp_path / "train.csv", _reviews(20))
    test_rows = _reviews(6)
    test_rows[3] = {**test_rows[3], "label": "mixed"}
    _write_csv(tmp_path / "test.csv", test_rows)
    body = "tasks:\n  - name: a\n    train: train.csv\n    test: test.csv\n"
    path = _suite(tmp_path, body)
    assert main(["bench-suite", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"mergestream: error: {tmp_path / 'test.csv'}:5: task 'a': label 'mixed' is only in "
        f"the test file, never in {tmp_path / 'train.csv'}, so it can never be learned"
    )
    assert f"the suite entry is at {path}:2" in err and "all valid" not in err
    # Listed in class_names, it is meant: accepted.
    path.write_text(body + "    class_names: [negative, positive, mixed]\n")
    assert main(["bench-suite", "check", str(path)]) == 0


def test_a_grouped_split_with_too_large_groups_says_why_the_test_set_is_empty(
    tmp_path: Path,
) -> None:
    # Two groups of 20, each with 10 examples of either class.
    rows = [{**r, "movie": f"m{i // 2 % 2}"} for i, r in enumerate(_reviews(40))]
    _write_csv(tmp_path / "d.csv", rows)
    body = "split: {n_test: 10}\ntasks:\n  - name: a\n    data: d.csv\n    group_column: movie\n"
    message = _error(tmp_path, body, load_data=True)
    assert message == (
        f"{tmp_path / 'suite.yaml'}:3: task 'a': the test set is empty: group_column 'movie' "
        "keeps each group on one side, and no group fits the test quota: n_test 10 of 40 "
        "examples (25%) asks for negative 5, positive 5, while the 2 groups hold 20 to 20 "
        "examples (the smallest is 50% of them); set n_test to 20 or more, group by a column "
        "with smaller groups, or drop group_column"
    )
    # What it says works.
    (tmp_path / "suite.yaml").write_text(body.replace("n_test: 10", "n_test: 20"))
    task = S.load_task_data(S.load_suite(tmp_path / "suite.yaml").tasks[0])
    assert len(task.test) == 20 and len(task.train) == 20
    # Each group holds all of one class: only n_test 40, every example, takes one in.
    rows = [{**r, "movie": f"m{i % 2}"} for i, r in enumerate(_reviews(40))]
    _write_csv(tmp_path / "d.csv", rows)
    message = _error(tmp_path, body, load_data=True)
    assert message.endswith(
        "the 2 groups hold 20 to 20 examples (the smallest is 50% of them); group by a "
        "column with smaller groups, or drop group_column"
    )
