"""Concept-TRAK losses on hand-checked cases: a stub 'unet' that is a known linear map pred = a * x_t.

Numbers: alpha_bar = 0.64, so sqrt(ab) = 0.8 and sqrt(1 - ab) = 0.6; a = 0.5; x_t = [1, 2].
"""
import pytest
import torch

from montrage.errors import ConfigError
from montrage.losses.concept import (concept_guidance, concept_prompts, concept_target, concept_utility_loss,
                                     ddim_invert, dps_guidance, dps_target, dps_training_loss, eps_from_prediction,
                                     remove_concept, self_target_loss, x0_from_prediction)

AB = torch.tensor([0.64])
XT = torch.tensor([[1.0, 2.0]])


def stub(a):
    return lambda x: a * x


def test_conversions_by_hand():
    pred = torch.tensor([[0.5, 1.0]])
    # epsilon: x0 = (x_t - 0.6 eps) / 0.8
    torch.testing.assert_close(x0_from_prediction(pred, XT, AB, "epsilon"), torch.tensor([[0.875, 1.75]]))
    torch.testing.assert_close(eps_from_prediction(pred, XT, AB, "epsilon"), pred)
    # v: x0 = 0.8 x_t - 0.6 v ; eps = 0.8 v + 0.6 x_t
    torch.testing.assert_close(x0_from_prediction(pred, XT, AB, "v_prediction"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(eps_from_prediction(pred, XT, AB, "v_prediction"), torch.tensor([[1.0, 2.0]]))
    # sample: x0 = pred ; eps = (x_t - 0.8 x0) / 0.6
    torch.testing.assert_close(eps_from_prediction(pred, XT, AB, "sample"), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ConfigError):
        eps_from_prediction(pred, XT, AB, "flow")


def test_dps_target_epsilon_by_hand():
    # eps = 0.5 x_t; x0_hat = c x_t with c = (1 - 0.6 * 0.5) / 0.8 = 0.875
    # grad_x ||c x - x0||^2 = 2 c (c x - x0) = 1.75 * ([0.875, 1.75] - [0.5, 1]) = [0.65625, 1.3125]
    x0 = torch.tensor([[0.5, 1.0]])
    target = dps_target(stub(0.5), XT, x0, AB, "epsilon", lam=0.1)
    torch.testing.assert_close(target, torch.tensor([[0.5 + 0.065625, 1.0 + 0.13125]]))
    assert not target.requires_grad


def test_dps_target_v_prediction_by_hand():
    # v = 0.5 x_t: x0_hat = (0.8 - 0.3) x_t = 0.5 x_t; eps = (0.4 + 0.6) x_t = x_t
    # x0 = 0: grad = 2 * 0.5 * 0.5 x_t = 0.5 x_t = [0.5, 1]; target = x_t + 0.1 * [0.5, 1]
    target = dps_target(stub(0.5), XT, torch.zeros(1, 2), AB, "v_prediction", lam=0.1)
    torch.testing.assert_close(target, torch.tensor([[1.05, 2.1]]))
    # an exact reconstruction has zero reward gradient: the target is the model's own eps
    target = dps_target(stub(0.5), XT, torch.tensor([[0.5, 1.0]]), AB, "v_prediction", lam=3.0)
    torch.testing.assert_close(target, XT)


def test_dps_target_per_sample_lambda_and_independence():
    x_t = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    x0 = torch.tensor([[0.5, 1.0], [0.5, 1.0]])
    ab = torch.tensor([0.64, 0.64])
    target = dps_target(stub(0.5), x_t, x0, ab, "epsilon", lam=torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(target[0], torch.tensor([0.565625, 1.13125]))
    torch.testing.assert_close(target[1], torch.tensor([0.5, 1.0]))  # lam 0: no guidance


def test_dps_training_loss_gradient_by_hand():
    # theta = a; eps_theta = a x_t; loss = mean((a x_t - target)^2); at a = 0.5, a x_t - target = -0.1 g
    # d loss / d a = mean(2 * (-0.1 g) * x_t) = -0.1 * (0.65625 * 1 + 1.3125 * 2) = -0.328125
    x0 = torch.tensor([[0.5, 1.0]])
    target = dps_target(stub(0.5), XT, x0, AB, "epsilon", lam=0.1)
    a = torch.tensor(0.5, requires_grad=True)
    loss = dps_training_loss(a * XT, XT, target, AB, "epsilon")
    assert loss.shape == (1,)
    torch.testing.assert_close(loss, torch.tensor([(0.065625 ** 2 + 0.13125 ** 2) / 2]))
    (g,) = torch.autograd.grad(loss.sum(), a)
    torch.testing.assert_close(g, torch.tensor(-0.328125))


def test_dps_training_loss_v_prediction_converts_to_eps():
    # v = a x_t -> eps = (0.8 a + 0.6) x_t; target = [1.05, 2.1] (above); at a = 0.5 eps = x_t
    # d loss / d a = mean(2 (eps - target) * 0.8 x_t) = (2 * -0.05 * 0.8 * 1 + 2 * -0.1 * 0.8 * 2) / 2 = -0.2
    target = dps_target(stub(0.5), XT, torch.zeros(1, 2), AB, "v_prediction", lam=0.1)
    a = torch.tensor(0.5, requires_grad=True)
    loss = dps_training_loss(a * XT, XT, target, AB, "v_prediction")
    (g,) = torch.autograd.grad(loss.sum(), a)
    torch.testing.assert_close(g, torch.tensor(-0.2))


def test_concept_target_and_utility_gradient_by_hand():
    eps_c, eps_m = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.5]])
    target = concept_target(eps_c, eps_m, lam=2.0)
    torch.testing.assert_close(target, torch.tensor([[2.0, 1.0]]))  # eps_c + 2 (eps_c - eps_m)
    # model eps = a x_t with a = 1 (= eps_c at x_t): loss = mean((a x_t - [2, 1])^2) = (1 + 1) / 2
    # d/da = mean(2 (a x_t - t) x_t) = (2 * -1 * 1 + 2 * 1 * 2) / 2 = 1
    a = torch.tensor(1.0, requires_grad=True)
    loss = concept_utility_loss(a * XT, XT, target, AB, "epsilon")
    torch.testing.assert_close(loss, torch.tensor([1.0]))
    (g,) = torch.autograd.grad(loss.sum(), a)
    torch.testing.assert_close(g, torch.tensor(1.0))
    # no concept difference: the target is the model's eps, zero loss and zero gradient
    same = concept_target(eps_c, eps_c, lam=5.0)
    torch.testing.assert_close(same, eps_c)


