"""The Zarr v3 run store: appended one checkpoint at a time, read only up to the commit marker.

Crash safety: Zarr's local store writes every file atomically (temp file + rename). A checkpoint
appends its arrays first and bumps ``committed_checkpoints`` last, so a reader never sees a partial
checkpoint, and a writer reopening the store trims whatever a killed writer left past the marker.
One writer at a time is enforced with an advisory file lock (released by the OS if the process dies).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import zarr

from montrage.errors import (CheckpointNotFoundError, StoreConfigMismatchError, StoreError, StoreLayoutError,
                             StoreLockedError, TrainingImagesChangedError)
from montrage.storage import schema as S

log = logging.getLogger(__name__)

_VERSIONED = ("montrage", "torch", "diffusers", "peft", "accelerate", "zarr", "numpy")
IMAGE_CHUNK_BYTES = 4 << 20  # training images per Zarr chunk (and per read from the source) ~ 4 MiB
ImageReader = Callable[[List[int]], np.ndarray]  # indices -> uint8 (n, H, W, 3), e.g. ``ts.images.__getitem__``


def image_sha256(images: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 sha256 digests of each uint8 (H, W, C) image's pixels: identity independent of file format."""
    imgs = np.ascontiguousarray(images, dtype=np.uint8)
    return np.array([np.frombuffer(hashlib.sha256(im.tobytes()).digest(), np.uint8) for im in imgs],
                    dtype=np.uint8).reshape(len(imgs), 32)


def image_rows_per_chunk(image_shape: Sequence[int]) -> int:
    return max(1, IMAGE_CHUNK_BYTES // max(1, int(np.prod(image_shape))))


def package_versions() -> Dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class StoreDims:
    """Shapes a new store is created with."""

    n_train: int
    n_probes: int
    n_anchors: int
    n_conditions: int
    n_timesteps: int
    feature_dims: Dict[str, int]
    image_shape: Sequence[int]  # (H, W, 3)
    lora_names: List[str] = field(default_factory=list)
    lora_shapes: List[List[int]] = field(default_factory=list)
    feature_dtype: str = "float32"  # of the */features/<module> arrays: 'float32' or 'float16' (halves the store)
    store_train_images: bool = True  # False: keep only source paths + per-image sha256 (large sets)

    @property
    def n_lora(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.lora_shapes))


@dataclass
class CheckpointRecord:
    """Everything recorded at one checkpoint (arrays without the checkpoint axis)."""

    step: int
    wall_time: float
    train_loss: Optional[float]  # running mean since the previous checkpoint; None before any step
    features: Dict[str, Dict[str, np.ndarray]]  # kind (train|anchors|probes) -> module -> (n, C, T, F)
    losses: Dict[str, np.ndarray]  # kind -> (n, C, T)
    probe_images: np.ndarray  # (P, H, W, 3) uint8
    lora: Optional[np.ndarray] = None  # (n_params,)
    learning_rate: Optional[float] = None  # the optimizer's lr at capture; None: no optimizer known

    def has_nonfinite(self) -> bool:
        arrays = list(self.losses.values()) + [a for f in self.features.values() for a in f.values()]
        bad_loss = self.train_loss is not None and not np.isfinite(self.train_loss)
        return bad_loss or any(not np.isfinite(a).all() for a in arrays if a.size)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: store has {a!r}, requested {b!r}"]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


