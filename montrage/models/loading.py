"""Load a base model: the embedded tiny default, or a local diffusers pipeline folder.

Nothing here downloads: ``from_pretrained`` is always given a local path.
"""
from __future__ import annotations

import hashlib
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


IDENTITY_SAMPLES = 1024  # values hashed per base tensor: cheap (milliseconds for SD-1.5), still pins the weights


@torch.no_grad()
def base_identity(unet: torch.nn.Module) -> str:
    """A cheap content hash of the UNet's base (non-LoRA) weights: names, shapes and an even sample of values.

    Values are rounded to bfloat16 first, so the same weights held in float32 or bfloat16 hash alike; peft's
    ``base_layer`` renaming is undone, so the hash is the same before and after a LoRA adapter is added.
    """
    unet = getattr(unet, "module", unet)
    h = hashlib.sha256(b"montrage-base-v1\0")
    for name, t in sorted(unet.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        flat = t.detach().reshape(-1)
        if flat.numel() > IDENTITY_SAMPLES:
            flat = flat[torch.linspace(0, flat.numel() - 1, IDENTITY_SAMPLES, device=flat.device).long()]
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        if flat.is_floating_point():
            h.update(flat.to(torch.bfloat16).float().cpu().numpy().tobytes())
        else:
            h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def locate_base(base: Optional[str], unet: torch.nn.Module) -> Optional[str]:
    """Where a base model can be reloaded from: 'embedded', a local diffusers folder, else None.

    ``base`` is what the caller recorded (DiffusionComponents.base); when it is not a loadable location
    (e.g. 'user' from ``from_diffusers``), ``unet.config._name_or_path`` is used if it is a local folder.
    """
    if base == EMBEDDED:
        return EMBEDDED
    candidates = [base] if base else []
    cfg = getattr(getattr(unet, "module", unet), "config", None)
    name = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    if name:
        candidates.append(str(name))
    for cand in candidates:
        path = Path(cand).expanduser()
        if not path.is_dir():
            continue
        path = path.resolve()
        if path == EMBEDDED_DIR.resolve() or path == (EMBEDDED_DIR / "unet").resolve():
            return EMBEDDED
        for root in (path, path.parent):  # the pipeline folder, or the unet/ folder inside it
            if all((root / c).is_dir() for c in REQUIRED_COMPONENTS):
                return str(root)
    return None
