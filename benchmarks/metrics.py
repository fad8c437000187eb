"""Attribution-benchmark metrics: pure numpy (+ scipy's Spearman), no torch, no montrage state.

Conventions
-----------
* Scores: higher = more attributable (the scorers' contract).
* Ranks are 1-based and *pessimistic*: a target's rank is 1 + the number of other candidates scoring
  at least as high, so tied (e.g. constant) scores never earn recall by luck.
* AUC is the Mann-Whitney statistic with ties counted one half; NaN when a class is empty.
* LDS (linear datamodeling score, Park et al. 2023 "TRAK"; Zheng et al. 2024 "D-TRAK"): for query q,
  the Spearman correlation across retrained subset models m between the predicted group effect
  ``sum_{i in S_m} tau(q, i)`` and the measured model output ``-L_m(q)`` (the negated denoising loss),
  i.e. ``spearman(-(masks @ tau_q), L_q)``: higher attribution of the included images must predict a
  LOWER loss of the query, so a good method has LDS > 0. This is D-TRAK's own evaluation
  (sail-sg/D-TRAK notebooks: ``preds = lds_mask_array @ (-scores).T``,
  ``spearmanr(preds[:, q], loss[:, q])`` with the retrained models' mean loss).
* Bootstrap: percentile intervals over resampled queries (items), ``n_resamples`` draws from a seeded
  generator; a paired difference resamples the same items for both methods.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

Interval = Tuple[float, float]


# ----------------------------------------------------------------------------- ranking
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count 1/2)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rank_of(scores: np.ndarray, target: int, candidates: Optional[Sequence[int]] = None) -> int:
    """1-based pessimistic rank of ``target`` among ``candidates`` (default: all) by descending score."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    cand = np.arange(len(s)) if candidates is None else np.asarray(candidates, dtype=int)
    if target not in set(cand.tolist()):
        raise ValueError(f"target {target} is not among the candidates")
    others = cand[cand != target]
    return int(1 + np.sum(s[others] >= s[target]))


def recall_at_k(ranks: Sequence[int], k: int) -> np.ndarray:
    """Per query 1.0 if the (single) relevant item is in the top ``k``, else 0.0."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def reciprocal_rank(ranks: Sequence[int]) -> np.ndarray:
    """Per query 1/rank: the average precision of a query with exactly one relevant item."""
    return 1.0 / np.asarray(ranks, dtype=np.float64)


def top1_correct(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    return np.array([p == e for p, e in zip(predicted, expected)], dtype=np.float64)


# ----------------------------------------------------------------------------- correlation
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} differ in shape")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of each query: spearman over subsets of (-(sum of its scores over the subset), its loss).

    scores (Q, N) attribution; masks (M, N) 0/1 membership of each retrained subset;
    losses (M, Q) the query's denoising loss under each subset's model. Returns (Q,).
    """
    from montrage.analysis.fused import lds_per_query as library_lds  # the one definition, shared with the fit

    scores, masks, losses = (np.asarray(a, dtype=np.float64) for a in (scores, masks, losses))
    if masks.shape[1] != scores.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes: scores {scores.shape}, masks {masks.shape}, losses {losses.shape}")
    return library_lds(scores, masks, losses)


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) item indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentile(values: np.ndarray, level: float) -> Interval:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return (float(lo), float(hi))


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Interval:
    """Percentile interval of ``statistic(indices)`` over resampled item indices."""
    if n == 0:
        return (float("nan"), float("nan"))
    idx = bootstrap_indices(n, n_resamples, seed)
    return _percentile(np.array([statistic(i) for i in idx]), level)


def mean_ci(values: np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Bootstrap interval of the mean of per-item values (NaN items are ignored)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = bootstrap_indices(len(v), n_resamples, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples: dropped by _percentile
        means = np.nanmean(v[idx], axis=1)
    return _percentile(means, level)


def paired_difference(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> Tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi) with the same resampled items on both sides (NaN pairs dropped)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    if d.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    lo, hi = mean_ci(d, n_resamples, seed, level)
    return (float(d.mean()), lo, hi)


def paired_statistic_difference(stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float],
                                n: int, n_resamples: int = 1000, seed: int = 0,
                                level: float = 0.95) -> Tuple[float, float, float]:
    """(stat_a(all) - stat_b(all), lo, hi) for statistics of a whole sample (e.g. a Spearman), paired."""
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    full = np.arange(n)
    lo, hi = bootstrap_ci(lambda i: stat_a(i) - stat_b(i), n, n_resamples, seed, level)
    return (float(stat_a(full) - stat_b(full)), lo, hi)
