"""Label images on a chunked zarr store in a temporary folder: labels that stay on disk.

A :class:`ChunkedLabels` is an integer label array (..., H, W) kept in a zarr array whose
chunks are 1024 x 1024 tiles of one plane, stored in a new folder of the temporary
directory (``$TMPDIR``). Only what is read is in memory: napari reads the plane it shows,
a commit reads and writes the chunks under the masks' bounding box, a writer goes plane
by plane. Chunks never written take no space (zarr keeps no chunk of zeros); written
ones are zstd-compressed (labels compress to a few percent). The folder is removed by
:meth:`ChunkedLabels.close`, when the array is garbage-collected, at the interpreter's
exit, and, after a crash, by the next :class:`ChunkedLabels` made in the same directory
(folders are named after their process; a folder of a process that no longer runs is
stale).

:meth:`ChunkedLabels.from_array` starts from existing labels (the reader opens large saved
label stacks so): a chunk is copied from the source only when it is first written, reads
of chunks never written come from the source, so opening takes no time and only edited
chunks take space.

The widgets make a new labels layer chunked when :func:`use_chunked` says so: a layer of
more than one plane whose uint32 data would take more than ``MOBILESAM_CHUNKED_LABELS_MB``
MiB (default 1024). A single plane stays a numpy array: napari holds the plane it shows
as a dense array whatever backs the layer, so chunking one plane saves nothing.

The array keeps each chunk's smallest and largest value, updated lazily from the chunks
written since: ``np.max(labels)`` (the next free id, also napari's *new label*) reads
only those chunks, never the whole stack. Write through the :class:`ChunkedLabels`
(``labels[...] = ...``; napari's brush and fill do), not through :attr:`ChunkedLabels.array`
itself, or the extremes go stale.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

__all__ = [
    "CHUNK",
    "THRESHOLD_ENV",
    "ChunkedLabels",
    "LabelPlane",
    "chunked_threshold",
    "label_plane",
    "new_labels",
    "use_chunked",
]

#: chunk side (pixels) along each of the last two axes
CHUNK = 1024
#: environment variable: the size (MiB of uint32 labels) above which a stack is chunked
THRESHOLD_ENV = "MOBILESAM_CHUNKED_LABELS_MB"
#: default of :data:`THRESHOLD_ENV`
DEFAULT_THRESHOLD_MB = 1024.0
_PREFIX = "mobilesam-labels-"


def chunked_threshold() -> float | None:
    """Bytes above which a new labels stack is chunked: ``$MOBILESAM_CHUNKED_LABELS_MB``
    MiB (default 1024); None when it is ``off``.

    Raises
    ------
    ValueError
        When the variable is neither a number >= 0 nor ``off``.
    """
    text = os.environ.get(THRESHOLD_ENV, "").strip()
    if not text:
        return DEFAULT_THRESHOLD_MB * 2**20
    if text.lower() == "off":
        return None
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also NaN
        raise ValueError(f"{THRESHOLD_ENV} must be a size in MiB (>= 0) or 'off', got {text!r}")
    return mb * 2**20


def use_chunked(shape, dtype=np.uint32, threshold: float | str | None = "env") -> bool:
    """Whether a new labels array of ``shape`` should be a :class:`ChunkedLabels`.

    Parameters
    ----------
    shape : tuple of int
        (..., H, W).
    dtype : numpy dtype
    threshold : float, None or "env"
        Bytes above which a stack is chunked; None: never; "env" (default):
        :func:`chunked_threshold`.

    Returns
    -------
    bool
        True for more than one plane and more bytes than ``threshold``.
    """
    limit = chunked_threshold() if isinstance(threshold, str) else threshold
    if limit is None or len(shape) < 3 or math.prod(shape[:-2]) < 2:
        return False
    return math.prod(shape) * np.dtype(dtype).itemsize > limit


def new_labels(shape, dtype=np.uint32, *, threshold: float | str | None = "env"):
    """Zeros for a new labels layer: a :class:`ChunkedLabels` when :func:`use_chunked`,
    else a numpy array (its pages are taken from the system only where written)."""
    shape = tuple(int(s) for s in shape)
    if use_chunked(shape, dtype, threshold):
        return ChunkedLabels(shape, dtype)
    return np.zeros(shape, dtype=dtype)


def label_plane(labels, index):
    """A writable (H, W) plane of a label stack: a numpy view of a numpy array, a
    :class:`LabelPlane` of a :class:`ChunkedLabels`.

    Raises
    ------
    TypeError
        For other arrays (dask, zarr opened elsewhere): they cannot be written in place.
    """
    index = tuple(int(i) for i in index)
    if isinstance(labels, np.ndarray):
        return labels[index]
    if isinstance(labels, ChunkedLabels):
        return labels.plane(index)
    raise TypeError(
        f"labels of type {type(labels).__name__} cannot be written in place; convert them "
        "with layer.data = numpy.asarray(layer.data)"
    )


class ChunkedLabels:
    """An integer label array on a chunked zarr store in a temporary folder.

    Parameters
    ----------
    shape : tuple of int
        (..., H, W), at least 2 axes; starts as zeros.
    dtype : integer dtype
        Default uint32 (napari's labels).
    chunk : int
        Chunk side along H and W (one plane per chunk along the leading axes).
    folder : path, optional
        Where the store's folder is made (default: the temporary directory).

    Attributes
    ----------
    array : zarr.Array
        The store itself (read it freely; write through this object).
    path : Path
        The store's folder, removed by :meth:`close`.

    Raises
    ------
    TypeError
        For a dtype that is not an integer.
    ValueError
        For fewer than 2 axes or an empty one.
    """

    def __init__(self, shape, dtype=np.uint32, *, chunk: int = CHUNK, folder=None):
        import zarr

        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu":
            raise TypeError(f"labels must have an integer dtype, got {dtype}")
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"labels must be (..., H, W) with no empty axis, got {shape}")
        parent = Path(folder if folder is not None else tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        chunks = (1,) * (len(shape) - 2) + (min(shape[-2], chunk), min(shape[-1], chunk))
        self.array = zarr.create_array(
            str(self.path / "labels.zarr"), shape=shape, chunks=chunks, dtype=dtype,
            fill_value=0,
        )  # fmt: skip
        self._chunks = chunks
        grid = tuple(-(-s // c) for s, c in zip(shape, chunks, strict=True))
        self._max = np.zeros(grid, dtype=dtype)  # every chunk holds zeros only
        self._min = np.zeros(grid, dtype=dtype)
        self._dirty = np.zeros(grid, dtype=bool)
        self._pending = np.zeros(grid, dtype=bool)  # chunks still only in self._source
        self._source = None
        self._lock = threading.RLock()

    @classmethod
    def from_array(cls, source, *, chunk: int = CHUNK, folder=None) -> ChunkedLabels:
        """Labels that start as a copy of ``source``, copied lazily.

        Parameters
        ----------
        source : array_like
            (..., H, W) integer labels that can be sliced (numpy, zarr, dask, the zarr
            view of a TIFF file); read, never written. It must not change while these
            labels are in use.
        chunk, folder
            As for :class:`ChunkedLabels`.

        Returns
        -------
        ChunkedLabels
            Reads of chunks never written come from ``source``; a chunk is copied into
            the store when it is first written (or read together with written ones).
            ``max()`` reads each chunk's extremes from ``source`` once.

        Raises
        ------
        TypeError, ValueError
            As for :class:`ChunkedLabels`.
        """
        twin = cls(source.shape, source.dtype, chunk=chunk, folder=folder)
        twin._source = source
        twin._pending[...] = True
        twin._dirty[...] = True  # extremes unknown until read
        return twin

    # -- array protocol -------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    @property
    def size(self) -> int:
        return math.prod(self.array.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array in memory (not what the store takes)."""
        return self.size * self.dtype.itemsize

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._chunks

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        state = "closed" if self.closed else str(self.path)
        shape, chunks = self.shape, self.chunks
        return f"ChunkedLabels(shape={shape}, dtype={self.dtype}, chunks={chunks}, {state})"

    def __getitem__(self, key) -> np.ndarray:
        """Read ``key`` (basic indexing, or a tuple of integer arrays as in numpy's
        fancy indexing): only the chunks it touches are read. A read in another thread
        sees each chunk before or after a write, never half written (zarr writes a chunk
        file whole and renames it into place)."""
        self._check_open()
        with self._lock:
            region = self._region(_bounds(key, self.shape))
            pending = self._pending[region]
            if pending.size and pending.all() and _basic(key):  # never written: the source's
                return np.asarray(self._source[key])
            self._fetch(region)
        return np.asarray(self.array[key])

    def __setitem__(self, key, value) -> None:
        """Write ``value`` at ``key`` (as for reading); only the chunks it touches are
        written, and their extremes are recomputed at the next :meth:`max`."""
        self._check_open()
        with self._lock:
            region = self._region(_bounds(key, self.shape))
            self._fetch(region)
            self.array[key] = value
            self._dirty[region] = True

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole array in memory (what ``np.asarray`` gives: avoid on large stacks)."""
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def max(self, axis=None, out=None, keepdims=False, **kwargs):
        """The largest label (what ``np.max`` calls): from each chunk's recorded extreme,
        reading only the chunks written since the last call. With ``axis`` (or ``out``,
        ``keepdims``), numpy's on the whole array."""
        if axis is not None or out is not None or keepdims or kwargs:
            return np.asarray(self).max(axis=axis, out=out, keepdims=keepdims, **kwargs)
        return self._extreme(self._max, (), np.max)

    def min(self, axis=None, out=None, keepdims=False, **kwargs):
        """The smallest label; as :meth:`max`."""
        if axis is not None or out is not None or keepdims or kwargs:
            return np.asarray(self).min(axis=axis, out=out, keepdims=keepdims, **kwargs)
        return self._extreme(self._min, (), np.min)

    def __deepcopy__(self, memo) -> ChunkedLabels:
        """A copy in a folder of its own (napari's *Duplicate layer* deep-copies the data):
        the stored chunks are copied as they are, not read."""
        self._check_open()
        with self._lock:
            twin = ChunkedLabels(
                self.shape, self.dtype, chunk=max(self._chunks[-2:]), folder=self.path.parent
            )
            shutil.copytree(
                self.path / "labels.zarr", twin.path / "labels.zarr", dirs_exist_ok=True
            )
            for name in ("_max", "_min", "_dirty", "_pending"):
                setattr(twin, name, getattr(self, name).copy())
            twin._source = self._source
            return twin

    def __copy__(self) -> ChunkedLabels:
        """As :meth:`__deepcopy__`: a copy never shares the folder (closing one would
        remove the other's chunks)."""
        return self.__deepcopy__({})

    # -- planes and lifetime --------------------------------------------------------------

    def plane(self, index) -> LabelPlane:
        """The (H, W) plane at ``index`` (a tuple of leading indices, ``()`` for 2D), read
        and written through indexing; see :class:`LabelPlane`.

        Raises
        ------
        IndexError
            When ``index`` does not name a plane.
        """
        index = tuple(int(i) for i in index)
        lead = self.shape[:-2]
        if len(index) != len(lead) or not all(0 <= i < n for i, n in zip(index, lead, strict=True)):
            raise IndexError(f"plane {index} is not a plane of labels with planes {lead}")
        return LabelPlane(self, index)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the store's folder and let go of the source; the array cannot be used
        afterwards."""
        self._finalizer()
        self._source = None

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"these labels were closed: their folder {self.path} is removed")

    def _extreme(self, table: np.ndarray, index: tuple[int, ...], reduce):
        self._check_open()
        with self._lock:
            sub = (*index, Ellipsis)
            for chunk in np.argwhere(self._dirty[sub]):
                where = (*index, *(int(c) for c in chunk))
                window = tuple(
                    slice(i * c, (i + 1) * c) for i, c in zip(where, self._chunks, strict=True)
                )
                values = (self._source if self._pending[where] else self.array)[window]
                values = np.asarray(values)
                self._max[where], self._min[where] = values.max(), values.min()
                self._dirty[where] = False
            return self.dtype.type(reduce(table[sub]))

    def _region(self, bounds) -> tuple[slice, ...]:
        """The chunks (a slice per axis of the chunk grid) that ``bounds`` touch; all of
        them for None."""
        if bounds is None:
            return (slice(None),) * self.ndim
        return tuple(
            slice(lo // c, (hi - 1) // c + 1) if hi > lo else slice(0, 0)
            for (lo, hi), c in zip(bounds, self._chunks, strict=True)
        )

    def _fetch(self, region: tuple[slice, ...]) -> None:
        """Copy the chunks of ``region`` still in the source into the store."""
        if self._source is None:
            return
        starts = [sl.indices(n)[0] for sl, n in zip(region, self._pending.shape, strict=True)]
        for rel in np.argwhere(self._pending[region]):
            where = tuple(int(r) + s for r, s in zip(rel, starts, strict=True))
            window = tuple(
                slice(i * c, (i + 1) * c) for i, c in zip(where, self._chunks, strict=True)
            )
            values = np.asarray(self._source[window])
            if values.any():  # zarr keeps no chunk of zeros
                self.array[window] = values
            self._pending[where] = False
        if not self._pending.any():
            self._source = None  # every chunk copied: the source is no longer read


class LabelPlane:
    """One (H, W) plane of a :class:`ChunkedLabels`: what a commit writes into.

    ``plane[rows, cols]`` reads and ``plane[rows, cols] = values`` writes only the
    chunks of that region; ``plane.max()`` is the plane's largest label (from the
    recorded extremes); ``np.asarray(plane)`` reads the whole plane.
    """

    def __init__(self, labels: ChunkedLabels, index: tuple[int, ...]):
        self.labels = labels
        self.index = index

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape[-2:]

    @property
    def dtype(self) -> np.dtype:
        return self.labels.dtype

    ndim = 2

    def _key(self, key) -> tuple:
        return (*self.index, *(key if isinstance(key, tuple) else (key,)))

    def __getitem__(self, key) -> np.ndarray:
        return self.labels[self._key(key)]

    def __setitem__(self, key, value) -> None:
        self.labels[self._key(key)] = value

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.labels[self.index]
        return out if dtype is None else out.astype(dtype, copy=False)

    def max(self, axis=None, out=None, keepdims=False, **kwargs):
        """The plane's largest label (see :meth:`ChunkedLabels.max`)."""
        if axis is not None or out is not None or keepdims or kwargs:
            return np.asarray(self).max(axis=axis, out=out, keepdims=keepdims, **kwargs)
        return self.labels._extreme(self.labels._max, self.index, np.max)


