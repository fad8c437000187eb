"""The embedded tiny base model: a config-built diffusers UNet2DConditionModel + word text encoder.

Its weights ship in ``models/assets/embedded_base`` (made by ``scripts/pretrain_base.py``).
Sizes follow what was measured to generate recognisable shapes on 2 CPU cores: 16x16 pixels,
channels (32, 64), attention only at 8x8, v-prediction with a cosine schedule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from montrage.config import EmbeddedModelConfig
from montrage.models.text import WordTextEncoder, WordTokenizer

if TYPE_CHECKING:  # diffusers is imported when a model is built: importing it (and peft with it) costs seconds
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

SCHEDULER_KWARGS = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                        prediction_type="v_prediction", clip_sample=False)


def build_unet(cfg: EmbeddedModelConfig) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    down = ("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=cfg.resolution, in_channels=3, out_channels=3,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_heads, norm_num_groups=cfg.norm_num_groups,
    )


def build_text(cfg: EmbeddedModelConfig) -> tuple[WordTokenizer, WordTextEncoder]:
    tok = WordTokenizer(cfg.max_text_length, cfg.hash_buckets)
    return tok, WordTextEncoder(tok.vocab_size, cfg.max_text_length, cfg.cross_attention_dim)


def build_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    from diffusers import DDIMScheduler, DDPMScheduler

    return DDPMScheduler(**SCHEDULER_KWARGS), DDIMScheduler(**SCHEDULER_KWARGS)
