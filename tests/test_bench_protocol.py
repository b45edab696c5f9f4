"""ACC, BWT and task orders on hand-computed examples."""

from __future__ import annotations

import pytest

from mergestream.bench.protocol import backward_transfer, final_accuracy, mean_std, task_orders


def test_acc_and_bwt_on_a_hand_computed_matrix():
    matrix = [
        [0.9, None, None],
        [0.8, 0.7, None],
        [0.6, 0.5, 0.4],
    ]
    assert final_accuracy(matrix) == pytest.approx(0.5)
    # task 0: 0.6 - 0.9 = -0.3; task 1: 0.5 - 0.7 = -0.2; mean -0.25
    assert backward_transfer(matrix) == pytest.approx(-0.25)
    assert backward_transfer([[0.9]]) == 0.0
    with pytest.raises(ValueError, match="last row"):
        final_accuracy([[0.9, None]])


def test_orders_are_seeded_permutations():
    tasks = ["a", "b", "c", "d", "e"]
    orders = task_orders(tasks, 4, seed=0)
    assert orders[0] == tasks
    assert all(sorted(o) == tasks for o in orders)
    assert task_orders(tasks, 4, seed=0) == orders
    assert task_orders(tasks, 4, seed=1) != orders
    assert len({tuple(o) for o in orders}) > 1


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([5.0]) == (5.0, 0.0)
