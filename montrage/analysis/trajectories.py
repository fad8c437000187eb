"""Trajectories and training-dynamics features, streamed from the run store.

For training image i and query j, at checkpoints k = 0..K, per module m and fixed timestep t:

- ``sim``  (1 + cos(z r_i(k), z q_j(k))) / 2: similarity of z-normalised representations at k;
- ``move`` (1 + cos(z Δr_i(k), z Δq_j(k))) / 2 with Δx(k) = x(k) - x(k-1): do they move together?
- ``loss`` (1 + cos(z ΔL_i, z ΔL_j)) / 2 over all (k, t): do their denoising losses fall together?

z-normalisation uses training-set statistics per (module, checkpoint, timestep, feature), so shared
offsets (every image looks like "an image") do not dominate the cosine. Every channel is a batched
matrix product over all pairs; training images stream in chunks, so memory stays bounded.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from montrage.config import CaptureConfig, from_dict
from montrage.errors import ScorerError
from montrage.models.features import QUERY_SEED_OFFSET, FeatureExtractor
from montrage.storage import RunStore
from montrage.storage import schema as S

KINDS = ("sim", "move", "loss")
EPS = 1e-6
# set by montrage.analysis.dask_scoring.scoring_on: stats() and score() delegate to it (dask) when set
SCORE_BACKEND: ContextVar[Optional[Any]] = ContextVar("montrage_score_backend", default=None)


@dataclass(frozen=True)
class Channel:
    kind: str  # sim | move | loss
    module: str = ""
    t: int = -1  # timestep index
    k: int = -1  # checkpoint index

    def label(self) -> str:
        return self.kind if self.kind == "loss" else f"{self.kind}/{self.module}/t{self.t}/k{self.k}"


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
                        item_seeds: Sequence[int], condition: str, upto: int, progress: bool = False) -> QueryTrajectory:
    """Query mode B: fixed images re-encoded under each stored checkpoint's LoRA (as in TracIn)."""
    capture = from_dict(CaptureConfig, store.capture)
    capture.conditions = (condition,)
    feats: Dict[str, List[np.ndarray]] = {m: [] for m in store.modules}
    losses = []
    captions = [p if condition == "caption" else "" for p in prompts]
    extractor = None
    for k in tqdm(range(upto + 1), disable=not progress, desc="re-encode queries", leave=False):
        comps = components_at(k)
        extractor = extractor or FeatureExtractor(comps, capture)
        out = extractor.extract(images, captions, [QUERY_SEED_OFFSET + int(s) for s in item_seeds])
        for m in store.modules:
            feats[m].append(out.features[m][:, 0])
        losses.append(out.losses[:, 0])
    return QueryTrajectory({m: np.stack(v) for m, v in feats.items()}, np.stack(losses))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


