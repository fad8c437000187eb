"""Loading a local Stable-Diffusion-style diffusers folder (latent space via a VAE), offline.

Uses a tiny random-weight pipeline written by ``tests/models/tiny_pipeline.py``; nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from montrage.errors import ModelLoadError
from montrage.models.loading import REQUIRED_COMPONENTS, load_base, load_diffusers_folder
from tests.models.tiny_pipeline import MODULE_TO_CAPTURE, RESOLUTION, TEXT_MAX_LENGTH, _vocab_and_merges, write_tiny_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


def _copy_without(src: Path, dst: Path, *skip: str) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
    return dst


def test_load_base_folder_is_latent_space(sd_folder):
    comps = load_base(str(sd_folder))
    assert comps.vae is not None and comps.base == str(sd_folder)
    assert comps.resolution == RESOLUTION  # unet sample_size 8 x VAE factor 2
    assert comps.latent_shape == (4, 8, 8)
    assert comps.prediction_type == "epsilon"
    assert comps.prompt_encoder.hf_tokenizer
    for module in (comps.unet, comps.prompt_encoder, comps.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())

    hidden = comps.encode_prompts(["a circle by artist-0", ""])
    assert hidden.shape == (2, TEXT_MAX_LENGTH, 16)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = comps.to_latents(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert comps.to_pixels(latents).shape == (2, 3, RESOLUTION, RESOLUTION)
    pred = comps.predict(latents, torch.tensor([10, 500]), hidden)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()


def test_tokenizer_files_match_in_memory_tokenizer(sd_folder):
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    in_memory = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    loaded = load_base(str(sd_folder)).prompt_encoder.tokenizer
    assert loaded.model_max_length == TEXT_MAX_LENGTH
    text = "a circle by artist-0"
    assert loaded(text).input_ids == in_memory(text).input_ids
    assert "artis" in loaded.convert_ids_to_tokens(loaded(text).input_ids)  # merges were applied


def test_tokenizer_without_config_is_capped_at_text_positions(sd_folder, tmp_path):
    """vocab.json + merges.txt alone: model_max_length would be 'unlimited'; the loader caps it at 16."""
    folder = _copy_without(sd_folder, tmp_path / "sd")
    (folder / "tokenizer" / "tokenizer_config.json").unlink()
    comps = load_diffusers_folder(folder)
    assert comps.prompt_encoder.tokenizer.model_max_length == TEXT_MAX_LENGTH
    assert comps.encode_prompts(["a square"]).shape == (1, TEXT_MAX_LENGTH, 16)


def test_without_vae_is_pixel_space_shapes(sd_folder, tmp_path):
    comps = load_base(str(_copy_without(sd_folder, tmp_path / "sd", "vae")))
    assert comps.vae is None
    assert comps.resolution == 8 and comps.latent_shape == (4, 8, 8)


@pytest.mark.parametrize("component", REQUIRED_COMPONENTS)
def test_missing_component_is_named(sd_folder, tmp_path, component):
    folder = _copy_without(sd_folder, tmp_path / "sd", component)
    with pytest.raises(ModelLoadError, match=rf"missing component\(s\) \['{component}'\]"):
        load_base(str(folder))


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_base(str(tmp_path / "nope"))


def test_broken_component_raises_model_load_error(sd_folder, tmp_path):
    folder = _copy_without(sd_folder, tmp_path / "sd")
    (folder / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="cannot load base model folder"):
        load_base(str(folder))


def test_train_on_folder_base_records_store(sd_folder, tmp_path):
    from montrage.config import CaptureConfig, TrainConfig
    from montrage.data.synthetic import write_concept_dataset
    from montrage.storage import RunStore
    from montrage.storage import schema as S
    from montrage.training import train

    data = write_concept_dataset(tmp_path / "data", n_artists=2, images_per_artist=2)
    run = tmp_path / "run"
    cfg = TrainConfig(steps=2, batch_size=2, prior_fraction=0.0, resolution=RESOLUTION, warmup_steps=0)
    capture = CaptureConfig(every_n_steps=1, probe_steps=2, timesteps=(100,), anchors=2, modules=(MODULE_TO_CAPTURE,))
    res = train(data, run, base=str(sd_folder), cfg=cfg, capture=capture, progress=False, capture_mode="inline")
    assert res.final_lora.exists()

    st = RunStore.open(run)
    assert st.steps.tolist() == [0, 1, 2]
    assert st.run_config["base"] == str(sd_folder) and st.run_config["resolution"] == RESOLUTION
    assert st.modules == [MODULE_TO_CAPTURE]
    n_probes = len(st.probe_meta[S.ATTR_PROMPTS])
    f = st.features(S.TRAIN, MODULE_TO_CAPTURE)
    # mid_block of the tiny UNet: 16 channels at 4x4 latent cells, pooled on a 2x2 grid -> 64 features
    assert f.shape == (3, 4, 2, 1, 64)
    assert st.features(S.ANCHORS, MODULE_TO_CAPTURE).shape == (3, 2, 2, 1, 64)
    assert st.features(S.PROBES, MODULE_TO_CAPTURE).shape == (3, n_probes, 2, 1, 64)
    assert st.losses(S.TRAIN).shape == (3, 4, 2, 1)
    assert np.isfinite(f).all() and np.isfinite(st.losses(S.TRAIN)).all()
    assert not np.allclose(f[0], f[2])  # the LoRA moved the representations
    for c in range(3):
        img = st.probe_images(c)
        assert img.shape == (n_probes, RESOLUTION, RESOLUTION, 3) and img.dtype == np.uint8


def test_from_diffusers_wraps_a_scripts_own_parts_like_the_loader(sd_folder):
    """A user's script holds unet/text_encoder/tokenizer/scheduler/vae: wrapping them equals loading the folder."""
    from montrage.models.components import DiffusionComponents

    loaded = load_diffusers_folder(sd_folder)
    wrapped = DiffusionComponents.from_diffusers(loaded.unet, loaded.prompt_encoder.text_encoder,
                                                 loaded.prompt_encoder.tokenizer, loaded.noise_scheduler, loaded.vae)
    assert wrapped.resolution == loaded.resolution and wrapped.latent_shape == loaded.latent_shape
    torch.testing.assert_close(wrapped.encode_prompts(["a circle"]).hidden, loaded.encode_prompts(["a circle"]).hidden)
    assert wrapped.sample_scheduler.config.num_train_timesteps == loaded.noise_scheduler.config.num_train_timesteps
