"""Small CNNs that recognise the object and the artist of a synthetic image, or the character and face of a glyph.

They are the judges of the quality gate: trained on the generator's own renders (the synthetic artists, or
glyphs rendered from the fonts) with noise and colour-jitter augmentation (without it, a judge under-scores
correct but grainy samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from montrage.data import typefaces as TF
from montrage.data.synthetic import OBJECTS, ArtistStyle, generic_sample, render


class _Net(nn.Module):
    def __init__(self, n_objects: int, n_artists: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.objects = nn.Linear(256, n_objects)
        self.artists = nn.Linear(256, max(n_artists, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.objects(h), self.artists(h)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    scale = 1 + 0.2 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    shift = 0.2 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    sigma = 0.15 * torch.rand(b, 1, 1, 1, generator=g)
    return (x * scale + shift + sigma * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)


@dataclass
class ShapeArtistClassifier:
    net: _Net
    artists: List[str]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (object index, artist index) arrays."""
        self.net.eval()
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1
        lo, la = self.net(x)
        return lo.argmax(1).numpy(), la.argmax(1).numpy()

    def object_accuracy(self, images: np.ndarray, objects: Sequence[str]) -> float:
        pred, _ = self.predict(images)
        return float(np.mean([OBJECTS[p] == o for p, o in zip(pred, objects)]))

    def artist_accuracy(self, images: np.ndarray, artists: Sequence[str]) -> float:
        _, pred = self.predict(images)
        return float(np.mean([self.artists[p] == a for p, a in zip(pred, artists)]))


def train_classifier(artists: Sequence[ArtistStyle] = (), resolution: int = 16, steps: int = 1500,
                     n_images: int = 6000, seed: int = 0) -> ShapeArtistClassifier:
    """Train on fresh renders: base-domain images (object label only) and each artist's images."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    imgs, objs, arts = [], [], []
    n_art = len(artists)
    for i in range(n_images):
        if n_art and i % 2:
            a = int(rng.integers(n_art))
            obj = int(rng.integers(len(OBJECTS)))
            imgs.append(render(OBJECTS[obj], rng, resolution, artist=artists[a]))
            objs.append(obj)
            arts.append(a)
        else:
            img, _, obj = generic_sample(rng, resolution)
            imgs.append(img)
            objs.append(OBJECTS.index(obj))
            arts.append(-100)  # ignored by the artist head
    x = torch.from_numpy(np.stack(imgs)).float().permute(0, 3, 1, 2) / 127.5 - 1
    yo, ya = torch.tensor(objs), torch.tensor(arts)
    net = _Net(len(OBJECTS), n_art)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        lo, la = net(_augment(x[idx], g))
        loss = ce(lo, yo[idx])
        if n_art and (ya[idx] >= 0).any():
            loss = loss + ce(la, ya[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ShapeArtistClassifier(net, [a.name for a in artists])


@dataclass
class TypefaceClassifier:
    """Judge of glyph generations: which character, in which face."""

    net: _Net
    faces: List[str]
    characters: List[str]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (character index, face index) arrays."""
        self.net.eval()
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1
        lc, lf = self.net(x)
        return lc.argmax(1).numpy(), lf.argmax(1).numpy()


def train_typeface_classifier(faces: Sequence[str] = TF.DEFAULT_FACES,
                              characters: Sequence[str] = TF.DEFAULT_CHARACTERS, resolution: int = 16,
                              steps: int = 1500, per_pair: int = 40, seed: int = 0) -> TypefaceClassifier:
    """Train on fresh glyph renders (their own seed space, never the training images) of every face x character."""
    faces, characters = list(faces), list(characters)
    g = torch.Generator().manual_seed(seed)
    imgs, recs = TF.render_pairs([(f, c) for f in faces for c in characters], per_pair=per_pair,
                                 resolution=resolution, seed=1_000_003 + seed)
    x = torch.from_numpy(imgs).float().permute(0, 3, 1, 2) / 127.5 - 1
    yc = torch.tensor([characters.index(r.object) for r in recs])
    yf = torch.tensor([faces.index(r.concept) for r in recs])
    with torch.random.fork_rng():  # seeded initial weights, global RNG untouched
        torch.manual_seed(seed)
        net = _Net(len(characters), len(faces))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    ce = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        lc, lf = net(_augment(x[idx], g))
        loss = ce(lc, yc[idx]) + ce(lf, yf[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return TypefaceClassifier(net, faces, characters)
