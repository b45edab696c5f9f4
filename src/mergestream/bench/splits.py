"""Train/test splits of a labelled text set: deduplicated, stratified or class-balanced,
optionally grouped, and fixed by a seed.

Every benchmark task, built-in or from a suite file, is split by :func:`split_examples`:

- duplicates are dropped, and a text seen with two labels is dropped altogether;
- the test set takes ``n_test`` examples, per class in proportion to the class sizes
  (stratified) or as equal as the class sizes allow (``balance=True``);
- the train set takes what is left, capped at ``max_train`` with the same per-class rule;
- with ``groups`` (e.g. the movie of a review, the speaker of a sentence) whole groups go to
  one side: no group has examples in both train and test, so the test set measures
  generalisation to unseen groups;
- with ``test_examples`` (a source's own test file) the test set is drawn from it and the train
  set from ``examples``, minus any text (and, when grouped, any group) that is in the test set.

The random generator is seeded by ``f"{name}:{seed}"``, so each task's split depends only on
its name, its data and the seed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Hashable, Iterable, Sequence

Example = tuple[str, int]
Quota = Callable[[Sequence[int], int], list[int]]


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How to split one task.

    Attributes:
        n_test: test examples to draw (fewer when the data has fewer).
        max_train: cap on the train set; None keeps every example not in the test set.
        seed: seeds the split (together with the task's name).
        balance: equal class counts as far as the data allows, instead of proportional.
    """

    n_test: int = 500
    max_train: int | None = 5000
    seed: int = 0
    balance: bool = False

    def __post_init__(self) -> None:
        if self.n_test < 0:
            raise ValueError(f"n_test must be >= 0, got {self.n_test}")
        if self.max_train is not None and self.max_train < 0:
            raise ValueError(f"max_train must be >= 0 or None, got {self.max_train}")


@dataclasses.dataclass(frozen=True)
class Split:
    """A split and what it holds: examples per class and, when grouped, groups per side."""

    train: list[Example]
    test: list[Example]
    train_class_counts: list[int]
    test_class_counts: list[int]
    train_groups: int | None = None
    test_groups: int | None = None

    def summary(self) -> dict[str, object]:
        """Counts as plain data (stored with each fine-tuned checkpoint)."""
        out: dict[str, object] = {
            "n_train": len(self.train),
            "n_test": len(self.test),
            "train_class_counts": self.train_class_counts,
            "test_class_counts": self.test_class_counts,
        }
        if self.test_groups is not None:
            out["train_groups"] = self.train_groups
            out["test_groups"] = self.test_groups
        return out


def proportional_quota(counts: Sequence[int], total: int) -> list[int]:
    """Largest-remainder allocation of ``total`` proportional to ``counts``, each at most its
    count."""
    n = sum(counts)
    total = min(total, n)
    if total <= 0:
        return [0] * len(counts)
    exact = [c * total / n for c in counts]
    q = [min(int(e), c) for e, c in zip(exact, counts, strict=True)]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    k = 0
    while sum(q) < total:
        i = order[k % len(order)]
        if q[i] < counts[i]:
            q[i] += 1
        k += 1
    return q


def balanced_quota(counts: Sequence[int], total: int) -> list[int]:
    """Allocation of ``total`` as equal as ``counts`` allow (water-filling): a class smaller
    than its equal share gives all it has and the rest is shared among the larger ones. When
    the total does not divide evenly, earlier classes get the one extra example."""
    q = [0] * len(counts)
    remaining = min(max(total, 0), sum(counts))
    open_classes = [i for i, c in enumerate(counts) if c > 0]
    while remaining > 0 and open_classes:
        share = remaining // len(open_classes)
        if share == 0:
            for i in open_classes[:remaining]:
                q[i] += 1
            break
        for i in open_classes:
            take = min(share, counts[i] - q[i])
            q[i] += take
            remaining -= take
        open_classes = [i for i in open_classes if q[i] < counts[i]]
    return q


