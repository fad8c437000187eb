"""Timing at a real model size: a Stable-Diffusion-1.5-shaped UNet (random weights, built from its config:
no download), LoRA rank 4 on attention, 64x64 latents. Measures, side by side on one device, what decides
montrage's overhead and total cost: a training step, the capture of one image (forwards at the capture
timesteps and conditions, no grad), one probe generation (DDIM with guidance), and one per-sample
gradient (what D-TRAK / TracIn pay per training image and timestep).

    python -m benchmarks.realsize [--small] [--out realsize.json]

``--small`` shrinks the UNet so the script runs on a CPU (tests); the real-size run needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict

import numpy as np
import torch
from torch import nn

from montrage.config import CaptureConfig, LoraSettings
from montrage.models.components import DiffusionComponents
from montrage.models.features import FeatureExtractor
from montrage.models.lora import add_lora
from montrage.models.sampling import generate

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             sample_size=16, norm_num_groups=8)


class FixedPromptEncoder(nn.Module):
    """Stands in for CLIP: a fixed (77, dim) embedding per distinct prompt (cost is negligible either way)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(abs(hash(p)) % 2**31)
            out.append(torch.zeros(77, self.dim) if p == "" else torch.randn(77, self.dim, generator=g))
        return torch.stack(out).to(self.anchor.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def measure(small: bool = False, batch: int = 4, dtype: str = "float32") -> Dict[str, float]:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from montrage.losses.diffusion import denoising_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = SMALL if small else SD15
    unet = UNet2DConditionModel(in_channels=3, out_channels=3, **cfg)
    unet.requires_grad_(False)
    params = add_lora(unet, LoraSettings(rank=4, target_modules=("to_q", "to_k", "to_v", "to_out.0")))
    unet.to(device)
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    comps = DiffusionComponents(unet=unet, prompt_encoder=FixedPromptEncoder(cfg["cross_attention_dim"]),
                                noise_scheduler=ddpm, sample_scheduler=DDIMScheduler.from_config(ddpm.config),
                                resolution=cfg["sample_size"], base="sd15-shaped-random").to(device)
    res = cfg["sample_size"]
    amp = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else torch.autocast(device.type, enabled=False)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, res, res, device=device)
    hidden = comps.encode_prompts(["a photo"] * batch)

    def train_step():
        with amp:
            t = torch.randint(0, 1000, (batch,), device=device)
            loss = denoising_loss(comps.predict, ddpm, x, torch.randn_like(x), t, hidden).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    capture = CaptureConfig(modules=("mid_block", "up_blocks.0", "up_blocks.1"), batch_size=48)
    extractor = FeatureExtractor(comps, capture)
    n_img = 16
    images = np.random.default_rng(0).integers(0, 255, (n_img, res, res, 3), dtype=np.uint8)

    def capture_images():
        with amp:
            extractor.extract(images, ["a photo"] * n_img, list(range(n_img)))

    def probes():
        with amp:
            generate(comps, ["a photo"] * 4, [0, 1, 2, 3], num_steps=25, guidance_scale=1.5)

    one = x[:1]
    h1 = hidden[:1]

    def per_sample_grad():  # one training image at one timestep, LoRA gradient (what gradient methods pay)
        with amp:
            loss = denoising_loss(comps.predict, ddpm, one, torch.randn_like(one), torch.tensor([500], device=device), h1).sum()
        torch.autograd.grad(loss, params)

    step_s = _time(train_step, device)
    capture_s = _time(capture_images, device, repeats=2) / n_img
    probe_s = _time(probes, device, repeats=1) / 4
    grad_s = _time(per_sample_grad, device, repeats=5)
    T, C = len(capture.timesteps), len(capture.conditions)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": dtype,
            "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
            "lora_params": int(sum(p.numel() for p in params)), "latent": res, "train_batch": batch,
            "train_step_s": step_s, "capture_per_image_s": capture_s, "probe_per_image_s": probe_s,
            "per_sample_grad_s": grad_s, "capture_timesteps": T, "capture_conditions": C,
            "capture_image_over_step": capture_s / step_s,
            "capture_image_over_grad_x_timesteps": capture_s / (grad_s * T)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny UNet (CPU smoke test)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    r = measure(small=args.small, dtype=args.dtype)
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
