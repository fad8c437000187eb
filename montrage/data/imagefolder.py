"""Read a diffusers-style imagefolder (``metadata.jsonl`` + images), into memory or lazily.

The folder layout is the one ``datasets``' ``imagefolder`` loader and the diffusers training
scripts use::

    my_data/
      metadata.jsonl      {"file_name": "0001.png", "text": "a circle by artist-0", "concept": "artist-0"}
      0001.png
      ...

``file_name`` (a path relative to the folder) and ``text`` (the caption) are required; ``concept``
is optional (montrage's label for what the LoRA learns from that image); every other column is
kept per row in :attr:`TrainingSet.extra`. Any problem raises one :class:`~montrage.errors.DataError`
that names the file, line and field and says how to fix it; nothing is returned half-read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from montrage.data.lazy import DEFAULT_BATCH, LazyImages, iter_batches, take_rows
from montrage.errors import ConfigError, DataError

METADATA_NAME = "metadata.jsonl"
_REQUIRED = ("file_name", "text")
_KNOWN = ("file_name", "text", "concept")
_EXAMPLE_LINE = '{"file_name": "0001.png", "text": "a circle by artist-0", "concept": "artist-0"}'

__all__ = ["TrainingSet", "load_imagefolder", "write_imagefolder", "METADATA_NAME"]


@dataclass
class TrainingSet:
    """RGB images at one square resolution plus their metadata.

    ``images`` is a uint8 (N, R, R, 3) array, or a :class:`~montrage.data.lazy.LazyImages` that decodes
    only the rows it is indexed with (sources too large to hold, see :func:`montrage.data.sources.as_training_set`).
    Captions, concepts and names are small and always in memory.
    """

    images: Union[np.ndarray, LazyImages]  # uint8 (N, R, R, 3), RGB
    captions: List[str]
    concepts: List[str]  # '' where the metadata has no concept for the row
    file_names: List[str]
    extra: List[Dict[str, Any]]  # the other metadata columns of each row (e.g. 'object')
    root: str  # the folder it was read from
    converted: List[str] = field(default_factory=list)  # file names converted to RGB and/or resized

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1]) if self.images.ndim == 4 else 0

    def fingerprint(self) -> str:
        """sha256 hex over file names, captions, concepts and image bytes (in order).

        Identifies the dataset's content, e.g. so a store can refuse to resume on other data.
        ``root``, ``extra`` and ``converted`` do not enter it: moving the folder keeps it. Images are
        hashed batch by batch (a lazy set is never decoded whole); the digest equals the in-memory one.
        """
        h = hashlib.sha256()
        h.update(b"montrage-trainingset-v1\0")
        h.update(repr(tuple(int(s) for s in self.images.shape)).encode())
        h.update(str(self.images.dtype).encode())
        for part in (self.file_names, self.captions, self.concepts):
            h.update(b"\1%d\0" % len(part))
            for s in part:
                b = s.encode("utf-8", "surrogatepass")
                h.update(b"%d:" % len(b))
                h.update(b)
        h.update(b"\2")
        for batch in iter_batches(self.images, DEFAULT_BATCH):
            h.update(batch.tobytes())
        return h.hexdigest()

    def subset(self, indices: Union[Sequence[int], np.ndarray]) -> "TrainingSet":
        """The rows at ``indices`` (ints, in the given order; a boolean mask of length N also works)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"subset indices must be integers or a boolean mask, got dtype {idx.dtype}")
        idx = idx.reshape(-1).astype(np.int64)
        n = len(self)
        bad = idx[(idx < -n) | (idx >= n)]
        if bad.size:
            raise IndexError(f"subset index {int(bad[0])} is out of range for a training set of {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        rows = [int(i) for i in idx]
        names = [self.file_names[i] for i in rows]
        keep = set(names)
        return TrainingSet(
            images=take_rows(self.images, idx),
            captions=[self.captions[i] for i in rows],
            concepts=[self.concepts[i] for i in rows],
            file_names=names,
            extra=[dict(self.extra[i]) for i in rows],
            root=self.root,
            converted=[f for f in self.converted if f in keep],
        )


def _read_metadata(folder: Path) -> List[Tuple[int, Dict[str, Any]]]:
    meta = folder / METADATA_NAME
    if not meta.is_file():
        hint = ""
        others = [p.name for p in (folder / "metadata.csv", folder / "metadata.json") if p.exists()]
        if others:
            hint = f" (found {', '.join(others)}; montrage reads only metadata.jsonl, convert it to JSON lines)"
        raise DataError(
            f"{meta} not found{hint}. The diffusers imagefolder convention needs a metadata.jsonl next to "
            f"the images, one JSON object per line with 'file_name' (path relative to the folder) and "
            f"'text' (caption), optionally 'concept', e.g.:\n  {_EXAMPLE_LINE}")
    try:
        raw = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{meta} is not valid UTF-8 ({e}); save it as UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read {meta}: {e}") from None

    rows: List[Tuple[int, Dict[str, Any]]] = []
    seen: Dict[str, int] = {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            f"JSON object, e.g. {_EXAMPLE_LINE}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__} "
                            f"({line.strip()[:60]}); each line must look like {_EXAMPLE_LINE}")
        for key in _REQUIRED:
            if key not in obj:
                raise DataError(f"{where}: missing required field {key!r} (found fields: "
                                f"{', '.join(sorted(obj)) or 'none'}); every row needs 'file_name' and 'text', "
                                f"e.g. {_EXAMPLE_LINE}")
        fn = obj["file_name"]
        if not isinstance(fn, str) or not fn.strip():
            raise DataError(f"{where}: field 'file_name' must be a non-empty string (a path relative to "
                            f"{folder}), got {fn!r}")
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' (the caption) must be a string, got "
                            f"{type(obj['text']).__name__} {obj['text']!r}")
        concept = obj.get("concept")
        if concept is not None and not isinstance(concept, str):
            raise DataError(f"{where}: field 'concept' must be a string (or absent / null), got "
                            f"{type(concept).__name__} {concept!r}")
        pure = PurePosixPath(fn.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or Path(fn).is_absolute():
            raise DataError(f"{where}: file_name {fn!r} points outside {folder}; use a path relative to the "
                            f"folder without '..' (move the image into the folder)")
        key = posixpath.normpath(str(pure))
        if key in seen:
            raise DataError(f"{meta}: file_name {fn!r} appears on line {seen[key]} and again on line {lineno}; "
                            f"each image must be listed once (remove or rename the duplicate)")
        seen[key] = lineno
        rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{meta} has no rows; add one JSON object per image, e.g. {_EXAMPLE_LINE}")
    return rows


def _to_rgb(img: Image.Image) -> Tuple[Image.Image, Optional[str]]:
    """Return an RGB image and, if it was not RGB, a description of the source mode."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        if hi > 255.0:  # 16-bit / 32-bit grey: scale to the 8-bit range instead of clipping
            a = a * (255.0 / (65535.0 if hi <= 65535.0 else hi))
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB"), mode


def _square_resize(img: Image.Image, resolution: int) -> Tuple[Image.Image, bool]:
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img, False
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return img.resize((resolution, resolution), Image.LANCZOS), True


def decode_image(img: Image.Image, resolution: int) -> Tuple[np.ndarray, Optional[str], Tuple[int, int], bool]:
    """A PIL image -> (uint8 (R, R, 3), source mode if converted, original size, resized?)."""
    img = ImageOps.exif_transpose(img)
    rgb, src_mode = _to_rgb(img)
    orig_size = rgb.size
    rgb, resized = _square_resize(rgb, resolution)
    return np.asarray(rgb, dtype=np.uint8), src_mode, orig_size, resized


def _read_file(path: Path, resolution: int, where: str) -> Tuple[np.ndarray, Optional[str], Tuple[int, int], bool]:
    try:
        with Image.open(path) as im:
            im.load()
            out = decode_image(im, resolution)
    except Exception as e:  # PIL raises many types for corrupt / unsupported files
        raise DataError(f"cannot read image {path} ({where}): {type(e).__name__}: {e}; replace it with a valid "
                        f"PNG/JPEG or remove its row") from None
    if out[0].shape != (resolution, resolution, 3):  # defensive: PIL should never give this
        raise DataError(f"image {path} decoded to shape {out[0].shape}, expected ({resolution}, {resolution}, 3)")
    return out


def write_imagefolder(folder: Union[str, Path], images: Sequence[np.ndarray], rows: Sequence[Dict[str, Any]]) -> Path:
    """Write a diffusers imagefolder: each (H, W, 3) uint8 image saved as its row's ``file_name`` and the rows, one
    JSON object a line, as ``metadata.jsonl`` (what :func:`load_imagefolder` reads)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for img, row in zip(images, rows):
        Image.fromarray(np.asarray(img, np.uint8)).save(out / row["file_name"])
    (out / METADATA_NAME).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def load_imagefolder(folder: Union[str, Path], resolution: int,
                     logger: Optional[logging.Logger] = None, lazy: bool = False) -> TrainingSet:
    """Read ``folder`` (a diffusers imagefolder) into a :class:`TrainingSet` at ``resolution``.

    Non-RGB images are converted to RGB (transparency composited on white); images of another
    size are centre-cropped to square and resized with LANCZOS. Those files are listed in
    ``converted`` and summarised in one warning on ``logger``. Raises :class:`DataError` on any
    unusable input.

    ``lazy=True`` checks the metadata and that every file exists, but decodes images only when
    they are indexed (``images`` is a :class:`LazyImages`; ``converted`` stays empty): for sets too
    large to hold in memory. A corrupt file then raises when its row is first read.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    log = logger if logger is not None else logging.getLogger(__name__)
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"training-data folder {root} does not exist; pass the folder that holds "
                        f"metadata.jsonl and the images")
    if not root.is_dir():
        raise DataError(f"training-data path {root} is not a directory; pass the folder that holds "
                        f"metadata.jsonl and the images, not a file")
    rows = _read_metadata(root)
    meta = root / METADATA_NAME
    if lazy:
        return _lazy_imagefolder(root, rows, resolution)

    images = np.empty((len(rows), resolution, resolution, 3), dtype=np.uint8)
    captions: List[str] = []
    concepts: List[str] = []
    names: List[str] = []
    extra: List[Dict[str, Any]] = []
    converted: List[str] = []
    modes: Counter = Counter()
    n_resized = 0
    sizes: Counter = Counter()
    for i, (lineno, obj) in enumerate(rows):
        fn: str = obj["file_name"]
        path = root / fn.replace("\\", "/")
        if not path.is_file():
            raise DataError(f"{meta}, line {lineno}: image {fn!r} not found at {path}; add the file or fix "
                            f"its file_name")
        arr, src_mode, orig_size, resized = _read_file(path, resolution, f"listed on line {lineno} of {meta}")
        images[i] = arr
        if src_mode is not None or resized:
            converted.append(fn)
            if src_mode is not None:
                modes[src_mode] += 1
            if resized:
                n_resized += 1
                sizes[f"{orig_size[0]}x{orig_size[1]}"] += 1
        captions.append(obj["text"])
        concepts.append(obj.get("concept") or "")
        names.append(fn)
        extra.append({k: v for k, v in obj.items() if k not in _KNOWN})

    if converted:
        parts = []
        if modes:
            parts.append(f"{sum(modes.values())} converted to RGB from mode "
                         + ", ".join(f"{m} (x{c})" for m, c in sorted(modes.items()))
                         + " (transparency composited on white)")
        if n_resized:
            parts.append(f"{n_resized} resized to {resolution}x{resolution} from "
                         + ", ".join(f"{s} (x{c})" for s, c in sorted(sizes.items()))
                         + " (centre crop to square, then LANCZOS)")
        shown = ", ".join(converted[:5]) + (f", ... (+{len(converted) - 5} more)" if len(converted) > 5 else "")
        log.warning("%d of %d images in %s were not %dx%d RGB: %s. Files: %s", len(converted), len(rows), root,
                    resolution, resolution, "; ".join(parts), shown)

    return TrainingSet(images=images, captions=captions, concepts=concepts, file_names=names, extra=extra,
                       root=str(root), converted=converted)


def _lazy_imagefolder(root: Path, rows: List[Tuple[int, Dict[str, Any]]], resolution: int) -> TrainingSet:
    meta = root / METADATA_NAME
    paths: List[Path] = []
    for lineno, obj in rows:
        path = root / obj["file_name"].replace("\\", "/")
        if not path.is_file():
            raise DataError(f"{meta}, line {lineno}: image {obj['file_name']!r} not found at {path}; add the file or "
                            f"fix its file_name")
        paths.append(path)
    lines = [lineno for lineno, _ in rows]

    def read(i: int) -> np.ndarray:
        return _read_file(paths[i], resolution, f"listed on line {lines[i]} of {meta}")[0]

    return TrainingSet(images=LazyImages(read, len(rows), resolution), captions=[o["text"] for _, o in rows],
                       concepts=[o.get("concept") or "" for _, o in rows], file_names=[o["file_name"] for _, o in rows],
                       extra=[{k: v for k, v in o.items() if k not in _KNOWN} for _, o in rows], root=str(root))