def dedupe(data: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Drop repeated texts; drop texts seen with more than one label altogether."""
    return [(t, y) for t, y, _ in _dedupe_grouped((t, y, None) for t, y in data)]


def _dedupe_grouped(
    data: Iterable[tuple[str, int, Hashable]],
) -> list[tuple[str, int, Hashable]]:
    """:func:`dedupe` for (text, label, group) triples; a text keeps its first group."""
    labels: dict[str, set[int]] = {}
    first: dict[str, tuple[int, Hashable]] = {}
    for text, y, g in data:
        if text not in labels:
            labels[text] = set()
            first[text] = (y, g)
        labels[text].add(y)
    return [(t, *first[t]) for t in first if len(labels[t]) == 1]


def _by_class(data: Iterable[tuple[str, int]], num_classes: int) -> list[list[str]]:
    by_class: list[list[str]] = [[] for _ in range(num_classes)]
    for text, y in data:
        by_class[y].append(text)
    return by_class


def _sample(
    by_class: list[list[str]], total: int, rng: random.Random, quota: Quota
) -> tuple[list[list[str]], list[list[str]]]:
    """Split each class list into (taken, rest), taking ``quota`` of ``total`` per class."""
    q = quota([len(c) for c in by_class], total)
    taken, rest = [], []
    for items, k in zip(by_class, q, strict=True):
        items = list(items)
        rng.shuffle(items)
        taken.append(items[:k])
        rest.append(items[k:])
    return taken, rest


def _flatten(by_class: list[list[str]], rng: random.Random) -> list[Example]:
    out = [(t, y) for y, items in enumerate(by_class) for t in items]
    rng.shuffle(out)
    return out


def _sample_groups(
    data: list[tuple[str, int, Hashable]],
    num_classes: int,
    total: int,
    rng: random.Random,
    quota: Quota,
) -> tuple[list[list[str]], set[Hashable]]:
    """Whole groups for the test set: groups in seeded random order, each taken when it keeps
    every class within its quota of ``total``. Returns the chosen texts by class and groups."""
    members: dict[Hashable, list[tuple[str, int]]] = {}
    for text, y, g in data:
        members.setdefault(g, []).append((text, y))
    counts = [0] * num_classes
    for _, y, _ in data:
        counts[y] += 1
    q = quota(counts, total)
    order = list(members)
    rng.shuffle(order)
    taken: list[list[str]] = [[] for _ in range(num_classes)]
    filled = [0] * num_classes
    chosen: set[Hashable] = set()
    wanted = sum(q)
    for g in order:
        if sum(filled) >= wanted:
            break
        need = [0] * num_classes
        for _, y in members[g]:
            need[y] += 1
        if all(filled[c] + need[c] <= q[c] for c in range(num_classes)):
            chosen.add(g)
            for text, y in members[g]:
                taken[y].append(text)
                filled[y] += 1
    return taken, chosen


def _quota(config: SplitConfig) -> Quota:
    return balanced_quota if config.balance else proportional_quota


Triples = list[tuple[str, int, Hashable]]


def _sources(
    examples: Iterable[tuple[str, int]],
    groups: Sequence[Hashable] | None,
    test_examples: Iterable[tuple[str, int]] | None,
    test_groups: Sequence[Hashable] | None,
) -> tuple[Triples, Triples]:
    """The deduplicated (text, label, group) triples to train on and to draw the test set
    from (the same list unless the source has its own test examples)."""
    examples = list(examples)
    grouped = groups is not None
    if grouped:
        if len(groups) != len(examples):
            raise ValueError(f"{len(groups)} groups for {len(examples)} examples")
        data = _dedupe_grouped((t, y, g) for (t, y), g in zip(examples, groups, strict=True))
    else:
        data = [(t, y, None) for t, y in dedupe(examples)]
    if test_examples is None:
        return data, data
    test_examples = list(test_examples)
    if not grouped:
        return data, [(t, y, None) for t, y in dedupe(test_examples)]
    if test_groups is None or len(test_groups) != len(test_examples):
        raise ValueError("grouped test examples need one group each")
    return data, _dedupe_grouped(
        (t, y, g) for (t, y), g in zip(test_examples, test_groups, strict=True)
    )


@dataclasses.dataclass(frozen=True)
class GroupFit:
    """How whole groups fit a grouped split's test set (see :func:`group_fit`).

    Attributes:
        examples: examples the test set is drawn from, after deduplication.
        quota: test examples per class that ``n_test`` asks for.
        group_sizes: examples per group, smallest first.
        fitting_n_test: the smallest ``n_test`` at which at least one whole group fits every
            class's quota, so that the test set is not empty.
    """

    examples: int
    quota: list[int]
    group_sizes: list[int]
    fitting_n_test: int


def group_fit(
    examples: Iterable[tuple[str, int]],
    num_classes: int,
    config: SplitConfig,
    groups: Sequence[Hashable],
    *,
    test_examples: Iterable[tuple[str, int]] | None = None,
    test_groups: Sequence[Hashable] | None = None,
) -> GroupFit:
    """Group sizes against the test quota of a grouped split, to explain an empty test set.

    A group goes to the test set only when its examples of every class fit that class's
    quota of ``n_test``; when every group is larger than its share, none does. This finds the
    smallest ``n_test`` that lets one group in (at most the number of examples, where the
    quota is every example)."""
    _, source = _sources(examples, groups, test_examples, test_groups)
    quota = _quota(config)
    counts = [0] * num_classes
    needs: dict[Hashable, list[int]] = {}
    for _, y, g in source:
        counts[y] += 1
        needs.setdefault(g, [0] * num_classes)[y] += 1
    sizes = sorted(sum(need) for need in needs.values())
    distinct = {tuple(need) for need in needs.values()}
    fitting = len(source)
    # Only on the error path: a plain scan upwards from the smallest group's size.
    for n in range(sizes[0] if sizes else 0, len(source) + 1):
        q = quota(counts, n)
        if any(all(a <= b for a, b in zip(need, q, strict=True)) for need in distinct):
            fitting = n
            break
    return GroupFit(len(source), quota(counts, config.n_test), sizes, fitting)


def split_examples(
    name: str,
    examples: Iterable[tuple[str, int]],
    num_classes: int,
    config: SplitConfig = SplitConfig(),
    *,
    groups: Sequence[Hashable] | None = None,
    test_examples: Iterable[tuple[str, int]] | None = None,
    test_groups: Sequence[Hashable] | None = None,
) -> Split:
    """Split ``examples`` (``(text, label)``, labels in ``range(num_classes)``) as the module
    docstring says. ``groups`` (and ``test_groups`` for ``test_examples``) give each example's
    group, aligned with the examples."""
    rng = random.Random(f"{name}:{config.seed}")
    quota = _quota(config)
    grouped = groups is not None
    data, test_source = _sources(examples, groups, test_examples, test_groups)

    held_groups: set[Hashable] = set()
    if grouped:
        test_by, held_groups = _sample_groups(test_source, num_classes, config.n_test, rng, quota)
        held = {t for items in test_by for t in items}
        rest = [(t, y) for t, y, g in data if t not in held and g not in held_groups]
        train_by = _by_class(rest, num_classes)
    elif test_examples is None:
        test_by, train_by = _sample(
            _by_class(((t, y) for t, y, _ in data), num_classes), config.n_test, rng, quota
        )
    else:
        test_by, _ = _sample(
            _by_class(((t, y) for t, y, _ in test_source), num_classes), config.n_test, rng, quota
        )
        held = {t for items in test_by for t in items}
        train_by = _by_class(((t, y) for t, y, _ in data if t not in held), num_classes)
    if config.max_train is not None:
        train_by, _ = _sample(train_by, config.max_train, rng, quota)
    test = _flatten(test_by, rng)
    train = _flatten(train_by, rng)
    train_groups = test_group_count = None
    if grouped:
        group_of = {t: g for t, _, g in data}
        train_groups = len({group_of[t] for t, _ in train})
        test_group_count = len(held_groups)
    return Split(
        train,
        test,
        [len(items) for items in train_by],
        [len(items) for items in test_by],
        train_groups,
        test_group_count,
    )
