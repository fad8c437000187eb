#!/usr/bin/env python
"""LoRA fine-tuning of a local diffusers text-to-image model with Accelerate, monitored by montrage.

A thin version of diffusers' examples/text_to_image/train_text_to_image_lora.py (no hub, no EMA, no
mixed precision, no validation), to show where montrage plugs in. The lines marked ``# montrage``
are the whole integration::

    accelerate launch scripts/train_text_to_image_lora.py \
        --pretrained_model_name_or_path /models/stable-diffusion-v1-5 --train_data_dir my_images \
        --output_dir runs/my-lora --resolution 512 --train_batch_size 4 --max_train_steps 1000 \
        --checkpointing_steps 100

``--train_data_dir`` is an imagefolder (images + metadata.jsonl with file_name, text[, concept]).
``--pretrained_model_name_or_path`` is a local pipeline folder (unet/, text_encoder/, tokenizer/,
scheduler/, vae/) or ``embedded`` (montrage's tiny 16x16 base). Nothing is downloaded.

Two ways to record montrage checkpoints (both also record step 0 before training):

* default: ``monitor.on_step_end(step, loss)`` every step, a checkpoint every ``--checkpointing_steps``
  (a collective: all processes share the capture work);
* ``--use-save-state-hook``: ``monitor.attach(accelerator, global_step=...)``, then the loop's usual
  ``accelerator.save_state(f"{output_dir}/checkpoint-{step}")`` (main process only, as in the diffusers
  scripts) records a checkpoint, captured by the main process alone; ``register_for_checkpointing(monitor)``
  saves the monitor's state with the rest. Loss is not logged in this mode.

Either way the run is self-contained: the monitor reads the LoRA config from the UNet, the base model's
location from its config, and the optimizer's learning rate (after the lr scheduler) at each checkpoint;
the training images are stored in the run. ``training=TrainConfig(...)`` records how this loop trains (batch
size, steps, lr, warm-up), which ``montrage fit RUN --retrains N`` needs to retrain subsets the same way.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

from montrage import CaptureConfig, LoraSettings, TrainConfig, TrainingMonitor, add_lora, load_base, load_imagefolder
from montrage.data.probes import load_probe_file
from montrage.losses.diffusion import training_target
from montrage.models.lora import lora_state
from montrage.models.sampling import uint8_to_pixels

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # written by save_lora_weights, loadable by pipe.load_lora_weights


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="local diffusers folder or 'embedded'")
    p.add_argument("--train_data_dir", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--output_dir", required=True, help="run folder: montrage store, checkpoints, final LoRA")
    p.add_argument("--resolution", type=int, default=None, help="default: the base model's")
    p.add_argument("--train_batch_size", type=int, default=4, help="per process")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps, then constant")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--checkpointing_steps", type=int, default=100, help="montrage checkpoint (and save_state) interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe_steps", type=int, default=25, help="DDIM steps of montrage's probe generations")
    p.add_argument("--capture_modules", default=None, help="UNet modules montrage records, comma-separated "
                   "(default: montrage's CaptureConfig)")
    p.add_argument("--capture_timesteps", default=None, help="timesteps montrage records at, comma-separated")
    p.add_argument("--probes_file", default=None, help="montrage probes (jsonl with prompt, seed); default: derived "
                   "from the captions and concepts")
    p.add_argument("--use-save-state-hook", dest="use_save_state_hook", action="store_true",
                   help="record montrage checkpoints from accelerator.save_state instead of on_step_end")
    return p.parse_args(argv)


class ImageCaptions(Dataset):
    def __init__(self, training_set) -> None:
        self.ts = training_set

    def __len__(self) -> int:
        return len(self.ts)

    def __getitem__(self, i: int):
        return {"pixels": uint8_to_pixels(self.ts.images[i:i + 1])[0], "caption": self.ts.captions[i]}


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # cpu=True without CUDA: under torchrun on a CPU machine a plain Accelerator() would run each
    # process alone (world size 1) instead of joining a gloo process group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed, device_specific=True)
    device = accelerator.device

    components = load_base(args.pretrained_model_name_or_path, device=device)  # frozen unet/text/vae
    components.resolution = args.resolution or components.resolution
    training_set = load_imagefolder(args.train_data_dir, components.resolution)
    params = add_lora(components.unet, LoraSettings(rank=args.rank, alpha=args.lora_alpha), seed=args.seed)
    components.unet.train()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    warmup = max(1, args.lr_warmup_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    loader = DataLoader(ImageCaptions(training_set), batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(components.unet, optimizer, loader, lr_scheduler)
    if len(loader) == 0:
        raise SystemExit(f"{len(training_set)} training images make no full batch of --train_batch_size "
                         f"{args.train_batch_size} on each of {accelerator.num_processes} process(es); lower it")
    scheduler = components.noise_scheduler

    extra = {}
    if args.capture_modules:
        extra["modules"] = tuple(args.capture_modules.split(","))
    if args.capture_timesteps:
        extra["timesteps"] = tuple(int(t) for t in args.capture_timesteps.split(","))
    capture = CaptureConfig(every_n_steps=args.checkpointing_steps, probe_steps=args.probe_steps, **extra)
    probes = load_probe_file(args.probes_file) if args.probes_file else None
    # montrage: how this loop trains, so `montrage fit RUN --retrains N` can retrain subsets the same way
    training = TrainConfig(steps=args.max_train_steps, batch_size=args.train_batch_size, lr=args.learning_rate,
                           warmup_steps=args.lr_warmup_steps, seed=args.seed, resolution=args.resolution,
                           prior_fraction=0.0, grad_clip=1.0, lora=LoraSettings(rank=args.rank, alpha=args.lora_alpha))
    monitor = TrainingMonitor(output_dir, components, training_set, probes=probes, capture=capture,  # montrage
                              accelerator=accelerator, optimizer=optimizer, training=training)
    step = 0
    if args.use_save_state_hook:
        def save_lora_only(models, weights, save_dir):  # keep the GBs of frozen base weights out of checkpoints
            weights.clear()
            torch.save(lora_state(components.unet), os.path.join(save_dir, "lora.pt"))

        accelerator.register_save_state_pre_hook(save_lora_only)
        monitor.attach(accelerator, global_step=lambda: step)  # montrage: record at every save_state (main process)
        accelerator.register_for_checkpointing(monitor)  # montrage: its state is saved and resumed with the rest
    with monitor:  # montrage: an exception releases the store's lock and leaves it consistent
        monitor.on_train_begin()  # montrage: step 0, the base model
        while step < args.max_train_steps:
            for batch in loader:
                with torch.no_grad():
                    latents = components.to_latents(batch["pixels"].to(device))
                    hidden = components.encode_prompts(batch["caption"])
                noise = torch.randn_like(latents)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
                pred = components.predict(scheduler.add_noise(latents, noise, t), t, hidden, unet=unet)  # SDXL, autocast
                loss = torch.nn.functional.mse_loss(pred.float(), training_target(scheduler, latents, noise, t).float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if args.use_save_state_hook:
                    if step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                        accelerator.save_state(str(output_dir / f"checkpoint-{step}"))  # montrage records here
                else:
                    monitor.on_step_end(step, loss.item())  # montrage
                if step >= args.max_train_steps:
                    break
        monitor.on_train_end(step)  # montrage: the final step unless already recorded; closes the store
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionLoraLoaderMixin.save_lora_weights(output_dir, unet_lora_layers=state, safe_serialization=True)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
