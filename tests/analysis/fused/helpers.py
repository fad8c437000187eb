"""Planted channel values shared by the fused model's tests."""
import numpy as np

from montrage.analysis.fused import kinds as FK

CHANNELS = ("grad/dtrak", "rep/null/move", "pixel")


def planted_values(targets, n, kind, seed):
    """Channel values where exactly one channel carries the identity, and which one depends on the query kind:
    the gradient kernel for prompt-known queries, co-movement for image-only ones; the others are noise."""
    rng = np.random.default_rng(seed)
    informative = "grad/dtrak" if kind == FK.PROMPT else "rep/null/move"
    out = {}
    for c in CHANNELS:
        v = rng.normal(size=(len(targets), n))
        if c == informative:
            v[np.arange(len(targets)), targets] += 5.0
        else:  # a distractor that points at the wrong image
            v[np.arange(len(targets)), (np.asarray(targets) + 1) % n] += 1.5
        out[c] = v.astype(np.float32)
    return out
