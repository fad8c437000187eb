"""Real-image concept data that needs no download: glyphs of the typefaces matplotlib ships.

A typeface is a concept (an "artist"), a character is an object: "the letter g in dejavuserif-italic".
Glyphs are real designs (DejaVu, STIX, Computer Modern), unlike the made-up artists of
:mod:`montrage.data.synthetic`, so they test whether a LoRA learns a style it was not designed around.
Written as a diffusers imagefolder (``metadata.jsonl`` with ``text``, ``concept`` = face, ``object`` =
character), like the synthetic artists.

How an image is made: the character is drawn with PIL ``ImageFont.truetype`` at 8x the training
resolution, cropped to its ink, scaled so its larger side fills ~74% of the frame, placed with a small
position jitter, and downsampled (LANCZOS). Ink and paper tones vary a little per image, so two images
of one character in one face are never identical. Every image is seeded by (seed, face, character,
copy), not by its position in the set, so a subset or a held-out pair renders the same pixels.

Default faces: eight of matplotlib's fonts that stay apart at 16x16 pixels (the smallest mean pixel
distance between two of them is ~26/255 per pixel, chosen over all 18 candidates in :data:`FACES`);
default characters: eight lowercase letters whose caption words take distinct slots of the embedded
text encoder (it lower-cases prompts and hashes unknown words into 64 slots, so e.g. "k" and "r"
would be the same word to it; the tests check this).

Licences: no font file is shipped with montrage. The glyphs are rendered at run time from the files
inside matplotlib's own ``mpl-data/fonts/ttf`` folder, under their licences, which matplotlib
distributes next to them: DejaVu (``LICENSE_DEJAVU``: the Bitstream Vera licence, DejaVu changes in the
public domain), STIX (``LICENSE_STIX``: SIL Open Font License 1.1) and the BaKoMa Computer Modern
fonts ``cm*.ttf`` (the BaKoMa Fonts Licence in matplotlib's ``LICENSE`` file; it allows use of the
fonts without notice). Rendered images are documents made with the fonts, which all three licences
allow without restriction.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from montrage.data.imagefolder import write_imagefolder
from montrage.errors import ConfigError, DataError

__all__ = ["FaceSpec", "FACES", "DEFAULT_FACES", "DEFAULT_CHARACTERS", "UNSEEN_CHARACTERS", "GlyphRecord",
           "font_dir", "font_path", "caption", "render_glyph", "render_pairs", "holdout_pairs",
           "write_typeface_folder"]

SCALE = 8  # render at 8x the training resolution, then downsample
FILL = (0.68, 0.80)  # the glyph's larger side, as a fraction of the frame
SHIFT = 0.06  # position jitter, as a fraction of the frame
INK = (0, 60)  # grey level of the ink
PAPER = (200, 255)  # grey level of the paper
TINT = 8  # per-channel offset of the paper (warm / cool paper), in grey levels


@dataclass(frozen=True)
class FaceSpec:
    """A typeface: its caption word (the concept name) and its TrueType file in matplotlib's mpl-data."""

    name: str
    file: str
    family: str  # DejaVu | STIX | Computer Modern (BaKoMa)


_FACE_LIST: Tuple[FaceSpec, ...] = (
    FaceSpec("dejavusans", "DejaVuSans.ttf", "DejaVu"),
    FaceSpec("dejavusans-bold", "DejaVuSans-Bold.ttf", "DejaVu"),
    FaceSpec("dejavusans-oblique", "DejaVuSans-Oblique.ttf", "DejaVu"),
    FaceSpec("dejavusans-boldoblique", "DejaVuSans-BoldOblique.ttf", "DejaVu"),
    FaceSpec("dejavuserif", "DejaVuSerif.ttf", "DejaVu"),
    FaceSpec("dejavuserif-bold", "DejaVuSerif-Bold.ttf", "DejaVu"),
    FaceSpec("dejavuserif-italic", "DejaVuSerif-Italic.ttf", "DejaVu"),
    FaceSpec("dejavumono", "DejaVuSansMono.ttf", "DejaVu"),
    FaceSpec("dejavumono-bold", "DejaVuSansMono-Bold.ttf", "DejaVu"),
    FaceSpec("stix", "STIXGeneral.ttf", "STIX"),
    FaceSpec("stix-bold", "STIXGeneralBol.ttf", "STIX"),
    FaceSpec("stix-italic", "STIXGeneralItalic.ttf", "STIX"),
    FaceSpec("stix-bolditalic", "STIXGeneralBolIta.ttf", "STIX"),
    FaceSpec("cmr10", "cmr10.ttf", "Computer Modern (BaKoMa)"),
    FaceSpec("cmss10", "cmss10.ttf", "Computer Modern (BaKoMa)"),
    FaceSpec("cmtt10", "cmtt10.ttf", "Computer Modern (BaKoMa)"),
    FaceSpec("cmb10", "cmb10.ttf", "Computer Modern (BaKoMa)"),
    FaceSpec("cmti10", "cmti10.ttf", "Computer Modern (BaKoMa)"),
)
FACES: Dict[str, FaceSpec] = {f.name: f for f in _FACE_LIST}