class Dynamics:
    """Dynamics channels between training images (from the store) and one set of queries."""

    def __init__(self, store: RunStore, condition: str = "null", upto: Optional[int] = None,
                 kinds: Sequence[str] = KINDS, chunk: int = 4096, progress: bool = False) -> None:
        if condition not in store.conditions:
            raise ScorerError(f"condition {condition!r} was not captured in this run; captured: {store.conditions}")
        self.store = store
        self.cidx = store.conditions.index(condition)
        self.K = (store.n_checkpoints - 1 if upto is None else upto) + 1
        self.modules = store.modules
        self.T = len(store.timesteps)
        self.N = len(store.train_meta[S.ATTR_FILE_NAMES])
        self.chunk = chunk
        self.progress = progress
        self.channels: List[Channel] = []
        for m in self.modules:  # grouped by (kind, module, k) so each pair product is computed once
            for k in range(self.K):
                for kind in ("sim", "move"):
                    if kind in kinds and (kind == "sim" or k >= 1):
                        self.channels += [Channel(kind, m, t, k) for t in range(self.T)]
        if "loss" in kinds and self.K >= 2:
            self.channels.append(Channel("loss"))
        if not self.channels:
            raise ScorerError(f"no dynamics channel of kinds {list(kinds)} with {self.K} checkpoint(s); "
                              "'move' and 'loss' need at least two checkpoints")
        self._stats: Optional[dict] = None

    # ------------------------------------------------------------------ streaming reads
    def chunks(self) -> Iterator[slice]:
        for start in range(0, self.N, self.chunk):
            yield slice(start, min(self.N, start + self.chunk))

    def _block(self, m: str, k: int, sl) -> np.ndarray:
        arr = self.store.array(S.feature_path(S.TRAIN, m))
        out = arr[k, sl, self.cidx] if isinstance(sl, slice) else arr.oindex[k, sl, self.cidx]
        return np.asarray(out, dtype=np.float32)

    def _loss_block(self, sl) -> np.ndarray:
        arr = self.store.array(f"{S.TRAIN}/{S.LOSS}")
        out = arr[: self.K, sl, self.cidx] if isinstance(sl, slice) else arr.oindex[: self.K, sl, self.cidx]
        return np.asarray(out, dtype=np.float32)

    def stats(self) -> dict:
        """Training-set statistics, two streaming passes: mean/std per (kind, module, checkpoint, timestep,
        feature), then the norm of every training row's z-vector, so scoring can work on raw blocks."""
        if self._stats is not None:
            return self._stats
        if SCORE_BACKEND.get() is not None:
            self._stats = SCORE_BACKEND.get().stats(self)
            return self._stats
        acc: Dict[Tuple[str, str, int], List] = {}
        loss_acc: List[np.ndarray] = []
        for sl in self.chunks():
            for m, k, kind, v in self._walk(sl):
                v = v.astype(np.float64)
                s = acc.setdefault((kind, m, k), [0.0, 0.0, 0])
                s[0] = s[0] + np.nansum(v, 0)
                s[1] = s[1] + np.nansum(v ** 2, 0)
                s[2] += v.shape[0]
            if self.K >= 2:
                dl = np.diff(self._loss_block(sl).astype(np.float64), axis=0)  # (K-1, n, T)
                loss_acc.append(dl.transpose(1, 0, 2).reshape(dl.shape[1], -1))
        stats: dict = {}
        for key, (s1, s2, n) in acc.items():
            mean = s1 / n
            std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
            stats[key] = (mean.astype(np.float32), (std + EPS).astype(np.float32))
        if loss_acc:
            allv = np.nan_to_num(np.concatenate(loss_acc))
            stats["loss"] = (allv.mean(0).astype(np.float32), (allv.std(0) + EPS).astype(np.float32))
        norms = {key: np.empty((self.N, self.T), np.float32) for key in acc}
        for sl in self.chunks():
            for m, k, kind, v in self._walk(sl):
                mean, std = stats[(kind, m, k)]
                norms[(kind, m, k)][sl] = np.linalg.norm((v - mean) / std, axis=-1) + EPS
        stats["norms"] = norms
        self._stats = stats
        return stats

    def _walk(self, sl) -> Iterator[Tuple[str, int, str, np.ndarray]]:
        """(module, k, kind, block) for the kinds in use: raw blocks and their changes."""
        kinds = {c.kind for c in self.channels}
        for m in self.modules:
            prev = None
            for k in range(self.K):
                x = self._block(m, k, sl)
                if "sim" in kinds:
                    yield m, k, "sim", x
                if "move" in kinds and prev is not None:
                    yield m, k, "move", x - prev
                prev = x

    # ------------------------------------------------------------------ queries
    def query_normalised(self, q: QueryTrajectory) -> Dict[Tuple[str, str, int], Tuple[np.ndarray, np.ndarray]]:
        """Per (kind, module, k): A = unit(z_q) / std (Q, T, F) and c = A . mean (Q, T).

        With them cos(z_q, z_r) = (A . r - c) / ||z_r|| for a raw training row r: the normalisation is
        folded into the queries, and training blocks go straight into the matrix product.
        """
        stats = self.stats()
        out = {}
        kinds = {c.kind for c in self.channels}
        for m in self.modules:
            if q.features[m].shape[0] < self.K:
                raise ScorerError(f"query trajectory has {q.features[m].shape[0]} checkpoints, need {self.K}")
            for k in range(self.K):
                for kind in ("sim", "move"):
                    if kind not in kinds or (kind == "move" and k == 0):
                        continue
                    x = q.features[m][k] if kind == "sim" else q.features[m][k] - q.features[m][k - 1]
                    mean, std = stats[(kind, m, k)]
                    a = _unit(np.nan_to_num((x - mean) / std)) / std
                    out[(kind, m, k)] = (a.astype(np.float32), np.einsum("qtf,tf->qt", a, mean))
        if "loss" in kinds:
            dl = np.diff(q.losses[: self.K], axis=0).transpose(1, 0, 2).reshape(q.n, -1)
            mean, std = stats["loss"]
            out[("loss", "", -1)] = (_unit(np.nan_to_num((dl - mean) / std)), None)
        return out

    # ------------------------------------------------------------------ channels and scores
    def _chunk_weighted(self, qn: dict, sl, weights: np.ndarray) -> np.ndarray:
        """Weighted sum of channels for training rows ``sl``.

        For channel (kind, module, k, t) with weight w: w (1 + (A . r - c) / ||z_r||) / 2, where the raw
        training rows r go straight into one GEMM (bias c fused) and the per-row scale w / 2 / ||z_r|| is one
        fused multiply-add on the (queries x rows) result, cheaper than touching the rows' features again.
        """
        stats = self.stats()
        Q = next(iter(qn.values()))[0].shape[0]
        n = sl.stop - sl.start if isinstance(sl, slice) else len(sl)
        acc_t = torch.zeros((Q, n), dtype=torch.float32)
        acc = acc_t.numpy()  # shares memory with acc_t
        const = 0.0
        index = {c: i for i, c in enumerate(self.channels)}
        w_of = lambda kind, m, k: np.array([weights[index[Channel(kind, m, t, k)]]  # noqa: E731
                                            if Channel(kind, m, t, k) in index else 0.0 for t in range(self.T)],
                                           np.float32)
        for m in self.modules:
            prev = None
            for k in range(self.K):
                ws, wm = w_of("sim", m, k), w_of("move", m, k)
                w_next = w_of("move", m, k + 1) if k + 1 < self.K else np.zeros(self.T, np.float32)
                if not (ws.any() or wm.any() or w_next.any()):
                    prev = None
                    continue
                x = self._block(m, k, sl)
                for kind, w in (("sim", ws), ("move", wm)):
                    if not w.any() or (kind == "move" and prev is None):
                        continue
                    block = torch.from_numpy(x if kind == "sim" else x - prev)  # (n, T, F), no copy for sim
                    a, c = qn[(kind, m, k)]
                    inv = torch.from_numpy(1.0 / stats["norms"][(kind, m, k)][sl])  # (n, T)
                    for t in np.flatnonzero(w):
                        # (A_t r_t - c_t), then scaled per training row by w_t / 2 / ||z||: one GEMM, one fused pass
                        dots = torch.addmm(torch.from_numpy(-c[:, t, None].astype(np.float32)),
                                           torch.from_numpy(a[:, t]), block[:, t].T)
                        acc_t.addcmul_(dots, inv[:, t][None, :], value=float(w[t]) / 2.0)
                        const += float(w[t]) / 2.0
                prev = x
        if Channel("loss") in index and weights[index[Channel("loss")]] != 0:
            w = float(weights[index[Channel("loss")]])
            dl = np.diff(self._loss_block(sl), axis=0).transpose(1, 0, 2).reshape(n, -1)
            mean, std = stats["loss"]
            acc += (w / 2.0) * (qn[("loss", "", -1)][0] @ _unit(np.nan_to_num((dl - mean) / std)).T)
            const += w / 2.0
        acc += np.float32(const)
        return np.nan_to_num(acc, copy=False)

    def _chunk_channels(self, qn: dict, sl, weights: Optional[np.ndarray]) -> np.ndarray:
        """Channel values for training rows ``sl``: all of them (C, Q, n) or their weighted sum (Q, n)."""
        stats = self.stats()
        Q = next(iter(qn.values()))[0].shape[0]
        n = sl.stop - sl.start if isinstance(sl, slice) else len(sl)
        full = np.empty((len(self.channels), Q, n), np.float32) if weights is None else None
        acc = np.zeros((Q, n), np.float32) if weights is not None else None
        index = {c: i for i, c in enumerate(self.channels)}
        wanted = lambda c: c in index and (weights is None or weights[index[c]] != 0)  # noqa: E731

        def emit(ch: Channel, cos: np.ndarray) -> None:
            nonlocal acc
            val = (1.0 + np.nan_to_num(cos)) / 2.0
            if full is not None:
                full[index[ch]] = val
            else:
                acc += np.float32(weights[index[ch]]) * val

        for m in self.modules:
            prev = None
            for k in range(self.K):
                need_sim = any(wanted(Channel("sim", m, t, k)) for t in range(self.T))
                need_move = k >= 1 and any(wanted(Channel("move", m, t, k)) for t in range(self.T))
                need_next = k + 1 < self.K and any(wanted(Channel("move", m, t, k + 1)) for t in range(self.T))
                if not (need_sim or need_move or need_next):
                    prev = None
                    continue
                x = self._block(m, k, sl)
                for kind, block, ok in (("sim", x, need_sim), ("move", None if prev is None else x - prev, need_move)):
                    if not ok or block is None:
                        continue
                    a, c = qn[(kind, m, k)]
                    norms = stats["norms"][(kind, m, k)][sl]  # (n, T)
                    for t in range(self.T):
                        ch = Channel(kind, m, t, k)
                        if wanted(ch):
                            emit(ch, (a[:, t] @ block[:, t].T - c[:, t, None]) / norms[None, :, t])
                prev = x
        if Channel("loss") in index and wanted(Channel("loss")):
            dl = np.diff(self._loss_block(sl), axis=0).transpose(1, 0, 2).reshape(n, -1)
            mean, std = stats["loss"]
            emit(Channel("loss"), qn[("loss", "", -1)][0] @ _unit(np.nan_to_num((dl - mean) / std)).T)
        return full if full is not None else acc

    def channel_tensor(self, q: QueryTrajectory, train_index: Optional[np.ndarray] = None) -> np.ndarray:
        """All channels, (n_channels, Q, N or len(train_index)): for fitting the attribution model."""
        qn = self.query_normalised(q)
        if train_index is not None:
            return self._chunk_channels(qn, np.asarray(train_index), None)
        return np.concatenate([self._chunk_channels(qn, sl, None) for sl in self.chunks()], axis=2)

    def score(self, q: QueryTrajectory, weights: np.ndarray) -> np.ndarray:
        """Weighted sum of channels, (Q, N), streamed over training-image chunks."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self.channels),):
            raise ScorerError(f"{weights.shape[0]} channel weights for {len(self.channels)} channels")
        if SCORE_BACKEND.get() is not None:
            return SCORE_BACKEND.get().score(self, q, weights)
        qn = self.query_normalised(q)
        parts = [self._chunk_weighted(qn, sl, weights)
                 for sl in tqdm(list(self.chunks()), disable=not self.progress, desc="score", leave=False)]
        return np.concatenate(parts, axis=1)


def anchor_trajectory(store: RunStore, condition: str, upto: int) -> QueryTrajectory:
    """Training images recorded under a second noise draw at every checkpoint (fixed image, moving model)."""
    c = store.conditions.index(condition)
    feats = {m: np.asarray(store.array(S.feature_path(S.ANCHORS, m))[: upto + 1][:, :, c]) for m in store.modules}
    losses = np.asarray(store.array(f"{S.ANCHORS}/{S.LOSS}")[: upto + 1][:, :, c])
    return QueryTrajectory(feats, losses)
