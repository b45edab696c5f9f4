"""The continual-merging evaluation protocol: task orders, the accuracy matrix, ACC and BWT.

Pure functions over plain numbers, so they are tested directly and shared by every runner.

Accuracy matrix: `matrix[t][i]` is the accuracy on task `order[i]` of the model merged after
step t+1 (0-based t), defined for i <= t; later entries are None.
- ACC = mean accuracy over all T tasks of the final merged model.
- BWT = 1/(T-1) * Σ_{i<T} [a_i(after all T) - a_i(right after model i was merged)].
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

AccuracyMatrix = list[list[float | None]]


def task_orders(tasks: Sequence[str], count: int, seed: int = 0) -> list[list[str]]:
    """`count` seeded random permutations of `tasks` (the first is the given order when
    seed == 0 and count >= 1, so a single-order run merges in the natural order)."""
    rng = random.Random(seed)
    orders: list[list[str]] = []
    for index in range(count):
        order = list(tasks)
        if not (seed == 0 and index == 0):
            rng.shuffle(order)
        orders.append(order)
    return orders


def final_accuracy(matrix: AccuracyMatrix) -> float:
    """ACC: mean over all tasks of the final model's accuracy."""
    last = matrix[-1]
    if any(a is None for a in last):
        raise ValueError("the last row of the accuracy matrix must be complete")
    return statistics.fmean(a for a in last if a is not None)


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """BWT: mean change of each earlier task's accuracy from just after its merge to the end."""
    steps = len(matrix)
    if steps < 2:
        return 0.0
    changes = []
    for i in range(steps - 1):
        right_after, at_end = matrix[i][i], matrix[-1][i]
        if right_after is None or at_end is None:
            raise ValueError(f"accuracy matrix lacks task {i} after step {i + 1} or at the end")
        changes.append(at_end - right_after)
    return statistics.fmean(changes)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std
