"""A tiny SDXL-shaped model written offline (random weights): two CLIP text encoders and a UNet with
``addition_embed_type="text_time"``, so every UNet call needs pooled text embeddings and time_ids.

Pixel space (no VAE) at 16x16 to stay fast; the second encoder is a CLIPTextModelWithProjection whose
projected output is the pooled embedding, and cross-attention sees both encoders' states concatenated
(16 + 16 = 32 features), as in SDXL.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models.tiny_pipeline import TEXT_MAX_LENGTH, write_tiny_tokenizer

RESOLUTION = 16
TIME_EMBED = 8
POOLED = 16


def build_tiny_sdxl(folder: Path, seed: int = 0):
    """(unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler); tokenizers written under folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_tiny_tokenizer(Path(folder) / "tokenizer")
    tok2_dir = write_tiny_tokenizer(Path(folder) / "tokenizer_2")
    vocab_size = len(json.loads((tok_dir / "vocab.json").read_text()))
    text_cfg = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=POOLED,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    return (unet, text, CLIPTokenizer.from_pretrained(tok_dir), text_2, CLIPTokenizer.from_pretrained(tok2_dir),
            scheduler)


def write_tiny_sdxl(root: Path, seed: int = 0) -> Path:
    """The same model as a pipeline folder: unet/, text_encoder(_2)/, tokenizer(_2)/, scheduler/."""
    unet, text, _, text_2, _, scheduler = build_tiny_sdxl(root, seed)
    unet.save_pretrained(root / "unet")
    text.save_pretrained(root / "text_encoder")
    text_2.save_pretrained(root / "text_encoder_2")
    scheduler.save_pretrained(root / "scheduler")
    return root
