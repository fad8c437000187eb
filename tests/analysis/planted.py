"""A run store with planted structure whose correct attribution is known by construction.

Training image i has a static signature s_i (large, random) and moves along its own direction d_i
at every checkpoint. Probe j is built from training image target[j]: same movement d, but its own,
unrelated static part. So the *changes* identify the source; the final representation mostly does not.
Concept c images share a concept direction in their movement, so between-concept structure is planted too.
"""
from __future__ import annotations

import numpy as np

from montrage.storage import CheckpointRecord, RunStore, StoreDims
from montrage.storage import schema as S

MODULES = ["mid_block"]


def make_planted_store(path, n_concepts=3, per_concept=6, K=5, F=32, T=2, static=15.0, seed=0):
    rng = np.random.default_rng(seed)
    N = n_concepts * per_concept
    concepts = [f"c{c}" for c in range(n_concepts) for _ in range(per_concept)]
    concept_dir = rng.normal(size=(n_concepts, T, F))
    move = np.stack([concept_dir[i // per_concept] + 0.8 * rng.normal(size=(T, F)) for i in range(N)])  # (N, T, F)
    static_train = static * rng.normal(size=(N, T, F))
    targets = np.arange(N)  # probe j comes from training image j
    static_probe = static * rng.normal(size=(N, T, F))
    anchors = np.arange(0, N, 2)
    dims = StoreDims(n_train=N, n_probes=N, n_anchors=len(anchors), n_conditions=1, n_timesteps=T,
                     feature_dims={m: F for m in MODULES}, image_shape=(4, 4, 3), lora_names=["w"], lora_shapes=[[1]])
    cfg = {"capture": {"modules": MODULES, "conditions": ["null"], "timesteps": list(range(T)), "pooling_grid": 1},
           "base": "none"}
    st = RunStore.create_or_resume(path, cfg, {"planted": seed}, dims,
                                   {S.ATTR_FILE_NAMES: [f"img{i}.png" for i in range(N)], S.ATTR_CONCEPTS: concepts,
                                    S.ATTR_CAPTIONS: [""] * N},
                                   {S.ATTR_PROMPTS: [f"probe {j}" for j in range(N)], S.ATTR_SEEDS: list(range(N)),
                                    S.ATTR_CONCEPTS: [concepts[t] for t in targets], S.ATTR_KINDS: ["between"] * N,
                                    S.ATTR_META: [{}] * N},
                                   anchors)
    for k in range(K):
        walk = k * move
        train = static_train + walk + 0.05 * rng.normal(size=(N, T, F))
        probe = static_probe + walk[targets] + 0.05 * rng.normal(size=(N, T, F))
        anchor = static_train[anchors] + walk[anchors] + 0.3 * rng.normal(size=(len(anchors), T, F))
        loss = lambda n: np.abs(1.0 - 0.1 * k + 0.01 * rng.normal(size=(n, 1, T)))
        st.append(CheckpointRecord(
            step=10 * k, wall_time=float(k), train_loss=1.0,
            features={S.TRAIN: {MODULES[0]: train[:, None]}, S.PROBES: {MODULES[0]: probe[:, None]},
                      S.ANCHORS: {MODULES[0]: anchor[:, None]}},
            losses={S.TRAIN: loss(N), S.PROBES: loss(N), S.ANCHORS: loss(len(anchors))},
            probe_images=np.zeros((N, 4, 4, 3), np.uint8), lora=np.zeros(1, np.float32)))
    st.close()
    return targets, concepts
