"""Rules the fit adopts only when its own evidence says they help: exact caption first (checked on the generated
supervision), the other images' share and the counterfactual term (checked held out on the retrained subsets).
Arrays in, decisions with their figures out."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.analysis.fused.fit import COUNTERFACTUAL_WEIGHT, Counterfactual, FusedModel, fit

EXACT_CAPTION_TOLERANCE = 1e-4  # of the text-encoder cosine: 1 - this counts as the same caption
EXACT_CAPTION_MARGIN = 0.1  # in standard deviations of the query's raw scores: how far above the rest a lifted image goes
# candidate shares of the influence left to the other images on an exact-caption query, chosen on the counterfactual
# targets (`montrage fit --retrains`): 1 keeps the fitted scores; 0 says the generation owes its loss to its own image
EXACT_CAPTION_SHARES = (1.0, 0.5, 0.2, 0.1, 0.0)
# the term is adopted only when it raises the held-out LDS by more than this and 2 standard errors: forced on 4
# retrains, it traded new compositions for LDS (typefaces s0 composition 1.00 -> .53; synthetic s0 LDS .52 -> .44)
COUNTERFACTUAL_ADOPT_MARGIN = 0.02


def exact_caption_first(raw: np.ndarray, text: np.ndarray) -> Tuple[np.ndarray, List[List[int]]]:
    """Per query, the images whose caption is the prompt (``text``: text-encoder cosine, (Q, N)) ranked first, each
    lifted to at least EXACT_CAPTION_MARGIN row-std above the best other image; nothing changes for a query that
    matches no caption or every caption. Returns the new raw scores and, per query, the lifted images."""
    out = np.array(raw, np.float32, copy=True)
    lifted: List[List[int]] = []
    for j in range(len(out)):
        exact = np.asarray(text[j], np.float64) >= 1.0 - EXACT_CAPTION_TOLERANCE
        if not exact.any() or exact.all():
            lifted.append([])
            continue
        floor = out[j][~exact].max() + max(EXACT_CAPTION_MARGIN * float(out[j].std()), 1e-3)
        out[j][exact] = np.maximum(out[j][exact], floor)
        lifted.append([int(i) for i in np.flatnonzero(exact)])
    return out, lifted


def share_others(scores: np.ndarray, lifted: Sequence[Sequence[int]], share: float) -> np.ndarray:
    """``scores`` with the images other than each row's lifted ones multiplied by ``share`` (rows that lifted
    nothing unchanged): how much of an exact-caption generation is owed to the rest of the training set."""
    out = np.array(scores, np.float32, copy=True)
    if share == 1.0:
        return out
    for j, lift in enumerate(lifted):
        if len(lift):
            keep = out[j][list(lift)].copy()
            out[j] *= np.float32(share)
            out[j][list(lift)] = keep
    return out


def recall_at_1(scores: np.ndarray, target: np.ndarray) -> float:
    """Share of rows whose target-1 image scores strictly above every other image."""
    top = target.argmax(1)
    rows = np.arange(len(scores))
    best = scores[rows, top]
    others = np.where(np.arange(scores.shape[1])[None] == top[:, None], -np.inf, scores).max(1)
    return float(np.mean(best > others))


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation, across subsets, of -(sum of the query's scores over the subset) with its loss under
    the model retrained on it (NaN where either is constant or there are fewer than 2 subsets). (Q, N), (M, N),
    (M, Q). The benchmark's LDS (``benchmarks.metrics.lds_per_query``) is this."""
    from scipy import stats

    pred = -(np.asarray(masks, np.float64) @ np.asarray(scores, np.float64).T)
    loss = np.asarray(losses, np.float64)
    out = np.full(pred.shape[1], np.nan)
    for q in range(pred.shape[1]):
        if len(pred) >= 2 and np.ptp(pred[:, q]) > 0 and np.ptp(loss[:, q]) > 0:
            out[q] = float(stats.spearmanr(pred[:, q], loss[:, q]).statistic)
    return out


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """D-TRAK's linear datamodeling score: the mean of :func:`lds_per_query`."""
    v = lds_per_query(scores, masks, losses)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def lifted_scores(model: FusedModel, rows: Dict[str, np.ndarray]) -> Tuple[np.ndarray, List[List[int]]]:
    """The calibrated scores of supervision rows with exact captions lifted (as the scorer lifts them), and per row
    the lifted images: what :func:`share_others` scales."""
    raw, lifted = exact_caption_first(model.raw(rows), rows["text/encoder"])
    return model.calibrate(raw), lifted


