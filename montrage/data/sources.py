"""Any training data as a :class:`TrainingSet`: an imagefolder, a ``datasets.Dataset``, rows of dicts.

The diffusers training scripts hand their data around as a Hugging Face ``datasets.Dataset`` with
an image column and a caption column; other scripts use a list of dicts or their own indexable
source. :func:`as_training_set` wraps each of them without copying the images: captions, concepts
and names are read once (small), images are decoded and resized only when a batch of rows is
indexed (:class:`~montrage.data.lazy.LazyImages`), so the monitor streams them at every checkpoint.
``datasets`` is never imported: a dataset is recognised by its ``column_names``.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image

from montrage.data.imagefolder import TrainingSet, decode_image, load_imagefolder
from montrage.data.lazy import LazyImages
from montrage.errors import ConfigError, DataError

__all__ = ["as_training_set"]

_SCALARS = (str, int, float, bool, type(None))


def as_training_set(obj: Any, resolution: int, image_column: str = "image", caption_column: str = "text",
                    concept_column: str = "concept") -> TrainingSet:
    """A :class:`TrainingSet` at ``resolution`` over ``obj``, images read lazily.

    ``obj``: a TrainingSet (returned as is), a path to a diffusers imagefolder (``metadata.jsonl``),
    a ``datasets.Dataset`` (or anything with ``column_names`` and ``__getitem__``), or a sequence of
    dicts. The image column may hold PIL images, uint8 arrays (H, W[, C]), file paths or
    ``{"bytes"|"path": ...}`` dicts (``datasets`` ``Image(decode=False)``); images are converted to
    RGB and centre-cropped / resized to square, as for an imagefolder. The concept column is
    optional; a ``file_name`` column, if present, names the rows (else ``row-000000``, ...).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    if isinstance(obj, TrainingSet):
        if len(obj) and obj.resolution != resolution:
            raise DataError(f"the training set holds {obj.resolution}x{obj.resolution} images but the model works at "
                            f"{resolution}x{resolution}; load it at that resolution (e.g. load_imagefolder(folder, "
                            f"{resolution})) or pass the folder / dataset itself")
        return obj
    if isinstance(obj, (str, Path)):
        return load_imagefolder(obj, resolution, lazy=True)
    if isinstance(getattr(obj, "column_names", None), Mapping):
        raise DataError(f"got a dataset dictionary with splits {', '.join(map(str, obj.column_names))}; pass one "
                        f"split, e.g. data['train']")
    if hasattr(obj, "column_names") and hasattr(obj, "__getitem__"):
        return _from_dataset(obj, resolution, image_column, caption_column, concept_column)
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return _from_rows(obj, resolution, image_column, caption_column, concept_column)
    raise DataError(f"cannot use a {type(obj).__name__} as training data; pass an imagefolder path, a "
                    f"datasets.Dataset, a sequence of dicts with {image_column!r} and {caption_column!r} keys, or "
                    f"a TrainingSet")


def _missing_caption(kind: str, columns: List[str], caption_column: str) -> DataError:
    return DataError(f"the {kind} has no caption column {caption_column!r} (its columns: {', '.join(columns) or 'none'}); "
                     f"pass the column that holds the captions, e.g. as_training_set(data, resolution, "
                     f"caption_column=...)")


def _check_columns(kind: str, columns: List[str], image_column: str, caption_column: str) -> None:
    if caption_column not in columns:
        raise _missing_caption(kind, columns, caption_column)
    if image_column not in columns:
        raise DataError(f"the {kind} has no image column {image_column!r} (its columns: {', '.join(columns)}); "
                        f"pass the column that holds the images, e.g. as_training_set(data, resolution, "
                        f"image_column=...)")


def to_rgb_array(value: Any, resolution: int, where: str) -> np.ndarray:
    """One image value of a dataset row -> uint8 (R, R, 3)."""
    try:
        if isinstance(value, Image.Image):
            return decode_image(value, resolution)[0]
        if isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path")):
            src = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            with Image.open(src) as im:
                im.load()
                return decode_image(im, resolution)[0]
        if isinstance(value, (str, Path)):
            with Image.open(value) as im:
                im.load()
                return decode_image(im, resolution)[0]
        arr = np.asarray(value) if value is not None and not isinstance(value, (int, float)) else None
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt / unsupported data
        raise DataError(f"cannot read the image of {where}: {type(e).__name__}: {e}; give a valid image") from None
    if arr is None or arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        what = type(value).__name__ if arr is None else f"{type(value).__name__} {arr.dtype} {arr.shape}"
        raise DataError(f"the image of {where} is a {what}; give a PIL image, a uint8 array of shape (H, W), "
                        f"(H, W, 3) or (H, W, 4), or an image file path")
    img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    return decode_image(img, resolution)[0]