class RunStore:
    """A run's Zarr store. Open with :meth:`create_or_resume` (writer) or :meth:`open` (reader)."""

    def __init__(self, run_dir: Path, group: zarr.Group, writable: bool, lock_fd: Optional[int] = None) -> None:
        self.run_dir = run_dir
        self.root = group
        self.writable = writable
        self._lock_fd = lock_fd
        self._warned_nonfinite = False
        # Memory for readers of this object's committed data (analysis keeps the run's model and training-side
        # reads here, so that calls sharing a store share them); committed data never change, so nothing expires.
        self.reader_cache: Dict[str, Any] = {}

    # ------------------------------------------------------------------ opening
    @staticmethod
    def store_path(run_dir: str | Path) -> Path:
        return Path(run_dir) / S.STORE_DIRNAME

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (RunStore.store_path(run_dir) / "zarr.json").exists()

    @classmethod
    def open(cls, run_dir: str | Path) -> "RunStore":
        """Open read-only. Sees only committed checkpoints, also while a writer appends."""
        run_dir = Path(run_dir)
        if not cls.exists(run_dir):
            raise StoreError(f"no montrage run store at {run_dir}: expected {cls.store_path(run_dir)}; "
                             "create one with `montrage train --output DIR` or the monitor callback")
        if cls._half_created(run_dir):
            raise StoreError(f"the run store at {cls.store_path(run_dir)} is not initialised yet: it is being created, "
                             "or its creation was interrupted (rerun the same `montrage train` command to recreate it)")
        group = zarr.open_group(cls.store_path(run_dir), mode="r")
        store = cls(run_dir, group, writable=False)
        store._check_layout()
        return store

    @classmethod
    def create_or_resume(cls, run_dir: str | Path, run_config: dict, fingerprint: dict, dims: StoreDims,
                         train_meta: dict, probe_meta: dict, anchor_indices: Sequence[int] = (),
                         train_images: Optional[ImageReader] = None) -> "RunStore":
        """Create a new store, or reopen an existing one made with the same fingerprint to append to it.

        ``train_images`` reads training images by index; at creation they are streamed into
        ``train/images`` (or, with ``dims.store_train_images=False``, only hashed) in ~4 MiB chunks.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = cls._acquire_lock(run_dir)
        try:
            if cls.exists(run_dir) and cls._half_created(run_dir):
                log.warning("recreating %s: its creation was interrupted before any checkpoint",
                            cls.store_path(run_dir))
            elif cls.exists(run_dir):
                group = zarr.open_group(cls.store_path(run_dir), mode="r+")
                store = cls(run_dir, group, writable=True, lock_fd=fd)
                store._check_layout()
                store._check_fingerprint(_jsonable(fingerprint))
                store._trim_uncommitted()
                return store
            group = zarr.open_group(cls.store_path(run_dir), mode="w")
            store = cls(run_dir, group, writable=True, lock_fd=fd)
            store._create(run_config, _jsonable(fingerprint), dims, train_meta, probe_meta,
                          [int(i) for i in anchor_indices], train_images)
            return store
        except BaseException:
            cls._release_lock(fd)
            raise

    @classmethod
    def _half_created(cls, run_dir: Path) -> bool:
        """A store whose creation was interrupted: root attributes (written last by _create) not there yet."""
        try:
            meta = json.loads((cls.store_path(run_dir) / "zarr.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("node_type") == "group" and not meta.get("attributes")

    @staticmethod
    def _acquire_lock(run_dir: Path) -> int:
        fd = os.open(run_dir / S.LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"{run_dir} is being written by another process (lock {S.LOCK_FILENAME}); "
                                   "wait for it to finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    @staticmethod
    def _release_lock(fd: Optional[int]) -> None:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        self.release_featurizer()
        self._release_lock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_layout(self) -> None:
        version = self.root.attrs.get(S.ATTR_LAYOUT)
        if version != S.LAYOUT_VERSION:
            raise StoreLayoutError(f"store {self.store_path(self.run_dir)} has layout version {version!r}, this montrage "
                                   f"reads version {S.LAYOUT_VERSION}; use a matching montrage or record a new run")

    def _check_fingerprint(self, fingerprint: dict) -> None:
        diffs = _diff_keys(self.root.attrs.get(S.ATTR_FINGERPRINT), fingerprint)
        if diffs:
            raise StoreConfigMismatchError(
                f"{self.run_dir} was recorded with another configuration, so appending would mix runs: "
                + "; ".join(diffs[:8]) + ". Rerun with the original options, or choose a new --output")

    def _create(self, run_config: dict, fingerprint: dict, dims: StoreDims, train_meta: dict, probe_meta: dict,
                anchor_indices: List[int], train_images: Optional[ImageReader] = None) -> None:
        root = self.root
        ck = root.create_group(S.CHECKPOINTS)
        for name, dtype in ((S.STEP, "int64"), (S.WALL_TIME, "float64"), (S.TRAIN_LOSS, "float32"),
                            (S.LEARNING_RATE, "float64")):
            ck.create_array(name, shape=(0,), chunks=(4096,), dtype=dtype, dimension_names=(S.DIM_CHECKPOINT,))
        sizes = {S.TRAIN: dims.n_train, S.ANCHORS: dims.n_anchors, S.PROBES: dims.n_probes}
        metas = {S.TRAIN: train_meta, S.ANCHORS: {S.ATTR_INDICES: anchor_indices}, S.PROBES: probe_meta}
        for kind in S.FEATURE_KINDS:
            n, meta, dim = sizes[kind], metas[kind], S.ITEM_DIM[kind]
            g = root.create_group(kind)
            g.attrs.update(_jsonable(meta))
            rows = max(1, min(n, S.TRAIN_ROWS_PER_CHUNK))
            fg = g.create_group(S.FEATURES)
            for module, width in dims.feature_dims.items():
                fg.create_array(module, shape=(0, n, dims.n_conditions, dims.n_timesteps, width),
                                chunks=(1, rows, dims.n_conditions, dims.n_timesteps, width), dtype=dims.feature_dtype,
                                compressors=S.FEATURE_COMPRESSORS,
                                dimension_names=(S.DIM_CHECKPOINT, dim, S.DIM_CONDITION, S.DIM_TIMESTEP, S.DIM_FEATURE))
            g.create_array(S.LOSS, shape=(0, n, dims.n_conditions, dims.n_timesteps),
                           chunks=(1, rows, dims.n_conditions, dims.n_timesteps), dtype="float32",
                           dimension_names=(S.DIM_CHECKPOINT, dim, S.DIM_CONDITION, S.DIM_TIMESTEP))
        h, w, c = dims.image_shape
        root[S.PROBES].create_array(S.IMAGES, shape=(0, dims.n_probes, h, w, c),
                                    chunks=(1, max(dims.n_probes, 1), h, w, c), dtype="uint8",
                                    dimension_names=(S.DIM_CHECKPOINT, S.DIM_PROBE, S.DIM_HEIGHT, S.DIM_WIDTH, S.DIM_CHANNEL))
        lg = root.create_group(S.LORA)
        lg.attrs.update({S.ATTR_PARAM_NAMES: list(dims.lora_names), S.ATTR_PARAM_SHAPES: [list(s) for s in dims.lora_shapes]})
        lg.create_array(S.WEIGHTS, shape=(0, dims.n_lora), chunks=(1, max(dims.n_lora, 1)), dtype="float32",
                        dimension_names=(S.DIM_CHECKPOINT, S.DIM_PARAMETER))
        root.create_group(S.ATTRIBUTION)
        if train_images is not None:
            self._write_train_images(dims, train_images)
        # root attributes last: a store without them is not a montrage store yet
        root.update_attributes({S.ATTR_RUN_CONFIG: _jsonable(run_config), S.ATTR_FINGERPRINT: fingerprint,
                                S.ATTR_VERSIONS: package_versions(), S.ATTR_NONFINITE: [], S.ATTR_COMMITTED: 0,
                                S.ATTR_LAYOUT: S.LAYOUT_VERSION})  # one metadata write

    def _write_train_images(self, dims: StoreDims, read: ImageReader) -> None:
        """Stream the training images into ``train/images`` (unless disabled) and their sha256 into ``train/image_sha256``."""
        g = self.root[S.TRAIN]
        n, shape = dims.n_train, tuple(int(x) for x in dims.image_shape)
        rows = image_rows_per_chunk(shape)
        pixels = None
        if dims.store_train_images:
            pixels = g.create_array(S.IMAGES, shape=(n,) + shape, chunks=(max(1, min(n, rows)),) + shape, dtype="uint8",
                                    dimension_names=(S.DIM_TRAIN, S.DIM_HEIGHT, S.DIM_WIDTH, S.DIM_CHANNEL))
        digests = g.create_array(S.IMAGE_SHA256, shape=(n, 32), chunks=(max(1, min(n, 65536)), 32), dtype="uint8",
                                 dimension_names=(S.DIM_TRAIN, S.DIM_DIGEST))
        out = np.empty((n, 32), np.uint8)
        for start in range(0, n, rows):
            idx = list(range(start, min(n, start + rows)))
            chunk = np.asarray(read(idx))
            if chunk.dtype != np.uint8 or chunk.shape != (len(idx),) + shape:
                raise StoreError(f"the training source returned images of shape {chunk.shape} and dtype {chunk.dtype} "
                                 f"for rows {idx[0]}..{idx[-1]}; expected uint8 {(len(idx),) + shape} (RGB at the "
                                 "training resolution)")
            if pixels is not None:
                pixels[start: start + len(idx)] = chunk
            out[start: start + len(idx)] = image_sha256(chunk)
        digests[...] = out
        g.attrs[S.ATTR_IMAGES_STORED] = bool(dims.store_train_images)

    def _appendable_arrays(self) -> List[zarr.Array]:
        out = [self.root[f"{S.CHECKPOINTS}/{n}"] for n in (S.STEP, S.WALL_TIME, S.TRAIN_LOSS, S.LEARNING_RATE)]
        for kind in S.FEATURE_KINDS:
            out += [self.root[S.feature_path(kind, m)] for m in self.modules]
            out.append(self.root[f"{kind}/{S.LOSS}"])
        out += [self.root[f"{S.PROBES}/{S.IMAGES}"], self.root[f"{S.LORA}/{S.WEIGHTS}"]]
        return out

    def discard_uncommitted(self) -> None:
        """Drop data appended past the commit marker (a capture that failed midway); readers never saw it."""
        self._require_writable()
        self._trim_uncommitted()

    def _trim_uncommitted(self) -> None:
        # snapshot arrays past the snapshot marker; featurized arrays past the commit marker only when no
        # featurizer (background worker, `montrage capture`) is at work: claim_featurizer trims those
        self._trim(self._snapshot_arrays(), self.n_snapshots, "writer")
        if getattr(self, "_capture_fd", None) is not None:
            self._trim_featurized()  # this process is the featurizer (inline capture)
            return
        try:
            self.claim_featurizer()
        except StoreLockedError:
            return
        self.release_featurizer()

    # ------------------------------------------------------------------ metadata
    @property
    def run_config(self) -> dict:
        return dict(self.root.attrs[S.ATTR_RUN_CONFIG])

    @property
    def capture(self) -> dict:
        return self.run_config["capture"]

    @property
    def modules(self) -> List[str]:
        return list(self.capture["modules"])

    @property
    def conditions(self) -> List[str]:
        return list(self.capture["conditions"])

    @property
    def timesteps(self) -> List[int]:
        return list(self.capture["timesteps"])

    @property
    def n_checkpoints(self) -> int:
        return int(self.root.attrs.get(S.ATTR_COMMITTED, 0))

    @property
    def steps(self) -> np.ndarray:
        return self.root[f"{S.CHECKPOINTS}/{S.STEP}"][: self.n_checkpoints]

    @property
    def nonfinite_checkpoints(self) -> List[int]:
        return list(self.root.attrs.get(S.ATTR_NONFINITE, []))

    def checkpoint_index(self, step: Optional[int]) -> int:
        """Index of a committed checkpoint by training step (None: the last one)."""
        steps = self.steps
        if len(steps) == 0:
            raise CheckpointNotFoundError(f"{self.run_dir} has no committed checkpoint yet")
        if step is None:
            return len(steps) - 1
        hits = np.flatnonzero(steps == int(step))
        if len(hits) == 0:
            raise CheckpointNotFoundError(f"checkpoint at step {step} not in {self.run_dir}; "
                                          f"committed steps: {steps.tolist()}")
        return int(hits[0])

    def meta(self, kind: str) -> dict:
        return dict(self.root[kind].attrs)

    @property
    def train_meta(self) -> dict:
        return self.meta(S.TRAIN)

    @property
    def probe_meta(self) -> dict:
        return self.meta(S.PROBES)

    @property
    def anchor_indices(self) -> List[int]:
        return [int(i) for i in self.meta(S.ANCHORS).get(S.ATTR_INDICES, [])]

    @property
    def concepts(self) -> List[str]:
        return list(self.train_meta.get(S.ATTR_CONCEPTS, []))

    # ------------------------------------------------------------------ reading
    def array(self, path: str) -> zarr.Array:
        """Raw Zarr array (for dask); slice it with ``[: n_checkpoints]`` to see committed data only."""
        return self.root[path]

    def features(self, kind: str, module: str, checkpoints: Any = slice(None)) -> np.ndarray:
        """(checkpoint, item, condition, timestep, feature) of committed checkpoints."""
        arr = self.root[S.feature_path(kind, module)]
        return arr[: self.n_checkpoints][checkpoints]

    def losses(self, kind: str, checkpoints: Any = slice(None)) -> np.ndarray:
        return self.root[f"{kind}/{S.LOSS}"][: self.n_checkpoints][checkpoints]

    def probe_images(self, checkpoint: int = -1) -> np.ndarray:
        return self.root[f"{S.PROBES}/{S.IMAGES}"][: self.n_checkpoints][checkpoint]

    def lora_weights(self, checkpoint: int) -> Dict[str, np.ndarray]:
        """The LoRA adapter tensors of one checkpoint index, by parameter name."""
        g = self.root[S.LORA]
        flat = g[S.WEIGHTS][range(self.n_checkpoints)[checkpoint]]  # one row (not every committed one), same indexing
        out, offset = {}, 0
        for name, shape in zip(g.attrs[S.ATTR_PARAM_NAMES], g.attrs[S.ATTR_PARAM_SHAPES]):
            size = int(np.prod(shape))
            out[name] = flat[offset: offset + size].reshape(shape)
            offset += size
        return out

    def scalar_series(self, name: str) -> np.ndarray:
        return self.root[f"{S.CHECKPOINTS}/{name}"][: self.n_checkpoints]

    @property
    def learning_rates(self) -> np.ndarray:
        """The optimizer's learning rate at each committed checkpoint (NaN where no optimizer was given)."""
        return self.scalar_series(S.LEARNING_RATE)

    # ------------------------------------------------------------------ training images
    @property
    def images_stored(self) -> bool:
        """True when ``train/images`` holds the pixels; False: only source paths + hashes (store_images=False)."""
        return S.IMAGES in self.root[S.TRAIN] and bool(self.train_meta.get(S.ATTR_IMAGES_STORED, True))

    def train_images(self, indices: Any = slice(None)) -> np.ndarray:
        """uint8 (n, H, W, 3) training images from the store (``indices``: a slice or integer list)."""
        if not self.images_stored:
            raise StoreError(f"{self.run_dir} was recorded with store_images=False: its training images live at "
                             f"their source paths ({self.train_meta.get(S.ATTR_SOURCE_ROOT)}); read them with "
                             "montrage.analysis.gradients.training_images(store), which checks their hashes")
        arr = self.root[f"{S.TRAIN}/{S.IMAGES}"]
        if isinstance(indices, slice):
            return arr[indices]
        return arr.get_orthogonal_selection((np.asarray(indices, dtype=np.int64),))

    def train_image_hashes(self) -> np.ndarray:
        """(train, 32) uint8 sha256 digests of the training images' pixels, recorded at store creation."""
        return self.root[f"{S.TRAIN}/{S.IMAGE_SHA256}"][...]

    def source_paths(self) -> List[str]:
        """Absolute source path of each training image ('' where the source was not a folder)."""
        meta = self.train_meta
        root = meta.get(S.ATTR_SOURCE_ROOT)
        return [str(Path(root) / n) if root else "" for n in meta.get(S.ATTR_FILE_NAMES, [])]

    def verify_train_images(self, images: np.ndarray, indices: Optional[Sequence[int]] = None) -> None:
        """Raise TrainingImagesChangedError if ``images`` (rows ``indices``) differ from the recorded hashes."""
        idx = list(range(len(images))) if indices is None else [int(i) for i in indices]
        recorded = self.train_image_hashes()[idx]
        bad = np.flatnonzero((image_sha256(images) != recorded).any(axis=1))
        if len(bad):
            i = idx[int(bad[0])]
            path = self.source_paths()[i] or self.train_meta[S.ATTR_FILE_NAMES][i]
            raise TrainingImagesChangedError(
                f"training image {path} (row {i}) is not the image this run was trained on (sha256 of its pixels "
                f"differs; {len(bad)} of {len(idx)} images checked differ). The run kept only paths + hashes "
                "(store_images=False): restore the original files there, or record the run again with the images "
                "stored (the default)")

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.run_dir} is open read-only")

    def append(self, rec: CheckpointRecord) -> int:
        """Append one checkpoint (snapshot and featurized parts) and commit it; returns its index. The same
        writes as a training loop's snapshot followed by its featurizer's, in one process."""
        self._require_writable()
        n = self.n_checkpoints
        if self.n_snapshots > n:
            raise StoreError(f"{self.run_dir} has {self.n_snapshots - n} snapshotted checkpoint(s) not featurized yet; "
                             "featurize them first (`montrage capture`) before appending complete ones")
        nonfinite = rec.has_nonfinite()
        if nonfinite and not self._warned_nonfinite:
            log.warning("non-finite loss or activations at step %d: recorded as NaN/inf and flagged in %s",
                        rec.step, S.ATTR_NONFINITE)
            self._warned_nonfinite = True
        self.claim_featurizer()
        k = self.append_snapshot(SnapshotRecord(step=rec.step, wall_time=rec.wall_time, train_loss=rec.train_loss,
                                                lora=rec.lora, learning_rate=rec.learning_rate))
        self.write_featurized(k, rec)
        self.commit_featurized(k + 1, [k] if nonfinite else [])
        return k

    def write_attribution(self, method: str, step: int, scores: np.ndarray, query_ids: Sequence[str],
                          query_set: str) -> str:
        """Store a (query, train) score matrix under attribution/<method>/<step>/<query_set>.

        ``query_set`` is :attr:`QuerySet.key`: scores of other query sets at the same step are kept; the
        same set scored again replaces its own matrix.
        """
        if not query_set or "/" in query_set:
            raise StoreError(f"query_set must be a non-empty key without '/', got {query_set!r}")
        g = zarr.open_group(self.store_path(self.run_dir), mode="a")
        path = S.attribution_path(method, step, query_set)
        arr = g.create_array(path, shape=scores.shape, dtype="float32", overwrite=True,
                             chunks=(max(1, min(scores.shape[0], 256)), max(1, min(scores.shape[1], 65536))),
                             dimension_names=(S.DIM_QUERY, S.DIM_TRAIN))
        arr[...] = np.asarray(scores, dtype="float32")
        arr.attrs[S.ATTR_QUERY_IDS] = list(query_ids)
        return path

    def attributions(self) -> List[Dict[str, Any]]:
        """Every stored score matrix: {method, step, query_set, query_ids, path, shape}, sorted."""
        root = zarr.open_group(self.store_path(self.run_dir), mode="r")
        out: List[Dict[str, Any]] = []
        if S.ATTRIBUTION not in root:
            return out
        for method, mg in root[S.ATTRIBUTION].groups():
            for step, sg in mg.groups():
                for key, arr in sg.arrays():
                    out.append({"method": method, "step": int(step), "query_set": key,
                                "query_ids": list(arr.attrs.get(S.ATTR_QUERY_IDS, [])),
                                "path": S.attribution_path(method, int(step), key), "shape": list(arr.shape)})
        return sorted(out, key=lambda d: (d["method"], d["step"], d["query_set"]))

    def read_attribution(self, method: str, step: int, query_set: Optional[str] = None) -> tuple[np.ndarray, List[str]]:
        """(scores, query ids) of one stored matrix; ``query_set`` may be omitted when only one set was scored."""
        if query_set is None:
            keys = [a["query_set"] for a in self.attributions() if a["method"] == method and a["step"] == int(step)]
            if len(keys) != 1:
                raise StoreError(f"{len(keys)} query sets scored with {method} at step {step} in {self.run_dir} "
                                 f"({keys}); pass query_set= one of them (see RunStore.attributions())")
            query_set = keys[0]
        root = zarr.open_group(self.store_path(self.run_dir), mode="r")
        path = S.attribution_path(method, step, query_set)
        if path not in root:
            raise StoreError(f"no scores at {path} in {self.run_dir}; run `montrage attribute` first")
        arr = root[path]
        return arr[...], list(arr.attrs[S.ATTR_QUERY_IDS])

    # ------------------------------------------------------------------ capture modes: snapshot vs featurized
    # The training loop writes snapshot arrays + the checkpoints group's marker; the featurizer writes featurized
    # arrays + the root's committed_checkpoints. Each zarr.json has exactly one writing process.
    def refresh(self) -> "RunStore":
        """Re-read the root attributes: another process (the featurizer) may have committed checkpoints since."""
        self.root = zarr.open_group(self.store_path(self.run_dir), mode="r+" if self.writable else "r")
        return self

    @property
    def n_snapshots(self) -> int:
        """Checkpoints whose snapshot (step, loss, lr, LoRA weights) is committed; the ones past
        :attr:`n_checkpoints` are pending featurization and invisible to readers."""
        attrs = self.root[S.CHECKPOINTS].attrs  # read from disk on every access (not cached like the root's)
        return max(int(attrs.get(S.ATTR_SNAPSHOTS, 0)), self.n_checkpoints)

    @property
    def snapshot_steps(self) -> np.ndarray:
        """Steps of every committed snapshot, featurized or pending."""
        return self.root[f"{S.CHECKPOINTS}/{S.STEP}"][: self.n_snapshots]

    @property
    def pending_steps(self) -> List[int]:
        """Steps snapshotted by the training loop but not featurized yet."""
        n, m = self.n_checkpoints, self.n_snapshots
        return [int(s) for s in self.root[f"{S.CHECKPOINTS}/{S.STEP}"][n:m]] if m > n else []

    def _snapshot_arrays(self) -> List[zarr.Array]:
        ck = self.root[S.CHECKPOINTS]
        return [ck[name] for name in (S.STEP, S.WALL_TIME, S.TRAIN_LOSS, S.LEARNING_RATE) if name in ck] + \
            [self.root[f"{S.LORA}/{S.WEIGHTS}"]]

    def _featurized_arrays(self) -> List[zarr.Array]:
        out = []
        for kind in S.FEATURE_KINDS:
            out += [self.root[S.feature_path(kind, m)] for m in self.modules]
            out.append(self.root[f"{kind}/{S.LOSS}"])
        return out + [self.root[f"{S.PROBES}/{S.IMAGES}"]]

    @staticmethod
    def _put_row(arr: zarr.Array, index: int, value: Any, grow: bool = True) -> None:
        """Write row ``index`` of ``arr`` (explicitly indexed: rows a killed writer left past a marker are
        overwritten, never appended after)."""
        if grow and arr.shape[0] != index + 1:
            arr.resize((index + 1,) + tuple(arr.shape[1:]))
        arr[index] = np.asarray(value, dtype=arr.dtype)

    def append_snapshot(self, snap: "SnapshotRecord") -> int:
        """Commit one checkpoint's snapshot (the training loop's part); returns its index. Featurize it later
        with :meth:`write_featurized` + :meth:`commit_featurized`."""
        self._require_writable()
        m = self.n_snapshots
        ck = self.root[S.CHECKPOINTS]
        if m and int(ck[S.STEP][m - 1]) >= snap.step:
            raise StoreError(f"checkpoint step {snap.step} is not after the last recorded step {int(ck[S.STEP][m - 1])}")
        values = {S.STEP: snap.step, S.WALL_TIME: snap.wall_time,
                  S.TRAIN_LOSS: np.nan if snap.train_loss is None else snap.train_loss,
                  S.LEARNING_RATE: np.nan if snap.learning_rate is None else snap.learning_rate}
        for name, value in values.items():
            if name in ck:
                self._put_row(ck[name], m, value)
        lora_arr = self.root[f"{S.LORA}/{S.WEIGHTS}"]
        self._put_row(lora_arr, m, snap.lora if snap.lora is not None else np.full(lora_arr.shape[1:], np.nan))
        rows = self._append_signals(snap.signals)
        ck.update_attributes({S.ATTR_SNAPSHOTS: m + 1, S.ATTR_SIGNAL_ROWS: rows})  # the snapshot marker: one write
        return m

    def _append_signals(self, signals: Optional[Dict[str, np.ndarray]]) -> int:
        """Write per-step signal rows after the committed ones; returns the new committed row count."""
        done = int(self.root[S.CHECKPOINTS].attrs.get(S.ATTR_SIGNAL_ROWS, 0))
        if not signals or not len(signals.get(S.SIGNAL_STEP, ())):
            return done
        if S.SIGNALS not in self.root:
            g = self.root.create_group(S.SIGNALS)
            for name, dtype in S.SIGNAL_ARRAYS:
                g.create_array(name, shape=(0,), chunks=(S.SIGNAL_ROWS_PER_CHUNK,), dtype=dtype,
                               dimension_names=(S.DIM_SAMPLE,))
        g = self.root[S.SIGNALS]
        k = len(signals[S.SIGNAL_STEP])
        for name, dtype in S.SIGNAL_ARRAYS:
            arr = g[name]
            arr.resize((done + k,))
            arr[done: done + k] = np.asarray(signals[name], dtype=dtype).reshape(k)
        return done + k

    def step_signals(self) -> Dict[str, np.ndarray]:
        """The per-step signals recorded inside the training loop, committed rows only: name -> (sample,) arrays
        (``step``, ``train_index`` (-1: not a training image), ``timestep``, ``loss``). Empty arrays when none."""
        rows = int(self.root[S.CHECKPOINTS].attrs.get(S.ATTR_SIGNAL_ROWS, 0))
        if S.SIGNALS not in self.root or rows == 0:
            return {name: np.zeros(0, dtype) for name, dtype in S.SIGNAL_ARRAYS}
        g = self.root[S.SIGNALS]
        return {name: g[name][:rows] for name, _ in S.SIGNAL_ARRAYS}

    def read_snapshot(self, index: int) -> "SnapshotRecord":
        """The snapshot of checkpoint ``index`` (featurized or pending): what the featurizer starts from."""
        if not 0 <= index < self.n_snapshots:
            raise CheckpointNotFoundError(f"no snapshot {index} in {self.run_dir} ({self.n_snapshots} recorded)")
        ck = self.root[S.CHECKPOINTS]
        loss = float(ck[S.TRAIN_LOSS][index])
        lr = float(ck[S.LEARNING_RATE][index]) if S.LEARNING_RATE in ck else float("nan")
        return SnapshotRecord(step=int(ck[S.STEP][index]), wall_time=float(ck[S.WALL_TIME][index]),
                              train_loss=None if loss != loss else loss,
                              lora=self.root[f"{S.LORA}/{S.WEIGHTS}"][index],
                              learning_rate=None if lr != lr else lr)

    # the featurizer's side
    @classmethod
    def open_featurizer(cls, run_dir: str | Path, wait: bool = False) -> "RunStore":
        """Open to featurize pending snapshots (a background worker, `montrage capture`): takes the capture lock
        only, so a training loop may keep appending snapshots meanwhile. ``wait``: block until another
        featurizer is done instead of raising StoreLockedError."""
        store = cls.open(run_dir)
        store = cls(store.run_dir, zarr.open_group(cls.store_path(run_dir), mode="r+"), writable=True)
        store.claim_featurizer(wait=wait)
        return store

    def claim_featurizer(self, wait: bool = False) -> None:
        """Become the store's one featurizer (capture lock) and drop featurized rows a killed featurizer left
        past ``committed_checkpoints``. Idempotent."""
        if getattr(self, "_capture_fd", None) is not None:
            return
        path = self.run_dir / S.CAPTURE_LOCK_FILENAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"the checkpoints of {self.run_dir} are being featurized by another process (lock "
                                   f"{S.CAPTURE_LOCK_FILENAME}: a background capture worker or `montrage capture`); "
                                   "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._capture_fd = fd
        self.refresh()
        self._trim_featurized()

    def _trim_featurized(self) -> None:
        self._trim(self._featurized_arrays(), self.n_checkpoints, "featurizer")

    @staticmethod
    def _trim(arrays: List[zarr.Array], n: int, who: str) -> None:
        for arr in arrays:
            if arr.shape[0] > n:
                log.warning("dropping a partial checkpoint left in %s by an interrupted %s", arr.path, who)
                arr.resize((n,) + tuple(arr.shape[1:]))

    def release_featurizer(self) -> None:
        self._release_lock(getattr(self, "_capture_fd", None))
        self._capture_fd = None

    def reserve_featurized(self, count: int) -> None:
        """Size the featurized arrays for ``count`` checkpoints, so that several processes can then write
        different checkpoints' regions (:meth:`write_featurized` with ``grow=False``) without touching metadata."""
        for arr in self._featurized_arrays():
            if arr.shape[0] < count:
                arr.resize((count,) + tuple(arr.shape[1:]))

    def write_featurized(self, index: int, rec: CheckpointRecord, grow: bool = True) -> None:
        """Write checkpoint ``index``'s features, losses and probe images (not yet visible: see commit_featurized)."""
        for kind in S.FEATURE_KINDS:
            for module in self.modules:
                self._put_row(self.root[S.feature_path(kind, module)], index, rec.features[kind][module], grow)
            self._put_row(self.root[f"{kind}/{S.LOSS}"], index, rec.losses[kind], grow)
        self._put_row(self.root[f"{S.PROBES}/{S.IMAGES}"], index, rec.probe_images, grow)

    def commit_featurized(self, count: int, nonfinite: Sequence[int] = ()) -> None:
        """Make the first ``count`` checkpoints visible to readers: one root attribute update (the marker)."""
        commit: Dict[str, Any] = {S.ATTR_COMMITTED: int(count)}
        if nonfinite:
            commit[S.ATTR_NONFINITE] = sorted(set(self.nonfinite_checkpoints) | {int(i) for i in nonfinite})
        self.root.update_attributes(commit)  # one metadata write (attrs.update writes once per key)


