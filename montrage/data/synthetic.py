"""Deterministic synthetic concept data: objects drawn in the styles of made-up "artists".

Images are drawn at 4x resolution with PIL and downsampled (LANCZOS), which gives clean
anti-aliased 16x16 shapes a tiny model can learn. The generic (base) domain is a named-colour
filled object on a plain background; each artist adds its own palette, background texture and
stroke. Written as a diffusers imagefolder, so it doubles as an example of the user's format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from montrage.data.imagefolder import write_imagefolder

RGB = Tuple[int, int, int]

OBJECTS: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS: Dict[str, RGB] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
POSITIONS: Dict[str, Tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.34, 0.5), "right": (0.66, 0.5), "top": (0.5, 0.34), "bottom": (0.5, 0.66),
}
SIZES: Dict[str, float] = {"small": 0.42, "large": 0.72}
SCALE = 4


@dataclass(frozen=True)
class ArtistStyle:
    """A made-up artist: palette for the object, background texture, stroke."""

    name: str
    palette: Tuple[RGB, ...]
    background: str  # plain | stripes | dots | split | checker
    bg_colours: Tuple[RGB, RGB]
    stroke: str  # fill | outline | fill+outline
    stroke_width: int = 6
    outline_colour: RGB = (15, 15, 15)


# Hand-picked to be learnable by a tiny model: flat colours, outlines, plain or two-tone backgrounds.
_STYLE_BANK: Tuple[dict, ...] = (
    dict(palette=((230, 60, 40), (250, 150, 30)), background="plain", bg_colours=((250, 240, 200), (250, 240, 200)), stroke="fill+outline"),
    dict(palette=((40, 90, 230), (30, 180, 200)), background="stripes", bg_colours=((20, 20, 40), (60, 60, 90)), stroke="outline"),
    dict(palette=((60, 190, 70), (200, 230, 60)), background="split", bg_colours=((120, 60, 140), (230, 200, 230)), stroke="fill"),
    dict(palette=((240, 240, 240), (200, 200, 200)), background="checker", bg_colours=((200, 40, 60), (120, 20, 40)), stroke="fill"),
    dict(palette=((250, 220, 30), (255, 250, 140)), background="plain", bg_colours=((30, 40, 110), (30, 40, 110)), stroke="outline"),
    dict(palette=((150, 60, 200), (230, 90, 190)), background="dots", bg_colours=((240, 250, 240), (170, 220, 170)), stroke="fill+outline"),
    dict(palette=((20, 20, 20), (80, 80, 80)), background="stripes", bg_colours=((250, 200, 120), (240, 150, 60)), stroke="fill"),
    dict(palette=((250, 120, 160), (250, 180, 200)), background="split", bg_colours=((40, 130, 120), (20, 70, 60)), stroke="outline"),
)


def make_artists(n: int, hard: bool = False, seed: int = 0) -> List[ArtistStyle]:
    """The first ``n`` artists of the bank (then seeded random ones).

    ``hard=True`` makes pairs that share palette and background and differ only in stroke,
    the discriminating between-concept case where pixel similarity is not at ceiling.
    """
    rng = np.random.default_rng(seed)
    out: List[ArtistStyle] = []
    strokes = ("fill", "outline", "fill+outline")
    for k in range(n):
        if hard:
            base = _STYLE_BANK[(k // 2) % len(_STYLE_BANK)]
            stroke = ("fill", "outline")[k % 2]
            out.append(ArtistStyle(name=f"artist-{k}", **{**base, "stroke": stroke}))
        elif k < len(_STYLE_BANK):
            out.append(ArtistStyle(name=f"artist-{k}", **_STYLE_BANK[k]))
        else:
            cols = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(4)]
            out.append(ArtistStyle(
                name=f"artist-{k}", palette=(cols[0], cols[1]),
                background=str(rng.choice(["plain", "stripes", "dots", "split", "checker"])),
                bg_colours=(cols[2], cols[3]), stroke=str(rng.choice(strokes))))
    return out


def _background(draw: ImageDraw.ImageDraw, side: int, kind: str, c1: RGB, c2: RGB) -> None:
    draw.rectangle([0, 0, side, side], fill=c1)
    step = side // 4
    if kind == "stripes":
        for x in range(0, side, step):
            draw.rectangle([x, 0, x + step // 2 - 1, side], fill=c2)
    elif kind == "dots":
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c2)
    elif kind == "split":
        draw.rectangle([side // 2, 0, side, side], fill=c2)
    elif kind == "checker":
        for y in range(0, side, step * 2):
            for x in range(0, side, step * 2):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=c2)
                draw.rectangle([x + step, y + step, x + 2 * step - 1, y + 2 * step - 1], fill=c2)


def _shape(draw: ImageDraw.ImageDraw, obj: str, cx: float, cy: float, r: float,
           fill: Optional[RGB], outline: Optional[RGB], width: int) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    kw = dict(fill=fill, outline=outline, width=width if outline else 0)
    if obj == "circle":
        draw.ellipse(box, **kw)
    elif obj == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], **kw)
    elif obj == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], **kw)
    elif obj == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **kw)
    elif obj == "cross":
        t = r * 0.38
        pts = [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
               (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
               (cx - r, cy - t), (cx - t, cy - t)]
        draw.polygon(pts, **kw)
    elif obj == "ring":
        draw.ellipse(box, fill=None, outline=fill or outline, width=max(int(r * 0.4), 2))
        if outline and fill:
            draw.ellipse(box, fill=None, outline=outline, width=max(width // 2, 1))
    else:
        raise ValueError(f"unknown object {obj!r}; known: {OBJECTS}")


def render(obj: str, rng: np.random.Generator, resolution: int = 16, *, artist: Optional[ArtistStyle] = None,
           colour: Optional[str] = None, position: str = "center", size: Optional[str] = None,
           jitter: float = 0.06) -> np.ndarray:
    """Draw one object; returns uint8 (resolution, resolution, 3). Deterministic given ``rng``."""
    side = resolution * SCALE
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    px, py = POSITIONS[position]
    cx = (px + rng.uniform(-jitter, jitter)) * side
    cy = (py + rng.uniform(-jitter, jitter)) * side
    frac = SIZES[size] if size else rng.uniform(0.5, 0.66)
    r = frac * side / 2
    if artist is None:
        fill = COLOURS[colour] if colour else tuple(int(v) for v in rng.integers(0, 256, 3))
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        while sum(abs(a - b) for a, b in zip(bg, fill)) < 200:
            bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        _background(draw, side, "plain", bg, bg)
        _shape(draw, obj, cx, cy, r, fill, None, 0)
    else:
        _background(draw, side, artist.background, *artist.bg_colours)
        fill = artist.palette[int(rng.integers(len(artist.palette)))]
        w = artist.stroke_width
        if artist.stroke == "fill":
            _shape(draw, obj, cx, cy, r, fill, None, 0)
        elif artist.stroke == "outline":
            _shape(draw, obj, cx, cy, r, None, fill, w)
        else:
            _shape(draw, obj, cx, cy, r, fill, artist.outline_colour, w)
    small = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(small, dtype=np.uint8)


def generic_sample(rng: np.random.Generator, resolution: int = 16,
                   objects: Sequence[str] = OBJECTS) -> Tuple[np.ndarray, str, str]:
    """One base-domain image with its caption ("a red circle" or "a circle") and object label."""
    obj = str(rng.choice(list(objects)))
    colour = str(rng.choice(list(COLOURS)))
    img = render(obj, rng, resolution, colour=colour)
    caption = f"a {colour} {obj}" if rng.random() < 0.6 else f"a {obj}"
    return img, caption, obj


@dataclass
class ConceptRecord:
    file_name: str
    text: str
    concept: str
    object: str
    extra: Dict[str, str] = field(default_factory=dict)


def _write_folder(out_dir: Path, images: Sequence[np.ndarray], records: Sequence[ConceptRecord]) -> Path:
    return write_imagefolder(out_dir, images, [{"file_name": rec.file_name, "text": rec.text, "concept": rec.concept,
                                                "object": rec.object, **rec.extra} for rec in records])


def write_concept_dataset(out_dir: str | Path, n_artists: int = 3, images_per_artist: int = 8,
                          objects: Sequence[str] = OBJECTS[:4], seed: int = 0, resolution: int = 16,
                          hard: bool = False) -> Path:
    """Write an imagefolder of ``n_artists`` x ``images_per_artist`` images; concept = artist."""
    rng = np.random.default_rng(seed)
    artists = make_artists(n_artists, hard=hard, seed=seed)
    images, records = [], []
    for a in artists:
        for i in range(images_per_artist):
            obj = objects[i % len(objects)]
            images.append(render(obj, rng, resolution, artist=a))
            records.append(ConceptRecord(f"{a.name}_{i:03d}.png", f"a {obj} by {a.name}", a.name, obj))
    return _write_folder(Path(out_dir), images, records)


def write_prior_dataset(out_dir: str | Path, n_images: int = 32, objects: Sequence[str] = OBJECTS[:4],
                        seed: int = 1, resolution: int = 16) -> Path:
    """Write base-domain images with base captions, for prior preservation during LoRA training."""
    rng = np.random.default_rng(seed)
    images, records = [], []
    for i in range(n_images):
        obj = objects[i % len(objects)]
        colour = str(rng.choice(list(COLOURS)))
        images.append(render(obj, rng, resolution, colour=colour))
        records.append(ConceptRecord(f"prior_{i:04d}.png", f"a {colour} {obj}", "prior", obj))
    return _write_folder(Path(out_dir), images, records)
