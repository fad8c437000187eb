"""Dynamics scores with dask.array over the run store's Zarr arrays, locally or on a dask cluster.

The same weighted-channel scores as :meth:`montrage.analysis.trajectories.Dynamics.score` (and the same
training-set statistics as :meth:`Dynamics.stats`), but the training axis is a dask.array built with
``da.from_zarr`` on the store's arrays, chunked along the training images. One block holds all K
checkpoints of a slice of training images (sized by :data:`BLOCK_BUDGET_BYTES`, about 100 MB of float32
per task), and each pass is a single ``da.blockwise`` over those blocks with a small result per block
(moments, row norms, or the block's (rows x queries) scores): tasks stream through the store with bounded
memory, whatever the number of training images. (Expressing every channel as its own dask.array
reduction instead makes ~80 reductions share the same reads, and dask then holds whole checkpoints in
memory: 4 GB at 200,000 images, against 0.8 GB this way.)

Using it
--------
Command line::

    montrage attribute RUN --method montrage --scheduler tcp://scheduler-host:8786   # your cluster
    montrage attribute RUN --scheduler local      # an in-process LocalCluster (threads)
    montrage attribute RUN --scheduler threads    # dask's default threaded scheduler, no distributed

Python::

    from dask.distributed import Client
    from montrage.analysis.attribute import attribute
    res = attribute("runs/x", "montrage", scheduler="tcp://scheduler-host:8786")  # or scheduler=Client(...)

Pointing it at your cluster: start a scheduler and workers the usual way (``dask scheduler`` then
``dask worker tcp://scheduler-host:8786`` on each machine, or dask-jobqueue / dask-kubernetes / Coiled) and
pass the scheduler address. Workers need the same montrage, numpy, dask and zarr as the client (the
block kernels are functions of this module; torch is not imported by them), and they read the store
directly, so the run folder must be visible to every worker at the same path (a shared filesystem such
as NFS/Lustre). The query side (a few probes or images) and the statistics are computed on the client
and shipped once as a shared graph key; only small per-block results and the (queries x training
images) score matrix come back.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from montrage.errors import ScorerError
from montrage.storage import schema as S

if TYPE_CHECKING:  # keep torch (imported by trajectories) out of this module's import
    from montrage.analysis.trajectories import Dynamics, QueryTrajectory

EPS = 1e-6  # as in trajectories
BLOCK_BUDGET_BYTES = 96 * 2 ** 20  # float32 bytes of features one task holds (all K checkpoints of its images)
CONNECT_TIMEOUT_S = 20.0  # to reach a --scheduler address
Key = Tuple[str, str, int]


# ---------------------------------------------------------------------------------------------- arrays
def auto_chunk(dyn: "Dynamics", budget_bytes: int = BLOCK_BUDGET_BYTES) -> int:
    """Training images per task: a task holds all K checkpoints of its images (float32, every module)."""
    feat_dims = [int(dyn.store.array(S.feature_path(S.TRAIN, m)).shape[-1]) for m in dyn.modules]
    per_row = 4 * dyn.K * dyn.T * (sum(feat_dims) + 1)
    rows = int(min(max(256, budget_bytes // per_row), 16384))
    return max(256, (rows // 256) * 256)


def train_arrays(dyn: "Dynamics", chunk: int) -> Tuple[Dict[str, Any], Any]:
    """Lazy (K, N, T, F) features per module and (K, N, T) losses of dyn's condition, from the store's Zarr
    arrays; one block per ``chunk`` training images holds all K checkpoints."""
    import dask.array as da

    store, K, c = dyn.store, dyn.K, dyn.cidx
    feats = {}
    for m in dyn.modules:
        z = store.array(S.feature_path(S.TRAIN, m))
        feats[m] = da.from_zarr(z, chunks=(K, chunk) + tuple(z.shape[2:]))[:K, :, c]
    z = store.array(f"{S.TRAIN}/{S.LOSS}")
    loss = da.from_zarr(z, chunks=(K, chunk) + tuple(z.shape[2:]))[:K, :, c]
    return feats, loss


def _keys(dyn: "Dynamics", m: str) -> List[Key]:
    """The (kind, module, k) groups of module m in use, in a fixed order."""
    kinds = {ch.kind for ch in dyn.channels}
    return [(kind, m, k) for k in range(dyn.K) for kind in ("sim", "move")
            if kind in kinds and not (kind == "move" and k == 0)]


def _block_vector(x: np.ndarray, kind: str, k: int) -> np.ndarray:
    """(n, T, F) float32 block of one group: features at k, or their change since k-1 (as Dynamics._walk)."""
    return x[k] if kind == "sim" else x[k] - x[k - 1]


# ---------------------------------------------------------------------------------------------- kernels
# Pure numpy functions run by the dask tasks, one block of training images (all K checkpoints) each.
def _moments_kernel(x: np.ndarray, groups: List[Tuple[str, int]]) -> np.ndarray:
    """(K, n, T, F) -> (1, G, 2, T, F) float64: NaN-skipping sums and sums of squares per group."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty((1, len(groups), 2) + x.shape[2:], np.float64)
    for g, (kind, k) in enumerate(groups):
        v = _block_vector(x, kind, k).astype(np.float64)
        out[0, g, 0] = np.nansum(v, 0)
        out[0, g, 1] = np.nansum(v ** 2, 0)
    return out


