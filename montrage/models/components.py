"""The parts of a text-to-image diffusion model that montrage trains, captures and samples with.

One small interface for the embedded tiny model (pixel space, word encoder), a local diffusers
Stable-Diffusion-style folder (latent space via AutoencoderKL, CLIP text encoder) and an SDXL-style
model (two text encoders, pooled text embeddings and size/crop ``time_ids`` as extra UNet inputs).
:meth:`DiffusionComponents.predict` is the one place montrage calls the UNet, so those extra
inputs and mixed-precision autocast apply to training, capture, sampling and attribution alike.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from montrage.errors import ConfigError, ModelLoadError


@dataclass
class Conditioning:
    """Encoded prompts: ``hidden`` (B, L, E) cross-attention states, plus ``pooled`` (B, P) for SDXL.

    Indexes, batches and mixes like a tensor along the batch axis, so callers handle both kinds of
    model the same way; :meth:`DiffusionComponents.predict` turns it into the UNet's inputs.
    """

    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(fn(self.hidden), None if self.pooled is None else fn(self.pooled))

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda x: x[index])

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        if dim != 0:
            raise ValueError("Conditioning repeats along the batch axis (dim=0) only")
        return self._map(lambda x: x.repeat_interleave(repeats, 0))

    def expand(self, n: int) -> "Conditioning":
        """A batch of ``n`` copies of this one-row conditioning (no copy of memory)."""
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def unsqueeze(self, dim: int = 0) -> "Conditioning":
        return self._map(lambda x: x.unsqueeze(dim))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda x: x.to(*args, **kwargs))

    def detach(self) -> "Conditioning":
        return self._map(lambda x: x.detach())

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis (all parts with or all without pooled embeddings)."""
        parts = [as_conditioning(p) for p in parts]
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate conditionings with and without pooled embeddings")
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled))

    # linear mixing (e.g. a blend a * E(p1) + (1 - a) * E(p2)); a (B, 1, 1) weight applies to pooled too
    def _binary(self, other, op) -> "Conditioning":
        if isinstance(other, Conditioning):
            pooled = None if self.pooled is None or other.pooled is None else op(self.pooled, other.pooled)
            return Conditioning(op(self.hidden, other.hidden), pooled)
        w_pooled = other.reshape(other.shape[0], -1)[:, :1] if isinstance(other, torch.Tensor) and other.dim() == 3 else other
        return Conditioning(op(self.hidden, other), None if self.pooled is None else op(self.pooled, w_pooled))

    def __add__(self, other):
        return self._binary(other, lambda a, b: a + b)

    __radd__ = __add__

    def __mul__(self, other):
        return self._binary(other, lambda a, b: a * b)

    __rmul__ = __mul__


def as_conditioning(value: Union[Conditioning, torch.Tensor]) -> Conditioning:
    """A bare hidden-states tensor (SD-style) is a conditioning without pooled embeddings."""
    return value if isinstance(value, Conditioning) else Conditioning(value)


