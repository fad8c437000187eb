"""Pretraining of the embedded base model on generic synthetic images (not on the artists).

Recipe measured to work on 2 CPU cores: v-prediction, cosine schedule, min-SNR-5, AdamW 1e-3 with
warm-up, batch 32, grad clip 1, EMA weights for sampling, 15% caption dropout.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from montrage.config import EmbeddedModelConfig, to_dict
from montrage.data.synthetic import generic_sample
from montrage.losses.diffusion import denoising_loss, min_snr_weights
from montrage.models.embedded import build_schedulers, build_text, build_unet

log = logging.getLogger(__name__)


def pretrain_base(out_dir: str | Path, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3,
                  seed: int = 0, pool_size: int = 30000, cfg: Optional[EmbeddedModelConfig] = None,
                  caption_dropout: float = 0.15, progress: bool = True) -> Path:
    cfg = cfg or EmbeddedModelConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    samples = [generic_sample(rng, cfg.resolution) for _ in range(pool_size)]
    pixels = torch.from_numpy(np.stack([s[0] for s in samples])).float().permute(0, 3, 1, 2) / 127.5 - 1
    captions = [s[1] for s in samples]
    unet = build_unet(cfg)
    tokenizer, text = build_text(cfg)
    ddpm, _ = build_schedulers()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    ema_unet = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ema_text = AveragedModel(text, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    t0 = time.time()
    bar = tqdm(range(steps), disable=not progress, desc="pretrain base")
    for step in bar:
        idx = rng.integers(0, pool_size, batch_size)
        x0 = pixels[idx]
        caps = ["" if rng.random() < caption_dropout else captions[i] for i in idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch_size,))
        hidden = text(tokenizer(caps))
        loss = denoising_loss(unet, ddpm, x0, noise, t, hidden, min_snr_weights(ddpm, t, 5.0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update_parameters(unet)
        ema_text.update_parameters(text)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final_unet = copy.deepcopy(unet)
    final_unet.load_state_dict(ema_unet.module.state_dict())
    final_unet.save_pretrained(out / "unet")
    save_file({k: v.contiguous() for k, v in ema_text.module.state_dict().items()}, out / "text_encoder.safetensors")
    meta = {"model": to_dict(cfg), "pretraining": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                                   "wall_time_s": round(time.time() - t0, 1)}}
    (out / "montrage_model.json").write_text(json.dumps(meta, indent=2))
    return out
