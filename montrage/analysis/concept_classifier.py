"""A concept classifier learned from the run's own training images and concept labels: the ``class/concept`` channel
of the fused model's image-only queries.

Why: an image-only query of an object the run never trained on, in a concept's style (an artist's new work), shares
its concept's palette and stroke but no training image's object, so per-image similarities rank the images of the
same object in other concepts first. A small CNN trained to tell the run's concepts apart, with shift, noise and
colour-gain augmentation, generalises across objects further than any per-image similarity: on the typeface
benchmark runs it put an unseen character in its face .57 / .59 of the time, against .36 / .41 for the fused model
without it (session 15). It reads pixels only (downsampled to at most CLASSIFIER_SIDE, at most CLASSIFIER_BATCH
images a step), so its cost does not grow with the run's resolution or size: 15-50 s on one CPU core for 64
images (3 nets), once per run.

For the fit's own supervision rows (perturbed copies and generations of training anchors) the channel is
*cross-fitted*: each row is scored by a classifier trained without its anchor, so that the fit weighs the channel
by how it generalises, not by how well it remembers an image it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import List, Optional, Sequence

import numpy as np

from montrage.errors import ScorerError

log = logging.getLogger(__name__)

CLASSIFIER_SIDE = 32  # images are block-averaged down to at most this many pixels a side
CLASSIFIER_STEPS = 600
CLASSIFIER_ENSEMBLE = 3  # seeds averaged (in log-probability): one small CNN's draw moves a query or two
CLASSIFIER_LR = 2e-3
CROSSFIT_FOLDS = 4
CLASSIFIER_BATCH = 128  # images per step; a run with at most this many trains on all of them at every step


def _inputs(images: np.ndarray):
    """(B, H, W, C) uint8 -> (B, C, h, w) float32 in [-1, 1], block-averaged to at most CLASSIFIER_SIDE a side."""
    import torch

    x = np.asarray(images, np.float32) / 127.5 - 1.0
    f = max(1, int(np.ceil(max(x.shape[1:3]) / CLASSIFIER_SIDE)))
    if f > 1:
        h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
        x = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f, x.shape[3]).mean((2, 4))
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _net(n_channels: int, n_classes: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(n_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, n_classes))


def concept_labels(concepts: Sequence[str]) -> List[str]:
    """The sorted labelled concepts ('' = unlabelled) a classifier can be trained on; 2+ or a ScorerError."""
    labels = sorted(set(concepts) - {""})
    if len(labels) < 2:
        raise ScorerError(f"a concept classifier needs 2+ labelled concepts, the run has {len(labels)}")
    return labels


def _settings(steps: Optional[int], ensemble: Optional[int]) -> tuple:
    """(steps, nets): the given ones, else the module's settings read at call time (tests lighten them)."""
    return (CLASSIFIER_STEPS if steps is None else int(steps),
            CLASSIFIER_ENSEMBLE if ensemble is None else int(ensemble))


class ConceptClassifier:
    """An ensemble of small CNNs over ``labels`` (sorted concept names), trained on (images, concepts)."""

    def __init__(self, images: np.ndarray, concepts: Sequence[str], seed: int = 0,
                 steps: Optional[int] = None, ensemble: Optional[int] = None) -> None:
        import torch

        steps, ensemble = _settings(steps, ensemble)
        self.labels: List[str] = concept_labels(concepts)
        keep = [i for i, c in enumerate(concepts) if c]
        x = _inputs(np.asarray(images)[keep])
        y = torch.tensor([self.labels.index(concepts[i]) for i in keep])
        side = x.shape[-1]
        self.nets = []
        with torch.random.fork_rng(devices=[]):
            for e in range(ensemble):
                torch.manual_seed(seed * 1000 + e)
                g = torch.Generator().manual_seed(seed * 1000 + e)
                net = _net(x.shape[1], len(self.labels))
                opt = torch.optim.Adam(net.parameters(), CLASSIFIER_LR)
                for _ in range(steps):
                    rows = (slice(None) if len(x) <= CLASSIFIER_BATCH
                            else torch.randperm(len(x), generator=g)[:CLASSIFIER_BATCH])
                    xb, yb = x[rows], y[rows]
                    xb = xb * (1 + 0.2 * (torch.rand(len(xb), x.shape[1], 1, 1, generator=g) - 0.5))
                    xb = xb + 0.1 * torch.randn(xb.shape, generator=g)
                    shift = torch.randint(-max(1, side // 8), max(1, side // 8) + 1, (2,), generator=g)
                    xb = torch.roll(xb, (int(shift[0]), int(shift[1])), (2, 3))
                    loss = torch.nn.functional.cross_entropy(net(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                net.eval()
                self.nets.append(net)

    def save(self, path) -> None:
        """The nets' weights and the labels, as one safetensors file (written whole, then moved into place)."""
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{e}.{k}": v.contiguous() for e, net in enumerate(self.nets) for k, v in net.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"labels": json.dumps(self.labels), "nets": str(len(self.nets)),
                                               "in_channels": str(int(self.nets[0][0].in_channels))})
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "ConceptClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        self = cls.__new__(cls)
        self.labels = list(json.loads(meta["labels"]))
        self.nets = []
        for e in range(int(meta["nets"])):
            net = _net(int(meta["in_channels"]), len(self.labels))
            net.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(e)})
            net.eval()
            self.nets.append(net)
        return self

    def log_probs(self, images: np.ndarray) -> np.ndarray:
        """(Q, len(labels)) mean over the ensemble of each net's log-probabilities."""
        import torch

        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        x = _inputs(images)
        with torch.no_grad():
            out = torch.stack([torch.log_softmax(net(x), 1) for net in self.nets]).mean(0)
        return out.numpy().astype(np.float32)

    def channel(self, images: np.ndarray, concepts: Sequence[str]) -> np.ndarray:
        """(Q, N): each training image's value is the query's log-probability of that image's concept; unlabelled
        images (or concepts this classifier never saw) get the query's mean log-probability."""
        lp = self.log_probs(images)
        out = np.repeat(lp.mean(1, keepdims=True), len(concepts), axis=1)
        for j, c in enumerate(concepts):
            if c in self.labels:
                out[:, j] = lp[:, self.labels.index(c)]
        return out.astype(np.float32)


