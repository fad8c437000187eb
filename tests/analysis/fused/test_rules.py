"""Rules the fit adopts on its own evidence: the counterfactual term, exact caption first and the other images'
share, each checked against planted ground truth."""
import numpy as np
import pytest

from montrage.analysis.fused import fit as FF
from montrage.analysis.fused import kinds as FK
from montrage.analysis.fused import rules as FR


def planted_influence(seed, m, n=40, q=30):
    """Two channels that both find every query's source (the anchor supervision cannot tell them apart); only
    ``grad/dtrak`` also says how much the OTHER images matter (a hidden influence), and the losses of models
    retrained on ``m`` random halves follow that influence. Returns (rng, values, targets, masks, losses)."""
    rng = np.random.default_rng(seed)
    targets = np.arange(q)
    influence = rng.gamma(1.0, size=(q, n))  # how much image i lowers query j's loss (hidden)
    influence[targets, targets] = 0.0
    right = np.log1p(influence) + rng.normal(0, 0.05, (q, n))
    wrong = rng.normal(0, 1.0, (q, n))
    for v in (right, wrong):
        v[targets, targets] = 8.0
    values = {"grad/dtrak": right.astype(np.float32), "rep/null/move": wrong.astype(np.float32)}
    y = np.zeros((q, n), np.float32)
    y[targets, targets] = 1.0
    masks = (rng.random((m, n)) < 0.5).astype(np.float64)
    losses = 5.0 - masks @ influence.T + rng.normal(0, 0.1, (m, q))
    return rng, values, y, masks, losses


def test_counterfactual_term_moves_weight_to_the_channel_that_predicts_retrained_losses():
    """With the counterfactual term the fit moves weight to the channel the retrained losses follow, and the LDS of
    held-out subsets rises."""
    _, values, y, masks, losses = planted_influence(0, 12)
    cf = FF.Counterfactual(np.arange(len(y)), masks[:8], losses[:8])
    plain = FF.fit(values, y, FK.PROMPT, "planted", steps=300)
    with_cf = FF.fit(values, y, FK.PROMPT, "planted", steps=300, counterfactual=cf)
    share = lambda mod: mod.used()["grad/dtrak"] / sum(mod.used().values())  # noqa: E731
    assert share(with_cf) > share(plain) + 0.1, (plain.used(), with_cf.used())
    held_plain = FR.lds(plain.calibrate(plain.raw(values)), masks[8:], losses[8:])
    held_cf = FR.lds(with_cf.calibrate(with_cf.raw(values)), masks[8:], losses[8:])
    assert held_cf > held_plain + 0.1, (held_plain, held_cf)


def test_counterfactual_term_is_adopted_only_when_held_out_subsets_confirm_it():
    """Retrained losses that follow a channel: the term raises the held-out LDS and is adopted. Losses that are
    noise: no held-out gain, the plain fit is kept (the same weights as without targets)."""
    rng, values, y, masks, losses = planted_influence(1, 16)
    rows = np.arange(len(y))
    real = FF.Counterfactual(rows, masks, losses)
    noise = FF.Counterfactual(rows, masks, rng.normal(size=losses.shape))
    adopted = FR.fit_with_counterfactual(values, y, FK.PROMPT, "planted", [], real)
    assert adopted.counterfactual["adopted"] and "counterfactual" in adopted.supervision
    kept = FR.fit_with_counterfactual(values, y, FK.PROMPT, "planted", [], noise)
    assert not kept.counterfactual["adopted"] and "held-out LDS" in kept.counterfactual["why"]
    np.testing.assert_allclose(kept.weights, FF.fit(values, y, FK.PROMPT, "planted", []).weights)


def test_lds_is_the_spearman_of_predicted_effect_and_loss():
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], float)
    scores = np.array([[3.0, 2.0, 1.0]])
    losses = -(masks @ scores.T)  # a perfect prediction: more attributed images in -> lower loss
    assert FR.lds(scores, masks, losses) == pytest.approx(1.0)
    assert FR.lds(scores, masks, -losses) == pytest.approx(-1.0)


