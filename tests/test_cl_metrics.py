import math

import pytest

from benchmarks.cl_metrics import backward_transfer, final_accuracy, mean_std

NAN = float("nan")
R = [
    [0.90, NAN, NAN],
    [0.80, 0.70, NAN],
    [0.60, 0.65, 0.50],
]


def test_final_accuracy_is_mean_of_last_row():
    assert final_accuracy(R) == pytest.approx((0.60 + 0.65 + 0.50) / 3)


def test_backward_transfer_uses_diagonal_by_default():
    # (0.60 - 0.90 + 0.65 - 0.70) / 2
    assert backward_transfer(R) == pytest.approx(-0.175)


def test_backward_transfer_against_just_trained_accuracy():
    # Share's reference is the accuracy before the merge: here 0.95 and 0.75.
    assert backward_transfer(R, just_trained=[0.95, 0.75, 0.55]) == pytest.approx((0.60 - 0.95 + 0.65 - 0.75) / 2)


def test_no_forgetting_gives_zero_bwt_and_single_task_is_zero():
    assert backward_transfer([[0.8, NAN], [0.8, 0.9]]) == 0.0
    assert backward_transfer([[0.7]]) == 0.0


def test_mean_std():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert not math.isnan(mean_std([0.1, 0.1])[1])
