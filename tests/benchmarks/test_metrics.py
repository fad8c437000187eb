"""Benchmark metrics against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import metrics as M


def test_auc_hand_case():
    # positives 0.9, 0.3; negatives 0.8, 0.1: pairs won 0.9>0.8, 0.9>0.1, 0.3>0.1 -> 3 of 4
    assert M.roc_auc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert M.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert M.roc_auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0


def test_auc_ties_count_half_and_empty_class_is_nan():
    assert M.roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # positive 0.5 vs negatives 0.5 (tie, 1/2) and 0.2 (win, 1) -> 1.5 / 2
    assert M.roc_auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc([0.1, 0.2], [1, 1]))


def test_rank_is_one_based_pessimistic_and_restricted_to_candidates():
    s = [0.1, 0.9, 0.5]
    assert M.rank_of(s, 1) == 1
    assert M.rank_of(s, 2) == 2
    assert M.rank_of(s, 2, candidates=[0, 2]) == 1
    assert M.rank_of([0.5, 0.5, 0.5], 0) == 3  # ties never help
    with pytest.raises(ValueError):
        M.rank_of(s, 1, candidates=[0, 2])


def test_recall_and_reciprocal_rank():
    np.testing.assert_array_equal(M.recall_at_k([1, 3, 6], 5), [1, 1, 0])
    np.testing.assert_array_equal(M.recall_at_k([1, 3, 6], 1), [1, 0, 0])
    rr = M.reciprocal_rank([1, 2, 4])
    np.testing.assert_allclose(rr, [1, 0.5, 0.25])
    assert rr.mean() == pytest.approx(7 / 12)  # mAP with one relevant item per query


def test_top1_correct():
    np.testing.assert_array_equal(M.top1_correct(["a", "b", "a"], ["a", "a", "a"]), [1, 0, 1])


def test_spearman_hand_case():
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks of y = [1, 2, 3.5, 5, 3.5]: cov 8, var 10 and 9.5 -> 8 / sqrt(95)
    assert M.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(M.spearman([1], [2]))


def test_lds_sign_helpful_images_predict_lower_loss():
    scores = np.array([[3.0, 2.0, 1.0]])  # one query, three training images
    masks = np.eye(3)  # subset m holds image m only
    losses = np.array([[0.1], [0.2], [0.3]])  # the subset with the most attributed image has the lowest loss
    np.testing.assert_allclose(M.lds_per_query(scores, masks, losses), [1.0])
    np.testing.assert_allclose(M.lds_per_query(-scores, masks, losses), [-1.0])


def test_lds_group_sums_and_shapes():
    scores = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # sums q0: 1, 2, 3; q1: 1, 1, 0
    losses = np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0]])
    lds = M.lds_per_query(scores, masks, losses)
    assert lds[0] == pytest.approx(1.0)
    # q1: -(sums) = [-1, -1, 0] (ranks 1.5, 1.5, 3) vs losses (1, 2, 3): 0.866
    assert lds[1] == pytest.approx(M.spearman([-1, -1, 0], [0, 1, 2]))
    assert lds[1] == pytest.approx(math.sqrt(3) / 2)
    with pytest.raises(ValueError):
        M.lds_per_query(scores, masks, losses.T)


def test_bootstrap_intervals():
    assert M.mean_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    v = np.array([0.0, 1.0] * 20)
    lo, hi = M.mean_ci(v, n_resamples=1000, seed=1)
    assert 0.25 < lo < 0.5 < hi < 0.75
    assert M.mean_ci(v, seed=1) == M.mean_ci(v, seed=1)  # seeded
    lo, hi = M.bootstrap_ci(lambda i: float(np.median(v[i])), len(v), 200, seed=0)
    assert 0 <= lo <= hi <= 1
    assert all(math.isnan(x) for x in M.mean_ci(np.array([])))


def test_paired_difference_uses_the_same_items():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    # a constant offset: every paired resample gives exactly 1 (an unpaired bootstrap would be wide)
    d, lo, hi = M.paired_difference(a + 1.0, a)
    assert (d, lo, hi) == pytest.approx((1.0, 1.0, 1.0))
    d, lo, hi = M.paired_difference(a, a)
    assert (d, lo, hi) == pytest.approx((0.0, 0.0, 0.0))
    d, lo, hi = M.paired_difference(np.array([1.0, np.nan, 3.0]), np.array([0.0, 5.0, 1.0]))
    assert d == pytest.approx(1.5)  # the NaN pair is dropped


def test_paired_statistic_difference():
    x = np.arange(20, dtype=float)
    y = x.copy()
    stat_pos = lambda i: M.spearman(x[i], y[i])  # noqa: E731
    stat_neg = lambda i: M.spearman(-x[i], y[i])  # noqa: E731
    d, lo, hi = M.paired_statistic_difference(stat_pos, stat_neg, len(x), 200, seed=0)
    assert (d, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
