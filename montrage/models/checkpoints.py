"""Rebuild the fine-tuned model of a recorded run at any stored checkpoint.

Analysis needs the model only for methods that re-encode queries or take gradients; the store keeps
the LoRA adapter weights of every checkpoint for exactly this, and the run config the base model's
location and identity (a hash of its weights) and the LoRA config read from the trained model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from montrage.errors import ModelLoadError
from montrage.models.components import DiffusionComponents
from montrage.models.loading import EMBEDDED, base_identity, load_base
from montrage.models.lora import add_lora_from_config, copy_lora_state, load_lora_state, lora_slots, lora_state

log = logging.getLogger(__name__)


def _base_location(run_config: dict, base_override: Optional[str]) -> str:
    base = base_override or run_config.get("base")
    if base == EMBEDDED:
        return base
    if not base or not Path(str(base)).expanduser().is_dir():
        recorded = run_config.get("base_name_or_path") or run_config.get("base")
        what = f"--base {base_override}" if base_override else f"the run's base model ({recorded!r})"
        raise ModelLoadError(f"{what} is not a local diffusers folder here, so the run's model cannot be rebuilt; "
                             "pass the base model folder the run was trained on: `montrage attribute|compare|report RUN "
                             "--base PATH` (options={'base': PATH} in Python)")
    return str(Path(str(base)).expanduser())


class RunModel:
    """The base model of a run with its LoRA adapter, switchable between stored checkpoints."""

    def __init__(self, run_config: dict, device: str = "cpu", base_override: Optional[str] = None) -> None:
        base = _base_location(run_config, base_override)
        self.components: DiffusionComponents = load_base(base, device=device)
        recorded = run_config.get("base_identity")
        if recorded:
            found = base_identity(self.components.unet)
            if found != recorded:
                msg = (f"the base model at {base} is not the one this run was trained on (weights hash {found} vs "
                       f"recorded {recorded})")
                if not base_override:
                    raise ModelLoadError(msg + "; pass the right folder with `montrage attribute RUN --base PATH`")
                log.warning("%s; using it because it was passed explicitly", msg)
        if run_config.get("resolution"):
            self.components.resolution = int(run_config["resolution"])
        add_lora_from_config(self.components.unet, run_config.get("lora") or {})
        self.components.unet.eval()
        self._shapes = {k: tuple(v.shape) for k, v in lora_state(self.components.unet).items()}
        slots = lora_slots(self.components.unet)
        self._slots = slots if set(slots) == set(self._shapes) else None  # else: peft's loader (unusual layouts)
        self.current: Optional[int] = None

    def set_weights(self, weights: Dict[str, np.ndarray], tag: Optional[int] = None) -> DiffusionComponents:
        """Load LoRA ``weights`` (copied in place) unless ``tag`` names the ones loaded last (e.g. a checkpoint
        index: the weights are then not read or copied again); ``tag=None`` always loads."""
        if tag is None or tag != self.current:
            got = {k: tuple(np.shape(v)) for k, v in weights.items()}
            if got != self._shapes:
                diff = sorted(set(got.items()) ^ set(self._shapes.items()))[:3]
                raise ModelLoadError(f"the stored LoRA weights do not fit the adapter rebuilt from the run config "
                                     f"({len(got)} stored vs {len(self._shapes)} expected tensors; e.g. {diff}); "
                                     "the run config's 'lora' entry does not describe the trained adapter")
            self.current = None  # a failed load leaves no stale tag
            if self._slots is not None:
                copy_lora_state(self._slots, weights)
            else:
                load_lora_state(self.components.unet, weights)
            self.current = tag
        return self.components