def crossfitted_channel(train_images: np.ndarray, concepts: Sequence[str], anchors: Sequence[int],
                        query_images: np.ndarray, row_anchor: Sequence[int], folds: int = CROSSFIT_FOLDS,
                        seed: int = 0, steps: Optional[int] = None,
                        ensemble: Optional[int] = None, trained: Optional[dict] = None) -> np.ndarray:
    """(R, N) the channel of supervision rows, each from a classifier trained without its anchor: the anchors
    split into ``folds`` (in order), one classifier per fold trained on every other training image. ``trained``:
    a dict that keeps the fold classifiers between calls (e.g. one fit per checkpoint of ``montrage compare``: the
    classifiers depend on the training images, not on the checkpoint)."""
    anchors = list(anchors)
    row_anchor = np.asarray(row_anchor)
    if len(row_anchor) != len(query_images):
        raise ScorerError(f"{len(query_images)} supervision images but {len(row_anchor)} anchors named for them")
    out = np.zeros((len(query_images), len(concepts)), np.float32)
    groups = [anchors[f::max(1, folds)] for f in range(max(1, folds))]
    for f, held in enumerate(groups):
        if not held:
            continue
        rows = np.flatnonzero(np.isin(row_anchor, held))
        if not len(rows):
            continue
        kept = np.setdiff1d(np.arange(len(concepts)), held)
        images, labels = np.asarray(train_images)[kept], [concepts[i] for i in kept]
        key = classifier_key(images, labels, seed + 1 + f, steps, ensemble)
        clf = (trained or {}).get(key)
        if clf is None:
            try:
                clf = ConceptClassifier(images, labels, seed=seed + 1 + f, steps=steps, ensemble=ensemble)
            except ScorerError:  # too few concepts left without this fold: its rows say nothing (constant rows)
                continue
            if trained is not None:
                trained[key] = clf
        out[rows] = clf.channel(np.asarray(query_images)[rows], concepts)
    return out


def classifier_key(images: np.ndarray, concepts: Sequence[str], seed: int = 0, steps: Optional[int] = None,
                   ensemble: Optional[int] = None) -> str:
    """What a trained classifier depends on: the images, their labels and the training settings (``steps`` and
    ``ensemble`` as :class:`ConceptClassifier` resolves them)."""
    steps, ensemble = _settings(steps, ensemble)
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(json.dumps([list(concepts), seed, CLASSIFIER_SIDE, steps, ensemble, CLASSIFIER_LR,
                         CLASSIFIER_BATCH]).encode())
    return h.hexdigest()[:12]


def classifier_for(ctx, images: np.ndarray, concepts: Sequence[str], seed: int = 0) -> ConceptClassifier:
    """The run's classifier on every training image: from the run cache, the run folder
    (``montrage-models/classifier-<key>.safetensors``), or trained now (and saved, so that a later
    ``montrage attribute`` call does not train it again)."""
    def make() -> ConceptClassifier:
        run_dir = getattr(ctx.store, "run_dir", None)
        name = f"classifier-{classifier_key(images, concepts, seed)}.safetensors"
        path = None if run_dir is None else run_dir / "montrage-models" / name
        if path is not None and path.is_file():
            try:
                return ConceptClassifier.load(path)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                log.info("montrage: saved concept classifier %s unreadable (%s); training it again", path, exc)
        clf = ConceptClassifier(images, concepts, seed=seed)
        if path is not None:
            try:
                clf.save(path)
            except OSError as exc:
                log.info("montrage: concept classifier not saved (%s)", exc)
        return clf

    return ctx.run_cache_get("fused/classifier/all", make)
