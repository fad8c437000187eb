"""LoRA fine-tuning with the montrage monitor: the loop behind ``montrage train``.

Deterministic by construction: batch choice, noise and timesteps at step s come from generators
seeded by (seed, s, rank), so a resumed run replays exactly and the monitor cannot perturb training.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from montrage.callbacks.monitor import TrainingMonitor
from montrage.config import CaptureConfig, TrainConfig, to_dict
from montrage.data.imagefolder import TrainingSet, load_imagefolder
from montrage.data.probes import default_probes, load_probe_file
from montrage.distributed import ProcessContext
from montrage.losses.diffusion import denoising_loss, min_snr_weights
from montrage.models.components import DiffusionComponents
from montrage.models.loading import load_base
from montrage.models.lora import add_lora, load_lora_state, lora_state
from montrage.models.sampling import uint8_to_pixels
from montrage.storage import schema as S

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    start_step: int
    wall_time_s: float
    final_lora: Path
    lora_saved_s: Optional[float] = None  # from the first step until the final LoRA was saved (before waiting
    #                                       for background capture): what the capture mode keeps fast


def _resume_file(output_dir: Path, step: int) -> Path:
    return output_dir / S.RESUME_DIRNAME / f"step-{step:08d}.pt"


def _latest_resume(output_dir: Path) -> Optional[Path]:
    files = sorted((output_dir / S.RESUME_DIRNAME).glob("step-*.pt"))
    return files[-1] if files else None


def _save_resume(output_dir: Path, step: int, unet, opt, sched, monitor: Optional[TrainingMonitor]) -> None:
    """Atomic (temp + rename); keeps the two newest files."""
    path = _resume_file(output_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "lora": lora_state(unet), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "monitor": monitor.state_dict() if monitor else None}, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step-*.pt"))[:-2]:
        old.unlink(missing_ok=True)


def step_batch(step: int, rank: int, cfg: TrainConfig, train: TrainingSet, prior: Optional[TrainingSet],
               components: DiffusionComponents, with_indices: bool = False):
    """Images, captions, noise and timesteps of optimizer step ``step`` on ``rank``: a pure function.
    ``with_indices``: also the training-image index of each batch item (prior images are not listed)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
    n_prior = int(round(cfg.batch_size * cfg.prior_fraction)) if prior is not None else 0
    idx = torch.randint(0, len(train), (cfg.batch_size - n_prior,), generator=g).tolist()
    images = [train.images[i] for i in idx]
    captions = [train.captions[i] for i in idx]
    if n_prior:
        pidx = torch.randint(0, len(prior), (n_prior,), generator=g).tolist()
        images += [prior.images[i] for i in pidx]
        captions += [prior.captions[i] for i in pidx]
    drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    pixels = uint8_to_pixels(np.stack(images))
    latent_shape = (len(images),) + components.latent_shape
    noise = torch.randn(latent_shape, generator=g)
    t = torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (len(images),), generator=g)
    return (pixels, captions, noise, t, idx) if with_indices else (pixels, captions, noise, t)


