"""Build the query sets to attribute: the run's probes, or a folder of arbitrary images."""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from montrage.analysis.base import QuerySet
from montrage.errors import DataError
from montrage.storage import RunStore
from montrage.storage import schema as S

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def probe_queries(store: RunStore, checkpoint: int = -1, indices: Optional[Sequence[int]] = None) -> QuerySet:
    """The run's probes; images are the generations recorded at ``checkpoint`` (default: final)."""
    meta = store.probe_meta
    n = len(meta[S.ATTR_PROMPTS])
    idx = list(range(n)) if indices is None else list(indices)
    images = store.probe_images(checkpoint)[idx]
    return QuerySet(ids=[f"probe-{i}" for i in idx], images=images,
                    prompts=[meta[S.ATTR_PROMPTS][i] for i in idx], seeds=[int(meta[S.ATTR_SEEDS][i]) for i in idx],
                    item_seeds=[i for i in idx], probe_indices=idx,
                    concepts=[meta[S.ATTR_CONCEPTS][i] for i in idx],
                    meta=[{"kind": meta[S.ATTR_KINDS][i], **meta[S.ATTR_META][i]} for i in idx])


def image_queries(folder: str | Path, resolution: int, prompt: str = "") -> QuerySet:
    """Every image file in ``folder`` (sorted), converted to RGB at the run's resolution."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--images {folder}: not a folder; give a folder of image files")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--images {folder}: no image files ({sorted(IMAGE_SUFFIXES)}) in it")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB").resize((resolution, resolution), Image.LANCZOS)))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"--images: cannot read image {f}: {exc}; remove or re-save it") from exc
    # a stable seed per file name keeps the featurization noise of an image the same across calls
    seeds = [zlib.crc32(f.name.encode()) % 1_000_000 for f in files]
    return QuerySet(ids=[f.name for f in files], images=np.stack(images), prompts=[prompt] * len(files),
                    seeds=[None] * len(files), item_seeds=seeds, concepts=[""] * len(files),
                    meta=[{"file": str(f)} for f in files])


def training_queries(store: RunStore, images: np.ndarray, indices: Sequence[int]) -> QuerySet:
    """Training images used as queries (a second noise draw): the attribution model's supervision."""
    meta = store.train_meta
    idx = list(indices)
    return QuerySet(ids=[f"train-{i}" for i in idx], images=images, prompts=[meta[S.ATTR_CAPTIONS][i] for i in idx],
                    seeds=[None] * len(idx), item_seeds=[500_000 + i for i in idx],
                    concepts=[meta[S.ATTR_CONCEPTS][i] for i in idx])
