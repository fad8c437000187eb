"""Featurize images: pooled UNet activations and denoising losses at fixed noise and timesteps.

Shared by the training monitor (training images and probes at each checkpoint) and by analysis
(query images re-encoded under each stored LoRA checkpoint), so the two compute exactly the same
thing. It lives below both because neither may import the other.

Noise is a pure function of (capture seed, item seed, timestep index): the same image gets the same
noise at every checkpoint, whichever batch or process it is computed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from montrage.config import CaptureConfig
from montrage.errors import CaptureError
from montrage.losses.diffusion import noised, per_sample_mse, training_target
from montrage.models.components import DiffusionComponents, eval_mode
from montrage.models.sampling import seeded_noise, uint8_to_pixels

TRAIN_SEED_OFFSET = 0
PROBE_SEED_OFFSET = 10_000_000
QUERY_SEED_OFFSET = 20_000_000
ANCHOR_SEED_OFFSET = 30_000_000  # training images again, under a second noise draw


@dataclass
class Features:
    features: Dict[str, np.ndarray]  # module -> (N, C, T, F) float32
    losses: np.ndarray  # (N, C, T) float32


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class FeatureExtractor:
    """Captures pooled outputs of named UNet modules with forward hooks that leave outputs untouched."""

    def __init__(self, components: DiffusionComponents, capture: CaptureConfig) -> None:
        self.components = components
        self.capture = capture
        modules = dict(components.unet.named_modules())
        missing = [m for m in capture.modules if m not in modules]
        if missing:
            top = sorted({n.split(".")[0] if not n.startswith(("down_blocks", "up_blocks")) else ".".join(n.split(".")[:2])
                          for n in modules if n})
            raise CaptureError(f"unknown UNet module(s) {missing} in CaptureConfig.modules; "
                               f"available block names include {top}")
        self._modules = {m: modules[m] for m in capture.modules}
        self._projections: Dict[str, torch.Tensor] = {}
        self._dims: Dict[str, int] | None = None
        num_train = components.noise_scheduler.config.num_train_timesteps
        bad = [t for t in capture.timesteps if t >= num_train]
        if bad:
            raise CaptureError(f"capture timesteps {bad} exceed the scheduler's {num_train} training timesteps")

    # -- pooling and projection -------------------------------------------------
    def _pool(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self.project(module, self.pool(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """A module output pooled to the capture grid, (B, width); no randomness, so it may run inside torch.func
        transforms (a gradient pass can capture features from its own forward)."""
        g = self.capture.pooling_grid
        return F.adaptive_avg_pool2d(x.float(), (g, g)).flatten(1) if x.dim() == 4 else x.float().flatten(1)

    def project(self, module: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features through the module's fixed random projection (when ``projection_dim``)."""
        if self.capture.projection_dim:
            proj = self._projections.get(module)
            if proj is None:
                gen = torch.Generator().manual_seed(self.capture.seed + 7919 * (list(self._modules).index(module) + 1))
                proj = torch.randn(pooled.shape[1], self.capture.projection_dim, generator=gen)
                proj = (proj / self.capture.projection_dim ** 0.5).to(pooled.device)
                self._projections[module] = proj
            pooled = pooled @ proj
        return pooled

    def feature_dims(self) -> Dict[str, int]:
        """Width of each module's stored feature (runs one dummy forward the first time)."""
        if self._dims is None:
            dummy = np.zeros((1, self.components.resolution, self.components.resolution, 3), np.uint8)
            feats = self.extract(dummy, [""], [0])
            self._dims = {m: int(v.shape[-1]) for m, v in feats.features.items()}
        return self._dims

    # -- extraction ----------------------------------------------------------------
    def noise_for(self, item_seeds: Sequence[int]) -> torch.Tensor:
        """(N, T, *latent) fixed noise, one draw per (item, timestep)."""
        T = len(self.capture.timesteps)
        seeds = [self.capture.seed * 1_000_003 + int(s) * 131 + k for s in item_seeds for k in range(T)]
        noise = seeded_noise(seeds, self.components.latent_shape)
        return noise.view(len(item_seeds), T, *self.components.latent_shape)

    def hook(self) -> tuple[Dict[str, torch.Tensor], list]:
        """Forward hooks that keep each captured module's latest output: (that dict, handles to remove)."""
        captured: Dict[str, torch.Tensor] = {}
        handles = [mod.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, _first(out)))
                   for name, mod in self._modules.items()]
        return captured, handles

    @property
    def modules(self) -> List[str]:
        return list(self._modules)

    @torch.no_grad()
    def extract(self, images, captions: Sequence[str], item_seeds: Sequence[int]) -> Features:
        """images uint8 (N, H, W, 3), an array or a lazy array-like (read one batch at a time); one seed
        per item fixes its noise. Restores the UNet's mode and RNG."""
        comps, cap = self.components, self.capture
        unet = comps.unet
        captured, handles = self.hook()
        N, T, C = len(images), len(cap.timesteps), len(cap.conditions)
        feats: Dict[str, List[torch.Tensor]] = {m: [] for m in self._modules}
        losses: List[torch.Tensor] = []
        try:
            with eval_mode(unet), torch.random.fork_rng(devices=[]):
                null = comps.encode_prompts([""])
                timesteps = torch.tensor(cap.timesteps, dtype=torch.long, device=comps.device)
                for start in range(0, N, max(1, cap.batch_size // T)):
                    sl = slice(start, min(N, start + max(1, cap.batch_size // T)))
                    n = sl.stop - sl.start
                    latents = comps.to_latents(uint8_to_pixels(images[sl]).to(comps.device))
                    lat = latents.repeat_interleave(T, 0)
                    noise = self.noise_for(item_seeds[sl]).to(comps.device).flatten(0, 1)
                    t = timesteps.repeat(n)
                    x_t = noised(comps.noise_scheduler, lat, noise, t)
                    target = training_target(comps.noise_scheduler, lat, noise, t)
                    per_cond_f = {m: [] for m in self._modules}
                    per_cond_l = []
                    for cond in cap.conditions:
                        if cond == "null":
                            hidden = null.expand(n * T)
                        else:
                            hidden = comps.encode_prompts(list(captions[sl])).repeat_interleave(T, 0)
                        pred = comps.predict(x_t, t, hidden)
                        per_cond_l.append(per_sample_mse(pred, target).view(n, T))
                        for m in self._modules:
                            per_cond_f[m].append(self._pool(m, captured[m]).view(n, T, -1))
                    losses.append(torch.stack(per_cond_l, 1))
                    for m in self._modules:
                        feats[m].append(torch.stack(per_cond_f[m], 1))
        finally:
            for h in handles:
                h.remove()
        if N == 0:
            dims = self.feature_dims()  # a rank with no items still returns correctly shaped arrays
            return Features({m: np.zeros((0, C, T, dims.get(m, 0)), np.float32) for m in self._modules},
                            np.zeros((0, C, T), np.float32))
        return Features({m: torch.cat(v).cpu().numpy().astype(np.float32) for m, v in feats.items()},
                        torch.cat(losses).cpu().numpy().astype(np.float32))
