"""The public split API: stratified, class-balanced and grouped splits, fixed by a seed."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mergestream.bench.splits import (
    SplitConfig,
    balanced_quota,
    dedupe,
    group_fit,
    proportional_quota,
    split_examples,
)


def _data(sizes: list[int], seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = [(f"text {y} {i}", y) for y, n in enumerate(sizes) for i in range(n)]
    rng.shuffle(out)
    return out


def _water_fill(counts: list[int], total: int) -> list[int]:
    """Independent balanced allocation: hand out one example at a time, round robin."""
    q = [0] * len(counts)
    total = min(total, sum(counts))
    while sum(q) < total:
        for i in range(len(counts)):
            if sum(q) < total and q[i] < counts[i]:
                q[i] += 1
    return q


@pytest.mark.parametrize(
    ("counts", "total"),
    [([10, 10], 5), ([100, 3, 40], 60), ([5, 5, 5], 100), ([0, 7, 2], 6), ([1, 50, 50, 2], 37)],
)
def test_balanced_quota_is_water_filling(counts: list[int], total: int) -> None:
    assert balanced_quota(counts, total) == _water_fill(counts, total)


@pytest.mark.parametrize(("counts", "total"), [([100, 3, 40], 60), ([7, 3, 1], 6)])
def test_proportional_quota_sums_and_tracks_shares(counts: list[int], total: int) -> None:
    q = proportional_quota(counts, total)
    assert sum(q) == min(total, sum(counts))
    for qi, c in zip(q, counts, strict=True):
        assert abs(qi - c * total / sum(counts)) < 1.0 + 1e-9


def test_stratified_split_counts_and_disjointness() -> None:
    data = _data([300, 100, 50])
    split = split_examples("t", data, 3, SplitConfig(n_test=90, max_train=200, seed=1))
    assert split.test_class_counts == [60, 20, 10]  # 2/3, 2/9, 1/9 of 90
    assert Counter(y for _, y in split.test) == {0: 60, 1: 20, 2: 10}
    assert len(split.train) == 200 and sum(split.train_class_counts) == 200
    assert not {t for t, _ in split.train} & {t for t, _ in split.test}
    # The train counts are proportional to what was left after the test set.
    left = [300 - 60, 100 - 20, 50 - 10]
    assert split.train_class_counts == proportional_quota(left, 200)


def test_balanced_split_is_even_where_the_data_allows() -> None:
    data = _data([300, 100, 12])
    split = split_examples("t", data, 3, SplitConfig(n_test=60, max_train=60, balance=True))
    # The small class gives all 12 it has; the others share the rest evenly.
    assert Counter(y for _, y in split.test) == {0: 24, 1: 24, 2: 12}
    assert split.train_class_counts == [30, 30, 0]  # balanced cap on what is left
    small = split_examples("t", data, 3, SplitConfig(n_test=90, max_train=None, balance=True))
    assert small.test_class_counts == _water_fill([300, 100, 12], 90)
    assert small.test_class_counts == [39, 39, 12]
    assert small.train_class_counts == [300 - 39, 100 - 39, 0]


def test_split_is_seeded() -> None:
    data = _data([50, 50])
    a = split_examples("t", data, 2, SplitConfig(n_test=20, seed=3))
    b = split_examples("t", list(data), 2, SplitConfig(n_test=20, seed=3))
    c = split_examples("t", data, 2, SplitConfig(n_test=20, seed=4))
    d = split_examples("other", data, 2, SplitConfig(n_test=20, seed=3))
    assert a == b
    assert set(a.test) != set(c.test) and set(a.test) != set(d.test)


def _grouped(n_groups: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[str]]:
    """Groups of 1-9 examples; a group's examples are mostly, not always, of one class."""
    rng = random.Random(seed)
    data, groups = [], []
    for g in range(n_groups):
        main = rng.randrange(3)
        for i in range(rng.randint(1, 9)):
            y = main if rng.random() < 0.8 else rng.randrange(3)
            data.append((f"group {g} text {i}", y))
            groups.append(f"g{g}")
    return data, groups


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_groups_on_one_side(balance: bool, seed: int) -> None:
    data, groups = _grouped(120, seed)
    config = SplitConfig(n_test=100, max_train=None, seed=seed, balance=balance)
    split = split_examples("t", data, 3, config, groups=groups)
    group_of = dict(zip((t for t, _ in data), groups, strict=True))
    train_groups = {group_of[t] for t, _ in split.train}
    test_groups = {group_of[t] for t, _ in split.test}
    assert not train_groups & test_groups
    assert split.train_groups == len(train_groups) and split.test_groups == len(test_groups)
    # No cap on training: every example is on exactly one side.
    assert sorted(split.train + split.test) == sorted(data)
    # Each class stays within its quota, and the test set is nearly full (groups are small).
    counts = [sum(1 for _, y in data if y == c) for c in range(3)]
    quota = (balanced_quota if balance else proportional_quota)(counts, 100)
    test_counts = Counter(y for _, y in split.test)
    for c in range(3):
        assert test_counts[c] == split.test_class_counts[c] <= quota[c]
    assert 85 <= len(split.test) <= 100


