"""The parts of a text-to-image diffusion model that montrage trains, captures and samples with.

One small interface for both the embedded tiny model (pixel space, word encoder) and a local
diffusers Stable-Diffusion-style folder (latent space via AutoencoderKL, CLIP text encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """prompts -> (batch, tokens, dim) hidden states; wraps a tokenizer and a text encoder."""

    def __init__(self, tokenizer: Callable, text_encoder: nn.Module, hf_tokenizer: bool) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.hf_tokenizer = hf_tokenizer

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.hf_tokenizer:
            return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                  max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.tokenizer(prompts)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(prompts).to(next(self.text_encoder.parameters()).device)
        out = self.text_encoder(ids)
        return out if isinstance(out, torch.Tensor) else out[0]


@dataclass
class DiffusionComponents:
    unet: nn.Module
    prompt_encoder: PromptEncoder
    noise_scheduler: object  # DDPMScheduler: training noise and timesteps
    sample_scheduler: object  # DDIMScheduler: probe generation
    resolution: int
    base: str  # "embedded" or the local folder it was loaded from
    vae: Optional[nn.Module] = None

    @classmethod
    def from_diffusers(cls, unet: nn.Module, text_encoder: nn.Module, tokenizer: Callable, noise_scheduler,
                       vae: Optional[nn.Module] = None, resolution: Optional[int] = None,
                       base: str = "user") -> "DiffusionComponents":
        """Wrap the pieces a diffusers training script already holds (CLIP tokenizer + text encoder)."""
        from diffusers import DDIMScheduler

        if resolution is None:
            sample = unet.config.sample_size
            sample = sample[0] if isinstance(sample, (list, tuple)) else sample
            factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            resolution = int(sample) * factor
        return cls(unet=unet, prompt_encoder=PromptEncoder(tokenizer, text_encoder, hf_tokenizer=True),
                   noise_scheduler=noise_scheduler, sample_scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                   resolution=resolution, base=base, vae=vae)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return (self.unet.config.in_channels, self.resolution, self.resolution)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, self.resolution // f, self.resolution // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts)

    @torch.no_grad()
    def to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels in [-1, 1], (B, 3, H, W) -> model space (identity for the pixel-space model)."""
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def to(self, device: torch.device | str) -> "DiffusionComponents":
        self.unet.to(device)
        self.prompt_encoder.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self