def _strings(values: List[Any], column: str, kind: str, optional: bool) -> List[str]:
    out = []
    for i, v in enumerate(values):
        if v is None and optional:
            v = ""
        if not isinstance(v, str):
            raise DataError(f"row {i} of the {kind}: column {column!r} must hold strings, got {type(v).__name__} {v!r}")
        out.append(v)
    return out


def _build(kind: str, n: int, read, captions, concepts, names, extra, resolution: int) -> TrainingSet:
    if n == 0:
        raise DataError(f"the {kind} has no rows; give at least one image with its caption")
    if names is None:
        names = [f"row-{i:06d}" for i in range(n)]
    elif len(set(names)) != n:
        raise DataError(f"the {kind}'s file_name column lists some names twice; each row needs its own name")
    return TrainingSet(images=LazyImages(read, n, resolution), captions=captions, concepts=concepts,
                       file_names=[str(x) for x in names], extra=extra, root="")


def _from_dataset(ds: Any, resolution: int, image_column: str, caption_column: str,
                  concept_column: str) -> TrainingSet:
    kind = "dataset"
    columns = list(ds.column_names)
    _check_columns(kind, columns, image_column, caption_column)
    n = len(ds)
    captions = _strings(list(ds[caption_column]), caption_column, kind, optional=False)
    concepts = (_strings(list(ds[concept_column]), concept_column, kind, optional=True)
                if concept_column in columns else [""] * n)
    names = list(ds["file_name"]) if "file_name" in columns else None
    features = getattr(ds, "features", None)
    extra: List[Dict[str, Any]] = [{} for _ in range(n)]
    for col in columns:
        if col in (image_column, caption_column, concept_column, "file_name"):
            continue
        feature = features.get(col) if isinstance(features, Mapping) else None
        if feature is not None and type(feature).__name__ != "Value":
            continue  # images, audio, nested data: not per-row metadata (and costly to read)
        values = list(ds[col])
        if all(isinstance(v, _SCALARS) for v in values):
            for row, v in zip(extra, values):
                row[col] = v

    def read(i: int) -> np.ndarray:
        return to_rgb_array(ds[int(i)][image_column], resolution, f"row {i} of the dataset (column {image_column!r})")

    return _build(kind, n, read, captions, concepts, names, extra, resolution)


def _from_rows(rows: Any, resolution: int, image_column: str, caption_column: str,
               concept_column: str) -> TrainingSet:
    kind = "sequence of rows"
    n = len(rows)
    captions: List[str] = []
    concepts: List[str] = []
    names: Optional[List[str]] = []
    extra: List[Dict[str, Any]] = []
    for i in range(n):
        row = rows[i]  # images are not kept: only the small fields of each row
        if not isinstance(row, Mapping):
            raise DataError(f"row {i} of the training data is a {type(row).__name__}, not a dict; give rows like "
                            f"{{{image_column!r}: <PIL image>, {caption_column!r}: 'a caption'}}")
        if caption_column not in row or image_column not in row:
            _check_columns(f"row {i} of the sequence", list(row), image_column, caption_column)
        caption, concept = row[caption_column], row.get(concept_column) or ""
        if not isinstance(caption, str) or not isinstance(concept, str):
            bad, v = (caption_column, caption) if not isinstance(caption, str) else (concept_column, concept)
            raise DataError(f"row {i} of the {kind}: {bad!r} must be a string, got {type(v).__name__} {v!r}")
        captions.append(caption)
        concepts.append(concept)
        if names is not None:
            if "file_name" in row:
                names.append(row["file_name"])
            else:
                names = None
        extra.append({k: v for k, v in row.items() if k not in (image_column, caption_column, concept_column,
                                                                 "file_name") and isinstance(v, _SCALARS)})

    def read(i: int) -> np.ndarray:
        return to_rgb_array(rows[int(i)][image_column], resolution, f"row {i} (key {image_column!r})")

    return _build(kind, n, read, captions, concepts, names, extra, resolution)