def test_grouped_split_with_a_separate_test_file_drops_test_groups_from_training() -> None:
    data, groups = _grouped(60, 5)
    test, test_groups = _grouped(30, 6)  # same group names g0..g29 as in `data`
    split = split_examples(
        "t",
        data,
        3,
        SplitConfig(n_test=40, max_train=None),
        groups=groups,
        test_examples=test,
        test_groups=test_groups,
    )
    group_of = dict(zip((t for t, _ in data), groups, strict=True))
    test_group_of = dict(zip((t for t, _ in test), test_groups, strict=True))
    chosen = {test_group_of[t] for t, _ in split.test}
    assert chosen and not chosen & {group_of[t] for t, _ in split.train}
    assert {t for t, _ in split.test} <= {t for t, _ in test}
    kept = [t for t, _ in data if group_of[t] not in chosen]
    assert sorted(t for t, _ in split.train) == sorted(kept)


def test_dedupe_and_group_length_check() -> None:
    assert dedupe([("a", 0), ("b", 1), ("a", 0), ("c", 0), ("c", 1)]) == [("a", 0), ("b", 1)]
    with pytest.raises(ValueError, match="2 groups for 3 examples"):
        split_examples("t", [("a", 0), ("b", 1), ("c", 0)], 2, groups=["x", "y"])
    with pytest.raises(ValueError):
        SplitConfig(n_test=-1)


def test_group_fit_finds_the_smallest_n_test_that_takes_a_whole_group() -> None:
    # Groups of 6, 8 and 10 examples, half of either class.
    data, groups = [], []
    for g, size in enumerate((10, 6, 8)):
        data += [(f"g{g} text {i}", i % 2) for i in range(size)]
        groups += [f"g{g}"] * size
    config = SplitConfig(n_test=4, max_train=None)
    assert split_examples("t", data, 2, config, groups=groups).test == []
    fit = group_fit(data, 2, config, groups)
    assert fit.examples == 24 and fit.quota == [2, 2] and fit.group_sizes == [6, 8, 10]
    assert fit.fitting_n_test == 6  # quota [3, 3]: the group of 6 fits
    for n_test in (5, 6):
        split = split_examples(
            "t", data, 2, SplitConfig(n_test=n_test, max_train=None), groups=groups
        )
        assert bool(split.test) == (n_test >= fit.fitting_n_test)
    # A separate test file: its groups count, not the training file's.
    fit = group_fit(data, 2, config, groups, test_examples=data[:10], test_groups=groups[:10])
    assert fit.examples == 10 and fit.group_sizes == [10] and fit.fitting_n_test == 10
