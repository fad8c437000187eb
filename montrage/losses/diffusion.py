"""Per-sample denoising losses shared by training, capture and attribution.

Per-sample (not batch-mean) so that capture can record one loss per image and gradient methods
can differentiate one sample at a time.
"""
from __future__ import annotations

from typing import Optional

import torch


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, following the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    ab = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return ab / (1.0 - ab)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon or v prediction; ones if gamma is None."""
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension: shape (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.add_noise(latents, noise, timesteps)


def denoising_loss(model, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   cond, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample (optionally weighted) denoising loss at the given noise and timesteps.

    ``model`` is a prediction function ``(x_t, t, cond) -> prediction`` (montrage passes
    ``DiffusionComponents.predict``, which handles SDXL inputs and autocast), or a bare diffusers
    UNet module called with ``encoder_hidden_states=cond``.
    """
    x_t = noised(scheduler, latents, noise, timesteps)
    if isinstance(model, torch.nn.Module):
        pred = model(x_t, timesteps, encoder_hidden_states=cond).sample
    else:
        pred = model(x_t, timesteps, cond)
    loss = per_sample_mse(pred, training_target(scheduler, latents, noise, timesteps))
    return loss if weights is None else loss * weights
