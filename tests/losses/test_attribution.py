import math

import numpy as np
import torch

from montrage.losses.attribution import attribution_loss, counterfactual_loss, listwise_ranking_loss, shifted_cosine


def test_shifted_cosine_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    got = shifted_cosine(a, b)
    want = torch.tensor([[1.0, 0.0, (1 + 1 / math.sqrt(2)) / 2], [0.5, 0.5, (1 + 1 / math.sqrt(2)) / 2]])
    torch.testing.assert_close(got, want)


def test_attribution_loss_hand_case():
    raw = torch.tensor([[0.5, 0.5]])
    cal = torch.tensor([[0.5, 0.5]])
    target = torch.tensor([[1.0, 0.0]])
    # mse = 0.25; ranking: target softmax is ~[1, 0], prediction softmax is [0.5, 0.5] -> CE = ln 2
    torch.testing.assert_close(attribution_loss(raw, cal, target), torch.tensor(0.25 + math.log(2)), atol=1e-6, rtol=0)


def test_ranking_loss_prefers_correct_order():
    target = torch.tensor([[1.0, 0.5, 0.0]])
    good = torch.tensor([[0.9, 0.6, 0.1]])
    bad = torch.tensor([[0.1, 0.6, 0.9]])
    assert listwise_ranking_loss(good, target) < listwise_ranking_loss(bad, target)


def test_loss_zero_mse_term_when_calibrated_matches():
    t = torch.tensor([[0.2, 0.8]])
    only_rank = listwise_ranking_loss(t, t)
    torch.testing.assert_close(attribution_loss(t, t, t), only_rank)


def test_concept_ranking_loss_prefers_the_own_concept_and_skips_unlabelled():
    from montrage.losses.attribution import concept_ranking_loss, concept_scores_soft

    members = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    raw = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]])
    np.testing.assert_allclose(concept_scores_soft(raw, members, top=1).numpy(), [[3.0, 0.0], [0.0, 3.0]])
    good = concept_ranking_loss(raw, members, torch.tensor([0, 1]))
    bad = concept_ranking_loss(raw, members, torch.tensor([1, 0]))
    assert good < bad
    assert float(concept_ranking_loss(raw, members, torch.tensor([-1, -1]))) == 0.0
    raw.requires_grad_(True)
    concept_ranking_loss(raw, members, torch.tensor([0, -1])).backward()
    assert raw.grad[0, :2].sum() < 0 < raw.grad[0, 2:].sum() and (raw.grad[1] == 0).all()


def test_losses_of_stacked_problems_are_each_problems_own():
    """(B, Q, N) inputs give the B losses of the (Q, N) problems, rows without a concept skipped per problem."""
    from montrage.losses.attribution import concept_ranking_loss

    g = torch.Generator().manual_seed(0)
    raw, target = torch.randn(3, 5, 6, generator=g), torch.rand(3, 5, 6, generator=g)
    cal = torch.sigmoid(raw)
    members = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    own = torch.tensor([[0, 1, -1, 0, 1], [-1, -1, -1, -1, -1], [1, 1, 0, 0, 1]])
    together = attribution_loss(raw, cal, target), concept_ranking_loss(raw, members, own)
    assert together[0].shape == together[1].shape == (3,)
    for b in range(3):
        torch.testing.assert_close(together[0][b], attribution_loss(raw[b], cal[b], target[b]))
        torch.testing.assert_close(together[1][b], concept_ranking_loss(raw[b], members, own[b]))
    assert float(together[1][1]) == 0.0
    ok = own[0] >= 0
    alone = concept_ranking_loss(raw[0][ok], members, own[0][ok])  # the rows with a concept, alone
    torch.testing.assert_close(together[1][0], alone)


def test_counterfactual_loss_is_one_minus_the_correlation_of_predicted_effect_and_loss():
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([[0.9, 0.1, 0.5]])
    effect = -(masks @ scores.T)  # (M, 1): what the scores predict
    assert math.isclose(float(counterfactual_loss(scores, masks, effect)), 0.0, abs_tol=1e-6)
    assert math.isclose(float(counterfactual_loss(scores, masks, -effect)), 2.0, abs_tol=1e-6)
    s = scores.clone().requires_grad_(True)
    counterfactual_loss(s, masks, -effect).backward()  # differentiable: the fit can follow it
    assert s.grad is not None and torch.isfinite(s.grad).all()
