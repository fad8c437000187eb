"""LoRA adapters on the UNet (peft), and flat views of their weights for the store.

peft is imported where an adapter is built or read (importing it costs seconds: transformers comes with it),
so modules that only import this one (the CLI's error paths, the analysis registry) do not pay for it."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch

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
    from peft import LoraConfig

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                     target_modules=list(settings.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(cfg, adapter_name=ADAPTER)
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


# LoraConfig fields that change the adapted model's forward pass: what a run must record to rebuild it.
RECORDED_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora", "rank_pattern",
                   "alpha_pattern", "lora_dropout", "bias", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
                   "lora_bias", "target_parameters")


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def lora_config_from_model(unet: torch.nn.Module, adapter: str = ADAPTER) -> Dict[str, Any]:
    """The adapter's LoraConfig as the model holds it (``unet.peft_config``), JSON-ready: what was really trained."""
    unet = getattr(unet, "module", unet)  # DDP / accelerate wrappers
    configs = getattr(unet, "peft_config", None) or {}
    if adapter not in configs:
        raise ConfigError(f"the UNet has no LoRA adapter named {adapter!r} (peft_config holds {sorted(configs)}); "
                          "add one with unet.add_adapter(LoraConfig(...)) or montrage.models.lora.add_lora before "
                          "creating the monitor")
    cfg = configs[adapter]
    return {k: _plain(getattr(cfg, k)) for k in RECORDED_FIELDS if hasattr(cfg, k)}


def add_lora_from_config(unet: torch.nn.Module, recorded: Dict[str, Any]) -> None:
    """Attach an adapter rebuilt from :func:`lora_config_from_model` output (weights are loaded afterwards).

    Older run configs with montrage's LoraSettings keys (rank, alpha, target_modules) are accepted too.
    """
    if "r" not in recorded:
        settings = LoraSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items()
                                   if k in ("rank", "alpha", "target_modules")})
        recorded = {"r": settings.rank, "lora_alpha": settings.alpha, "target_modules": list(settings.target_modules)}
    from peft import LoraConfig

    known = {f for f in RECORDED_FIELDS if f in LoraConfig.__dataclass_fields__}
    kwargs = {k: v for k, v in recorded.items() if k in known and v is not None}
    with torch.random.fork_rng(devices=[]):
        unet.add_adapter(LoraConfig(**kwargs), adapter_name=ADAPTER)


def lora_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state(unet: torch.nn.Module, state: Dict[str, torch.Tensor | np.ndarray]) -> None:
    from peft.utils import set_peft_model_state_dict

    tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state.items()}
    set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER)


def lora_slots(unet: torch.nn.Module, adapter: str = ADAPTER) -> Dict[str, torch.nn.Parameter]:
    """The adapter's parameters by the keys :func:`lora_state` (and the store) name them, for in-place loads."""
    return {n.replace(f".{adapter}.", "."): p for n, p in unet.named_parameters() if "lora_" in n}


def copy_lora_state(slots: Dict[str, torch.nn.Parameter], state: Dict[str, torch.Tensor | np.ndarray]) -> None:
    """Load adapter weights in place, one tensor copy each: what :func:`load_lora_state` does for a known layout,
    without peft's walk over the whole model on every call (~70 ms per swap for the embedded UNet, paid at every
    checkpoint switch of an analysis). ``slots`` from :func:`lora_slots`; ``state`` must hold exactly its keys."""
    if set(state) != set(slots):
        raise ConfigError(f"LoRA state has {len(state)} tensors, the adapter {len(slots)}; "
                          f"e.g. unexpected {sorted(set(state) - set(slots))[:2]}, missing {sorted(set(slots) - set(state))[:2]}")
    with torch.no_grad():
        for k, p in slots.items():
            p.copy_(torch.as_tensor(np.asarray(state[k]) if not isinstance(state[k], torch.Tensor) else state[k]))


def flatten(state: Dict[str, torch.Tensor]) -> Tuple[np.ndarray, List[str], List[List[int]]]:
    names = sorted(state)
    flat = np.concatenate([state[n].reshape(-1).numpy() for n in names]) if names else np.zeros(0, np.float32)
    return flat.astype(np.float32), names, [list(state[n].shape) for n in names]