def _hf_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class PromptEncoder(nn.Module):
    """prompts -> :class:`Conditioning`; wraps one tokenizer + text encoder, or SDXL's two.

    With a second encoder (SDXL) the hidden states are both encoders' penultimate layers
    concatenated along the feature axis and ``pooled`` is the second encoder's projected output,
    as diffusers' SDXL pipeline and training scripts compute them.
    """

    def __init__(self, tokenizer: Callable, text_encoder: nn.Module, hf_tokenizer: bool,
                 tokenizer_2: Optional[Callable] = None, text_encoder_2: Optional[nn.Module] = None) -> None:
        super().__init__()
        if (tokenizer_2 is None) != (text_encoder_2 is None):
            raise ConfigError("give both tokenizer_2 and text_encoder_2 (an SDXL-style model) or neither")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return _hf_ids(self.tokenizer, prompts) if self.hf_tokenizer else self.tokenizer(prompts)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        device = next(self.text_encoder.parameters()).device
        ids = self.token_ids(prompts).to(device)
        if self.text_encoder_2 is None:
            out = self.text_encoder(ids)
            return Conditioning(out if isinstance(out, torch.Tensor) else out[0])
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(_hf_ids(self.tokenizer_2, prompts).to(device), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(hidden, second[0])

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Hidden states only (what an SD-style UNet needs); :meth:`encode` gives the full conditioning."""
        return self.encode(prompts).hidden


def _unet_output(out) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class DiffusionComponents:
    unet: nn.Module
    prompt_encoder: nn.Module  # prompts -> Conditioning (PromptEncoder) or a hidden-states tensor
    noise_scheduler: object  # DDPMScheduler: training noise and timesteps
    sample_scheduler: object  # DDIMScheduler: probe generation
    resolution: int
    base: str  # "embedded" or the local folder it was loaded from
    vae: Optional[nn.Module] = None
    autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16: UNet calls under autocast; None = fp32

    @classmethod
    def from_diffusers(cls, unet: nn.Module, text_encoder: nn.Module, tokenizer: Callable, noise_scheduler,
                       vae: Optional[nn.Module] = None, resolution: Optional[int] = None,
                       base: str = "user", text_encoder_2: Optional[nn.Module] = None,
                       tokenizer_2: Optional[Callable] = None,
                       autocast_dtype: Optional[torch.dtype] = None) -> "DiffusionComponents":
        """Wrap the pieces a diffusers training script already holds (CLIP tokenizer(s) + text encoder(s)).

        SDXL: also pass ``text_encoder_2`` (CLIPTextModelWithProjection) and ``tokenizer_2``.
        """
        from diffusers import DDIMScheduler

        if resolution is None:
            sample = unet.config.sample_size
            sample = sample[0] if isinstance(sample, (list, tuple)) else sample
            factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
            resolution = int(sample) * factor
        encoder = PromptEncoder(tokenizer, text_encoder, hf_tokenizer=True, tokenizer_2=tokenizer_2,
                                text_encoder_2=text_encoder_2)
        return cls(unet=unet, prompt_encoder=encoder, noise_scheduler=noise_scheduler,
                   sample_scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                   resolution=resolution, base=base, vae=vae, autocast_dtype=autocast_dtype)

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

    @property
    def needs_pooled(self) -> bool:
        """True for an SDXL-style UNet (``addition_embed_type="text_time"``)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        enc = self.prompt_encoder
        return as_conditioning(enc.encode(prompts) if hasattr(enc, "encode") else enc(prompts))

    def time_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """SDXL's micro-conditioning: (original H, W, crop top, left, target H, W) = (R, R, 0, 0, R, R)."""
        r = float(self.resolution)
        return torch.tensor([r, r, 0.0, 0.0, r, r], device=device).expand(batch, 6)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Union[Conditioning, torch.Tensor],
                unet: Optional[Callable] = None) -> torch.Tensor:
        """The UNet's prediction (float32) for noised inputs ``x_t`` at timesteps ``t`` under ``cond``.

        Adds SDXL's ``added_cond_kwargs`` when the UNet needs them and runs under
        ``torch.autocast(autocast_dtype)`` when set. ``unet`` overrides the callable (e.g. a
        distributed wrapper, or ``functional_call`` inside ``torch.func``); it is called like
        ``UNet2DConditionModel.forward``.
        """
        cond = as_conditioning(cond)
        kwargs = {"encoder_hidden_states": cond.hidden}
        if self.needs_pooled:
            if cond.pooled is None:
                raise ModelLoadError("this UNet is SDXL-style (addition_embed_type='text_time') and needs pooled text "
                                     "embeddings; build the components with text_encoder_2 and tokenizer_2 "
                                     "(DiffusionComponents.from_diffusers(..., text_encoder_2=..., tokenizer_2=...))")
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled,
                                           "time_ids": self.time_ids(x_t.shape[0], x_t.device).to(cond.pooled.dtype)}
        fn = self.unet if unet is None else unet
        if self.autocast_dtype is None:
            return _unet_output(fn(x_t, t, **kwargs)).float()
        with torch.autocast(device_type=x_t.device.type, dtype=self.autocast_dtype):
            out = _unet_output(fn(x_t, t, **kwargs))
        return out.float()

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


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its mode restored after. Free when every submodule already is in
    eval mode (analysis models are): ``train()`` walks every submodule, ~5 ms each way on a small UNet, paid
    at each of the many short re-encoding / gradient calls of a query."""
    if not any(m.training for m in module.modules()):
        yield module
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
