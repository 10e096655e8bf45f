import math

import pytest

from benchmarks.cl_metrics import backward_transfer, final_accuracy, mean_std, merge_loss
from share.errors import ShareClError

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


def test_merge_loss_counts_the_last_task_and_bwt_does_not():
    # Only the last task lost accuracy (its final merge truncated it): BWT cannot see it, merge loss can.
    R = [[0.90, NAN, NAN], [0.90, 0.80, NAN], [0.90, 0.80, 0.40]]
    just_trained = [0.90, 0.80, 0.70]
    assert backward_transfer(R, just_trained) == 0.0
    assert merge_loss(R, just_trained) == pytest.approx((0.40 - 0.70) / 3)


def test_merge_loss_on_a_hand_made_matrix():
    # (0.60 - 0.95) + (0.65 - 0.75) + (0.50 - 0.55), over all 3 tasks
    assert merge_loss(R, just_trained=[0.95, 0.75, 0.55]) == pytest.approx((-0.35 - 0.10 - 0.05) / 3)
    # Default reference: the diagonal, so the last task contributes 0 there.
    assert merge_loss(R) == pytest.approx((0.60 - 0.90 + 0.65 - 0.70 + 0.0) / 3)


def test_metrics_reject_a_ragged_matrix():
    with pytest.raises(ShareClError, match="T x T"):
        merge_loss([[0.5, NAN], [0.5]], [0.5, 0.5])
    with pytest.raises(ShareClError, match="just-trained"):
        backward_transfer(R, just_trained=[0.9, 0.8])
