"""The capture engine: featurize one checkpoint from its LoRA weights. One implementation for every mode.

Everything montrage records at a checkpoint besides the snapshot (step, running loss, lr, LoRA weights,
per-step signals) is a deterministic function of the LoRA weights and fixed seeds: pooled UNet features and
denoising losses of the training images and anchors, and the probe generations with their features. So
the same :class:`CaptureEngine` runs inline in the training loop (live weights), in a background worker
process and in ``montrage capture`` (weights read from a stored snapshot), and all give bit-identical
stores on CPU.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from montrage.callbacks.probes import run_probes
from montrage.config import CaptureConfig, from_dict
from montrage.data.probes import Probe
from montrage.distributed import ProcessContext
from montrage.errors import CaptureError, MontrageError
from montrage.models.components import DiffusionComponents
from montrage.models.features import ANCHOR_SEED_OFFSET, TRAIN_SEED_OFFSET, FeatureExtractor, Features
from montrage.models.lora import load_lora_state, lora_state
from montrage.storage import CheckpointRecord, RunStore
from montrage.storage import schema as S
from montrage.storage.store import SnapshotRecord

log = logging.getLogger(__name__)

ImageReader = Callable[[List[int]], np.ndarray]  # training image indices -> uint8 (n, H, W, 3)
# CPU threads of every capture, whichever process runs it: CPU kernels may round differently with another
# thread count, and one fixed count makes inline, background and deferred capture bit-identical.
DEFAULT_THREADS = 1
READ_BATCHES = 16  # extractor batches read from the training source at a time (bounded memory, same batches)


def concat_shards(parts: Sequence[Dict[str, Any]], n: int) -> Dict[str, Any]:
    """Reassemble strided per-rank shards (rank r holds items r, r+W, ...) in item order."""
    world = len(parts)
    out: Dict[str, Any] = {}
    for key in parts[0]:
        if isinstance(parts[0][key], dict):
            out[key] = concat_shards([dict(p[key]) for p in parts], n)
            continue
        first = parts[0][key]
        full = np.empty((n,) + first.shape[1:], dtype=first.dtype)
        for r, p in enumerate(parts):
            full[r::world] = p[key]
        out[key] = full
    return out


def unflatten(flat: np.ndarray, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> Dict[str, np.ndarray]:
    """The inverse of :func:`montrage.models.lora.flatten` (names and shapes as the store records them)."""
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape))
        out[name] = np.asarray(flat[offset: offset + size]).reshape(shape)
        offset += size
    if offset != len(flat):
        raise CaptureError(f"a LoRA snapshot of {len(flat)} values does not match the recorded parameter shapes "
                           f"({offset} values); the store's lora group attributes are inconsistent")
    return out


class CaptureEngine:
    """Featurizes training images, anchors and probes under the UNet's (or a snapshot's) LoRA weights.

    ``read_images`` reads training images by index (streamed, never all at once); ``ctx`` splits the items
    across ranks (every rank must call :meth:`featurize`; rank 0 gets the record, the others None).
    """

    def __init__(self, components: DiffusionComponents, read_images: ImageReader, captions: Sequence[str],
                 probes: Sequence[Probe], capture: CaptureConfig, anchor_indices: Sequence[int],
                 ctx: Optional[ProcessContext] = None, extractor: Optional[FeatureExtractor] = None,
                 threads: Optional[int] = DEFAULT_THREADS) -> None:
        self.components = components
        self.threads = threads
        self.read_images = read_images
        self.captions = list(captions)
        self.probes = list(probes)
        self.capture = capture
        self.anchor_indices = [int(i) for i in anchor_indices]
        self.ctx = ctx or ProcessContext(None)
        self.extractor = extractor or FeatureExtractor(components, capture)

    # ---------------------------------------------------------------- building from a store
    @classmethod
    def from_store(cls, store: RunStore, components: DiffusionComponents,
                   threads: Optional[int] = DEFAULT_THREADS) -> "CaptureEngine":
        """An engine that featurizes ``store``'s snapshots exactly as the training loop would have."""
        capture = from_dict(CaptureConfig, {"probe_sampler": "ddim", **store.capture})  # older runs: DDIM
        tm, pm = store.train_meta, store.probe_meta
        probes = [Probe(prompt=p, seed=int(s)) for p, s in zip(pm.get(S.ATTR_PROMPTS, []), pm.get(S.ATTR_SEEDS, []))]
        return cls(components, training_image_reader(store), tm.get(S.ATTR_CAPTIONS, []), probes, capture,
                   store.anchor_indices, threads=threads)

    # ---------------------------------------------------------------- capture
    def _extract(self, items: List[int], offset: int) -> Features:
        per_batch = max(1, self.capture.batch_size // len(self.capture.timesteps))
        chunk = per_batch * READ_BATCHES  # a multiple of the extractor's batch: batches equal one big call's
        parts = [self.extractor.extract(self.read_images(items[s: s + chunk]),
                                        [self.captions[i] for i in items[s: s + chunk]],
                                        [offset + i for i in items[s: s + chunk]])
                 for s in range(0, len(items), chunk)]
        if not parts:  # a rank with no items still returns correctly shaped arrays
            r = self.components.resolution
            return self.extractor.extract(np.zeros((0, r, r, 3), np.uint8), [], [])
        if len(parts) == 1:
            return parts[0]
        return Features({m: np.concatenate([p.features[m] for p in parts]) for m in parts[0].features},
                        np.concatenate([p.losses for p in parts]))

    def capture_kind(self, kind: str) -> Dict[str, Any]:
        """This rank's share of one kind (train, anchors or probes) of one checkpoint: {"f": module ->
        features, "l": losses[, "img": probe images]}. The kinds are independent (fixed per-item seeds), so
        featurizing them apart, in any process, gives the same arrays as a whole checkpoint."""
        if kind == S.PROBES:
            images, feats = run_probes(self.components, self.extractor, self.probes,
                                       self.ctx.shard(len(self.probes)), self.capture)
            return {"f": feats.features, "l": feats.losses, "img": images}
        items, offset = ((list(range(len(self.captions))), TRAIN_SEED_OFFSET) if kind == S.TRAIN else
                         (self.anchor_indices, ANCHOR_SEED_OFFSET))
        out = self._extract([items[j] for j in self.ctx.shard(len(items))], offset)
        return {"f": out.features, "l": out.losses}

    def capture_local(self) -> Dict[str, Dict[str, Any]]:
        """This rank's share of one checkpoint: a function of the current LoRA weights and fixed seeds."""
        return {kind: self.capture_kind(kind) for kind in S.FEATURE_KINDS}

    def assemble(self, parts: Sequence[Dict[str, Any]], snapshot: SnapshotRecord) -> CheckpointRecord:
        """Rank 0: the gathered shards of every rank as one checkpoint record."""
        sizes = {S.TRAIN: len(self.captions), S.ANCHORS: len(self.anchor_indices), S.PROBES: len(self.probes)}
        full = {kind: concat_shards([p[kind] for p in parts], sizes[kind]) for kind in S.FEATURE_KINDS}
        return CheckpointRecord(step=snapshot.step, wall_time=snapshot.wall_time, train_loss=snapshot.train_loss,
                                features={k: v["f"] for k, v in full.items()},
                                losses={k: v["l"] for k, v in full.items()}, probe_images=full[S.PROBES]["img"],
                                lora=snapshot.lora, learning_rate=snapshot.learning_rate)

    @contextlib.contextmanager
    def lora_weights(self, weights: Optional[Dict[str, np.ndarray]], restore: bool = True) -> Iterator[None]:
        """Load a snapshot's LoRA tensors into the UNet for the block, then put the previous ones back
        bit-exactly (in place: an optimizer's references stay valid). ``None``: the current weights."""
        if weights is None:
            yield
            return
        unet = getattr(self.components.unet, "module", self.components.unet)
        saved = {k: v.clone() for k, v in lora_state(unet).items()} if restore else None
        load_lora_state(unet, weights)
        try:
            yield
        finally:
            if saved is not None:
                load_lora_state(unet, saved)

    def capture_gathered(self) -> Optional[List[Dict[str, Any]]]:
        """Every rank's share under the current weights, gathered to rank 0 (a collective; others get None)."""
        with torch_threads(self.threads):
            local = self.capture_local()
        return self.ctx.gather(local)

    def featurize(self, snapshot: SnapshotRecord, weights: Optional[Dict[str, np.ndarray]] = None,
                  restore: bool = True) -> Optional[CheckpointRecord]:
        """Featurize one checkpoint (a collective when ``ctx`` has several ranks); rank 0 gets the record."""
        with self.lora_weights(weights, restore=restore):
            parts = self.capture_gathered()
        return self.assemble(parts, snapshot) if self.ctx.is_main else None


def training_image_reader(store: RunStore) -> ImageReader:
    """Read a run's training images by index: from the store, or (runs recorded with store_images=False)
    from their source folder, checked against the recorded hashes."""
    if store.images_stored:
        return lambda idx: store.train_images(list(idx)) if len(idx) else np.zeros((0,) + _image_shape(store), np.uint8)
    from montrage.data.imagefolder import load_imagefolder

    root = store.train_meta.get(S.ATTR_SOURCE_ROOT)
    if not root:
        raise CaptureError(f"{store.run_dir} stores neither its training images nor a source folder; it cannot be "
                           "featurized after the fact (record it with store_images=True)")
    ts = load_imagefolder(root, int(store.run_config.get("resolution") or _image_shape(store)[0]))
    names = list(store.train_meta.get(S.ATTR_FILE_NAMES, []))
    pos = {n: i for i, n in enumerate(ts.file_names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise CaptureError(f"training images {missing[:3]} of {store.run_dir} are no longer in {root}; restore them")
    rows = np.asarray([pos[n] for n in names], dtype=np.int64)
    images = ts.images[rows]
    store.verify_train_images(images)
    return lambda idx: images[list(idx)]


def _image_shape(store: RunStore) -> tuple:
    return tuple(int(x) for x in store.array(f"{S.PROBES}/{S.IMAGES}").shape[2:])


def lora_layout(store: RunStore) -> tuple[List[str], List[List[int]]]:
    g = store.root[S.LORA]
    return list(g.attrs.get(S.ATTR_PARAM_NAMES, [])), [list(s) for s in g.attrs.get(S.ATTR_PARAM_SHAPES, [])]


def featurize_snapshot(store: RunStore, engine: CaptureEngine, index: int, restore: bool = False) -> CheckpointRecord:
    """Featurize stored snapshot ``index`` (not yet written): the worker's and ``montrage capture``'s unit of work."""
    snap = store.read_snapshot(index)
    names, shapes = lora_layout(store)
    if snap.lora is None or not np.isfinite(snap.lora).all():
        raise CaptureError(f"snapshot {index} (step {snap.step}) of {store.run_dir} has no LoRA weights "
                           "(recorded with record_lora=False), so it can only be featurized inline")
    rec = engine.featurize(snap, unflatten(snap.lora, names, shapes), restore=restore)
    if rec is None:
        raise CaptureError("featurize_snapshot runs on a single-process engine (rank 0)")
    return rec


def rebuild_components(store: RunStore, device: str = "cpu") -> DiffusionComponents:
    """The run's frozen base + LoRA adapter, rebuilt from the run config (as analysis does)."""
    from montrage.models.checkpoints import RunModel

    try:
        return RunModel(store.run_config, device=device).components
    except MontrageError as exc:
        raise CaptureError(f"cannot featurize {store.run_dir} outside the training process: {exc}") from exc


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: as is), then restore the caller's count."""
    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
