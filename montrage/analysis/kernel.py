"""The dynamics score's one block kernel: pure numpy, used in-process and by every dask task.

A *block* is a run of training images: per module the raw features of the checkpoints the channels
need, ``(len(ks), n, T, F)``, and the raw losses ``(K, n, T)``. A :class:`Plan` holds the query side
(unit z-vectors), the training statistics and the channel indices; :func:`block_moments` gives a
block's statistics and :func:`block_channels` its channel values or their weighted sum. Because the
in-process path (``trajectories.Dynamics``) and the dask path (``dask_scoring``) call these same
functions on the same blocks, fitting and scoring see the same numbers by construction.

Rules (documented in README "The method"):

* channel value = (1 + cos(z_q, z_r)) / 2 with z = (x - mean) / std, training statistics per
  (kind, module, checkpoint, timestep, feature);
* **NaN rule**: a vector (one query or training row at one (kind, module, k, t), or a loss-change
  vector) with any non-finite entry carries no signal: its unit vector is zero, so every channel it
  enters is exactly :data:`NO_SIGNAL` (0.5, the value of cos = 0), for every pair it is in, in
  fitting and in scoring alike. Such rows are left out of the statistics. A row equal to the mean
  (zero z-vector) gets the same 0.5;
* **std floor**: relative, std_eff = max(std, STD_REL_FLOOR x mean std over that vector's features);
  a vector whose features are all constant uses std 1 (raw differences). An absolute floor (1e-6)
  let a near-constant feature blow up the query's z-vector at one scale and vanish at another.

This module imports only numpy (dask workers need no torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

NO_SIGNAL = 0.5
STD_REL_FLOOR = 1e-2
BLOCK_BUDGET_BYTES = 96 * 2 ** 20  # float32 bytes of raw features one block holds
KINDS = ("sim", "move", "loss")
Key = Tuple[str, str, int]  # (kind, module, checkpoint index); ("loss", "", -1) for the loss channel
LOSS_KEY: Key = ("loss", "", -1)


@dataclass(frozen=True)
class Channel:
    kind: str  # sim | move | loss
    module: str = ""
    t: int = -1  # timestep index
    k: int = -1  # checkpoint index

    def label(self) -> str:
        return self.kind if self.kind == "loss" else f"{self.kind}/{self.module}/t{self.t}/k{self.k}"

    @property
    def key(self) -> Key:
        return LOSS_KEY if self.kind == "loss" else (self.kind, self.module, self.k)


@dataclass(frozen=True)
class Layout:
    """What a block holds: per module the checkpoint indices read, and whether losses are needed."""

    modules: Tuple[str, ...]
    ks: Tuple[Tuple[int, ...], ...]  # per module, sorted checkpoint indices of its feature block
    groups: Tuple[Tuple[Tuple[str, int], ...], ...]  # per module, (kind, k) groups in use
    K: int  # checkpoints 0..K-1 (the loss block holds all of them)
    loss: bool

    @classmethod
    def of(cls, channels: Sequence[Channel], modules: Sequence[str], K: int) -> "Layout":
        ks, groups = [], []
        for m in modules:
            g = sorted({(c.kind, c.k) for c in channels if c.module == m and c.kind != "loss"},
                       key=lambda x: (x[1], x[0]))
            need = sorted({k for kind, k in g} | {k - 1 for kind, k in g if kind == "move"})
            ks.append(tuple(need))
            groups.append(tuple(g))
        return cls(tuple(modules), tuple(ks), tuple(groups), int(K), any(c.kind == "loss" for c in channels))


def group_block(x: np.ndarray, ks: Sequence[int], kind: str, k: int) -> np.ndarray:
    """(n, T, F) float32 vector of group (kind, k) from a block (len(ks), n, T, F): features at k or their change."""
    pos = {kk: i for i, kk in enumerate(ks)}
    cur = np.asarray(x[pos[k]], np.float32)
    return cur if kind == "sim" else cur - np.asarray(x[pos[k - 1]], np.float32)


def loss_block(loss: np.ndarray) -> np.ndarray:
    """(K, n, T) losses -> (n, (K-1) T) float32 changes, checkpoint-major per row."""
    dl = np.diff(np.asarray(loss, np.float32), axis=0)
    return dl.transpose(1, 0, 2).reshape(dl.shape[1], -1)


# ---------------------------------------------------------------------------------------------- statistics
def _moments(v: np.ndarray) -> np.ndarray:
    """(n, ..., F) -> (3, ..., F) float64: count, sum, sum of squares over rows whose vector is finite."""
    valid = np.isfinite(v).all(-1)
    w = np.where(valid[..., None], v, 0.0).astype(np.float64)
    cnt = np.broadcast_to(valid[..., None], v.shape).sum(0).astype(np.float64)
    return np.stack([cnt, w.sum(0), (w * w).sum(0)])


def block_moments(feats: Sequence[Optional[np.ndarray]], loss: Optional[np.ndarray], layout: Layout) -> Dict[Key, np.ndarray]:
    """Statistics of one block: {key: (3, T, F) or (3, D) float64}; add blocks with :func:`add_moments`."""
    out: Dict[Key, np.ndarray] = {}
    for m, x, ks, groups in zip(layout.modules, feats, layout.ks, layout.groups):
        for kind, k in groups:
            out[(kind, m, k)] = _moments(group_block(x, ks, kind, k))
    if layout.loss and layout.K >= 2:
        out[LOSS_KEY] = _moments(loss_block(loss))
    return out


def add_moments(parts: Sequence[Dict[Key, np.ndarray]]) -> Dict[Key, np.ndarray]:
    total: Dict[Key, np.ndarray] = {}
    for p in parts:
        for key, v in p.items():
            total[key] = total[key] + v if key in total else v.copy()
    return total


def floor_std(std: np.ndarray) -> np.ndarray:
    """Relative floor per vector (last axis = features): max(std, STD_REL_FLOOR x mean std); all-constant -> 1."""
    std = np.asarray(std, np.float64)
    scale = std.mean(-1, keepdims=True)
    out = np.maximum(std, STD_REL_FLOOR * scale)
    return np.where(scale > 0, out, 1.0)


def finish_moments(total: Dict[Key, np.ndarray]) -> Dict[Key, Tuple[np.ndarray, np.ndarray]]:
    """{key: (mean, std_eff)} float32 from summed moments; a feature with no finite row gets mean 0."""
    out = {}
    for key, (cnt, s1, s2) in total.items():
        n = np.maximum(cnt, 1.0)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        out[key] = (mean.astype(np.float32), floor_std(std).astype(np.float32))
    return out


def z_rows(v: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(z, 1/||z||) along the last axis, float32; a vector with a non-finite entry (or equal to the mean) gets
    z = 0 and scale 0, i.e. no signal. Cheaper than materialising unit vectors: the scale goes on the dots."""
    z = np.asarray(v, np.float32) - mean
    z /= std
    norm = np.sqrt(np.einsum("...f,...f->...", z, z))
    bad = ~np.isfinite(norm)  # a NaN/inf entry propagates into its vector's norm
    if bad.any():
        z[bad] = 0.0
    inv = np.zeros_like(norm)
    np.divide(1.0, norm, out=inv, where=~bad & (norm > 0))
    return z, inv


