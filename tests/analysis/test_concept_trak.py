"""Concept-TRAK scorer on a tiny model: gradients against independent autograd references, options, errors."""
import numpy as np
import pytest
import torch

from montrage.analysis.base import _REGISTRY
from montrage.analysis.concept_trak import (ConceptTrakScorer, query_concept_gradients, query_items,
                                            train_concept_gradients, training_items)
from montrage.analysis.gradients import Projector, item_noise, lora_parameters, normalize_rows, trak_scores
from montrage.errors import ScorerError
from montrage.models.sampling import uint8_to_pixels
from tests.analysis.test_gradients import (TIMESTEPS, make_context, planted_queries, random_images,
                                           tiny_components)

CAPTIONS = ["a circle by artist-0", "a square by artist-0", "a ring by artist-0",
            "a circle by artist-1", "a square by artist-1", "a ring by artist-1"]


@pytest.fixture(scope="module")
def comps():
    return tiny_components(seed=5)


def _lora_grad(comps, scalar_fn):
    """Flattened (sorted-name) gradient of scalar_fn() w.r.t. the LoRA parameters, by plain autograd."""
    named = dict(comps.unet.named_parameters())
    names = list(lora_parameters(comps.unet))
    params = [named[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    try:
        grads = torch.autograd.grad(scalar_fn(), params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return {n: g[None] for n, g in zip(names, grads)}


def _sqrt_ab(comps, t):
    ab = comps.noise_scheduler.alphas_cumprod[t].float()
    return ab.sqrt(), (1 - ab).sqrt()


def test_training_gradient_is_minus_jacobian_times_reward_gradient(comps):
    """grad_theta of the DPS loss = -(2 lam / d) J^T grad_x ||x0_hat - x0||^2: same direction per timestep."""
    unet = comps.unet
    assert comps.prediction_type == "v_prediction"
    images = random_images(2, 0)
    proj = Projector.for_unet(unet, 512, seed=0)
    got = normalize_rows(train_concept_gradients(comps, images, CAPTIONS[:2], [3, 4], TIMESTEPS, 9, proj))
    for i in range(2):
        x0 = uint8_to_pixels(images[i:i + 1])
        hidden = comps.encode_prompts([CAPTIONS[i]]).hidden
        for k, tv in enumerate(TIMESTEPS):
            t = torch.tensor([tv])
            noise = item_noise([3 + i], len(TIMESTEPS), x0.shape[1:], 9)[:, k]
            x_t = comps.noise_scheduler.add_noise(x0, noise, t)
            sa, s1 = _sqrt_ab(comps, tv)
            x = x_t.clone().requires_grad_(True)
            x0_hat = sa * x - s1 * unet(x, t, encoder_hidden_states=hidden).sample  # v-prediction
            (g,) = torch.autograd.grad((x0_hat - x0).pow(2).sum(), x)
            # eps = sa v + s1 x_t, so d eps / d theta = sa dv / d theta
            ref = _lora_grad(comps, lambda: -(sa * unet(x_t, t, encoder_hidden_states=hidden).sample * g).sum())
            want = normalize_rows(proj.project(ref).numpy())[0]
            np.testing.assert_allclose(got[i, k], want, atol=2e-3)


def test_utility_gradient_is_minus_jacobian_times_concept_direction(comps):
    """grad_theta of the utility loss = -(2 lam_c / d) J^T (eps(c) - eps(c-)): same direction per timestep."""
    unet = comps.unet
    images = random_images(2, 1)
    prompts = ["a ring by artist-1 at the left", ""]  # '' -> c = the concept phrase alone, c- = null prompt
    expected_pairs = [("a ring by artist-1 at the left", "a ring at the left"), ("by artist-1", "")]
    proj = Projector.for_unet(unet, 512, seed=0)
    got = normalize_rows(query_concept_gradients(comps, images, prompts, [7, 8], "by artist-1", TIMESTEPS, 9, proj,
                                                 guidance=3.0))
    for i, (c, c_minus) in enumerate(expected_pairs):
        x0 = uint8_to_pixels(images[i:i + 1])
        h_c, h_m = comps.encode_prompts([c]).hidden, comps.encode_prompts([c_minus]).hidden
        for k, tv in enumerate(TIMESTEPS):
            t = torch.tensor([tv])
            noise = item_noise([7 + i], len(TIMESTEPS), x0.shape[1:], 9)[:, k]
            x_t = comps.noise_scheduler.add_noise(x0, noise, t)
            sa, s1 = _sqrt_ab(comps, tv)
            with torch.no_grad():
                delta = sa * (unet(x_t, t, encoder_hidden_states=h_c).sample
                              - unet(x_t, t, encoder_hidden_states=h_m).sample)  # eps(c) - eps(c-)
            assert float(delta.abs().max()) > 0
            ref = _lora_grad(comps, lambda: -(sa * unet(x_t, t, encoder_hidden_states=h_c).sample * delta).sum())
            want = normalize_rows(proj.project(ref).numpy())[0]
            np.testing.assert_allclose(got[i, k], want, atol=2e-3)


def test_items_targets_and_inversion(comps):
    images = random_images(2, 2)
    plain = training_items(comps, images, CAPTIONS[:2], [0, 1], TIMESTEPS, 9)
    inv = training_items(comps, images, CAPTIONS[:2], [0, 1], TIMESTEPS, 9, inversion=True, inversion_steps=6)
    assert plain["x_t"].shape == inv["x_t"].shape == (6, 3, 8, 8)
    assert plain["residual"].shape == (6, 3, 8, 8) and torch.isfinite(inv["residual"]).all()
    assert plain["t"].tolist() == inv["t"].tolist() == list(TIMESTEPS) * 2
    assert not torch.allclose(plain["x_t"], inv["x_t"])  # inversion is deterministic, not the sampled noise
    again = training_items(comps, images, CAPTIONS[:2], [5, 6], TIMESTEPS, 9, inversion=True, inversion_steps=6)
    torch.testing.assert_close(again["x_t"], inv["x_t"])  # ... so independent of the item seeds
    q = query_items(comps, images, ["a circle by artist-0", "a square"], [0, 1], TIMESTEPS, 9, "by artist-0")
    assert q["residual"].shape == (6, 3, 8, 8) and torch.isfinite(q["residual"]).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tmp_path_factory.mktemp("ct"), tiny_components(seed=6), random_images(6, 20)


def test_scorer_end_to_end(run):
    tmp, comps, images = run
    q = planted_queries(images, CAPTIONS, [1, 4])
    ctx = make_context(tmp / "a", comps, images, CAPTIONS, q, options={"concept": "by artist-1", "proj_dim": 128})
    scores = ConceptTrakScorer().score(ctx)
    assert scores.shape == (2, 6) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert np.abs(scores).max() > 0
    again = ConceptTrakScorer().score(ctx)
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-7)  # deterministic
    # the scores are the TRAK kernel over the (normalised, timestep-combined) gradients
    ctx.options["trak_lambda"] = 10.0
    damped = ConceptTrakScorer().score(ctx)
    assert not np.allclose(damped, scores)
    # lambda_c / lambda_t only scale each per-timestep gradient: no effect after normalisation
    ctx.options.update(trak_lambda=0.1, guidance=4.0, dps_scale=0.5)
    np.testing.assert_allclose(ConceptTrakScorer().score(ctx), scores, rtol=2e-3, atol=1e-4 * np.abs(scores).max())
    ctx.options.update(guidance=1.0, dps_scale=1.0, inversion=True, inversion_steps=4)
    inv = ConceptTrakScorer().score(ctx)
    assert np.isfinite(inv).all() and not np.allclose(inv, scores)


def test_query_without_concept_direction_scores_zero(run):
    """If c and c- encode identically (the phrase falls beyond the text encoder's 12 tokens), eps(c) = eps(c-):
    the utility gradient, hence every score, is zero."""
    tmp, comps, images = run
    long = "a b c d e f g h i j k l"  # 12 words: the appended concept is truncated away
    q = planted_queries(images, [long] * 6, [0])
    ctx = make_context(tmp / "z", comps, images, CAPTIONS, q, options={"concept": "by artist-1", "proj_dim": 64})
    assert np.all(ConceptTrakScorer().score(ctx) == 0)


def test_missing_concept_is_a_scorer_error(run):
    tmp, comps, images = run
    ctx = make_context(tmp / "m", comps, images, CAPTIONS, planted_queries(images, CAPTIONS, [0]), n_ckpt=2)
    for opts in ({}, {"concept": "  "}, {"concept": None}):
        ctx.options = dict(opts)
        with pytest.raises(ScorerError, match="--concept"):
            ConceptTrakScorer().score(ctx)
    ctx.options = {"concept": "by artist-0", "inversion_steps": 0}
    with pytest.raises(ScorerError):
        ConceptTrakScorer().score(ctx)


def test_registered():
    import montrage.analysis.concept_trak  # noqa: F401  (registers on import)

    assert _REGISTRY["concept-trak"]().name == "concept-trak"


def test_trak_kernel_on_combined_gradients_prefers_the_aligned_training_image():
    """Planted at the kernel level: a concept gradient aligned with training image 2's gradient picks it."""
    rng = np.random.default_rng(0)
    G = normalize_rows(rng.normal(size=(6, 3, 32))).sum(1)
    g = G[2:3] + 0.1 * rng.normal(size=(1, 32))
    assert trak_scores(G, g, 0.1).argmax() == 2