def scored_rows(model: FusedModel, rows: Dict[str, np.ndarray], share: float = 1.0) -> np.ndarray:
    """The model's scores of supervision rows for the counterfactual term's check: with ``share`` < 1, exact captions
    lifted and the other images' scores scaled; the calibrated scores alone otherwise (the check as it was before
    the share)."""
    if share == 1.0 or "text/encoder" not in rows:
        return model.calibrate(model.raw(rows))
    return share_others(*lifted_scores(model, rows), share)


def counterfactual_check(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
                         concepts: Sequence[str], cf: Counterfactual, plain: Optional[FusedModel] = None,
                         share: float = 1.0) -> Dict[str, object]:
    """Held-out LDS of the counterfactual term: fitted on one half of the retrained subsets, scored on the other
    half (both ways round), against the same model fitted without it -- never on subsets it was fitted on. Both
    are scored with the other images' ``share`` already chosen for the plain model, so the term is credited only
    with what the share does not already give."""
    m = len(cf.masks)
    out: Dict[str, object] = {"retrains": m, "weight": COUNTERFACTUAL_WEIGHT}
    if m < 4:
        out["heldout"] = "needs 4+ retrained subsets (2 to fit, 2 to score)"
        return out
    halves = (list(range(m // 2)), list(range(m // 2, m)))
    rows = {c: v[cf.rows] for c, v in values.items()}
    plain = plain or fit(values, target, kind, supervision, concepts)
    with_cf, without = [], []
    for a, b in ((0, 1), (1, 0)):
        model = fit(values, target, kind, supervision, concepts, counterfactual=cf.take(halves[a]))
        held = cf.take(halves[b])
        with_cf.append(lds_per_query(scored_rows(model, rows, share), held.masks, held.losses))
        without.append(lds_per_query(scored_rows(plain, rows, share), held.masks, held.losses))
    w, wo = np.concatenate(with_cf), np.concatenate(without)
    diff = (w - wo)[np.isfinite(w) & np.isfinite(wo)]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    out.update(heldout_lds_with=round(float(np.nanmean(w)), 4), heldout_lds_without=round(float(np.nanmean(wo)), 4),
               heldout_gain_se=round(se, 4),
               heldout="2-fold over the retrained subsets, on the run's generations of the anchors' captions")
    return out


def fit_with_counterfactual(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
                            concepts: Sequence[str], cf: Counterfactual, plain: Optional[FusedModel] = None,
                            share: float = 1.0) -> FusedModel:
    """The model with the counterfactual term if it raises the held-out LDS (by more than
    COUNTERFACTUAL_ADOPT_MARGIN; both scored with the other images' ``share``), else the plain fit; either way
    ``model.counterfactual`` says what was measured and decided. The choice is made on retrained subsets only, never
    on a benchmark."""
    plain = plain or fit(values, target, kind, supervision, concepts)
    check = counterfactual_check(values, target, kind, supervision, concepts, cf, plain, share)
    gain = (None if check.get("heldout_lds_with") is None
            else float(check["heldout_lds_with"]) - float(check["heldout_lds_without"]))
    se = float(check.get("heldout_gain_se", float("inf")))
    if gain is not None and gain > max(COUNTERFACTUAL_ADOPT_MARGIN, 2.0 * se):
        model = fit(values, target, kind, supervision + f"; counterfactual: losses of the generations under "
                    f"{len(cf.masks)} retrained subsets", concepts, counterfactual=cf)
        check.update(adopted=True, why=f"held-out LDS +{gain:.3f} (standard error {se:.3f}) with the term")
    else:
        model = plain
        check.update(adopted=False, why=("held-out LDS not measured" if gain is None else
                                         f"held-out LDS {gain:+.3f} with the term (standard error {se:.3f}; "
                                         f"adopted above +{COUNTERFACTUAL_ADOPT_MARGIN} and 2 standard errors)"))
    model.counterfactual = check
    return model


def exact_caption_check(model: FusedModel, values: Dict[str, np.ndarray], target: np.ndarray, n_generated: int
                        ) -> Dict[str, object]:
    """Whether the exact-caption rule helps on the fit's own generated supervision (the last ``n_generated`` rows:
    the anchors' captions as prompts): R@1 of the anchor with and without it; adopted unless it lowers R@1."""
    if "text/encoder" not in values or n_generated < 1:
        return {"adopted": False, "why": "no text-encoder channel or no generated supervision"}
    rows = slice(len(target) - n_generated, len(target))
    raw = model.raw({c: v[rows] for c, v in values.items()})
    lifted, which = exact_caption_first(raw, values["text/encoder"][rows])
    before, after = recall_at_1(raw, target[rows]), recall_at_1(lifted, target[rows])
    return {"adopted": after >= before and any(which), "supervision_r1": [round(before, 4), round(after, 4)],
            "rows": n_generated}


def exact_caption_share(model: FusedModel, values: Dict[str, np.ndarray], cf: Counterfactual,
                        shares: Sequence[float] = EXACT_CAPTION_SHARES,
                        refit: Optional[Callable[[Sequence[int]], FusedModel]] = None) -> Dict[str, object]:
    """The share of the other images' scores on an exact-caption query, chosen on the counterfactual targets (whose
    rows are the run's generations of its anchors' captions: exact-caption queries by construction). Held out like
    the counterfactual term: the share is picked on one half of the retrained subsets and its LDS read on the other
    (both ways round), against share 1; a share below 1 is kept only if that held-out gain exceeds
    COUNTERFACTUAL_ADOPT_MARGIN and two standard errors. Then the share best on all subsets is used. ``refit(subsets)``
    gives the model fitted on those subsets only, when the model itself was fitted to the targets (the
    counterfactual term), so that the scored half stays unseen."""
    m = len(cf.masks)
    out: Dict[str, object] = {"others_share": 1.0, "shares_tried": [float(x) for x in shares]}
    if m < 4 or "text/encoder" not in values:
        out["share_why"] = ("needs 4+ retrained subsets (2 to pick, 2 to score)" if m < 4
                            else "no text-encoder channel")
        return out
    rows = {c: v[cf.rows] for c, v in values.items()}

    def shared(fitted: FusedModel) -> Dict[float, np.ndarray]:
        cal, lifted = lifted_scores(fitted, rows)
        return {x: share_others(cal, lifted, x) for x in shares}

    def per_query(scored: Dict[float, np.ndarray], x: float, take: Sequence[int]) -> np.ndarray:
        held = cf.take(take)
        return lds_per_query(scored[x], held.masks, held.losses)

    halves = (list(range(m // 2)), list(range(m // 2, m)))
    picked, kept, base = [], [], []
    for a, b in ((0, 1), (1, 0)):
        fold = shared(refit(halves[a]) if refit is not None else model)
        best = max(shares, key=lambda x: (np.nanmean(per_query(fold, x, halves[a])), x))
        picked.append(float(best))
        kept.append(per_query(fold, best, halves[b]))
        base.append(per_query(fold, 1.0, halves[b]))
    k, b0 = np.concatenate(kept), np.concatenate(base)
    diff = (k - b0)[np.isfinite(k) & np.isfinite(b0)]
    gain = float(diff.mean()) if len(diff) else 0.0
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    per = shared(model)
    lds_all = {x: float(np.nanmean(per_query(per, x, range(m)))) for x in shares}
    best_all = float(max(shares, key=lambda x: (lds_all[x], x)))
    adopt = best_all < 1.0 and gain > max(COUNTERFACTUAL_ADOPT_MARGIN, 2.0 * se)
    out.update(others_share=best_all if adopt else 1.0, heldout_picked=picked, heldout_lds_gain=round(gain, 4),
               heldout_gain_se=round(se, 4), lds_by_share={str(x): round(v, 4) for x, v in lds_all.items()},
               share_why=(f"share {best_all:g} of the other images: held-out LDS {gain:+.3f} (standard error "
                          f"{se:.3f}) over share 1, picked on the other half of the {m} retrained subsets" if adopt
                          else f"share 1 kept: held-out LDS {gain:+.3f} (standard error {se:.3f}) for the share "
                          f"picked on the other half; adopted above +{COUNTERFACTUAL_ADOPT_MARGIN} and 2 standard "
                          f"errors"))
    return out