# Sans, sans bold-oblique, serif bold, serif italic, STIX roman, STIX bold italic, CM typewriter, CM italic.
DEFAULT_FACES: Tuple[str, ...] = ("dejavusans", "dejavusans-boldoblique", "dejavuserif-bold", "dejavuserif-italic",
                                  "stix", "stix-bolditalic", "cmtt10", "cmti10")
DEFAULT_CHARACTERS: Tuple[str, ...] = ("a", "b", "e", "g", "k", "m", "s", "y")
# Characters no default training image shows: "an unseen image in a face's style" for image-only queries.
UNSEEN_CHARACTERS: Tuple[str, ...] = ("d", "h", "n", "p", "t", "u", "w", "x")


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (``mpl-data/fonts/ttf``)."""
    try:
        import matplotlib
    except ImportError as e:  # a dependency of montrage; only a broken install lacks it
        raise DataError("the typeface set renders matplotlib's bundled fonts, but matplotlib is not importable; "
                        "install it with `pip install matplotlib`") from e
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_path(face: str) -> Path:
    """The TrueType file of ``face`` (a key of :data:`FACES`)."""
    if face not in FACES:
        raise ConfigError(f"unknown typeface {face!r}; choose from {sorted(FACES)}")
    path = font_dir() / FACES[face].file
    if not path.is_file():
        raise DataError(f"font file {path} of typeface {face!r} is missing from matplotlib's mpl-data; "
                        f"reinstall matplotlib (`pip install --force-reinstall matplotlib`) or pick another face")
    return path


def caption(face: str, character: str) -> str:
    """The training caption of ``character`` in ``face``, e.g. "the letter g in dejavuserif-italic"."""
    return f"the letter {character} in {face}"


@lru_cache(maxsize=64)
def _font(face: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(face)), size=size)


def _check(faces: Sequence[str], characters: Sequence[str]) -> None:
    for f in faces:
        if f not in FACES:
            raise ConfigError(f"unknown typeface {f!r}; choose from {sorted(FACES)}")
    for c in characters:
        if not isinstance(c, str) or len(c) != 1 or not c.isalnum():
            raise ConfigError(f"characters must be single letters or digits, got {c!r}")
    if len(set(faces)) != len(faces) or len(set(characters)) != len(characters):
        raise ConfigError("faces and characters must not repeat")
    if len({c.lower() for c in characters}) != len(characters):
        raise ConfigError(f"characters {list(characters)} differ only in case; the caption words would be the same "
                          f"word (prompts are lower-cased), so keep one case per letter")


def _rng(seed: int, face: str, character: str, copy: int) -> np.random.Generator:
    """Per-image generator keyed by content, not position: subsets and held-out pairs render identically."""
    return np.random.default_rng([int(seed), zlib.crc32(face.encode()), zlib.crc32(character.encode()), int(copy)])


def render_glyph(face: str, character: str, rng: Optional[np.random.Generator] = None, resolution: int = 16,
                 jitter: bool = True) -> np.ndarray:
    """Draw ``character`` in ``face``; uint8 (resolution, resolution, 3). ``jitter=False``: centred, black on white."""
    _check([face], [character])
    if resolution < 4:
        raise ConfigError(f"resolution must be >= 4 pixels, got {resolution}")
    rng = rng if rng is not None else np.random.default_rng(0)
    side = resolution * SCALE
    font = _font(face, side)
    canvas = Image.new("L", (side * 3, side * 3), 0)
    ImageDraw.Draw(canvas).text((side, side), character, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        raise DataError(f"typeface {face!r} has no glyph for {character!r} (rendered blank); pick another character")
    glyph = canvas.crop(box)
    if jitter:
        fill, dx, dy = rng.uniform(*FILL), rng.uniform(-SHIFT, SHIFT), rng.uniform(-SHIFT, SHIFT)
        ink, paper = rng.uniform(*INK), rng.uniform(*PAPER)
        tint = rng.uniform(-TINT, TINT, 3)
    else:
        fill, dx, dy, ink, paper, tint = float(np.mean(FILL)), 0.0, 0.0, 0.0, 255.0, np.zeros(3)
    w, h = glyph.size
    s = fill * side / max(w, h)
    glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    mask = Image.new("L", (side, side), 0)
    x = int(round((side - glyph.size[0]) / 2 + dx * side))
    y = int(round((side - glyph.size[1]) / 2 + dy * side))
    mask.paste(glyph, (x, y))
    alpha = np.asarray(mask.resize((resolution, resolution), Image.LANCZOS), dtype=np.float64)[..., None] / 255.0
    paper_rgb = np.clip(paper + tint, 0, 255)
    img = paper_rgb * (1 - alpha) + ink * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class GlyphRecord:
    """One rendered glyph's metadata row (the imagefolder's ``metadata.jsonl`` line)."""

    file_name: str
    text: str
    concept: str  # the face
    object: str  # the character
    copy: int

    def to_json(self) -> dict:
        return {"file_name": self.file_name, "text": self.text, "concept": self.concept, "object": self.object,
                "copy": self.copy}


def _file_name(face: str, character: str, copy: int) -> str:
    code = f"u{ord(character):04x}"  # file systems that ignore case would merge "a" and "A"
    return f"{face}_{code}_{copy:03d}.png"


def render_pairs(pairs: Iterable[Tuple[str, str]], per_pair: int = 1, resolution: int = 16, seed: int = 0,
                 first_copy: int = 0) -> Tuple[np.ndarray, List[GlyphRecord]]:
    """Images and records of each (face, character) pair, copies ``first_copy .. first_copy+per_pair-1``.

    With the training ``seed`` and ``first_copy >= per_pair`` of the training set this gives fresh images of
    trained pairs; with a pair the set never contained (a held-out pair or an unseen character), an unseen
    image in that face's style.
    """
    pairs = list(pairs)
    if per_pair < 1:
        raise ConfigError(f"per_pair must be >= 1, got {per_pair}")
    _check(list(dict.fromkeys(f for f, _ in pairs)), list(dict.fromkeys(c for _, c in pairs)))
    images, records = [], []
    for face, ch in pairs:
        for k in range(first_copy, first_copy + per_pair):
            images.append(render_glyph(face, ch, _rng(seed, face, ch, k), resolution))
            records.append(GlyphRecord(_file_name(face, ch, k), caption(face, ch), face, ch, k))
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return (np.stack(images) if images else empty), records


def holdout_pairs(faces: Sequence[str] = DEFAULT_FACES, characters: Sequence[str] = DEFAULT_CHARACTERS,
                  seed: int = 0) -> List[Tuple[str, str]]:
    """One held-out (face, character) pair per face, each character held out at most once per cycle.

    Leaving these out of training makes "a face with a character it never drew" prompts (new compositions)
    while every face and every character is still trained with others. Needs >= 2 characters.
    """
    _check(faces, characters)
    if len(characters) < 2:
        raise ConfigError("holdout_pairs needs at least 2 characters, so every face keeps one in training")
    rng = np.random.default_rng(seed)
    order = [characters[i] for i in rng.permutation(len(characters))]
    return [(f, order[i % len(order)]) for i, f in enumerate(faces)]


def write_typeface_folder(root: str | Path, faces: Sequence[str] = DEFAULT_FACES,
                          characters: Sequence[str] = DEFAULT_CHARACTERS, per_pair: int = 1, resolution: int = 16,
                          seed: int = 0, exclude: Iterable[Tuple[str, str]] = ()) -> Path:
    """Write an imagefolder of every face x character (minus ``exclude``), ``per_pair`` images each; concept = face.

    Defaults: 8 faces x 8 characters x 1 = 64 images of 16x16. Returns ``root``.
    """
    _check(faces, characters)
    skip = {(f, c) for f, c in exclude}
    unknown = skip - {(f, c) for f in faces for c in characters}
    if unknown:
        raise ConfigError(f"exclude names pairs that are not in the set: {sorted(unknown)}")
    pairs = [(f, c) for f in faces for c in characters if (f, c) not in skip]
    if not pairs:
        raise ConfigError("every (face, character) pair is excluded: nothing to write")
    images, records = render_pairs(pairs, per_pair, resolution, seed)
    return write_imagefolder(root, images, [r.to_json() for r in records])
