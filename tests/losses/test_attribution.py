import math

import torch

from montrage.losses.attribution import attribution_loss, listwise_ranking_loss, shifted_cosine


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
