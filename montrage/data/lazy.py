"""A read-on-demand stand-in for a uint8 (N, R, R, 3) image array.

Training sets from a ``datasets.Dataset``, any indexable source or a large imagefolder decode their
images only when a batch is indexed, so the monitor, the training loop and fingerprinting never hold
the whole set in memory. Indexing returns plain numpy arrays, as the in-memory array would.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

DEFAULT_BATCH = 64
RowReader = Callable[[int], np.ndarray]  # source row -> uint8 (R, R, 3)


class LazyImages:
    """Array-like uint8 (N, R, R, 3): ``images[i]`` -> (R, R, 3); ``images[list | slice | mask]`` -> (k, R, R, 3).

    Nothing is cached: each access decodes the rows it names. ``take`` gives a lazy view of some rows.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, read_row: RowReader, n: int, resolution: int, rows: Optional[np.ndarray] = None) -> None:
        self._read = read_row
        self._rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    @property
    def shape(self) -> tuple:
        return (len(self), self.resolution, self.resolution, 3)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def _positions(self, key) -> Union[int, np.ndarray]:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of range for {n} images")
            return k % n
        if isinstance(key, slice):
            return np.arange(n)[key]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask has shape {idx.shape}, expected ({n},)")
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"image indices must be integers, a slice or a boolean mask, got dtype {idx.dtype}")
        idx = idx.reshape(-1).astype(np.int64)
        bad = idx[(idx < -n) | (idx >= n)]
        if bad.size:
            raise IndexError(f"index {int(bad[0])} is out of range for {n} images")
        return np.where(idx < 0, idx + n, idx)

    def _row(self, position: int) -> np.ndarray:
        arr = self._read(int(self._rows[position]))
        r = self.resolution
        if arr.shape != (r, r, 3) or arr.dtype != np.uint8:
            raise ValueError(f"image reader returned {arr.dtype} {arr.shape}, expected uint8 ({r}, {r}, 3)")
        return arr

    def __getitem__(self, key) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        pos = self._positions(key)
        if isinstance(pos, int):
            out = self._row(pos)
        else:
            out = np.empty((len(pos), self.resolution, self.resolution, 3), np.uint8)
            for j, p in enumerate(pos):
                out[j] = self._row(int(p))
        return out[(slice(None),) * (out.ndim - 3) + rest] if rest else out

    def take(self, indices: Sequence[int]) -> "LazyImages":
        """A lazy view of the rows at ``indices`` (in that order)."""
        pos = self._positions(indices)
        pos = np.atleast_1d(pos)
        return LazyImages(self._read, 0, self.resolution, self._rows[pos])

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self._row(i)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Materialise every image (an explicit ``np.asarray``: the whole set in memory)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, dtype=uint8)"


def iter_batches(images, batch_size: int = DEFAULT_BATCH) -> Iterator[np.ndarray]:
    """Consecutive (k, R, R, 3) batches of an array or :class:`LazyImages` (at most one batch decoded at a time)."""
    n = len(images)
    for start in range(0, n, max(1, int(batch_size))):
        yield np.ascontiguousarray(images[start:min(n, start + batch_size)])


def take_rows(images, indices: Sequence[int]):
    """Rows of an in-memory array (a copy) or a lazy view of a :class:`LazyImages` (no decoding)."""
    if isinstance(images, LazyImages):
        return images.take(indices)
    return images[np.asarray(indices, dtype=np.int64)].copy()