def test_exact_caption_first_lifts_only_the_images_trained_under_the_prompt():
    """Query 0's prompt is image 2's caption but a sibling (image 1) scores higher: image 2 goes first, just above
    the rest, whose order is kept; query 1 matches no caption and query 2 matches every caption: unchanged."""
    raw = np.array([[0.1, 3.0, 2.0, -1.0, 0.5],
                    [0.1, 3.0, 2.0, -1.0, 0.5],
                    [0.1, 3.0, 2.0, -1.0, 0.5]], np.float32)
    text = np.array([[0.90, 0.95, 1.0, 0.20, 0.30],
                     [0.90, 0.95, 0.99, 0.20, 0.30],
                     [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    out, lifted = FR.exact_caption_first(raw, text)
    assert lifted == [[2], [], []]
    assert out[0].argmax() == 2 and out[0, 2] - 3.0 < 0.5
    others = [0, 1, 3, 4]
    np.testing.assert_array_equal(out[0, others], raw[0, others])
    np.testing.assert_array_equal(out[1:], raw[1:])
    # an exact match that already leads keeps its score
    out2, _ = FR.exact_caption_first(np.array([[5.0, 1.0, 0.0]], np.float32), np.array([[1.0, 0.5, 0.1]], np.float32))
    np.testing.assert_array_equal(out2, [[5.0, 1.0, 0.0]])


def test_exact_caption_rule_is_adopted_only_when_the_supervision_confirms_it():
    """On the fit's generated supervision (anchor j's caption as prompt, target j): adopted when the caption names
    the source (R@1 rises), refused when the matching caption belongs to another image (R@1 would fall)."""
    n = 12
    targets = np.arange(n)
    y = np.zeros((n, n), np.float32)
    y[targets, targets] = 1.0
    rng = np.random.default_rng(0)
    rep = rng.normal(size=(n, n)).astype(np.float32)
    rep[targets, targets] += 2.0
    rep[targets, (targets + 1) % n] += 2.5  # a sibling outscores the source on half the rows
    rep[targets[::2], targets[::2]] += 1.0
    model = FF.FusedModel(FK.PROMPT, ["rep/null/move"], np.array([1.0]))
    right = np.full((n, n), 0.5, np.float32)
    right[targets, targets] = 1.0
    check = FR.exact_caption_check(model, {"rep/null/move": rep, "text/encoder": right}, y, n_generated=n)
    assert check["adopted"] and check["supervision_r1"][1] == 1.0 > check["supervision_r1"][0]
    wrong = np.full((n, n), 0.5, np.float32)
    wrong[targets, (targets + 3) % n] = 1.0
    check = FR.exact_caption_check(model, {"rep/null/move": rep, "text/encoder": wrong}, y, n_generated=n)
    assert not check["adopted"] and check["supervision_r1"][1] < check["supervision_r1"][0]
    assert not FR.exact_caption_check(model, {"rep/null/move": rep}, y, n_generated=n)["adopted"]
    restored = FF.FusedModel.from_json(model.to_json())
    assert restored.exact_caption == model.exact_caption


def _exact_caption_rows(n: int = 16, seed: int = 0):
    """A model and supervision rows where row j is a generation of image j's caption (text cosine 1 on j only)."""
    rng = np.random.default_rng(seed)
    rep = rng.normal(size=(n, n)).astype(np.float32)
    rep[np.arange(n), np.arange(n)] += 3.0
    text = np.full((n, n), 0.5, np.float32)
    text[np.arange(n), np.arange(n)] = 1.0
    model = FF.FusedModel(FK.PROMPT, ["rep/null/move"], np.array([1.0]), exact_caption={"adopted": True})
    return model, {"rep/null/move": rep, "text/encoder": text}, rng


def test_exact_caption_share_follows_what_the_retrained_subsets_show():
    """Counterfactual targets where a generation's loss depends only on whether its own image was kept choose a
    share below 1 for the other images, held out; targets that follow the model's graded scores keep share 1."""
    n, m = 16, 12
    model, values, rng = _exact_caption_rows(n)
    masks = np.zeros((m, n), np.float32)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = 1.0
    rows = np.arange(n)
    own_only = -masks + 0.01 * rng.normal(size=(m, n))  # (M, R): kept exemplar -> lower loss, nothing else matters
    check = FR.exact_caption_share(model, values, FF.Counterfactual(rows, masks, own_only))
    assert check["others_share"] < 1.0 and check["heldout_lds_gain"] > FR.COUNTERFACTUAL_ADOPT_MARGIN
    assert check["lds_by_share"]["0.0"] > check["lds_by_share"]["1.0"]
    graded = -(masks @ model.calibrate(model.raw(values)).T)  # the model's own scores, others included, are right
    check = FR.exact_caption_share(model, values, FF.Counterfactual(rows, masks, graded))
    assert check["others_share"] == 1.0 and "share 1 kept" in check["share_why"]
    # a model fitted to the targets is refitted per fold, on the half it picks the share on, never the scored half
    folds = []
    check = FR.exact_caption_share(model, values, FF.Counterfactual(rows, masks, own_only),
                                  refit=lambda take: folds.append(list(take)) or model)
    assert folds == [list(range(m // 2)), list(range(m // 2, m))] and check["others_share"] < 1.0
    # too few subsets to hold any out: nothing chosen
    assert FR.exact_caption_share(model, values, FF.Counterfactual(rows, masks[:3], own_only[:3]))["others_share"] == 1.0


def test_the_other_images_share_applies_only_to_rows_that_lifted_an_exact_caption():
    scores = np.array([[0.9, 0.5, 0.2], [0.9, 0.5, 0.2]], np.float32)
    out = FR.share_others(scores, [[1], []], 0.1)
    np.testing.assert_allclose(out, [[0.09, 0.5, 0.02], [0.9, 0.5, 0.2]], rtol=1e-6)
    model = FF.FusedModel(FK.PROMPT, ["a"], np.array([1.0]), exact_caption={"adopted": True, "others_share": 0.2})
    assert FF.FusedModel.from_json(model.to_json()).others_share == 0.2
    model.exact_caption["adopted"] = False  # the share belongs to the exact-caption rule
    assert model.others_share == 1.0


def test_the_counterfactual_term_is_credited_only_beyond_the_other_images_share():
    """When a generation's loss follows its own image alone, the share (0) already gives what the retrains show:
    scored with it, a model refitted to the targets gains nothing held out, so it is not adopted and no weight
    moves (the weights are what the other query kinds rank by)."""
    n, m = 16, 12
    model, values, rng = _exact_caption_rows(n)
    masks = np.zeros((m, n), np.float32)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = 1.0
    y = np.eye(n, dtype=np.float32)
    cf = FF.Counterfactual(np.arange(n), masks, -masks + 0.01 * rng.normal(size=(m, n)))
    plain = FF.fit(values, y, FK.PROMPT, "planted", [])
    kept = FR.fit_with_counterfactual(values, y, FK.PROMPT, "planted", [], cf, plain, share=0.0)
    check = kept.counterfactual
    assert kept is plain and not check["adopted"]
    assert check["heldout_lds_with"] == pytest.approx(check["heldout_lds_without"])