def remove_stale(folder) -> list[Path]:
    """Remove the store folders in ``folder`` left by processes that no longer run (a
    crash or a kill skips the clean-up). Returns the folders removed."""
    removed = []
    for path in Path(folder).glob(f"{_PREFIX}*"):
        pid = path.name[len(_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def _basic(key) -> bool:
    """Whether ``key`` is basic indexing (integers, slices, an Ellipsis), which every
    array type reads alike."""
    key = key if isinstance(key, tuple) else (key,)
    return all(k is Ellipsis or isinstance(k, slice | int | np.integer) for k in key)


def _bounds(key, shape) -> list[tuple[int, int]] | None:
    """Per axis, the [lo, hi) range an index ``key`` touches; None when unknown (then
    every chunk counts as touched)."""
    key = key if isinstance(key, tuple) else (key,)
    dots = [i for i, k in enumerate(key) if k is Ellipsis]  # (arrays compare elementwise)
    if len(dots) > 1:
        return None
    if dots:
        at = dots[0]
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1 :]
    if len(key) > len(shape):
        return None
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            r = range(start, stop, step)
            out.append((min(r[0], r[-1]), max(r[0], r[-1]) + 1) if len(r) else (0, 0))
        elif isinstance(k, int | np.integer):
            i = int(k) + n if k < 0 else int(k)
            out.append((i, i + 1))
        else:
            a = np.asarray(k)
            if a.dtype.kind not in "iu":
                return None  # a boolean mask or something else: all of it
            if a.size == 0:
                out.append((0, 0))
                continue
            a = np.where(a < 0, a + n, a)
            out.append((int(a.min()), int(a.max()) + 1))
    return out