def unit_z(v: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Unit z-vectors along the last axis; a vector with a non-finite entry (or equal to the mean) -> zeros."""
    z, inv = z_rows(v, mean, std)
    return z * inv[..., None]


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class Group:
    kind: str
    k: int
    query: np.ndarray  # (Q, T, F) unit z-vectors of the queries, or (Q, D) for the loss
    mean: np.ndarray
    std: np.ndarray
    channel: np.ndarray  # (T,) channel index per timestep (-1: not in use); (1,) for the loss


@dataclass
class Plan:
    """The query side of a scoring pass: everything a block task needs besides the block itself."""

    layout: Layout
    n_queries: int
    n_channels: int
    groups: List[List[Group]] = field(default_factory=list)  # per module
    loss: Optional[Group] = None


def make_plan(channels: Sequence[Channel], layout: Layout, stats: Dict[Key, Tuple[np.ndarray, np.ndarray]],
              q_features: Dict[str, np.ndarray], q_losses: np.ndarray, use: Optional[np.ndarray] = None) -> Plan:
    """Normalise the queries once. q_features: module -> (>=K, Q, T, F); q_losses (>=K, Q, T);
    ``use``: boolean mask of channels to compute (default all)."""
    index = {c: i for i, c in enumerate(channels) if use is None or use[i]}
    Q = int(q_losses.shape[1])
    plan = Plan(layout, Q, len(channels))
    for m, ks, groups in zip(layout.modules, layout.ks, layout.groups):
        xq = np.asarray(q_features[m])[list(ks)]
        per: List[Group] = []
        for kind, k in groups:
            T = xq.shape[2]
            chan = np.array([index.get(Channel(kind, m, t, k), -1) for t in range(T)], np.int64)
            if (chan < 0).all():
                continue
            mean, std = stats[(kind, m, k)]
            per.append(Group(kind, k, unit_z(group_block(xq, ks, kind, k), mean, std), mean, std, chan))
        plan.groups.append(per)
    ci = index.get(Channel("loss"), -1)
    if layout.loss and ci >= 0:
        mean, std = stats[LOSS_KEY]
        plan.loss = Group("loss", -1, unit_z(loss_block(np.asarray(q_losses)[: layout.K]), mean, std), mean, std,
                          np.array([ci], np.int64))
    return plan


def block_channels(feats: Sequence[Optional[np.ndarray]], loss: Optional[np.ndarray], plan: Plan,
                   weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Channel values of one block: (n_channels, Q, n) (channels not in the plan stay NO_SIGNAL), or with
    ``weights`` (n_channels,) their weighted sum (Q, n) float32."""
    n = next(int(a.shape[1]) for a in (loss, *feats) if a is not None)
    Q = plan.n_queries
    full = np.full((plan.n_channels, Q, n), NO_SIGNAL, np.float32) if weights is None else None
    acc = np.zeros((Q, n), np.float32)
    const = 0.0

    def emit(ci: int, dots: np.ndarray) -> None:
        nonlocal acc, const
        if full is not None:
            full[ci] = NO_SIGNAL + 0.5 * dots
        elif weights[ci] != 0:
            acc += np.float32(weights[ci] / 2.0) * dots
            const += float(weights[ci]) / 2.0

    for x, ks, groups in zip(feats, plan.layout.ks, plan.groups):
        for g in groups:
            z, inv = z_rows(group_block(x, ks, g.kind, g.k), g.mean, g.std)  # (n, T, F), (n, T)
            for t, ci in enumerate(g.channel):
                if ci >= 0:
                    emit(int(ci), (g.query[:, t] @ z[:, t].T) * inv[None, :, t])
    if plan.loss is not None:
        g = plan.loss
        emit(int(g.channel[0]), g.query @ unit_z(loss_block(loss), g.mean, g.std).T)
    if full is not None:
        return full
    return acc + np.float32(const)


def rows_per_block(bytes_per_row: int, budget_bytes: int = BLOCK_BUDGET_BYTES) -> int:
    """Training images per block for a byte budget (multiples of 256, 256..16384)."""
    rows = int(min(max(256, budget_bytes // max(1, bytes_per_row)), 16384))
    return max(256, (rows // 256) * 256)
