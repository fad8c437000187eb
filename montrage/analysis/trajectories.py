"""Trajectories and training-dynamics features, streamed from the run store.

For training image i and query j, at checkpoints k = 0..K, per module m and fixed timestep t:

- ``sim``  (1 + cos(z r_i(k), z q_j(k))) / 2: similarity of z-normalised representations at k;
- ``move`` (1 + cos(z Δr_i(k), z Δq_j(k))) / 2 with Δx(k) = x(k) - x(k-1): do they move together?
- ``loss`` (1 + cos(z ΔL_i, z ΔL_j)) / 2 over all (k, t): do their denoising losses fall together?

z-normalisation uses training-set statistics per (module, checkpoint, timestep, feature), so shared
offsets (every image looks like "an image") do not dominate the cosine. The arithmetic, the NaN rule
and the std floor live in ONE place, :mod:`montrage.analysis.kernel`, whose block functions this
module runs over chunks of training images in-process and :mod:`montrage.analysis.dask_scoring`
runs as dask tasks.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from montrage.analysis import kernel as KN
from montrage.analysis.kernel import KINDS, Channel  # noqa: F401  (re-exported)
from montrage.config import CaptureConfig, from_dict
from montrage.errors import ScorerError
from montrage.models.features import QUERY_SEED_OFFSET, FeatureExtractor
from montrage.storage import RunStore
from montrage.storage import schema as S

RESIDENT_BYTES = 256 * 2 ** 20  # training features of one condition kept in memory by a Dynamics up to this size
# set by montrage.analysis.dask_scoring.scoring_on: stats() and score() delegate to it (dask) when set
SCORE_BACKEND: ContextVar[Optional[Any]] = ContextVar("montrage_score_backend", default=None)


@dataclass
class QueryTrajectory:
    """Query representations under checkpoints 0..K-1 (one condition)."""

    features: Dict[str, np.ndarray]  # module -> (K, Q, T, F)
    losses: np.ndarray  # (K, Q, T)

    @property
    def n(self) -> int:
        return self.losses.shape[1]


def probe_trajectory(store: RunStore, condition: str, upto: int, probe_indices: Sequence[int]) -> QueryTrajectory:
    """Query mode A: the probe generated AT each checkpoint, as recorded."""
    c = store.conditions.index(condition)
    idx = list(probe_indices)
    feats = {m: store.array(S.feature_path(S.PROBES, m))[: upto + 1][:, idx, c] for m in store.modules}
    losses = store.array(f"{S.PROBES}/{S.LOSS}")[: upto + 1][:, idx, c]
    return QueryTrajectory(feats, losses)


def reencode_trajectory(store: RunStore, components_at, images: np.ndarray, prompts: Sequence[str],
                        item_seeds: Sequence[int], condition: str, upto: int, progress: bool = False,
                        only: Optional[Sequence[int]] = None) -> QueryTrajectory:
    """Query mode B: fixed images re-encoded under each stored checkpoint's LoRA (as in TracIn). ``only``: re-encode
    these checkpoints alone and leave the others NaN (a channel that read them would show it), for scores that use
    the attributed checkpoint only: one pass through the model instead of upto + 1."""
    capture = from_dict(CaptureConfig, store.capture)
    capture.conditions = (condition,)
    feats: Dict[str, List[Optional[np.ndarray]]] = {m: [] for m in store.modules}
    losses: List[Optional[np.ndarray]] = []
    captions = [p if condition == "caption" else "" for p in prompts]
    extractor = None
    for k in tqdm(range(upto + 1), disable=not progress, desc="re-encode queries", leave=False):
        if only is not None and k not in only:
            for m in store.modules:
                feats[m].append(None)
            losses.append(None)
            continue
        comps = components_at(k)
        extractor = extractor or FeatureExtractor(comps, capture)
        out = extractor.extract(images, captions, [QUERY_SEED_OFFSET + int(s) for s in item_seeds])
        for m in store.modules:
            feats[m].append(out.features[m][:, 0])
        losses.append(out.losses[:, 0])
    return QueryTrajectory({m: _stack_filled(v) for m, v in feats.items()}, _stack_filled(losses))


def one_checkpoint_trajectory(features: Dict[str, np.ndarray], losses: np.ndarray, k: int, upto: int
                              ) -> QueryTrajectory:
    """A trajectory known at checkpoint k alone ((Q, T, F) features per module, (Q, T) losses): the others NaN,
    as :func:`reencode_trajectory` with ``only=[k]`` leaves them."""
    at = lambda v: [v if i == k else None for i in range(upto + 1)]  # noqa: E731
    return QueryTrajectory({m: _stack_filled(at(np.asarray(v, np.float32))) for m, v in features.items()},
                           _stack_filled(at(np.asarray(losses, np.float32))))


def _stack_filled(parts: Sequence[Optional[np.ndarray]]) -> np.ndarray:
    """Stack per-checkpoint arrays, checkpoints not encoded (None) as NaN of the encoded ones' shape."""
    like = next(p for p in parts if p is not None)
    return np.stack([p if p is not None else np.full_like(like, np.nan) for p in parts])


