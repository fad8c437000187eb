"""Probe generations: fixed prompts and seeds sampled at each checkpoint, then featurized."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from montrage.config import CaptureConfig
from montrage.data.probes import Probe
from montrage.models.components import DiffusionComponents
from montrage.models.features import PROBE_SEED_OFFSET, FeatureExtractor, Features
from montrage.models.sampling import generate


def probe_item_seeds(indices: Sequence[int]) -> List[int]:
    return [PROBE_SEED_OFFSET + int(i) for i in indices]


def run_probes(components: DiffusionComponents, extractor: FeatureExtractor, probes: Sequence[Probe],
               indices: Sequence[int], capture: CaptureConfig) -> Tuple[np.ndarray, Features]:
    """Generate probes ``indices`` and featurize the generations exactly as training images are."""
    chosen = [probes[i] for i in indices]
    images = generate(components, [p.prompt for p in chosen], [p.seed for p in chosen],
                      num_steps=capture.probe_steps, guidance_scale=capture.guidance_scale,
                      sampler=capture.probe_sampler)
    feats = extractor.extract(images, [p.prompt for p in chosen], probe_item_seeds(indices))
    return images, feats