def train(data_dir: str | Path, output_dir: str | Path, base: str = "embedded", cfg: Optional[TrainConfig] = None,
          capture: Optional[CaptureConfig] = None, probes_file: Optional[str | Path] = None,
          prior_dir: Optional[str | Path] = None, monitor: bool = True, accelerator=None,
          progress: bool = True, store_images: bool = True, capture_mode: str = "background",
          capture_threads: Optional[int] = 1, capture_device: str = "cpu") -> TrainResult:
    """Fine-tune a LoRA on ``data_dir`` into ``output_dir``; re-running the same call resumes.

    ``capture_mode``: where checkpoints are featurized (see :meth:`TrainingMonitor.configure_capture`): by
    default a background worker with ``capture_threads`` CPU threads (or on ``capture_device``, e.g. a second
    GPU, or the training GPU when it has room), so the loop only snapshots.

    ``store_images=False`` keeps only the training images' paths and hashes in the run (large sets).
    """
    from accelerate import Accelerator

    cfg = cfg or TrainConfig()
    capture = capture or CaptureConfig()
    output_dir = Path(output_dir)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    ctx = ProcessContext(accelerator)
    # the data's metadata and files first (cheap): a bad folder is reported before a base model is loaded
    load_imagefolder(data_dir, cfg.resolution or 16, lazy=True)
    if prior_dir:
        load_imagefolder(prior_dir, cfg.resolution or 16, lazy=True)
    components = load_base(base, device=accelerator.device)
    base_resolution = components.resolution
    resolution = cfg.resolution or components.resolution
    if resolution != components.resolution:
        components.resolution = resolution
    train_set = load_imagefolder(data_dir, resolution)
    chosen = cfg.unresolved  # steps / lr / rank the caller left to the data-dependent defaults
    cfg = cfg.resolved(len(train_set), resolution, base_resolution, embedded=base == "embedded")
    if chosen:
        log.info("training defaults for %d images at %d px: steps %d, LoRA rank %d, lr %g (chosen: %s)",
                 len(train_set), resolution, cfg.steps, cfg.lora.rank, cfg.lr, ", ".join(chosen))
    prior = load_imagefolder(prior_dir, resolution) if prior_dir else None
    probes = load_probe_file(probes_file) if probes_file else default_probes(train_set)
    params = add_lora(components.unet, cfg.lora, seed=cfg.seed)
    components.unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    identity = {k: v for k, v in to_dict(cfg).items() if k not in ("steps",)}
    run_config = {"train": to_dict(cfg), "train_identity": identity, "capture": to_dict(capture),
                  "train_defaults_chosen": list(chosen),
                  "base": components.base,
                  "data_dir": str(Path(data_dir).resolve()),
                  "prior_dir": str(Path(prior_dir).resolve()) if prior_dir else None,
                  "resolution": resolution, "world_size": ctx.world_size}  # the LoRA config: read from the model
    mon = (TrainingMonitor(output_dir, components, train_set, probes, capture, run_config, accelerator, optimizer=opt,
                           store_images=store_images) if monitor else None)
    if mon is not None:
        mon.configure_capture(capture_mode, threads=capture_threads, device=capture_device)

    start = 0
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if mon is not None:
            mon.open_store()  # refuses a store of another config, and locks it, before any work
        resume = _latest_resume(output_dir)
        if resume is not None:
            state = torch.load(resume, map_location="cpu", weights_only=True)
            load_lora_state(components.unet, state["lora"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["step"])
            if mon is not None and state.get("monitor"):
                mon.load_state_dict(state["monitor"])  # which steps are recorded: the store says
            log.info("resuming %s from step %d", output_dir, start)
        model, opt = accelerator.prepare(components.unet, opt)
        t0 = time.time()
        if mon is not None:
            mon.on_train_begin(start)
        every = capture.every_n_steps
        bar = tqdm(range(start + 1, cfg.steps + 1), disable=not (progress and ctx.is_main), desc="train LoRA",
                   initial=start, total=cfg.steps)
        for step in bar:
            pixels, captions, noise, t, idx = step_batch(step, ctx.rank, cfg, train_set, prior, components,
                                                         with_indices=True)
            dev = accelerator.device
            latents = components.to_latents(pixels.to(dev))
            hidden = components.encode_prompts(captions)
            weights = min_snr_weights(components.noise_scheduler, t.to(dev), cfg.snr_gamma)
            predict = lambda x, tt, c: components.predict(x, tt, c, unet=model)  # noqa: E731 (the prepared model)
            per_sample = denoising_loss(predict, components.noise_scheduler, latents, noise.to(dev), t.to(dev), hidden,
                                        weights)
            loss = per_sample.mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            if mon is not None:
                mon.on_step_end(step, loss_value, per_sample_losses=per_sample.detach(), timesteps=t, indices=idx)
            if step % every == 0 and step < cfg.steps and ctx.is_main:
                _save_resume(output_dir, step, components.unet, opt, sched, mon)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if mon is not None:
            mon.on_train_end(cfg.steps, wait=False)  # the last snapshot; featurizing may still run in the background
        final = output_dir / S.FINAL_LORA_FILENAME
        if ctx.is_main:
            save_file({k: v.contiguous() for k, v in lora_state(components.unet).items()}, final)
            _save_resume(output_dir, cfg.steps, components.unet, opt, sched, mon)
        lora_saved_s = time.time() - t0
    finally:
        if mon is not None:
            mon.close()  # waits for background capture; releases the store lock also when training dies
    ctx.barrier()
    return TrainResult(output_dir, cfg.steps, start, time.time() - t0, final, lora_saved_s)
