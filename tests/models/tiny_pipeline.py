"""Write a tiny Stable-Diffusion-style diffusers folder, fully offline (no hub access, random weights).

Layout as ``StableDiffusionPipeline.save_pretrained`` writes it: unet/, text_encoder/, tokenizer/,
scheduler/, vae/. Sizes: 16x16 pixels -> 8x8x4 latents (VAE factor 2), UNet channels (8, 16),
CLIP text encoder of width 16 with 2 layers. Loads in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

RESOLUTION = 16
TEXT_MAX_LENGTH = 16
MODULE_TO_CAPTURE = "mid_block"


def _vocab_and_merges() -> Tuple[Dict[str, int], List[str]]:
    """A byte-level BPE vocabulary covering lowercase letters, digits and the punctuation in captions; a few
    merges make common caption words single tokens, so the BPE path is exercised (the benchmark's own)."""
    from benchmarks.overhead_realsize import _vocab_and_merges as vocab_and_merges

    return vocab_and_merges()


def write_tiny_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json, as in a Stable Diffusion 1.5 checkout's tokenizer/."""
    from benchmarks.overhead_realsize import write_tokenizer

    write_tokenizer(folder, max_length=TEXT_MAX_LENGTH)
    return folder


def write_tiny_pipeline(root: str | Path, seed: int = 0, with_vae: bool = True) -> Path:
    """Write the tiny pipeline into ``root`` (created); returns ``root``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = write_tiny_tokenizer(root / "tokenizer")
    vocab_size = len(json.loads((tok_dir / "vocab.json").read_text()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=16,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    unet.save_pretrained(root / "unet")
    text.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    if with_vae:
        vae.save_pretrained(root / "vae")
    return root
