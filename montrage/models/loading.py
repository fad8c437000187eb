"""Load a base model: the embedded tiny default, or a local diffusers pipeline folder.

Nothing here downloads: ``from_pretrained`` is always given a local path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from montrage.config import EmbeddedModelConfig, from_dict
from montrage.errors import ModelLoadError
from montrage.models.components import DiffusionComponents, PromptEncoder
from montrage.models.embedded import build_schedulers, build_text

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "assets" / "embedded_base"
REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def load_base(base: str = EMBEDDED, device: str | torch.device = "cpu") -> DiffusionComponents:
    """``"embedded"`` or a path to a local diffusers folder; every weight frozen (LoRA adds trainables)."""
    comps = load_embedded() if base == EMBEDDED else load_diffusers_folder(base)
    for module in (comps.unet, comps.prompt_encoder, comps.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return comps.to(device)


def load_embedded(folder: Optional[Path] = None) -> DiffusionComponents:
    from diffusers import UNet2DConditionModel

    folder = Path(folder or EMBEDDED_DIR)
    meta_file = folder / "montrage_model.json"
    if not meta_file.exists():
        raise ModelLoadError(f"embedded base weights missing in {folder}; rebuild them with "
                             "`python scripts/pretrain_base.py` (about 10 minutes on 2 CPU cores)")
    cfg = from_dict(EmbeddedModelConfig, json.loads(meta_file.read_text())["model"])
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tokenizer, text = build_text(cfg)
    text.load_state_dict(load_file(folder / "text_encoder.safetensors"))
    ddpm, ddim = build_schedulers()
    return DiffusionComponents(unet=unet, prompt_encoder=PromptEncoder(tokenizer, text, hf_tokenizer=False),
                               noise_scheduler=ddpm, sample_scheduler=ddim, resolution=cfg.resolution, base=EMBEDDED)


def load_diffusers_folder(path: str | Path, resolution: Optional[int] = None) -> DiffusionComponents:
    """A Stable-Diffusion-style folder: unet/, text_encoder/, tokenizer/, scheduler/ and optional vae/
    (SDXL: also text_encoder_2/ and tokenizer_2/)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"--base {path}: not a folder; give 'embedded' or a local diffusers pipeline folder")
    missing = [c for c in REQUIRED_COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ModelLoadError(f"base model folder {root} is missing component(s) {missing}; a diffusers "
                             f"pipeline folder needs {list(REQUIRED_COMPONENTS)} (+ vae/ for latent models), "
                             "as written by `pipeline.save_pretrained(folder)`")
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet")
        text = CLIPTextModel.from_pretrained(root / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        ddpm = DDPMScheduler.from_pretrained(root / "scheduler")
        ddim = DDIMScheduler.from_config(ddpm.config)
        vae = AutoencoderKL.from_pretrained(root / "vae") if (root / "vae").is_dir() else None
        sdxl = (root / "text_encoder_2").is_dir() and (root / "tokenizer_2").is_dir()  # SDXL: a second encoder
        text_2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2") if sdxl else None
        tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2") if sdxl else None
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"cannot load base model folder {root}: {exc}") from exc
    # A tokenizer/ without tokenizer_config.json (only vocab.json + merges.txt) gets transformers'
    # "unlimited" model_max_length (~1e30), and PromptEncoder pads to model_max_length: cap it at the
    # text encoder's position embeddings (77 for CLIP), which is what the config would have said.
    max_positions = int(getattr(text.config, "max_position_embeddings", 0) or 0)
    if max_positions and not 0 < int(tokenizer.model_max_length) <= max_positions:
        tokenizer.model_max_length = max_positions
    if text_2 is not None:
        max_2 = int(getattr(text_2.config, "max_position_embeddings", 0) or 0)
        if max_2 and not 0 < int(tokenizer_2.model_max_length) <= max_2:
            tokenizer_2.model_max_length = max_2
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    encoder = PromptEncoder(tokenizer, text, hf_tokenizer=True, tokenizer_2=tokenizer_2, text_encoder_2=text_2)
    return DiffusionComponents(unet=unet, prompt_encoder=encoder, noise_scheduler=ddpm, sample_scheduler=ddim,
                               resolution=resolution or int(sample) * factor, base=str(root.resolve()), vae=vae)
