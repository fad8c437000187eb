"""LoRA adapters on the UNet (peft), and flat views of their weights for the store."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from montrage.config import LoraSettings
from montrage.errors import ConfigError

ADAPTER = "default"


def add_lora(unet: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> List[torch.nn.Parameter]:
    """Attach a LoRA adapter; returns its trainable parameters. The init is seeded (not global RNG)."""
    names = [n for n, _ in unet.named_modules()]
    for target in settings.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"LoRA target module {target!r} matches nothing in the UNet; "
                              "give suffixes of module names such as to_q, to_v, conv1")
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                     target_modules=list(settings.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(cfg, adapter_name=ADAPTER)
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state(unet: torch.nn.Module, state: Dict[str, torch.Tensor | np.ndarray]) -> None:
    tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state.items()}
    set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER)


def flatten(state: Dict[str, torch.Tensor]) -> Tuple[np.ndarray, List[str], List[List[int]]]:
    names = sorted(state)
    flat = np.concatenate([state[n].reshape(-1).numpy() for n in names]) if names else np.zeros(0, np.float32)
    return flat.astype(np.float32), names, [list(state[n].shape) for n in names]