def test_guidance_residuals_by_hand():
    eps, residual = dps_guidance(stub(0.5), XT, torch.tensor([[0.5, 1.0]]), AB, "epsilon", lam=0.1)
    torch.testing.assert_close(eps, torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(residual, torch.tensor([[0.065625, 0.13125]]))
    torch.testing.assert_close(concept_guidance(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.5]]), 2.0),
                               torch.tensor([[1.0, -1.0]]))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_self_target_loss_equals_the_target_losses(kind):
    """Value and gradient of mean((eps - sg[eps] - r)^2) equal those of the loss to sg[eps + r] at theta."""
    x0 = torch.tensor([[0.3, -0.2]])
    target = dps_target(stub(0.5), XT, x0, AB, kind, lam=0.1)
    _, residual = dps_guidance(stub(0.5), XT, x0, AB, kind, lam=0.1)
    a = torch.tensor(0.5, requires_grad=True)
    ref = dps_training_loss(a * XT, XT, target, AB, kind)
    (g_ref,) = torch.autograd.grad(ref.sum(), a)
    a2 = torch.tensor(0.5, requires_grad=True)
    got = self_target_loss(a2 * XT, XT, residual, AB, kind)
    (g_got,) = torch.autograd.grad(got.sum(), a2)
    torch.testing.assert_close(got.detach(), ref.detach())
    torch.testing.assert_close(g_got, g_ref)
    # a zero residual gives exactly zero gradient (no rounding noise from two model evaluations)
    a3 = torch.tensor(0.5, requires_grad=True)
    (g0,) = torch.autograd.grad(self_target_loss(a3 * XT, XT, torch.zeros(1, 2), AB, kind).sum(), a3)
    assert float(g0) == 0.0


def test_ddim_inversion_by_hand():
    ac = torch.linspace(0.99, 0.1, 1000)
    x0 = torch.tensor([[1.0, -2.0]])
    # a model that predicts zero noise: x0_hat = x_t / sqrt(ab_cur), so x_t = sqrt(ab_t / ab_0) x0
    out = ddim_invert(lambda x, t: torch.zeros_like(x), x0, ac, [200, 600], "epsilon", steps=4)
    assert sorted(out) == [200, 600]
    for t in (200, 600):
        torch.testing.assert_close(out[t], (ac[t] / ac[0]).sqrt() * x0)
    # the ideal denoiser of the single point x0 keeps x0_hat = x0 and eps fixed, so each step is exact:
    # x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps0 with eps0 = (x0 - sqrt(ab_0) x0) / sqrt(1 - ab_0)
    ideal = lambda x, t: (x - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
    out = ddim_invert(ideal, x0, ac, [300], "epsilon", steps=3)
    eps0 = (x0 - ac[0].sqrt() * x0) / (1 - ac[0]).sqrt()
    torch.testing.assert_close(out[300], ac[300].sqrt() * x0 + (1 - ac[300]).sqrt() * eps0)


def test_remove_concept_and_prompt_pairs():
    assert remove_concept("a red circle by artist-3", "by artist-3") == "a red circle"
    assert remove_concept("By  Artist-3, a circle", "by artist-3") == "a circle"
    assert remove_concept("a circle by artist-3 at the left", " by   artist-3 ") == "a circle at the left"
    assert remove_concept("a circle by artist-30", "by artist-3") == "a circle by artist-30"  # whole words only
    assert concept_prompts("a circle by artist-3", "by artist-3") == ("a circle by artist-3", "a circle")
    assert concept_prompts("a circle", "by artist-3") == ("a circle by artist-3", "a circle")
    assert concept_prompts("", "by artist-3") == ("by artist-3", "")
    with pytest.raises(ConfigError):
        remove_concept("a circle", "   ")
