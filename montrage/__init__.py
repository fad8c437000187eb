"""montrage: attributable LoRA fine-tuning of diffusion models (watch the training, attribute generations).

The common entry points are importable from the package (loaded on first use, so ``import montrage`` stays
light)::

    from montrage import TrainingMonitor, DiffusionComponents, CaptureConfig, load_base, load_imagefolder, attribute
"""
from __future__ import annotations

import importlib
from typing import Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("montrage")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0+source"

_EXPORTS = {
    "TrainingMonitor": "montrage.callbacks.monitor",
    "DiffusionComponents": "montrage.models.components",
    "CaptureConfig": "montrage.config",
    "TrainConfig": "montrage.config",
    "LoraSettings": "montrage.config",
    "load_base": "montrage.models.loading",
    "load_imagefolder": "montrage.data.imagefolder",
    "add_lora": "montrage.models.lora",
    "attribute": "montrage.analysis.attribute",
    "RunStore": "montrage.storage.store",
    "train": "montrage.training",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'montrage' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