class Dynamics:
    """Dynamics channels between training images (from the store) and one set of queries."""

    def __init__(self, store: RunStore, condition: str = "null", upto: Optional[int] = None,
                 kinds: Sequence[str] = KINDS, chunk: Optional[int] = None, progress: bool = False) -> None:
        if condition not in store.conditions:
            raise ScorerError(f"condition {condition!r} was not captured in this run; captured: {store.conditions}")
        self.store = store
        self.condition = condition
        self.cidx = store.conditions.index(condition)
        self.K = (store.n_checkpoints - 1 if upto is None else upto) + 1
        self.modules = store.modules
        self.T = len(store.timesteps)
        self.N = len(store.train_meta[S.ATTR_FILE_NAMES])
        self.progress = progress
        self.channels: List[Channel] = []
        for m in self.modules:
            for k in range(self.K):
                for kind in ("sim", "move"):
                    if kind in kinds and (kind == "sim" or k >= 1):
                        self.channels += [Channel(kind, m, t, k) for t in range(self.T)]
        if "loss" in kinds and self.K >= 2:
            self.channels.append(Channel("loss"))
        if not self.channels:
            raise ScorerError(f"no dynamics channel of kinds {list(kinds)} with {self.K} checkpoint(s); "
                              "'move' and 'loss' need at least two checkpoints")
        self.layout = KN.Layout.of(self.channels, self.modules, self.K)
        self.chunk = int(chunk) if chunk else self.auto_chunk()
        self._stats: Optional[dict] = None
        self._resident: Optional[tuple] = None  # (features by module, losses) in memory, or () when too big

    # ------------------------------------------------------------------ streaming reads
    def feature_dims(self) -> Dict[str, int]:
        return {m: int(self.store.array(S.feature_path(S.TRAIN, m)).shape[-1]) for m in self.modules}

    def auto_chunk(self, budget_bytes: int = KN.BLOCK_BUDGET_BYTES) -> int:
        """Training images per block: a block holds every checkpoint its channels need, float32."""
        dims = self.feature_dims()
        per_row = 4 * self.T * (sum(len(ks) * dims[m] for m, ks in zip(self.modules, self.layout.ks)) + self.K)
        return KN.rows_per_block(per_row, budget_bytes)

    def chunks(self) -> Iterator[slice]:
        for start in range(0, self.N, self.chunk):
            yield slice(start, min(self.N, start + self.chunk))

    def resident(self) -> Optional[tuple]:
        """This condition's training features and losses of checkpoints 0..K-1, read once and kept when they fit
        in :data:`RESIDENT_BYTES` (None otherwise: blocks are streamed from the store). A fused query scores
        several channel groups, each a pass over the same training features; they are committed data, so a
        Dynamics kept across calls (:data:`montrage.analysis.base.RUN_LEVEL_PREFIXES`) reads them once."""
        if self._resident is None:
            dims = self.feature_dims()
            if 4 * self.N * self.T * self.K * (sum(dims.values()) + 1) > RESIDENT_BYTES:
                self._resident = ()
            else:
                feats = {m: np.asarray(self.store.array(S.feature_path(S.TRAIN, m))[: self.K, :, self.cidx])
                         for m in self.modules}
                loss = np.asarray(self.store.array(f"{S.TRAIN}/{S.LOSS}")[: self.K, :, self.cidx])
                for a in (*feats.values(), loss):
                    a.setflags(write=False)  # blocks are views of these: nothing may write into them
                self._resident = (feats, loss)
        return self._resident or None

    def read_block(self, rows, layout: Optional[KN.Layout] = None) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
        """The raw block of training ``rows`` (a slice or indices) the kernel takes: per module
        (len(ks), n, T, F) as stored (None for a module no channel in use reads), and the (K, n, T) losses when the loss channel is in use."""
        layout = layout or self.layout
        held = self.resident()
        feats = []
        for m, ks in zip(layout.modules, layout.ks):
            if not ks:
                feats.append(None)
            elif held is not None:
                feats.append(held[0][m][_index(ks)][:, rows])
            else:
                feats.append(_read(self.store.array(S.feature_path(S.TRAIN, m)), _index(ks), rows, self.cidx))
        loss = None
        if layout.loss:
            if held is not None:
                loss = held[1][: layout.K][:, rows]
            else:
                loss = _read(self.store.array(f"{S.TRAIN}/{S.LOSS}"), slice(0, layout.K), rows, self.cidx)
        return feats, loss

    def stats(self) -> dict:
        """Training-set statistics {(kind, module, k): (mean, std), ('loss', '', -1): ...}: one streaming pass."""
        if self._stats is not None:
            return self._stats
        if SCORE_BACKEND.get() is not None:
            self._stats = SCORE_BACKEND.get().stats(self)
            return self._stats
        parts = [KN.block_moments(*self.read_block(sl), self.layout) for sl in self.chunks()]
        self._stats = KN.finish_moments(KN.add_moments(parts))
        return self._stats

    # ------------------------------------------------------------------ channels and scores
    def plan(self, q: QueryTrajectory, use: Optional[np.ndarray] = None) -> KN.Plan:
        """The query side of a scoring pass (channels ``use``, default all), built once per call."""
        for m in self.modules:
            if q.features[m].shape[0] < self.K:
                raise ScorerError(f"query trajectory has {q.features[m].shape[0]} checkpoints, need {self.K}")
        layout = self.layout if use is None else KN.Layout.of(
            [c for c, u in zip(self.channels, use) if u], self.modules, self.K)
        return KN.make_plan(self.channels, layout, self.stats(), q.features, q.losses, use)

    def channel_tensor(self, q: QueryTrajectory, train_index: Optional[np.ndarray] = None) -> np.ndarray:
        """All channels, (n_channels, Q, N or len(train_index)): for fitting the attribution model."""
        plan = self.plan(q)
        if train_index is not None:
            return KN.block_channels(*self.read_block(np.asarray(train_index)), plan)
        return np.concatenate([KN.block_channels(*self.read_block(sl), plan) for sl in self.chunks()], axis=2)

    def score(self, q: QueryTrajectory, weights: np.ndarray) -> np.ndarray:
        """Weighted sum of channels, (Q, N), streamed over training-image chunks."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self.channels),):
            raise ScorerError(f"{weights.shape[0]} channel weights for {len(self.channels)} channels")
        if not (weights != 0).any():
            raise ScorerError("every channel weight is zero: nothing to score")
        if SCORE_BACKEND.get() is not None:
            return SCORE_BACKEND.get().score(self, q, weights)
        plan = self.plan(q, weights != 0)
        parts = [KN.block_channels(*self.read_block(sl, plan.layout), plan, weights)
                 for sl in tqdm(list(self.chunks()), disable=not self.progress, desc="score", leave=False)]
        return np.concatenate(parts, axis=1)


def _index(ks: Sequence[int]):
    """A slice when the checkpoints are consecutive (plain Zarr reads are much faster than orthogonal ones)."""
    ks = list(ks)
    return slice(ks[0], ks[-1] + 1) if ks == list(range(ks[0], ks[-1] + 1)) else ks


def _read(arr, ks, rows, c: int) -> np.ndarray:
    if isinstance(ks, slice) and isinstance(rows, slice):
        return np.asarray(arr[ks, rows, c])
    return np.asarray(arr.oindex[ks, rows, c])


def anchor_trajectory(store: RunStore, condition: str, upto: int) -> QueryTrajectory:
    """Training images recorded under a second noise draw at every checkpoint (fixed image, moving model)."""
    c = store.conditions.index(condition)
    feats = {m: np.asarray(store.array(S.feature_path(S.ANCHORS, m))[: upto + 1][:, :, c]) for m in store.modules}
    losses = np.asarray(store.array(f"{S.ANCHORS}/{S.LOSS}")[: upto + 1][:, :, c])
    return QueryTrajectory(feats, losses)
