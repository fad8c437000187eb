"""An SDXL-shaped UNet (pooled text embeddings + time_ids) works everywhere montrage calls the UNet,
because every call goes through DiffusionComponents.predict; bf16 autocast runs on the same path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from montrage.config import CaptureConfig, LoraSettings
from montrage.errors import ModelLoadError
from montrage.losses.diffusion import denoising_loss
from montrage.models.components import Conditioning, DiffusionComponents
from montrage.models.features import FeatureExtractor
from montrage.models.sampling import generate, uint8_to_pixels
from tests.models.tiny_sdxl import RESOLUTION, build_tiny_sdxl, write_tiny_sdxl

PROMPTS = ["a circle by artist-0", "a square", ""]


@pytest.fixture
def parts(tmp_path):
    return build_tiny_sdxl(tmp_path)


@pytest.fixture
def comps(parts):
    unet, text, tok, text_2, tok_2, sched = parts
    c = DiffusionComponents.from_diffusers(unet, text, tok, sched, text_encoder_2=text_2, tokenizer_2=tok_2)
    for m in (c.unet, c.prompt_encoder):
        m.requires_grad_(False)
        m.eval()
    return c


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)


def test_sdxl_conditioning_and_predict_match_the_diffusers_recipe(parts, comps):
    """Written out independently: penultimate states of both encoders, pooled = encoder 2's projection,
    time_ids = (H, W, 0, 0, H, W)."""
    unet, text, tok, text_2, tok_2, _ = parts
    assert comps.needs_pooled and comps.resolution == RESOLUTION
    cond = comps.encode_prompts(PROMPTS)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    ids2 = tok_2(PROMPTS, padding="max_length", max_length=tok_2.model_max_length, truncation=True,
                 return_tensors="pt")
    with torch.no_grad():
        o1 = text(ids.input_ids, output_hidden_states=True)
        o2 = text_2(ids2.input_ids, output_hidden_states=True)
    hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
    torch.testing.assert_close(cond.hidden, hidden)
    torch.testing.assert_close(cond.pooled, o2.text_embeds)
    assert cond.hidden.shape == (3, ids.input_ids.shape[1], 32) and cond.pooled.shape == (3, 16)

    x = torch.randn(3, 3, RESOLUTION, RESOLUTION)
    t = torch.tensor([10, 400, 900])
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 3)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=hidden,
                    added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids}).sample
        got = comps.predict(x, t, cond)
        other = comps.predict(x, t, Conditioning(cond.hidden, cond.pooled.flip(0)))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(other, got)  # the pooled embedding reaches the UNet
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        comps.predict(x, t, cond.hidden)  # hidden states alone are not enough for this UNet


def test_capture_and_probe_generation(comps):
    cap = CaptureConfig(modules=("mid_block",), timesteps=(100, 600), batch_size=4)
    feats = FeatureExtractor(comps, cap).extract(_images(3), PROMPTS, [0, 1, 2])
    assert feats.losses.shape == (3, 2, 2) and np.isfinite(feats.losses).all()
    assert feats.features["mid_block"].shape[:3] == (3, 2, 2) and np.isfinite(feats.features["mid_block"]).all()
    imgs = generate(comps, PROMPTS[:2], [5, 6], num_steps=2)
    assert imgs.shape == (2, RESOLUTION, RESOLUTION, 3) and imgs.dtype == np.uint8


def test_lora_training_step_and_per_sample_gradients(comps):
    from montrage.analysis.gradients import OUTPUTS, per_sample_grads, projected_gradients, projected_gradients_shared
    from montrage.models.lora import add_lora

    params = add_lora(comps.unet, LoraSettings(rank=2, target_modules=("to_q", "to_v")), seed=0)
    x0 = uint8_to_pixels(_images(2))
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])
    cond = comps.encode_prompts(PROMPTS[:2])
    comps.unet.train()
    loss = denoising_loss(comps.predict, comps.noise_scheduler, x0, noise, t, cond).mean()
    loss.backward()
    assert all(p.grad is not None for p in params) and any(float(p.grad.abs().sum()) > 0 for p in params)
    torch.optim.SGD(params, lr=1.0).step()
    comps.unet.eval()

    # vmap (functional_call inside predict), the batched hooks and the per-item loop give the same gradients
    items_fn, out_fn = OUTPUTS["denoise"]
    items = items_fn(comps, _images(2, 1), PROMPTS[:2], [3, 4], (100, 500), 7)
    assert isinstance(items["hidden"], Conditioning) and items["hidden"].pooled is not None
    a = per_sample_grads(comps.unet, items, out_fn, method="vmap", components=comps)
    b = per_sample_grads(comps.unet, items, out_fn, method="loop", components=comps)
    h = per_sample_grads(comps.unet, items, out_fn, method="hooks", components=comps)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6 + 1e-4 * float(b[n].abs().max()), rtol=1e-4)
        torch.testing.assert_close(h[n], b[n], atol=1e-6 + 1e-4 * float(b[n].abs().max()), rtol=1e-4)
    # the loop's first item against plain autograd on the loss written out
    one = {k: v[:1] for k, v in items.items()}
    named = dict(comps.unet.named_parameters())
    with torch.enable_grad():
        value = (comps.predict(one["x_t"], one["t"], one["hidden"]) - one["target"]).pow(2).mean()
        ref = torch.autograd.grad(value, [named[n] for n in a])
    for n, r in zip(a, ref):
        torch.testing.assert_close(a[n][0], r, atol=1e-6 + 1e-4 * float(r.abs().max()), rtol=1e-4)
    g = projected_gradients(comps, _images(2, 1), PROMPTS[:2], [3, 4], timesteps=(100, 500), proj_dim=8)
    assert g.shape == (2, 2, 8) and np.isfinite(g).all() and np.abs(g).max() > 0
    # both built-in outputs from one forward (SDXL's pooled states and time ids travel through jacrev too)
    both = projected_gradients_shared(comps, _images(2, 1), PROMPTS[:2], [3, 4], timesteps=(100, 500), proj_dim=8)[0]
    np.testing.assert_allclose(both["denoise"], g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    sq = projected_gradients(comps, _images(2, 1), PROMPTS[:2], [3, 4], output="sqnorm", timesteps=(100, 500), proj_dim=8)
    np.testing.assert_allclose(both["sqnorm"], sq, rtol=1e-4, atol=1e-5 * np.abs(sq).max())


def test_bf16_autocast_is_finite_float32_and_close_to_fp32(comps):
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    t = torch.tensor([50, 500])
    cond = comps.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        ref = comps.predict(x, t, cond)
        comps.autocast_dtype = torch.bfloat16
        got = comps.predict(x, t, cond)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # bf16 really ran (not bit-identical) and stays close
    cap = CaptureConfig(modules=("mid_block",), timesteps=(300,), conditions=("caption",), batch_size=4)
    feats = FeatureExtractor(comps, cap).extract(_images(2), PROMPTS[:2], [0, 1])
    assert np.isfinite(feats.losses).all()
    x0 = uint8_to_pixels(_images(2))
    loss = denoising_loss(comps.predict, comps.noise_scheduler, x0, torch.randn_like(x0), t, cond)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_sdxl_folder_loads_both_text_encoders(tmp_path, comps):
    from montrage.models.loading import load_base

    folder = write_tiny_sdxl(tmp_path / "sdxl")
    loaded = load_base(str(folder))
    assert loaded.prompt_encoder.text_encoder_2 is not None and loaded.needs_pooled
    assert not any(p.requires_grad for p in loaded.prompt_encoder.parameters())
    a, b = loaded.encode_prompts(PROMPTS), comps.encode_prompts(PROMPTS)
    torch.testing.assert_close(a.hidden, b.hidden)
    torch.testing.assert_close(a.pooled, b.pooled)
    x = torch.randn(3, 3, RESOLUTION, RESOLUTION)
    t = torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, t, a), comps.predict(x, t, b))


def test_concept_trak_gradients_with_inversion(comps):
    """Concept-TRAK's DDIM inversion, DPS residuals and concept utility all call the UNet through predict."""
    from montrage.analysis.concept_trak import concept_gradients
    from montrage.models.lora import add_lora

    add_lora(comps.unet, LoraSettings(rank=2, target_modules=("to_q", "to_v")), seed=0)
    gt, gq = concept_gradients(comps, _images(2), PROMPTS[:2], [1, 2], _images(1, 5), ["a ring by artist-0"], [3],
                               "by artist-0", timesteps=(200, 600), noise_seed=0, proj_dim=8, inversion=True,
                               inversion_steps=3)
    assert gt.shape == (2, 8) and gq.shape == (1, 8)
    assert np.isfinite(gt).all() and np.isfinite(gq).all() and np.abs(gt).max() > 0 and np.abs(gq).max() > 0


@pytest.mark.slow
def test_montrage_train_and_attribute_on_an_sdxl_folder(tmp_path):
    """End to end on an SDXL-shaped base folder: train + record, then a feature and a gradient method."""
    from dataclasses import replace

    from montrage.analysis.attribute import attribute
    from montrage.data.synthetic import write_concept_dataset
    from montrage.storage import RunStore
    from montrage.training import train
    from tests.conftest import tiny_configs

    folder = write_tiny_sdxl(tmp_path / "sdxl")
    data = write_concept_dataset(tmp_path / "data", n_artists=2, images_per_artist=2)
    cfg, cap = tiny_configs(steps=2, every=1)
    train(data, tmp_path / "run", base=str(folder), cfg=cfg, progress=False,
          capture=replace(cap, modules=("mid_block",), probe_steps=2, anchors=2))
    store = RunStore.open(tmp_path / "run")
    assert list(store.steps) == [0, 1, 2] and np.isfinite(store.features("train", "mid_block")).all()
    for method in ("montrage-unsupervised", "tracin"):
        res = attribute(tmp_path / "run", method, progress=False, write_store=False)
        assert np.isfinite(np.asarray(res.scores)).all()
