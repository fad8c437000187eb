"""Rebuild the fine-tuned model of a recorded run at any stored checkpoint.

Analysis needs the model only for methods that re-encode queries or take gradients; the store keeps
the LoRA adapter weights of every checkpoint for exactly this.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from montrage.config import LoraSettings, from_dict
from montrage.models.components import DiffusionComponents
from montrage.models.loading import load_base
from montrage.models.lora import add_lora, load_lora_state


class RunModel:
    """The base model of a run with its LoRA adapter, switchable between stored checkpoints."""

    def __init__(self, run_config: dict, device: str = "cpu", base_override: Optional[str] = None) -> None:
        self.components: DiffusionComponents = load_base(base_override or run_config["base"], device=device)
        if run_config.get("resolution"):
            self.components.resolution = int(run_config["resolution"])
        settings = from_dict(LoraSettings, run_config.get("lora") or {})
        add_lora(self.components.unet, settings)
        self.components.unet.eval()
        self.current: Optional[int] = None

    def set_weights(self, weights: Dict[str, np.ndarray], tag: Optional[int] = None) -> DiffusionComponents:
        if tag is None or tag != self.current:
            load_lora_state(self.components.unet, weights)
            self.current = tag
        return self.components