def _norms_kernel(x: np.ndarray, groups: List[Tuple[str, int]], means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """(K, n, T, F) -> (n, G, T) float32: norm of each row's z-vector per group (+EPS), as Dynamics.stats."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty((x.shape[1], len(groups), x.shape[2]), np.float32)
    for g, (kind, k) in enumerate(groups):
        out[:, g] = np.linalg.norm((_block_vector(x, kind, k) - means[g]) / stds[g], axis=-1) + EPS
    return out


def _score_kernel(*blocks: np.ndarray, params: dict) -> np.ndarray:
    """Feature blocks (K, n, T, F) of every module, then the loss block (K, n, T) -> (n, Q) float32 score.

    Channel (kind, module, k, t) with weight w adds w (1 + cos(z_query, z_row)) / 2; z is z-normalised
    with training statistics; the loss channel uses the NaN-cleaned unit loss-change vectors; a
    non-finite total becomes 0 (as Dynamics.score)."""
    *feats, loss = blocks
    n = loss.shape[1]
    acc = np.zeros((n, params["Q"]), np.float32)
    const = 0.0
    for x, groups in zip(feats, params["modules"]):
        x = np.asarray(x, dtype=np.float32)
        for kind, k, qu, mean, std, by_t in groups:
            z = (_block_vector(x, kind, k) - mean) / std  # (n, T, F)
            inv = 1.0 / (np.linalg.norm(z, axis=-1) + np.float32(EPS))  # (n, T)
            for t, w in by_t:
                acc += np.float32(w / 2.0) * (z[:, t, :] @ qu[:, t, :].T) * inv[:, t, None]
                const += w / 2.0
    if params.get("loss") is not None:
        qu, mean, std, w = params["loss"]
        dl = np.diff(np.asarray(loss, np.float32), axis=0).transpose(1, 0, 2).reshape(n, -1)
        z = np.nan_to_num((dl - mean) / std)
        acc += np.float32(w / 2.0) * ((z / (np.linalg.norm(z, axis=-1, keepdims=True) + EPS)) @ qu.T)
        const += w / 2.0
    acc += np.float32(const)
    return np.nan_to_num(acc, copy=False)


# ---------------------------------------------------------------------------------------------- statistics
def _delayed(obj: Any) -> Any:
    """Small constants shared by every task: one graph key (shipped once per worker), not one copy per task."""
    import dask

    return dask.delayed(obj, pure=True, traverse=False)


def stats(dyn: "Dynamics", chunk: Optional[int] = None, scheduler: Any = None) -> dict:
    """Dynamics.stats() computed by dask, with the same keys, dtypes and NaN handling.

    {(kind, module, k): (mean, std) (T, F) float32, 'loss': (mean, std), 'norms': {(kind, module, k):
    (N, T) float32 norm of each training row's z-vector}}: one pass for the moments, one for the norms.
    """
    import dask
    import dask.array as da

    chunk = chunk or auto_chunk(dyn)
    feats, loss = train_arrays(dyn, chunk)
    moments, out = {}, {}
    modules = [m for m in dyn.modules if _keys(dyn, m)]  # none for a loss-only scorer
    for m in modules:
        groups = [(kind, k) for kind, _, k in _keys(dyn, m)]
        moments[m] = da.blockwise(_moments_kernel, ("n", "g", "two", "t", "f"), feats[m], ("k", "n", "t", "f"),
                                  groups=groups, new_axes={"g": len(groups), "two": 2}, adjust_chunks={"n": 1},
                                  concatenate=True, dtype=np.float64).sum(axis=0)
    graph = dict(moments)
    if dyn.K >= 2 and any(ch.kind == "loss" for ch in dyn.channels):
        dl = da.diff(loss.astype(np.float32), axis=0).astype(np.float64)  # (K-1, N, T)
        dl = da.nan_to_num(dl.transpose(1, 0, 2).reshape(dl.shape[1], -1))
        graph["loss"] = da.stack([dl.mean(0), dl.std(0)])
    (computed,) = dask.compute(graph, scheduler=scheduler)
    n = dyn.N
    for m in modules:
        for key, (s1, s2) in zip(_keys(dyn, m), computed[m]):
            mean = s1 / n
            std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
            out[key] = (mean.astype(np.float32), (std + EPS).astype(np.float32))
    if "loss" in computed:
        mean, std = computed["loss"]
        out["loss"] = (mean.astype(np.float32), (std + EPS).astype(np.float32))
    norms = {}
    for m in modules:
        keys = _keys(dyn, m)
        means = np.stack([out[key][0] for key in keys])
        stds = np.stack([out[key][1] for key in keys])
        norms[m] = da.blockwise(_norms_kernel, ("n", "g", "t"), feats[m], ("k", "n", "t", "f"),
                                _delayed([(kind, k) for kind, _, k in keys]), None, _delayed(means), None,
                                _delayed(stds), None, new_axes={"g": len(keys)}, concatenate=True, dtype=np.float32)
    (norms,) = dask.compute(norms, scheduler=scheduler)
    out["norms"] = {key: np.ascontiguousarray(norms[m][:, g]) for m in modules
                    for g, key in enumerate(_keys(dyn, m))}
    return out


# ---------------------------------------------------------------------------------------------- scores
def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def query_unit(dyn: "Dynamics", q: "QueryTrajectory") -> Dict[Key, np.ndarray]:
    """Unit z-normalised query vectors per channel group: (Q, T, F) per (kind, module, k), (Q, D) for loss."""
    st = dyn.stats()
    out: Dict[Key, np.ndarray] = {}
    for m in dyn.modules:
        if q.features[m].shape[0] < dyn.K:
            raise ScorerError(f"query trajectory has {q.features[m].shape[0]} checkpoints, need {dyn.K}")
        f = np.asarray(q.features[m], dtype=np.float32)
        for key in _keys(dyn, m):
            kind, _, k = key
            mean, std = st[key]
            out[key] = _unit(np.nan_to_num((_block_vector(f, kind, k) - mean) / std)).astype(np.float32)
    if any(ch.kind == "loss" for ch in dyn.channels) and dyn.K >= 2:
        dl = np.diff(np.asarray(q.losses[: dyn.K], np.float32), axis=0).transpose(1, 0, 2).reshape(q.n, -1)
        mean, std = st["loss"]
        out[("loss", "", -1)] = _unit(np.nan_to_num((dl - mean) / std)).astype(np.float32)
    return out


def channel_weights(dyn: "Dynamics", weights: np.ndarray) -> Dict[Key, Dict[int, float]]:
    """Non-zero channel weights grouped as {(kind, module, k): {timestep index: weight}}."""
    out: Dict[Key, Dict[int, float]] = {}
    for w, ch in zip(weights, dyn.channels):
        if w != 0:
            out.setdefault((ch.kind, ch.module, ch.k), {})[ch.t] = float(w)
    return out


def lazy_score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: Optional[int] = None):
    """The (Q, N) weighted score as a dask array (needs dyn.stats(); one task per block of training images)."""
    import dask.array as da

    chunk = chunk or auto_chunk(dyn)
    st = dyn.stats()
    qu = query_unit(dyn, q)
    groups = channel_weights(dyn, weights)
    if not groups:
        raise ScorerError("every channel weight is zero: nothing to score")
    feats, loss = train_arrays(dyn, chunk)
    params: dict = {"Q": q.n, "modules": [], "loss": None}
    args: List[Any] = []
    for i, m in enumerate(dyn.modules):
        params["modules"].append([(kind, k, qu[(kind, m, k)], *st[(kind, m, k)], sorted(groups[(kind, m, k)].items()))
                                  for kind, _, k in _keys(dyn, m) if (kind, m, k) in groups])
        args += [feats[m], ("k", "n", "t", f"f{i}")]
    if ("loss", "", -1) in groups:
        params["loss"] = (qu[("loss", "", -1)], *st["loss"], groups[("loss", "", -1)][-1])
    args += [loss, ("k", "n", "t")]
    out = da.blockwise(_score_kernel, ("n", "q"), *args, params=_delayed(params), new_axes={"q": q.n},
                       concatenate=True, dtype=np.float32)
    return out.T


def score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: Optional[int] = None,
          scheduler: Any = None) -> np.ndarray:
    """Dynamics.score(q, weights) computed with dask: (Q, N) float32."""
    import dask

    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(dyn.channels),):
        raise ScorerError(f"{weights.shape[0]} channel weights for {len(dyn.channels)} channels")
    if dyn._stats is None:
        dyn._stats = stats(dyn, chunk, scheduler)
    (out,) = dask.compute(lazy_score(dyn, q, weights, chunk), scheduler=scheduler)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- routing
class DaskBackend:
    """What Dynamics delegates to while :func:`scoring_on` is active."""

    def __init__(self, scheduler: Any = None, chunk: Optional[int] = None) -> None:
        self.scheduler = scheduler
        self.chunk = chunk

    def stats(self, dyn: "Dynamics") -> dict:
        return stats(dyn, self.chunk, self.scheduler)

    def score(self, dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray) -> np.ndarray:
        return score(dyn, q, weights, self.chunk, self.scheduler)


@contextlib.contextmanager
def client_for(scheduler: Union[str, Any, None]) -> Iterator[Any]:
    """What to hand dask.compute(scheduler=...) for a --scheduler value.

    None / 'threads' / 'default': dask's default (threaded) scheduler; 'sync': single-threaded;
    'local': an in-process LocalCluster (closed on exit); a dask.distributed.Client: used as is;
    any other string: the address of a running scheduler, e.g. 'tcp://host:8786' (a Client is
    connected for the duration and closed on exit; the cluster itself is left running).
    """
    if scheduler is None or scheduler in ("threads", "default"):
        yield None
        return
    if scheduler in ("sync", "synchronous", "single-threaded"):
        yield "sync"
        return
    if not isinstance(scheduler, str):  # a Client (or anything dask.compute accepts)
        yield scheduler
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise ScorerError(f"--scheduler {scheduler!r} needs dask.distributed ({exc}); pip install distributed") from exc
    if scheduler == "local":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ScorerError(f"cannot connect to the dask scheduler at {scheduler!r}: {exc}; start one "
                          "(`dask scheduler`) and workers, or pass --scheduler local") from exc
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def scoring_on(scheduler: Union[str, Any, None], chunk: Optional[int] = None) -> Iterator[DaskBackend]:
    """Within the block, every Dynamics statistics/score pass in this thread runs with dask on ``scheduler``."""
    from montrage.analysis.trajectories import SCORE_BACKEND

    with client_for(scheduler) as sched:
        backend = DaskBackend(sched, chunk)
        token = SCORE_BACKEND.set(backend)
        try:
            yield backend
        finally:
            SCORE_BACKEND.reset(token)