@dataclass
class SnapshotRecord:
    """What the training loop hands over at a checkpoint; everything featurized is a function of it."""

    step: int
    wall_time: float
    train_loss: Optional[float]
    lora: Optional[np.ndarray]  # (n_params,) float32
    learning_rate: Optional[float] = None
    signals: Optional[Dict[str, np.ndarray]] = None  # schema.SIGNAL_* -> (rows,) per-step signals since the last one


class GradientFeatures:
    """Stored gradient features of one output function (schema: ``train/gradients/<output>``).

    Written outside the training lock, like attribution results (they are a function of the committed
    checkpoints): rows first, then the per-checkpoint row count, so an interrupted writer resumes where it
    stopped and readers use only complete checkpoints. Unit vectors are float16 (half the bytes; a cosine
    needs no more), norms float32, so raw gradients are unit x norm.
    """

    def __init__(self, store: RunStore, output: str) -> None:
        if not output or "/" in output:
            raise StoreError(f"gradient output name must be non-empty without '/', got {output!r}")
        self.store = store
        self.output = output

    def _root(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(RunStore.store_path(self.store.run_dir), mode=mode)

    def _array(self) -> Optional[zarr.Array]:
        root = self._root()
        path = S.gradient_path(self.output)
        return root[path] if path in root else None

    def settings(self) -> Optional[dict]:
        arr = self._array()
        return None if arr is None else dict(arr.attrs.get(S.ATTR_GRADIENT_SETTINGS) or {})

    def rows_done(self) -> Dict[int, int]:
        arr = self._array()
        return {} if arr is None else {int(k): int(v) for k, v in (arr.attrs.get(S.ATTR_GRADIENT_ROWS) or {}).items()}

    def complete(self, checkpoint: int) -> bool:
        n = len(self.store.train_meta[S.ATTR_FILE_NAMES])
        return self.rows_done().get(int(checkpoint), 0) >= n

    def prepare(self, settings: dict, n_checkpoints: int, n_timesteps: int, proj_dim: int,
                overwrite: bool = False) -> None:
        """Create the arrays for ``settings`` (or grow their checkpoint axis). Features stored with other
        settings raise StoreError unless ``overwrite`` (then they are replaced)."""
        n = len(self.store.train_meta[S.ATTR_FILE_NAMES])
        settings = json.loads(json.dumps(settings))
        current = self.settings()
        root = self._root("a")
        if current is not None and current != settings and not overwrite:
            raise StoreError(f"{self.store.run_dir} holds {self.output} gradient features with other settings "
                             f"({current}); pass overwrite=True (`montrage featurize --overwrite`) to replace them")
        if current is None or current != settings:
            rows = min(max(n, 1), S.GRADIENT_ROWS_PER_CHUNK)
            arr = root.create_array(S.gradient_path(self.output), shape=(n_checkpoints, n, n_timesteps, proj_dim),
                                    dtype=S.GRADIENT_DTYPE, chunks=(1, rows, n_timesteps, proj_dim), overwrite=True,
                                    fill_value=np.nan, dimension_names=(S.DIM_CHECKPOINT, S.DIM_TRAIN,
                                                                         S.DIM_TIMESTEP, S.DIM_PROJECTION))
            root.create_array(S.gradient_norm_path(self.output), shape=(n_checkpoints, n, n_timesteps),
                              dtype="float32", chunks=(1, rows, n_timesteps), overwrite=True, fill_value=np.nan,
                              dimension_names=(S.DIM_CHECKPOINT, S.DIM_TRAIN, S.DIM_TIMESTEP))
            arr.attrs.update({S.ATTR_GRADIENT_SETTINGS: settings, S.ATTR_GRADIENT_ROWS: {}})
            return
        for path in (S.gradient_path(self.output), S.gradient_norm_path(self.output)):
            arr = root[path]
            if arr.shape[0] < n_checkpoints:
                arr.resize((n_checkpoints,) + tuple(arr.shape[1:]))

    def write(self, checkpoint: int, start: int, unit: np.ndarray, norms: np.ndarray) -> None:
        """Rows [start, start + len(unit)) of one checkpoint; ``start`` must be the rows written so far."""
        done = self.rows_done()
        k = int(checkpoint)
        if done.get(k, 0) != int(start):
            raise StoreError(f"{self.output} gradients of checkpoint {k}: {done.get(k, 0)} rows written, "
                             f"cannot write from row {start}")
        root = self._root("a")
        stop = int(start) + len(unit)
        root[S.gradient_path(self.output)][k, start:stop] = np.asarray(unit, dtype=S.GRADIENT_DTYPE)
        root[S.gradient_norm_path(self.output)][k, start:stop] = np.asarray(norms, dtype="float32")
        done[k] = stop
        root[S.gradient_path(self.output)].attrs[S.ATTR_GRADIENT_ROWS] = {str(i): v for i, v in sorted(done.items())}

    def read(self, checkpoint: int, rows: Any = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(unit (n, T, D) float32, norms (n, T) float32) of a complete checkpoint."""
        if not self.complete(checkpoint):
            raise StoreError(f"no complete {self.output} gradient features for checkpoint {checkpoint} in "
                             f"{self.store.run_dir}; run `montrage featurize {self.store.run_dir}`")
        root = self._root()
        unit = root[S.gradient_path(self.output)].oindex[int(checkpoint), rows]
        norms = root[S.gradient_norm_path(self.output)].oindex[int(checkpoint), rows]
        return np.asarray(unit, dtype=np.float32), np.asarray(norms, dtype=np.float32)

    def nbytes(self) -> int:
        """Bytes of the stored arrays (uncompressed)."""
        arr = self._array()
        if arr is None:
            return 0
        norms = self._root()[S.gradient_norm_path(self.output)]
        return int(arr.nbytes + norms.nbytes)
